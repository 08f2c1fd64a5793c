"""`olmo2kit sizes`, `tiny` and `list-revisions`: what there is to load."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from olmo2kit.cli.options import JsonOpt
from olmo2kit.cli.output import dash, format_bytes, print_table


def sizes(as_json: JsonOpt = False) -> None:
    """The OLMo 2 sizes: architecture, parameters, training budget, weight memory.

    Examples:

      olmo2kit sizes

      olmo2kit sizes --json
    """
    from olmo2kit.model.sizes import table

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
            f"{r['flops_6nd']:.2e}", *(format_bytes(w[k]) for k in ("bf16", "int8", "nf4")), r["repo"],
        ))
    print_table(lines)
    print("\nVariants: append -sft, -dpo or -instruct to a size (e.g. 7b-instruct). Memory is weights only.")


def tiny(
    path: Annotated[str, typer.Argument(help="Directory to write (a checkpoint already there is replaced).")],
    instruct: Annotated[bool, typer.Option("--instruct", help="Add the OLMo 2 chat template.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for the random weights.")] = 0,
    head_dim: Annotated[
        int, typer.Option(help="Size of each of the 4 attention heads; --engine vllm on the CPU needs 32 or more.")
    ] = 16,
) -> None:
    """Write a tiny random OLMo 2 checkpoint, for offline tries and tests.

    Examples:

      olmo2kit tiny ./tiny && olmo2kit generate "Hello" --model ./tiny

      olmo2kit tiny ./tiny-chat --instruct

      olmo2kit tiny ./tiny-64 --head-dim 64   (for --engine vllm on the CPU)
    """
    from olmo2kit.compat import quiet_transformers
    from olmo2kit.inference.sampling import check_seed
    from olmo2kit.model.tiny import build_tiny

    check_seed(seed, "--seed")  # every seed olmo2kit takes fits the one range that sampling checks
    quiet_transformers()
    written = build_tiny(path, instruct=instruct, seed=seed, head_dim=head_dim)
    print(written)


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
    from olmo2kit.model.revisions import list_revisions

    revisions = list_revisions(
        model, stage=stage, ingredient=ingredient, step=step, tokens=tokens, limit=limit, refresh=refresh
    )
    if as_json:
        print(json.dumps([r.to_dict() for r in revisions], indent=2))
        return
    lines = [("name", "stage", "ingredient", "step", "tokens", "commit")]
    for r in revisions:
        lines.append((
            r.name, dash(r.stage), dash(r.ingredient), dash(r.step),
            "-" if r.tokens_b is None else f"{r.tokens_b}B", (r.commit or "-")[:10],
        ))
    print_table(lines)
