"""Overhead of olmo2kit.generate over calling model.generate directly, on one loaded model.

    python benchmarks/bench_generate.py                       # tiny checkpoint, CPU
    python benchmarks/bench_generate.py --size 1b --device cuda --new-tokens 128   # 1B architecture, random weights

Three ways to get the same greedy continuation, interleaved, each --repeat times after a warm-up:
  raw_generate   model.generate on already tokenized inputs (the bare call)
  raw_recipe     the model card's recipe: tokenizer, model.generate, batch_decode
  olmo2kit       olmo2kit.generate(model, tokenizer, prompt, do_sample=False)
  olmo2kit_compiled   (with --compiled) olmo2kit.generate(..., compile=True): the static-cache compiled path
The median wall time of each is reported with the ratios to the first two. Target: at most 3% over.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from common import add_model_args, device_name, setup_model, time_interleaved
from olmo2kit.inference.generation import generate

PROMPT = "Language modeling is the task of predicting the next word in a sequence of text. " * 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--compiled", action="store_true", help="Also time the compiled path (compile=True).")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    model, tokenizer, what = setup_model(args.size, args.dtype, args.device)
    kwargs = dict(max_new_tokens=args.new_tokens, do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id)
    inputs = {k: v.to(model.device) for k, v in tokenizer(PROMPT, return_tensors="pt",
                                                           return_token_type_ids=False).items()}

    def raw_generate():
        with torch.inference_mode():
            model.generate(**inputs, **kwargs)

    def raw_recipe():
        encoded = tokenizer([PROMPT], return_tensors="pt", return_token_type_ids=False).to(model.device)
        with torch.inference_mode():
            out = model.generate(**encoded, **kwargs)
        tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)

    def ours():
        generate(model, tokenizer, PROMPT, do_sample=False, max_new_tokens=args.new_tokens)

    def ours_compiled():
        generate(model, tokenizer, PROMPT, do_sample=False, max_new_tokens=args.new_tokens, compile=True)

    runs = {"raw_generate": raw_generate, "raw_recipe": raw_recipe, "olmo2kit": ours}
    if args.compiled:
        runs["olmo2kit_compiled"] = ours_compiled
    times = time_interleaved(runs, args.repeat, args.device)
    median = {name: statistics.median(t) for name, t in times.items()}
    device = device_name(args.device)
    print(f"{what} on {device}, {args.new_tokens} new tokens, greedy, median of {args.repeat}")
    for name, seconds in median.items():
        print(f"  {name:13} {seconds * 1000:9.2f} ms  {args.new_tokens / seconds:8.1f} tokens/s")
    over_bare = median["olmo2kit"] / median["raw_generate"]
    over_recipe = median["olmo2kit"] / median["raw_recipe"]
    print(f"  olmo2kit / raw_generate = {over_bare:.3f}   olmo2kit / raw_recipe = {over_recipe:.3f}")
    if args.compiled:
        print(f"  olmo2kit_compiled / raw_generate = {median['olmo2kit_compiled'] / median['raw_generate']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"what": what, "device": device, "median_s": median,
                                         "ratio_vs_generate": over_bare, "ratio_vs_recipe": over_recipe}, indent=2))


if __name__ == "__main__":
    main()
