"""`olmo2kit serve --engine llamacpp` as a real process, driven by the official `openai` client: requests decoded
together each get the text they get alone; logprobs (generated tokens, an echoed prompt, a chat) equal llama.cpp's
own and transformers'; response_format holds, and what olmo2kit refuses is refused; a client that leaves frees its
batch slot; SIGTERM ends as on the other engines; lm-eval's `local-completions` scores a task as on transformers;
and with --preload the weights are loaded before the server says where it listens."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx
import numpy as np
import openai
import pytest
import torch

from llamacpp_engine.conftest import THREADS, serving_llamacpp
from serving import SCHEMA, Server, assert_fits_schema

# An f32 GGUF runs exactly (model.llamacpp.attention_options): llama.cpp's log-probabilities through the API are its
# own to rounding, and transformers' fp32 ones within LOGPROB_TOLERANCE (measured ~1e-6 on the tiny checkpoint).
OWN_TOLERANCE = 1e-5
LOGPROB_TOLERANCE = 1e-3
# New tokens that hold a batch slot of the 16384-position `tiny_instruct_long_path` for tens of seconds, and prompts
# whose greedy replies run to LONG tokens without the end of text (checked once; other prompts' replies end early).
LONG = 15000
HOLDING = [f"{n} Hello" for n in (0, 1, 2, 3, 5, 6, 7, 10, 11, 13, 14, 16, 17, 19, 20, 23)] + ["Hello world"]
MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]
TASKS = Path(__file__).parents[1] / "evals" / "lm_eval_tasks"
TASK = "olmo2kit_tiny_mc"  # 8 questions from a local file
_RUNNING = re.compile(r'^olmo2kit_running_rows\{model="[^"]*"\} (\S+)$', re.M)
_WAITING = re.compile(r'^olmo2kit_queue_depth\{model="[^"]*"\} (\S+)$', re.M)
_LOADED = re.compile(r"^loaded .* in ([\d.]+) s$", re.M)


def client_for(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def client(llamacpp_server) -> openai.OpenAI:
    return client_for(llamacpp_server)


@pytest.fixture(scope="module")
def name(tiny_instruct_long_path) -> str:
    return tiny_instruct_long_path.name  # a directory named by an absolute path is served under its folder's name


@pytest.fixture(scope="module")
def gguf(llamacpp_server, tiny_instruct_long_path):
    """The f32 GGUF the server runs (converted by its start into this run's GGUF cache)."""
    from olmo2kit.model.gguf import gguf_file

    return gguf_file(str(tiny_instruct_long_path), gguf_type="f32", say=lambda _: None)


# --- token names and the two references ---------------------------------------------------------------------


def token_names(tokenizer) -> list[str]:
    """How OpenAI names each token of the vocabulary in logprobs: its text, or `bytes:\\xNN...` when it is not whole
    UTF-8 (its bytes as xgrammar reads the vocabulary, a source apart from the server's)."""
    import xgrammar

    names = []
    for data in xgrammar.TokenizerInfo.from_huggingface(tokenizer).decoded_vocab:
        try:
            names.append(data.decode("utf-8"))
        except UnicodeDecodeError:
            names.append("bytes:" + "".join(f"\\x{b:02x}" for b in data))
    return names


@pytest.fixture(scope="module")
def vocabulary(tiny_instruct):
    """(token id -> name, name -> token id) of the tiny vocabulary, whose names are distinct."""
    names = token_names(tiny_instruct[1])
    ids = {n: i for i, n in enumerate(names)}
    assert len(ids) == len(names)
    return names, ids


def llama_logprobs(gguf, ids: list[int]) -> torch.Tensor:
    """llama.cpp's own log-probabilities at every position of `ids` ([positions, vocab], row i scores token i + 1):
    llama-cpp-python's `Llama` over the GGUF, run as the engine runs an f32 GGUF, every position's logits kept."""
    from llama_cpp import Llama

    from olmo2kit.model.llamacpp import attention_options

    llama = Llama(model_path=str(gguf), n_ctx=1024, n_threads=THREADS, n_batch=512, logits_all=True, verbose=False,
                  **attention_options("f32"))
    try:
        llama.eval(ids)
        return torch.log_softmax(torch.from_numpy(np.array(llama.scores[: len(ids)])), dim=-1)
    finally:
        llama.close()


def transformers_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def assert_logprobs(served: float, row: int, token: int, own: torch.Tensor, theirs: torch.Tensor) -> None:
    assert served == pytest.approx(own[row, token].item(), abs=OWN_TOLERANCE)
    assert served == pytest.approx(theirs[row, token].item(), abs=LOGPROB_TOLERANCE)


def assert_top(served: list[tuple[str, float]], row: int, own, theirs, vocabulary, k: int) -> None:
    """`served` ((name, logprob), likeliest first) is llama.cpp's own top k at `row`, each also transformers'."""
    names, ids = vocabulary
    values, indices = own[row].topk(k)
    assert [n for n, _ in served] == [names[i] for i in indices.tolist()]
    assert [lp for _, lp in served] == pytest.approx(values.tolist(), abs=OWN_TOLERANCE)
    assert [lp for _, lp in served] == pytest.approx([theirs[row, ids[n]].item() for n, _ in served],
                                                     abs=LOGPROB_TOLERANCE)


# --- requests decoded together ------------------------------------------------------------------------------


def concurrent_bodies(tokenizer) -> list[dict]:
    """16 greedy completions: distinct prompts (some sharing a start) of 1 to over 512 tokens (one llama.cpp step
    reads at most 512: that prompt is read over two steps beside rows that decode), each with its own length."""
    subjects = ["The sea", "A transformer", "Paris", "The quick brown fox", "OLMo 2", "Language modeling",
                "Hello, world!", "Numbers 1 2 3"]
    prompts = [s + e for s in subjects for e in (" is", " and")][:14] + ["A", "The sea is wide. " * 80]
    lengths = [40 + 23 * i for i in range(16)]
    long_prompt = len(tokenizer(prompts[-1])["input_ids"])
    assert long_prompt > 512, long_prompt
    return [{"prompt": p, "max_tokens": n, "temperature": 0} for p, n in zip(prompts, lengths, strict=True)]


async def stream_together(server: Server, name: str, bodies: list[dict]) -> tuple[list[tuple[str, str]], int]:
    """Each body streamed at once by AsyncOpenAI: (its text, its finish reason), and the most rows /metrics saw
    decoding at one time meanwhile."""
    client = openai.AsyncOpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)
    done = asyncio.Event()
    peak = 0

    async def one(body: dict) -> tuple[str, str]:
        pieces, finish = [], None
        async for chunk in await client.completions.create(model=name, stream=True, **body):
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        return "".join(pieces), finish

    async def watch() -> None:
        nonlocal peak
        async with httpx.AsyncClient(timeout=10) as http:
            while not done.is_set():
                metrics = (await http.get(server.root + "/metrics")).text
                peak = max(peak, int(float(_RUNNING.search(metrics).group(1))))
                await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        replies = await asyncio.gather(*(one(body) for body in bodies))
    finally:
        done.set()
        await watcher
        await client.close()
    return replies, peak


def test_sixteen_streams_at_once_each_get_the_text_they_get_alone(llamacpp_server, client, name, tiny_instruct):
    bodies = concurrent_bodies(tiny_instruct[1])
    alone = []
    for body in bodies:
        choice = client.completions.create(model=name, **body).choices[0]
        alone.append((choice.text, choice.finish_reason))
    together, peak = asyncio.run(stream_together(llamacpp_server, name, bodies))
    assert together == alone
    assert peak >= 12  # the requests were decoded together, not one after another
    assert len({text for text, _ in alone}) == len(bodies)  # distinct answers: a row given another's is seen


# --- logprobs -----------------------------------------------------------------------------------------------


def test_completion_logprobs_equal_llama_cpps_own_and_transformers(client, name, gguf, tiny_instruct, vocabulary):
    model, tokenizer = tiny_instruct
    ids = tokenizer("Language modeling is")["input_ids"]
    choice = client.completions.create(model=name, prompt=ids, max_tokens=12, temperature=0, logprobs=5).choices[0]
    logprobs = choice.logprobs
    new = [vocabulary[1][n] for n in logprobs.tokens]
    assert len(new) == 12 and choice.finish_reason == "length"
    every = ids + new
    own, theirs = llama_logprobs(gguf, every), transformers_logprobs(model, every)
    for k, token in enumerate(new):
        row = len(ids) - 1 + k
        assert token == own[row].argmax().item()  # greedy on llama.cpp's own logits
        assert_logprobs(logprobs.token_logprobs[k], row, token, own, theirs)
        assert_top(list(logprobs.top_logprobs[k].items()), row, own, theirs, vocabulary, 5)


def test_echo_scores_the_prompt_as_llama_cpp_and_transformers(client, name, gguf, tiny_instruct, vocabulary):
    model, tokenizer = tiny_instruct
    prompt = "Language modeling is the task of predicting the next word, 123 times."
    ids = tokenizer(prompt)["input_ids"]
    reply = client.completions.create(model=name, prompt=prompt, echo=True, max_tokens=0, logprobs=5, temperature=0)
    choice = reply.choices[0]
    assert choice.text == prompt
    logprobs = choice.logprobs
    assert logprobs.tokens == [vocabulary[0][t] for t in ids]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert len(logprobs.token_logprobs) == len(ids) > 10
    own, theirs = llama_logprobs(gguf, ids), transformers_logprobs(model, ids)
    for i in range(1, len(ids)):
        assert_logprobs(logprobs.token_logprobs[i], i - 1, ids[i], own, theirs)
        assert_top(list(logprobs.top_logprobs[i].items()), i - 1, own, theirs, vocabulary, 5)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), 0)


def test_chat_logprobs_equal_llama_cpps_own_and_transformers(client, name, gguf, tiny_instruct, vocabulary):
    from olmo2kit.model.chat_template import encode_chat

    model, tokenizer = tiny_instruct
    reply = client.chat.completions.create(model=name, messages=MESSAGES, temperature=0, max_tokens=12,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    new = [vocabulary[1][entry.token] for entry in content]
    assert len(new) == reply.usage.completion_tokens > 0
    ids = encode_chat(tokenizer, MESSAGES)
    assert reply.usage.prompt_tokens == len(ids)
    own, theirs = llama_logprobs(gguf, ids + new), transformers_logprobs(model, ids + new)
    for k, (entry, token) in enumerate(zip(content, new, strict=True)):
        row = len(ids) - 1 + k
        assert token == own[row].argmax().item()
        assert_logprobs(entry.logprob, row, token, own, theirs)
        assert_top([(t.token, t.logprob) for t in entry.top_logprobs], row, own, theirs, vocabulary, 3)


# --- response_format ----------------------------------------------------------------------------------------


def test_json_schema_and_json_object_replies_hold(client, name):
    reply = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Describe a thing as JSON."}], temperature=0,
        max_tokens=200, response_format={"type": "json_schema",
                                         "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}})
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert_fits_schema(choice.message.content)
    reply = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Answer in JSON."}], temperature=0, max_tokens=200,
        response_format={"type": "json_object"})
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(json.loads(choice.message.content), dict)


@pytest.mark.parametrize("schema", [{"type": "string", "minLength": 5, "maxLength": 2},
                                    {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}},
                                    {"type": "string", "not": {"const": "a"}}])
def test_a_schema_olmo2kit_refuses_is_refused_as_on_transformers(llamacpp_server, name, tiny_instruct, schema):
    from olmo2kit.errors import Olmo2KitError
    from olmo2kit.server.grammar import constraint_factory

    response_format = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    model, tokenizer = tiny_instruct
    with pytest.raises(Olmo2KitError) as on_transformers:
        constraint_factory(response_format, tokenizer, model.config.vocab_size, {tokenizer.eos_token_id})
    response = httpx.post(llamacpp_server.url + "/chat/completions", timeout=30, json={
        "model": name, "messages": [{"role": "user", "content": "JSON"}], "max_tokens": 8,
        "response_format": response_format})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["message"], error["param"], error["type"]) == (
        str(on_transformers.value), "response_format", "invalid_request_error")


# --- lm-eval through the server -----------------------------------------------------------------------------


def test_lm_eval_local_completions_scores_as_transformers(llamacpp_server, name, tiny_instruct,
                                                          tiny_instruct_long_path, monkeypatch):
    """lm-eval's own client (echo and logprobs over token ids) against the llama.cpp server, and lm-eval's HFLM on
    the same checkpoint in memory: the same accuracies, and each answer's loglikelihood within the tolerance."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tokenizer = tiny_instruct
    # the task of the local folder alone: indexing lm-eval's thousands of own tasks takes 15 s here
    tasks = TaskManager(include_path=str(TASKS), include_defaults=False)
    served = {"model": name, "base_url": f"{llamacpp_server.url}/completions",
              "tokenizer": str(tiny_instruct_long_path), "tokenizer_backend": "huggingface", "tokenized_requests": True,
              "num_concurrent": 4}

    def scores(lm, **options) -> tuple[dict, list[list[float]]]:
        """The task's results, and the loglikelihood of each answer of each question."""
        out = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=tasks, log_samples=True, **options)
        samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
        return out["results"][TASK], [[ll for ll, _ in s["filtered_resps"]] for s in samples]

    ours, our_answers = scores("local-completions", model_args=served)
    theirs, their_answers = scores(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1))
    assert (ours["acc,none"], ours["acc_norm,none"]) == (theirs["acc,none"], theirs["acc_norm,none"])
    assert 0 < theirs["acc,none"] < 1 or 0 < theirs["acc_norm,none"] < 1  # a score that tells right from wrong
    assert len(our_answers) == len(their_answers) == 8
    for mine, other in zip(our_answers, their_answers, strict=True):
        assert mine == pytest.approx(other, abs=LOGPROB_TOLERANCE)


# --- clients that leave ---------------------------------------------------------------------------------------


def gauge(server: Server, pattern: re.Pattern) -> int:
    return int(float(pattern.search(httpx.get(server.root + "/metrics", timeout=10).text).group(1)))


def wait_until(ready, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not ready():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_clients_that_leave_free_their_slots(llamacpp_server, client, name):
    server, slots = llamacpp_server, 16
    kept = [{"prompt": prompt, "max_tokens": 200, "temperature": 0} for prompt in ("The sea is", "Paris and")]
    alone = [client.completions.create(model=name, **body).choices[0].text for body in kept]
    impatient = client.with_options(timeout=10)

    def holder(i: int):
        """A stream that would hold its slot for tens of seconds, once its first token came."""
        stream = impatient.completions.create(model=name, prompt=HOLDING[i], max_tokens=LONG, temperature=0,
                                              stream=True)
        assert next(iter(stream)).choices[0].finish_reason is None
        return stream

    texts: dict[int, str] = {}

    def keep(i: int) -> None:
        texts[i] = "".join(c.choices[0].text for c in client.completions.create(model=name, stream=True, **kept[i]))

    holders = [holder(i) for i in range(slots)]
    waiting = [threading.Thread(target=keep, args=(i,), daemon=True) for i in range(len(kept))]
    for thread in waiting:
        thread.start()
    assert wait_until(lambda: gauge(server, _WAITING) == len(kept), 10)  # more requests than slots: two wait
    assert gauge(server, _RUNNING) == slots and not texts
    left = time.monotonic()
    for stream in holders[:len(kept)]:
        stream.close()  # the client goes away mid-stream: its connection is closed
    for thread in waiting:
        thread.join(max(0.0, left + 10 - time.monotonic()))
    # Were a slot still held, the waiting requests would wait out the rest of LONG tokens: a minute.
    assert [texts.get(i) for i in range(len(kept))] == alone
    assert gauge(server, _RUNNING) == slots - len(kept)  # the others still run
    for stream in holders[len(kept):]:
        stream.close()
    assert wait_until(lambda: gauge(server, _RUNNING) == 0 and gauge(server, _WAITING) == 0, 5)
    # As many new streams as there are slots all run at once, and a new request beside them completes.
    holders = [holder(i) for i in range(slots)]
    assert gauge(server, _RUNNING) == slots
    for stream in holders:
        stream.close()
    assert client.completions.create(model=name, **kept[0]).choices[0].text == alone[0]
    assert wait_until(lambda: gauge(server, _RUNNING) == 0, 5)


# --- a server of its own: --preload, SIGTERM ------------------------------------------------------------------


@dataclass
class Started:
    """A server just started, and what it had done by the time it printed its URL."""

    server: Server
    mapped: bool  # llama.cpp had mapped the GGUF into the server's memory (its weights were loaded)
    first_request_s: float  # the first request, sent right after the URL was printed
    load_s: float  # as the server's "loaded ... in N s" line says


@pytest.fixture(scope="module")
def fresh(tiny_instruct_long_path, llamacpp_required) -> Iterator[Started]:
    """A server of its own (on the shared server's GGUF, or converting it when this module runs alone), with four
    batch slots: what it had loaded when it printed its URL, and what its first request took, recorded as it starts."""
    cache = os.path.realpath(llamacpp_required)
    with serving_llamacpp(tiny_instruct_long_path, "--max-batch-size", "4") as server:
        maps = Path(f"/proc/{server.process.pid}/maps").read_text()
        mapped = any(path.startswith(cache) and path.endswith(".gguf")
                     for path in (row.split(maxsplit=5)[-1] for row in maps.splitlines()))
        start = time.perf_counter()
        response = httpx.post(server.url + "/completions", timeout=60, json={
            "model": tiny_instruct_long_path.name, "prompt": "Hello", "max_tokens": 1, "temperature": 0})
        first = time.perf_counter() - start
        assert response.status_code == 200, response.text
        assert wait_until(lambda: _LOADED.search("".join(server.stderr)), 10), server.stderr
        yield Started(server, mapped, first, float(_LOADED.search("".join(server.stderr)).group(1)))


def test_preload_loads_the_weights_before_the_server_says_where_it_listens(fresh):
    assert fresh.mapped  # before any request
    assert fresh.first_request_s < fresh.load_s / 4, fresh  # the first request paid no load


def stream_events(url: str, body: dict, events: list[str], started: threading.Event) -> None:
    """POST a streamed `body`, putting what follows each `data: ` in `events`; `started` is set at the first."""
    try:
        with httpx.stream("POST", url + "/completions", json=body, timeout=30) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    started.set()
    except httpx.HTTPError:
        pass  # the server went away mid-stream: what came before it is the outcome


def test_sigterm_lets_what_fits_the_grace_finish_and_ends_the_rest_with_an_error(fresh, name):
    """As on the other engines (tests/server/test_server_faults.py): a stream that would outlast the grace ends with
    the error object and [DONE], one that fits it completes, and the server exits with code 0 within seconds."""
    from olmo2kit.server.app import SHUTDOWN_GRACE_S

    server = fresh.server
    long_events: list[str] = []
    short_events: list[str] = []
    long_started, short_started = threading.Event(), threading.Event()
    long = {"model": name, "prompt": HOLDING[-1], "max_tokens": LONG, "temperature": 0, "stream": True}
    clients = [threading.Thread(target=stream_events, args=(server.url, long, long_events, long_started))]
    clients[0].start()
    assert long_started.wait(30)
    # A short request that needs about half a second beside the long one, a tenth of the grace.
    start = time.perf_counter()
    plain = httpx.post(server.url + "/completions", timeout=30, json={**long, "stream": False, "max_tokens": 200})
    assert plain.status_code == 200, plain.text
    short = {**long, "max_tokens": max(50, int(200 / (time.perf_counter() - start) * 0.5)),
             "stream_options": {"include_usage": True}}
    clients.append(threading.Thread(target=stream_events, args=(server.url, short, short_events, short_started)))
    clients[1].start()
    assert short_started.wait(30)
    short_done_before = "[DONE]" in short_events
    seconds = server.stop(signal.SIGTERM)
    for thread in clients:
        thread.join(10)
    assert not any(thread.is_alive() for thread in clients)
    time.sleep(0.3)  # the reader thread's last lines of stderr
    stderr = "".join(server.stderr)
    assert server.process.returncode == 0, stderr
    assert seconds < SHUTDOWN_GRACE_S + 5, seconds
    assert "Traceback" not in stderr, stderr
    assert long_events[-1] == "[DONE]" and json.loads(long_events[-2])["error"]["code"] == "unavailable", \
        long_events[-3:]
    assert len(long_events) < LONG  # cut, not run to the end
    assert not short_done_before
    assert short_events[-1] == "[DONE]", short_events[-3:]
    assert json.loads(short_events[-2])["usage"]["completion_tokens"] == short["max_tokens"], short_events[-3:]
    assert json.loads(short_events[-3])["choices"][0]["finish_reason"] == "length", short_events[-3:]
