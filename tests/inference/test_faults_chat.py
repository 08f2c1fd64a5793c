"""The chat keeps its conversation through faults: refused options, failed turns, bad input lines, a full
context; and /undo, /retry, /load. Through ChatSession and through the `chat` command."""

import json
import logging
import os
import subprocess

import pytest

from conftest import OLMO2KIT
from olmo2kit.errors import Olmo2KitError
from olmo2kit.inference import chat as chat_module
from olmo2kit.inference.chat import ChatSession
from olmo2kit.inference.generation import generate

GREEDY = dict(do_sample=False, max_new_tokens=8)
LONG = "word " * 100  # some 200 tokens of the tiny tokenizer; the tiny context is 1024


def errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


def greedy_reply(tiny_instruct, messages, max_new_tokens=8) -> str:
    model, tokenizer = tiny_instruct
    return generate(model, tokenizer, messages=messages, do_sample=False, max_new_tokens=max_new_tokens).text


# Case 1: seeds are range-checked where they enter.

def test_an_out_of_range_seed_is_refused_at_set(tiny_instruct):
    session = ChatSession(*tiny_instruct, **GREEDY)
    session.reply("Hi")
    before = session.messages
    with pytest.raises(Olmo2KitError, match="seed must be an integer from 0 to 4294967295"):
        session.set_options(seed=2**32)
    assert session.sampling.seed is None and session.messages == before
    session.set_options(seed=2**32 - 1, do_sample=True)  # the largest seed set_seed takes
    assert session.reply("Again").new_tokens > 0


def test_chat_set_seed_out_of_range_keeps_the_session(cli, tiny_instruct, tiny_instruct_path, tmp_path):
    transcript = tmp_path / "chat.json"
    script = f"Hi\n/set seed=4294967296\nHello\n/save {transcript}\n"
    code, out, err = cli("chat", "--model", str(tiny_instruct_path), "--greedy", "-n", "8", stdin=script)
    assert code == 0 and "Traceback" not in err
    assert errors(err) == ["error: seed must be an integer from 0 to 4294967295, got 4294967296"]
    messages = json.loads(transcript.read_text())["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["Hi", "Hello"]
    assert messages[3]["content"] == greedy_reply(tiny_instruct, messages[:3])
    code, out, err = cli("chat", "--model", str(tiny_instruct_path), "--seed", "4294967296", stdin="Hi\n")
    assert code == 2 and out == "" and err.strip().splitlines() == [
        "error: seed must be an integer from 0 to 4294967295, got 4294967296"
    ]


# Case 2: an error in one turn loses nothing.

def test_a_failed_turn_leaves_the_conversation_and_the_next_works(tiny_instruct):
    session = ChatSession(*tiny_instruct, system="Be brief.", **GREEDY)
    session.reply("Hi")
    before = session.messages
    with pytest.raises(Olmo2KitError, match="the message with the system message is .* fills the model's"):
        session.reply("hello " * 1100)  # alone past the context: nothing to drop makes it fit
    assert session.messages == before
    session.set_options(max_new_tokens=5000)  # a bad value only generation can see: past the context
    with pytest.raises(Olmo2KitError, match="lower max_new_tokens"):
        session.reply("Hello")
    assert session.messages == before
    with pytest.raises(Olmo2KitError, match="lower max_new_tokens"):
        list(session.retry())
    assert session.messages == before  # the old reply stays
    session.set_options(max_new_tokens=8)
    after = session.reply("Hello").text
    assert session.messages[:3] == before and after == greedy_reply(tiny_instruct, session.messages[:4])


def test_chat_reports_a_failed_turn_and_goes_on(cli, tiny_instruct, tiny_instruct_path, tmp_path):
    transcript = tmp_path / "chat.json"
    script = "\n".join(["Hi", "hello " * 1100, "/set max_new_tokens=5000", "Hello", "/set max_new_tokens=8",
                        "Hello", f"/save {transcript}"]) + "\n"
    code, out, err = cli("chat", "--model", str(tiny_instruct_path), "--greedy", "-n", "8", stdin=script)
    assert code == 0 and "Traceback" not in err
    found = errors(err)
    assert len(found) == 2 and "fills the model's 1024-token context" in found[0]
    assert "lower max_new_tokens" in found[1] and "/reset" not in err
    messages = json.loads(transcript.read_text())["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["Hi", "Hello"]
    assert out == messages[1]["content"] + "\n" + messages[3]["content"] + "\n"


# Case 3: a line that is not text costs that line only.

def run_chat(tiny_instruct_path, **how) -> subprocess.CompletedProcess:
    """The chat in a fresh process; `how`: its stdin as bytes (`input=`) or a file descriptor (`stdin=`)."""
    return subprocess.run([str(OLMO2KIT), "chat", "--model", str(tiny_instruct_path), "--greedy", "-n", "8"],
                          capture_output=True, timeout=300, **how)


def test_invalid_utf8_on_stdin_is_one_line_and_the_chat_goes_on(tiny_instruct, tiny_instruct_path, tmp_path):
    transcript = tmp_path / "chat.json"
    script = b"\xff\xfe\nHi \xc3\n\xc3\xa9t\xc3\xa9\n/save " + bytes(transcript) + b"\n"
    result = run_chat(tiny_instruct_path, input=script)
    err = result.stderr.decode()
    assert result.returncode == 0 and "Traceback" not in err
    assert errors(err) == ["error: that line is not utf-8 text: skipped"] * 2
    messages = json.loads(transcript.read_text())["messages"]
    assert [m["content"] for m in messages] == ["été", greedy_reply(tiny_instruct, messages[:1])]


def test_stdin_that_cannot_be_read_ends_the_chat_with_one_line(tiny_instruct_path):
    write_only = os.open(os.devnull, os.O_WRONLY)  # reading it fails: EBADF
    try:
        result = run_chat(tiny_instruct_path, stdin=write_only)
    finally:
        os.close(write_only)
    assert result.returncode == 2 and result.stdout == b"" and b"Traceback" not in result.stderr
    last = result.stderr.decode().strip().splitlines()[-1]
    assert last == "error: cannot read the chat's input (Bad file descriptor)"
    closed = run_chat(tiny_instruct_path, preexec_fn=lambda: os.close(0))  # no stdin at all: sys.stdin is None
    assert closed.returncode == 2 and closed.stderr.decode().splitlines() == [
        "error: the chat reads its messages from stdin, and there is none: run it on a terminal or pipe"
    ]


# Case 5: /undo, /retry, /load, and a context that fills.

def test_undo_drops_the_last_exchange(tiny_instruct):
    session = ChatSession(*tiny_instruct, **GREEDY)
    with pytest.raises(Olmo2KitError, match="nothing to undo"):
        session.undo()
    session.reply("Hi")
    first = session.messages
    session.reply("Tell me more.")
    dropped = session.undo()
    assert [m["role"] for m in dropped] == ["user", "assistant"] and dropped[0]["content"] == "Tell me more."
    assert session.messages == first
    other = session.reply("What is the capital of France?").text  # from the kept cache, cut back
    assert other == greedy_reply(tiny_instruct, session.messages[:3])
    session.undo()
    session.undo()
    assert session.messages == []


def test_retry_replaces_the_last_reply(tiny_instruct):
    session = ChatSession(*tiny_instruct, max_new_tokens=8, seed=1)
    with pytest.raises(Olmo2KitError, match="nothing to retry"):
        session.retry()
    session.reply("Hi")
    first = session.messages[1]["content"]
    session.set_options(seed=2)
    again = "".join(chunk.text for chunk in session.retry())
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    assert session.messages[1]["content"] == again != first
    model, tokenizer = tiny_instruct
    assert again == generate(model, tokenizer, messages=session.messages[:1], max_new_tokens=8, seed=2).text
    unused = session.retry()  # a retry that never runs changes nothing
    del unused
    assert session.messages[1]["content"] == again


def test_load_continues_a_saved_conversation(tiny_instruct, tmp_path):
    saved = ChatSession(*tiny_instruct, system="Be brief.", **GREEDY)
    saved.reply("Hi")
    saved.save(tmp_path / "chat.json", "tiny")
    session = ChatSession(*tiny_instruct, **GREEDY)
    session.reply("Something else")
    assert session.load(tmp_path / "chat.json") == "tiny"
    assert session.messages == saved.messages and session.system == "Be brief."
    assert session.reply("And then?").text == saved.reply("And then?").text
    (tmp_path / "empty.json").write_text('{"model": "tiny", "messages": []}')
    session.load(tmp_path / "empty.json")
    assert session.messages == [] and session.system is None


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"not json", "not JSON"),
        (b'{"messages": "\xff"}', "not JSON"),
        (b"[" * 100000, "not JSON"),
        (b"[]", 'a transcript is {"model": ..., "messages": [...]}'),
        (b'{"model": "x"}', 'a transcript is {"model"'),
        (b'{"model": 3, "messages": []}', '"model" must be a string'),
        (b'{"messages": [{"role": "tool", "content": "x"}]}', "message 1 has role 'tool'"),
        (b'{"messages": [{"role": "user", "content": "x"}, "hi"]}', "message 2 is not"),
        (b'{"messages": []}' + b" " * 2**20, "it is over 1 MiB, too large for a transcript"),
    ],
)
def test_load_refuses_what_is_not_a_transcript(tiny_instruct, tmp_path, monkeypatch, content, needle):
    monkeypatch.setattr(chat_module, "TRANSCRIPT_LIMIT", 2**20)  # what a huge file does, on a smaller one
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    session = ChatSession(*tiny_instruct, system="Be brief.", **GREEDY)
    session.reply("Hi")
    before = session.messages
    with pytest.raises(Olmo2KitError, match="cannot load .*bad.json: ") as error:
        session.load(path)
    assert needle in str(error.value)
    for missing, problem in ((tmp_path / "none.json", "there is no such file"), (tmp_path, "it is not a file")):
        with pytest.raises(Olmo2KitError, match=problem):
            session.load(missing)
    assert session.messages == before


def test_a_full_context_drops_the_oldest_turns(tiny_instruct, caplog):
    session = ChatSession(*tiny_instruct, system="Be brief.", **GREEDY)
    for i in range(4):
        session.reply(f"{i} {LONG}")
    assert len(session.messages) == 9
    with caplog.at_level(logging.WARNING, logger="olmo2kit"):
        reply = session.reply(f"4 {LONG}").text
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["the conversation outgrew the model's 1024-token context: dropped its oldest 2 message(s)"]
    messages = session.messages
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert [m["content"][0] for m in messages if m["role"] == "user"] == ["1", "2", "3", "4"]
    assert reply == greedy_reply(tiny_instruct, messages[:-1])


def test_chat_undo_retry_load_and_a_full_context(cli, tiny_instruct, tiny_instruct_path, tmp_path):
    first, second, bad = tmp_path / "first.json", tmp_path / "second.json", tmp_path / "bad.json"
    bad.write_text('{"messages": [{"role": "user"}]}')
    script = "\n".join([
        "/help", "Hi", "Tell me more.", "/undo", "/retry", f"/save {first}", f"/load {bad}", "/reset",
        f"/load {first}", "/undo", "/undo", "/retry", *(f"{i} {LONG}" for i in range(5)), f"/save {second}",
    ]) + "\n"
    code, out, err = cli("chat", "--model", str(tiny_instruct_path), "--dtype", "fp32", "--greedy", "-n", "8",
                         stdin=script)
    assert code == 0 and "Traceback" not in err
    assert all(command in err for command in ("/undo ", "/retry ", "/load FILE"))  # the help
    assert "dropped your last message and its reply" in err
    assert f"loaded 2 messages from {first}" in err
    assert errors(err) == [f"error: cannot load {bad}: message 1 is not a {{\"role\": ..., \"content\": ...}} dict",
                           "error: nothing to undo: there is no user message",
                           "error: nothing to retry: the conversation does not end with a reply to a user message"]
    hi = json.loads(first.read_text())["messages"]
    assert [m["content"] for m in hi if m["role"] == "user"] == ["Hi"]
    more = greedy_reply(tiny_instruct, [*hi, {"role": "user", "content": "Tell me more."}])
    assert out.startswith(f"{hi[1]['content']}\n{more}\n{hi[1]['content']}\n")  # the greedy /retry: the same
    assert "warning: the conversation outgrew the model's 1024-token context: dropped its oldest 2 message(s)" in err
    kept = json.loads(second.read_text())["messages"]
    assert [m["content"][0] for m in kept if m["role"] == "user"] == ["1", "2", "3", "4"]
    assert kept[-1]["content"] == greedy_reply(tiny_instruct, kept[:-1])


def test_a_prompt_past_the_byte_cap_is_refused_before_tokenizing(tiny, cli, tiny_instruct_path):
    """Found in review: a 24 MB line was tokenized whole (about 4 GB) before its length was checked."""
    from olmo2kit.inference.generation import MAX_PROMPT_BYTES, generate

    model, tokenizer = tiny
    with pytest.raises(Olmo2KitError, match=f"the prompt is {MAX_PROMPT_BYTES + 1:,} bytes, more than the "
                                            f"{MAX_PROMPT_BYTES:,} olmo2kit reads before counting tokens"):
        generate(model, tokenizer, "x" * (MAX_PROMPT_BYTES + 1), max_new_tokens=2)
    code, out, err = cli("chat", "--model", str(tiny_instruct_path), "-n", "2", "--greedy",
                         stdin="y" * (MAX_PROMPT_BYTES + 1) + "\nHi\n")
    assert code == 0 and "error: the conversation is" in err and out.strip()  # the next message is answered


def test_generate_reads_at_most_a_prompt_from_stdin(tiny_path):
    """`generate -` with endless input ends at once instead of reading without end."""
    import subprocess

    from conftest import OLMO2KIT

    with open("/dev/zero", "rb") as zero:
        done = subprocess.run([str(OLMO2KIT), "generate", "-", "--model", str(tiny_path)], stdin=zero,
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines()[-1].startswith("error: stdin holds more than 4,194,304 bytes")


def test_save_through_a_link_writes_the_file_it_points_to(cli, tiny_instruct_path, tmp_path):
    (tmp_path / "chats").mkdir()
    target = tmp_path / "chats" / "today.json"
    target.write_text("{}")
    link = tmp_path / "chat.json"
    link.symlink_to("chats/today.json")
    code, _, err = cli("chat", "--model", str(tiny_instruct_path), "--greedy", "-n", "4",
                       stdin=f"Hi\n/save {link}\nHello\n/save {link}\n")
    assert code == 0 and errors(err) == [] and f"saved 4 messages to {link}" in err
    assert link.is_symlink() and os.readlink(link) == "chats/today.json"
    messages = json.loads(target.read_text())["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["Hi", "Hello"]
