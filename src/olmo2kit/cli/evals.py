"""`olmo2kit perplexity`, `eval`, `scores` and `sweep`: how good a model or a checkpoint is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from olmo2kit.cli.common import load_model, pick_engine, vllm_options
from olmo2kit.cli.options import (
    BatchSizeOpt,
    DataParallelOpt,
    DeviceOpt,
    DtypeOpt,
    EnforceEagerOpt,
    EngineOpt,
    FewshotOpt,
    GpuMemoryOpt,
    IncludePathOpt,
    JsonOpt,
    LimitOpt,
    MaxLengthOpt,
    MaxModelLenOpt,
    ModelOpt,
    PipelineParallelOpt,
    QuantizeOpt,
    RayCpusOpt,
    RayGpusOpt,
    RayOpt,
    RayRetriesOpt,
    RevisionOpt,
    StrideOpt,
    TensorParallelOpt,
    ray_options,
)
from olmo2kit.cli.output import ProgressBar, dash, format_bytes, info, print_table
from olmo2kit.errors import Olmo2KitError


def perplexity_command(
    files: Annotated[list[str], typer.Argument(help="UTF-8 text files; - reads stdin.")],
    model: ModelOpt = "1b",
    revision: RevisionOpt = None,
    quantize: QuantizeOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    stride: StrideOpt = None,
    max_length: MaxLengthOpt = None,
    as_json: JsonOpt = False,
    engine: EngineOpt = "auto",
    tensor_parallel_size: TensorParallelOpt = 1,
    pipeline_parallel_size: PipelineParallelOpt = 1,
    data_parallel_size: DataParallelOpt = 1,
    gpu_memory_utilization: GpuMemoryOpt = 0.9,
    max_model_len: MaxModelLenOpt = None,
    enforce_eager: EnforceEagerOpt = False,
) -> None:
    """Token-level perplexity and bits per byte of text files, with a sliding window.

    Each window scores only the tokens the previous one did not.
    A smaller --stride gives each token more context, for more forward passes.

    Examples:

      olmo2kit perplexity wiki.txt

      olmo2kit perplexity a.txt b.txt --model 7b --quantize nf4 --json

      olmo2kit perplexity wiki.txt --model 1b@stage1-step140000-tokens294B --max-length 2048 --stride 512

      olmo2kit perplexity wiki.txt --model 32b --engine vllm --tensor-parallel-size 4
    """
    from olmo2kit.evals.perplexity import check_window, combine_perplexities, perplexity, read_text
    from olmo2kit.model.engines import engine_info

    check_window(max_length, stride)
    vllm = vllm_options(tensor_parallel_size, pipeline_parallel_size, data_parallel_size, gpu_memory_utilization,
                        max_model_len, enforce_eager, engine)
    texts = [read_text(f) for f in files]
    loaded, tokenizer = load_model(model, revision, dtype, quantize, device, engine=engine, vllm=vllm, batched=True)
    results = perplexity(loaded, tokenizer, texts, max_length=max_length, stride=stride)
    total = combine_perplexities(results)
    info(f"{total.tokens:,} tokens in {total.elapsed_s:.2f} s, {total.tokens_per_s:,.0f} tokens/s")
    if as_json:
        rows = [{"file": f, **r.to_dict()} for f, r in zip(files, results, strict=True)]
        print(json.dumps({"model": loaded.name_or_path, **engine_info(loaded), "files": rows,
                          "total": total.to_dict()}, indent=2))
        return
    lines = [("file", "tokens", "bytes", "perplexity", "bits/byte")]
    named = list(zip(files, results, strict=True)) + ([("all", total)] if len(files) > 1 else [])
    for name, r in named:
        lines.append((name, f"{r.tokens:,}", f"{r.bytes:,}", f"{r.perplexity:.4f}", f"{r.bits_per_byte:.4f}"))
    print_table(lines)


def eval_command(
    tasks: Annotated[str, typer.Option("--tasks", "-t", help="lm-eval tasks, comma-separated (lm-eval ls tasks).")],
    model: ModelOpt = "1b",
    revision: RevisionOpt = None,
    quantize: QuantizeOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    limit: LimitOpt = None,
    num_fewshot: FewshotOpt = None,
    include_path: IncludePathOpt = None,
    batch_size: BatchSizeOpt = 1,
    chat_template: Annotated[
        bool, typer.Option("--chat-template", help="Format prompts with the model's chat template (instruct models).")
    ] = False,
    as_json: JsonOpt = False,
    engine: EngineOpt = "auto",
    tensor_parallel_size: TensorParallelOpt = 1,
    pipeline_parallel_size: PipelineParallelOpt = 1,
    data_parallel_size: DataParallelOpt = 1,
    gpu_memory_utilization: GpuMemoryOpt = 0.9,
    max_model_len: MaxModelLenOpt = None,
    enforce_eager: EnforceEagerOpt = False,
) -> None:
    """Benchmark tasks through EleutherAI's lm-evaluation-harness, on the model olmo2kit loads.

    Needs lm-eval, which the `eval` extra of olmo2kit installs.
    `olmo2kit scores` prints the model card's published numbers to compare with.

    Examples:

      olmo2kit eval --tasks arc_easy,hellaswag --limit 200

      olmo2kit eval --model 1b-instruct --tasks gsm8k --chat-template --quantize nf4

      olmo2kit eval --tasks my_task --include-path ./my_tasks --json

      olmo2kit eval --model 7b --tasks arc_easy,hellaswag --engine vllm   (lm-eval's own vLLM model class)
    """
    from olmo2kit.evals.tasks import check_task_options, check_tasks, evaluate_tasks, parse_tasks
    from olmo2kit.model.engines import engine_info

    names = parse_tasks(tasks)
    check_task_options(limit, num_fewshot, batch_size)
    check_tasks(names, include_path)
    vllm = vllm_options(tensor_parallel_size, pipeline_parallel_size, data_parallel_size, gpu_memory_utilization,
                        max_model_len, enforce_eager, engine)
    loaded, tokenizer = load_model(model, revision, dtype, quantize, device, engine=engine, vllm=vllm, start=False,
                                   batched=True)
    scores = evaluate_tasks(
        loaded, tokenizer, names, limit=limit, num_fewshot=num_fewshot, include_path=include_path,
        batch_size=batch_size, chat_template=chat_template,
    )
    if as_json:
        print(json.dumps({"model": loaded.name_or_path, **engine_info(loaded), "scores": [s.to_dict() for s in scores]},
                         indent=2))
        return
    lines = [("task", "metric", "value", "stderr", "samples")]
    for s in scores:
        metric = s.metric if s.filter == "none" else f"{s.metric} ({s.filter})"
        stderr = "-" if s.stderr is None else f"{s.stderr:.4f}"
        lines.append((s.task, metric, f"{s.value:.4f}", stderr, dash(s.samples)))
    print_table(lines)


def scores_command(as_json: JsonOpt = False) -> None:
    """The OLMo 2 1B model card's published scores of instruct models, to put your own beside.

    Examples:

      olmo2kit scores

      olmo2kit scores --json
    """
    from olmo2kit.evals.scores import published_scores

    table = published_scores()
    if as_json:
        print(json.dumps(table, indent=2, ensure_ascii=False))
        return
    columns = table["columns"]
    lines = [("model", *columns)]
    for row in table["rows"]:
        lines.append((row["model"], *("n/a" if row["scores"][c] is None else str(row["scores"][c]) for c in columns)))
    print_table(lines)
    print(f"\nSource: {table['source']} ({table['section']}).")
    print(", ".join(f"{c}: {name}" for c, name in table["column_names"].items() if c != name) + ".")


def sweep_command(
    out: Annotated[Path, typer.Option(help="Results, one JSON line per revision; an existing file is resumed.")],
    model: ModelOpt = "1b",
    metric: Annotated[
        str, typer.Option(help="perplexity, or an lm-eval task, optionally with its metric: arc_easy:acc_norm.")
    ] = "perplexity",
    data: Annotated[str | None, typer.Option(help="Text file for --metric perplexity.")] = None,
    stage: Annotated[int | None, typer.Option(help="Keep one training stage: 1 or 2.")] = None,
    every: Annotated[int | None, typer.Option(help="Keep the first revision and every K-th after it.")] = None,
    revisions: Annotated[
        str | None, typer.Option(help="Exactly these revisions, comma-separated (instead of --stage/--every).")
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="Draw the metric against training tokens to this PNG.")] = None,
    delete_after: Annotated[
        bool, typer.Option("--delete-after", help="Remove each revision from the Hugging Face cache once measured.")
    ] = False,
    quantize: QuantizeOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    stride: StrideOpt = None,
    max_length: MaxLengthOpt = None,
    limit: LimitOpt = None,
    num_fewshot: FewshotOpt = None,
    include_path: IncludePathOpt = None,
    batch_size: BatchSizeOpt = 1,
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
) -> None:
    """Measure a metric across training checkpoints, in training order; resumable.

    Each revision is loaded, measured and appended to --out as one JSON line.
    Run the same command again after an interruption: it carries on where it stopped.

    Examples:

      olmo2kit sweep --data wiki.txt --stage 1 --every 100 --out ppl.jsonl --plot ppl.png --delete-after

      olmo2kit sweep --model 7b --metric arc_easy:acc_norm --limit 500 --stage 2 --out arc.jsonl

      olmo2kit sweep --data wiki.txt --revisions stage1-step10000-tokens21B,stage1-step20000-tokens42B

      olmo2kit sweep --model 7b --metric hellaswag --stage 1 --every 50 --out hs.jsonl --engine vllm

      olmo2kit sweep --model 7b --data wiki.txt --stage 1 --out ppl.jsonl --ray auto --ray-gpus 1
    """
    from olmo2kit.evals.sweep import Sweep
    from olmo2kit.model.revisions import parse_revision, training_order

    names = None if revisions is None else revisions.split(",")
    vllm = vllm_options(tensor_parallel_size, pipeline_parallel_size, data_parallel_size, gpu_memory_utilization,
                        max_model_len, enforce_eager, engine)
    on_ray = ray_options(ray, ray_cpus, ray_gpus, ray_retries)
    note = None
    if on_ray is None:  # on Ray, "auto" is what it means on a worker: the sweep asks one
        engine, note = pick_engine(engine, model, quantize, device, vllm)
    sweep = Sweep(
        model, metric, out=out, data=data, stage=stage, every=every, revisions=names, plot=plot,
        delete_after=delete_after, dtype=dtype, quantize=quantize, device=device, stride=stride,
        max_length=max_length, limit=limit, num_fewshot=num_fewshot, include_path=include_path, batch_size=batch_size,
        engine=engine, vllm=vllm, ray=on_ray,
    )
    try:
        _run_sweep(sweep, note or sweep.engine_note, out, metric, delete_after)
    finally:
        if sweep.pool is not None:
            sweep.pool.close()
    lines = [("revision", "tokens", metric)]
    for row in sorted(sweep.done, key=lambda r: training_order(parse_revision(r["revision"]))):
        tokens = "-" if row["train_tokens_b"] is None else f"{row['train_tokens_b']}B"
        lines.append((row["revision"], tokens, f"{row['value']:.4f}"))
    print_table(lines)
    info(f"results: {out}" + ("" if plot is None else f", plot: {plot}"))
    if sweep.failed:
        raise Olmo2KitError(f"{len(sweep.failed)} of {len(sweep.todo)} revisions failed (each said why above): "
                            "run the same command again to retry them")


def _run_sweep(sweep, note: str | None, out: Path, metric: str, delete_after: bool) -> None:
    """Say what the sweep does, then draw a line per revision as each finishes (on Ray, in the order they do)."""
    from olmo2kit.compat import quiet_transformers

    if note:
        info(note)
    if sweep.pool is not None:
        info(f"Ray: {sweep.pool.describe()}")
    already = len(sweep.revisions) - len(sweep.todo)
    info(f"{sweep.repo_id}: {len(sweep.revisions)} revisions, {already} already in {out}, {len(sweep.todo)} to measure")
    quiet_transformers()
    bar = ProgressBar("revisions", interval=0, first=0)  # a line per revision, each worth reading
    for step in sweep.run():
        row = step.row
        if row is None:
            bar.update(step.index, step.total, f"{step.revision} failed: {step.error}")
            continue
        freed = f", freed {format_bytes(step.freed_bytes)}" if delete_after else ""
        bar.update(step.index, step.total, f"{row['revision']}: {metric} {row['value']:.4f} "
                                           f"(load {row['load_s']:.1f} s, eval {row['eval_s']:.1f} s{freed})")
    bar.close()
