"""What an operator watches `olmo2kit serve` through, on a real process on loopback: /metrics (counts that match
the usage the answers report, errors by kind, queue gauges read live, behind the API key), the X-Request-Id of
every answer and log line, CORS for browser front ends, and the JSON access-log line (prompts only when asked)."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx2 as httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import LONG_CONTEXT, one_line_error, run_olmo2kit
from serving import Server, serving

KEY = "observability-key-41d7"
ORIGIN = "http://front.example:3000"
AUTH = {"Authorization": f"Bearer {KEY}"}
GENERATED_ID = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(scope="module")
def model(tiny_long_path) -> str:
    return str(tiny_long_path)


@pytest.fixture(scope="module")
def observed(model) -> Server:
    """A server with a key, one CORS origin and one batch slot (so that a second request waits in the queue)."""
    with serving("--model", model, "--dtype", "fp32", "--api-key", KEY, "--cors-origin", ORIGIN,
                 "--max-batch-size", "1") as running:
        yield running


@pytest.fixture(scope="module")
def logging_prompts(model) -> Server:
    """A server without a key or CORS that logs prompts."""
    with serving("--model", model, "--dtype", "fp32", "--log-prompts") as running:
        yield running


def served_name(server: Server) -> str:
    """The name the server's one model is served (and labelled) under."""
    return client(server).models.list().data[0].id


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)


def scrape(server: Server) -> dict[tuple, float]:
    """/metrics as {(sample name, sorted labels): value}."""
    response = httpx.get(server.root + "/metrics", headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain"), response.headers
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def access_line(server: Server, request_id: str, timeout: float = 10) -> dict:
    """The access-log line of the request `request_id` on the server's stderr, parsed (it must be JSON)."""
    needle = f'"request_id": "{request_id}"'
    deadline = time.monotonic() + timeout
    while True:  # the line is written before the answer's last byte; stderr is read by a thread of the test
        lines = [line for line in list(server.stderr) if needle in line]
        if lines:
            assert len(lines) == 1, lines
            return json.loads(lines[0])
        assert time.monotonic() < deadline, f"no access-log line for {request_id}: {''.join(server.stderr)[-2000:]}"
        time.sleep(0.02)


def raw_head(server: Server, request: bytes) -> tuple[int, dict[str, str]]:
    """Send `request` as is on a new connection: the answer's status and headers (names in lower case)."""
    url = urlsplit(server.root)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
            data += chunk
    status_line, *lines = data.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    return int(status_line.split()[1]), {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}


# --- /metrics -----------------------------------------------------------------------------------------


def test_metrics_count_what_the_answers_report(observed, model):
    api = client(observed)
    before = scrape(observed)
    usages = [
        api.completions.create(model=model, prompt="The sea is", max_tokens=5, temperature=0).usage,
        api.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi there"}], max_tokens=4,
                                    temperature=0).usage,
    ]
    stream = api.completions.create(model=model, prompt="Hello world", max_tokens=6, temperature=0, stream=True,
                                    stream_options={"include_usage": True})
    usages.append([chunk.usage for chunk in stream if chunk.usage is not None][-1])
    with pytest.raises(openai.BadRequestError) as refused:  # past the context
        api.completions.create(model=model, prompt="Hello", max_tokens=LONG_CONTEXT + 1)
    assert refused.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as refused:
        api.completions.create(model=model, prompt="Hello", max_tokens=-1)
    assert refused.value.code == "invalid_value"
    after = scrape(observed)

    def grew(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    served = served_name(observed)
    assert grew("olmo2kit_prompt_tokens_total", model=served) == sum(u.prompt_tokens for u in usages) > 0
    assert grew("olmo2kit_completion_tokens_total", model=served) == sum(u.completion_tokens for u in usages) > 0
    assert grew("olmo2kit_requests_total", route="/v1/completions", status="200") == 2
    assert grew("olmo2kit_requests_total", route="/v1/chat/completions", status="200") == 1
    assert grew("olmo2kit_requests_total", route="/v1/completions", status="400") == 2
    assert grew("olmo2kit_errors_total", type="invalid_request_error", code="context_length_exceeded") == 1
    assert grew("olmo2kit_errors_total", type="invalid_request_error", code="invalid_value") == 1
    assert grew("olmo2kit_time_to_first_token_seconds_count", model=served) == 3
    assert grew("olmo2kit_request_duration_seconds_count", route="/v1/completions") == 4
    assert grew("olmo2kit_request_duration_seconds_sum", route="/v1/completions") > 0
    assert (after[("olmo2kit_queue_depth", (("model", served),))],
            after[("olmo2kit_running_rows", (("model", served),))]) == (0, 0)


def test_metrics_need_the_key(observed):
    assert httpx.get(observed.root + "/metrics", timeout=30).status_code == 401
    assert httpx.get(observed.root + "/metrics", headers={"Authorization": "Bearer wrong"}, timeout=30).status_code \
        == 401
    before = scrape(observed)
    httpx.get(observed.root + "/metrics", timeout=30)
    after = scrape(observed)
    assert sample(after, "olmo2kit_requests_total", route="/metrics", status="401") \
        - sample(before, "olmo2kit_requests_total", route="/metrics", status="401") == 1
    assert sample(after, "olmo2kit_errors_total", type="invalid_request_error", code="invalid_api_key") \
        - sample(before, "olmo2kit_errors_total", type="invalid_request_error", code="invalid_api_key") == 1


# --- request ids --------------------------------------------------------------------------------------


def test_a_sane_request_id_is_echoed_and_any_other_replaced(observed):
    for given in ("trace-7.a:b_c", "x" * 128):
        response = httpx.get(observed.url + "/models", headers={**AUTH, "X-Request-Id": given}, timeout=30)
        assert response.status_code == 200 and response.headers["x-request-id"] == given
    made = set()
    for given in (None, "x" * 129, "two words", 'quote"d', "", "é"):
        headers = AUTH if given is None else {**AUTH, "X-Request-Id": given.encode("utf-8")}
        response = httpx.get(observed.url + "/models", headers=headers, timeout=30)
        assert response.status_code == 200
        assert GENERATED_ID.fullmatch(response.headers["x-request-id"]), response.headers
        made.add(response.headers["x-request-id"])
    assert len(made) == 6  # a new one for each request


def test_every_answer_carries_its_request_id(observed, model):
    def answered(response: httpx.Response, status: int, given: str) -> None:
        assert response.status_code == status, response.text
        assert response.headers.get("x-request-id") == given, response.headers

    answered(httpx.get(observed.url + "/models", headers={"X-Request-Id": "no-key"}, timeout=30), 401, "no-key")
    answered(httpx.get(observed.root + "/health", headers={"X-Request-Id": "health"}, timeout=30), 200, "health")
    answered(httpx.get(observed.url + "/nope", headers={**AUTH, "X-Request-Id": "lost"}, timeout=30), 404, "lost")
    answered(httpx.post(observed.url + "/completions", headers={**AUTH, "X-Request-Id": "bad"}, content=b"{",
                        timeout=30), 400, "bad")
    status, headers = raw_head(observed, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
                               KEY.encode() + b"\r\nX-Request-Id: too-big\r\nContent-Type: application/json\r\n"
                               b"Content-Length: 999999999\r\n\r\n")
    assert (status, headers.get("x-request-id")) == (413, "too-big"), headers
    body = {"model": model, "prompt": "The sea is", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", observed.url + "/completions", json=body, headers={**AUTH, "X-Request-Id": "stream"},
                      timeout=30) as response:
        answered(response, 200, "stream")
        assert response.read().decode().rstrip().endswith("data: [DONE]")
    reply = client(observed).with_options(default_headers={"X-Request-Id": "openai-client"}).completions \
        .with_raw_response.create(model=model, prompt="The sea is", max_tokens=2)
    assert reply.headers["x-request-id"] == "openai-client"


def test_the_access_log_line_is_json_with_the_request_id_and_no_prompt(observed, model):
    prompt = "Zebras quietly"
    reply = client(observed).with_options(default_headers={"X-Request-Id": "access-1"}).completions \
        .create(model=model, prompt=prompt, max_tokens=3, temperature=0)
    line = access_line(observed, "access-1")
    assert {k: line[k] for k in ("method", "path", "status", "model")} == \
        {"method": "POST", "path": "/v1/completions", "status": 200, "model": served_name(observed)}
    assert (line["prompt_tokens"], line["completion_tokens"]) == \
        (reply.usage.prompt_tokens, reply.usage.completion_tokens)
    assert line["error_type"] is None and line["error_code"] is None
    assert line["duration_ms"] >= line["first_token_ms"] > 0
    assert line["client"].startswith("127.0.0.1:") and line["time"].endswith("+00:00")
    assert "prompt" not in line and prompt not in "".join(observed.stderr)

    httpx.post(observed.url + "/completions", headers={**AUTH, "X-Request-Id": "access-2"},
               json={"model": model, "prompt": prompt, "max_tokens": LONG_CONTEXT + 1}, timeout=30)
    line = access_line(observed, "access-2")
    assert (line["status"], line["error_type"], line["error_code"]) == \
        (400, "invalid_request_error", "context_length_exceeded")
    assert prompt not in "".join(observed.stderr)
    assert KEY not in "".join(observed.stderr)


# --- CORS ---------------------------------------------------------------------------------------------


def test_a_browser_preflight_needs_no_key_and_answers_name_the_origin(observed):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    response = httpx.options(observed.url + "/chat/completions", headers=preflight, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert {"authorization", "content-type"} <= \
        {h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")}
    assert "POST" in response.headers["access-control-allow-methods"]
    assert response.headers.get("x-request-id")

    stranger = httpx.options(observed.url + "/chat/completions", headers={**preflight, "Origin": "http://evil.example"},
                             timeout=30)
    assert stranger.status_code == 400 and "access-control-allow-origin" not in stranger.headers

    answer = httpx.get(observed.url + "/models", headers={**AUTH, "Origin": ORIGIN}, timeout=30)
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in answer.headers["access-control-expose-headers"].lower()
    refused = httpx.get(observed.url + "/models", headers={"Origin": ORIGIN}, timeout=30)
    assert refused.status_code == 401  # the key still guards every answer a browser can read
    assert refused.headers["access-control-allow-origin"] == ORIGIN  # and the page can read why


def test_cors_is_off_by_default(logging_prompts):
    response = httpx.options(logging_prompts.url + "/chat/completions", timeout=30, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert response.status_code == 405 and "access-control-allow-origin" not in response.headers
    response = httpx.get(logging_prompts.url + "/models", headers={"Origin": ORIGIN}, timeout=30)
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers


def test_a_cors_origin_that_is_not_an_origin_is_refused(tmp_path):
    # A model that does not exist: the origin is checked first, before anything loads.
    missing = str(tmp_path / "missing")
    for bad in ("http://front.example/", "front.example:3000", "http://front.example:99999",
                "http://user@front.example", "https://*.example.com"):
        result = run_olmo2kit("serve", "--port", "0", "--model", missing, "--cors-origin", ORIGIN, "--cors-origin", bad)
        assert "--cors-origin" in one_line_error(result.returncode, result.stderr, bad, alone=True)


# --- logging ------------------------------------------------------------------------------------------


def test_log_lines_of_a_request_carry_its_id_and_prompts_are_logged_when_asked(logging_prompts, model):
    # The tiny base model has no chat template: the first chat request logs a warning, from inside the request.
    api = openai.OpenAI(base_url=logging_prompts.url, api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Otters " * 400}]  # 2800 characters: logged cut short
    api.with_options(default_headers={"X-Request-Id": "first-chat"}).chat.completions.create(
        model=model, messages=messages, max_tokens=2)
    line = access_line(logging_prompts, "first-chat")
    warning = [x for x in logging_prompts.stderr if "has no chat template" in x]
    assert len(warning) == 1 and "[first-chat] " in warning[0], warning
    assert line["prompt"].startswith('[{"role": "user", "content": "Otters Otters')
    assert len(line["prompt"]) <= 2003 and line["prompt"].endswith("...")

    api.with_options(default_headers={"X-Request-Id": "completion"}).completions.create(
        model=model, prompt="Badgers dig", max_tokens=2)
    assert access_line(logging_prompts, "completion")["prompt"] == "Badgers dig"


# --- last: this one leaves a request to be cancelled ---------------------------------------------------


def test_queue_depth_and_running_rows_are_read_at_scrape_time(observed, model):
    waiting: dict = {}

    def second() -> None:  # waits in the queue for the one batch slot
        waiting["response"] = httpx.post(observed.url + "/completions", headers=AUTH, timeout=60,
                                         json={"model": model, "prompt": "The sea is", "max_tokens": 2})

    queued = threading.Thread(target=second)
    served = served_name(observed)
    body = {"model": model, "prompt": "Hello world", "max_tokens": LONG_CONTEXT - 100, "temperature": 0,
            "stream": True}
    with httpx.Client(timeout=30) as http, \
            http.stream("POST", observed.url + "/completions", json=body, headers=AUTH) as first:
        lines = first.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # it holds the slot
        queued.start()
        deadline = time.monotonic() + 20
        while True:  # until the second request is queued
            now = scrape(observed)
            gauges = tuple(sample(now, name, model=served) for name in ("olmo2kit_queue_depth",
                                                                       "olmo2kit_running_rows"))
            if gauges == (1, 1):
                break
            assert time.monotonic() < deadline, gauges
    queued.join(60)  # the first has gone: the second had the slot
    assert waiting["response"].status_code == 200
    idle = scrape(observed)
    assert sample(idle, "olmo2kit_queue_depth", model=served) == 0

