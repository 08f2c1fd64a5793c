"""The shared leaves: atomic writes and the one JSONL store that jobs, sweeps and the fine-tuning log use."""

import json
import os

import pytest

from olmo2kit.errors import Olmo2KitError
from olmo2kit.evals.sweep import results_store
from olmo2kit.files import JsonlStore, write_atomic
from olmo2kit.inference.jobs import _results_store
from olmo2kit.training.finetune import _log_store

# Every store of the package, each with a record it accepts: the torn-line rule must be the same for all.
STORES = {
    "jobs": (lambda path: _results_store(path), {"id": "q1", "model": "m", "text": "x"}),
    "sweep": (lambda path: results_store(path), {"revision": "stage1-step1-tokens1B", "value": 1.0}),
    "finetune-log": (lambda path: _log_store(path.parent), {"step": 1, "loss": 2.0}),
}


@pytest.fixture(params=list(STORES))
def store_and_record(request, tmp_path):
    make, record = STORES[request.param]
    return make(tmp_path / "train_log.jsonl"), record


def test_append_then_read_back(store_and_record):
    store, record = store_and_record
    assert store.read() == []
    store.append([record, {**record}])
    store.append([])
    assert store.read() == [record, record]
    assert store.path.read_text().count("\n") == 2


@pytest.mark.parametrize("torn", [b'{"step": 9, "va', b"{", b'{"id": "q9", "revision": "stage1-step9-tokens9B"'])
def test_a_torn_last_line_is_left_out_and_cut_off(store_and_record, torn):
    store, record = store_and_record
    store.append([record, record])
    whole = store.path.read_bytes()
    assert store.repair() is False and store.path.read_bytes() == whole
    store.path.write_bytes(whole + torn)
    assert store.torn()
    assert store.read() == [record, record]
    assert store.path.read_bytes() == whole + torn  # reading changes nothing
    assert store.repair() is True
    assert store.path.read_bytes() == whole
    store.append([record])
    assert store.read() == [record] * 3


@pytest.mark.parametrize("bad", [b"not json\n", b'{"step": 9, "va\n', b"\x00\x00\x00\n", b"\xff\xfe\n", b"[1, 2]\n"])
@pytest.mark.parametrize("last", [False, True], ids=["before-the-last", "last"])
def test_a_whole_line_that_is_no_record_is_an_error_and_nothing_is_cut(store_and_record, bad, last):
    store, record = store_and_record
    store.append([record])
    with store.path.open("ab") as f:
        f.write(bad)
    if not last:
        store.append([record])
    before = store.path.read_bytes()
    with pytest.raises(Olmo2KitError, match=r"line 2 is not a .*: fix or remove it, or "):
        store.read()
    with pytest.raises(Olmo2KitError, match="line 2"):
        store.repair()
    assert store.path.read_bytes() == before


def test_a_foreign_file_is_never_cut(tmp_path):
    """Text that does not begin a JSON object, even without a final newline, is not a torn record."""
    store = JsonlStore(tmp_path / "notes.txt", what="result line")
    store.path.write_bytes(b"my notes\nmore notes")
    with pytest.raises(Olmo2KitError, match="line 1 is not a result line"):
        store.repair()
    store.path.write_bytes(b"only line")
    with pytest.raises(Olmo2KitError, match="line 1"):
        store.repair()
    assert store.path.read_bytes() == b"only line"


def test_a_last_record_without_its_newline_is_kept_and_ended(store_and_record):
    store, record = store_and_record
    store.append([record])
    with store.path.open("ab") as f:
        f.write(json.dumps(record).encode())
    assert store.read() == [record, record]
    assert store.repair() is True
    store.append([record])
    assert store.read() == [record] * 3


def test_a_line_of_another_kind_is_not_a_record(tmp_path):
    store = JsonlStore(tmp_path / "r.jsonl", what="result line", is_record=lambda row: "id" in row)
    store.path.write_bytes(b'{"id": 1}\n["a list"]\n{"id": 2}\n')
    with pytest.raises(Olmo2KitError, match="line 2 is not a result line"):
        store.read()
    store.path.write_bytes(b'{"id": 1}\n\n{"id": 2}\n')  # blank lines are skipped
    assert store.read() == [{"id": 1}, {"id": 2}]


def test_rewrite_replaces_the_file_whole(tmp_path):
    store = JsonlStore(tmp_path / "r.jsonl")
    store.append([{"a": 1}, {"a": 2}])
    store.rewrite(r for r in store.read() if r["a"] < 2)
    assert store.read() == [{"a": 1}]


def test_write_atomic_leaves_no_temporary_file(tmp_path):
    path = write_atomic(tmp_path / "f.bin", b"data")
    assert path.read_bytes() == b"data" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_a_store_that_cannot_be_written_says_so(tmp_path):
    store = JsonlStore(tmp_path / "missing-dir" / "r.jsonl")
    with pytest.raises(Olmo2KitError, match="cannot write"):
        store.append([{"a": 1}])


def test_an_output_is_locked_for_one_run_at_a_time(tmp_path):
    from olmo2kit.files import output_lock

    out = tmp_path / "results.jsonl"
    with output_lock(out, option="--output") as lock_file:
        assert lock_file == tmp_path / ".results.jsonl.lock"
        with pytest.raises(Olmo2KitError, match=r"results.jsonl is in use by another olmo2kit run \(pid \d+ on .*\): "
                                                r"wait for it to end, or give another --output"):
            with output_lock(out, option="--output"):
                pass
    with output_lock(out, option="--output"):  # released when the block ends
        pass
    with output_lock(tmp_path, option="--output") as lock_file:  # a directory holds its own lock file
        assert lock_file == tmp_path / ".olmo2kit.lock"


def test_a_lock_is_held_across_processes_and_dies_with_its_holder(tmp_path):
    import subprocess
    import sys
    import time

    from olmo2kit.files import output_lock

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom olmo2kit.files import output_lock\n"
        f"with output_lock({str(tmp_path)!r}, option='--output'):\n    print('held', flush=True)\n    time.sleep(60)\n"
    )], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(Olmo2KitError, match=f"pid {holder.pid} "):
            with output_lock(tmp_path, option="--output"):
                pass
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    with output_lock(tmp_path, option="--output"):  # a killed holder leaves no lock behind
        pass


# Writing through a symbolic link the user points at: the link stays, the file it leads to changes.

def test_write_atomic_through_a_link_keeps_the_link(tmp_path):
    (tmp_path / "runs").mkdir()
    target = tmp_path / "runs" / "7.json"
    target.write_text("old")
    link = tmp_path / "latest.json"
    link.symlink_to("runs/7.json")  # relative: resolved from the link's folder, not the working directory
    assert write_atomic(link, b"new") == link
    assert link.is_symlink() and os.readlink(link) == "runs/7.json"
    assert target.read_text() == "new" and not target.is_symlink()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["7.json", "latest.json", "runs"]  # no temporary file


def test_write_atomic_through_a_chain_of_two_links(tmp_path):
    target = tmp_path / "target.json"
    target.write_text("old")
    middle, link = tmp_path / "middle.json", tmp_path / "link.json"
    middle.symlink_to(target)
    link.symlink_to(middle.name)
    write_atomic(link, b"new")
    assert link.is_symlink() and middle.is_symlink() and os.readlink(link) == "middle.json"
    assert target.read_text() == "new"


def test_a_dangling_link_creates_its_target_where_its_folder_exists(tmp_path):
    link = tmp_path / "link.json"
    link.symlink_to("made.json")
    write_atomic(link, b"new")
    assert link.is_symlink() and (tmp_path / "made.json").read_text() == "new"
    nowhere = tmp_path / "nowhere.json"
    nowhere.symlink_to("no-such-folder/x.json")
    with pytest.raises(Olmo2KitError, match=r"nowhere.json is a symbolic link to .*no-such-folder/x.json, and there "
                                            r"is no directory .*no-such-folder: give the name of a regular file"):
        write_atomic(nowhere, b"new")
    assert nowhere.is_symlink() and not (tmp_path / "no-such-folder").exists()


def test_a_loop_of_links_is_an_error_and_stays_as_it_is(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.symlink_to(b.name)
    b.symlink_to(a.name)
    for path in (a, b):
        with pytest.raises(Olmo2KitError, match=r"is a symbolic link in a loop of links, so there is no file to write"):
            write_atomic(path, b"new")
    assert os.readlink(a) == "b.json" and os.readlink(b) == "a.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]


def test_a_store_appends_repairs_and_rewrites_through_a_link(store_and_record, tmp_path):
    store, record = store_and_record
    (tmp_path / "kept").mkdir()
    target = tmp_path / "kept" / "log.jsonl"
    store.path.symlink_to(target)  # a dangling link: the first append creates the file
    store.append([record])
    store.append([record])
    with target.open("ab") as f:
        f.write(b'{"torn')
    assert store.repair() is True
    store.rewrite(store.read()[:1])
    assert store.path.is_symlink() and os.readlink(store.path) == str(target)
    assert [json.loads(line) for line in target.read_text().splitlines()] == [record]


def test_links_to_one_output_share_its_lock(tmp_path):
    from olmo2kit.files import output_lock

    target = tmp_path / "results.jsonl"
    one, other = tmp_path / "one.jsonl", tmp_path / "other.jsonl"
    one.symlink_to(target.name)
    other.symlink_to(target.name)
    with output_lock(one, option="--output") as lock_file:
        assert lock_file == tmp_path / ".results.jsonl.lock"
        for path in (target, other):
            with pytest.raises(Olmo2KitError, match=f"{path.name} is in use by another olmo2kit run"):
                with output_lock(path, option="--output"):
                    pass
