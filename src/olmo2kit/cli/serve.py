"""olmo2kit serve: the OpenAI-compatible server (`olmo2kit.server`) on a port."""

from __future__ import annotations

import ipaddress
import socket
from typing import Annotated

import typer

from olmo2kit.cli.common import load_model, pick_engine, vllm_options
from olmo2kit.cli.options import (
    DataParallelOpt,
    DeviceOpt,
    DtypeOpt,
    EnforceEagerOpt,
    EngineOpt,
    GpuMemoryOpt,
    MaxModelLenOpt,
    PipelineParallelOpt,
    QuantizeOpt,
    TensorParallelOpt,
)
from olmo2kit.cli.output import info
from olmo2kit.errors import Olmo2KitError


def serve(
    models: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", help="A model to serve (repeatable): size alias, repo id, repo@revision or "
                                           "local directory."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 reaches other machines.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8000,
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
    device: DeviceOpt = "auto",
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", help="Requests decoded together.")] = 16,
    max_queue: Annotated[
        int, typer.Option("--max-queue", help="Requests waiting for a batch slot; past it, 503 at once.")
    ] = 256,
    max_models: Annotated[
        int | None, typer.Option("--max-models", help="Models kept loaded (default: those named, at least 1).")
    ] = None,
    allow_load: Annotated[
        bool, typer.Option("--allow-load", help="Let requests name other Hub models, loaded on first use.")
    ] = False,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="OLMO2KIT_API_KEY", show_envvar=True,
                     help="Require Authorization: Bearer KEY on every route but /health."),
    ] = None,
    preload: Annotated[
        bool, typer.Option("--preload/--no-preload", help="Load the named models before listening, or on first use.")
    ] = True,
    header_timeout: Annotated[  # nginx's client_header_timeout is 60 s; a request head is one packet
        float, typer.Option("--header-timeout", help="Seconds a connection has to send a whole request head.")
    ] = 10.0,
    idle_timeout: Annotated[  # uvicorn's keep-alive is 5 s, nginx's client_body_timeout 60 s
        float, typer.Option("--idle-timeout", help="Seconds a connection may stay silent between requests or "
                                                   "within a body before it is closed.")
    ] = 15.0,
    cors_origins: Annotated[
        list[str] | None,
        typer.Option("--cors-origin", help="Let browser pages from this origin (scheme://host[:port], or *) call "
                                           "the API (repeatable; default: none)."),
    ] = None,
    log_prompts: Annotated[
        bool, typer.Option("--log-prompts", help="Put each request's prompt or messages (cut at 2000 characters) "
                                                 "in its access-log line on stderr.")
    ] = False,
    engine: EngineOpt = "auto",
    tensor_parallel_size: TensorParallelOpt = 1,
    pipeline_parallel_size: PipelineParallelOpt = 1,
    data_parallel_size: DataParallelOpt = 1,
    gpu_memory_utilization: GpuMemoryOpt = 0.9,
    max_model_len: MaxModelLenOpt = None,
    enforce_eager: EnforceEagerOpt = False,
) -> None:
    """Serve OLMo 2 over the OpenAI API: /v1/completions, /v1/chat/completions, /v1/models.

    Examples:

        olmo2kit serve --model 1b-instruct

        olmo2kit serve -m allenai/OLMo-2-0425-1B@stage1-step140000-tokens294B -m 1b --port 8080

        OLMO2KIT_API_KEY=... olmo2kit serve -m 1b-instruct --host 0.0.0.0

        olmo2kit serve -m 32b-instruct --engine vllm --tensor-parallel-size 4   (vLLM's own server, one model)
    """
    names = models or []
    if not names and not allow_load:
        raise Olmo2KitError("no model to serve: pass --model (e.g. --model 1b-instruct), or --allow-load")
    for value, name, low in ((max_batch_size, "--max-batch-size", 1), (max_queue, "--max-queue", 1),
                             (max_models if max_models is not None else 1, "--max-models", 1)):
        if value < low:
            raise Olmo2KitError(f"{name} must be at least {low}, got {value}")
    for value, name in ((header_timeout, "--header-timeout"), (idle_timeout, "--idle-timeout")):
        if not value > 0:
            raise Olmo2KitError(f"{name} must be a number of seconds above 0, got {value}")
    timeouts = {"header_timeout": header_timeout, "idle_timeout": idle_timeout}
    if cors_origins:
        from olmo2kit.server.observability import check_origin

        for origin in cors_origins:
            check_origin(origin)
    vllm = vllm_options(tensor_parallel_size, pipeline_parallel_size, data_parallel_size, gpu_memory_utilization,
                        max_model_len, enforce_eager, engine)
    one = len(names) == 1 and not allow_load and max_models is None
    # "auto" and vLLM look at the one model; llama.cpp runs every model, each converted to GGUF as it loads
    chosen, note = pick_engine(engine, names[0] if names else "", quantize, device, vllm, dtype=dtype,
                               cpu_llamacpp=True) \
        if engine == "llamacpp" or (engine != "transformers" and one) else ("transformers", None)
    if chosen == "vllm" and (cors_origins or log_prompts):
        raise Olmo2KitError("--cors-origin and --log-prompts are not served with --engine vllm (vLLM's own server): "
                            "leave them out, or serve on --engine transformers")
    if chosen == "vllm":
        _serve_with_vllm(names[0], _bind(host, port), note, host, dtype, device, vllm, max_batch_size, api_key,
                         timeouts)
        return
    if engine == "vllm":
        raise Olmo2KitError("--engine vllm serves one model through vLLM's own server: give one --model, "
                            "without --allow-load or --max-models")
    if vllm is not None:
        raise Olmo2KitError("--tensor-parallel-size and the other vLLM engine options need --engine vllm")
    sock = _bind(host, port)
    from olmo2kit.server.app import create_app
    from olmo2kit.server.run import run

    def load(name: str):
        return load_model(name, None, dtype, quantize, device, engine=chosen, batched=True)

    app = create_app(names, max_batch_size=max_batch_size, max_queue=max_queue, max_models=max_models,
                     allow_load=allow_load, api_key=api_key, preload=preload, load=load,
                     cors_origins=cors_origins or (), log_prompts=log_prompts)
    served = app.state.registry.served()
    _announce(sock, host, api_key, note, ", ".join(served) or "models loaded on first use")
    run(app, sock, **timeouts)


def _serve_with_vllm(name: str, sock: socket.socket, note: str | None, host: str, dtype: str, device: str, vllm,
                     max_batch_size: int, api_key: str | None, timeouts: dict) -> None:
    """Resolve, download and check the model, then hand it and the bound socket to vLLM's API server."""
    from olmo2kit.model.loading import resolve_model
    from olmo2kit.server.registry import served_names
    from olmo2kit.server.vllm_server import serve_with_vllm

    loaded, tokenizer = load_model(name, None, dtype, None, device, engine="vllm", vllm=vllm, start=False)
    ref = resolve_model(name)
    # A directory under the name olmo2kit's own server gives it; a Hub model as given and as the repo@revision it is.
    names = served_names([name]) if ref.local else list(dict.fromkeys([name, str(ref)]))
    _announce(sock, host, api_key, note, ", ".join(names), " (vLLM; ready when /health answers)")
    serve_with_vllm(loaded, tokenizer, names, sock, max_num_seqs=max_batch_size, api_key=api_key, **timeouts)


def _announce(sock: socket.socket, host: str, api_key: str | None, note: str | None, what: str,
              suffix: str = "") -> None:
    """Once the models have loaded (an error about them stays one line): the engine `note`, a warning for an
    open address without a key, and the `serving WHAT at URL` line on stdout."""
    if note:
        info(note)
    bound_host, bound_port = sock.getsockname()[:2]
    if not _loopback(host) and not api_key:
        info(f"warning: listening on {host} without --api-key: anyone who reaches port {bound_port} can use it")
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"serving {what} at http://{shown}:{bound_port}/v1{suffix}", flush=True)


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before any model loads, so that a taken port fails at once; clients that
    connect before the server is up wait in its queue."""
    if not 0 <= port <= 65535:
        raise Olmo2KitError(f"--port must be from 0 to 65535, got {port}")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # asyncio sets TCP_NODELAY only then
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)  # from here connections queue until the server accepts them, never refused
    except OSError as e:
        raise Olmo2KitError(f"cannot listen on {host}:{port} ({e.strerror or e}): choose another --port or --host") \
            from None
    sock.set_inheritable(True)
    return sock


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
