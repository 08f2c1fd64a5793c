"""What an operator watches the server through: a request id, Prometheus metrics, one access-log line per request.

`Observe` is the app's outermost middleware. For each HTTP request it takes the client's `X-Request-Id` when it
is sane (at most 128 of `A-Z a-z 0-9 . _ : -`) or makes one, returns it in the `X-Request-Id` header of every
answer (errors and streams included), and keeps a record of the request in a context variable. Just before
the answer's last byte leaves, it counts the request in `Metrics` (the app's own Prometheus registry, served at
/metrics) and writes one JSON object on the "olmo2kit.access" logger, so a client that has read its answer sees
it counted. The request path adds what only it knows through `note_request`, `first_token`, `tokens` and
`error`, which do nothing outside a request:

    >>> note_request(served.name, body)            # doctest: +SKIP
    >>> first_token()                              # doctest: +SKIP  (the first call of a request counts)
    >>> tokens(prompt=12, completion=30)           # doctest: +SKIP  (the usage the answer reports)

`configure_logging` (for a server process) puts the id before the message of every record of olmo2kit's and
uvicorn's loggers, and sends the access log to stderr. `check_origin` is the rule for `--cors-origin`.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match

from olmo2kit.errors import Olmo2KitError

if TYPE_CHECKING:
    from olmo2kit.server.registry import ModelRegistry

REQUEST_ID_HEADER = "X-Request-Id"
LOGGED_PROMPT_CHARS = 2000  # --log-prompts: a prompt is cut here, so one request cannot flood the log
LOGGED_PATH_CHARS = 100  # a path is the client's to choose (a model's name in it): longer ones are cut in the middle
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# An origin as a browser sends it: scheme://host[:port], no path (not even "/"), no user, query or fragment.
_ORIGIN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?)"
                     r"(:(?P<port>[0-9]{1,5}))?")
# Seconds: a tiny model's first token takes milliseconds, a 32B model's after a long prompt several seconds.
_FIRST_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

access_log = logging.getLogger("olmo2kit.access")


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (two apps in one process count apart).

    Counters and histograms are updated by `Observe`; queue depth and running rows are read from each loaded
    model's scheduler when /metrics is scraped.
    """

    def __init__(self, models: ModelRegistry) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("olmo2kit_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=self.registry)
        self.prompt_tokens = Counter("olmo2kit_prompt_tokens", "Prompt tokens of the requests run (as their usage)",
                                     ["model"], registry=self.registry)
        self.completion_tokens = Counter("olmo2kit_completion_tokens",
                                         "Completion tokens of the requests run (as their usage)", ["model"],
                                         registry=self.registry)
        self.errors = Counter("olmo2kit_errors", "Error answers by OpenAI error type and code (code empty when "
                              "none); errors sent inside a stream included", ["type", "code"], registry=self.registry)
        self.first_token = Histogram("olmo2kit_time_to_first_token_seconds",
                                     "From a request's arrival to its first generated token", ["model"],
                                     buckets=_FIRST_TOKEN_BUCKETS, registry=self.registry)
        self.duration = Histogram("olmo2kit_request_duration_seconds",
                                  "From a request's arrival to its answer's last byte, streams included", ["route"],
                                  buckets=_DURATION_BUCKETS, registry=self.registry)
        self.registry.register(_SchedulerGauges(models))

    async def endpoint(self, request: Request) -> Response:
        """The /metrics route: Prometheus' text exposition format."""
        return Response(generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


class _SchedulerGauges(Collector):
    """Rows waiting and running on each loaded model's scheduler, read at scrape time."""

    def __init__(self, models: ModelRegistry) -> None:
        self.models = models

    def collect(self) -> Iterable[GaugeMetricFamily]:
        waiting = GaugeMetricFamily("olmo2kit_queue_depth", "Rows (choices of requests) waiting for a batch slot",
                                    labels=["model"])
        running = GaugeMetricFamily("olmo2kit_running_rows", "Rows being generated", labels=["model"])
        for served in list(self.models.loaded.values()):
            waiting.add_metric([served.name], served.scheduler.waiting)
            running.add_metric([served.name], served.scheduler.running)
        return [waiting, running]


# --- the request being answered -----------------------------------------------------------------------


@dataclass
class _Record:
    id: str
    start: float
    metrics: Metrics
    log_prompts: bool
    model: str | None = None
    prompt: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    first_token_s: float | None = None
    error_type: str | None = None
    error_code: str | None = None


_current: ContextVar[_Record | None] = ContextVar("olmo2kit_request", default=None)


def id_header() -> dict[str, str]:
    """`{"X-Request-Id": id}` of the request being answered (empty outside one), for an answer built outside
    `Observe` (Starlette answers a 500 from its own outermost middleware)."""
    record = _current.get()
    return {REQUEST_ID_HEADER: record.id} if record is not None else {}


def note_request(model: str, body) -> None:
    """The request runs on the served model `model`; `body` (the parsed request) gives the prompt or messages
    the access log shows with --log-prompts."""
    record = _current.get()
    if record is None:
        return
    record.model = model
    if record.log_prompts:
        record.prompt = _prompt_text(body)


def first_token() -> None:
    """The request's first token is out: its time since arrival goes to the time-to-first-token histogram
    (once; later calls do nothing)."""
    record = _current.get()
    if record is None or record.first_token_s is not None:
        return
    record.first_token_s = time.perf_counter() - record.start
    record.metrics.first_token.labels(record.model or "").observe(record.first_token_s)


def tokens(prompt: int, completion: int) -> None:
    """The request's token counts, as its usage reports them; counted when its answer ends (the last call
    before that counts)."""
    record = _current.get()
    if record is not None:
        record.prompt_tokens, record.completion_tokens = prompt, completion


def error(type: str, code: str | None = None) -> None:
    """The request is answered with OpenAI's error object of this `type` and `code` (an error status, or an
    error inside a stream)."""
    record = _current.get()
    if record is not None:
        record.error_type, record.error_code = type, code


def _prompt_text(body) -> str:
    if getattr(body, "messages", None) is not None:
        prompt = body.model_dump(mode="json", include={"messages"}, exclude_none=True)["messages"]
    else:
        prompt = getattr(body, "prompt", None)
    text = prompt if isinstance(prompt, str) else json.dumps(prompt)
    return text if len(text) <= LOGGED_PROMPT_CHARS else text[:LOGGED_PROMPT_CHARS] + "..."


# --- the middleware -----------------------------------------------------------------------------------


class Observe:
    """ASGI middleware, the app's outermost: the request id, the metrics and the access log of every HTTP request.

    `routes` (the app's) name a request's route for the metrics' labels by its template (/v1/models/{name:path}),
    so that clients cannot make up label values; a path no route matches is "unmatched".
    """

    def __init__(self, app, *, metrics: Metrics, routes: Sequence[BaseRoute], log_prompts: bool = False) -> None:
        self.app, self.metrics, self.routes, self.log_prompts = app, metrics, routes, log_prompts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        record = _Record(_request_id(scope), time.perf_counter(), self.metrics, self.log_prompts)
        # Left set on the way out: Starlette builds a 500 answer after this returns, and reads the id from here.
        # Each request runs in a task of its own, with a context of its own, so it reaches no other request.
        _current.set(record)
        route = self._route(scope)
        status: int | None = None
        finished = False
        id_bytes = record.id.encode()

        def finish() -> None:
            nonlocal finished
            if not finished:
                finished = True
                self._account(scope, route, status or 500, record)

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", id_bytes)]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finish()  # before the last byte leaves: a client that has its answer finds it counted
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if status is None:  # Starlette answers it with a 500 once this has returned
                record.error_type, record.error_code = "server_error", None
            raise
        finally:
            finish()

    def _route(self, scope) -> str:
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:  # PARTIAL: the path, another method (a 405)
                return getattr(route, "path", "unmatched")
        return "unmatched"

    def _account(self, scope, route: str, status: int, record: _Record) -> None:
        metrics = self.metrics
        seconds = time.perf_counter() - record.start
        metrics.requests.labels(route, str(status)).inc()
        metrics.duration.labels(route).observe(seconds)
        if record.prompt_tokens is not None:
            metrics.prompt_tokens.labels(record.model or "").inc(record.prompt_tokens)
            metrics.completion_tokens.labels(record.model or "").inc(record.completion_tokens or 0)
        if status >= 400 and record.error_type is None:  # an answer no handler of ours built (CORS refusals)
            record.error_type = "server_error" if status >= 500 else "invalid_request_error"
        if record.error_type is not None:
            metrics.errors.labels(record.error_type, record.error_code or "").inc()
        client = scope.get("client")
        line = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "request_id": record.id,
            "method": scope["method"],
            "path": _cut(scope["path"], LOGGED_PATH_CHARS),
            "status": status,
            "duration_ms": round(seconds * 1000, 1),
            "model": record.model,
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "first_token_ms": None if record.first_token_s is None else round(record.first_token_s * 1000, 1),
            "error_type": record.error_type,
            "error_code": record.error_code,
            "client": f"{client[0]}:{client[1]}" if client else None,
        }
        if record.log_prompts:
            line["prompt"] = record.prompt
        access_log.info(json.dumps(line))


def _cut(text: str, limit: int) -> str:
    """`text`, or past `limit` characters its start and end around "..."."""
    if len(text) <= limit:
        return text
    head = (limit - 3) * 2 // 3
    return f"{text[:head]}...{text[len(text) - (limit - 3 - head):]}"


def _request_id(scope) -> str:
    """The client's X-Request-Id when it is sane, else a new one: an id goes into every log line, so one a
    client chose may not be long or hold what a log reader would take for structure (spaces, quotes, newlines)."""
    for name, value in scope["headers"]:
        if name.lower() == b"x-request-id":
            given = value.decode("latin-1")
            if _SANE_ID.fullmatch(given):
                return given
            break
    return uuid.uuid4().hex


# --- logging ------------------------------------------------------------------------------------------


class RequestIdFilter(logging.Filter):
    """Every record gets `request_id` (the request being answered, "-" outside one); inside a request its
    message starts with `[id] `, whatever the handler's format."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = _current.get()
        record.request_id = current.id if current is not None else "-"
        if current is not None and not getattr(record, "_olmo2kit_id_shown", False):
            record.msg, record.args = f"[{current.id}] {record.getMessage()}", None
            record._olmo2kit_id_shown = True  # a record that passes two loggers' filters is prefixed once
        return True


def configure_logging() -> None:
    """For a server process (after uvicorn has configured its loggers): the request id on every record of
    olmo2kit's logger and uvicorn's error logger, and the access log as one JSON object a line on stderr.
    Calling it again changes nothing."""
    for name in ("olmo2kit", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RequestIdFilter) for f in logger.filters):
            logger.addFilter(RequestIdFilter())
    if not access_log.handlers:
        handler = logging.StreamHandler()  # stderr
        handler.setFormatter(logging.Formatter("%(message)s"))
        access_log.addHandler(handler)
        access_log.setLevel(logging.INFO)
        access_log.propagate = False  # olmo2kit's own handler would print it again as a warning


# --- browsers -----------------------------------------------------------------------------------------


def check_origin(origin: str) -> str:
    """`origin` if it is one a browser sends (scheme://host[:port]) or `*`; Olmo2KitError otherwise."""
    match = _ORIGIN.fullmatch(origin)
    if origin == "*" or (match and (match["port"] is None or 0 < int(match["port"]) <= 65535)):
        return origin
    raise Olmo2KitError(f"--cors-origin {origin!r} is not an origin: give scheme://host[:port] as the browser shows "
                        "it, with no path or trailing slash (e.g. http://localhost:3000), or *")
