"""prepare-data and load_prepared against bad input and faults: bytes that are not UTF-8, a --seq-len no memory
holds, token ids beyond the vocabulary, two runs into one directory, progress of long runs, unclear messages."""

import json
import os
import re

import numpy as np
import pytest

from conftest import one_line_error
from olmo2kit.cli import output as output_module
from olmo2kit.errors import Olmo2KitError
from olmo2kit.files import LOCK_NAME, output_lock
from olmo2kit.training import data as data_module
from olmo2kit.training.data import MAX_SEQ_LEN, load_prepared, prepare_data

CHAT = {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello, world!"}]}
GOOD = json.dumps(CHAT).encode()


def written(outdir):
    """The files a run left in `outdir`, less the lock file that marks the directory as an output."""
    return sorted(p.name for p in outdir.iterdir() if p.name != LOCK_NAME)



# Bytes that are not UTF-8, and JSON escapes that are no text


def test_a_line_that_is_not_utf8_is_named_and_nothing_is_written(tmp_path, tiny_instruct_path, cli):
    source = tmp_path / "chats.jsonl"
    source.write_bytes(GOOD + b"\n" + GOOD.replace(b"hello", b"caf\xe9") + b"\n" + GOOD + b"\n")
    byte = GOOD.index(b"hello") + 4  # the é, counted from 1
    with pytest.raises(Olmo2KitError, match=f"line 2: not UTF-8 text \\(byte {byte} of the line\\)"):
        prepare_data(source, tmp_path / "out", model=str(tiny_instruct_path), seq_len=64)
    assert written(tmp_path / "out") == []
    code, _, err = cli("prepare-data", str(source), str(tmp_path / "out"), "--model", str(tiny_instruct_path))
    one_line_error(code, err, f"{source} line 2: not UTF-8 text")


def test_an_unpaired_surrogate_escape_is_named(tmp_path, tiny_path):
    source = tmp_path / "notes.jsonl"
    source.write_text('{"text": "fine \\ud83d\\ude00"}\n{"text": "half \\ud800 a pair"}\n')
    with pytest.raises(Olmo2KitError, match="line 2: .* half of a surrogate pair"):
        prepare_data(source, tmp_path / "out", model=str(tiny_path), seq_len=64)
    source.write_text('{"text": "a whole pair \\ud83d\\ude00 is text"}\n')
    assert prepare_data(source, tmp_path / "out", model=str(tiny_path), seq_len=64)["rows"] == 1


# Sizes: --seq-len, and token ids beyond the vocabulary


def test_seq_len_beyond_the_cap_is_refused_before_any_work(tmp_path, cli):
    source = tmp_path / "chats.jsonl"
    source.write_bytes(GOOD + b"\n")
    # The model is not even resolved: the check comes first, and nothing is created.
    code, _, err = cli("prepare-data", str(source), str(tmp_path / "out"), "--seq-len", "100000000000")
    one_line_error(code, err, "--seq-len must be at most 1,048,576 tokens, got 100,000,000,000")
    assert not (tmp_path / "out").exists()


def test_seq_len_at_the_cap_works(tmp_path, tiny_instruct_path):
    source = tmp_path / "chats.jsonl"
    source.write_bytes(GOOD + b"\n")
    with pytest.raises(Olmo2KitError, match="--seq-len must be at most"):
        prepare_data(source, tmp_path / "out", model=str(tiny_instruct_path), seq_len=MAX_SEQ_LEN + 1)
    manifest = prepare_data(source, tmp_path / "out", model=str(tiny_instruct_path), seq_len=MAX_SEQ_LEN)
    assert (manifest["rows"], manifest["seq_len"]) == (1, MAX_SEQ_LEN)


def test_a_token_id_beyond_the_vocabulary_is_refused_when_the_data_is_opened(tmp_path, tiny_instruct_path,
                                                                              monkeypatch):
    source = tmp_path / "chats.jsonl"
    source.write_bytes((GOOD + b"\n") * 3)
    manifest = prepare_data(source, tmp_path / "out", model=str(tiny_instruct_path), seq_len=32)
    vocab = manifest["vocab_size"]
    ids = np.memmap(tmp_path / "out" / "input_ids.npy", dtype=np.uint32, mode="r+", shape=(3, 32))
    ids[2, 5] = vocab - 1  # the last id there is: still fine
    ids.flush()
    assert load_prepared(tmp_path / "out").rows == 3
    monkeypatch.setattr(data_module, "_CHECK_BYTES", 32 * 4)  # a row at a time: the last chunk holds it
    ids[2, 5] = vocab
    ids.flush()
    with pytest.raises(Olmo2KitError, match=f"input_ids.npy row 3 of 3 holds token id {vocab}, beyond the "
                                            f"{vocab:,} tokens of its tokenizer"):
        load_prepared(tmp_path / "out")


def test_a_manifest_without_a_vocabulary_size_is_damaged(tmp_path, tiny_instruct_path):
    source = tmp_path / "chats.jsonl"
    source.write_bytes(GOOD + b"\n")
    prepare_data(source, tmp_path / "out", model=str(tiny_instruct_path), seq_len=32)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    del manifest["vocab_size"]
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Olmo2KitError, match="manifest.json is damaged .*vocab_size"):
        load_prepared(tmp_path / "out")


# One run at a time in a directory


def test_a_second_run_into_the_same_directory_is_refused_while_the_first_runs(tmp_path, tiny_instruct_path,
                                                                              monkeypatch):
    source = tmp_path / "chats.jsonl"
    source.write_bytes((GOOD + b"\n") * 3)
    model = str(tiny_instruct_path)
    real_tokenize, seen = data_module._tokenize_record, []

    def second_run_meanwhile(*args):
        if not seen:
            with pytest.raises(Olmo2KitError, match="is in use by another olmo2kit run .*give another OUTDIR") as e:
                prepare_data(source, tmp_path / "out", model=model, seq_len=32)
            seen.append(str(e.value))
        return real_tokenize(*args)

    monkeypatch.setattr(data_module, "_tokenize_record", second_run_meanwhile)
    assert prepare_data(source, tmp_path / "out", model=model, seq_len=32)["rows"] == 3
    assert seen and f"pid {os.getpid()}" in seen[0]
    assert written(tmp_path / "out") == ["input_ids.npy", "label_mask.npy", "manifest.json"]


def test_a_directory_locked_by_another_run_is_refused_before_any_work(tmp_path, tiny_instruct_path, cli):
    source = tmp_path / "chats.jsonl"
    source.write_bytes(GOOD + b"\n")
    (tmp_path / "out").mkdir()
    with output_lock(tmp_path / "out", option="--output"):
        code, _, err = cli("prepare-data", str(source), str(tmp_path / "out"), "--model", str(tiny_instruct_path))
    one_line_error(code, err, f"{tmp_path / 'out'} is in use by another olmo2kit run")
    assert written(tmp_path / "out") == []


# Progress of long runs


def test_progress_counts_to_the_total_from_where_a_run_resumes(tmp_path, tiny_instruct_path, monkeypatch):
    source = tmp_path / "chats.jsonl"
    source.write_bytes((GOOD + b"\n") * 6 + b"\n\n")  # blank lines at the end still count as read
    seen = []
    prepare_data(source, tmp_path / "out", model=str(tiny_instruct_path), seq_len=32,
                 progress=lambda done, total: seen.append((done, total)))
    assert seen == [(0, 8), *((n, 8) for n in range(1, 7)), (8, 8)]

    monkeypatch.setattr(data_module, "_SYNC_EVERY", 4)
    real_tokenize, calls = data_module._tokenize_record, []

    def killed_at_five(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_tokenize(*args)

    monkeypatch.setattr(data_module, "_tokenize_record", killed_at_five)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(source, tmp_path / "again", model=str(tiny_instruct_path), seq_len=32)
    seen.clear()
    prepare_data(source, tmp_path / "again", model=str(tiny_instruct_path), seq_len=32,
                 progress=lambda done, total: seen.append((done, total)))
    assert seen == [(4, 8), (5, 8), (6, 8), (8, 8)]


class FakeClock:
    """time for cli.output: each reading is `step` seconds after the last."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def perf_counter(self) -> float:
        self.now += self.step
        return self.now


def test_the_cli_draws_progress_on_a_non_terminal_every_ten_seconds_and_at_the_end(tmp_path, tiny_instruct_path,
                                                                                   cli, monkeypatch):
    source = tmp_path / "chats.jsonl"
    source.write_bytes((GOOD + b"\n") * 20)
    monkeypatch.setattr(output_module, "time", FakeClock(4.0))  # an example every 4 s
    code, _, err = cli("prepare-data", str(source), str(tmp_path / "out"), "--model", str(tiny_instruct_path),
                       "--seq-len", "32")
    assert code == 0, err
    counts = [int(m.group(1)) for m in re.finditer(r"\] (\d+)/20 ", err)]
    # Drawn at the start, then as soon as 10 s have passed (3 examples at 4 s each), and at the end.
    assert counts == [0, 3, 6, 9, 12, 15, 18, 20]
    assert "20/20" in err.splitlines()[-2] and "ETA 0:00:00" in err.splitlines()[-2]  # then the "wrote" line


# Messages


def test_a_text_line_in_a_chat_file_says_it_has_no_messages(tmp_path, tiny_instruct_path, cli):
    source = tmp_path / "chats.jsonl"
    source.write_bytes(GOOD + b"\n" + b'{"text": "a plain note"}\n')
    code, _, err = cli("prepare-data", str(source), str(tmp_path / "out"), "--model", str(tiny_instruct_path))
    one_line_error(code, err, "line 2: has no 'messages' field, which every example needs in chat format; "
                              "give each example 'messages' (chat) or each 'text' (text)")
    source.write_bytes(b'{"text": "a plain note"}\n' + GOOD + b"\n")
    with pytest.raises(Olmo2KitError, match="line 2: has no 'text' field, which every example needs in text format"):
        prepare_data(source, tmp_path / "out", model=str(tiny_instruct_path))
    source.write_bytes(b'{"prompt": "neither"}\n')
    with pytest.raises(Olmo2KitError, match="line 1: has neither a 'messages' \\(chat\\) nor a 'text' \\(text\\)"):
        prepare_data(source, tmp_path / "out", model=str(tiny_instruct_path))


def test_lines_and_messages_are_numbered_from_one(tmp_path, tiny_instruct_path):
    bad = {"messages": [CHAT["messages"][0], {"role": "assistant", "content": "ok"}, {"role": "bot", "content": "x"}]}
    source = tmp_path / "chats.jsonl"
    source.write_text(f"\n{json.dumps(bad)}\n")  # line 1 is blank
    with pytest.raises(Olmo2KitError, match="line 2: message 3 has role 'bot'"):
        prepare_data(source, tmp_path / "out", model=str(tiny_instruct_path))


def test_dataset_examples_are_numbered_from_one(tmp_path, tiny_instruct_path):
    pytest.importorskip("datasets")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text(json.dumps({"messages": "not a list"}) + "\n")
    with pytest.raises(Olmo2KitError, match="ds example 1: 'messages' must be a list, got str"):
        prepare_data(str(tmp_path / "ds"), tmp_path / "out", model=str(tiny_instruct_path))


def test_a_line_over_the_cap_is_refused_without_holding_it(tmp_path, tiny_path, monkeypatch):
    monkeypatch.setattr(data_module, "MAX_LINE_BYTES", 1000)  # the real cap is 256 MiB: the rule, at a small size
    source = tmp_path / "long.jsonl"
    source.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": "x" * 5000}) + "\n")
    with pytest.raises(Olmo2KitError, match=r"long.jsonl line 2: longer than 1,000 bytes, the cap on an example"):
        prepare_data(source, tmp_path / "out", model=str(tiny_path), seq_len=16, format="text")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_line_nested_past_the_stack_is_named(tmp_path, tiny_path):
    source = tmp_path / "deep.jsonl"
    source.write_bytes(b'{"text": "fine"}\n' + b"[" * 100_000 + b"\n")
    with pytest.raises(Olmo2KitError, match=r"deep.jsonl line 2: not JSON \(nested deeper than it can be read\)"):
        prepare_data(source, tmp_path / "out", model=str(tiny_path), seq_len=16, format="text")
