"""`olmo2kit bench` and `estimate`: the speed and memory numbers to check before a download."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from olmo2kit.cli.common import pick_engine, vllm_options
from olmo2kit.cli.options import (
    DataParallelOpt,
    DeviceOpt,
    DtypeOpt,
    EnforceEagerOpt,
    EngineOpt,
    GpuMemoryOpt,
    JsonOpt,
    MaxModelLenOpt,
    PipelineParallelOpt,
    QuantizeOpt,
    RevisionOpt,
    TensorParallelOpt,
)
from olmo2kit.cli.output import ProgressBar, format_bytes, info, print_table
from olmo2kit.errors import Olmo2KitError
from olmo2kit.model.sizes import DEFAULT_MODEL


def bench(
    model: Annotated[str | None, typer.Option("--model", "-m", help="Alias, repo id, repo@rev or directory.")] = None,
    size: Annotated[str | None, typer.Option(help="With --random-init: 1b, 7b, 13b or 32b.")] = None,
    random_init: Annotated[bool, typer.Option("--random-init", help="Exact architecture, random weights.")] = False,
    revision: RevisionOpt = None,
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
    device: DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Sequences decoded together.")] = 1,
    prompt_len: Annotated[int, typer.Option("--prompt-len", help="Prompt tokens.")] = 32,
    new_tokens: Annotated[int, typer.Option("--new-tokens", help="Tokens to generate.")] = 128,
    compile: Annotated[bool, typer.Option("--compile", help="Static cache + compiled decode step.")] = False,
    repeat: Annotated[int, typer.Option(help="Timed runs after one warm-up; medians are reported.")] = 3,
    as_json: JsonOpt = False,
    engine: EngineOpt = "auto",
    tensor_parallel_size: TensorParallelOpt = 1,
    pipeline_parallel_size: PipelineParallelOpt = 1,
    data_parallel_size: DataParallelOpt = 1,
    gpu_memory_utilization: GpuMemoryOpt = 0.9,
    max_model_len: MaxModelLenOpt = None,
    enforce_eager: EnforceEagerOpt = False,
) -> None:
    """Measure load time, time to first token, prefill and decode speed, peak memory, bandwidth floor.

    Examples:

      olmo2kit bench --size 1b --random-init

      olmo2kit bench --size 7b --random-init --compile --batch-size 16 --json

      olmo2kit bench --model ./tiny --new-tokens 64

      olmo2kit bench --size 7b --random-init --engine vllm --batch-size 64
    """
    from olmo2kit.compat import quiet_transformers
    from olmo2kit.evals.bench import bench as run_bench
    from olmo2kit.model.engines import engine_name

    quiet_transformers()
    vllm = vllm_options(tensor_parallel_size, pipeline_parallel_size, data_parallel_size, gpu_memory_utilization,
                        max_model_len, enforce_eager, engine)
    engine, note = pick_engine(engine, model or size or DEFAULT_MODEL, quantize, device, vllm,
                               "--compile" if compile else None)
    if not random_init and size:
        model = model or size
    what = f"{size or model} with random weights" if random_init else model or DEFAULT_MODEL
    result = run_bench(model, size=size, random_init=random_init, dtype=dtype, quantize=quantize, device=device,
                       batch_size=batch_size, prompt_len=prompt_len, new_tokens=new_tokens, compile=compile,
                       repeat=repeat, revision=revision, progress=_progress(what, note), engine=engine, vllm=vllm)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    rows = [("metric", "value")]
    rows += [
        ("model", f"{result.model} on {result.device}, "
                  + (f"GGUF {result.dtype}" if result.engine == "llamacpp" else result.dtype)
                  + (f", {quantize}" if quantize and result.engine != "llamacpp" else "")),
        ("engine", f"{result.engine} {result.engine_version}"),
        ("setting", f"batch {batch_size}, prompt {prompt_len}, {new_tokens} new tokens"
                    + (", compiled" if compile else "") + f", median of {repeat}"),
        ("load", f"{result.load_s:.2f} s"),
        ("time to first token", f"{result.ttft_s * 1000:.1f} ms"),
        ("prefill", f"{result.prefill_tokens_per_s:,.0f} tokens/s"),
        ("decode", f"{result.decode_tokens_per_s:,.1f} tokens/s ({result.ms_per_token:.2f} ms/token)"),
        ("peak memory (process)" if result.device == "CPU" else "peak memory (GPU)",
         f"- (in {engine_name(result.engine)}'s engine)" if result.peak_memory_gb is None
         else f"{result.peak_memory_gb:.2f} GB"),
        ("weights in memory", format_bytes(result.weight_bytes)),
        ("bytes read per decode step",
         format_bytes(result.bytes_per_step) + " (weights less input embeddings, KV cache)"),
        ("memory bandwidth (measured)", f"{result.bandwidth_gbps:,.0f} GB/s"),
        ("bandwidth floor (per sequence)", f"{result.floor_tokens_per_s:,.0f} tokens/s"),
        ("reached (per sequence)", f"{100 * result.floor_fraction:.0f}% of the floor"),
    ]
    print_table(rows)


def _progress(what: str, note: str | None = None):
    """bench's progress on stderr: a line as loading starts (and the engine `note`), a bar over the runs, a line
    for the bandwidth."""
    bar = None

    def show(stage: str, done: int, total: int) -> None:
        nonlocal bar
        if stage == "load":
            info(f"loading {what}")
            if note:
                info(note)
        elif stage == "runs":
            bar = bar or ProgressBar("runs", interval=0, first=0)
            bar.update(done, total, "a warm-up run, then the timed runs" if done == 0 else "")
        else:
            if bar:
                bar.close()
            info("measuring memory bandwidth")

    return show


def estimate(
    model: Annotated[str, typer.Argument(help="A size (1b ... 32b), OLMo 2 alias or repo id, or local directory.")],
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
    context: Annotated[int, typer.Option(help="Tokens per sequence (prompt + generation).")] = 4096,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Sequences at once.")] = 1,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
    finetune: Annotated[str | None, typer.Option(
        help="Memory of one process of `finetune` instead: full, lora or qlora (bf16 autocast on GPUs; --context "
             "is the sequence length, --batch-size the rows per process).")] = None,
    processes: Annotated[int, typer.Option(help="With --finetune: training processes (GPUs).")] = 1,
    fsdp: Annotated[bool, typer.Option("--fsdp", help="With --finetune: shard over the processes.")] = False,
    mixed_precision: Annotated[bool, typer.Option(
        "--mixed-precision", help="With --finetune --fsdp: FSDP's bf16 policy in place of autocast.")] = False,
    gradient_checkpointing: Annotated[bool, typer.Option(
        "--gradient-checkpointing", help="With --finetune: recompute each layer in the backward pass.")] = False,
    device_memory: Annotated[float | None, typer.Option(
        "--device-memory", help="With --finetune: GB of memory per GPU (80 for an H100) [default: this machine's "
                                "device].")] = None,
) -> None:
    """Memory for weights, KV cache and working space, and whether it fits this machine's device.

    It answers for what `generate` would load: the same dtype (auto: bf16 on a capable GPU, fp32 on CPU)
    on the same device. With --finetune, the memory of one training process and the fewest GPUs it fits on.

    Examples:

      olmo2kit estimate 7b

      olmo2kit estimate 32b --quantize nf4 --context 8192 --json

      olmo2kit estimate 32b --finetune full --processes 16 --fsdp --mixed-precision --device-memory 80
    """
    from olmo2kit.evals.estimate import estimate as run_estimate

    if finetune is not None:
        _finetune_estimate(model, finetune, processes=processes, fsdp=fsdp, mixed_precision=mixed_precision,
                           gradient_checkpointing=gradient_checkpointing, seq_len=context, batch_size=batch_size,
                           device_memory=device_memory, device=device, as_json=as_json)
        return
    if processes != 1 or fsdp or mixed_precision or gradient_checkpointing or device_memory is not None:
        raise Olmo2KitError("--processes, --fsdp, --mixed-precision, --gradient-checkpointing and --device-memory "
                            "size a training process: give them with --finetune full|lora|qlora")
    result = run_estimate(model, dtype=dtype, quantize=quantize, context=context, batch_size=batch_size,
                          device=device)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    fits = {True: "fits", False: "does NOT fit", None: "unknown"}[result.fits]
    available = "unknown" if result.device_bytes is None else format_bytes(result.device_bytes)
    print_table([
        ("part", "memory"),
        (f"weights ({result.dtype}{', ' + quantize if quantize else ''})", format_bytes(result.weights_bytes)),
        (f"KV cache ({context} tokens x {batch_size})", format_bytes(result.kv_cache_bytes)),
        ("working memory", format_bytes(result.working_bytes)),
        ("total", format_bytes(result.total_bytes)),
        (f"available on {result.device}", available),
    ])
    info(f"{result.model} in {result.dtype}{', ' + quantize if quantize else ''} on {result.device}: {fits} "
         f"({format_bytes(result.total_bytes)} needed)")


def _finetune_estimate(model: str, method: str, *, device_memory: float | None, as_json: bool, **options) -> None:
    from olmo2kit.evals.estimate import finetune_estimate

    if device_memory is not None and not 0 < device_memory < 1e6:  # also refuses nan
        raise Olmo2KitError(f"--device-memory {device_memory:g}: give the GB of one GPU, e.g. 80 for an H100")
    device_bytes = None if device_memory is None else int(device_memory * 1e9)
    result = finetune_estimate(model, method=method, device_bytes=device_bytes, **options)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    print_table([
        ("part (per process)", "memory"),
        ("weights", format_bytes(result.weights_bytes)),
        ("gradients", format_bytes(result.gradients_bytes)),
        ("optimizer (AdamW)", format_bytes(result.optimizer_bytes)),
        (f"activations ({result.seq_len} tokens x {result.batch_size})", format_bytes(result.activations_bytes)),
        ("working memory", format_bytes(result.working_bytes)),
        ("total", format_bytes(result.total_bytes)),
        (f"available on {result.device}", "unknown" if result.device_bytes is None
         else format_bytes(result.device_bytes)),
    ])
    fits = {True: "fits", False: "does NOT fit", None: "unknown"}[result.fits]
    layout = f"{result.processes} process(es)" + (", FSDP" if result.fsdp else "")
    fewest = ""
    if result.fewest_processes is not None and result.fsdp:
        fewest = f"; fewest FSDP processes that fit: {result.fewest_processes}"
    elif result.fsdp and result.device_bytes is not None:
        fewest = "; no number of FSDP processes fits"
    info(f"{result.model} {method} fine-tune on {layout}: {fits} ({format_bytes(result.total_bytes)} per process"
         f"{fewest}); a rough count of what training keeps, not a measurement")
