"""The OpenAI-compatible ASGI app: `/v1/models`, `/v1/completions`, `/v1/chat/completions`, `/health`.

    >>> app = create_app(["1b-instruct"])                  # doctest: +SKIP
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)      # doctest: +SKIP

Requests run on each model's continuous-batching scheduler (`olmo2kit.inference.batching`); this module
turns the OpenAI request into token ids and sampling options, checks them (every bad field is a 400
with OpenAI's error object), and turns the scheduler's events back into OpenAI's responses or
server-sent-event chunks. Text, stop strings and end of text go through the same `Detokenizer` as
`olmo2kit.generate`.
"""

from __future__ import annotations

import asyncio
import codecs
import contextvars
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from olmo2kit.errors import Olmo2KitError
from olmo2kit.inference.batching import BatchRequest, Failed, Finished, PromptLogprobs, QueueFull, Token
from olmo2kit.inference.generation import Detokenizer, encode_requests
from olmo2kit.model.chat_template import check_messages
from olmo2kit.model.sizes import ContextExceeded, check_context
from olmo2kit.server import observability
from olmo2kit.server.observability import REQUEST_ID_HEADER, Metrics, Observe, check_origin
from olmo2kit.server.protocol import ChatCompletionRequest, CompletionRequest, error_body
from olmo2kit.server.registry import ModelNotFound, ModelRegistry, ModelsBusy, ModelUnavailable, ServedModel, shown
from olmo2kit.server.tokens import token_names

log = logging.getLogger("olmo2kit")

MAX_BODY_BYTES = 16 << 20  # a 4 MiB prompt, JSON-escaped, fits; a mistake (a whole file) does not
DEFAULT_NEW_TOKENS = 256  # max_tokens left out, when the model's context is unknown
# Seconds in-flight requests get after SIGINT or SIGTERM: streams keep going that long; a second before the end,
# whatever still runs is ended with an error object (see `ModelRegistry.stop`), so no client is cut off silently.
SHUTDOWN_GRACE_S = 5
CPU_WORKERS = 2  # threads that parse, tokenize, compile schemas and format answers, off the event loop
INLINE_BODY_BYTES = 16 << 10  # a body up to this is read and tokenized on the event loop: about a millisecond
# OpenAI's APIs that are not served, each a 400 saying so (README, "Not supported")
UNSUPPORTED_APIS = {"embeddings": "embeddings", "responses": "Responses", "fine_tuning": "fine-tuning",
                    "images": "images", "audio": "audio", "moderations": "moderations", "files": "files",
                    "batches": "batches", "assistants": "assistants", "threads": "assistants"}


class APIError(Exception):
    """An answer with OpenAI's error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.type, self.headers = status, param, code, type, headers

    def response(self) -> JSONResponse:
        observability.error(self.type, self.code)
        return JSONResponse(error_body(str(self), type=self.type, param=self.param, code=self.code),
                            status_code=self.status, headers={**(self.headers or {}), **observability.id_header()})


def create_app(models: Sequence[str] = (), *, dtype: str = "auto", quantize: str | None = None,
               device: str = "auto", max_batch_size: int = 16, max_queue: int = 256, max_models: int | None = None,
               allow_load: bool = False, api_key: str | None = None, preload: bool = True,
               loaded: dict[str, tuple] | None = None, load: Callable[[str], tuple] | None = None,
               cors_origins: Sequence[str] = (), log_prompts: bool = False) -> FastAPI:
    """The server's ASGI app over `models` (names as `olmo2kit.load` takes them).

    `loaded` serves models already in memory (`{"name": (model, tokenizer)}`); `preload` loads the
    named ones now rather than on first use. `allow_load` lets requests name other Hub models, kept
    in an LRU of `max_models`. `api_key` requires `Authorization: Bearer <key>` on every route but
    /health. `load` replaces how a name is loaded (default: `olmo2kit.load` with dtype, quantize, device).
    `cors_origins` lets browser pages from those origins call the API; `log_prompts` puts each request's prompt
    in its access-log line (`olmo2kit.server.observability` has the request id, /metrics and the access log).
    """
    cors_origins = [check_origin(origin) for origin in cors_origins]  # before a model loads
    if load is None:
        def load(name: str) -> tuple:
            from olmo2kit.model.loading import load as load_model

            return load_model(name, dtype=dtype, quantize=quantize, device=device)

    if max_models is None:
        max_models = max(1, len(models) + len(loaded or {}))
    registry = ModelRegistry(list(models), load, max_models=max_models, allow_load=allow_load,
                             max_batch_size=max_batch_size, max_queue=max_queue)
    for name, (model, tokenizer) in (loaded or {}).items():
        registry.add(name, model, tokenizer)
    if preload:
        registry.load_named()

    # Parsing, tokenizing, compiling a schema and formatting a long answer run here, never on the event loop, so
    # that one heavy request does not stall every other route; a few threads, so that they cannot starve the
    # schedulers' threads of the cores.
    pool = ThreadPoolExecutor(max_workers=CPU_WORKERS, thread_name_prefix="olmo2kit-cpu")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(registry.close)

    app = FastAPI(title="olmo2kit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.registry = registry
    app.add_middleware(_Guard, api_key=api_key, max_body=MAX_BODY_BYTES)
    if cors_origins:  # outside the guard: a browser's preflight carries no API key
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", REQUEST_ID_HEADER],
                           expose_headers=[REQUEST_ID_HEADER])
    metrics = Metrics(registry)
    app.add_middleware(Observe, metrics=metrics, routes=app.router.routes, log_prompts=log_prompts)  # outermost
    app.add_route("/metrics", metrics.endpoint, methods=["GET"])
    _add_error_handlers(app)
    _add_routes(app, registry, pool)
    return app


def _add_routes(app: FastAPI, registry: ModelRegistry, pool: ThreadPoolExecutor) -> None:
    async def off_loop(work: Callable, *args):
        # in the request's context, so that log lines written there carry its request id
        return await asyncio.get_running_loop().run_in_executor(pool, contextvars.copy_context().run, work, *args)

    async def inline(work: Callable, *args):
        return work(*args)

    def where(raw: bytes) -> Callable:
        """Where a request's parsing and tokenizing run: a small body on the event loop (a hop to a thread and back
        costs more than the work), a large one off it."""
        return off_loop if len(raw) > INLINE_BODY_BYTES else inline

    @app.get("/health")
    async def health():
        failed = registry.failures()
        if failed:  # a model the operator named does not load: the server cannot do what it was started for
            return JSONResponse({"status": "error", "models": {name: f"failed to load: {why}"
                                                               for name, why in failed.items()}}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [_model_card(m) for m in registry.names()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict:
        for served in registry.names():
            if _model_card(served)["id"] == name:
                return _model_card(served)
        raise APIError(404, f"model {shown(name)} is not served", param="model", code="model_not_found")

    @app.post("/v1/completions")
    async def completions(request: Request):
        raw = await _body(request)
        cpu = where(raw)
        body = await cpu(_parse, CompletionRequest, raw)
        served = await _served(registry, body.model)
        observability.note_request(served.name, body)  # before the checks, so that a 400 is logged with its model
        job = await cpu(_completion_job, served, body)
        # log probabilities (of an echoed prompt, say) make a long answer to format
        return await _respond(request, served, job, _CompletionFormat(body),
                              off_loop if body.logprobs is not None else cpu)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await _body(request)
        cpu = where(raw)
        body = await cpu(_parse, ChatCompletionRequest, raw)
        served = await _served(registry, body.model)
        observability.note_request(served.name, body)  # before the checks, so that a 400 is logged with its model
        heavy = body.response_format is not None or body.logprobs  # a schema may take seconds to compile
        job = await (off_loop if heavy else cpu)(_chat_job, served, body)
        return await _respond(request, served, job, _ChatFormat(body), off_loop if heavy else cpu)

    for api, title in UNSUPPORTED_APIS.items():
        for path in (f"/v1/{api}", f"/v1/{api}/{{rest:path}}"):
            app.add_api_route(path, _refusal(title), methods=["GET", "POST", "DELETE"], include_in_schema=False)


def _refusal(title: str) -> Callable:
    """The route of an OpenAI API the server does not serve: a 400 saying so."""
    async def unsupported():
        raise APIError(400, f"the {title} API is not supported by olmo2kit serve: it serves /v1/completions and "
                            "/v1/chat/completions", code="unsupported_api")

    return unsupported


def _model_card(served: ServedModel | str) -> dict:
    if isinstance(served, str):
        return {"id": served, "object": "model", "created": 0, "owned_by": "olmo2kit", "loaded": False}
    return {"id": served.name, "object": "model", "created": served.created, "owned_by": "olmo2kit",
            "loaded": True, "max_model_len": served.context_length}


async def _served(registry: ModelRegistry, name: str) -> ServedModel:
    try:
        return await registry.get(name)
    except ModelNotFound as e:
        raise APIError(404, str(e), param="model", code="model_not_found") from None
    except ModelsBusy as e:
        raise APIError(503, str(e), type="server_error", code="model_slots_busy",
                       headers={"Retry-After": "1"}) from None
    except ModelUnavailable as e:
        raise APIError(503, str(e), type="server_error", code="model_load_failed") from None


async def _body(request: Request) -> bytes:
    try:
        return await request.body()
    except ClientDisconnect:  # the client left before sending the whole body: nobody to answer
        raise APIError(400, "the client disconnected before sending the whole body") from None


def _parse(kind, raw: bytes):
    """The request body `raw` (JSON) as `kind`, checked; APIError 400 saying what is wrong."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise APIError(400, f"the body is not valid JSON ({e.__class__.__name__}): send a JSON object") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    try:
        parsed = kind.model_validate(body)
    except ValidationError as e:
        errors = e.errors()
        param = _param(errors[0]["loc"])
        # A field of several types fails once per type: the error past the type check says the most.
        same = [error for error in errors if _param(error["loc"]) == param]
        first = next((error for error in same if not error["type"].endswith("_type")), same[0])
        if first["type"] == "extra_forbidden":
            message = f"unrecognized request argument supplied: {param}"
        elif first["type"] == "missing":
            message = f"missing required parameter: {param}"
        else:
            message = f"invalid value for {param or 'the body'}: {first['msg']}"
        raise APIError(400, message, param=param or None, code="invalid_value") from None
    if parsed.stream_options is not None and not parsed.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options",
                       code="invalid_value")
    return parsed


def _param(loc: tuple) -> str:
    """The field a pydantic error location names, without the type tags it adds for a field of several types
    (`str`, `list[int]`, `StreamOptions`, `function-after[...]`)."""
    return ".".join(str(p) for p in loc if isinstance(p, int) or not (
        p in ("str", "int", "float", "bool") or "[" in p or "-" in p or p[:1].isupper()))


# --- what to run --------------------------------------------------------------------------------------


@dataclass
class _Job:
    """The rows to run for one request: a prompt's ids and options for each choice."""

    prompts: list[list[int]]  # one per prompt; each runs n times
    requests: list[BatchRequest]  # prompt-major: prompt i, choice j is i * n + j
    stop: tuple[str, ...]
    n: int
    constraint_of: Callable[[], object] | None = None
    prompt_texts: list[str] = field(default_factory=list)  # each prompt's text, for echo only
    choices: list[_Choice] = field(default_factory=list)  # filled as the rows are submitted


def _completion_job(served: ServedModel, body: CompletionRequest) -> _Job:
    tokenizer = served.tokenizer
    prompt = body.prompt
    if isinstance(prompt, str) or (prompt and all(isinstance(p, str) for p in prompt)):
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        _check_rows(served, len(texts), body.n)
        for text in texts:
            if not text:
                raise APIError(400, "the prompt is empty: give some text to continue", param="prompt")
        ids = _checked(lambda: encode_requests(tokenizer, texts, served.context_length), "prompt")
    else:
        ids = [prompt] if prompt and isinstance(prompt[0], int) else list(prompt)
        _check_rows(served, len(ids), body.n)
        if not ids or any(not row for row in ids):
            raise APIError(400, "the prompt is empty: give some text or token ids", param="prompt")
        # the context before a pass over every id
        _checked(lambda: check_context(max(len(row) for row in ids), 0, served.context_length), "prompt")
        vocab = served.model.config.vocab_size
        if any(not 0 <= t < vocab for row in ids for t in row):
            raise APIError(400, f"a prompt token id is outside the vocabulary (0 to {vocab - 1})", param="prompt")
        texts = None
    if body.best_of not in (None, body.n):
        raise APIError(400, "best_of must equal n: choices are not ranked on the server", param="best_of")
    job = _job(served, body, ids, body.max_tokens, "the prompt",
               logprobs=body.logprobs, prompt_logprobs=body.echo and body.logprobs is not None)
    if body.echo:  # token ids are decoded only to be echoed, once they are known to fit the context
        job.prompt_texts = texts or [tokenizer.decode(row) for row in ids]
    if body.logprobs is not None:
        token_names(tokenizer)  # built here, off the event loop, on first use
    return job


def _chat_job(served: ServedModel, body: ChatCompletionRequest) -> _Job:
    _check_rows(served, 1, body.n)
    # OpenAI's `developer` role is what the system role is for models that have no other (as OLMo 2 has none)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    ids = _checked(lambda: encode_requests(served.tokenizer, [check_messages(messages)], served.context_length),
                   "messages")
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise APIError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    job = _job(served, body, ids, body.max_completion_tokens or body.max_tokens, "the conversation",
               logprobs=logprobs, prompt_logprobs=False)
    if body.logprobs:
        token_names(served.tokenizer)  # built here, off the event loop, on first use
    if body.response_format is not None and body.response_format.type != "text":
        from olmo2kit.server.grammar import constraint_factory

        job.constraint_of = _checked(lambda: constraint_factory(
            body.response_format.model_dump(by_alias=True, exclude_none=True), served.tokenizer,
            served.model.config.vocab_size, served.scheduler.eos_ids), "response_format")
    return job


def _check_rows(served: ServedModel, prompts: int, n: int) -> None:
    """A 400 for a request of more rows (n choices of each prompt) than the model's queue can ever hold: it
    could never be queued whole, so a 503 to retry would be a lie."""
    limit = served.scheduler.max_queue
    if prompts * n > limit:
        raise APIError(400, f"the request asks for {prompts * n} generations ({prompts} prompts x n={n}); this "
                            f"server queues at most {limit} per request (--max-queue): send fewer at a time",
                       param="n" if n > 1 else "prompt", code="too_many_rows")


def _job(served: ServedModel, body, ids: list[list[int]], max_tokens: int | None, what: str, *,
         logprobs: int | None, prompt_logprobs: bool) -> _Job:
    context = served.context_length
    requests = []
    for row in ids:
        new = max_tokens if max_tokens is not None else (context - len(row) if context else DEFAULT_NEW_TOKENS)
        try:
            check_context(len(row), max(new, 0), context, prompt=what, new="max_tokens")
        except Olmo2KitError as e:
            whole = "prompt" if what == "the prompt" else "messages"
            raise APIError(400, str(e), param="max_tokens" if len(row) < (context or 0) else whole,
                           code="context_length_exceeded") from None
        for j in range(body.n):
            seed = None if body.seed is None else (body.seed + j) % 2**63
            requests.append(BatchRequest(
                row, new, temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p, seed=seed, logprobs=logprobs,
                prompt_logprobs=prompt_logprobs))
    return _Job(ids, requests, body.stops(), body.n)


def _checked(make: Callable, param: str):
    try:
        return make()
    except ContextExceeded as e:
        raise APIError(400, str(e), param=param, code="context_length_exceeded") from None
    except Olmo2KitError as e:
        raise APIError(400, str(e), param=param) from None


# --- running it ---------------------------------------------------------------------------------------


@dataclass
class _Piece:
    """New output of one choice: text, the tokens behind it, and the finish reason on its last piece."""

    text: str = ""
    tokens: list[Token] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class _Choice:
    handle: object
    detokenizer: Detokenizer
    tokens: list[Token] = field(default_factory=list)
    reported: int = 0
    prompt: PromptLogprobs | None = None
    started: bool = False  # a chunk of it was sent

    @property
    def done(self) -> bool:
        return self.detokenizer.finished

    @property
    def generated(self) -> int:
        """Tokens the row has generated, end of text included, cut back to a stop string."""
        return len(self.detokenizer.ids)

    def pieces(self, chunks) -> list[_Piece]:
        out = []
        for chunk in chunks:
            tokens = self.tokens[self.reported: self.reported + len(chunk.token_ids)]
            self.reported += len(chunk.token_ids)
            out.append(_Piece(chunk.text, tokens, chunk.finish_reason))
        return out


async def _run(request: Request, served: ServedModel, job: _Job) -> AsyncIterator[tuple[int, _Piece]]:
    """(choice, piece) as the scheduler's events come in; every row is cancelled when this ends early."""
    events: asyncio.Queue = asyncio.Queue()
    inbox = served.inbox()
    choices = job.choices
    start = time.perf_counter()
    watcher = asyncio.create_task(_watch_disconnect(request, events))
    try:
        for i, row in enumerate(job.requests):
            if job.constraint_of is not None:
                row.constraint = job.constraint_of()
            try:
                handle = served.scheduler.submit(row, lambda e, i=i: inbox.put(events, (i, e)))
            except QueueFull:
                raise
            except Olmo2KitError as e:  # what the engine cannot run (beyond a context the server did not know)
                raise APIError(400, str(e), type="invalid_request_error") from None
            detokenizer = Detokenizer(served.tokenizer, job.stop, served.scheduler.eos_ids, len(row.prompt), start,
                                      stream=True)
            choices.append(_Choice(handle, detokenizer))
        while not all(c.done for c in choices):
            i, event = await events.get()
            if i is None:  # the client has gone
                return
            choice = choices[i]
            if choice.done:
                continue
            if isinstance(event, Failed) and event.closed:
                raise APIError(503, f"{event.message}: retry", type="server_error", code="unavailable",
                               headers={"Retry-After": "1"})
            if isinstance(event, Failed) and event.by_request:
                raise APIError(400, event.message, type="invalid_request_error")
            if isinstance(event, Failed):
                raise APIError(500, event.message, type="server_error")
            if isinstance(event, PromptLogprobs):
                choice.prompt = event
                continue
            if isinstance(event, Token):
                observability.first_token()
                choice.tokens.append(event)
                chunks = list(choice.detokenizer.add([event.id]))
            else:
                chunks = list(choice.detokenizer.finish()) if isinstance(event, Finished) else []
            for piece in choice.pieces(chunks):
                yield i, piece
            if choice.done:
                choice.handle.cancel()  # a stop string ends a row the scheduler would go on with
    except QueueFull as e:
        raise APIError(503, f"the server is at capacity ({e}): retry shortly", type="server_error",
                       code="queue_full", headers={"Retry-After": "1"}) from None
    finally:
        watcher.cancel()
        for choice in choices:
            choice.handle.cancel()
        if choices:
            usage = _usage(job)
            observability.tokens(usage["prompt_tokens"], usage["completion_tokens"])


async def _watch_disconnect(request: Request, events: asyncio.Queue) -> None:
    """Put (None, None) on `events` when the client disconnects (the body has been read: what comes next
    on the connection is its end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    events.put_nowait((None, None))


async def _respond(request: Request, served: ServedModel, job: _Job, fmt, cpu: Callable):
    """The whole response, or its stream of server-sent events."""
    body = fmt.body
    if body.stream:
        first = _run(request, served, job)
        try:  # a full queue or a bad row is an HTTP error before the stream starts
            head = await anext(first)
        except StopAsyncIteration:
            head = None

        async def events():
            try:
                if head is not None:
                    yield {"data": json.dumps(fmt.chunk(job, *head))}
                async for i, piece in first:
                    yield {"data": json.dumps(fmt.chunk(job, i, piece))}
                if body.stream_options and body.stream_options.include_usage:
                    yield {"data": json.dumps(fmt.usage_chunk(job))}
            except APIError as e:
                observability.error(e.type, e.code)
                yield {"data": json.dumps(error_body(str(e), type=e.type, param=e.param, code=e.code))}
            yield {"data": "[DONE]"}

        return EventSourceResponse(events(), ping=15, sep="\n", shutdown_grace_period=SHUTDOWN_GRACE_S)
    pieces: dict[int, list[_Piece]] = {}
    async for i, piece in _run(request, served, job):
        pieces.setdefault(i, []).append(piece)
    return await cpu(fmt.response, job, pieces)


def _usage(job: _Job) -> dict:
    prompt = sum(len(p) for p in job.prompts)
    completion = sum(c.generated for c in job.choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _Format:
    """One API's response shapes."""

    object = ""
    chunk_object = ""

    def __init__(self, body) -> None:
        self.body = body
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def envelope(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.body.model,
                "choices": choices, **extra}

    def usage_chunk(self, job: _Job) -> dict:
        return self.envelope(self.chunk_object, [], usage=_usage(job))

    def response(self, job: _Job, pieces: dict[int, list[_Piece]]) -> JSONResponse:
        """The whole response: each choice's pieces joined into one."""
        choices = []
        for i in range(len(job.choices)):
            mine = pieces.get(i, [])
            joined = _Piece("".join(p.text for p in mine), [t for p in mine for t in p.tokens],
                            mine[-1].finish_reason if mine else None)
            choices.append(self.whole(job, i, joined))
        return JSONResponse(self.envelope(self.object, choices, usage=_usage(job)))


class _CompletionFormat(_Format):
    prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def whole(self, job: _Job, i: int, piece: _Piece) -> dict:
        prompt = job.prompt_texts[i // job.n] if self.body.echo else ""
        return {"index": i, "text": prompt + piece.text, "logprobs": self.logprobs(job, job.choices[i], piece.tokens),
                "finish_reason": piece.finish_reason}

    def chunk(self, job: _Job, i: int, piece: _Piece) -> dict:
        choice = job.choices[i]
        echo = self.body.echo and not choice.started
        choice.started = True
        text = job.prompt_texts[i // job.n] + piece.text if echo else piece.text
        logprobs = self.logprobs(job, choice, piece.tokens, with_prompt=echo)
        return self.envelope(self.chunk_object, [{"index": i, "text": text, "logprobs": logprobs,
                                                  "finish_reason": piece.finish_reason}])

    def logprobs(self, job: _Job, choice: _Choice, tokens: list[Token], with_prompt: bool = True) -> dict | None:
        if self.body.logprobs is None:
            return None
        names = token_names(choice.detokenizer.tokenizer)
        if self.body.echo and with_prompt and choice.prompt is not None:
            tokens = choice.prompt.tokens + tokens
        out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        # Offsets count the characters of the text so far; a token ending inside a character adds none yet.
        offset, text = 0, codecs.getincrementaldecoder("utf-8")("replace")
        for token in tokens:
            out["tokens"].append(names.name(token.id))
            out["token_logprobs"].append(token.logprob)
            out["top_logprobs"].append({names.name(t): lp for t, lp in token.top} if token.top is not None else None)
            out["text_offset"].append(offset)
            offset += len(text.decode(names.data(token.id)))
        return out


class _ChatFormat(_Format):
    prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def whole(self, job: _Job, i: int, piece: _Piece) -> dict:
        return {"index": i, "message": {"role": "assistant", "content": piece.text},
                "finish_reason": piece.finish_reason, "logprobs": self.logprobs(job.choices[i], piece.tokens)}

    def chunk(self, job: _Job, i: int, piece: _Piece) -> dict:
        choice = job.choices[i]
        delta: dict = {"content": piece.text}
        if not choice.started:
            choice.started = True
            delta = {"role": "assistant", **delta}
        logprobs = self.logprobs(choice, piece.tokens)
        return self.envelope(self.chunk_object, [{"index": i, "delta": delta, "logprobs": logprobs,
                                                  "finish_reason": piece.finish_reason}])

    def logprobs(self, choice: _Choice, tokens: list[Token]) -> dict | None:
        if not self.body.logprobs:
            return None
        names = token_names(choice.detokenizer.tokenizer)

        def entry(token: int, logprob: float) -> dict:
            return {"token": names.name(token), "logprob": logprob, "bytes": names.bytes(token)}

        return {"content": [{**entry(t.id, t.logprob),
                             "top_logprobs": [entry(a, lp) for a, lp in (t.top or [])]} for t in tokens]}


# --- the edges: key, body size, errors ----------------------------------------------------------------


class _Guard:
    """ASGI middleware: the API key (constant-time compare) on every route but /health, and the body size."""

    def __init__(self, app, *, api_key: str | None, max_body: int) -> None:
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key and scope["path"] != "/health" and not self._authorized(scope):
            refused = APIError(401, "incorrect or missing API key: send Authorization: Bearer <key>",
                               code="invalid_api_key")
            return await refused.response()(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            return await self._too_large()(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise _BodyTooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _BodyTooLarge:
            await self._too_large()(scope, receive, send)

    def _authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, key = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(key.strip(), self.api_key.encode())

    def _too_large(self) -> JSONResponse:
        return APIError(413, f"the request body is over {self.max_body:,} bytes").response()


class _BodyTooLarge(Exception):
    pass


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return APIError(error.status_code, message.get(error.status_code, str(error.detail)),
                        headers=getattr(error, "headers", None)).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):
        log.error("request failed: %s: %s", type(error).__name__, error)
        return APIError(500, "internal error: the server log has the details", type="server_error").response()
