"""Sweeps with --ray: each revision a task on the one local Ray of the test run (conftest.local_ray: 2 CPUs), the
rows written by the driver alone. Checkpoints come from the loopback Hub of tests/hub.py, as in test_sweep.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import OLMO2KIT, one_line_error, run_olmo2kit
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


@pytest.fixture(scope="module")
def local_rows(checkpoints, hub_server, tmp_path_factory) -> list[dict]:
    """The rows of org/sweep-ray measured without Ray, in this process (once for the module)."""
    from huggingface_hub import constants

    root = tmp_path_factory.mktemp("sweep-local")
    (root / "data.txt").write_text(TEXT, encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:  # hub_env's settings, for a fixture of the module
        patch.setenv("HF_HOME", str(root / "hf"))
        patch.setenv("HF_HUB_CACHE", str(root / "hf" / "hub"))
        patch.setattr(constants, "ENDPOINT", hub_server.url)
        patch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                      hub_server.url + "/{repo_id}/resolve/{revision}/{filename}")
        patch.setattr(constants, "HF_HUB_CACHE", str(root / "hf" / "hub"))
        steps = list(Sweep(REPO, data=root / "data.txt", out=root / "local.jsonl", dtype="fp32", device="cpu").run())
    assert len(steps) == 3
    return read_results(root / "local.jsonl")


def same_rows(rows: list[dict], local_rows: list[dict]) -> None:
    """Each revision once, and each row the local sweep's but for its timings."""
    assert sorted(row["revision"] for row in rows) == sorted(row["revision"] for row in local_rows)
    by_name = {row["revision"]: row for row in rows}
    for row in local_rows:
        assert without_timing(by_name[row["revision"]]) == without_timing(row)


def without_timing(row: dict) -> dict:
    return {key: without_timing(value) if isinstance(value, dict) else value for key, value in row.items()
            if key not in TIMING}


def test_ray_sweep_gives_the_rows_of_a_local_sweep_and_resumes(local_rows, local_ray, hub_env, cli, data, tmp_path):
    out = tmp_path / "ray.jsonl"
    # The Ray run resumes a file that holds the first row and a line torn by a kill.
    first = local_rows[0] | {"finished_at": "earlier"}
    out.write_text(json.dumps(first) + '\n{"revision": "stage1-step2000-tok', encoding="utf-8")

    code, stdout, stderr = cli("sweep", "--model", REPO, "--data", str(data), "--out", str(out), "--device",
                               "cpu", "--dtype", "fp32", "--ray")
    assert code == 0, stderr
    assert f"{REPO}: 3 revisions, 1 already in {out}, 2 to measure" in stderr
    assert (f"Ray: the Ray this process runs already, at {local_ray}: 2 CPUs, 0 GPUs; each task asks for 1 CPU and "
            "0 GPUs, tried up to 3 times") in stderr
    # The progress bar, a line per revision as it finishes, with the rate.
    assert stderr.count("revisions/s") == 2 and "2/2" in stderr
    rows = read_results(out)
    assert rows[0]["finished_at"] == "earlier"
    same_rows(rows, local_rows)
    assert out.read_bytes().endswith(b"\n") and len(out.read_bytes().split(b"\n")) == 4
    assert [line.split()[0] for line in stdout.splitlines()[1:]] == [r["revision"] for r in local_rows]


def test_a_driver_killed_halfway_resumes_without_repeats(local_rows, local_ray, hub_env, cli, data, tmp_path):
    """A real `olmo2kit sweep --ray auto` joins the test's Ray (RAY_ADDRESS) and is killed once a row is in; the
    units it left running are lost with it, and the rerun measures only what the file lacks."""
    out = tmp_path / "ray.jsonl"
    args = ["sweep", "--model", REPO, "--data", str(data), "--out", str(out), "--device", "cpu", "--dtype", "fp32"]
    driver = subprocess.Popen([str(OLMO2KIT), *args, "--ray", "auto"], env={**os.environ, "RAY_ADDRESS": local_ray},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not read_results(out) and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(driver.pid, signal.SIGKILL)
    finally:
        driver.kill()
        _, stderr = driver.communicate()
    written = read_results(out)
    assert 1 <= len(written) < 3, stderr

    code, _, stderr = cli(*args, "--ray")
    assert code == 0, stderr
    assert f"{len(written)} already in {out}, {3 - len(written)} to measure" in stderr
    rows = read_results(out)
    assert rows[: len(written)] == written
    same_rows(rows, local_rows)


def test_a_revision_that_always_fails_is_reported_and_the_others_finish(checkpoints, local_ray, hub_env, cli,
                                                                        data, tmp_path):
    out = tmp_path / "results.jsonl"
    code, stdout, stderr = cli("sweep", "--model", BROKEN_REPO, "--data", str(data), "--out", str(out),
                               "--device", "cpu", "--dtype", "fp32", "--ray", "--ray-retries", "1")
    line = one_line_error(code, stderr, "1 of 3 revisions failed (each said why above)")
    assert "run the same command again" in line
    assert len([line for line in stderr.splitlines() if f"{BROKEN} failed: " in line]) == 1
    assert sorted(row["revision"] for row in read_results(out)) == sorted(set(BRANCHES) - {BROKEN, "main"})


@pytest.mark.parametrize(("options", "needle"), [
    (["--ray", "nowhere"], "give local, auto, HOST:PORT or ray://HOST:PORT"),
    (["--ray-gpus", "1"], "give them with --ray"),
    (["--ray", "--ray-cpus", "-1"], "--ray-cpus -1: give 0 or more"),
    (["--ray", "--ray-gpus", "1"], "--ray-gpus 1: the Ray cluster has 0 GPUs"),
])
def test_bad_ray_options_are_one_line_errors(checkpoints, local_ray, hub_env, cli, data, tmp_path, options, needle):
    code, _, stderr = cli("sweep", "--model", REPO, "--data", str(data), "--out", str(tmp_path / "r.jsonl"),
                          *options)
    one_line_error(code, stderr, needle)
    assert not (tmp_path / "r.jsonl").exists()


# Run in a process of their own: a process where Ray is initialized (this one) uses that Ray, whatever --ray says.
@pytest.mark.parametrize(("options", "env", "needle"), [
    (["--ray", "127.0.0.1:1"], {}, "--ray 127.0.0.1:1: cannot reach a Ray head there (Connection refused)"),
    (["--ray", "ray://127.0.0.1:1"], {}, "--ray ray://127.0.0.1:1: cannot reach a Ray head there"),
    (["--ray", "auto"], {"RAY_ADDRESS": "127.0.0.1:1"}, "--ray auto: cannot reach a Ray head there"),
])
def test_an_address_where_no_ray_answers_fails_in_seconds(checkpoints, hub_env, data, tmp_path, options, env,
                                                         needle):
    start = time.monotonic()
    done = run_olmo2kit("sweep", "--model", REPO, "--data", str(data), "--out", str(tmp_path / "r.jsonl"), *options,
                        env=env)
    one_line_error(done.returncode, done.stderr, needle, alone=True)
    assert time.monotonic() - start < 20
    assert not (tmp_path / "r.jsonl").exists()


def test_ray_alone_starts_a_ray_of_its_own_and_stops_it(local_rows, hub_env, data, tmp_path):
    """In a process of its own (not one where Ray runs already), bare --ray starts a Ray, even with RAY_ADDRESS
    naming a dead one (which it must neither join nor wait on), measures, and leaves no process of that Ray
    behind. Two of the three rows are in already: one revision is measured."""
    out = tmp_path / "ray.jsonl"
    out.write_text("".join(json.dumps(row) + "\n" for row in local_rows[:2]), encoding="utf-8")
    # Ray's files of this run alone (other Rays run on this machine), under a short path: its sockets' paths must
    # fit in 107 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    try:
        done = run_olmo2kit("sweep", "--model", REPO, "--data", str(data), "--out", str(out), "--device", "cpu",
                            "--dtype", "fp32", "--ray", env={"RAY_ADDRESS": "127.0.0.1:1", "RAY_TMPDIR": str(ray_tmp)})
        assert done.returncode == 0, done.stderr
        assert "Ray: a Ray started here: " in done.stderr and "2 already in" in done.stderr
        same_rows(read_results(out), local_rows)
        sessions = [path for path in (ray_tmp / "ray").glob("session_*") if not path.is_symlink()]
        assert len(sessions) == 1, sessions
        deadline = time.monotonic() + 30
        while (left := processes_naming(str(sessions[0]))) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def processes_naming(text: str) -> list[str]:
    """The command lines of this machine's processes that hold `text` (a Ray's session directory)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if text in args:
            found.append(args)
    return found


def test_ray_without_the_extra_says_how_to_install_it(checkpoints, hub_env, data, tmp_path):
    """`import ray` fails in that process, as where the extra is not installed."""
    code = "import sys; sys.modules['ray'] = None; from olmo2kit.cli.app import main; main()"
    done = subprocess.run([sys.executable, "-c", code, "sweep", "--model", REPO, "--data", str(data), "--out",
                           str(tmp_path / "r.jsonl"), "--ray"], capture_output=True, text=True, timeout=120)
    one_line_error(done.returncode, done.stderr, "--ray needs Ray: pip install 'olmo2kit[ray]'", alone=True)


def test_a_worker_whose_auto_dtype_differs_from_the_sweeps_refuses_the_unit():
    """On a cluster of unlike machines "auto" may mean another dtype on another worker: the unit says so (an
    Olmo2KitError, reported at once) before loading, rather than mix dtypes in one results file."""
    from olmo2kit.errors import Olmo2KitError
    from olmo2kit.evals.sweep import RevisionMeasure
    from olmo2kit.model.revisions import parse_revision

    measure = RevisionMeasure(REPO, "perplexity", TEXT, dict(engine="transformers", vllm=None, dtype="fp32",
                                                             quantize=None, device="cpu"),
                              {}, {"dtype": "bfloat16"}, 0, False)
    with pytest.raises(Olmo2KitError, match="--dtype fp32 is float32 here, and bfloat16 in this sweep's setup: "
                                            "give --dtype bfloat16"):
        measure(parse_revision("stage1-step1000-tokens3B"))
