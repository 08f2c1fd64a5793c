"""`olmo2kit serve --engine vllm`: vLLM's own OpenAI-compatible server over a model olmo2kit resolved.

olmo2kit names the model (a size alias, `repo@revision` or a directory: every name it is served under is
a `served_model_name`), downloads it, checks the request, binds the port; vLLM's API server then serves
on that socket with its AsyncLLM engine (continuous batching, paged attention, prefix caching, tensor and
pipeline parallelism). Requests that arrive while vLLM starts wait in the socket's queue.

Why vLLM's server and not vLLM's engine behind olmo2kit's routes: its routes are written for its engine
(streaming, logprobs, structured output, cancellation, data-parallel load balancing) and move with it;
olmo2kit's routes drive `BatchScheduler`, which vLLM's scheduler replaces whole. What differs from
`olmo2kit serve` on transformers: one model per server, vLLM's error texts, and vLLM's lenient request
bodies (unknown fields are ignored rather than refused).

What olmo2kit's own server promises at its edges holds here too: its header and idle timeouts (`run.timed_protocol`
as uvicorn's protocol), SIGTERM giving requests `SHUTDOWN_GRACE_S` and then ending what still runs with the error
object (vLLM's `--shutdown-timeout` drains its engine that long; `ServerEdges` ends the rest), and no checkpoint
path in a response (`ServerEdges` again, on `/v1/models`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import tempfile
from pathlib import Path

from olmo2kit.errors import Olmo2KitError
from olmo2kit.model.chat_template import OLMO2_CHAT_TEMPLATE
from olmo2kit.model.vllm import VllmModel, prepare_vllm
from olmo2kit.server.app import SHUTDOWN_GRACE_S
from olmo2kit.server.protocol import error_body
from olmo2kit.server.run import timed_protocol

_EXIT_POLL_S = 0.2  # how often a running request looks whether the server is exiting
_SHUTTING_DOWN = error_body("the server is shutting down: retry", type="server_error", code="unavailable")


def server_args(model: VllmModel, tokenizer, names: list[str], *, host: str, port: int, max_num_seqs: int,
                chat_template: str | None = None) -> list[str]:
    """The `vllm serve` command line for `model` under `names` (vLLM's own argument parser reads it)."""
    args = model.llm_args()
    argv = ["--model", args["model"], "--served-model-name", *names, "--host", host, "--port", str(port),
            "--tokenizer", args["tokenizer"], "--dtype", args["dtype"], "--load-format", args["load_format"],
            "--seed", str(args["seed"]), "--max-num-seqs", str(max_num_seqs),
            "--tensor-parallel-size", str(args["tensor_parallel_size"]),
            "--pipeline-parallel-size", str(args["pipeline_parallel_size"]),
            "--data-parallel-size", str(args["data_parallel_size"]),
            "--shutdown-timeout", str(SHUTDOWN_GRACE_S), "--middleware", f"{__name__}.{ServerEdges.__name__}"]
    if args.get("max_model_len"):
        argv += ["--max-model-len", str(args["max_model_len"])]
    if args.get("gpu_memory_utilization"):
        argv += ["--gpu-memory-utilization", str(args["gpu_memory_utilization"])]
    if args["enforce_eager"]:
        argv.append("--enforce-eager")
    if chat_template:
        argv += ["--chat-template", chat_template]
    return argv


def serve_with_vllm(model: VllmModel, tokenizer, names: list[str], sock: socket.socket, *, max_num_seqs: int,
                    api_key: str | None, header_timeout: float, idle_timeout: float) -> None:
    """Run vLLM's API server for `model` on the bound `sock` until SIGINT or SIGTERM."""
    prepare_vllm(model.device)
    # vLLM's API server runs its engine in a process of its own whatever VLLM_ENABLE_V1_MULTIPROCESSING says.
    os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    if api_key:
        os.environ["VLLM_API_KEY"] = api_key  # not on the command line, where `ps` would show it
    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server_worker
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    host, port = sock.getsockname()[:2]
    with tempfile.TemporaryDirectory(prefix="olmo2kit-vllm-") as tmp:
        template = None
        if not tokenizer.chat_template:  # a base model: the official OLMo 2 template, as olmo2kit's own routes use
            template = Path(tmp) / "olmo2_chat_template.jinja"
            template.write_text(OLMO2_CHAT_TEMPLATE)
        argv = server_args(model, tokenizer, names, host=host, port=port, max_num_seqs=max_num_seqs,
                           chat_template=None if template is None else str(template))
        parser = make_arg_parser(FlexibleArgumentParser(prog="olmo2kit serve --engine vllm"))
        try:
            args = parser.parse_args(argv)
            validate_parsed_serve_args(args)
        except (SystemExit, ValueError, TypeError) as e:
            raise Olmo2KitError(f"vLLM's server refused its options {' '.join(argv)}: {e}") from None
        protocol = timed_protocol(header_timeout, idle_timeout)
        uvloop.run(run_server_worker(f"http://{host}:{port}", sock, args, http=protocol,
                                     timeout_graceful_shutdown=SHUTDOWN_GRACE_S))


class ServerEdges:
    """ASGI middleware of vLLM's server (its `--middleware`).

    Once the server is exiting (vLLM sets `should_exit` when its engine has drained, `SHUTDOWN_GRACE_S` at most
    after SIGTERM), a request still running is ended with OpenAI's error object: a stream with it as its last event
    and `data: [DONE]`, a request not answered yet with a 503. vLLM's server would wait for its clients to hang up.
    `/v1/models` gives each model's name as its `root`, where vLLM gives the checkpoint's path on this machine.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"].startswith("/v1/models"):
            return await self.app(scope, receive, _roots_named(send))
        server = getattr(scope["app"].state, "server", None)
        response = _Watched(send)
        task = asyncio.ensure_future(self.app(scope, receive, response.send))
        while not task.done():
            await asyncio.wait({task}, timeout=_EXIT_POLL_S)
            if server is not None and server.should_exit and not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=1)
                return await response.end()
        return task.result()


class _Watched:
    """A response's `send`, remembering how far it got, so that it can be ended by someone else."""

    def __init__(self, send) -> None:
        self._send = send
        self.started = self.stream = self.finished = False

    async def send(self, message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            self.stream = dict(message.get("headers", [])).get(b"content-type", b"").startswith(b"text/event-stream")
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.finished = True
        await self._send(message)

    async def end(self) -> None:
        if self.finished or (self.started and not self.stream):  # a plain body cut short: only closing says so
            return
        if not self.started:
            body = json.dumps(_SHUTTING_DOWN).encode()
            await self._send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"1")]})
        else:
            body = f"data: {json.dumps(_SHUTTING_DOWN)}\n\ndata: [DONE]\n\n".encode()
        self.finished = True
        with contextlib.suppress(OSError):
            await self._send({"type": "http.response.body", "body": body, "more_body": False})


def _roots_named(send):
    """`send` for a `/v1/models` response, each model card's `root` set to its `id`."""
    held: list[dict] = []  # the response so far: its start, then its body's parts

    async def named(message) -> None:
        held.append(message)
        if message["type"] != "http.response.body" or message.get("more_body", False):
            return
        start, *parts = held
        body = b"".join(part.get("body", b"") for part in parts)
        with contextlib.suppress(ValueError):
            listing = json.loads(body)
            cards = listing.get("data", []) if isinstance(listing, dict) and listing.get("object") == "list" \
                else [listing]
            for card in cards:
                if isinstance(card, dict) and "root" in card and "id" in card:
                    card["root"] = card["id"]
            body = json.dumps(listing).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return named
