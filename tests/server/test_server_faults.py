"""`olmo2kit serve` at its edges, as a real process on a loopback port: many clients at once, clients that go
away, requests OpenAI's API refuses, a full queue, SIGTERM mid-stream, and bad command-line options."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx2 as httpx
import openai
import pytest

from conftest import one_line_error, run_olmo2kit
from serving import serving

SUBJECTS = ["The sea", "A transformer", "Paris", "The quick brown fox", "OLMo 2", "Language modeling",
            "Hello, world!", "Numbers"]
PROMPTS = [subject + ending for subject in SUBJECTS for ending in (" is", " reads", " and", ":")]  # 32, distinct
CLIENTS = 8
# The tiny model writes ~1000 tokens a second on an idle CPU, so a request that must hold its batch slot for
# a while needs more context than the tiny checkpoint's 1024: `long_model` has 16384 positions, and LONG new
# tokens after a 5-token prompt take it 40 s or more.
LONG = 16000


@pytest.fixture(scope="module")
def model(tiny_path) -> str:
    return str(tiny_path)


@pytest.fixture(scope="module")
def long_model(tiny_long_path) -> str:
    return str(tiny_long_path)


@pytest.fixture(scope="module")
def narrow(long_model):
    """A server with one batch slot and room for one waiting request."""
    with serving("--model", long_model, "--dtype", "fp32", "--max-batch-size", "1", "--max-queue", "1") as running:
        yield running


def openai_error(response: httpx.Response, status: int) -> dict:
    """The `error` of OpenAI's error object in `response`, which must have `status`."""
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), body
    return error


def short_request(model: str, prompt: str = "The sea is") -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}


def long_request(model: str) -> dict:
    return {"model": model, "prompt": "Hello world", "max_tokens": LONG, "temperature": 0, "stream": True}


def seconds_for(url: str, body: dict, timeout: float = 30) -> float:
    start = time.perf_counter()
    response = httpx.post(url + "/completions", json=body, timeout=timeout)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == body["max_tokens"]
    return time.perf_counter() - start


def read_events(lines: Iterator[str], n: int) -> list[str]:
    """The next `n` server-sent events from a streamed response's `iter_lines()`. The caller keeps `lines`:
    an iterator dropped unfinished closes the connection."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            events.append(line)
            if len(events) == n:
                break
    assert len(events) == n
    return events


# --- concurrency --------------------------------------------------------------------------------------


def ask(client: openai.OpenAI, model: str, i: int, stream: bool) -> tuple[str, str | None]:
    """Request i's greedy reply and finish reason: a completion for even i, a chat reply for odd i."""
    options = dict(model=model, max_tokens=8 + (i * 13) % 33, temperature=0, stream=stream)
    if i % 2 == 0:
        reply = client.completions.create(prompt=PROMPTS[i], **options)
        parts = [(c.text, c.finish_reason) for chunk in reply for c in chunk.choices] if stream else \
            [(reply.choices[0].text, reply.choices[0].finish_reason)]
    else:
        reply = client.chat.completions.create(messages=[{"role": "user", "content": PROMPTS[i]}], **options)
        parts = [(c.delta.content or "", c.finish_reason) for chunk in reply for c in chunk.choices] if stream else \
            [(reply.choices[0].message.content, reply.choices[0].finish_reason)]
    finish = [reason for _, reason in parts if reason is not None]
    return "".join(text for text, _ in parts), finish[-1] if finish else None


def test_concurrent_clients_get_their_sequential_replies(server, model):
    def client() -> openai.OpenAI:
        return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)

    alone = client()
    sequential = {i: ask(alone, model, i, stream=False) for i in range(len(PROMPTS))}
    assert len({text for text, _ in sequential.values()}) > len(PROMPTS) // 2  # the prompts lead somewhere apart
    start = threading.Barrier(CLIENTS)

    def one_client(first: int) -> dict[int, tuple[str, str | None]]:
        mine = client()
        start.wait(timeout=60)
        return {i: ask(mine, model, i, stream=(i // CLIENTS) % 2 == 1) for i in range(first, len(PROMPTS), CLIENTS)}

    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(one_client, first) for first in range(CLIENTS)]
        concurrent = {i: reply for future in futures for i, reply in future.result(timeout=300).items()}
    assert sorted(concurrent) == list(range(len(PROMPTS)))
    for i, reply in sequential.items():
        assert reply[1] in ("length", "stop")
        assert concurrent[i] == reply, (i, PROMPTS[i])


# --- bad requests -------------------------------------------------------------------------------------


def post_raw(server, path: str, content: bytes) -> httpx.Response:
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"},
                      timeout=30)


@pytest.mark.parametrize("content", [
    b'{"model": ',  # malformed
    b"",
    b"\xff\xfe",  # not UTF-8
    b"[" * 100_000 + b"]" * 100_000,  # deeper than json.loads recurses
], ids=["malformed", "empty", "not-utf8", "deep"])
def test_a_body_that_is_not_json_is_a_400(server, content):
    openai_error(post_raw(server, "/completions", content), 400)


def test_a_body_that_is_not_an_object_is_a_400(server, model):
    for content in ([1, 2], [{"model": model, "prompt": "Hi"}], "Hi", 5, None):
        error = openai_error(post_raw(server, "/completions", json.dumps(content).encode()), 400)
        assert "JSON object" in error["message"]


COMPLETION_FIELDS = [
    ("max_tokens", "10"), ("max_tokens", 1.0), ("max_tokens", True), ("max_tokens", -1),
    ("temperature", "hot"), ("temperature", 3), ("top_p", 0),
    ("prompt", 5), ("prompt", [1, "a"]), ("prompt", None),
    ("n", 0), ("n", 1000), ("n", 2.0),
    ("logprobs", 99), ("logprobs", -1),
    ("stop", ["a", "b", "c", "d", "e"]), ("stop", 5),
    ("seed", -1), ("seed", 2**63),
    ("echo", 1), ("user", 5), ("model", 5),
    ("stream", "yes"), ("stream", 1),
    ("presence_penalty", 0.5), ("frequency_penalty", -0.5), ("logit_bias", {"1": 1.0}), ("suffix", "x"),
]


@pytest.mark.parametrize(("field", "value"), COMPLETION_FIELDS, ids=[f"{f}={v!r}"[:40] for f, v in COMPLETION_FIELDS])
def test_a_completion_field_of_the_wrong_type_or_range_is_a_400(server, model, field, value):
    body = {"model": model, "prompt": "Hello", "max_tokens": 4, field: value}
    error = openai_error(httpx.post(server.url + "/completions", json=body, timeout=30), 400)
    assert error["param"] == field, error


CHAT_FIELDS = [
    ("messages", "hi"), ("messages", []), ("messages", [None]), ("messages", [{"role": "user"}]),
    ("messages", [{"role": 5, "content": "hi"}]), ("messages", [{"role": "user", "content": 5}]),
    ("messages", [{"role": "wizard", "content": "hi"}]),  # a role the OLMo 2 template does not know
    ("messages", [{"role": "system", "content": "hi"}]),  # no user message
    ("messages", [{"role": "user", "content": "hi", "foo": 1}]),
    ("top_logprobs", 3),  # without logprobs
    ("logprobs", 99), ("max_tokens", 0), ("n", 0), ("seed", -1), ("presence_penalty", 0.5),
    ("stream", "yes"), ("stream_options", {"include_usage": 1}), ("response_format", {"type": "xml"}),
]


@pytest.mark.parametrize(("field", "value"), CHAT_FIELDS, ids=[f"{f}={v!r}"[:40] for f, v in CHAT_FIELDS])
def test_a_chat_field_of_the_wrong_type_or_range_is_a_400(server, model, field, value):
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, field: value}
    error = openai_error(httpx.post(server.url + "/chat/completions", json=body, timeout=30), 400)
    assert error["param"] is not None and error["param"].split(".")[0] == field, error


def test_unknown_and_missing_fields_are_400s(server, model):
    for path, body, param in [
        ("/completions", {"model": model, "prompt": "Hi", "foo": 1}, "foo"),  # OpenAI refuses unknown fields
        ("/chat/completions", {"model": model, "messages": [{"role": "user", "content": "Hi"}], "foo": 1}, "foo"),
        ("/completions", {"prompt": "Hi"}, "model"),
        ("/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}, "model"),
        ("/completions", {"model": model}, "prompt"),
        ("/chat/completions", {"model": model}, "messages"),
    ]:
        error = openai_error(httpx.post(server.url + path, json=body, timeout=30), 400)
        assert error["param"] == param and param in error["message"], error
    error = openai_error(httpx.post(server.url + "/completions", json={"model": "no-such-model", "prompt": "Hi"},
                                    timeout=30), 404)
    assert error["code"] == "model_not_found"


def test_prompts_the_model_cannot_take_are_400s(server, model, tiny_path):
    vocab = json.loads((tiny_path / "config.json").read_text())["vocab_size"]
    for prompt in ("", [], [[]], ["ok", ""], [vocab], [-1], [[1], [vocab + 7]]):
        error = openai_error(httpx.post(server.url + "/completions", json={"model": model, "prompt": prompt},
                                        timeout=30), 400)
        assert error["param"] == "prompt", (prompt, error)


def test_a_prompt_past_the_context_is_a_400_naming_both_numbers(server, model, tiny_path):
    context = json.loads((tiny_path / "config.json").read_text())["max_position_embeddings"]
    prompt = [5] * (context - 2)
    response = httpx.post(server.url + "/completions", json={"model": model, "prompt": prompt, "max_tokens": 2},
                          timeout=30)
    assert response.status_code == 200, response.text  # exactly fills the context
    error = openai_error(httpx.post(server.url + "/completions", json={"model": model, "prompt": prompt,
                                                                       "max_tokens": 3}, timeout=30), 400)
    assert f"({context - 2} tokens)" in error["message"] and "(3)" in error["message"], error
    assert str(context) in error["message"] and error["code"] == "context_length_exceeded"
    body = {"model": model, "prompt": [5] * (context + 1), "max_tokens": 1}
    error = openai_error(httpx.post(server.url + "/completions", json=body, timeout=30), 400)
    assert str(context + 1) in error["message"] and str(context) in error["message"], error
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": context}
    error = openai_error(httpx.post(server.url + "/chat/completions", json=body, timeout=30), 400)
    assert str(context) in error["message"] and error["code"] == "context_length_exceeded", error


def test_a_body_over_the_size_limit_is_a_413(server, model):
    from olmo2kit.server.app import MAX_BODY_BYTES

    big = json.dumps({"model": model, "prompt": "x" * (MAX_BODY_BYTES + 1)}).encode()
    openai_error(post_raw(server, "/completions", big), 413)

    def chunks():  # no content-length: the server counts what it reads
        for at in range(0, len(big), 1 << 20):
            yield big[at: at + (1 << 20)]

    response = httpx.post(server.url + "/completions", content=chunks(), timeout=30,
                          headers={"content-type": "application/json"})
    openai_error(response, 413)


def test_unknown_routes_and_methods_answer_with_the_error_object(server):
    openai_error(httpx.post(server.url + "/nope", json={}, timeout=30), 404)
    openai_error(httpx.get(server.root + "/nope", timeout=30), 404)
    for path in ("/completions", "/chat/completions"):
        response = httpx.get(server.url + path, timeout=30)
        openai_error(response, 405)
        assert response.headers.get("allow") == "POST"  # RFC 9110: a 405 names the methods allowed


def test_the_server_still_serves_after_bad_requests(server, model):
    for content in (b"{", b"[]", json.dumps({"model": model, "prompt": [10**9]}).encode()):
        assert post_raw(server, "/completions", content).status_code == 400
    assert seconds_for(server.url, short_request(model)) < 30
    assert server.process.poll() is None and "Traceback" not in "".join(server.stderr)


# --- shutting down ------------------------------------------------------------------------------------


@dataclass
class Shutdown:
    """What SIGTERM did to a server with four requests in flight: a long and a short one, each streamed and not."""

    seconds: float  # from the signal to the exit
    returncode: int
    short: int  # max_tokens of the short requests
    stderr: str
    long_events: list[str]
    short_events: list[str]
    plain: dict[str, httpx.Response | str]  # "long", "short": the response, or the client's error
    short_done_before: bool  # a short request had ended before the signal (then it proves nothing)
    clients_hung: bool


def stream_into(url: str, body: dict, events: list[str]) -> None:
    try:
        with httpx.stream("POST", url + "/completions", json=body, timeout=30) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
    except httpx.HTTPError:
        pass  # the server went away mid-stream


def post_into(url: str, body: dict, into: dict, key: str, sent: threading.Event) -> None:
    """POST `body`, setting `sent` once the whole request is written to the server's socket."""

    def trace(event: str, info: dict) -> None:
        if event == "http11.send_request_body.complete":
            sent.set()

    try:
        with httpx.Client(timeout=30) as client:
            into[key] = client.post(url + "/completions", json=body, extensions={"trace": trace})
    except httpx.HTTPError as e:
        into[key] = repr(e)


def wait_until(ready, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def quiet(lines: list[str], seconds: float = 0.3) -> None:
    """Wait until `lines`, filled by a reader thread, stop growing for `seconds`."""
    seen = -1
    while len(lines) != seen:
        seen = len(lines)
        time.sleep(seconds)


@pytest.fixture(scope="module")
def sigterm_mid_stream(long_model) -> Shutdown:
    # One thread: on a shared 2-core machine torch's two threads can make the tiny model 10x slower.
    with serving("--model", long_model, "--dtype", "fp32", env={"OMP_NUM_THREADS": "1"}) as running:
        long_events: list[str] = []
        short_events: list[str] = []
        plain: dict = {}
        long = long_request(long_model)
        sent = {"long": threading.Event(), "short": threading.Event()}
        clients = [threading.Thread(target=stream_into, args=(running.url, long, long_events)),
                   threading.Thread(target=post_into, args=(running.url, {**long, "stream": False}, plain, "long",
                                                            sent["long"]))]
        seconds_for(running.url, {**long, "stream": False, "max_tokens": 50})  # warm
        for client in clients:
            client.start()
        wait_until(lambda: len(long_events) >= 3)
        assert sent["long"].wait(30)
        # A short request is still running when the signal comes (sse-starlette looks for a shutdown every
        # 0.5 s) but needs well under the 5 s grace: about 0.4 s of this machine's speed beside the long ones.
        speed = 200 / seconds_for(running.url, {**long, "stream": False, "max_tokens": 200})
        short = {**long, "max_tokens": min(max(50, int(speed * 0.4)), 8000)}
        clients += [threading.Thread(target=post_into, args=(running.url, {**short, "stream": False}, plain, "short",
                                                             sent["short"])),
                    threading.Thread(target=stream_into, args=(running.url, short, short_events))]
        clients[2].start()
        assert sent["short"].wait(30)
        # The streamed short request connects after both plain requests were written whole: the server accepts
        # connections in order and reads what is waiting on them, so by the streamed one's first token it has
        # both plain requests in hand, and the signal cannot find them unsent (a connection refused) or unread.
        clients[3].start()
        wait_until(lambda: len(short_events) >= 1)
        short_done_before = "data: [DONE]" in short_events or "short" in plain
        seconds = running.stop(signal.SIGTERM)
        for client in clients:
            client.join(10)
        quiet(running.stderr)
        return Shutdown(seconds, running.process.returncode, short["max_tokens"], "".join(running.stderr), long_events,
                        short_events, plain, short_done_before, any(c.is_alive() for c in clients))


def test_sigterm_while_streaming_exits_within_seconds(sigterm_mid_stream):
    outcome = sigterm_mid_stream
    assert outcome.seconds < 8, outcome
    assert not outcome.clients_hung
    assert len(outcome.long_events) < LONG  # cut, not run to the end


def test_sigterm_exits_with_code_0(sigterm_mid_stream):
    assert sigterm_mid_stream.returncode == 0, sigterm_mid_stream.stderr


def test_sigterm_leaves_no_traceback(sigterm_mid_stream):
    assert "Traceback" not in sigterm_mid_stream.stderr, sigterm_mid_stream.stderr


def test_sigterm_lets_requests_that_fit_the_grace_finish(sigterm_mid_stream):
    # README: "SIGINT or SIGTERM gives in-flight requests 5 s, then ends what still runs with an error object"
    outcome = sigterm_mid_stream
    assert not outcome.short_done_before
    plain = outcome.plain["short"]
    assert isinstance(plain, httpx.Response) and plain.status_code == 200, plain
    assert plain.json()["usage"]["completion_tokens"] == outcome.short
    assert outcome.short_events[-1:] == ["data: [DONE]"], outcome.short_events[-3:]
    assert '"finish_reason": "length"' in outcome.short_events[-2], outcome.short_events[-2]


def test_sigterm_answers_a_request_it_cuts_with_the_error_object(sigterm_mid_stream):
    cut = sigterm_mid_stream.plain["long"]
    assert isinstance(cut, httpx.Response), cut
    assert cut.status_code >= 500
    openai_error(cut, cut.status_code)


# --- one batch slot: clients that go away, a full queue ---------------------------------------------


def test_a_streamed_client_that_goes_away_frees_its_slot(narrow, long_model):
    idle = seconds_for(narrow.url, short_request(long_model))
    with httpx.Client(timeout=30) as client, \
            client.stream("POST", narrow.url + "/completions", json=long_request(long_model)) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        read_events(lines, 2)
    # Were the slot still held, the short request would wait out the rest of LONG tokens (ReadTimeout).
    after = seconds_for(narrow.url, short_request(long_model), timeout=10)
    assert after < 3 * idle + 1.0, (after, idle)


def test_a_full_queue_answers_503_at_once(narrow, long_model):
    waiting: dict = {}

    def second() -> None:  # waits in the queue for the slot
        waiting["response"] = httpx.post(narrow.url + "/completions", json=short_request(long_model), timeout=30)

    queued = threading.Thread(target=second)
    with httpx.Client(timeout=30) as client, \
            client.stream("POST", narrow.url + "/completions", json=long_request(long_model)) as first:
        lines = first.iter_lines()
        read_events(lines, 1)  # it holds the one slot
        queued.start()
        time.sleep(1.0)
        for stream in (False, True):
            start = time.perf_counter()
            try:
                third = httpx.post(narrow.url + "/completions",
                                   json={**short_request(long_model), "stream": stream}, timeout=5)
            except httpx.ReadTimeout:
                pytest.fail("a request past --max-queue waits instead of getting a 503")
            took = time.perf_counter() - start
            error = openai_error(third, 503)
            assert third.headers.get("retry-after", "").isdigit(), third.headers
            assert error["code"] == "queue_full" and took < 1.0, (error, took)
        read_events(lines, 1)  # the first still runs
        assert "response" not in waiting  # and the second still waits
    queued.join(30)  # the first went away: the second has the slot
    assert waiting["response"].status_code == 200, waiting["response"].text
    assert waiting["response"].json()["usage"]["completion_tokens"] == 8


def test_a_client_that_stops_waiting_frees_its_slot(narrow, long_model):
    # Last on `narrow`: were the slot not freed, the abandoned request would hold it for LONG tokens.
    idle = seconds_for(narrow.url, short_request(long_model))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(narrow.url + "/completions", json={**long_request(long_model), "stream": False}, timeout=1.0)
    after = seconds_for(narrow.url, short_request(long_model), timeout=10)
    assert after < 3 * idle + 1.0, (after, idle)


# --- the command line ---------------------------------------------------------------------------------



def refused(result: subprocess.CompletedProcess, needle: str) -> None:
    one_line_error(result.returncode, result.stderr, needle, alone=True)


def test_serve_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from olmo2kit.cli.app import main\n"
        "sys.argv = ['olmo2kit', 'serve', '--help']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'fastapi', 'uvicorn') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "--max-batch-size" in result.stdout and "--max-queue" in result.stdout, result.stderr
    assert "HEAVY []" in result.stdout, result.stdout[-300:]


def test_bad_serve_options_are_one_line_errors(model, tmp_path):
    refused(run_olmo2kit("serve", "--model", model, "--port", "70000"), "--port")
    refused(run_olmo2kit("serve", "--model", model, "--port", "-1"), "--port")
    refused(run_olmo2kit("serve", "--model", model, "--max-batch-size", "0"), "--max-batch-size")
    refused(run_olmo2kit("serve", "--model", model, "--max-queue", "0"), "--max-queue")  # nothing could ever queue
    refused(run_olmo2kit("serve"), "--model")
    refused(run_olmo2kit("serve", "--port", "0", "--model", str(tmp_path / "missing")), "missing")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_olmo2kit("serve", "--model", model, "--port", str(port))
    refused(result, str(port))
    assert result.stdout == ""  # no URL printed for a server that is not listening
