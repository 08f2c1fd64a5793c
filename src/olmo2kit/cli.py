"""The `olmo2kit` command line: thin commands that parse options, call the library, print.

Heavy modules (torch, transformers) are imported inside the commands that need them,
so `olmo2kit --help` and `olmo2kit sizes` stay instant.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Annotated

import typer

from olmo2kit.errors import Olmo2KitError

app = typer.Typer(
    name="olmo2kit",
    help="Work with the OLMo 2 language models: load any size or training checkpoint, generate, inspect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_debug = False

# Options shared by every command that loads a model.
ModelOpt = Annotated[
    str,
    typer.Option(
        "--model", "-m",
        help="Size alias (1b, 7b-instruct, 13b-dpo, ...), Hub repo id, repo@revision, or local directory.",
    ),
]
RevisionOpt = Annotated[
    str | None, typer.Option("--revision", "-r", help="Hub branch, tag or commit, e.g. stage1-step140000-tokens294B.")
]
QuantizeOpt = Annotated[
    str | None, typer.Option("--quantize", "-q", help="bitsandbytes quantization: int8, nf4 or fp4.")
]
DtypeOpt = Annotated[
    str, typer.Option("--dtype", help="auto (bf16 on a capable GPU, fp32 on CPU), bf16, fp16 or fp32.")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
CompileOpt = Annotated[
    bool, typer.Option("--compile", help="Static KV cache and a compiled decode step (CUDA graphs on a GPU).")
]
DraftOpt = Annotated[
    str | None,
    typer.Option("--draft-model", help="Speculative decoding with this smaller OLMo 2 as draft (e.g. 1b)."),
]

# Sampling options, shared by generate and chat (defaults: the model card's).
MaxNewTokensOpt = Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate.")]
TemperatureOpt = Annotated[float, typer.Option(help="Sampling temperature.")]
TopKOpt = Annotated[int, typer.Option("--top-k", help="Sample from the K likeliest tokens (0: off).")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass, in (0, 1].")]
GreedyOpt = Annotated[bool, typer.Option("--greedy", help="Greedy decoding instead of sampling.")]
SeedOpt = Annotated[int | None, typer.Option(help="Random seed, for repeatable samples.")]


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
) -> None:
    global _debug
    _debug = debug


@app.command()
def generate(
    prompts: Annotated[
        list[str] | None, typer.Argument(help="Text to continue; several for several; - reads stdin.")
    ] = None,
    model: ModelOpt = "1b",
    revision: RevisionOpt = None,
    quantize: QuantizeOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    max_new_tokens: MaxNewTokensOpt = 100,
    temperature: TemperatureOpt = 1.0,
    top_k: TopKOpt = 50,
    top_p: TopPOpt = 0.95,
    greedy: GreedyOpt = False,
    seed: SeedOpt = None,
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
) -> None:
    """Continue one or more prompts; text streams to stdout, timings go to stderr.

    --chat (or --system): each prompt is a user message to an instruct model.
    --input/--output: a batch job over a JSONL file, results appended in order;
    the same command run again resumes where it stopped.

    Examples:

      olmo2kit generate "Language modeling is "

      olmo2kit generate "The capital of France is" --model 7b --quantize nf4 --greedy

      olmo2kit generate "Hello" --model allenai/OLMo-2-0425-1B@stage1-step140000-tokens294B

      echo "Once upon a time" | olmo2kit generate - --json

      olmo2kit generate --chat "What is OLMo?" -m 1b-instruct --system "Be brief."

      olmo2kit generate --input prompts.jsonl --output results.jsonl -m 1b-instruct --chat

      olmo2kit generate "Language modeling is " -m 7b --draft-model 1b --greedy

      olmo2kit generate "Language modeling is " --compile
    """
    options = sampling_options(max_new_tokens, temperature, top_k, top_p, greedy, seed, stop or ())
    chat = chat or system is not None
    if compile and draft_model:
        raise Olmo2KitError("choose one of --compile and --draft-model")
    if (input_path or output_path) and (compile or draft_model):
        raise Olmo2KitError("--compile and --draft-model apply to prompts given on the command line, not batch jobs")
    if input_path or output_path:
        from olmo2kit.cli_chat import run_job_command

        if prompts:
            raise Olmo2KitError("give prompts or --input FILE, not both")
        if not (input_path and output_path):
            raise Olmo2KitError("a batch job needs both --input FILE and --output FILE")
        if as_json:
            raise Olmo2KitError("--json does not apply to a batch job: its --output is JSONL already")
        run_job_command(
            input_path, output_path, model=model, revision=revision, quantize=quantize, dtype=dtype, device=device,
            batch_size=8 if batch_size is None else batch_size, strict=strict, chat=chat, system=system, **options,
        )
        return
    if batch_size is not None or strict:
        raise Olmo2KitError("--batch-size and --strict apply to a batch job (--input FILE --output FILE)")
    if not prompts:
        # A usage error, as when the argument was required: the usage line, then the message, exit code 2.
        raise typer.BadParameter("Missing argument: give text to continue, or --input FILE --output FILE",
                                 param_hint="'PROMPTS...'")
    prompts = [sys.stdin.read() if p == "-" else p for p in prompts]
    if any(not p.strip() for p in prompts):
        raise Olmo2KitError("empty prompt: give some text to continue")
    if draft_model and len(prompts) > 1 and as_json:
        raise Olmo2KitError("--draft-model takes one prompt at a time with --json")
    loaded, tokenizer = load_model(model, revision, dtype, quantize, device)
    accelerate = {"compile": compile}
    if draft_model:
        accelerate["draft_model"] = load_model(draft_model, None, dtype, None, device)[0]

    from olmo2kit.chat import user_messages
    from olmo2kit.generation import generate as run_generate
    from olmo2kit.generation import stream_generate

    if as_json:
        given = {"messages": [user_messages(p, system) for p in prompts]} if chat else {"prompt": prompts}
        results = run_generate(loaded, tokenizer, **given, **accelerate, **options)
        for prompt, result in zip(prompts, results, strict=True):
            row = {"prompt": prompt, "text": result.text, "new_tokens": result.new_tokens,
                   "finish_reason": result.finish_reason, "tokens_per_s": round(result.tokens_per_s, 2)}
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


@app.command()
def sizes(as_json: JsonOpt = False) -> None:
    """The OLMo 2 sizes: architecture, parameters, training budget, weight memory.

    Examples:

      olmo2kit sizes

      olmo2kit sizes --json
    """
    from olmo2kit.sizes import table

    rows = table()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    header = (
        "size", "params", "layers", "hidden", "heads", "kv", "ffn", "tokens", "6ND", "bf16", "int8", "nf4", "repo"
    )
    lines = [header]
    for r in rows:
        w = r["weight_bytes"]
        lines.append((
            r["size"], f"{r['params']:,}", str(r["layers"]), str(r["hidden"]), str(r["heads"]),
            str(r["kv_heads"]), str(r["ffn"]), f"{r['training_tokens'] / 1e12:.2f}T",
            f"{r['flops_6nd']:.2e}", _gb(w["bf16"]), _gb(w["int8"]), _gb(w["nf4"]), r["repo"],
        ))
    print_table(lines)
    print("\nVariants: append -sft, -dpo or -instruct to a size (e.g. 7b-instruct). Memory is weights only.")


@app.command()
def tiny(
    path: Annotated[str, typer.Argument(help="Directory to write (a checkpoint already there is replaced).")],
    instruct: Annotated[bool, typer.Option("--instruct", help="Add the OLMo 2 chat template.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for the random weights.")] = 0,
) -> None:
    """Write a tiny random OLMo 2 checkpoint, for offline tries and tests.

    Examples:

      olmo2kit tiny ./tiny && olmo2kit generate "Hello" --model ./tiny

      olmo2kit tiny ./tiny-chat --instruct
    """
    from olmo2kit.tiny import build_tiny

    quiet_transformers()
    written = build_tiny(path, instruct=instruct, seed=seed)
    print(written)


@app.command("list-revisions")
def list_revisions_command(
    model: Annotated[str, typer.Argument(help="Size alias (1b, 7b, ...) or Hub repo id.")],
    stage: Annotated[int | None, typer.Option(help="Keep one training stage: 1 or 2.")] = None,
    ingredient: Annotated[int | None, typer.Option(help="Keep one stage-2 ingredient.")] = None,
    step: Annotated[
        int | None, typer.Option(help="Keep the revision nearest this step, within --stage (default 1); all on a tie.")
    ] = None,
    tokens: Annotated[
        float | None, typer.Option(help="Keep the revision nearest T billion tokens, within --stage (default 1).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Show the first K in training order.")] = None,
    refresh: Annotated[bool, typer.Option("--refresh", help="Ask the Hub again, skipping the cache.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List a model's training checkpoints (Hub branches) in training order.

    Examples:

      olmo2kit list-revisions 1b --stage 2

      olmo2kit list-revisions allenai/OLMo-2-1124-7B --tokens 1000 --json
    """
    from olmo2kit.revisions import list_revisions

    revisions = list_revisions(
        model, stage=stage, ingredient=ingredient, step=step, tokens=tokens, limit=limit, refresh=refresh
    )
    if as_json:
        print(json.dumps([r.to_dict() for r in revisions], indent=2))
        return
    lines = [("name", "stage", "ingredient", "step", "tokens", "commit")]
    for r in revisions:
        lines.append((
            r.name, _dash(r.stage), _dash(r.ingredient), _dash(r.step),
            "-" if r.tokens_b is None else f"{r.tokens_b}B", (r.commit or "-")[:10],
        ))
    print_table(lines)


def load_model(model: str, revision: str | None, dtype: str, quantize: str | None, device: str):
    """Load through the library, with the load time on stderr and transformers' bars off."""
    from olmo2kit.loading import load

    quiet_transformers()
    start = time.perf_counter()
    loaded, tokenizer = load(model, revision=revision, dtype=dtype, quantize=quantize, device=device)
    where = f"{loaded.dtype}".removeprefix("torch.") + (f", {quantize}" if quantize else "")
    info(f"loaded {loaded.name_or_path} ({where}, {loaded.device}) in {time.perf_counter() - start:.1f} s")
    return loaded, tokenizer


def sampling_options(max_new_tokens: int, temperature: float, top_k: int, top_p: float, greedy: bool,
                     seed: int | None, stop=()) -> dict:
    """The sampling options as generate takes them, checked before a model loads."""
    from olmo2kit.generation import SamplingOptions

    options = dict(max_new_tokens=max_new_tokens, do_sample=not greedy, temperature=temperature, top_k=top_k,
                   top_p=top_p, seed=seed, stop=tuple(stop))
    SamplingOptions(**options)
    return options


def quiet_transformers() -> None:
    """No download or loading bars from transformers."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def report(result) -> None:
    if result is None:
        return
    memory = "" if result.peak_memory_gb is None else f", peak memory {result.peak_memory_gb:.2f} GB"
    info(f"{result.new_tokens} tokens in {result.elapsed_s:.2f} s, {result.tokens_per_s:.1f} tokens/s{memory}")


def info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def print_table(lines: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    for row in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def clock(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def _dash(value) -> str:
    return "-" if value is None else str(value)


# Commands of later capabilities live in their own modules and register on `app` when imported.
from olmo2kit import cli_bench, cli_chat, cli_eval, cli_finetune  # noqa: E402, F401


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    logging.getLogger("olmo2kit").addHandler(handler)
    try:
        app()  # usage errors: click prints them with the usage line and exits 2
    except Olmo2KitError as e:
        if _debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
