"""Batch generation jobs: JSONL in, JSONL out in input order, malformed lines, resuming after SIGKILL."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import OLMO2KIT
from olmo2kit.cli.output import ProgressBar
from olmo2kit.errors import Olmo2KitError
from olmo2kit.inference.generation import generate
from olmo2kit.inference.jobs import run_job

GENERATION_FIELDS = {"text", "token_ids", "prompt_tokens", "new_tokens", "finish_reason", "tokens_per_s",
                     "elapsed_s", "prompt_tps", "peak_memory_gb"}


@pytest.fixture
def chat_model(tiny_instruct):
    return tiny_instruct


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def read_results(path):
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_job_results_in_input_order(chat_model, tmp_path):
    model, tokenizer = chat_model
    conversation = [{"role": "user", "content": "What is the capital of France?"}]
    source = write_lines(tmp_path / "in.jsonl", [
        {"id": "a", "prompt": "Language modeling is "},
        {"id": 7, "messages": conversation, "max_new_tokens": 3},
        "",  # blank lines are skipped
        {"prompt": "The quick brown fox", "metadata": {"tags": ["kept"]}},  # no id: its line number
        {"id": "d", "prompt": "Hello", "stop": "zzz"},
    ])
    out = tmp_path / "out.jsonl"
    seen = []
    summary = run_job(model, tokenizer, source, out, batch_size=2, do_sample=False, max_new_tokens=6,
                      model_name="tiny-instruct", progress=lambda done, total: seen.append((done, total)))
    assert (summary.total, summary.written, summary.already_done, summary.skipped) == (4, 4, 0, [])
    assert seen == [(0, 4), (2, 4), (4, 4)]
    rows = read_results(out)
    assert [r["id"] for r in rows] == ["a", 7, 4, "d"]
    for row in rows:
        assert GENERATION_FIELDS <= set(row) and (row["model"], row["revision"]) == ("tiny-instruct", None)
    assert rows[2]["input"] == {"prompt": "The quick brown fox", "metadata": {"tags": ["kept"]}}
    assert rows[1]["input"]["messages"] == conversation
    assert [r["new_tokens"] for r in rows] == [6, 3, 6, 6] and rows[1]["options"]["max_new_tokens"] == 3
    assert rows[3]["options"]["stop"] == ["zzz"]
    # each text is what generate gives for that line alone
    assert rows[0]["text"] == generate(model, tokenizer, "Language modeling is ", do_sample=False,
                                       max_new_tokens=6).text
    assert rows[1]["text"] == generate(model, tokenizer, messages=conversation, do_sample=False,
                                       max_new_tokens=3).text


def test_chat_and_system_wrap_prompts(chat_model, tmp_path):
    model, tokenizer = chat_model
    source = write_lines(tmp_path / "in.jsonl", [
        {"id": 1, "prompt": "Hi"},
        {"id": 2, "messages": [{"role": "system", "content": "Own system."}, {"role": "user", "content": "Hi"}]},
    ])
    out = tmp_path / "out.jsonl"
    run_job(model, tokenizer, source, out, batch_size=1, chat=True, system="Be brief.", do_sample=False,
            max_new_tokens=5)
    rows = read_results(out)
    wrapped = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert rows[0]["text"] == generate(model, tokenizer, messages=wrapped, do_sample=False, max_new_tokens=5).text
    own = [{"role": "system", "content": "Own system."}, {"role": "user", "content": "Hi"}]
    assert rows[1]["text"] == generate(model, tokenizer, messages=own, do_sample=False, max_new_tokens=5).text


def test_malformed_lines_are_reported_and_skipped(chat_model, tmp_path):
    model, tokenizer = chat_model
    source = write_lines(tmp_path / "in.jsonl", [
        {"id": "ok1", "prompt": "Hello"},
        "not json",
        "[1, 2]",
        {"id": "x"},
        {"id": "y", "prompt": "a", "messages": [{"role": "user", "content": "b"}]},
        {"id": "ok1", "prompt": "again"},
        {"id": 1.5, "prompt": "a"},
        {"id": "z", "prompt": "   "},
        {"id": "t", "prompt": "a", "top_p": "high"},
        {"id": "u", "prompt": "a", "top_p": 3, "do_sample": True},
        {"id": "r", "messages": [{"role": "robot", "content": "hi"}]},
        {"id": "long", "prompt": "hello " * 1100},  # fails at generation: too long for the context
        {"id": "ok2", "prompt": "The sea"},
    ])
    warnings = []
    out = tmp_path / "out.jsonl"
    summary = run_job(model, tokenizer, source, out, batch_size=4, do_sample=False, max_new_tokens=3,
                      on_warning=warnings.append)
    assert [r["id"] for r in read_results(out)] == ["ok1", "ok2"]
    assert [line for line, _ in summary.skipped] == list(range(2, 13))
    expected = ["not JSON", "not a JSON object", 'either "prompt" or "messages"', "not both",
                "already used on line 1", "string or an integer", "some text", "wrong type", "top_p must be",
                "role 'robot'", "context"]
    assert len(warnings) == len(expected)
    for line, (warning, needle) in enumerate(zip(warnings, expected, strict=True), 2):
        assert warning.startswith(f"line {line} of {source}: ") and needle in warning and warning.endswith("skipped")
    with pytest.raises(Olmo2KitError, match="line 2 of .*not JSON"):
        run_job(model, tokenizer, source, tmp_path / "strict.jsonl", strict=True)
    assert not (tmp_path / "strict.jsonl").exists()


def test_resume_drops_a_torn_line_and_skips_done_ids(chat_model, tmp_path):
    model, tokenizer = chat_model
    source = write_lines(tmp_path / "in.jsonl", [{"id": i, "prompt": f"Number {i}"} for i in range(6)])
    out = tmp_path / "out.jsonl"
    run_job(model, tokenizer, source, out, batch_size=3, do_sample=False, max_new_tokens=2, model_name="m")
    complete = read_results(out)
    # keep the first two lines and half of the third, as a kill during a write would leave it
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + lines[1] + lines[2][:25])
    warnings = []
    summary = run_job(model, tokenizer, source, out, batch_size=3, do_sample=False, max_new_tokens=2, model_name="m",
                      on_warning=warnings.append)
    assert (summary.already_done, summary.written) == (2, 4)
    assert any("incomplete last line" in w for w in warnings)
    assert [r["id"] for r in read_results(out)] == list(range(6))
    assert [r["text"] for r in read_results(out)] == [r["text"] for r in complete]
    again = run_job(model, tokenizer, source, out, do_sample=False, max_new_tokens=2, model_name="m")
    assert (again.already_done, again.written) == (6, 0)
    with pytest.raises(Olmo2KitError, match="holds results from m, and this job runs other"):
        run_job(model, tokenizer, source, out, model_name="other")
    garbage = write_lines(tmp_path / "garbage.jsonl", ["hello"])
    with pytest.raises(Olmo2KitError, match="line 1 is not a result line"):
        run_job(model, tokenizer, source, garbage)


def test_sigkill_then_rerun_gives_each_id_once(cli, tiny_path, tmp_path):
    ids = [f"p{i:02d}" for i in range(24)]
    source = write_lines(tmp_path / "in.jsonl", [{"id": i, "prompt": f"Prompt {i}: the"} for i in ids])
    out = tmp_path / "out.jsonl"
    args = ["generate", "--input", str(source), "--output", str(out), "--model", str(tiny_path), "--batch-size", "2",
            "-n", "24", "--greedy"]
    job = subprocess.Popen([str(OLMO2KIT), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and job.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 4:
                break
            time.sleep(0.02)
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=30)
        err = job.stderr.read().decode()
    finally:
        job.kill()
    assert job.returncode == -signal.SIGKILL, err
    before = [json.loads(line)["id"] for line in out.read_text().splitlines(keepends=True) if line.endswith("\n")]
    assert 4 <= len(before) < len(ids)
    with out.open("a") as f:  # and, as a kill during a write would, a torn last line
        f.write('{"id": "p23", "model": "')
    code, stdout, err = cli(*args)
    assert code == 0, err
    assert stdout == "" and "incomplete last line" in err and f"{len(before)} already there" in err
    rows = read_results(out)
    assert [r["id"] for r in rows] == ids
    assert all(r["new_tokens"] == 24 for r in rows)


def test_cli_job_reports_progress_and_bad_lines(cli, tiny_path, tmp_path):
    source = write_lines(tmp_path / "in.jsonl", [{"id": 1, "prompt": "Hello"}, "{oops", {"id": 2, "prompt": "Sea"}])
    out = tmp_path / "out.jsonl"
    code, stdout, err = cli("generate", "--input", str(source), "--output", str(out), "--model", str(tiny_path),
                            "-n", "3", "--seed", "0")
    assert code == 0 and stdout == ""
    assert f"warning: line 2 of {source}: not JSON" in err
    assert "] 2/2" in err and "ETA 0:00:00" in err
    assert "2 result(s) appended" in err and "1 line(s) skipped" in err
    assert [r["id"] for r in read_results(out)] == [1, 2]
    code, _, err = cli("generate", "--input", str(source), "--output", str(tmp_path / "s.jsonl"), "--model",
                       str(tiny_path), "--strict")
    assert code == 2 and err.strip().splitlines()[-1].startswith(f"error: line 2 of {source}: not JSON")
    assert "loaded" not in err  # a strict job stops before the model loads


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--input", "in.jsonl"), "needs both --input FILE and --output FILE"),
        (("Hello", "--input", "in.jsonl", "--output", "o.jsonl"), "not both"),
        (("Hello", "--batch-size", "4"), "apply to a batch job"),
        (("--input", "in.jsonl", "--output", "o.jsonl", "--batch-size", "0"), "at least 1"),
        (("--input", "missing.jsonl", "--output", "o.jsonl"), "no such input file"),
        (("--input", "in.jsonl", "--output", "o.jsonl", "--json"), "--json does not apply"),
        (("--input", "in.jsonl", "--output", "."), ". is a directory, not a regular file: give another --output"),
        (("--input", "in.jsonl", "--output", "in.jsonl/o.jsonl"), "there is no directory in.jsonl"),
    ],
)
def test_cli_job_usage_errors(cli, tiny_path, tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    write_lines(tmp_path / "in.jsonl", [{"prompt": "Hello"}])
    code, _, err = cli("generate", *args, "--model", str(tiny_path))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and lines[-1].startswith("error: ") and needle in lines[-1] and "Traceback" not in err


def test_progress_bar_line():
    assert ProgressBar.render(0, 40, 0.0) == "[>                       ] 0/40  - prompts/s  ETA ?"
    assert ProgressBar.render(12, 40, 6.0) == "[=======>                ] 12/40  2.00 prompts/s  ETA 0:00:14"
    assert ProgressBar.render(40, 40, 20.0) == "[========================] 40/40  2.00 prompts/s  ETA 0:00:00"


def test_output_beside_input_is_refused(chat_model, tmp_path):
    model, tokenizer = chat_model
    source = write_lines(tmp_path / "in.jsonl", [{"prompt": "Hello"}])
    with pytest.raises(Olmo2KitError, match="the output file is the input file"):
        run_job(model, tokenizer, source, source)
    with pytest.raises(Olmo2KitError, match="no directory"):
        run_job(model, tokenizer, source, tmp_path / "nowhere" / "out.jsonl")
    if Path("/proc/self").is_dir():  # a directory where nothing can be created, even by root
        with pytest.raises(Olmo2KitError, match=r"cannot write in /proc \(No such file or directory\)"):
            run_job(model, tokenizer, source, "/proc/x")
    assert os.path.getsize(source) > 0


def test_a_job_writes_through_a_link_to_its_output(cli, tiny_path, tmp_path):
    from olmo2kit.files import output_lock

    source = write_lines(tmp_path / "in.jsonl", [{"id": 1, "prompt": "Hello"}, {"id": 2, "prompt": "Sea"}])
    (tmp_path / "kept").mkdir()
    target = tmp_path / "kept" / "results.jsonl"
    link = tmp_path / "out.jsonl"
    link.symlink_to(target)  # dangling until the job's first append creates the file
    job = ("generate", "--input", str(source), "--output", str(link), "--model", str(tiny_path), "-n", "3", "--greedy")
    code, _, err = cli(*job)
    assert code == 0 and "2 result(s) appended" in err
    assert link.is_symlink() and [r["id"] for r in read_results(target)] == [1, 2]
    with output_lock(target, option="--output"):  # a job on the file by its own name: the link's job waits for it
        code, _, err = cli(*job)
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith(f"error: {link} is in use by another olmo2kit run"), err
    assert [r["id"] for r in read_results(target)] == [1, 2]
