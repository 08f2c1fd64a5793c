"""`olmo2kit serve` under requests that used to harm others or break a promise, as a real process on loopback:
schemas that allow nothing beside a victim stream, heavy requests while /health answers, requests of more rows
than the queue holds, OpenAI's defaults and roles, log probabilities of byte tokens, and the APIs not served."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import openai
import pytest
from test_server import client_for
from test_server_faults import openai_error

import olmo2kit
from serving import serving

QUEUE = 6  # the hardened server's --max-queue
VICTIM_TOKENS = 200
CYCLIC = {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}


def nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def as_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


@pytest.fixture(scope="module")
def model(tiny_instruct_path) -> str:
    return str(tiny_instruct_path)


@pytest.fixture(scope="module")
def server(model):
    with serving("--model", model, "--dtype", "fp32", "--max-queue", str(QUEUE)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return client_for(server.url)


def chat(model: str, content: str = "Hi", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


# --- one request never fails or stalls another --------------------------------------------------------


def test_a_victim_stream_finishes_while_schemas_that_allow_nothing_arrive(server, client, model, tiny_instruct):
    """A schema that can never be met is a 400 before it is queued, and the stream beside it is untouched."""
    tiny_model, tokenizer = tiny_instruct
    prompt = "Once upon a time"
    alone = olmo2kit.generate(tiny_model, tokenizer, prompt, do_sample=False, max_new_tokens=VICTIM_TOKENS)
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=VICTIM_TOKENS, temperature=0,
                                       stream=True)
    pieces = [next(iter(stream)).choices[0].text]  # the victim runs
    hostile = [CYCLIC, {"type": []}, {"enum": []}, {"not": {"type": "string"}},
               {"type": "object", "properties": {"a": CYCLIC}, "required": ["a"]}]
    for schema in hostile:
        body = chat(model, response_format=as_format(schema), max_tokens=8)
        error = openai_error(httpx.post(server.url + "/chat/completions", json=body, timeout=30), 400)
        assert error["param"] == "response_format", error
    pieces += [chunk.choices[0].text for chunk in stream]
    assert "".join(pieces) == alone.text


def test_health_answers_within_a_second_while_heavy_requests_run(server, model):
    """Parsing, tokenizing and compiling run off the event loop, and a prompt that cannot fit the context is
    refused before it is tokenized whole."""
    heavy = [
        chat(model, response_format=as_format(nested(450)), max_tokens=8),
        {"model": model, "prompt": "x " * 2_000_000, "max_tokens": 1},  # 4 MB of text, far past the context
        {"model": model, "prompt": list(range(200)) * 10_000, "max_tokens": 1},  # 2 M token ids of JSON
        chat(model, "word " * 800_000, max_tokens=1),
    ]
    done = threading.Event()
    latencies: list[float] = []

    def poll():
        while not done.is_set():
            start = time.perf_counter()
            assert httpx.get(server.root + "/health", timeout=30).status_code == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    answers = []
    try:
        with ThreadPoolExecutor(len(heavy) * 2) as pool:
            paths = ["/chat/completions" if "messages" in body else "/completions" for body in heavy]
            # Rounds go on until /health was asked at least 3 times while they ran: a fast machine is done with
            # one round before the poller has asked 3 times.
            for _ in range(10):
                answers += pool.map(lambda p, b: httpx.post(server.url + p, json=b, timeout=120), paths * 2,
                                    heavy * 2)
                if len(latencies) >= 3:
                    break
    finally:
        done.set()
        poller.join()
    for answer in answers:
        error = openai_error(answer, 400)
        assert error["param"] in ("prompt", "messages", "response_format"), error
    assert len(latencies) >= 3 and max(latencies) < 1.0, latencies


def test_a_prompt_that_cannot_fit_is_refused_before_it_is_tokenized(server, model):
    start = time.perf_counter()
    error = openai_error(httpx.post(server.url + "/completions", json={"model": model, "prompt": "ab " * 1_300_000},
                                    timeout=60), 400)
    assert time.perf_counter() - start < 2.0
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt", error


def test_a_request_of_more_rows_than_the_queue_holds_is_a_400_saying_the_limit(server, client, model):
    """Not a 503 to retry forever: it could never be queued whole."""
    for body in ({"model": model, "prompt": "Hi", "n": QUEUE + 1}, {"model": model, "prompt": ["a", "b"], "n": 4},
                 {"model": model, "prompt": ["x"] * (QUEUE + 1)}):
        error = openai_error(httpx.post(server.url + "/completions", json=body, timeout=30), 400)
        assert str(QUEUE) in error["message"] and error["code"] == "too_many_rows", error
    error = openai_error(httpx.post(server.url + "/chat/completions", json=chat(model, n=QUEUE + 1), timeout=30), 400)
    assert error["param"] == "n", error
    reply = client.completions.create(model=model, prompt=["a", "b", "c"], n=2, max_tokens=2)  # 6 rows fit
    assert len(reply.choices) == 6


def test_the_context_length_400_names_the_field_to_change(server, model, tiny_instruct_path):
    context = json.loads((tiny_instruct_path / "config.json").read_text())["max_position_embeddings"]
    cases = [("/completions", {"prompt": [5] * 10, "max_tokens": context}, "max_tokens"),
             ("/completions", {"prompt": [5] * (context + 3)}, "prompt"),
             ("/completions", {"prompt": "a b " * context, "max_tokens": 1}, "prompt"),
             ("/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": context},
              "max_tokens"),
             ("/chat/completions", {"messages": [{"role": "user", "content": "a b " * context}]}, "messages")]
    for path, body, param in cases:
        error = openai_error(httpx.post(server.url + path, json={"model": model, **body}, timeout=30), 400)
        assert error["code"] == "context_length_exceeded" and error["param"] == param, (path, error)


# --- OpenAI's defaults, roles and APIs ----------------------------------------------------------------


def test_completion_max_tokens_null_means_16(server, model):
    body = {"model": model, "prompt": "The", "temperature": 0, "max_tokens": None}
    null = httpx.post(server.url + "/completions", json=body, timeout=60).json()
    left_out = httpx.post(server.url + "/completions", json={k: v for k, v in body.items() if k != "max_tokens"},
                          timeout=60).json()
    assert null["usage"]["completion_tokens"] <= 16
    assert null["choices"][0]["text"] == left_out["choices"][0]["text"]
    assert null["usage"] == left_out["usage"]


def test_stream_options_without_stream_is_a_400(server, model):
    for extra in ({}, {"stream": False}):
        body = {"model": model, "prompt": "The", "stream_options": {"include_usage": True}, **extra}
        error = openai_error(httpx.post(server.url + "/completions", json=body, timeout=30), 400)
        assert error["param"] == "stream_options", error
    body = chat(model, stream_options={"include_usage": True})
    assert openai_error(httpx.post(server.url + "/chat/completions", json=body, timeout=30), 400)["param"] == \
        "stream_options"


def test_the_developer_role_is_the_system_role(client, model):
    def reply(role: str):
        messages = [{"role": role, "content": "Answer briefly."}, {"role": "user", "content": "What is OLMo?"}]
        answer = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=12)
        return answer.choices[0].message.content, answer.usage.prompt_tokens

    assert reply("developer") == reply("system")


@pytest.mark.parametrize("path", ["/embeddings", "/responses", "/fine_tuning/jobs", "/images/generations"])
def test_apis_not_served_are_400s_saying_so(server, model, path):
    error = openai_error(httpx.post(server.url + path, json={"model": model, "input": "Hi"}, timeout=30), 400)
    assert "not supported" in error["message"] and error["code"] == "unsupported_api", error


def test_the_openai_client_gets_the_refusal_of_embeddings(client, model):
    with pytest.raises(openai.BadRequestError, match="embeddings API is not supported"):
        client.embeddings.create(model=model, input="Hi")


# --- log probabilities of byte tokens -----------------------------------------------------------------


def test_twenty_top_logprobs_are_twenty_distinct_tokens(client, model):
    """Tokens holding part of a character used to share the key U+FFFD, so 20 asked gave fewer, and a lower
    value could overwrite the chosen token's."""
    reply = client.completions.create(model=model, prompt="Ünïcödé ✓ → 日本", max_tokens=24, temperature=0,
                                      logprobs=20, echo=True)
    logprobs = reply.choices[0].logprobs
    named_bytes = 0
    for i, (name, value, top) in enumerate(zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs,
                                               strict=True)):
        if i == 0:
            continue
        assert len(top) == 20, (i, top)
        if value >= min(top.values()):  # the token is among the likeliest 20 (always, where greedy chose it)
            assert name in top and top[name] == pytest.approx(value, abs=1e-6), (i, name, value, top)
        named_bytes += sum(key.startswith("bytes:") for key in top)
    assert named_bytes > 0  # byte tokens were among the alternatives: the case the names exist for
    assert all(len(set(top)) == len(top) for top in logprobs.top_logprobs[1:])


def test_chat_logprobs_carry_each_tokens_own_bytes(client, model):
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "日本語で ✓"}],
                                           max_tokens=32, temperature=1, seed=3, logprobs=True, top_logprobs=20)
    content = reply.choices[0].logprobs.content
    assert content
    for entry in content:
        assert len({t.token for t in entry.top_logprobs}) == 20
        assert all(alternative.bytes is not None for alternative in entry.top_logprobs)
        mine = next(t for t in entry.top_logprobs if t.token == entry.token) if entry.logprob >= min(
            t.logprob for t in entry.top_logprobs) else None
        assert mine is None or mine.bytes == entry.bytes
    joined = b"".join(bytes(entry.bytes) for entry in content)  # the reply's own bytes, not U+FFFD's
    assert joined.decode("utf-8", "replace").startswith(reply.choices[0].message.content)
