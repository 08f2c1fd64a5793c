"""Batch jobs: time per prompt with --batch-size 8 against 1, olmo2kit's job against direct transformers calls.

    python benchmarks/bench_batch.py --threads 1                           # tiny checkpoint, CPU
    PYTHONPATH=src python benchmarks/bench_batch.py --size 1b --device cuda    # 1B architecture, random weights

Each way runs the same prompts (of mixed lengths), greedy, after a warm-up, --repeat times in
shuffled order; the median wall time over the number of prompts is the time per prompt.
  job        olmo2kit.inference.jobs.run_job: read the JSONL, batch, generate, append and fsync the results
  raw        the direct transformers loop: tokenize a batch (left padding), model.generate, batch_decode
Reported: time per prompt for each way and batch size, job / raw at the same batch size (the job's
overhead), and batch 1 / batch B (what batching gains; above 1 means batched is faster per prompt).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from common import add_model_args, device_name, setup_model, time_interleaved
from olmo2kit.inference.jobs import run_job

SENTENCES = [
    "Language modeling is the task of predicting the next word in a sequence of text.",
    "OLMo 2 is a family of fully open language models.",
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world!",
]


def make_prompts(count: int) -> list[str]:
    """Prompts of 1 to 4 sentences, so batches carry padding as real ones do."""
    return [" ".join(SENTENCES[: 1 + i % 4]) + f" ({i})" for i in range(count)]



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8, help="The batch size set against 1.")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads; 1 keeps figures steady on a shared machine.")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer, what = setup_model(args.size, args.dtype, args.device)
    prompts = make_prompts(args.prompts)
    work = Path(tempfile.mkdtemp())
    source = work / "prompts.jsonl"
    source.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    kwargs = dict(max_new_tokens=args.new_tokens, do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id)

    def job(batch_size: int):
        output = work / f"results-{batch_size}.jsonl"
        output.unlink(missing_ok=True)  # a fresh job each time, not a resumed one
        run_job(model, tokenizer, source, output, batch_size=batch_size, model_name="bench",
                do_sample=False, max_new_tokens=args.new_tokens)

    def raw(batch_size: int):
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True,
                              return_token_type_ids=False).to(model.device)
            with torch.inference_mode():
                out = model.generate(**batch, **kwargs)
            tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    sizes = [1, args.batch_size]
    runs = {(name, b): (lambda fn=fn, b=b: fn(b)) for b in sizes for name, fn in (("job", job), ("raw", raw))}
    times = time_interleaved(runs, args.repeat, args.device)
    per_prompt = {key: statistics.median(t) / len(prompts) for key, t in times.items()}

    device = device_name(args.device)
    big = args.batch_size
    threads = f", {torch.get_num_threads()} CPU thread(s)" if device == "CPU" else ""
    print(f"{what} on {device}{threads}: {len(prompts)} prompts, {args.new_tokens} new tokens, greedy, "
          f"median of {args.repeat}")
    print(f"  {'way':5} {'batch':>5} {'ms/prompt':>10} {'prompts/s':>10} {'job/raw':>8} {f'b1/b{big}':>8}")
    rows = []
    for name in ("job", "raw"):
        for b in sizes:
            seconds = per_prompt[(name, b)]
            overhead = per_prompt[("job", b)] / per_prompt[("raw", b)]
            gain = per_prompt[(name, 1)] / per_prompt[(name, big)]
            overhead_cell = f"{overhead:8.3f}" if name == "job" else f"{'-':>8}"
            gain_cell = f"{gain:8.2f}" if b == big else f"{'-':>8}"
            print(f"  {name:5} {b:5d} {seconds * 1000:10.2f} {1 / seconds:10.2f} {overhead_cell} {gain_cell}")
            rows.append({"way": name, "batch_size": b, "s_per_prompt": seconds})
    summary = {
        "job_over_raw": {b: per_prompt[("job", b)] / per_prompt[("raw", b)] for b in sizes},
        "batch_speedup": {name: per_prompt[(name, 1)] / per_prompt[(name, big)] for name in ("job", "raw")},
    }
    print(f"  batched ({big}) is {summary['batch_speedup']['job']:.2f}x faster per prompt than batch 1 in a job "
          f"({summary['batch_speedup']['raw']:.2f}x with direct transformers calls)")
    if args.json:
        args.json.write_text(json.dumps({"what": what, "device": device, "threads": torch.get_num_threads(),
                                         "prompts": len(prompts),
                                         "new_tokens": args.new_tokens, "repeat": args.repeat, "rows": rows,
                                         **summary}, indent=2))


if __name__ == "__main__":
    main()
