"""`olmo2kit generate`: prompts on the command line, streamed, or a batch job over a JSONL file."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from olmo2kit.cli.common import keep_sampling_on_transformers, load_model, sampling_options, vllm_options
from olmo2kit.cli.options import (
    CompileOpt,
    DataParallelOpt,
    DeviceOpt,
    DraftOpt,
    DtypeOpt,
    EnforceEagerOpt,
    EngineOpt,
    GpuMemoryOpt,
    GreedyOpt,
    JsonOpt,
    MaxModelLenOpt,
    MaxNewTokensOpt,
    MinPOpt,
    ModelOpt,
    PipelineParallelOpt,
    QuantizeOpt,
    RayCpusOpt,
    RayGpusOpt,
    RayOpt,
    RayRetriesOpt,
    RepetitionPenaltyOpt,
    RevisionOpt,
    SeedOpt,
    TemperatureOpt,
    TensorParallelOpt,
    TopKOpt,
    TopPOpt,
    ray_options,
)
from olmo2kit.cli.output import ProgressBar, info, report
from olmo2kit.errors import Olmo2KitError
from olmo2kit.files import read_stdin
from olmo2kit.inference.engines import check_acceleration
from olmo2kit.inference.generation import MAX_PROMPT_BYTES
from olmo2kit.inference.sampling import DEFAULTS

# Lines of a batch job in one Ray task: enough that a task's overhead (milliseconds) is nothing beside its
# generation, few enough that a killed driver or a lost worker loses little work.
SHARD_LINES = 256


def generate(
    prompts: Annotated[
        list[str] | None, typer.Argument(help="Text to continue; several for several; - reads stdin.")
    ] = None,
    model: ModelOpt = "1b",
    revision: RevisionOpt = None,
    quantize: QuantizeOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    max_new_tokens: MaxNewTokensOpt = DEFAULTS.max_new_tokens,
    temperature: TemperatureOpt = DEFAULTS.temperature,
    top_k: TopKOpt = DEFAULTS.top_k,
    top_p: TopPOpt = DEFAULTS.top_p,
    greedy: GreedyOpt = False,
    seed: SeedOpt = None,
    min_p: MinPOpt = DEFAULTS.min_p,
    repetition_penalty: RepetitionPenaltyOpt = DEFAULTS.repetition_penalty,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="End the text at this string (repeatable).")] = None,
    chat: Annotated[
        bool, typer.Option("--chat", help="Send each prompt as a user message, in the model's chat template.")
    ] = False,
    system: Annotated[str | None, typer.Option("--system", help="System message (implies --chat).")] = None,
    input_path: Annotated[
        str | None,
        typer.Option("--input", help='Batch job: a JSONL file, one {"id", "prompt" or "messages"} a line.'),
    ] = None,
    output_path: Annotated[
        str | None, typer.Option("--output", help="Where a batch job appends its results (JSONL); a rerun resumes.")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Prompts per model call in a batch job (default 8).")
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Stop a batch job at a malformed line instead of skipping it.")
    ] = False,
    compile: CompileOpt = False,
    draft_model: DraftOpt = None,
    as_json: JsonOpt = False,
    engine: EngineOpt = "auto",
    tensor_parallel_size: TensorParallelOpt = 1,
    pipeline_parallel_size: PipelineParallelOpt = 1,
    data_parallel_size: DataParallelOpt = 1,
    gpu_memory_utilization: GpuMemoryOpt = 0.9,
    max_model_len: MaxModelLenOpt = None,
    enforce_eager: EnforceEagerOpt = False,
    ray: RayOpt = None,
    ray_cpus: RayCpusOpt = None,
    ray_gpus: RayGpusOpt = None,
    ray_retries: RayRetriesOpt = None,
    ray_shard_lines: Annotated[
        int | None,
        typer.Option("--ray-shard-lines", rich_help_panel="Ray",
                     help=f"Lines of a batch job each Ray task generates (default: {SHARD_LINES})."),
    ] = None,
) -> None:
    """Continue one or more prompts; text streams to stdout, timings go to stderr.

    --chat (or --system): each prompt is a user message to an instruct model.
    --input/--output: a batch job over a JSONL file, results appended in order (with --ray, as shards finish);
    the same command run again resumes where it stopped. With --ray, the job's
    lines go out in shards, each a Ray task, and this process appends the results.

    Examples:

      olmo2kit generate "Language modeling is "

      olmo2kit generate "The capital of France is" --model 7b --quantize nf4 --greedy

      olmo2kit generate "Hello" --model allenai/OLMo-2-0425-1B@stage1-step140000-tokens294B

      echo "Once upon a time" | olmo2kit generate - --json

      olmo2kit generate --chat "What is OLMo?" -m 1b-instruct --system "Be brief."

      olmo2kit generate --input prompts.jsonl --output results.jsonl -m 1b-instruct --chat

      olmo2kit generate "Language modeling is " -m 7b --draft-model 1b --greedy

      olmo2kit generate "Language modeling is " --compile

      olmo2kit generate --input prompts.jsonl --output results.jsonl -m 7b --engine vllm --batch-size 64

      olmo2kit generate --input prompts.jsonl --output results.jsonl -m 7b --engine vllm --ray auto
    """
    options = sampling_options(max_new_tokens, temperature, top_k, top_p, greedy, seed, stop or (), min_p=min_p,
                               repetition_penalty=repetition_penalty)
    chat = chat or system is not None
    vllm = vllm_options(tensor_parallel_size, pipeline_parallel_size, data_parallel_size, gpu_memory_utilization,
                        max_model_len, enforce_eager, engine)
    check_acceleration(compile, draft_model, 1)
    on_ray = ray_options(ray, ray_cpus, ray_gpus, ray_retries)
    if on_ray is None and ray_shard_lines is not None:
        raise Olmo2KitError("--ray-shard-lines sizes each Ray task of a batch job: give it with --ray")
    if (input_path or output_path) and (compile or draft_model):
        raise Olmo2KitError("--compile and --draft-model apply to prompts given on the command line, not batch jobs")
    if input_path or output_path:
        if not input_path:
            raise Olmo2KitError("--output is for a batch job, which reads its prompts from --input FILE (JSONL); "
                                "prompts given here print to stdout")
        if prompts:
            raise Olmo2KitError("give prompts or --input FILE, not both")
        if not output_path:
            raise Olmo2KitError("a batch job needs both --input FILE and --output FILE")
        if as_json:
            raise Olmo2KitError("--json does not apply to a batch job: its --output is JSONL already")
        run_job_command(
            input_path, output_path, model=model, revision=revision, quantize=quantize, dtype=dtype, device=device,
            batch_size=8 if batch_size is None else batch_size, strict=strict, chat=chat, system=system,
            engine=engine, vllm=vllm, ray=on_ray,
            shard_lines=SHARD_LINES if ray_shard_lines is None else ray_shard_lines, **options,
        )
        return
    if on_ray is not None:
        raise Olmo2KitError("--ray runs a batch job (--input FILE --output FILE) across a Ray cluster; prompts given "
                            "here run in this process")
    if batch_size is not None or strict:
        raise Olmo2KitError("--batch-size and --strict apply to a batch job (--input FILE --output FILE)")
    if not prompts:
        # A usage error, as when the argument was required: the usage line, then the message, exit code 2.
        raise typer.BadParameter("Missing argument: give text to continue, or --input FILE --output FILE",
                                 param_hint="'PROMPTS...'")
    prompts = [read_stdin(MAX_PROMPT_BYTES) if p == "-" else p for p in prompts]
    if any(not p.strip() for p in prompts):
        raise Olmo2KitError("empty prompt: give some text to continue")
    if as_json:
        check_acceleration(compile, draft_model, len(prompts))
    unsupported = "--compile" if compile else "--draft-model" if draft_model else None
    # Several prompts with --json decode as one batch on transformers; llama.cpp's generate takes one at a time.
    together = f"{len(prompts)} prompts decode together on transformers" if as_json and len(prompts) > 1 else None
    loaded, tokenizer = load_model(model, revision, dtype, quantize, device, engine=engine, vllm=vllm,
                                   unsupported=unsupported, cpu_llamacpp=True,
                                   keep_transformers=together or keep_sampling_on_transformers(options))
    accelerate = {"compile": compile}
    if draft_model:
        accelerate["draft_model"] = load_model(draft_model, None, dtype, None, device)[0]

    from olmo2kit.inference.generation import generate as run_generate
    from olmo2kit.inference.generation import stream_generate
    from olmo2kit.model.chat_template import user_messages
    from olmo2kit.model.engines import engine_info

    if as_json:
        given = {"messages": [user_messages(p, system) for p in prompts]} if chat else {"prompt": prompts}
        results = run_generate(loaded, tokenizer, **given, **accelerate, **options)
        for prompt, result in zip(prompts, results, strict=True):
            row = {"prompt": prompt, "text": result.text, "new_tokens": result.new_tokens,
                   "finish_reason": result.finish_reason, "tokens_per_s": round(result.tokens_per_s, 2),
                   **engine_info(loaded)}
            print(json.dumps(row, ensure_ascii=False), flush=True)
            report(result)
        return
    for prompt in prompts:
        if sys.stdout.isatty() and not chat:
            typer.secho(prompt, bold=True, nl=False)
        given = {"messages": user_messages(prompt, system)} if chat else {"prompt": prompt}
        last = None
        for last in stream_generate(loaded, tokenizer, **given, **accelerate, **options):
            sys.stdout.write(last.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        report(last)


def run_job_command(
    input_path: str, output_path: str, *, model: str, revision: str | None, quantize: str | None, dtype: str,
    device: str, batch_size: int, strict: bool, chat: bool, system: str | None, engine: str = "auto", vllm=None,
    ray=None, shard_lines: int = SHARD_LINES, **options,
) -> None:
    """`generate --input FILE --output FILE`: load (or with `ray`, a `RayOptions`, connect to Ray: the workers
    load), run the job with a progress bar, say what was done."""
    from olmo2kit.files import output_lock
    from olmo2kit.inference.jobs import GenerateShard, JobModel, check_job, read_job, run_job, run_job_on_ray
    from olmo2kit.inference.ray_pool import RayPool
    from olmo2kit.model.loading import resolve_model

    _, output = check_job(input_path, output_path, batch_size, shard_lines=shard_lines, **options)
    with output_lock(output, option="--output"):  # before the model loads: a second job stops at once
        ref = resolve_model(model, revision)
        model_name = str(Path(ref.source).resolve()) if ref.local else ref.source
        if strict:  # a malformed line stops the job before the model loads
            read_job(input_path, chat=chat, system=system, strict=True, **options)
        given = dict(chat=chat, system=system, strict=strict, on_warning=lambda message: info(f"warning: {message}"),
                     lock=False, **options)
        if ray is None:
            together = f"a batch job decodes {batch_size} rows together on transformers" if batch_size > 1 else None
            loaded, tokenizer = load_model(model, revision, dtype, quantize, device, engine=engine, vllm=vllm,
                                           cpu_llamacpp=True,
                                           keep_transformers=together or keep_sampling_on_transformers(options))
            bar = ProgressBar()
            try:
                summary = run_job(loaded, tokenizer, input_path, output_path, batch_size=batch_size,
                                  model_name=model_name, revision=ref.revision, progress=bar.update, **given)
            finally:
                bar.close()
        else:
            pool = RayPool(ray)
            info(f"{pool.describe()}; a task for each {shard_lines} lines")
            # The workers load the checkpoint the driver resolved: a local one by its absolute path.
            shard = GenerateShard(JobModel(model_name, ref.revision, dtype, quantize, device, engine, vllm),
                                  model_name, ref.revision, batch_size)
            bar = ProgressBar()
            try:
                summary = run_job_on_ray(shard, input_path, output_path, pool, shard_lines=shard_lines,
                                         progress=bar.update, **given)
            finally:
                bar.close()
                pool.close()
    say_job_done(summary, output_path)


def say_job_done(summary, output_path: str) -> None:
    """What a batch job did, on stderr; Ray shards that failed for good named, then an Olmo2KitError."""
    done = f"{summary.written} result(s) appended to {output_path}"
    if summary.already_done:
        done += f", {summary.already_done} already there"
    if summary.skipped:
        done += f"; {len(summary.skipped)} line(s) skipped, see the warnings above"
    info(done)
    if summary.failed:
        for shard_name, why in summary.failed:
            info(f"{shard_name} failed: {why}")
        raise Olmo2KitError(f"{len(summary.failed)} shard(s) failed (above) and their lines are not in {output_path}: "
                            "run the same command again to retry them")
