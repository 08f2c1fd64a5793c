"""Batch jobs with --ray: each shard of the lines a task on the one local Ray of the run (conftest.local_ray, 2
CPUs), the results appended by the driver alone; a driver killed halfway, a shard that fails for good."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import OLMO2KIT, one_line_error
from olmo2kit.errors import Olmo2KitError
from olmo2kit.inference.jobs import GenerateShard, JobItem, JobModel, run_job, run_job_on_ray

pytest.importorskip("ray")

LINES = 32
# Greedy, fp32 on the CPU, the same batches of two with and without Ray (shards of an even number of lines): the
# same text, token for token.
JOB = ("-n", "12", "--greedy", "--dtype", "fp32", "--device", "cpu", "--batch-size", "2")
OPTIONS = {"max_new_tokens": 12, "do_sample": False, "batch_size": 2}  # JOB, to the library


def write_job(path: Path) -> Path:
    """Prompts, and every fourth line a chat with its own max_new_tokens and metadata (the tiny model has no chat
    template: its workers warn of it)."""
    def line(i: int) -> dict:
        if i % 4 == 3:
            return {"id": f"p{i:02d}", "messages": [{"role": "user", "content": f"Question {i}?"}],
                    "max_new_tokens": 5, "metadata": {"n": i}}
        return {"id": f"p{i:02d}", "prompt": f"Prompt {i}: the"}

    path.write_text("".join(json.dumps(line(i)) + "\n" for i in range(LINES)))
    return path


def read_rows(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def by_id(rows: list[dict]) -> dict:
    """The rows by id, each id once; what makes the text (request, options, tokens), not the timings."""
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)), sorted(ids)
    return {row["id"]: (row["request_sha256"], row["text"], row["token_ids"], row["engine"]) for row in rows}


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    return write_job(tmp_path_factory.mktemp("ray-job") / "in.jsonl")


@pytest.fixture(scope="module")
def local_rows(job, tiny) -> dict:
    """The job's rows without Ray, by id."""
    out = job.with_name("local.jsonl")
    run_job(*tiny, job, out, **OPTIONS)
    return by_id(read_rows(out))


def test_a_ray_job_gives_the_text_of_a_local_job_each_id_once(local_ray, local_rows, job, tiny_path, cli,
                                                              tmp_path):
    out = tmp_path / "out.jsonl"
    code, stdout, err = cli("generate", "--input", str(job), "--output", str(out), "--model", str(tiny_path), *JOB,
                            "--ray", local_ray, "--ray-shard-lines", "4")
    assert code == 0, err
    assert stdout == "" and "; a task for each 4 lines" in err
    assert f"] {LINES}/{LINES}" in err and f"{LINES} result(s) appended" in err
    # What a worker warns of reaches the user, once, as a job without Ray says it.
    assert err.count("warning: ") == 1 and "has no chat template, so the official OLMo 2 one is used" in err, err
    assert by_id(read_rows(out)) == local_rows


def test_the_driver_killed_halfway_and_rerun_finishes_each_id_once(local_ray, local_rows, job, tiny_path, cli,
                                                                   tmp_path):
    out = tmp_path / "out.jsonl"
    args = ["generate", "--input", str(job), "--output", str(out), "--model", str(tiny_path), *JOB,
            "--ray", local_ray, "--ray-shard-lines", "2"]
    driver = subprocess.Popen([str(OLMO2KIT), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and driver.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 4:
                break
            time.sleep(0.01)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        err = driver.stderr.read().decode()
    finally:
        driver.kill()
    assert driver.returncode == -signal.SIGKILL, err
    before = [row["id"] for row in read_rows(out)]
    assert 4 <= len(before) < LINES, err
    code, _, err = cli(*args)
    assert code == 0, err
    assert f"{LINES - len(before)} result(s) appended to {out}, {len(before)} already there" in err
    rows = read_rows(out)
    assert [row["id"] for row in rows[:len(before)]] == before
    assert by_id(rows) == local_rows


def loads_of_this_process(spec: JobModel) -> tuple[int, int]:
    """(this worker's pid, how many times it was handed `spec`'s model): a mark on the model object counts them."""
    from olmo2kit.inference.jobs import loaded_model

    model, _ = loaded_model(spec)
    model.times_handed = getattr(model, "times_handed", 0) + 1
    return os.getpid(), model.times_handed


def test_a_worker_keeps_its_model_for_the_next_shard(local_ray, tiny_path):
    from olmo2kit.inference.ray_pool import RayOptions, RayPool

    spec = JobModel(str(Path(tiny_path).resolve()), dtype="fp32", device="cpu")
    pool = RayPool(RayOptions(address=local_ray))
    handed: dict[int, list[int]] = {}
    for unit in pool.map(loads_of_this_process, {n: (spec,) for n in range(8)}):
        assert unit.error is None, unit.error
        pid, times = unit.value
        handed.setdefault(pid, []).append(times)
    # Ray runs the tasks in a few worker processes, each handing out the one model it loaded, again and again.
    assert len(handed) < 8 and all(sorted(times)[-1] > 1 for times in handed.values() if len(times) > 1), handed


def test_a_worker_loads_again_for_other_settings(tiny_path):
    from olmo2kit.inference.jobs import loaded_model

    name = str(Path(tiny_path).resolve())
    fp32, _ = loaded_model(JobModel(name, dtype="fp32", device="cpu"))
    assert loaded_model(JobModel(name, dtype="fp32", device="cpu"))[0] is fp32
    bf16, _ = loaded_model(JobModel(name, dtype="bf16", device="cpu"))
    assert bf16 is not fp32 and str(bf16.dtype) == "torch.bfloat16"
    assert loaded_model(JobModel(name, dtype="fp32", device="cpu"))[0] is not fp32  # one model kept at a time


class FailingShard(GenerateShard):
    """The real shard, but one that holds id "p03" fails every try (a RuntimeError: retried by the pool)."""

    def __call__(self, items: list[JobItem]):
        if any(item.id == "p03" for item in items):
            raise RuntimeError("this shard fails every time")
        return super().__call__(items)


def test_a_shard_that_always_fails_is_reported_and_the_others_finish(local_ray, local_rows, job, tiny_path,
                                                                     tmp_path, capsys):
    from olmo2kit.cli.generate import say_job_done
    from olmo2kit.inference.ray_pool import RayOptions, RayPool

    out = tmp_path / "out.jsonl"
    name = str(Path(tiny_path).resolve())
    spec = JobModel(name, dtype="fp32", device="cpu")
    options = {key: value for key, value in OPTIONS.items() if key != "batch_size"}
    pool = RayPool(RayOptions(address=local_ray, retries=1))
    summary = run_job_on_ray(FailingShard(spec, name, None, batch_size=2), job, out, pool, shard_lines=4, **options)
    assert summary.failed == [("lines 1-4", "RuntimeError: this shard fails every time")]
    assert (summary.written, summary.already_done) == (LINES - 4, 0)
    rows = read_rows(out)
    assert {row["id"] for row in rows} == {f"p{i:02d}" for i in range(4, LINES)}
    with pytest.raises(Olmo2KitError, match=rf"^1 shard\(s\) failed \(above\) and their lines are not in {out}: "
                                            "run the same command again to retry them$"):
        say_job_done(summary, str(out))  # as the CLI says it: the shard, then the one-line error
    assert "lines 1-4 failed: RuntimeError: this shard fails every time" in capsys.readouterr().err
    # The rerun, the cause gone, generates the failed shard's lines and nothing else.
    summary = run_job_on_ray(GenerateShard(spec, name, None, batch_size=2), job, out, pool, shard_lines=4,
                             **options)
    assert (summary.written, summary.already_done, summary.failed) == (4, LINES - 4, [])
    assert by_id(read_rows(out)) == local_rows


def test_a_checkpoint_the_workers_cannot_load_stops_the_job_once_in_one_line(local_ray, job, tiny_path, cli,
                                                                            tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_path, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors" * 100)
    out = tmp_path / "out.jsonl"
    code, _, err = cli("generate", "--input", str(job), "--output", str(out), "--model", str(broken), *JOB,
                       "--ray", local_ray, "--ray-shard-lines", "16")
    one_line_error(code, err, f"{broken}/model.safetensors is truncated or not safetensors")
    assert "shard" not in err and not out.exists()


@pytest.mark.parametrize(("options", "needle"), [
    (["--ray", "local", "--ray-shard-lines", "0"], "--ray-shard-lines must be at least 1, got 0"),
    (["--ray-shard-lines", "4"], "--ray-shard-lines sizes each Ray task of a batch job: give it with --ray"),
    (["--ray-gpus", "1"], "give them with --ray"),
    (["--ray", "nowhere"], "give local, auto, HOST:PORT or ray://HOST:PORT"),
])
def test_bad_ray_values_are_one_line_errors(job, tiny_path, cli, tmp_path, options, needle):
    out = tmp_path / "out.jsonl"
    code, _, err = cli("generate", "--input", str(job), "--output", str(out), "--model", str(tiny_path), *options)
    one_line_error(code, err, needle)
    assert not out.exists()


def test_ray_for_prompts_on_the_command_line_is_a_one_line_error(tiny_path, cli):
    code, _, err = cli("generate", "Hello", "--model", str(tiny_path), "--ray")
    one_line_error(code, err, "--ray runs a batch job (--input FILE --output FILE)")


def test_gpus_the_cluster_lacks_and_ray_missing_are_one_line_errors(local_ray, job, tiny_path, cli, tmp_path,
                                                                    monkeypatch):
    out = tmp_path / "out.jsonl"
    given = ("generate", "--input", str(job), "--output", str(out), "--model", str(tiny_path))
    code, _, err = cli(*given, "--ray", local_ray, "--ray-gpus", "1")
    one_line_error(code, err, "--ray-gpus 1: the Ray cluster has 0 GPUs")
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    code, _, err = cli(*given, "--ray", local_ray)
    one_line_error(code, err, "pip install 'olmo2kit[ray]'")
    assert not out.exists()
