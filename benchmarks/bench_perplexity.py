"""Perplexity throughput of olmo2kit.perplexity against a direct transformers sliding-window loop.

    python benchmarks/bench_perplexity.py                                   # tiny checkpoint, CPU
    PYTHONPATH=src python benchmarks/bench_perplexity.py --device cuda --size 1b   # 1B architecture, random weights

Both ways score the same tokens of the same text (preceded by the beginning-of-text token) with the
same windows (--max-length, --stride), interleaved in random order, --repeat times after a warm-up:
  transformers  the loop of transformers' perplexity guide: model(window, labels=...) per window,
                with the guide's -100 masking of the context part (its token count, `num_valid_tokens -
                batch_size`, is one short in every window after the first, so labels are counted here
                after the shift instead)
  olmo2kit      olmo2kit.perplexity(model, tokenizer, text, max_length=..., stride=...)
Reported: the best and the median time of each (the best is the least disturbed by other load on the
machine), tokens/s and their ratio, and the relative difference of the two perplexities.
Target: olmo2kit within 5% of the direct loop (ratio of tokens/s at least 0.95).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from pathlib import Path

import torch

from common import add_model_args, device_name, setup_model, time_interleaved
from olmo2kit.evals.perplexity import perplexity

SENTENCES = [
    "Language modeling is the task of predicting the next word in a sequence of text.",
    "OLMo 2 is a family of fully open language models trained on trillions of tokens.",
    "The models are released with their data, code, training logs and intermediate checkpoints.",
    "A transformer reads a sequence of tokens and computes attention between every pair of positions.",
    "Each layer normalizes its outputs, and the final layer predicts a distribution over the vocabulary.",
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today? I am fine, thank you.",
]


def text_of(tokenizer, tokens: int) -> str:
    """SENTENCES, shuffled and repeated until the text is `tokens` tokens or more."""
    lines = list(SENTENCES)
    rng = random.Random(0)
    chunks, count = [], 0
    while count < tokens:
        rng.shuffle(lines)
        chunks.append("\n".join(lines) + "\n")
        count += len(tokenizer(chunks[-1], add_special_tokens=False)["input_ids"])
    return "".join(chunks)


def transformers_loop(model, tokenizer, text: str, max_length: int, stride: int) -> tuple[float, int]:
    """transformers' perplexity guide, over the text after the beginning-of-text token: (perplexity, tokens)."""
    ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]]
    input_ids = torch.tensor([ids], device=model.device)
    seq_len = input_ids.size(1)
    nll_sum = torch.zeros((), dtype=torch.float64, device=model.device)
    n_tokens = 0
    prev_end_loc = 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        window = input_ids[:, begin_loc:end_loc]
        target_ids = window.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(window, labels=target_ids).loss
        scored = int((target_ids[:, 1:] != -100).sum())
        nll_sum += loss * scored
        n_tokens += scored
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum.item() / n_tokens), n_tokens



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser, dtype="fp32")
    parser.add_argument("--tokens", type=int, default=16384, help="Length of the text, in tokens.")
    parser.add_argument("--max-length", type=int, help="Tokens per window (default: the model's context).")
    parser.add_argument("--stride", type=int, help="Default: half of --max-length.")
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    model, tokenizer, what = setup_model(args.size, args.dtype, args.device)
    max_length = args.max_length or model.config.max_position_embeddings
    stride = args.stride or max_length // 2
    text = text_of(tokenizer, args.tokens)

    values: dict[str, float] = {}

    def direct():
        values["transformers"], _ = transformers_loop(model, tokenizer, text, max_length, stride)

    def ours():
        result["olmo2kit"] = perplexity(model, tokenizer, text, max_length=max_length, stride=stride)

    result = {}
    runs = {"transformers": direct, "olmo2kit": ours}
    times = time_interleaved(runs, args.repeat, args.device)

    tokens = result["olmo2kit"].tokens
    values["olmo2kit"] = result["olmo2kit"].perplexity
    best = {name: min(t) for name, t in times.items()}
    median = {name: statistics.median(t) for name, t in times.items()}
    tps = {name: tokens / seconds for name, seconds in best.items()}
    ratio = tps["olmo2kit"] / tps["transformers"]
    median_ratio = median["transformers"] / median["olmo2kit"]
    difference = abs(values["olmo2kit"] / values["transformers"] - 1)
    device = device_name(args.device)
    print(f"{what} on {device}: {tokens:,} tokens, windows of {max_length} by {stride}, {args.repeat} runs each")
    for name in runs:
        print(f"  {name:13} best {best[name] * 1000:9.1f} ms  {tps[name]:10,.0f} tokens/s   "
              f"median {median[name] * 1000:9.1f} ms   perplexity {values[name]:.6g}")
    print(f"  olmo2kit / transformers tokens/s = {ratio:.3f} (best), {median_ratio:.3f} (median)   "
          f"perplexities differ by {difference:.1e} (relative)")
    if args.json:
        args.json.write_text(json.dumps({
            "what": what, "device": device, "tokens": tokens, "max_length": max_length, "stride": stride,
            "repeat": args.repeat, "best_s": best, "median_s": median, "tokens_per_s": tps, "ratio": ratio,
            "median_ratio": median_ratio, "perplexity": values, "relative_difference": difference,
        }, indent=2))


if __name__ == "__main__":
    main()
