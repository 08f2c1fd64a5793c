"""`olmo2kit serve` at the edges a hostile or careless client reaches, as a real process on a loopback port: model
names no file can have, clients that close mid-upload or send half a request (raw sockets: the `openai` client
cannot), the server's own paths kept out of every response, and a model that cannot load."""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from conftest import one_line_error, run_olmo2kit
from serving import serving

TIMEOUT = 1.5  # --header-timeout and --idle-timeout of the server under test, in seconds
# Names a client may send that no file can have, or that name no file: each was an OSError (a 500) or is one
# step from it. Over 255 characters, a NUL byte, `~user` of no user, only dots, a path too long for the system.
ODD_NAMES = ["a" * 300, "/" + "b" * 300, "org/" + "c" * 300, "x\x00y", "~no-such-user-9z/model", "...", "....",
             "/" + "d/" * 3000, "./" + "e" * 256 + "/f"]


@pytest.fixture(scope="module")
def long_model(tiny_long_path) -> Path:
    return tiny_long_path


@pytest.fixture(scope="module")
def edges(long_model):
    """A server over `long_model` that lets requests name Hub models (offline here: none loads), with short
    header and idle timeouts."""
    with serving("--model", str(long_model), "--dtype", "fp32", "--allow-load", "--header-timeout", str(TIMEOUT),
                 "--idle-timeout", str(TIMEOUT), env={"HF_HUB_OFFLINE": "1"}) as running:
        yield running


@pytest.fixture
def client(edges) -> openai.OpenAI:
    return openai.OpenAI(base_url=edges.url, api_key="unused", max_retries=0, timeout=60)


def connect(edges) -> socket.socket:
    host, port = edges.root.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=TIMEOUT + 8)


def read_to_end(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (TimeoutError if it never does)."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def read_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length, head and body, from a kept-alive connection."""
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536) or b"<closed>"
        assert not received.endswith(b"<closed>"), received
    head, _, body = received.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.lower().splitlines() if line.startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def quiet(lines: list[str], seconds: float = 0.3) -> None:
    """Wait until `lines`, filled by a reader thread, stop growing for `seconds`."""
    seen = -1
    while len(lines) != seen:
        seen = len(lines)
        time.sleep(seconds)


def error_of(error: openai.APIStatusError) -> dict:
    return error.response.json()["error"]


# --- names ---------------------------------------------------------------------------------------------------


def test_a_name_no_file_can_have_is_a_404_with_the_name_shortened(edges, client):
    asks = (lambda name: client.completions.create(model=name, prompt="Hi", max_tokens=1),
            lambda name: client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}]),
            lambda name: client.models.retrieve(name.replace("\x00", "")))
    for name in ODD_NAMES:
        for ask in asks:
            with pytest.raises(openai.NotFoundError) as missing:
                ask(name)
            error = error_of(missing.value)
            assert (error["code"], error["type"]) == ("model_not_found", "invalid_request_error"), error
            assert len(error["message"]) < 400, error  # a long name is cut in the middle, not repeated whole
    quiet(edges.stderr)
    log = "".join(edges.stderr)
    assert "Traceback" not in log and "OSError" not in log, log
    assert not any(name in log for name in ODD_NAMES if len(name) > 100), "a client's long name was logged whole"


# --- clients that stop halfway -------------------------------------------------------------------------------


def test_a_client_that_closes_mid_upload_logs_no_traceback(edges):
    before = len(edges.stderr)
    for _ in range(3):
        with connect(edges) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n" + b'{"model": ')
    assert httpx.get(edges.root + "/health", timeout=30).status_code == 200  # the server read all three closes
    quiet(edges.stderr)
    logged = "".join(edges.stderr[before:])
    assert "Traceback" not in logged and len(logged.splitlines()) <= 4, logged  # at most a line a request


def test_half_a_request_line_is_closed_within_the_header_timeout(edges):
    for sent in (b"", b"GET /hea", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"):
        with connect(edges) as sock:
            start = time.monotonic()
            sock.sendall(sent)
            assert read_to_end(sock) == b""  # closed, with nothing to say: no request was made
            assert time.monotonic() - start < TIMEOUT + 5


def test_a_head_sent_a_byte_at_a_time_is_closed_at_its_deadline(edges):
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 200 + b"\r\n\r\n"  # 12 s at 20 bytes a second
    with connect(edges) as sock:
        start = time.monotonic()
        try:
            for byte in head:  # a byte renews no deadline
                sock.sendall(bytes([byte]))
                time.sleep(0.05)
            answer = read_to_end(sock)
        except (BrokenPipeError, ConnectionResetError):
            answer = b""
        assert answer == b"", answer[:100]
        assert time.monotonic() - start < TIMEOUT + 5


def test_a_body_that_stops_coming_is_closed_within_the_idle_timeout(edges):
    with connect(edges) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n" + b'{"model": ')
        start = time.monotonic()
        read_to_end(sock)
        assert time.monotonic() - start < TIMEOUT + 5


def test_a_slow_but_steady_client_is_answered(edges, long_model):
    body = json.dumps({"model": long_model.name, "prompt": "Hello", "max_tokens": 2, "temperature": 0}).encode()
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n")
    pieces = [head[:20], head[20:]] + [body[i:i + 12] for i in range(0, len(body), 12)]
    pause = TIMEOUT / 3  # the whole takes longer than either timeout; no silence is as long as one
    assert pause * (len(pieces) - 1) > 2 * TIMEOUT
    with connect(edges) as sock:
        for piece in pieces[:2]:  # the head, within the header timeout
            sock.sendall(piece)
            time.sleep(pause)
        for piece in pieces[2:]:
            sock.sendall(piece)
            time.sleep(pause)
        answer = read_to_end(sock)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


def test_a_kept_alive_connection_takes_a_second_request(edges):
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with connect(edges) as sock:
        for _ in range(2):
            sock.sendall(request)
            assert read_response(sock).startswith(b"HTTP/1.1 200")
            time.sleep(TIMEOUT / 3)


def test_a_stream_outlasts_both_timeouts(edges, client, long_model):
    # greedy from this prompt, the tiny model writes no end of text for thousands of tokens (test_server_faults'
    # long requests rely on it too); sampled, it may end at once
    stream = client.completions.create(model=long_model.name, prompt="Hello world", max_tokens=16000, temperature=0,
                                       stream=True)
    start = time.monotonic()
    with stream:
        for chunk in stream:
            assert chunk.choices[0].finish_reason is None  # 16000 tokens take the tiny model many seconds
            if time.monotonic() - start > 2 * TIMEOUT + 0.5:
                break
        else:
            raise AssertionError("the stream ended early")


# --- the server's own paths ----------------------------------------------------------------------------------


def test_a_local_checkpoint_is_served_under_its_folders_name(edges, client, long_model):
    assert [m.id for m in client.models.list().data] == [long_model.name]
    assert client.models.retrieve(long_model.name).id == long_model.name
    reply = client.completions.create(model=long_model.name, prompt="Hello", max_tokens=2, temperature=0)
    assert reply.model == long_model.name and reply.usage.completion_tokens == 2
    for path in (f"/models/{long_model.name}", "/models"):
        assert str(long_model.parent) not in httpx.get(edges.url + path, timeout=30).text


def test_a_404_tells_no_client_whether_a_path_exists_on_the_server(edges, client, long_model, tmp_path):
    """Each pair: a directory that exists on the server, and one that does not; the 404s differ only in the name."""
    there = tmp_path / "there"
    there.mkdir()
    pairs = [(str(there), str(tmp_path / "not-there")), (str(long_model.parent), str(long_model.parent) + "-not"),
             ("src", "srcx"), ("./src", "./srcx"), ("~", "~/no-such-folder-9z")]
    assert Path("src").is_dir() and not Path("srcx").exists()  # the server runs where the tests do
    for exists, missing in pairs:
        messages = []
        for name in (exists, missing):
            with pytest.raises(openai.NotFoundError) as refused:
                client.completions.create(model=name, prompt="Hi", max_tokens=1)
            messages.append(error_of(refused.value)["message"].replace(repr(name), "NAME"))
        assert messages[0] == messages[1], messages
        assert str(long_model.parent) not in messages[0], messages[0]  # served under its folder's name


# --- a model that cannot load --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broken_model(tiny_path, tmp_path_factory) -> Path:
    """A checkpoint folder whose weights are gone: it resolves, and fails to load."""
    path = tmp_path_factory.mktemp("edges-broken") / "broken"
    shutil.copytree(tiny_path, path)
    for weights in path.glob("*.safetensors"):
        weights.unlink()
    return path


def test_a_model_that_fails_its_first_load_makes_health_say_so(broken_model):
    with serving("--model", str(broken_model), "--no-preload") as running:
        assert httpx.get(running.root + "/health", timeout=30).json() == {"status": "ok"}  # nothing tried yet
        client = openai.OpenAI(base_url=running.url, api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.InternalServerError) as failed:
            client.completions.create(model=broken_model.name, prompt="Hi", max_tokens=1)
        assert failed.value.status_code == 503
        assert error_of(failed.value)["code"] == "model_load_failed"
        health = httpx.get(running.root + "/health", timeout=30)
        assert health.status_code == 503, health.text
        body = health.json()
        assert body["status"] == "error" and list(body["models"]) == [broken_model.name], body
        reason = body["models"][broken_model.name]
        assert reason.startswith("failed to load: ") and "\n" not in reason, reason
        for text in (health.text, failed.value.response.text):
            assert str(broken_model.parent) not in text, text


def test_a_model_that_fails_at_preload_stops_the_server_with_one_line(broken_model):
    result = run_olmo2kit("serve", "--model", str(broken_model), "--port", "0")
    one_line_error(result.returncode, result.stderr)


def test_timeouts_must_be_positive():
    for option in ("--header-timeout", "--idle-timeout"):
        result = run_olmo2kit("serve", "--model", "1b", option, "0", "--port", "0")
        one_line_error(result.returncode, result.stderr, option, alone=True)

