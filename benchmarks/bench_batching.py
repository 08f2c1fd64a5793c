"""Continuous batching engines for the server: olmo2kit's scheduler against transformers' own.

    python benchmarks/bench_batching.py                            # tiny checkpoint, CPU, fp32
    python benchmarks/bench_batching.py --size 1b --requests 8 --new-tokens 16    # 1B architecture, bf16

The same requests (mixed prompt lengths, greedy, a fixed number of new tokens, end of text off so every
row runs its length) through each way, after a warm-up, --repeat times in shuffled order:
  scheduler      olmo2kit.inference.batching.BatchScheduler, every request submitted at once
  transformers   transformers' continuous batching, model.generate_batch (its paged-cache manager)
  sequential     olmo2kit.generate, one request after another (what a server without batching does)
Reported: generated tokens/s of each (median) and the ratios; the first tokens of each way are compared.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import threading

import olmo2kit
from common import add_model_args, device_name, setup_model, time_interleaved
from olmo2kit.inference.batching import BatchRequest, BatchScheduler, Failed, Finished, Token

PROMPT = "Language modeling is the task of predicting the next word in a sequence of text. "


def run_scheduler(model, tokenizer, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    scheduler = BatchScheduler(model, tokenizer, max_batch_size=len(prompts), eos_ids=set())
    finished = threading.Semaphore(0)
    outputs: list[list[int]] = [[] for _ in prompts]

    def collect(row: int):
        def emit(event) -> None:
            if isinstance(event, Token):
                outputs[row].append(event.id)
            elif isinstance(event, Finished | Failed):
                finished.release()
        return emit

    try:
        for row, prompt in enumerate(prompts):
            scheduler.submit(BatchRequest(prompt, new_tokens), collect(row))
        for _ in prompts:
            finished.acquire()
    finally:
        scheduler.close()
    return outputs


def run_transformers(model, tokenizer, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1,
                              pad_token_id=tokenizer.pad_token_id)
    results = model.generate_batch(prompts, generation_config=config, progress_bar=False)
    return [list(results[key].generated_tokens) for key in sorted(results, key=lambda k: int(k.split("_")[-1]))]


def run_sequential(model, tokenizer, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    texts = [tokenizer.decode(p) for p in prompts]
    return [olmo2kit.generate(model, tokenizer, text, do_sample=False, max_new_tokens=new_tokens).token_ids
            for text in texts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser, dtype="fp32")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)

    model, tokenizer, what = setup_model(args.size, args.dtype, args.device)
    model.generation_config.eos_token_id = None  # every row runs its full length in every way
    prompts = [tokenizer(PROMPT * (1 + i % 4) + f"({i})")["input_ids"] for i in range(args.requests)]
    ways = {"scheduler": run_scheduler, "transformers": run_transformers, "sequential": run_sequential}
    outputs = {name: way(model, tokenizer, prompts, args.new_tokens) for name, way in ways.items()}
    times = time_interleaved({name: lambda way=way: way(model, tokenizer, prompts, args.new_tokens)
                              for name, way in ways.items()}, args.repeat, args.device)
    tokens = args.requests * args.new_tokens
    rate = {name: tokens / statistics.median(t) for name, t in times.items()}
    same = {name: out[0][:8] == outputs["sequential"][0][:8] for name, out in outputs.items()}
    result = {"model": what, "device": device_name(args.device), "requests": args.requests,
              "new_tokens": args.new_tokens, "tokens_per_s": rate, "first_tokens_agree": same,
              "scheduler_over_transformers": rate["scheduler"] / rate["transformers"],
              "scheduler_over_sequential": rate["scheduler"] / rate["sequential"]}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{what} on {result['device']}: {args.requests} requests x {args.new_tokens} new tokens, greedy")
    for name in ways:
        print(f"  {name:<13} {rate[name]:9.1f} tokens/s   first tokens agree with sequential: {same[name]}")
    print(f"  scheduler / transformers: {result['scheduler_over_transformers']:.1f}x;  "
          f"scheduler / sequential: {result['scheduler_over_sequential']:.1f}x")


if __name__ == "__main__":
    main()
