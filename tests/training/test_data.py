"""prepare-data: OLMo's layout read back raw, label spans decoded, counts, bad lines, atomic and resumable writes."""

import json

import numpy as np
import pytest

from olmo2kit.errors import Olmo2KitError
from olmo2kit.files import LOCK_NAME
from olmo2kit.training import data as data_module
from olmo2kit.training.data import load_prepared, prepare_data, tokenize_chat

CHATS = [
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."},
     {"role": "user", "content": "And a poem?"},
     {"role": "assistant", "content": " The sea is wide,\nthe sea is deep. "}],
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello, world!"}],
    [{"role": "user", "content": "Nothing to answer here."}],  # no assistant turn: dropped
    [{"role": "user", "content": "Empty reply?"}, {"role": "assistant", "content": ""}],
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def written(outdir):
    """The files a run left in `outdir`, less the lock file that marks the directory as an output."""
    return sorted(p.name for p in outdir.iterdir() if p.name != LOCK_NAME)


def spans(ids, mask):
    """The contiguous runs of labelled token ids."""
    runs, current = [], []
    for token, learn in zip(ids, mask, strict=True):
        if learn:
            current.append(int(token))
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.fixture(scope="module")
def tokenizer(tiny_instruct_path):
    from olmo2kit.model.loading import load_tokenizer

    return load_tokenizer(str(tiny_instruct_path))


def test_layout_is_headerless_uint32_and_bool_memmaps(tmp_path, tiny_instruct_path):
    source = write_jsonl(tmp_path / "chats.jsonl", [{"messages": m} for m in CHATS])
    manifest = prepare_data(source, tmp_path / "out", model=str(tiny_instruct_path), seq_len=96)
    out = tmp_path / "out"
    rows, seq_len = manifest["rows"], manifest["seq_len"]
    assert (rows, seq_len, manifest["dtype"], manifest["format"]) == (3, 96, "uint32", "chat")
    assert manifest["tokenizer"] == str(tiny_instruct_path.resolve())
    # No header: the files are exactly rows x seq_len items.
    assert (out / "input_ids.npy").stat().st_size == rows * seq_len * 4
    assert (out / "label_mask.npy").stat().st_size == rows * seq_len
    ids = np.memmap(out / "input_ids.npy", dtype=np.uint32, mode="r").reshape(rows, seq_len)
    mask = np.memmap(out / "label_mask.npy", dtype=np.bool_, mode="r").reshape(rows, seq_len)
    prepared = load_prepared(out)
    assert prepared.input_ids.dtype == np.uint32 and prepared.input_ids.shape == (rows, seq_len)
    assert np.array_equal(prepared.input_ids, ids) and np.array_equal(prepared.label_mask, mask)
    for row in range(rows):  # right-padded with the pad id, never labelled
        real = int(np.flatnonzero(ids[row] != manifest["pad_token_id"])[-1]) + 1
        assert (ids[row, real:] == manifest["pad_token_id"]).all() and not mask[row, real:].any()
        assert ids[row, real - 1] == manifest["eos_token_id"] and mask[row, real - 1]
    assert manifest["tokens"] == int((ids != manifest["pad_token_id"]).sum())
    assert manifest["label_tokens"] == int(mask[:, 1:].sum())


def test_labelled_spans_decode_to_exactly_the_assistant_texts(tokenizer):
    for messages in CHATS:
        ids, mask = tokenize_chat(tokenizer, messages)
        replies = [m["content"] + tokenizer.eos_token for m in messages if m["role"] == "assistant"]
        assert [tokenizer.decode(run) for run in spans(ids, mask)] == replies
        # The whole row is the rendered conversation, token for token.
        assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)


def test_conversation_opening_with_the_assistant(tokenizer):
    messages = [{"role": "assistant", "content": "Hi there"}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "assistant"}]
    ids, mask = tokenize_chat(tokenizer, messages)
    assert [tokenizer.decode(run) for run in spans(ids, mask)] == ["Hi there<|endoftext|>", "assistant<|endoftext|>"]


def test_prepared_rows_decode_to_the_assistant_texts(tmp_path, tiny_instruct_path, tokenizer):
    source = write_jsonl(tmp_path / "chats.jsonl", [{"messages": m} for m in CHATS])
    prepare_data(source, tmp_path / "out", model=str(tiny_instruct_path), seq_len=128)
    prepared = load_prepared(tmp_path / "out")
    kept = [m for m in CHATS if any(t["role"] == "assistant" for t in m)]
    for row, messages in enumerate(kept):
        texts = [tokenizer.decode(run) for run in spans(prepared.input_ids[row], prepared.label_mask[row])]
        assert texts == [m["content"] + "<|endoftext|>" for m in messages if m["role"] == "assistant"]


def test_truncation_and_drop_counts(tmp_path, tiny_instruct_path, tokenizer):
    long_reply = "The quick brown fox jumps over the lazy dog. " * 20
    records = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": long_reply}]},  # cut
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]},  # fits
        {"messages": [{"role": "user", "content": "no answer"}]},  # nothing to learn
        {"messages": [{"role": "user", "content": "a long question " * 40},
                      {"role": "assistant", "content": "too late"}]},  # its answer lies past seq_len
    ]
    source = write_jsonl(tmp_path / "chats.jsonl", records)
    manifest = prepare_data(source, tmp_path / "out", model=str(tiny_instruct_path), seq_len=48)
    assert (manifest["examples"], manifest["rows"], manifest["truncated"], manifest["dropped"]) == (4, 2, 1, 2)
    prepared = load_prepared(tmp_path / "out")
    assert prepared.label_mask[0, -1]  # the cut row is labelled to its last position
    assert tokenizer.decode(spans(prepared.input_ids[0], prepared.label_mask[0])[0]) in long_reply


def test_text_format_learns_every_real_token(tmp_path, tiny_instruct_path, tokenizer):
    source = write_jsonl(tmp_path / "notes.jsonl", [{"text": "Hello, world!"}, {"text": "The sea is wide."}])
    manifest = prepare_data(source, tmp_path / "out", model=str(tiny_instruct_path), seq_len=32)
    assert manifest["format"] == "text" and manifest["chat_template"] is None
    prepared = load_prepared(tmp_path / "out")
    for row, text in enumerate(["Hello, world!", "The sea is wide."]):
        real = prepared.input_ids[row] != manifest["pad_token_id"]
        assert np.array_equal(prepared.label_mask[row], real)
        assert tokenizer.decode(prepared.input_ids[row][real]) == f"<|endoftext|>{text}<|endoftext|>"


def test_base_tokenizer_without_template_gets_the_olmo2_one(tmp_path, tiny_path, tokenizer):
    source = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHATS[1]}])
    manifest = prepare_data(source, tmp_path / "out", model=str(tiny_path), seq_len=64)
    assert manifest["chat_template"] == "olmo2"
    prepared = load_prepared(tmp_path / "out")
    expected, _ = tokenize_chat(tokenizer, CHATS[1])  # the instruct tokenizer carries the same template
    assert prepared.input_ids[0, : len(expected)].tolist() == expected


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 3: not JSON"),
        ('["a list"]', "line 3: expected a JSON object, got list"),
        ('{"messages": "hi"}', "line 3: 'messages' must be a list, got str"),
        ('{"messages": []}', "line 3: no messages given"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "line 3: message 1 has role 'bot'"),
        ('{"messages": [{"role": "user", "content": 5}]}', "line 3: message 1's content must be a string"),
        ('{"prompt": "x"}', "line 3: has no 'messages' field, which every example needs in chat format"),
    ],
)
def test_bad_line_is_reported_with_its_number_and_writes_nothing(tmp_path, tiny_instruct_path, line, message):
    good = json.dumps({"messages": CHATS[1]})
    source = tmp_path / "chats.jsonl"
    source.write_text(f"{good}\n\n{line}\n{good}\n")  # the blank line 2 is skipped but counted
    with pytest.raises(Olmo2KitError, match=message):
        prepare_data(source, tmp_path / "out", model=str(tiny_instruct_path), seq_len=64)
    assert written(tmp_path / "out") == []


def test_interrupted_run_leaves_nothing_complete_and_resumes(tmp_path, tiny_instruct_path, monkeypatch):
    records = [{"messages": CHATS[i % 2] if i % 3 else CHATS[3]} for i in range(12)]
    source = write_jsonl(tmp_path / "chats.jsonl", records)
    model = str(tiny_instruct_path)
    expected = prepare_data(source, tmp_path / "whole", model=model, seq_len=96)

    monkeypatch.setattr(data_module, "_SYNC_EVERY", 4)
    real_tokenize, calls = data_module._tokenize_record, []

    def killed_at_ten(*args):
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt  # as a Ctrl-C or a kill between two examples
        return real_tokenize(*args)

    monkeypatch.setattr(data_module, "_tokenize_record", killed_at_ten)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(source, tmp_path / "out", model=model, seq_len=96)
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "manifest.json" not in left and "input_ids.npy" not in left and "label_mask.npy" not in left
    with pytest.raises(Olmo2KitError, match="was interrupted"):
        load_prepared(tmp_path / "out")

    calls.clear()
    resumed = prepare_data(source, tmp_path / "out", model=model, seq_len=96)
    assert len(calls) == 4  # examples 9 to 12: the first 8 were on disk at the last progress record
    for key in ("rows", "examples", "truncated", "dropped", "tokens", "label_tokens"):
        assert resumed[key] == expected[key]
    for name in ("input_ids.npy", "label_mask.npy"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert written(tmp_path / "out") == ["input_ids.npy", "label_mask.npy", "manifest.json"]


def test_nothing_to_learn_is_an_error(tmp_path, tiny_instruct_path):
    source = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHATS[2]}])
    with pytest.raises(Olmo2KitError, match="no example .* has a token to learn"):
        prepare_data(source, tmp_path / "out", model=str(tiny_instruct_path))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_damaged_data_is_refused(tmp_path, tiny_instruct_path):
    source = write_jsonl(tmp_path / "chats.jsonl", [{"messages": m} for m in CHATS])
    prepare_data(source, tmp_path / "out", model=str(tiny_instruct_path), seq_len=64)
    with open(tmp_path / "out" / "input_ids.npy", "r+b") as f:
        f.truncate(100)
    with pytest.raises(Olmo2KitError, match="input_ids.npy is missing or not the"):
        load_prepared(tmp_path / "out")
    with pytest.raises(Olmo2KitError, match="is not prepared data"):
        load_prepared(tmp_path)


def test_dataset_directory_source(tmp_path, tiny_instruct_path):
    pytest.importorskip("datasets")
    (tmp_path / "ds").mkdir()
    write_jsonl(tmp_path / "ds" / "train.jsonl", [{"messages": m} for m in CHATS])
    from_dataset = prepare_data(str(tmp_path / "ds"), tmp_path / "a", model=str(tiny_instruct_path), seq_len=96)
    from_file = prepare_data(tmp_path / "ds" / "train.jsonl", tmp_path / "b", model=str(tiny_instruct_path),
                             seq_len=96)
    assert from_dataset["source"]["kind"] == "dataset" and from_dataset["rows"] == from_file["rows"] == 3
    assert (tmp_path / "a" / "input_ids.npy").read_bytes() == (tmp_path / "b" / "input_ids.npy").read_bytes()


def test_cli_prepare_data(cli, tmp_path, tiny_instruct_path):
    source = write_jsonl(tmp_path / "chats.jsonl", [{"messages": m} for m in CHATS])
    code, out, err = cli("prepare-data", str(source), str(tmp_path / "out"), "--model", str(tiny_instruct_path),
                         "--seq-len", "64", "--json")
    assert code == 0 and json.loads(out)["rows"] == 3
    code, out, _ = cli("prepare-data", str(source), str(tmp_path / "out2"), "--model", str(tiny_instruct_path),
                       "--seq-len", "96")
    assert code == 0 and out.splitlines()[0].split()[:5] == ["rows", "seq_len", "examples", "truncated", "dropped"]
    assert out.splitlines()[1].split()[:5] == ["3", "96", "4", "0", "1"]
    code, _, err = cli("prepare-data", str(tmp_path / "missing.jsonl"), str(tmp_path / "x"))
    assert code == 2 and err.strip().splitlines()[-1] == f"error: no such file: {tmp_path / 'missing.jsonl'}"
    code, _, err = cli("prepare-data", str(source), str(tmp_path / "x"), "--format", "html")
    assert code == 2 and "unknown format 'html'" in err and "Traceback" not in err
    code, _, err = cli("prepare-data", str(source), str(source), "--model", str(tiny_instruct_path))
    assert code == 2 and err == f"error: {source} is a file, not a directory: give a directory to write to\n"


def test_a_directory_that_is_no_dataset_is_one_line(cli, tmp_path, tiny_instruct_path):
    pytest.importorskip("datasets")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text('{"messages": [\n')
    code, _, err = cli("prepare-data", str(tmp_path / "ds"), str(tmp_path / "out"), "--model",
                       str(tiny_instruct_path))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err
    assert lines[-1].startswith(f"error: cannot load dataset '{tmp_path / 'ds'}' split 'train': JSON parse error")
    assert not (tmp_path / "out").exists()
