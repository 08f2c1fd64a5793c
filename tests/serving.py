"""A real `olmo2kit serve` process on a loopback port, for the server's tests (a pytest plugin: conftest.py
names it in `pytest_plugins`, so `serving` and the `server` fixture are everywhere)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import jsonschema
import pytest

from conftest import OLMO2KIT

_URL = re.compile(r"at (http://\S+/v1)")

# The JSON schema response_format is tested with (grammar and server), and the check that an answer fits it.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "count", "ok"],
    "additionalProperties": False,
}


def assert_fits_schema(text: str, schema: dict = SCHEMA) -> None:
    """`text` is JSON that fits `schema` (the `jsonschema` package judges), an object's keys in the order of the
    schema's "properties", as the grammar writes them."""
    answer = json.loads(text)
    jsonschema.validate(answer, schema)
    if isinstance(answer, dict) and "properties" in schema:
        assert list(answer) == [name for name in schema["properties"] if name in answer], text


@dataclass
class Server:
    """A running server: its base URL (…/v1), its process, and what it has written to stderr so far."""

    url: str
    process: subprocess.Popen
    stderr: list[str] = field(default_factory=list)

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> float:
        """Send `sig` and wait for the exit; the seconds it took."""
        start = time.perf_counter()
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout)
        return time.perf_counter() - start


@contextmanager
def serving(*args: str, env: dict | None = None, timeout: float = 120) -> Iterator[Server]:
    """`olmo2kit serve --port 0 ARGS` until it prints its URL; stopped (SIGTERM) on the way out."""
    process = subprocess.Popen(
        [str(OLMO2KIT), "serve", "--port", "0", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OLMO2KIT_API_KEY": "", **(env or {})},
    )
    stderr: list[str] = []
    threading.Thread(target=lambda: stderr.extend(process.stderr), daemon=True).start()
    deadline = time.monotonic() + timeout
    url = None
    while url is None:
        line = process.stdout.readline()
        if not line:
            process.wait(10)
            raise AssertionError(f"olmo2kit serve exited with {process.returncode}: {''.join(stderr)}")
        url = (m := _URL.search(line)) and m.group(1)
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("olmo2kit serve printed no URL")
    server = Server(url, process, stderr)
    try:
        yield server
    finally:
        if process.poll() is None:  # SIGTERM first: a SIGKILLed vLLM server leaves its engine processes running
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


@pytest.fixture(scope="module")
def server(tiny_path) -> Iterator[Server]:
    """One server over the tiny checkpoint in fp32, shared by a module's tests."""
    with serving("--model", str(tiny_path), "--dtype", "fp32", "--max-batch-size", "16") as running:
        yield running
