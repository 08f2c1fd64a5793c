"""vLLM through the CLI, each command in a process of its own (vLLM in that process, olmo2kit's CPU default):
the same text as transformers from generate, a batch job killed and resumed, and chat; the engine choice; and
the option combinations refused as one-line errors."""

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from conftest import OLMO2KIT, one_line_error, run_olmo2kit
from olmo2kit.inference.generation import generate
from olmo2kit.inference.jobs import run_job
from olmo2kit.model.vllm import vllm_version

from .conftest import VLLM_ENV, stop_inside

ON_VLLM = ("--engine", "vllm", "--dtype", "fp32", "--enforce-eager")
ON_TRANSFORMERS = ("--engine", "transformers", "--dtype", "fp32")  # --enforce-eager is a vLLM option: refused here


def olmo2kit(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_olmo2kit(*args, env={**VLLM_ENV, **(env or {})}, stdin=stdin)


def json_rows(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def test_generate_json_matches_transformers(tiny64, tiny64_path):
    import transformers

    prompts = ["Language modeling is ", "The quick brown fox"]
    full = generate(*tiny64, prompts, do_sample=False, max_new_tokens=12)
    stop = stop_inside(full[0].text)
    args = ("generate", *prompts, "--model", str(tiny64_path), "--greedy", "--json", "-n", "12", "--stop", stop)
    on_vllm, on_transformers = olmo2kit(*args, *ON_VLLM), olmo2kit(*args, *ON_TRANSFORMERS)
    assert on_vllm.returncode == 0 == on_transformers.returncode, on_vllm.stderr + on_transformers.stderr
    rows_vllm, rows_transformers = json_rows(on_vllm.stdout), json_rows(on_transformers.stdout)  # stdout: JSON only
    assert [r["text"] for r in rows_vllm] == [r["text"] for r in rows_transformers]
    assert [r["finish_reason"] for r in rows_vllm] == [r["finish_reason"] for r in rows_transformers]
    assert rows_vllm[0]["text"] == full[0].text[: full[0].text.find(stop)] and rows_vllm[0]["finish_reason"] == "stop"
    assert {(r["engine"], r["engine_version"]) for r in rows_vllm} == {("vllm", vllm_version())}
    assert {(r["engine"], r["engine_version"]) for r in rows_transformers} == {
        ("transformers", transformers.__version__)}
    assert "float32, cpu, vllm)" in on_vllm.stderr


def test_job_killed_then_resumed_on_vllm(tiny64_path, tiny64, tmp_path):
    ids = [f"p{i:02d}" for i in range(24)]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "prompt": f"Prompt {i}: the"}) + "\n" for i in ids))
    out = tmp_path / "out.jsonl"
    args = ["generate", "--input", str(source), "--output", str(out), "--model", str(tiny64_path), "--batch-size",
            "1", "-n", "16", "--greedy", *ON_VLLM]
    # a session of its own, so that the kill takes vLLM's worker process with it (else it outlives the test)
    job = subprocess.Popen([str(OLMO2KIT), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           env={**os.environ, **VLLM_ENV}, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and job.poll() is None:
            if out.exists() and b"\n" in out.read_bytes():  # the first result line is whole
                break
            time.sleep(0.01)
        os.killpg(job.pid, signal.SIGKILL)
        _, err = job.communicate(timeout=30)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == -signal.SIGKILL, err.decode()
    before = [json.loads(line)["id"] for line in out.read_text().splitlines(keepends=True) if line.endswith("\n")]
    assert 1 <= len(before) < len(ids)
    with out.open("a") as f:  # and, as a kill during a write would leave, a torn last line
        f.write('{"id": "p23", "model": "')
    resumed = olmo2kit(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert "incomplete last line" in resumed.stderr and f"{len(before)} already there" in resumed.stderr
    rows = json_rows(out.read_text())
    assert [r["id"] for r in rows] == ids  # each id once, in input order
    assert {r["engine"] for r in rows} == {"vllm"}
    expected = tmp_path / "transformers.jsonl"
    run_job(*tiny64, source, expected, batch_size=8, do_sample=False, max_new_tokens=16)
    assert [(r["text"], r["token_ids"]) for r in rows] == [(r["text"], r["token_ids"]) for r in json_rows(
        expected.read_text())]


def test_piped_chat_matches_transformers(tiny64_instruct_path):
    args = ("chat", "--model", str(tiny64_instruct_path), "--greedy", "-n", "12")
    on_vllm = olmo2kit(*args, *ON_VLLM, stdin="Hi\nWhat is OLMo?\n")
    on_transformers = olmo2kit(*args, *ON_TRANSFORMERS, stdin="Hi\nWhat is OLMo?\n")
    assert on_vllm.returncode == 0 == on_transformers.returncode, on_vllm.stderr + on_transformers.stderr
    assert on_vllm.stdout == on_transformers.stdout
    assert on_vllm.stdout.count("\n") >= 2 and on_vllm.stdout.strip()  # two replies, each on its own line


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto takes vLLM where a CUDA GPU is visible")
def test_auto_takes_transformers_without_a_gpu(tiny64, tiny64_path):
    result = olmo2kit("generate", "Hello", "--model", str(tiny64_path), "--engine", "auto", "--greedy", "--json",
                      "-n", "6")
    assert result.returncode == 0, result.stderr
    # the tiny checkpoint is too small for auto's llama.cpp on a CPU, which is the reason given
    assert any(line.startswith(f"engine: transformers ({tiny64_path} has ") for line in result.stderr.splitlines())
    row = json.loads(result.stdout)
    assert row["engine"] == "transformers"
    assert row["text"] == generate(*tiny64, "Hello", do_sample=False, max_new_tokens=6).text


@pytest.mark.parametrize(("args", "needle"), [
    (("generate", "Hi", "--engine", "vllm", "--quantize", "nf4"), "nf4"),
    (("generate", "Hi", "--engine", "vllm", "--tensor-parallel-size", "2"), "2 GPUs"),
    (("generate", "Hi", "--engine", "transformers", "--tensor-parallel-size", "2"), "--engine vllm"),
    (("generate", "Hi", "--engine", "vllm", "--compile"), "--compile"),
    (("generate", "Hi", "--engine", "bogus"), "unknown engine 'bogus'"),
    (("chat", "--engine", "vllm", "--quantize", "nf4"), "nf4"),
])
def test_bad_combinations_are_one_line_errors(tiny64_path, args, needle):
    result = olmo2kit(*args, "--model", str(tiny64_path))
    one_line_error(result.returncode, result.stderr, needle, alone=True)
    assert result.stdout == ""


def test_lora_adapter_on_vllm_is_a_one_line_error(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    result = olmo2kit("generate", "Hi", "--model", str(adapter), "--engine", "vllm")
    one_line_error(result.returncode, result.stderr, "LoRA adapter", alone=True)


def test_tiny_head_dim_must_be_even(tmp_path):
    result = olmo2kit("tiny", str(tmp_path / "odd"), "--head-dim", "7")
    one_line_error(result.returncode, result.stderr, "--head-dim", alone=True)
    assert not (tmp_path / "odd").exists()
