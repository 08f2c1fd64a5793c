"""`olmo2kit soup`: checkpoints averaged tensor by tensor into one, and compared with a reference."""

from __future__ import annotations

import json
import math
from typing import Annotated

import typer

from olmo2kit.cli.options import JsonOpt
from olmo2kit.cli.output import ProgressBar, format_bytes, info, print_table
from olmo2kit.errors import Olmo2KitError


def soup_command(
    checkpoints: Annotated[list[str], typer.Argument(
        help="Two or more checkpoints: size aliases, Hub repo ids, repo@revision, or local directories.")],
    output: Annotated[str | None, typer.Option("--output", "-o", help="A new (or empty) directory for the soup.")]
    = None,
    weights: Annotated[str | None, typer.Option(
        "--weights", help="One weight per checkpoint, comma-separated (e.g. 1,1,2), normalised to sum 1 "
                          "(default: equal).")] = None,
    compare: Annotated[str | None, typer.Option(
        "--compare", help="Report the largest difference of each tensor from this checkpoint (a name as above, or "
                          "a revision of the ingredients' repo, e.g. main).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Average checkpoints of one architecture and tokenizer tensor by tensor (a "soup", as OLMo 2's main was
    made from its stage-2 ingredients), in bounded memory, sums in fp32, saved in the ingredients' dtype.

    The soup appears whole or not at all, with the first ingredient's config and tokenizer and a soup.json naming
    each ingredient and weight. Revision names come from `olmo2kit list-revisions MODEL --stage 2`.

    Examples:

      olmo2kit soup 7b@stage2-ingredient1-step11931-tokens50B \\
        7b@stage2-ingredient2-step11931-tokens50B \\
        7b@stage2-ingredient3-step11931-tokens50B \\
        --output out/7b-soup --compare main

      olmo2kit soup out/run-a out/run-b --output out/ab --weights 2,1
    """
    from olmo2kit.compat import quiet_transformers
    from olmo2kit.model.soup import soup

    quiet_transformers()
    bars: dict[str, ProgressBar] = {}

    def progress(what: str, done: int, total: int) -> None:
        if what not in bars:
            for bar in bars.values():
                bar.close()
            bars.clear()
            bars[what] = ProgressBar("MB")
        bars[what].update(done // 1_000_000, total // 1_000_000, note=what)

    try:
        result = soup(checkpoints, output, weights=parse_weights(weights), compare=compare, say=info,
                      progress=progress)
    finally:
        for bar in bars.values():
            bar.close()
    if result.output is not None:
        info(f"wrote {result.output}: {len(result.ingredients)} checkpoints averaged, {result.tensors} tensors, "
             f"{format_bytes(result.bytes)}")
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    comparison = result.comparison
    if comparison is None:
        print(result.output)
        return
    rows = [("tensor", "max |soup - reference|")]
    rows += [(name, _number(d)) for name, d in comparison.differences.items()]
    print_table(rows)
    print(f"largest difference from {comparison.reference.name}: {_number(comparison.max_abs_diff)}"
          + (f" ({comparison.worst_tensor})" if comparison.worst_tensor and comparison.max_abs_diff else ""))


def parse_weights(text: str | None) -> list[float] | None:
    """`--weights 1,1,2` as numbers (checked and normalised by the library); an Olmo2KitError for anything else."""
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise Olmo2KitError(f"--weights {text!r}: give one number per checkpoint, separated by commas (e.g. 1,1,2)") \
            from None


def _number(d: float) -> str:
    return "nan" if math.isnan(d) else f"{d:.6g}"
