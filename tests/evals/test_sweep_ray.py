"""Sweeps with --ray: each revision a task on one local Ray (2 CPUs, started once for this module), the rows
written by the driver alone. Checkpoints come from the loopback Hub of tests/hub.py, as in test_sweep.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from conftest import one_line_error
from hub import read_checkpoint
from olmo2kit.evals.sweep import Sweep, read_results

ray = pytest.importorskip("ray")

REPO = "org/sweep-ray"
# Branch -> seed of the tiny checkpoint it serves; None: a checkpoint whose weights are not safetensors.
BRANCHES = {
    "stage1-step1000-tokens3B": 1,
    "stage1-step2000-tokens5B": 2,
    "stage1-step3000-tokens7B": 3,
    "main": 3,
}
BROKEN_REPO = "org/sweep-ray-broken"
BROKEN = "stage1-step2000-tokens5B"
TEXT = "Language modeling is the task of predicting the next word in a sequence of text. " * 3
# What differs between two runs of the same measurement: timings, in the row and in its details.
TIMING = ("load_s", "eval_s", "finished_at", "elapsed_s", "tokens_per_s")


@pytest.fixture(scope="module")
def checkpoints(hub_server, tmp_path_factory) -> None:
    """org/sweep-ray (three checkpoints) and org/sweep-ray-broken (the second's weights garbage)."""
    from olmo2kit.model.tiny import build_tiny

    root = tmp_path_factory.mktemp("sweep-ray-checkpoints")
    built = {seed: build_tiny(root / f"seed{seed}", seed=seed) for seed in sorted(set(BRANCHES.values()))}
    hub_server.add_repo(REPO, {name: built[seed] for name, seed in BRANCHES.items()})
    broken = {**read_checkpoint(built[2]), "model.safetensors": b"not safetensors" * 100}
    hub_server.add_repo(BROKEN_REPO, {name: broken if name == BROKEN else built[seed]
                                      for name, seed in BRANCHES.items()})


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "data.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def without_timing(row: dict) -> dict:
    return {key: without_timing(value) if isinstance(value, dict) else value for key, value in row.items()
            if key not in TIMING}


def test_ray_sweep_gives_the_rows_of_a_local_sweep_and_resumes(checkpoints, local_ray, hub_env, cli, data,
                                                               tmp_path):
    local_out, ray_out = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    local = Sweep(REPO, data=data, out=local_out, dtype="fp32", device="cpu")
    steps = list(local.run())
    assert len(steps) == 3
    local_rows = read_results(local_out)
    # The Ray run resumes a file that holds the first row and a line torn by a kill.
    ray_out.write_bytes(local_out.read_bytes().split(b"\n")[0] + b'\n{"revision": "stage1-step2000-tok')

    code, stdout, stderr = cli("sweep", "--model", REPO, "--data", str(data), "--out", str(ray_out), "--device",
                               "cpu", "--dtype", "fp32", "--ray", "local")
    assert code == 0, stderr
    assert f"{REPO}: 3 revisions, 1 already in {ray_out}, 2 to measure" in stderr
    ray_rows = read_results(ray_out)
    names = [row["revision"] for row in ray_rows]
    assert names[0] == local_rows[0]["revision"] and sorted(names) == sorted(r["revision"] for r in local_rows)
    by_name = {row["revision"]: row for row in ray_rows}
    for row in local_rows:
        assert without_timing(by_name[row["revision"]]) == without_timing(row)
    assert ray_out.read_bytes().endswith(b"\n") and len(ray_out.read_bytes().split(b"\n")) == 4
    assert [line.split()[0] for line in stdout.splitlines()[1:]] == [r["revision"] for r in local_rows]


def test_a_revision_that_always_fails_is_reported_and_the_others_finish(checkpoints, local_ray, hub_env, cli,
                                                                        data, tmp_path):
    out = tmp_path / "results.jsonl"
    code, stdout, stderr = cli("sweep", "--model", BROKEN_REPO, "--data", str(data), "--out", str(out),
                               "--device", "cpu", "--dtype", "fp32", "--ray", "local")
    line = one_line_error(code, stderr, "1 of 3 revisions failed")
    assert "run the same command again" in line
    assert f"{BROKEN} failed: " in stderr
    assert sorted(row["revision"] for row in read_results(out)) == sorted(set(BRANCHES) - {BROKEN, "main"})


@pytest.mark.parametrize(("options", "needle"), [
    (["--ray", "nowhere"], "give local, auto, HOST:PORT or ray://HOST:PORT"),
    (["--ray-gpus", "1"], "give them with --ray"),
    (["--ray", "--ray-cpus", "-1"], "--ray-cpus -1: give 0 or more"),
])
def test_bad_ray_options_are_one_line_errors(checkpoints, hub_env, cli, data, tmp_path, options, needle):
    code, _, stderr = cli("sweep", "--model", REPO, "--data", str(data), "--out", str(tmp_path / "r.jsonl"),
                          *options)
    one_line_error(code, stderr, needle)
    assert not (tmp_path / "r.jsonl").exists()


def test_gpus_the_cluster_lacks_are_a_one_line_error(checkpoints, local_ray, hub_env, cli, data, tmp_path):
    code, _, stderr = cli("sweep", "--model", REPO, "--data", str(data), "--out", str(tmp_path / "r.jsonl"),
                          "--ray", "local", "--ray-gpus", "1")
    one_line_error(code, stderr, "--ray-gpus 1: the Ray cluster has 0 GPUs")


def test_ray_without_the_extra_says_how_to_install_it(checkpoints, hub_env, cli, data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    code, _, stderr = cli("sweep", "--model", REPO, "--data", str(data), "--out", str(tmp_path / "r.jsonl"),
                          "--ray", "local")
    one_line_error(code, stderr, "pip install 'olmo2kit[ray]'")



@pytest.mark.parametrize("how", ["exception", "kill"])
def test_a_unit_is_retried_a_bounded_number_of_times(local_ray, tmp_path, how):
    from olmo2kit.inference.ray_pool import RayOptions, RayPool

    def fail_first_tries(marks: str, fails: int, value: int) -> int:
        """Fail the first `fails` tries (an exception, or the worker process killed), each counted in a file.
        Defined here so that Ray sends it by value: the workers cannot import this test module."""
        tries = len(list(Path(marks).iterdir()))
        (Path(marks) / str(tries)).touch()
        if tries < fails:
            if how == "kill":
                os._exit(1)
            raise RuntimeError(f"try {tries} failed")
        return value * 10

    pool = RayPool(RayOptions(address="local", retries=2))
    marks = {key: tmp_path / key for key in ("once", "always")}
    for path in marks.values():
        path.mkdir()
    units = {"once": (str(marks["once"]), 1, 1), "always": (str(marks["always"]), 99, 2)}
    done = {unit.key: unit for unit in pool.map(fail_first_tries, units)}
    assert (done["once"].value, done["once"].error) == (10, None)
    assert done["always"].value is None and done["always"].error
    if how == "exception":
        assert done["always"].error == "RuntimeError: try 2 failed"
    assert len(list(marks["once"].iterdir())) == 2 and len(list(marks["always"].iterdir())) == 3
