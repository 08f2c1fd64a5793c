"""The two engines in one run: batch-job throughput over 64 prompts and time to the first token, olmo2kit on
transformers and on vLLM, each beside the direct call to its own library.

    PYTHONPATH=src python benchmarks/bench_engines.py --size 1b               # the 1B architecture, bf16
    PYTHONPATH=src python benchmarks/bench_engines.py --size tiny --dtype fp32 --prompts 8   # a quick check

Ways (greedy, the same prompts of 1 to 4 sentences, --new-tokens each):
  transformers job      olmo2kit's run_job on transformers, --batch-size and then all prompts per generate call
  transformers direct   tokenize a batch (left padding), model.generate, batch_decode: --batch-size at a time
  vllm job              olmo2kit's run_job on vLLM, --batch-size and then all prompts in flight at once
  vllm direct           vLLM's LLM.generate on all prompts (vLLM's scheduler batches them)
Time to first token: one prompt of about 32 tokens, `stream_generate` until its first piece, median of --repeat.
Perplexity (with --perplexity-tokens N): `olmo2kit.perplexity` over a text of N tokens in windows of
--window (stride half of it) on each engine, one timed run after a warm-up; tokens scored per second.
Throughput is generated tokens (as each way counts them, up to end of text) over wall seconds, one timed run
after a warm-up on 4 prompts. transformers runs first: vLLM, run in this process, replaces transformers'
OLMo 2 classes in place (olmo2kit's CPU default runs vLLM's engine in the calling process).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench_batch import make_prompts
from bench_perplexity import text_of
from common import device_name
from olmo2kit.evals.bench import load_random
from olmo2kit.evals.perplexity import perplexity
from olmo2kit.inference.generation import stream_generate
from olmo2kit.inference.jobs import run_job
from olmo2kit.model.engines import engine_info
from olmo2kit.model.vllm import VllmOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1b", help="A size (1b ... 32b), or tiny.")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3, help="Time-to-first-token runs.")
    parser.add_argument("--perplexity-tokens", type=int, default=0, help="Also time perplexity (0: do not).")
    parser.add_argument("--window", type=int, default=1024, help="Perplexity window, in tokens.")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

    prompts = make_prompts(args.prompts)
    work = Path(tempfile.mkdtemp())
    source, warm = work / "prompts.jsonl", work / "warm.jsonl"
    source.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    warm.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts[:4])))
    ttft_prompt = " ".join(make_prompts(4)[3:]) + " " + make_prompts(4)[1]
    options = dict(do_sample=False, max_new_tokens=args.new_tokens)
    rows: list[dict] = []

    def job(model, tokenizer, way: str, batch_size: int) -> None:
        name = f"{way}-{batch_size}".replace(" ", "-")  # a fresh output each time: a job resumes its file
        run_job(model, tokenizer, warm, work / f"{name}-warm.jsonl", batch_size=batch_size, **options)
        out = work / f"{name}.jsonl"
        assert not out.exists()
        start = time.perf_counter()
        run_job(model, tokenizer, source, out, batch_size=batch_size, **options)
        seconds = time.perf_counter() - start
        tokens = sum(json.loads(line)["new_tokens"] for line in out.read_text().splitlines())
        record(way, batch_size, tokens, seconds)

    def record(way: str, batch_size: int | str, tokens: int, seconds: float) -> None:
        rows.append(dict(way=way, batch_size=batch_size, tokens=tokens, seconds=round(seconds, 2),
                         tokens_per_s=round(tokens / seconds, 2)))
        print(f"{way:22s} batch {batch_size!s:>4}: {tokens} tokens in {seconds:7.1f} s = {tokens / seconds:7.2f} "
              "tokens/s", flush=True)

    def ttft(model, tokenizer, way: str) -> None:
        times = []
        for _ in range(args.repeat + 1):  # the first is a warm-up
            start = time.perf_counter()
            next(iter(stream_generate(model, tokenizer, ttft_prompt, do_sample=False, max_new_tokens=2)))
            times.append(time.perf_counter() - start)
        median = statistics.median(times[1:])
        prompt_tokens = len(tokenizer(ttft_prompt)["input_ids"])
        rows.append(dict(way=way, ttft_s=round(median, 3), prompt_tokens=prompt_tokens))
        print(f"{way:22s} time to first token ({prompt_tokens}-token prompt): {median * 1000:8.1f} ms", flush=True)

    def scored(model, tokenizer, way: str) -> None:
        if not args.perplexity_tokens:
            return
        text = text_of(tokenizer, args.perplexity_tokens)
        window = dict(max_length=args.window, stride=args.window // 2)
        perplexity(model, tokenizer, text[: len(text) // 8], **window)  # warm-up
        start = time.perf_counter()
        result = perplexity(model, tokenizer, text, **window)
        seconds = time.perf_counter() - start
        rows.append(dict(way=way, perplexity=result.perplexity, scored_tokens=result.tokens,
                         seconds=round(seconds, 2), scored_tokens_per_s=round(result.tokens / seconds, 1)))
        print(f"{way:22s} perplexity {result.perplexity:.6g} over {result.tokens} tokens in {seconds:.1f} s = "
              f"{result.tokens / seconds:.1f} tokens/s", flush=True)

    versions = {}
    start = time.perf_counter()
    model, tokenizer = load_random(args.size, args.dtype, None, args.device)
    print(f"transformers: loaded the {args.size} architecture (random weights, {args.dtype}) in "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    versions["transformers"] = engine_info(model)["engine_version"]
    sizes = dict.fromkeys([args.batch_size, len(prompts)])  # --batch-size, then all prompts at once
    for size in sizes:
        job(model, tokenizer, "transformers job", size)
    direct_transformers(model, tokenizer, prompts, args.batch_size, args.new_tokens, record)
    ttft(model, tokenizer, "transformers")
    scored(model, tokenizer, "transformers perplexity")
    del model

    start = time.perf_counter()
    # a perplexity window on vLLM needs one token more than it holds (Engine.scoring_context)
    model, tokenizer = load_random(args.size, args.dtype, None, args.device, engine="vllm",
                                   vllm=VllmOptions(max_model_len=max(1024, args.window + 1)))
    print(f"vLLM: loaded and started in {time.perf_counter() - start:.1f} s", flush=True)
    versions["vllm"] = engine_info(model)["engine_version"]
    for size in sizes:
        job(model, tokenizer, "vllm job", size)
    direct_vllm(model, tokenizer, prompts, args.new_tokens, record)
    ttft(model, tokenizer, "vllm")
    scored(model, tokenizer, "vllm perplexity")
    model.close()

    by = {(r["way"], r.get("batch_size")): r for r in rows}
    base = by[("transformers job", args.batch_size)]["tokens_per_s"]
    print(f"\nratios (tokens/s over olmo2kit's transformers job at batch {args.batch_size}):")
    for row in rows:
        if "tokens_per_s" in row:
            print(f"  {row['way']:22s} batch {row['batch_size']!s:>4}: {row['tokens_per_s'] / base:5.2f}x")
    ttfts = {r["way"]: r["ttft_s"] for r in rows if "ttft_s" in r}
    print(f"  time to first token, vllm / transformers: {ttfts['vllm'] / ttfts['transformers']:.2f}x")
    scores = {r["way"]: r["scored_tokens_per_s"] for r in rows if "scored_tokens_per_s" in r}
    if scores:
        print(f"  perplexity tokens/s, vllm / transformers: "
              f"{scores['vllm perplexity'] / scores['transformers perplexity']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(dict(size=args.size, dtype=args.dtype, device=device_name(args.device),
                                             threads=torch.get_num_threads(), new_tokens=args.new_tokens,
                                             versions=versions, rows=rows), indent=2))


def direct_transformers(model, tokenizer, prompts, batch_size: int, new_tokens: int, record) -> None:
    """The direct transformers loop over the same prompts: a warm-up batch, then the timed pass."""
    def run(batch: list[str]) -> int:
        encoded = tokenizer(batch, return_tensors="pt", padding=True).to(model.device)
        with torch.inference_mode():
            out = model.generate(**encoded, max_new_tokens=new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id)
        new = out[:, encoded["input_ids"].shape[1]:]
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        assert len(texts) == len(batch)
        return sum(generated_length(row.tolist(), tokenizer) for row in new)

    run(prompts[:4])
    start = time.perf_counter()
    tokens = sum(run(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size))
    record("transformers direct", batch_size, tokens, time.perf_counter() - start)


def generated_length(row: list[int], tokenizer) -> int:
    """New tokens up to and including the end of text, as olmo2kit counts them (padding after it is not)."""
    eos = tokenizer.eos_token_id
    return row.index(eos) + 1 if eos in row else len(row)


def direct_vllm(model, tokenizer, prompts, new_tokens: int, record) -> None:
    """vLLM's own LLM.generate over all the prompts at once: a warm-up on four, then the timed pass."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0)
    model.llm.generate(prompts[:4], params, use_tqdm=False)
    start = time.perf_counter()
    outputs = model.llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    record("vllm direct", len(prompts), sum(len(o.outputs[0].token_ids) for o in outputs), seconds)


if __name__ == "__main__":  # vLLM may spawn processes that import this module
    main()
