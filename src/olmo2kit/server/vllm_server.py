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
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

from olmo2kit.errors import Olmo2KitError
from olmo2kit.model.chat_template import OLMO2_CHAT_TEMPLATE
from olmo2kit.model.vllm import VllmModel, prepare_vllm


def server_args(model: VllmModel, tokenizer, names: list[str], *, host: str, port: int, max_num_seqs: int,
                chat_template: str | None = None) -> list[str]:
    """The `vllm serve` command line for `model` under `names` (vLLM's own argument parser reads it)."""
    args = model.llm_args()
    argv = ["--model", args["model"], "--served-model-name", *names, "--host", host, "--port", str(port),
            "--tokenizer", args["tokenizer"], "--dtype", args["dtype"], "--load-format", args["load_format"],
            "--seed", str(args["seed"]), "--max-num-seqs", str(max_num_seqs),
            "--tensor-parallel-size", str(args["tensor_parallel_size"]),
            "--pipeline-parallel-size", str(args["pipeline_parallel_size"]),
            "--data-parallel-size", str(args["data_parallel_size"])]
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
                    api_key: str | None) -> None:
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
        uvloop.run(run_server_worker(f"http://{host}:{port}", sock, args))
