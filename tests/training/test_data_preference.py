"""prepare-data --format preference: chosen and rejected rows read back raw, the answer alone labelled, detection,
Hub-shaped rows, bad pairs as one-line errors naming the line, resume after a kill, and each format's loader
refusing the other's data."""

import json

import numpy as np
import pytest

from conftest import one_line_error
from olmo2kit.errors import Olmo2KitError
from olmo2kit.files import LOCK_NAME
from olmo2kit.training import data as data_module
from olmo2kit.training.data import load_preference, load_prepared, prepare_data, tokenize_chat

PROMPTS = [
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "What is the capital of France?"}],
    # an earlier assistant turn belongs to the prompt: unlabelled
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Again, louder."}],
]
ANSWERS = [("The capital of France is Paris.", "Berlin, I think."), ("HELLO!", " hello ")]
PAIRS = [{"chosen": [*prompt, {"role": "assistant", "content": good}],
          "rejected": [*prompt, {"role": "assistant", "content": bad}]}
         for prompt, (good, bad) in zip(PROMPTS, ANSWERS, strict=True)]
FILES = ["chosen_input_ids.npy", "chosen_label_mask.npy", "manifest.json", "rejected_input_ids.npy",
         "rejected_label_mask.npy"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def written(outdir):
    """The files a run left in `outdir`, less the lock file that marks the directory as an output."""
    return sorted(p.name for p in outdir.iterdir() if p.name != LOCK_NAME)


@pytest.fixture(scope="module")
def tokenizer(tiny_instruct_path):
    from olmo2kit.model.loading import load_tokenizer

    return load_tokenizer(str(tiny_instruct_path))


def test_pairs_read_back_as_tokenize_chat_with_only_the_answer_labelled(tmp_path, tiny_instruct_path, tokenizer):
    source = write_jsonl(tmp_path / "prefs.jsonl", PAIRS)
    manifest = prepare_data(source, tmp_path / "out", model=str(tiny_instruct_path), seq_len=96)
    assert written(tmp_path / "out") == FILES
    assert (manifest["format"], manifest["rows"], manifest["examples"], manifest["dtype"]) == ("preference", 2, 2,
                                                                                                "uint32")
    assert manifest["files"] == {name.removesuffix(".npy"): name for name in FILES if name != "manifest.json"}
    data = load_preference(tmp_path / "out")
    assert (data.rows, data.seq_len) == (2, 96) and data.chosen_ids.dtype == np.uint32
    assert data.chosen_mask.dtype == np.bool_ and data.rejected_ids.shape == data.rejected_mask.shape == (2, 96)
    for name, array in (("chosen_input_ids.npy", data.chosen_ids), ("rejected_input_ids.npy", data.rejected_ids)):
        assert (tmp_path / "out" / name).stat().st_size == 2 * 96 * 4  # headerless: exactly rows x seq_len items
        raw = np.memmap(tmp_path / "out" / name, dtype=np.uint32, mode="r").reshape(2, 96)
        assert np.array_equal(raw, array)  # each file holds the side its name says
    pad = manifest["pad_token_id"]
    for row, pair in enumerate(PAIRS):
        prompt_len = None
        for side, ids, mask in (("chosen", data.chosen_ids, data.chosen_mask),
                                ("rejected", data.rejected_ids, data.rejected_mask)):
            expected, _ = tokenize_chat(tokenizer, pair[side])
            real = len(expected)
            assert ids[row, :real].tolist() == expected and (ids[row, real:] == pad).all()
            labelled = np.flatnonzero(mask[row])
            # One labelled run, exactly the answer and its end-of-text; everything before it is the prompt.
            assert labelled.tolist() == list(range(labelled[0], real))
            assert tokenizer.decode(ids[row, labelled]) == pair[side][-1]["content"] + tokenizer.eos_token
            assert prompt_len in (None, labelled[0])  # both sides tokenize the shared prompt alike
            prompt_len = labelled[0]
        assert np.array_equal(data.chosen_ids[row, :prompt_len], data.rejected_ids[row, :prompt_len])
    assert manifest["label_tokens"] == int(data.chosen_mask[:, 1:].sum() + data.rejected_mask[:, 1:].sum())
    assert manifest["tokens"] == int((data.chosen_ids != pad).sum() + (data.rejected_ids != pad).sum())


def test_answer_only_labels_the_last_assistant_turn_with_the_same_ids(tokenizer):
    messages = PAIRS[1]["chosen"]
    ids, mask = tokenize_chat(tokenizer, messages)
    answer_ids, answer_mask = tokenize_chat(tokenizer, messages, answer_only=True)
    assert answer_ids == ids
    first = mask.index(True)  # the earlier reply: labelled for SFT, part of the prompt here
    assert not answer_mask[first] and sum(answer_mask) < sum(mask)
    assert [learn for learn, sft in zip(answer_mask, mask, strict=True) if learn and not sft] == []


def test_the_format_is_detected_from_the_first_line(tmp_path, tiny_instruct_path):
    source = write_jsonl(tmp_path / "prefs.jsonl", PAIRS)
    assert prepare_data(source, tmp_path / "out", model=str(tiny_instruct_path), seq_len=96)["format"] == "preference"
    # A chat line after a pair is a bad pair, not a chat example.
    source = write_jsonl(tmp_path / "mixed.jsonl", [PAIRS[0], {"messages": PAIRS[0]["chosen"]}])
    with pytest.raises(Olmo2KitError, match="mixed.jsonl line 2: has no 'chosen' field, which every pair needs"):
        prepare_data(source, tmp_path / "mixed", model=str(tiny_instruct_path), seq_len=96)
    # The first line decides the other way too: a chat file with a pair in it is chat data.
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": PAIRS[0]["chosen"]}, PAIRS[1]])
    with pytest.raises(Olmo2KitError, match="chat.jsonl line 2: has no 'messages' field"):
        prepare_data(source, tmp_path / "chat", model=str(tiny_instruct_path), seq_len=96)
    # Half a pair is no format: the message names all three.
    source = write_jsonl(tmp_path / "half.jsonl", [{"chosen": PAIRS[0]["chosen"]}])
    with pytest.raises(Olmo2KitError, match=r"line 1: has neither .* nor 'chosen' and 'rejected' \(preference\)"):
        prepare_data(source, tmp_path / "half", model=str(tiny_instruct_path), seq_len=96)


def test_hub_dataset_rows_with_other_columns(tmp_path, tiny_instruct_path):
    pytest.importorskip("datasets")
    # The columns of allenai/olmo-2-1124-7b-preference-mix (its README's dataset_info): the pair, and the rest ignored.
    rows = [{"prompt": pair["chosen"][-2]["content"], **pair, "chosen_rating": 5.0, "rejected_rating": 2.0,
             "chosen_model": "a", "rejected_model": "b", "source": "test", "id": f"pair-{i}"}
            for i, pair in enumerate(PAIRS)]
    (tmp_path / "ds").mkdir()
    write_jsonl(tmp_path / "ds" / "train.jsonl", rows)
    from_dataset = prepare_data(str(tmp_path / "ds"), tmp_path / "a", model=str(tiny_instruct_path), seq_len=96)
    from_file = prepare_data(write_jsonl(tmp_path / "plain.jsonl", PAIRS), tmp_path / "b",
                             model=str(tiny_instruct_path), seq_len=96)
    assert from_dataset["source"]["kind"] == "dataset" and from_dataset["format"] == "preference"
    assert from_dataset["rows"] == from_file["rows"] == 2
    for name in FILES[:2] + FILES[3:]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_truncated_and_dropped_pairs_are_counted(tmp_path, tiny_instruct_path, tokenizer):
    long_answer = "The quick brown fox jumps over the lazy dog. " * 20
    question = [{"role": "user", "content": "hi"}]
    records = [
        {"chosen": [*question, {"role": "assistant", "content": long_answer}],  # chosen cut, rejected fits
         "rejected": [*question, {"role": "assistant", "content": "ok"}]},
        PAIRS[0],  # fits
        {"chosen": [{"role": "user", "content": "a long question " * 40}, {"role": "assistant", "content": "a"}],
         "rejected": [{"role": "user", "content": "a long question " * 40}, {"role": "assistant", "content": "b"}]},
    ]
    source = write_jsonl(tmp_path / "prefs.jsonl", records)
    manifest = prepare_data(source, tmp_path / "out", model=str(tiny_instruct_path), seq_len=48)
    assert (manifest["examples"], manifest["rows"], manifest["truncated"], manifest["dropped"]) == (3, 2, 1, 1)
    data = load_preference(tmp_path / "out")
    assert data.chosen_mask[0, -1] and tokenizer.decode(data.chosen_ids[0, data.chosen_mask[0]]) in long_answer
    assert tokenizer.decode(data.rejected_ids[0, data.rejected_mask[0]]) == "ok" + tokenizer.eos_token
    with pytest.raises(Olmo2KitError, match="no example in .* has a token to learn .*--seq-len"):
        prepare_data(write_jsonl(tmp_path / "none.jsonl", [records[2]]), tmp_path / "none",
                     model=str(tiny_instruct_path), seq_len=48)
    assert not (tmp_path / "none" / "manifest.json").exists()


def pair_with(**changes):
    return json.dumps({**PAIRS[0], **changes})


def answer(text, role="assistant"):
    return [*PAIRS[0]["chosen"][:-1], {"role": role, "content": text}]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (json.dumps({"chosen": PAIRS[0]["chosen"]}), "line 3: has no 'rejected' field, which every pair needs in "
                                                     "preference format"),
        (json.dumps({"rejected": PAIRS[0]["rejected"], "messages": []}), "line 3: has no 'chosen' field"),
        (pair_with(rejected="Berlin"), "line 3: 'rejected' must be a list, got str"),
        (pair_with(chosen=None), "line 3: 'chosen' must be a list, got nothing"),
        (pair_with(chosen=[]), "line 3: 'chosen': no messages given"),
        (pair_with(rejected=[{"role": "bot", "content": "x"}]), "line 3: 'rejected': message 1 has role 'bot'"),
        (pair_with(chosen=[{"role": "user", "content": 5}]), "line 3: 'chosen': message 1's content must be a string"),
        (pair_with(chosen=answer("Paris.", role="user")), "line 3: the last message of 'chosen' has role 'user': each "
                                                          "list of a pair ends with the assistant's answer"),
        (pair_with(rejected=answer(" \n")), r"line 3: the answer in 'rejected' \(its last message\) is empty"),
        (pair_with(rejected=[{"role": "user", "content": "What is the capital of Spain?"},
                             {"role": "assistant", "content": "Madrid."}]),
         "line 3: 'chosen' has 3 messages and 'rejected' 2: a pair shares its prompt"),
        (pair_with(rejected=[{"role": "system", "content": "You are terse."}, *PAIRS[0]["rejected"][1:]]),
         "line 3: 'chosen' and 'rejected' differ at message 1: a pair shares its prompt"),
    ],
)
def test_a_bad_pair_is_one_line_naming_its_line(tmp_path, tiny_instruct_path, cli, line, message):
    good = json.dumps(PAIRS[0])
    source = tmp_path / "prefs.jsonl"
    source.write_text(f"{good}\n\n{line}\n{good}\n")  # the blank line 2 is skipped but counted
    with pytest.raises(Olmo2KitError, match=message):
        prepare_data(source, tmp_path / "out", model=str(tiny_instruct_path), seq_len=64)
    assert written(tmp_path / "out") == []
    code, _, err = cli("prepare-data", str(source), str(tmp_path / "out"), "--model", str(tiny_instruct_path),
                       "--seq-len", "64")
    assert one_line_error(code, err, f"{source} line 3: ").startswith(f"error: {source} line 3: ")
    assert written(tmp_path / "out") == []


def test_interrupted_run_resumes_to_the_same_bytes(tmp_path, tiny_instruct_path, monkeypatch):
    records = [PAIRS[i % 2] for i in range(12)]
    source = write_jsonl(tmp_path / "prefs.jsonl", records)
    model = str(tiny_instruct_path)
    expected = prepare_data(source, tmp_path / "whole", model=model, seq_len=96)

    monkeypatch.setattr(data_module, "_SYNC_EVERY", 4)
    real_tokenize, calls, killed = data_module._tokenize_record, [], []

    def killed_at_ten(*args):
        calls.append(1)
        if len(calls) == 10 and not killed:
            killed.append(1)  # once: a rerun that started over must fail the count below, not stop pytest
            raise KeyboardInterrupt  # as a Ctrl-C or a kill between two pairs
        return real_tokenize(*args)

    monkeypatch.setattr(data_module, "_tokenize_record", killed_at_ten)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(source, tmp_path / "out", model=model, seq_len=96)
    assert not set(FILES) & set(written(tmp_path / "out"))
    with pytest.raises(Olmo2KitError, match="was interrupted .*--format preference"):
        load_preference(tmp_path / "out")

    calls.clear()
    resumed = prepare_data(source, tmp_path / "out", model=model, seq_len=96)
    assert len(calls) == 4  # pairs 9 to 12: the first 8 were on disk at the last progress record
    for key in ("rows", "examples", "truncated", "dropped", "tokens", "label_tokens"):
        assert resumed[key] == expected[key]
    for name in FILES:
        if name != "manifest.json":
            assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert written(tmp_path / "out") == FILES


def test_each_loader_refuses_the_other_format_in_one_line(tmp_path, tiny_instruct_path):
    model = str(tiny_instruct_path)
    prepare_data(write_jsonl(tmp_path / "prefs.jsonl", PAIRS), tmp_path / "prefs", model=model, seq_len=96)
    prepare_data(write_jsonl(tmp_path / "chats.jsonl", [{"messages": PAIRS[0]["chosen"]}]), tmp_path / "sft",
                 model=model, seq_len=96)
    with pytest.raises(Olmo2KitError, match="holds preference data .*`olmo2kit finetune --method dpo`") as e:
        load_prepared(tmp_path / "prefs")
    assert "\n" not in str(e.value)
    with pytest.raises(Olmo2KitError, match="holds chat data, not preference pairs: .*--format preference") as e:
        load_preference(tmp_path / "sft")
    assert "\n" not in str(e.value)


def test_a_preference_run_into_an_sft_directory_replaces_its_files(tmp_path, tiny_instruct_path):
    model = str(tiny_instruct_path)
    prepare_data(write_jsonl(tmp_path / "chats.jsonl", [{"messages": PAIRS[0]["chosen"]}]), tmp_path / "out",
                 model=model, seq_len=96)
    prepare_data(write_jsonl(tmp_path / "prefs.jsonl", PAIRS), tmp_path / "out", model=model, seq_len=96)
    assert written(tmp_path / "out") == FILES  # no input_ids.npy left that no manifest describes


def test_damaged_preference_data_is_refused(tmp_path, tiny_instruct_path):
    manifest = prepare_data(write_jsonl(tmp_path / "prefs.jsonl", PAIRS), tmp_path / "out",
                            model=str(tiny_instruct_path), seq_len=64)
    ids = np.memmap(tmp_path / "out" / "rejected_input_ids.npy", dtype=np.uint32, mode="r+", shape=(2, 64))
    ids[1, 3] = manifest["vocab_size"]
    ids.flush()
    with pytest.raises(Olmo2KitError, match="rejected_input_ids.npy row 2 of 2 holds token id"):
        load_preference(tmp_path / "out")
    with open(tmp_path / "out" / "chosen_label_mask.npy", "r+b") as f:
        f.truncate(10)
    with pytest.raises(Olmo2KitError, match="chosen_label_mask.npy is missing or not the 128 bytes"):
        load_preference(tmp_path / "out")
    with pytest.raises(Olmo2KitError, match="is not prepared data .*--format preference"):
        load_preference(tmp_path)


def test_cli_prepares_preference_data(cli, tmp_path, tiny_instruct_path):
    source = write_jsonl(tmp_path / "prefs.jsonl", PAIRS)
    code, out, err = cli("prepare-data", str(source), str(tmp_path / "out"), "--model", str(tiny_instruct_path),
                         "--seq-len", "64", "--format", "preference")
    assert code == 0, err
    assert out.splitlines()[1].split()[:5] == ["2", "64", "2", "0", "0"] and out.split()[-1] == "preference"
    assert "chosen_input_ids.npy" in err and "rejected_label_mask.npy" in err
    code, out, _ = cli("prepare-data", str(source), str(tmp_path / "json"), "--model", str(tiny_instruct_path),
                       "--seq-len", "64", "--json")
    assert code == 0 and json.loads(out)["format"] == "preference"
