"""Batch jobs under bad input and faults (issue #12): outputs that are devices or endless, huge lines, bad values
on one line, changed requests, unknown keys, a second job on one output, a full disk."""

import errno
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import OLMO2KIT
from olmo2kit.errors import Olmo2KitError
from olmo2kit.inference.jobs import MAX_LINE_BYTES, run_job


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def read_results(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def last_error(code, err):
    """The one error line of a run that failed as a user error should."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err and lines[-1].startswith("error: "), err
    return lines[-1]


def job(tiny_path, source, out, *more):
    return ("generate", "--input", str(source), "--output", str(out), "--model", str(tiny_path), "-n", "3",
            "--greedy", *more)


def test_an_output_that_is_a_device_is_refused_at_once(cli, tiny_path, tmp_path):
    # As root, /dev/zero's own node made in tmp_path, so that a job that failed to refuse it would leave no lock
    # file in the machine's /dev; /dev/zero itself otherwise.
    if os.geteuid() == 0:
        zero = tmp_path / "zero"
        os.mknod(zero, 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    elif Path("/dev/zero").exists():
        zero = Path("/dev/zero")
    else:
        pytest.skip("no /dev/zero here")
    source = write_lines(tmp_path / "in.jsonl", [{"id": 1, "prompt": "Hello"}])
    before = set(os.listdir(zero.parent))
    started = time.monotonic()
    code, _, err = cli(*job(tiny_path, source, zero))
    assert last_error(code, err) == f"error: {zero} is a character device, not a regular file: give another --output"
    assert time.monotonic() - started < 10 and "loaded" not in err  # before the model loads
    assert set(os.listdir(zero.parent)) == before  # no lock file beside the device


def test_an_output_of_one_endless_line_is_refused_in_bounded_memory(tiny, tmp_path):
    source = write_lines(tmp_path / "in.jsonl", [{"id": 1, "prompt": "Hello"}])
    out = tmp_path / "out.jsonl"
    with out.open("wb") as f:
        f.truncate(65 << 20)  # zeros without a newline, one byte more than a line may hold
    with pytest.raises(Olmo2KitError, match=r"out.jsonl line 1 is longer than 64 MiB, so it is not a result line"):
        run_job(*tiny, source, out, max_new_tokens=2)
    assert out.stat().st_size == 65 << 20


@pytest.mark.parametrize("line", ['{"id": "a", "text": "mine"}', '{"note": "mine"}', "my notes"])
@pytest.mark.parametrize("newline", ["\n", ""])
def test_an_output_whose_only_line_is_no_result_is_refused_not_cut(cli, tiny_path, tmp_path, line, newline):
    source = write_lines(tmp_path / "in.jsonl", [{"id": "a", "prompt": "Hello"}])
    out = tmp_path / "out.jsonl"
    out.write_text(line + newline)
    code, _, err = cli(*job(tiny_path, source, out))
    assert last_error(code, err) == (f"error: {out} line 1 is not a result line, so the job cannot resume into it: "
                                     "fix or remove it, or give another --output")
    assert out.read_text() == line + newline


def test_an_input_line_over_the_cap_is_reported_and_skipped(cli, tiny_path, tmp_path):
    source = write_lines(tmp_path / "in.jsonl", [
        {"id": "a", "prompt": "Hello"},
        {"id": "big", "prompt": "word " * (MAX_LINE_BYTES // 5 + 10)},
        {"id": "c", "prompt": "The sea"},
    ])
    out = tmp_path / "out.jsonl"
    code, _, err = cli(*job(tiny_path, source, out))
    assert code == 0, err
    assert f"warning: line 2 of {source}: longer than 1 MiB, the cap on a line: shorten it; skipped" in err
    assert [r["id"] for r in read_results(out)] == ["a", "c"]
    code, _, err = cli(*job(tiny_path, source, tmp_path / "strict.jsonl", "--strict"))
    assert last_error(code, err) == f"error: line 2 of {source}: longer than 1 MiB, the cap on a line: shorten it"


def test_an_input_line_of_a_gigabyte_is_read_past_in_bounded_memory(tmp_path):
    """1 GiB of zeros on line 2 (sparse: no disk used) between two good lines, read in a fresh process whose peak
    memory is its own (VmHWM: ru_maxrss would carry the pytest process's peak over through fork and exec): the line
    is never held whole."""
    source = tmp_path / "in.jsonl"
    with source.open("wb") as f:
        f.write(b'{"id": 1, "prompt": "a"}\n')
        f.seek(1 << 30)
        f.write(b'\n{"id": 3, "prompt": "c"}\n')
    script = (
        "from olmo2kit.inference.jobs import read_job\n"
        f"items = read_job({str(source)!r}, on_warning=print)\n"
        "print([item.id for item in items])\n"
        "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) // 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    warning, ids, peak_mib = done.stdout.splitlines()
    assert warning == f"line 2 of {source}: longer than 1 MiB, the cap on a line: shorten it; skipped"
    assert ids == "[1, 3]"
    assert int(peak_mib) < 1024, f"peak {peak_mib} MiB"


@pytest.mark.parametrize("bad", [{"seed": 2**32}, {"seed": 2**64}, {"top_p": 5}], ids=["seed-2^32", "seed-2^64",
                                                                                          "top_p-5"])
def test_a_bad_option_on_one_line_is_reported_and_the_job_goes_on(cli, tiny_path, tmp_path, bad):
    source = write_lines(tmp_path / "in.jsonl", [
        {"id": "a", "prompt": "Hello"},
        {"id": "bad", "prompt": "Hello", "do_sample": True, **bad},
        {"id": "c", "prompt": "The sea"},
    ])
    out = tmp_path / "out.jsonl"
    code, _, err = cli(*job(tiny_path, source, out))
    assert code == 0 and "Traceback" not in err, err
    key = next(iter(bad))
    assert f"warning: line 2 of {source}: {key}" in err and "1 line(s) skipped" in err
    assert [r["id"] for r in read_results(out)] == ["a", "c"]
    code, _, err = cli(*job(tiny_path, source, out))  # a rerun does the same, and finds the rest done
    assert code == 0 and "2 already there" in err and "1 line(s) skipped" in err


def test_a_changed_request_is_an_error_not_an_old_result(cli, tiny_path, tmp_path):
    lines = [{"id": "a", "prompt": "Hello"}, {"id": "b", "prompt": "The sea"}, {"id": "c", "prompt": "Once"}]
    source = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    assert cli(*job(tiny_path, source, out))[0] == 0
    results = out.read_bytes()
    assert all(len(r["request_sha256"]) == 64 for r in read_results(out))

    write_lines(source, [lines[0], {"id": "b", "prompt": "The sky"}, lines[2]])
    code, _, err = cli(*job(tiny_path, source, out))
    assert last_error(code, err) == (
        f'error: 1 id(s) changed their request (prompt, messages or options) since {out} was written ("b"): '
        "give another --output, or remove those lines from it")
    code, _, err = cli(*job(tiny_path, write_lines(source, lines), out, "-n", "4"))  # the options make it too
    assert '3 id(s) changed their request' in last_error(code, err)
    code, _, err = cli(*job(tiny_path, write_lines(source, lines), out, "--system", "Be brief."))  # as sent
    assert '3 id(s) changed their request' in last_error(code, err)
    assert out.read_bytes() == results

    write_lines(source, [*lines, {"id": "d", "prompt": "New"}])
    code, _, err = cli(*job(tiny_path, source, out))
    assert code == 0 and "1 result(s) appended" in err and "3 already there" in err
    assert [r["id"] for r in read_results(out)] == ["a", "b", "c", "d"]


def test_results_without_a_request_hash_resume_by_id(cli, tiny_path, tmp_path):
    """Lines that an olmo2kit without request hashes wrote match their id, as they did then."""
    source = write_lines(tmp_path / "in.jsonl", [{"id": "a", "prompt": "Hello"}, {"id": "b", "prompt": "Sea"}])
    out = tmp_path / "out.jsonl"
    assert cli(*job(tiny_path, source, out))[0] == 0
    old = [{k: v for k, v in r.items() if k != "request_sha256"} for r in read_results(out)]
    write_lines(out, old[:1])
    write_lines(source, [{"id": "a", "prompt": "Changed"}, {"id": "b", "prompt": "Sea"}])
    code, _, err = cli(*job(tiny_path, source, out))
    assert code == 0 and "1 result(s) appended" in err and "1 already there" in err, err
    assert [r["id"] for r in read_results(out)] == ["a", "b"]


def test_unknown_keys_are_refused_and_max_tokens_is_an_alias(cli, tiny_path, tmp_path):
    source = write_lines(tmp_path / "in.jsonl", [
        {"id": "typo", "prompt": "Hello", "temprature": 0.5},
        {"id": "alias", "prompt": "Hello", "max_tokens": 2},
        {"id": "both", "prompt": "Hello", "max_tokens": 2, "max_new_tokens": 2},
        {"id": "meta", "prompt": "Hello", "metadata": {"source": "forum", "n": [1, 2]}},
        {"id": "flat", "prompt": "Hello", "metadata": "forum"},
        {"id": "two", "prompt": "Hello", "tags": [], "top-p": 0.5},
        {"id": "alias-type", "prompt": "Hello", "max_tokens": "2"},
    ])
    out = tmp_path / "out.jsonl"
    code, _, err = cli(*job(tiny_path, source, out))
    assert code == 0, err
    assert f"warning: line 1 of {source}: unknown key 'temprature': a line holds id, prompt or messages" in err
    assert f"warning: line 3 of {source}: give max_new_tokens or its alias max_tokens, not both; skipped" in err
    assert f'warning: line 5 of {source}: "metadata" must be a JSON object, got "forum"; skipped' in err
    assert f"warning: line 6 of {source}: unknown keys 'tags', 'top-p': " in err
    assert f"warning: line 7 of {source}: max_tokens has the wrong type: '2'; skipped" in err
    rows = {r["id"]: r for r in read_results(out)}
    assert list(rows) == ["alias", "meta"]
    assert rows["alias"]["options"]["max_new_tokens"] == 2 and rows["alias"]["new_tokens"] <= 2
    assert rows["meta"]["input"]["metadata"] == {"source": "forum", "n": [1, 2]}
    code, _, err = cli(*job(tiny_path, source, tmp_path / "strict.jsonl", "--strict"))
    assert last_error(code, err).startswith(f"error: line 1 of {source}: unknown key 'temprature'")


def test_output_without_input_says_it_needs_a_batch_job(cli, tiny_path, tmp_path):
    code, _, err = cli("generate", "Hi", "--output", str(tmp_path / "x"), "--model", str(tiny_path))
    assert last_error(code, err) == ("error: --output is for a batch job, which reads its prompts from --input FILE "
                                     "(JSONL); prompts given here print to stdout")
    assert not (tmp_path / "x").exists()


def test_a_second_job_on_the_same_output_stops_at_once_naming_the_first(cli, tiny_path, tmp_path):
    source = write_lines(tmp_path / "in.jsonl", [{"id": i, "prompt": f"Prompt {i}: the"} for i in range(400)])
    out = tmp_path / "out.jsonl"
    first = subprocess.Popen([str(OLMO2KIT), *job(tiny_path, source, out, "-n", "32", "--batch-size", "1")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lock = tmp_path / ".out.jsonl.lock"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None:
            if lock.exists() and lock.read_text().startswith(f"pid {first.pid} "):
                break
            time.sleep(0.05)
        started = time.monotonic()
        code, _, err = cli(*job(tiny_path, source, out))
        waited = time.monotonic() - started
        assert first.poll() is None, first.stderr.read().decode()  # the first was running all along
    finally:
        first.kill()
        first.wait()
    assert f"error: {out} is in use by another olmo2kit run (pid {first.pid} on " in last_error(code, err)
    assert "wait for it to end, or give another --output" in err
    assert waited < 10 and "loaded" not in err  # it did not load the model first
    written = out.read_text().splitlines(keepends=True) if out.exists() else []
    ids = [json.loads(line)["id"] for line in written if line.endswith("\n")]
    assert ids == list(range(len(ids)))  # only the first job wrote, if it got that far


def test_a_full_disk_stops_the_job_in_one_line_and_the_rerun_completes_it(cli, tiny_path, tmp_path, monkeypatch):
    # No small file system can be filled here, so the kernel's answer on a full disk is played by os.write for the
    # output alone: the second batch's write takes part of its bytes, and the next call gets ENOSPC.
    source = write_lines(tmp_path / "in.jsonl", [{"id": i, "prompt": f"Prompt {i}: the"} for i in range(6)])
    out = tmp_path / "out.jsonl"
    reference = tmp_path / "reference.jsonl"
    assert cli(*job(tiny_path, source, reference, "--batch-size", "2"))[0] == 0
    real_write, calls = os.write, []

    def fills_up(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}") != str(out):
            return real_write(fd, data)
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, data)
        if len(calls) == 2:
            return real_write(fd, bytes(data[: len(data) // 3]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", fills_up)
    code, _, err = cli(*job(tiny_path, source, out, "--batch-size", "2"))
    monkeypatch.undo()
    assert last_error(code, err) == (f"error: cannot write {out} (No space left on device): "
                                     "free some space, then run again")
    assert len(calls) == 3 and not out.read_bytes().endswith(b"\n")  # two results, then a torn line (bytes: the cut
    # may fall inside a UTF-8 character)
    code, _, err = cli(*job(tiny_path, source, out, "--batch-size", "2"))
    assert code == 0 and "incomplete last line" in err and "2 already there" in err, err
    assert [(r["id"], r["text"]) for r in read_results(out)] == [(r["id"], r["text"]) for r in read_results(reference)]


def test_run_job_holds_the_lock_itself(tiny, tmp_path):
    from olmo2kit.files import output_lock

    source = write_lines(tmp_path / "in.jsonl", [{"id": 1, "prompt": "Hello"}])
    out = tmp_path / "out.jsonl"
    with output_lock(out, option="--output"):
        with pytest.raises(Olmo2KitError, match=r"out.jsonl is in use by another olmo2kit run \(pid "):
            run_job(*tiny, source, out, max_new_tokens=2)
    assert not out.exists()
    assert run_job(*tiny, source, out, max_new_tokens=2).written == 1


def test_a_line_with_a_lone_surrogate_is_reported_and_skipped(tiny, tmp_path):
    """JSON can escape half a UTF-16 pair ("\\ud800"), which is no text: the tokenizer would raise a TypeError."""
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1, "prompt": "a\\ud800b"}\n{"id": 2, "prompt": "Hello", "metadata": {"k": "\\udfff"}}\n'
                      '{"id": 3, "prompt": "Hello"}\n')
    warnings = []
    summary = run_job(*tiny, source, tmp_path / "out.jsonl", max_new_tokens=2, on_warning=warnings.append)
    assert [line for line, _ in summary.skipped] == [1, 2] and summary.written == 1
    assert all("lone surrogate" in w for w in warnings)


def test_a_line_nested_past_the_stack_is_reported_and_skipped(tmp_path):
    from olmo2kit.inference.jobs import read_job

    source = tmp_path / "in.jsonl"
    source.write_bytes(b'{"id": 1, "prompt": "a"}\n' + b"[" * 100_000 + b'\n{"id": 3, "prompt": "c"}\n')
    warnings = []
    assert [item.id for item in read_job(source, on_warning=warnings.append)] == [1, 3]
    assert warnings == [f"line 2 of {source}: not JSON (nested deeper than it can be read); skipped"]


def test_result_lines_with_ids_of_another_type_are_not_results(tmp_path):
    from olmo2kit.inference.jobs import _results_store

    store = _results_store(tmp_path / "out.jsonl")
    store.path.write_text('{"id": [1], "model": "m"}\n{"id": "a", "model": "m"}\n')
    with pytest.raises(Olmo2KitError, match="line 1 is not a result line"):
        store.read()
