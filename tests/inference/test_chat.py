"""Chat: the OLMo 2 template, generate(messages=...), ChatSession and its KV-cache reuse, the chat REPL."""

import json
import logging
import os
import signal
import subprocess
import time

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import OLMO2KIT
from olmo2kit.errors import Olmo2KitError
from olmo2kit.inference.chat import ChatSession
from olmo2kit.inference.generation import generate, stream_generate
from olmo2kit.model.chat_template import check_messages, encode_chat, render_chat
from olmo2kit.model.tiny import build_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
]
# What the official template (allenai/OLMo-2-1124-7B-Instruct tokenizer_config.json) renders, written out.
OFFICIAL = (
    "<|endoftext|><|system|>\nYou are a helpful assistant.\n"
    "<|user|>\nWhat is the capital of France?\n"
    "<|assistant|>\nThe capital of France is Paris.<|endoftext|>\n"
    "<|user|>\nAnd of Italy?\n"
    "<|assistant|>\n"
)


@pytest.fixture
def chat_model(tiny_instruct):
    return tiny_instruct


def test_template_renders_the_official_string(chat_model):
    _, tokenizer = chat_model
    assert render_chat(tokenizer, CONVERSATION) == OFFICIAL
    assert render_chat(tokenizer, CONVERSATION, add_generation_prompt=False) == OFFICIAL.removesuffix(
        "<|assistant|>\n"
    )
    ids = encode_chat(tokenizer, CONVERSATION)
    assert ids == tokenizer(OFFICIAL, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.eos_token_id  # <|endoftext|> is one special token, written once


def test_base_tokenizer_gets_the_official_template_with_a_warning(caplog):
    tokenizer = build_tokenizer()  # no chat template, like a base model's
    assert not tokenizer.chat_template
    with caplog.at_level(logging.WARNING, logger="olmo2kit"):
        first = render_chat(tokenizer, CONVERSATION)
        render_chat(tokenizer, CONVERSATION)
    assert first == OFFICIAL
    warnings = [r.getMessage() for r in caplog.records if "no chat template" in r.getMessage()]
    assert len(warnings) == 1 and "official OLMo 2" in warnings[0] and "instruct" in warnings[0]


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ("Hi", "list of"),
        ([], "no messages"),
        ([{"role": "user"}], "message 1 is not"),
        ([{"role": "tool", "content": "x"}], "role 'tool'"),
        ([{"role": "user", "content": 3}], "content must be a string"),
        ([{"role": "system", "content": "Be brief."}], "no user message"),
    ],
)
def test_bad_messages(chat_model, messages, needle):
    model, tokenizer = chat_model
    with pytest.raises(Olmo2KitError, match=needle):
        check_messages(messages)
    with pytest.raises(Olmo2KitError):
        generate(model, tokenizer, messages=messages, max_new_tokens=2)


def test_generate_messages_matches_raw_transformers(chat_model, tiny_instruct_path):
    model, tokenizer = chat_model
    conversations = [CONVERSATION, [{"role": "user", "content": "Hello"}]]
    raw_model = AutoModelForCausalLM.from_pretrained(tiny_instruct_path)
    raw_tokenizer = AutoTokenizer.from_pretrained(tiny_instruct_path, padding_side="left")
    inputs = raw_tokenizer.apply_chat_template(
        conversations, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    )
    out = raw_model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=raw_tokenizer.pad_token_id)
    expected = raw_tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    batch = generate(model, tokenizer, messages=conversations, do_sample=False, max_new_tokens=12)
    assert [g.text for g in batch] == expected
    one = generate(model, tokenizer, messages=CONVERSATION, do_sample=False, max_new_tokens=12)
    assert one.prompt_tokens == len(encode_chat(tokenizer, CONVERSATION))
    assert one.text == generate(model, tokenizer, OFFICIAL, do_sample=False, max_new_tokens=12).text
    streamed = list(stream_generate(model, tokenizer, messages=CONVERSATION, do_sample=False, max_new_tokens=12))
    assert "".join(c.text for c in streamed) == one.text
    with pytest.raises(Olmo2KitError, match="not both"):
        generate(model, tokenizer, "Hi", messages=CONVERSATION)


def _turns(session, texts):
    return [session.reply(text).text for text in texts]


def test_cache_reuse_gives_the_same_greedy_replies(chat_model):
    model, tokenizer = chat_model
    texts = ["Hello!", "What is the capital of France?", "Write a short poem about the sea."]
    options = dict(system="You are a helpful assistant.", do_sample=False, max_new_tokens=16)
    reused = ChatSession(model, tokenizer, **options)
    fresh = ChatSession(model, tokenizer, reuse_cache=False, **options)
    replies = []
    reused_counts = []
    for text in texts:
        replies.append(reused.reply(text).text)
        reused_counts.append(reused.reused_tokens)
    assert replies == _turns(fresh, texts)
    assert reused.messages == fresh.messages
    assert reused_counts[0] == 0 and all(n > 0 for n in reused_counts[1:])
    # and each reply is what a one-shot generate gives for the conversation up to it
    history = reused.messages
    for i, reply in enumerate(replies):
        upto = history[: 2 + 2 * i]  # system, then i exchanges, then the user message
        assert generate(model, tokenizer, messages=upto, do_sample=False, max_new_tokens=16).text == reply


def test_cache_reuse_with_a_stop_string(chat_model):
    model, tokenizer = chat_model
    probe = ChatSession(model, tokenizer, do_sample=False, max_new_tokens=24).reply("Hello!").text
    stop = probe[6:9]
    assert stop.strip()
    options = dict(do_sample=False, max_new_tokens=24, stop=[stop])
    reused = ChatSession(model, tokenizer, **options)
    fresh = ChatSession(model, tokenizer, reuse_cache=False, **options)
    texts = ["Hello!", "Tell me more.", "Thanks."]
    assert _turns(reused, texts) == _turns(fresh, texts)
    assert reused.messages[1]["content"] == probe[: probe.find(stop)]


def test_stopping_a_reply_keeps_what_was_shown(chat_model):
    model, tokenizer = chat_model
    session = ChatSession(model, tokenizer, do_sample=False, max_new_tokens=24)
    stream = session.send("Tell me a story.")
    first = next(stream)
    stream.close()
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    assert session.messages[1]["content"] == first.text != ""
    after = session.reply("Go on.").text  # the next turn works from the kept history, without the dropped cache
    expected = generate(model, tokenizer, messages=session.messages[:3], do_sample=False, max_new_tokens=24).text
    assert after == expected


def test_a_turn_that_does_not_fit_leaves_the_history_alone(chat_model):
    model, tokenizer = chat_model
    session = ChatSession(model, tokenizer, do_sample=False, max_new_tokens=8)
    session.reply("Hi")
    before = session.messages
    with pytest.raises(Olmo2KitError, match="context"):
        session.reply("hello " * 1100)
    assert session.messages == before
    with pytest.raises(Olmo2KitError, match="max_new_tokens"):
        session.set_options(max_new_tokens=0)
    assert session.sampling.max_new_tokens == 8
    session.reset()
    assert session.messages == []


def test_chat_piped(cli, chat_model, tiny_instruct_path, tmp_path):
    model, tokenizer = chat_model
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    script = "\n".join([
        "Hello!",
        "/set greedy=on max_new_tokens=6",
        "What is the capital of France?",
        f"/save {first}",
        "/reset",
        "/system Answer in one sentence.",
        "/set temperature=0.5 top_k=3 seed=7 greedy=off",
        "Write a short poem about the sea.",
        "/set",
        f"/save {second}",
    ]) + "\n"  # then the end of input
    code, out, err = cli("chat", "--model", str(tiny_instruct_path), "-n", "4", "--seed", "1", "--dtype", "fp32",
                         stdin=script)
    assert code == 0, err
    assert "Traceback" not in err and "chatting with" in err
    saved = json.loads(first.read_text())
    assert saved["model"] == str(tiny_instruct_path)
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant", "user", "assistant"]
    # the reply after /set is the greedy 6-token one
    expected = ChatSession(model, tokenizer, do_sample=False, max_new_tokens=6)
    expected.turns = saved["messages"][:2]
    assert saved["messages"][3]["content"] == expected.reply("What is the capital of France?").text
    after_reset = json.loads(second.read_text())["messages"]
    assert after_reset[0] == {"role": "system", "content": "Answer in one sentence."}
    assert [m["role"] for m in after_reset] == ["system", "user", "assistant"]
    sampled = ChatSession(model, tokenizer, system="Answer in one sentence.", max_new_tokens=6, temperature=0.5,
                          top_k=3, seed=7)
    assert after_reset[2]["content"] == sampled.reply("Write a short poem about the sea.").text
    replies = [saved["messages"][1]["content"], saved["messages"][3]["content"], after_reset[2]["content"]]
    assert out == "".join(reply + "\n" for reply in replies)
    assert ("max_new_tokens=6 temperature=0.5 top_k=3 top_p=0.95 min_p=0.0 repetition_penalty=1.0 seed=7 "
            "greedy=off") in err
    assert "conversation cleared" in err and err.count("saved ") == 2


def test_chat_commands_and_mistakes(cli, tiny_instruct_path, tmp_path):
    script = "/help\n/bogus\n/set top_p=2\n/set top_k=many\n/save\n/save " + str(tmp_path / "no" / "x.json") + (
        "\n/save /proc/x.json\n/exit\nThis line is never read.\n"
    )
    code, out, err = cli("chat", "--model", str(tiny_instruct_path), "-n", "3", stdin=script)
    assert code == 0 and out == ""
    assert "/reset" in err and "/save FILE" in err  # the help
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 6 and "Traceback" not in err
    for error, needle in zip(errors, ("unknown command /bogus", "top_p must be in (0, 1]", "top_k takes a number",
                                      "/save needs a file", "there is no directory", "cannot write /proc/x.json"),
                             strict=True):
        assert needle in error


def test_chat_with_a_base_model_warns(cli, tiny_path):
    code, out, err = cli("chat", "--model", str(tiny_path), "-n", "3", stdin="Hi\n")
    assert code == 0 and out.count("\n") == 1
    assert "has no chat template" in err and "official OLMo 2" in err


def test_generate_chat_one_shot(cli, chat_model, tiny_instruct_path):
    model, tokenizer = chat_model
    system = "Answer in one sentence."
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}]
    expected = generate(model, tokenizer, messages=messages, do_sample=False, max_new_tokens=8).text
    code, out, _ = cli("generate", "Hi", "--system", system, "--model", str(tiny_instruct_path), "-n", "8",
                       "--greedy", "--json")
    assert code == 0 and json.loads(out)["text"] == expected
    code, streamed, _ = cli("generate", "--chat", "Hi", "--model", str(tiny_instruct_path), "-n", "8", "--greedy")
    user_only = generate(model, tokenizer, messages=messages[1:], do_sample=False, max_new_tokens=8).text
    assert code == 0 and streamed == user_only + "\n"


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(chat_model, tiny_instruct_path, tmp_path):
    transcript = tmp_path / "chat.json"
    chat = subprocess.Popen(
        [str(OLMO2KIT), "chat", "--model", str(tiny_instruct_path), "-n", "900", "--greedy"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        chat.stdin.write(b"Tell me a long story.\n")
        chat.stdin.flush()
        shown = os.read(chat.stdout.fileno(), 1)  # the reply has begun
        chat.send_signal(signal.SIGINT)
        time.sleep(0.2)
        chat.stdin.write(f"/save {transcript}\n".encode())
        chat.stdin.close()
        rest = chat.stdout.read()
        err = chat.stderr.read().decode()
        assert chat.wait(timeout=120) == 0, err
    finally:
        chat.kill()
    assert "[stopped]" in err and "Traceback" not in err
    messages = json.loads(transcript.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    partial = messages[1]["content"]
    assert (shown + rest).decode(errors="replace") == partial + "\n"
    model, tokenizer = chat_model
    longer = generate(model, tokenizer, messages=messages[:1], do_sample=False, max_new_tokens=60)
    assert longer.finish_reason == "length"  # so the reply was cut by Ctrl-C, not ended by the model
    assert len(partial) < len(longer.text) and longer.text.startswith(partial)


class _Chunk:
    """A reply chunk; reading its text can send SIGINT, as a Ctrl-C landing after the session yielded
    the chunk and before the REPL wrote it."""

    def __init__(self, text, interrupt=False):
        self._text, self.interrupt, self.finish_reason = text, interrupt, None

    @property
    def text(self):
        if self.interrupt:
            signal.raise_signal(signal.SIGINT)
        return self._text


def test_ctrl_c_after_a_chunk_is_yielded_still_shows_it_and_stops(capsys):
    from olmo2kit.cli.chat import _stream_reply

    yielded, closed = [], []

    def stream():
        try:
            for chunk in (_Chunk("Once "), _Chunk("upon ", interrupt=True), _Chunk("a time")):
                yielded.append(chunk._text)
                yield chunk
        finally:
            closed.append(True)

    before = signal.getsignal(signal.SIGINT)
    _stream_reply(stream())
    out, err = capsys.readouterr()
    assert out == "".join(yielded) + "\n" == "Once upon \n"  # what the session keeps is what was shown
    assert closed and "[stopped]" in err
    assert signal.getsignal(signal.SIGINT) is before  # the handler it found is back


def test_chat_refuses_a_reply_longer_than_the_context(cli, tiny_instruct_path):
    code, out, err = cli("chat", "--model", str(tiny_instruct_path), "-n", "100000", stdin="Hi\n")
    assert code == 2 and out == ""
    assert err.strip().splitlines()[-1] == ("error: the conversation (1 tokens) plus --max-new-tokens (100000) passes "
                                            "the model's 1024-token context: lower --max-new-tokens to 1023 or "
                                            "shorten the conversation")
