"""Sweeps over checkpoints served by the loopback Hub of tests/hub.py: selection, an interrupted sweep resumed,
torn lines, the plot, cache deletion, and a task metric through lm-eval. Real downloads over loopback HTTP."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hub import commit_for
from olmo2kit.errors import Olmo2KitError
from olmo2kit.evals.perplexity import perplexity
from olmo2kit.evals.sweep import Sweep, curve_series, plot_results, read_results, results_store
from olmo2kit.evals.tasks import evaluate_tasks
from olmo2kit.model.loading import load

SWEEP = "org/sweep"
# Branch -> seed of the tiny checkpoint it serves: four checkpoints, two stages, and main.
BRANCHES = {
    "stage1-step1000-tokens3B": 1,
    "stage1-step2000-tokens5B": 2,
    "stage1-step3000-tokens7B": 3,
    "stage2-ingredient1-step1000-tokens3B": 4,
    "main": 4,
}
ORDER = list(BRANCHES)[:4]  # the checkpoints, in training order
TASKS = Path(__file__).with_name("lm_eval_tasks")
TEXT = "Language modeling is the task of predicting the next word in a sequence of text. " * 3


@pytest.fixture(scope="module")
def checkpoints(hub_server, tmp_path_factory) -> dict[int, Path]:
    """org/sweep on the loopback Hub; returns the local copy of each seed's checkpoint."""
    from olmo2kit.model.tiny import build_tiny

    root = tmp_path_factory.mktemp("sweep-checkpoints")
    built = {seed: build_tiny(root / f"seed{seed}", seed=seed) for seed in sorted(set(BRANCHES.values()))}
    hub_server.add_repo(SWEEP, {name: built[seed] for name, seed in BRANCHES.items()})
    return built


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "data.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def local_perplexity(checkpoints, revision: str) -> float:
    model, tokenizer = load(str(checkpoints[BRANCHES[revision]]), dtype="fp32", device="cpu")
    return perplexity(model, tokenizer, TEXT).perplexity


def cached_commits(repo_id: str) -> set[str]:
    from huggingface_hub import constants, scan_cache_dir

    return {r.commit_hash for repo in scan_cache_dir(constants.HF_HUB_CACHE).repos if repo.repo_id == repo_id
            for r in repo.revisions}


def test_interrupted_sweep_resumes_with_one_line_per_revision(checkpoints, hub, hub_env, cli, data, tmp_path):
    out, png = tmp_path / "results.jsonl", tmp_path / "curve.png"
    sweep = Sweep(SWEEP, data=data, out=out, plot=png, dtype="fp32", device="cpu")
    assert [r.name for r in sweep.todo] == ORDER  # main is no checkpoint
    run = sweep.run()
    first = [next(run), next(run)]
    run.close()  # interrupted between revisions
    assert [s.index for s in first] == [1, 2] and {s.total for s in first} == {4}
    assert [row["revision"] for row in read_results(out)] == ORDER[:2]
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    # ... and a third line cut short by a kill mid-write.
    with open(out, "ab") as f:
        f.write(b'{"revision": "stage1-step3000-tokens7B", "val')
    assert [row["revision"] for row in read_results(out)] == ORDER[:2]

    hub.reset()
    code, stdout, stderr = cli("sweep", "--model", SWEEP, "--data", str(data), "--out", str(out), "--plot", str(png),
                               "--delete-after", "--device", "cpu", "--dtype", "fp32")
    assert code == 0, stderr
    assert f"{SWEEP}: 4 revisions, 2 already in {out}, 2 to measure" in stderr
    progress = [line for line in stderr.splitlines() if "ETA" in line]
    shown = [re.match(r"\[[=> ]+\] (\d/2) .* ETA (\d:\d\d:\d\d)  (\S+): perplexity ", line) for line in progress]
    assert [(m[1], m[3]) for m in shown] == [("1/2", ORDER[2]), ("2/2", ORDER[3])], progress
    assert shown[-1][2] == "0:00:00"
    # Each freed its own weights; the config and tokenizer files it shares with cached revisions stay.
    weights = (checkpoints[1] / "model.safetensors").stat().st_size
    assert all(f", freed {weights / 1e6:.2f} MB)" in line for line in progress), progress

    lines = out.read_bytes().split(b"\n")
    assert lines[-1] == b""  # the torn piece is gone, every line is whole
    rows = [json.loads(line) for line in lines[:-1]]
    assert [row["revision"] for row in rows] == ORDER
    for row in rows:
        assert row["value"] == pytest.approx(local_perplexity(checkpoints, row["revision"]), rel=1e-6)
        assert row["details"]["perplexity"] == row["value"] and row["metric"] == "perplexity"
        assert row["commit"] == commit_for(SWEEP, row["revision"])
        assert "name" not in row and row["step"] == int(row["revision"].split("step")[1].split("-")[0])
        assert row["setup"] == rows[0]["setup"]
    assert [row["train_tokens_b"] for row in rows] == [3, 5, 7, 10]  # stage 2 counts on from stage 1's 7B
    # The resumed run downloaded only the revisions it measured, and freed them afterwards.
    for name in ORDER[:2]:
        assert hub.count(f"/{SWEEP}/resolve/{commit_for(SWEEP, name)}/") == 0
    assert hub.count("/lfs/") == 2
    assert cached_commits(SWEEP) == {commit_for(SWEEP, name) for name in ORDER[:2]}

    table = stdout.splitlines()
    assert table[0].split() == ["revision", "tokens", "perplexity"]
    assert [line.split()[:2] for line in table[1:]] == [[r["revision"], f"{r['train_tokens_b']}B"] for r in rows]

    import matplotlib.image

    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert matplotlib.image.imread(png).shape[2] == 4
    assert not list(tmp_path.glob(".*.tmp"))

    # A third run finds nothing to do and leaves the file as it was.
    before = out.read_bytes()
    code, stdout, stderr = cli("sweep", "--model", SWEEP, "--data", str(data), "--out", str(out), "--device", "cpu",
                               "--dtype", "fp32")
    assert code == 0 and "4 already in" in stderr and out.read_bytes() == before


def test_task_metric_through_lm_eval(checkpoints, hub, hub_env, data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "mc.jsonl"
    picked = [ORDER[3], ORDER[0]]
    sweep = Sweep(SWEEP, "olmo2kit_tiny_mc:acc_norm", revisions=picked, include_path=TASKS, limit=6, out=out,
                  device="cpu")
    steps = list(sweep.run())
    assert [s.row["revision"] for s in steps] == [ORDER[0], ORDER[3]]  # training order, whatever the order given
    for step in steps:
        model, tokenizer = load(str(checkpoints[BRANCHES[step.row["revision"]]]), dtype="fp32", device="cpu")
        scores = evaluate_tasks(model, tokenizer, "olmo2kit_tiny_mc", include_path=TASKS, limit=6)
        assert step.row["value"] == next(s.value for s in scores if s.metric == "acc_norm")
        assert {s["metric"] for s in step.row["details"]["scores"]} == {"acc", "acc_norm"}
    assert read_results(out) == [s.row for s in steps]


def test_selection(checkpoints, hub, hub_env, data, tmp_path):
    def names(**kwargs) -> list[str]:
        return [r.name for r in Sweep(SWEEP, data=data, out=tmp_path / "r.jsonl", **kwargs).revisions]

    assert names(every=2) == [ORDER[0], ORDER[2]]
    assert names(stage=1, every=2) == [ORDER[0], ORDER[2]]
    assert names(stage=2) == [ORDER[3]]
    assert names(revisions=["main", ORDER[1]]) == [ORDER[1], "main"]
    assert hub.count("/lfs/") == 0  # choosing loads nothing


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(revisions=["stage1-step2100-tokens5B"]), "did you mean stage1-step2000-tokens5B\\?"),
        (dict(revisions=[ORDER[0]], every=2), "give --revisions, or --stage and --every, not both"),
        (dict(every=0), "--every must be 1 or more"),
        (dict(stage=3), "no stage 3"),
        (dict(model="org/repo", stage=2), "org/repo has no stage-2 checkpoint branches"),
        (dict(model="org/sweep@main"), "a sweep runs over the checkpoint branches of a Hub repo"),
        (dict(data=None), "--metric perplexity needs --data FILE"),
        (dict(metric="perplexity:bpb"), "perplexity has no sub-metric"),
        (dict(limit=5), "--limit, --num-fewshot and --include-path apply to lm-eval tasks"),
        (dict(stride=0), "--stride must be 1 or more"),
        (dict(metric="olmo2kit_tiny_mc", include_path=TASKS), "--data is for --metric perplexity"),
        (dict(metric="olmo2kit_tiny_mc", include_path=TASKS, data=None, max_length=8), "apply to --metric perplexity"),
    ],
)
def test_bad_options_fail_before_any_download(checkpoints, hub, hub_env, data, tmp_path, kwargs, message):
    kwargs = {"model": SWEEP, "data": data, **kwargs}
    with pytest.raises(Olmo2KitError, match=message):
        Sweep(kwargs.pop("model"), out=tmp_path / "r.jsonl", **kwargs)
    assert hub.count("/lfs/") == 0 and hub.count("/org/") == 0


def test_unwritable_out_or_plot_fails_before_any_download(checkpoints, hub, hub_env, data, tmp_path, cli):
    code, _, err = cli("sweep", "--model", SWEEP, "--data", str(data), "--out", str(tmp_path))
    assert code == 2 and err == f"error: --out {tmp_path} is a directory: give a file name\n"
    code, _, err = cli("sweep", "--model", SWEEP, "--data", str(data), "--out", str(tmp_path / "r.jsonl"),
                       "--plot", str(data / "p.png"))
    assert code == 2 and err == f"error: {data} is a file, not a directory: give a directory to write to\n"
    assert hub.count("/lfs/") == 0


def test_resuming_with_another_setup_is_refused(checkpoints, hub, hub_env, data, tmp_path, cli):
    out = tmp_path / "r.jsonl"
    setup = Sweep(SWEEP, data=data, out=out, device="cpu").setup
    results_store(out).append([{"revision": ORDER[0], "setup": {**setup, "data_sha256": "0" * 64}}])
    code, stdout, stderr = cli("sweep", "--model", SWEEP, "--data", str(data), "--out", str(out), "--device", "cpu")
    assert code == 2 and stdout == ""
    assert stderr.startswith(f"error: {out} holds results of another setup (data_sha256 '000") and "--out" in stderr
    assert len(stderr.splitlines()) == 1


def test_cli_sweep_of_a_local_directory_is_one_line(cli, tiny_path, data, tmp_path):
    code, out, err = cli("sweep", "--model", str(tiny_path), "--data", str(data), "--out", str(tmp_path / "r.jsonl"))
    assert code == 2 and out == ""
    assert err.startswith("error: a sweep runs over the checkpoint branches of a Hub repo") and err.count("\n") == 1


# The results file


def row(name: str, value: float = 1.0) -> dict:
    return {"revision": name, "value": value}


def test_a_bad_line_before_the_last_is_an_error(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_bytes(b'{"revision": "a"}\nnot json\n{"revision": "b"}\n')
    with pytest.raises(Olmo2KitError, match="line 2 is not a sweep results line"):
        read_results(out)
    out.write_bytes(b'{"revision": "a"}\n["a list"]\n{"revision": "b"}\n')
    with pytest.raises(Olmo2KitError, match="line 2"):
        read_results(out)


def test_plot_marks_stage_two_and_separates_ingredients(tmp_path):
    import matplotlib.image

    def result(name, stage, ingredient, tokens_b, train_tokens_b, value):
        return {"revision": name, "stage": stage, "ingredient": ingredient, "tokens_b": tokens_b,
                "train_tokens_b": train_tokens_b, "value": value, "metric": "perplexity", "setup": {"model": "org/x"}}

    rows = [
        result("s2-2", 2, 2, 5, 35, 22.0),
        result("s1-30", 1, None, 30, 30, 30.0),
        result("s1-10", 1, None, 10, 10, 90.0),
        result("s2-1", 2, 1, 5, 35, 21.0),
        result("s2-1b", 2, 1, 10, 40, 19.0),
        result("main", None, None, None, None, 1.0),
    ]
    series, stage2_starts = curve_series(rows)
    assert series == {
        "stage 1": [(10, 90.0), (30, 30.0)],
        "stage 2, ingredient 1": [(35, 21.0), (40, 19.0)],
        "stage 2, ingredient 2": [(35, 22.0)],
    }
    assert stage2_starts == [30]
    path = plot_results(rows, tmp_path / "sub" / "p.png")
    image = matplotlib.image.imread(path)
    assert image.shape == (540, 960, 4)
    assert image[..., :3].min() < 0.5 < image[..., :3].max()  # something drawn on the white
