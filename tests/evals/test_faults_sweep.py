"""Sweep faults: an empty --revisions is an error (not every revision), and one sweep at a time owns its --out.
Checkpoints are org/repo's stage-1 branches on the loopback Hub of tests/hub.py."""

from __future__ import annotations

import os

import pytest

from olmo2kit.errors import Olmo2KitError
from olmo2kit.evals.sweep import Sweep, read_results

REPO = "org/repo"
CHECKPOINTS = ["stage1-step1000-tokens3B", "stage1-step2000-tokens5B"]  # org/repo's, in training order


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("Language modeling is the task of predicting the next word in a sequence of text. " * 2)
    return path


@pytest.mark.parametrize("revisions", ["", " ", ",", " , ,"])
def test_an_empty_revisions_list_is_an_error_not_every_revision(hub, hub_env, cli, data, tmp_path, revisions):
    out = tmp_path / "r.jsonl"
    code, stdout, stderr = cli("sweep", "--model", REPO, "--data", str(data), "--out", str(out),
                               "--revisions", revisions, "--device", "cpu")
    assert code == 2 and stdout == ""
    assert stderr == ("error: --revisions names no revision: give branch names, comma-separated, or leave it out "
                      "to choose by --stage and --every\n")
    assert hub.requests == [] and not out.exists()  # refused before the Hub is asked anything


def test_blank_names_among_revisions_are_left_out(hub, hub_env, data, tmp_path):
    with pytest.raises(Olmo2KitError, match="--revisions names no revision"):
        Sweep(REPO, data=data, out=tmp_path / "r.jsonl", revisions=[" ", ""])
    sweep = Sweep(REPO, data=data, out=tmp_path / "r.jsonl", revisions=["", f" {CHECKPOINTS[1]} ", " "])
    assert [r.name for r in sweep.revisions] == [CHECKPOINTS[1]]


def test_a_second_sweep_on_the_same_out_fails_at_once_naming_the_first(hub, hub_env, cli, data, tmp_path):
    out = tmp_path / "r.jsonl"
    first = Sweep(REPO, data=data, out=out, device="cpu", revisions=CHECKPOINTS).run()
    assert next(first).row["revision"] == CHECKPOINTS[0]  # the first run is between two revisions, holding --out
    downloads = hub.count("/lfs/")

    code, stdout, stderr = cli("sweep", "--model", REPO, "--data", str(data), "--out", str(out), "--device", "cpu",
                               "--revisions", ",".join(CHECKPOINTS))
    assert code == 2
    assert stderr.splitlines()[-1].startswith(f"error: {out} is in use by another olmo2kit run (pid {os.getpid()} ")
    assert stderr.splitlines()[-1].endswith("wait for it to end, or give another --out")
    second = Sweep(REPO, data=data, out=out, device="cpu", revisions=CHECKPOINTS).run()
    with pytest.raises(Olmo2KitError, match="is in use by another olmo2kit run"):
        next(second)
    assert hub.count("/lfs/") == downloads  # neither loaded anything

    assert [step.row["revision"] for step in first] == CHECKPOINTS[1:]  # the first carries on, then lets go
    assert [row["revision"] for row in read_results(out)] == CHECKPOINTS
    code, _, stderr = cli("sweep", "--model", REPO, "--data", str(data), "--out", str(out), "--device", "cpu",
                          "--revisions", ",".join(CHECKPOINTS))
    assert code == 0 and "2 already in" in stderr


def test_a_sweep_built_before_another_ran_does_not_measure_twice(hub, hub_env, data, tmp_path):
    out = tmp_path / "r.jsonl"
    early = Sweep(REPO, data=data, out=out, device="cpu", revisions=CHECKPOINTS)
    assert [r.name for r in early.todo] == CHECKPOINTS
    assert len(list(Sweep(REPO, data=data, out=out, device="cpu", revisions=CHECKPOINTS).run())) == 2
    assert list(early.run()) == []  # it reads the results again once it holds --out
    assert [row["revision"] for row in read_results(out)] == CHECKPOINTS


@pytest.mark.parametrize("line", ['{"revision": ["a"]}', '{"revision": "a", "setup": 5}'])
def test_results_lines_of_the_wrong_shape_are_not_results(tmp_path, line):
    """Found in review: these passed as results and failed later with TypeError or AttributeError."""
    from olmo2kit.evals.sweep import read_results

    (tmp_path / "r.jsonl").write_text(line + "\n" + '{"revision": "b"}\n')
    with pytest.raises(Olmo2KitError, match="line 1 is not a sweep results line"):
        read_results(tmp_path / "r.jsonl")
