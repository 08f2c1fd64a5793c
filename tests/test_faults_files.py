"""Faults at the leaves (issue #12): writes onto what is not a regular file, full disks, outputs that are devices,
endless lines, and foreign lines that must never be taken for torn ones."""

import errno
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from olmo2kit.errors import Olmo2KitError
from olmo2kit.evals.sweep import results_store
from olmo2kit.files import JsonlStore, write_atomic
from olmo2kit.inference.chat import save_transcript
from olmo2kit.inference.jobs import _results_store


@pytest.fixture
def dev_full(tmp_path) -> Path:
    """A character device that refuses writes: /dev/full's own node made in tmp_path where the test may (as root),
    for there a write_atomic that failed to refuse it would replace the machine's /dev/full with a regular file;
    /dev/full itself otherwise, which a user cannot replace."""
    if os.geteuid() == 0:
        node = tmp_path / "full"
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 7))
        return node
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    return Path("/dev/full")

# The stores of the results a command resumes from, each with a record it accepts.
STORES = {
    "jobs": (_results_store, {"id": "q1", "model": "m", "text": "x"}),
    "sweep": (results_store, {"revision": "stage1-step1-tokens1B", "value": 1.0}),
}


def finishes_soon(work, seconds: float = 10.0):
    """Run `work()` on a thread and return what it returned or raised; fail if it is still running after `seconds`
    (a read that blocks on a fifo, say)."""
    outcome = {}

    def run():
        try:
            outcome["value"] = work()
        except BaseException as e:  # handed back to the test's thread
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def test_write_atomic_refuses_a_device_and_leaves_it_a_device(dev_full):
    with pytest.raises(Olmo2KitError, match=rf"^{dev_full} is a character device, not a regular file: "):
        write_atomic(dev_full, b"data")
    assert stat.S_ISCHR(dev_full.stat().st_mode)
    assert not [p for p in dev_full.parent.iterdir() if p.name.startswith(".full.")]  # no temporary file


def test_chat_save_onto_a_device_says_so_and_leaves_it(dev_full):
    """chat's /save writes through save_transcript, which writes through write_atomic."""
    with pytest.raises(Olmo2KitError, match="is a character device, not a regular file"):
        save_transcript(dev_full, "tiny", [{"role": "user", "content": "Hi"}])
    assert stat.S_ISCHR(dev_full.stat().st_mode)


def test_write_atomic_refuses_a_fifo_and_a_directory(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(Olmo2KitError, match=r"pipe is a fifo \(named pipe\), not a regular file"):
        finishes_soon(lambda: write_atomic(fifo, b"data"))
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    (tmp_path / "dir").mkdir()
    with pytest.raises(Olmo2KitError, match="dir is a directory, not a regular file"):
        write_atomic(tmp_path / "dir", b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "pipe"]  # no temporary file left


def test_write_atomic_on_a_full_disk_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    # A real full disk cannot be made here (no small file system to fill, and root ignores quotas), so the
    # one OS call that fails on one, fsync (where a delayed allocation reports ENOSPC), is made to fail.
    path = write_atomic(tmp_path / "f.json", b"old")

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(Olmo2KitError, match=rf"^cannot write {path} \(No space left on device\): free some space"):
        write_atomic(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]
    with pytest.raises(Olmo2KitError, match=r"cannot write .*missing/f.json \(No such file or directory\)"):
        write_atomic(tmp_path / "missing" / "f.json", b"x")


@pytest.mark.parametrize("store", list(STORES))
@pytest.mark.parametrize("line", [b'{"note": "mine"}\n', b'{"note": "mine"}', b"my notes\n", b'{"id": 1}\n'])
def test_an_only_line_that_is_no_record_is_refused_not_cut(tmp_path, store, line):
    """Only the start of an object cut short is torn; a whole line, or whole JSON without its newline, is foreign."""
    make, _ = STORES[store]
    results = make(tmp_path / "results.jsonl")
    results.path.write_bytes(line)
    with pytest.raises(Olmo2KitError, match=r"results.jsonl line 1 is not a .*: fix or remove it, or "):
        results.repair()
    with pytest.raises(Olmo2KitError, match="line 1"):
        results.read()
    assert results.path.read_bytes() == line


@pytest.mark.parametrize("store", list(STORES))
def test_a_record_cut_inside_a_character_is_torn(tmp_path, store):
    make, record = STORES[store]
    results = make(tmp_path / "results.jsonl")
    results.append([record])
    whole = results.path.read_bytes()
    results.path.write_bytes(whole + json.dumps({**record, "note": "é"}, ensure_ascii=False).encode()[:-3])
    assert results.read() == [record] and results.repair() and results.path.read_bytes() == whole


@pytest.mark.parametrize("special", ["device", "fifo"])
def test_a_store_refuses_a_device_and_a_fifo_without_reading_or_waiting(tmp_path, dev_full, special):
    if special == "fifo":
        path, kind = tmp_path / "pipe", r"fifo \(named pipe\)"
        os.mkfifo(path)
    else:
        path, kind = dev_full, "character device"
    store = JsonlStore(path, what="result line", hint="give another --output")
    for use in (store.read, store.repair, store.check, lambda: store.append([{"id": 1}])):
        with pytest.raises(Olmo2KitError, match=rf"^{path} is a {kind}, not a regular file: give another --output$"):
            finishes_soon(use)
    assert stat.S_ISFIFO(path.stat().st_mode) if special == "fifo" else stat.S_ISCHR(path.stat().st_mode)


def test_a_line_longer_than_the_cap_is_an_error_and_nothing_is_cut(tmp_path):
    store = JsonlStore(tmp_path / "r.jsonl", what="result line", max_line_bytes=100)
    store.append([{"id": 1}])
    long = json.dumps({"id": 2, "text": "x" * 200}).encode()
    for tail in (long + b"\n", long, b"{" + b" " * 200):  # whole, without its newline, and the start of an object
        store.path.write_bytes(b'{"id": 1}\n' + tail)
        with pytest.raises(Olmo2KitError, match=r"r.jsonl line 2 is longer than 100 bytes, so it is not a result line"):
            store.repair()
        assert store.path.read_bytes() == b'{"id": 1}\n' + tail
    assert JsonlStore(store.path, max_line_bytes=1 << 20).read()[0] == {"id": 1}


def test_a_huge_file_of_one_line_is_refused_in_bounded_memory(tmp_path):
    """1 GiB without a newline (sparse: no disk used) read with the default cap of 64 MiB, in a fresh process whose
    peak memory is its own (VmHWM: ru_maxrss would carry the pytest process's peak over through fork and exec).
    Reading the file whole would take more than 1 GiB."""
    huge = tmp_path / "out.jsonl"
    with huge.open("wb") as f:
        f.truncate(1 << 30)
    script = (
        "from olmo2kit.errors import Olmo2KitError\nfrom olmo2kit.files import JsonlStore\n"
        f"try:\n    JsonlStore({str(huge)!r}).read()\nexcept Olmo2KitError as e:\n    print(e)\n"
        "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) // 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    message, peak_mib = done.stdout.splitlines()
    assert message == f"{huge} line 1 is longer than 64 MiB, so it is not a JSON line: give another file"
    assert int(peak_mib) < 400, f"peak {peak_mib} MiB"


def test_an_append_cut_short_by_a_full_disk_leaves_a_torn_line_that_resumes(tmp_path, monkeypatch):
    # No small file system can be filled here, so the kernel's answer on a full disk is played by os.write for
    # this one file: part of the bytes taken, then ENOSPC, as write(2) does when the space runs out mid-call.
    store = JsonlStore(tmp_path / "r.jsonl", what="result line")
    store.append([{"id": 0}])
    real_write, calls = os.write, []

    def fills_up(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}") != str(store.path):
            return real_write(fd, data)
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", fills_up)
    with pytest.raises(Olmo2KitError, match=r"cannot write .*r.jsonl \(No space left on device\): free some space"):
        store.append([{"id": 1, "text": "a" * 50}, {"id": 2}])  # the cut falls inside the first
    monkeypatch.undo()
    assert len(calls) == 2 and store.torn()
    assert store.read() == [{"id": 0}]
    assert store.repair()
    store.append([{"id": 1}, {"id": 2}])
    assert store.read() == [{"id": 0}, {"id": 1}, {"id": 2}]


def test_json_nested_past_the_stack_is_a_foreign_line(tmp_path):
    """Found in review: 100,000 open brackets raised RecursionError out of the store."""
    store = JsonlStore(tmp_path / "r.jsonl", what="result line")
    store.path.write_bytes(b"[" * 100_000 + b"\n")
    with pytest.raises(Olmo2KitError, match="line 1 is not a result line"):
        store.read()
