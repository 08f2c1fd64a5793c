"""`olmo2kit serve` as a real process, driven by the official `openai` client: models and health, completions
(prompt shapes, n, stop, usage), parity of greedy text and logprobs with `olmo2kit.generate` and a direct
transformers forward (fp32, to 1e-5), chat (plain, streamed, logprobs, response_format), two revisions of one
Hub repo side by side on the loopback Hub, and the API key."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

import olmo2kit
from serving import SCHEMA, assert_fits_schema, serving

PROMPTS = ["Language modeling is", "The capital of France is", "Hello, world! How are"]
NEW = 12  # new tokens per parity request: enough to pass through a few decode steps of the batch
LOGPROB_TOLERANCE = 1e-5
MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]
HUB_REPO = "allenai/OLMo-2-0425-1B"
EARLY, LATE = "stage1-step1000-tokens3B", "stage1-step2000-tokens5B"
KEY = "secret-key-3f9a"


def client_for(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)


def get(url: str, headers: dict | None = None) -> tuple[int, dict]:
    """GET `url` without the openai client: (status, JSON body)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt, return_token_type_ids=False)["input_ids"]


def direct_logprobs(model, ids: list[int]):
    """log_softmax of a plain transformers forward over `ids` ([positions, vocab]): row i scores token i + 1."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def token_bytes(tokenizer, token: int) -> bytes:
    """A token's own bytes, as xgrammar reads the vocabulary (a source apart from the server's)."""
    import xgrammar

    info = _VOCABULARIES.get(id(tokenizer))
    if info is None:
        info = _VOCABULARIES[id(tokenizer)] = xgrammar.TokenizerInfo.from_huggingface(tokenizer).decoded_vocab
    return info[token]


_VOCABULARIES: dict[int, list[bytes]] = {}


def token_name(tokenizer, token: int) -> str:
    """How OpenAI names a token in logprobs: its text, or `bytes:\\xNN...` when it is not whole UTF-8."""
    data = token_bytes(tokenizer, token)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def text_of(names: list[str]) -> str:
    """The text of tokens given by their logprob names (`bytes:\\xNN` for a token that is not whole UTF-8)."""
    data = b"".join(bytes.fromhex(n[6:].replace("\\x", "")) if n.startswith("bytes:") else n.encode()
                    for n in names)
    return data.decode("utf-8", "replace")


def assert_top_logprobs(served: dict[str, float], row, tokenizer, k: int) -> None:
    """`served` (token name -> logprob) holds the k likeliest tokens of `row`, each under its own name."""
    values, indices = row.topk(k)
    expected = {token_name(tokenizer, t): lp for t, lp in zip(indices.tolist(), values.tolist(), strict=True)}
    assert len(served) == k and set(served) == set(expected), (served, expected)
    for name, logprob in served.items():
        assert logprob == pytest.approx(expected[name], abs=LOGPROB_TOLERANCE), name


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return client_for(server.url)


@pytest.fixture(scope="module")
def base(tiny_path) -> str:
    """The served id of the tiny checkpoint: a directory named by an absolute path is served under its folder's
    name, never the server's path."""
    return tiny_path.name


@pytest.fixture(scope="module")
def chat_server(tiny_instruct_path):
    with serving("--model", str(tiny_instruct_path), "--dtype", "fp32") as running:
        yield running


@pytest.fixture(scope="module")
def chat(chat_server) -> openai.OpenAI:
    return client_for(chat_server.url)


@pytest.fixture(scope="module")
def instruct(tiny_instruct_path) -> str:
    return str(tiny_instruct_path)


# Models and health


def test_models_lists_the_served_id_and_health_answers(server, client, base):
    assert [m.id for m in client.models.list().data] == [base]
    assert get(server.root + "/health") == (200, {"status": "ok"})


# Completions


def greedy(client, model: str, prompt, **options):
    return client.completions.create(model=model, prompt=prompt, temperature=0, **{"max_tokens": NEW, **options})


def test_every_prompt_shape_gives_the_greedy_text_of_each_prompt(client, base, tiny):
    model, tokenizer = tiny
    expected = [olmo2kit.generate(model, tokenizer, p, do_sample=False, max_new_tokens=NEW).text for p in PROMPTS]
    ids = [prompt_ids(tokenizer, p) for p in PROMPTS]

    assert greedy(client, base, PROMPTS[0]).choices[0].text == expected[0]
    assert greedy(client, base, ids[0]).choices[0].text == expected[0]
    for prompt in (PROMPTS, ids):
        reply = greedy(client, base, prompt)
        assert [c.index for c in reply.choices] == [0, 1, 2]
        assert [c.text for c in reply.choices] == expected
        assert reply.usage.prompt_tokens == sum(len(row) for row in ids)


def test_n_choices_with_a_seed_are_indexed_and_reproducible(client, base, tiny):
    def sample():
        return client.completions.create(model=base, prompt=PROMPTS[0], n=3, seed=1234, max_tokens=8, logprobs=0)

    first = sample()
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.text for c in first.choices]
    assert len(set(texts)) > 1  # each choice samples with its own generator
    assert [c.text for c in sample().choices] == texts
    assert first.usage.prompt_tokens == len(prompt_ids(tiny[1], PROMPTS[0]))  # the prompt counts once
    assert first.usage.completion_tokens == sum(len(c.logprobs.token_logprobs) for c in first.choices)


def test_stop_cuts_the_text_before_the_stop_string(client, base, tiny):
    _, tokenizer = tiny
    full = greedy(client, base, PROMPTS[1], max_tokens=24).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop, full
    reply = greedy(client, base, PROMPTS[1], max_tokens=24, stop=[stop], logprobs=1)
    choice = reply.choices[0]
    assert choice.text == full[: full.find(stop)]
    assert choice.finish_reason == "stop"
    assert reply.usage.prompt_tokens == len(prompt_ids(tokenizer, PROMPTS[1]))
    assert reply.usage.completion_tokens == len(choice.logprobs.token_logprobs)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # the tokens kept are those whose text reaches the stop string, no more
    assert text_of(choice.logprobs.tokens).startswith(choice.text)
    assert stop in text_of(choice.logprobs.tokens)
    assert stop not in text_of(choice.logprobs.tokens[:-1])
    streamed = greedy(client, base, PROMPTS[1], max_tokens=24, stop=[stop], stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == choice.text


# Parity with olmo2kit.generate and a direct forward


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_text_and_logprobs_equal_generate_and_a_direct_forward(client, base, tiny, prompt):
    model, tokenizer = tiny
    expected = olmo2kit.generate(model, tokenizer, prompt, do_sample=False, max_new_tokens=NEW)
    reply = greedy(client, base, prompt, logprobs=3)
    choice = reply.choices[0]
    assert choice.text == expected.text
    assert choice.finish_reason == expected.finish_reason

    ids = prompt_ids(tokenizer, prompt)
    rows = direct_logprobs(model, ids + expected.token_ids)
    logprobs = choice.logprobs
    assert len(logprobs.token_logprobs) == len(expected.token_ids) == reply.usage.completion_tokens
    assert logprobs.tokens == [token_name(tokenizer, t) for t in expected.token_ids]
    for k, token in enumerate(expected.token_ids):
        row = rows[len(ids) - 1 + k]
        assert logprobs.token_logprobs[k] == pytest.approx(row[token].item(), abs=LOGPROB_TOLERANCE)
        assert_top_logprobs(logprobs.top_logprobs[k], row, tokenizer, 3)


def test_requests_joining_a_running_batch_each_get_their_greedy_text_and_logprobs(client, base, tiny):
    model, tokenizer = tiny
    prompts = [*PROMPTS, "A", "The quick brown fox jumps over the lazy dog. 0 1 2 3"]
    lengths = [30, 5, 17, 40, 9]  # rows of every prompt length join and leave at different steps
    with ThreadPoolExecutor(len(prompts)) as pool:
        replies = list(pool.map(lambda p, n: greedy(client, base, p, max_tokens=n, logprobs=0), prompts, lengths))
    for prompt, length, reply in zip(prompts, lengths, replies, strict=True):
        expected = olmo2kit.generate(model, tokenizer, prompt, do_sample=False, max_new_tokens=length)
        assert reply.choices[0].text == expected.text
        ids = prompt_ids(tokenizer, prompt)
        rows = direct_logprobs(model, ids + expected.token_ids)
        assert reply.choices[0].logprobs.token_logprobs == pytest.approx(
            [rows[len(ids) - 1 + k, t].item() for k, t in enumerate(expected.token_ids)], abs=LOGPROB_TOLERANCE)


def test_echo_scores_the_prompt_as_lm_eval_asks(client, base, tiny):
    model, tokenizer = tiny
    prompt = "Language modeling is the task of predicting the next word"
    ids = prompt_ids(tokenizer, prompt)
    rows = direct_logprobs(model, ids)
    reply = client.completions.create(model=base, prompt=prompt, echo=True, max_tokens=0, logprobs=1, temperature=0)
    choice = reply.choices[0]
    assert choice.text == prompt
    logprobs = choice.logprobs
    assert logprobs.tokens == [token_name(tokenizer, t) for t in ids]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert len(logprobs.token_logprobs) == len(ids)
    for i in range(1, len(ids)):
        assert logprobs.token_logprobs[i] == pytest.approx(rows[i - 1, ids[i]].item(), abs=LOGPROB_TOLERANCE)
        assert_top_logprobs(logprobs.top_logprobs[i], rows[i - 1], tokenizer, 1)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), 0)


def test_echo_with_new_tokens_gives_the_prompt_then_the_continuation(client, base, tiny):
    model, tokenizer = tiny
    expected = olmo2kit.generate(model, tokenizer, PROMPTS[0], do_sample=False, max_new_tokens=4)
    ids = prompt_ids(tokenizer, PROMPTS[0])
    rows = direct_logprobs(model, ids + expected.token_ids)
    choice = greedy(client, base, PROMPTS[0], echo=True, max_tokens=4, logprobs=0).choices[0]
    assert choice.text == PROMPTS[0] + expected.text
    assert choice.logprobs.token_logprobs[0] is None
    served = choice.logprobs.token_logprobs[1:]
    assert served == pytest.approx([rows[i, t].item() for i, t in enumerate((ids + expected.token_ids)[1:])],
                                   abs=LOGPROB_TOLERANCE)


# Chat


def test_chat_reply_equals_generate(chat, instruct, tiny_instruct):
    model, tokenizer = tiny_instruct
    expected = olmo2kit.generate(model, tokenizer, messages=MESSAGES, do_sample=False, max_new_tokens=NEW)
    reply = chat.chat.completions.create(model=instruct, messages=MESSAGES, temperature=0, max_tokens=NEW)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == expected.new_tokens


def test_chat_stream_joins_to_the_reply_and_ends_with_usage(chat, instruct):
    whole = chat.chat.completions.create(model=instruct, messages=MESSAGES, temperature=0, max_tokens=NEW)
    chunks = list(chat.chat.completions.create(model=instruct, messages=MESSAGES, temperature=0, max_tokens=NEW,
                                               stream=True, stream_options={"include_usage": True}))
    *pieces, last = chunks
    assert pieces and all(len(c.choices) == 1 for c in pieces)
    assert pieces[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in pieces[1:])  # the role comes once, as OpenAI sends it
    assert "".join(c.choices[0].delta.content or "" for c in pieces) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in pieces][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in pieces[:-1])
    assert len({c.id for c in chunks}) == 1
    assert last.choices == []
    assert last.usage.model_dump() == whole.usage.model_dump()


def test_chat_stream_without_usage_ends_on_the_last_choice_chunk(chat, instruct):
    chunks = list(chat.chat.completions.create(model=instruct, messages=MESSAGES, temperature=0, max_tokens=4,
                                               stream=True))
    assert chunks and all(len(c.choices) == 1 and c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason is not None


def test_chat_logprobs_equal_a_direct_forward(chat, instruct, tiny_instruct):
    from olmo2kit.model.chat_template import encode_chat

    model, tokenizer = tiny_instruct
    expected = olmo2kit.generate(model, tokenizer, messages=MESSAGES, do_sample=False, max_new_tokens=NEW)
    reply = chat.chat.completions.create(model=instruct, messages=MESSAGES, temperature=0, max_tokens=NEW,
                                         logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert len(content) == len(expected.token_ids) == reply.usage.completion_tokens
    ids = encode_chat(tokenizer, MESSAGES)
    rows = direct_logprobs(model, ids + expected.token_ids)
    for k, (entry, token) in enumerate(zip(content, expected.token_ids, strict=True)):
        row = rows[len(ids) - 1 + k]
        assert entry.token == token_name(tokenizer, token)
        assert entry.bytes == list(token_bytes(tokenizer, token))
        assert entry.logprob == pytest.approx(row[token].item(), abs=LOGPROB_TOLERANCE)
        values, indices = row.topk(2)
        assert [t.token for t in entry.top_logprobs] == [token_name(tokenizer, t) for t in indices.tolist()]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(values.tolist(), abs=LOGPROB_TOLERANCE)


def test_json_schema_reply_fits_the_schema(chat, instruct):
    reply = chat.chat.completions.create(
        model=instruct, messages=[{"role": "user", "content": "Describe a thing as JSON."}], temperature=0,
        max_tokens=200, response_format={"type": "json_schema",
                                         "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}})
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert_fits_schema(choice.message.content)


def test_json_object_reply_is_a_json_object(chat, instruct):
    reply = chat.chat.completions.create(
        model=instruct, messages=[{"role": "user", "content": "Answer in JSON."}], temperature=0, max_tokens=200,
        response_format={"type": "json_object"})
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(json.loads(choice.message.content), dict)


# Two revisions of one Hub repo


def test_two_revisions_side_by_side(hub, hub_env, tiny_path, tiny, tmp_path):
    from olmo2kit.model.loading import load
    from olmo2kit.model.tiny import build_tiny

    late_path = build_tiny(tmp_path / "seed1", seed=1)
    before = hub.repos.get(HUB_REPO)
    hub.add_repo(HUB_REPO, {EARLY: tiny_path, LATE: late_path})
    early, late = f"{HUB_REPO}@{EARLY}", f"{HUB_REPO}@{LATE}"
    try:
        with serving("-m", early, "-m", late, "--dtype", "fp32", env=hub_env) as running:
            client = client_for(running.url)
            assert sorted(m.id for m in client.models.list().data) == sorted([early, late])
            texts = {name: greedy(client, name, PROMPTS[0]).choices[0].text for name in (early, late)}
            with pytest.raises(openai.NotFoundError) as missing:
                greedy(client, f"{HUB_REPO}@stage1-step3000-tokens7B", PROMPTS[0])
    finally:
        if before is None:
            hub.repos.pop(HUB_REPO)
        else:
            hub.repos[HUB_REPO] = before
    assert texts[early] != texts[late]
    for name, checkpoint in ((early, tiny), (late, load(str(late_path), dtype="fp32", device="cpu"))):
        assert texts[name] == olmo2kit.generate(*checkpoint, PROMPTS[0], do_sample=False, max_new_tokens=NEW).text
    assert missing.value.status_code == 404
    assert early in missing.value.message and late in missing.value.message


def test_a_model_not_served_is_a_404_naming_the_nearest(client, base):
    with pytest.raises(openai.NotFoundError) as missing:
        greedy(client, base + "x", PROMPTS[0])
    assert base in missing.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="1b-instruct", messages=MESSAGES)


# The API key


@pytest.fixture(scope="module")
def keyed_server(tiny_path):
    with serving("--model", str(tiny_path), "--dtype", "fp32", env={"OLMO2KIT_API_KEY": KEY}) as running:
        yield running


def test_api_key(keyed_server, base):
    right = client_for(keyed_server.url, KEY)
    assert [m.id for m in right.models.list().data] == [base]
    assert right.completions.create(model=base, prompt=PROMPTS[0], max_tokens=2).choices[0].text
    for wrong in ("wrong", KEY + "x", KEY[:-1]):
        with pytest.raises(openai.AuthenticationError) as refused:
            client_for(keyed_server.url, wrong).completions.create(model=base, prompt=PROMPTS[0], max_tokens=2)
        assert refused.value.status_code == 401
    assert get(keyed_server.url + "/models")[0] == 401  # no key at all
    assert get(keyed_server.url + "/models", {"Authorization": KEY})[0] == 401  # not a bearer token
    assert get(keyed_server.root + "/health") == (200, {"status": "ok"})
    keyed_server.stop()
    assert KEY not in "".join(keyed_server.stderr)
