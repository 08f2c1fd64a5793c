"""Serving under load: `olmo2kit serve` at 1, 4, 16 and 64 concurrent clients against olmo2kit.generate one at a time.

    python benchmarks/bench_serve.py                                   # tiny checkpoint, fp32, CPU
    python benchmarks/bench_serve.py --arch 1b --dtype bf16 --clients 1,4,16 --requests 16 --max-tokens 16
    python benchmarks/bench_serve.py --arch 1b --dtype bf16 --engine vllm ...   # `serve --engine vllm`

The server runs as a subprocess (`olmo2kit serve --port 0 --max-batch-size <most clients>`) on loopback;
the same checkpoint is loaded in this process for the baseline, with the same number of torch threads.
Every server request is a streamed /v1/completions call, greedy, with the same max_tokens; its tokens are
the completion_tokens the server reports, so a request that ends early at end of text counts what it made.
  1 client     each request goes to the server and to olmo2kit.generate in turn (the other side idle),
               over --repeat passes: this gives the baseline, the 1-client row and the server's overhead
  C clients    C closed-loop clients share max(--requests, C) requests, timed from the first send to the
               last answer
Reported per level: requests/s, generated tokens/s and its ratio to generate one at a time, p50 and p99 time
to first token (send to the first streamed chunk), p50 latency, and how many answers have generate's text.
Overhead: the 1-client mean latency over generate's for the same requests (the median over passes).
With --engine vllm the server is vLLM's (its engine in a process of its own: "server CPU" counts only its API
process), timed once /health answers; the baseline stays olmo2kit.generate on transformers.
Targets (the serving issue): 16 clients at least 4x generate's tokens/s on the tiny checkpoint; overhead
at most 1.05.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx2
import torch

from bench_batch import make_prompts
from olmo2kit.compat import quiet_transformers
from olmo2kit.devices import resolve_dtype
from olmo2kit.inference.generation import generate
from olmo2kit.model.loading import load
from olmo2kit.model.sizes import SIZES, get_size, hf_config
from olmo2kit.model.tiny import EOS, PAD, build_tiny

_URL = re.compile(r"at (http://\S+/v1)")
SETTLE_S = 0.02  # untimed pause before each paired call: the other side's last work and spinning threads end


@dataclass
class Answer:
    """One request's result: its text and token count, and the seconds to the first chunk and to the end."""

    text: str
    tokens: int
    ttft_s: float | None
    latency_s: float


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds used so far by process `pid` (from /proc) and by this process, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), time.process_time()


def build_checkpoint(arch: str | None, dtype: str, where: Path, prompts: list[str]) -> Path:
    """A tiny checkpoint, or `arch`'s exact architecture with random weights in `dtype` and `word_tokenizer`."""
    if arch is None:
        return build_tiny(where / "tiny", seed=0)
    from transformers import Olmo2ForCausalLM

    path = where / arch
    config = hf_config(get_size(arch))
    with torch.device("cpu"):
        model = Olmo2ForCausalLM._from_config(config, dtype=resolve_dtype(dtype, "cpu"))
    model.save_pretrained(path)  # safetensors
    word_tokenizer(config.vocab_size, prompts).save_pretrained(path)
    return path


def word_tokenizer(vocab_size: int, texts: list[str]):
    """A tokenizer of `vocab_size` whole words: the words of `texts`, then `w<id>` for every other id.

    Random weights choose ids all over a 100k vocabulary. A byte-level tokenizer (the tiny one) has text for
    few of them, and a token without text, or half a character, makes no streamed chunk: time to first token
    would read as the whole request. Here every id the model picks is a word.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {EOS: 0, PAD: 1, "<unk>": 2}
    for word in sorted({w for text in texts for w in text.split()}):
        vocab.setdefault(word, len(vocab))
    vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size)})
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=words, bos_token=EOS, eos_token=EOS, pad_token=PAD,
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)


@contextmanager
def serving(model: str, dtype: str, max_batch_size: int, threads: int | None,
            engine: str = "transformers") -> Iterator[tuple[str, int]]:
    """(URL, process id) of `olmo2kit serve` on a free loopback port, once it has printed its URL (the model is
    loaded by then) and /health answers; stopped on the way out."""
    env = {**os.environ, "OLMO2KIT_API_KEY": ""}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    process = subprocess.Popen(
        [sys.executable, "-m", "olmo2kit", "serve", "--model", model, "--port", "0", "--dtype", dtype,
         "--max-batch-size", str(max_batch_size), "--engine", engine],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    stderr: list[str] = []
    threading.Thread(target=lambda: stderr.extend(process.stderr), daemon=True).start()
    try:
        for line in process.stdout:
            if match := _URL.search(line):
                wait_healthy(match.group(1).removesuffix("/v1"), process)
                yield match.group(1), process.pid
                return
        process.wait(10)
        raise SystemExit(f"olmo2kit serve exited with {process.returncode}: {''.join(stderr)}")
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_healthy(root: str, process: subprocess.Popen, timeout: float = 900) -> None:
    """Until GET /health answers 200 (at once for olmo2kit's server; vLLM's answers once its engine runs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx2.get(f"{root}/health", timeout=5).status_code == 200:
                return
        except httpx2.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not become healthy")


async def complete(client: httpx2.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
                   stream: bool = True) -> Answer:
    """One greedy /v1/completions request, streamed or not."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    start = time.perf_counter()
    if not stream:
        response = await client.post(f"{url}/completions", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text}")
        reply = response.json()
        return Answer(reply["choices"][0]["text"], reply["usage"]["completion_tokens"], None,
                      time.perf_counter() - start)
    body["stream_options"] = {"include_usage": True}
    pieces, tokens, ttft = [], 0, None
    async with client.stream("POST", f"{url}/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                raise RuntimeError(f"the server failed a request: {chunk['error']['message']}")
            if chunk["choices"]:
                ttft = ttft if ttft is not None else time.perf_counter() - start
                pieces.append(chunk["choices"][0]["text"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return Answer("".join(pieces), tokens, ttft, time.perf_counter() - start)


async def run_level(client, url: str, model: str, prompts: list[str], clients: int, max_tokens: int):
    """(answers in prompt order, wall seconds): `clients` concurrent clients, each sending its next request
    as soon as its last one is answered, until the prompts run out."""
    answers: list[Answer | None] = [None] * len(prompts)
    todo = iter(enumerate(prompts))

    async def client_loop():
        for i, prompt in todo:  # one shared iterator: each prompt goes to whichever client asks first
            answers[i] = await complete(client, url, model, prompt, max_tokens)

    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(clients)))
    return answers, time.perf_counter() - start


async def paired_passes(client, url: str, pid: int, model: str, local, prompts: list[str], max_tokens: int,
                        repeat: int):
    """Each prompt through the server (one client; streamed, and whole as generate returns it) and through
    olmo2kit.generate in turn, `repeat` times, in an order that rotates. Returns ([streamed answers], [whole
    answers], [generate answers], CPU seconds of the server and of this process during the streamed requests),
    the answers pass-major."""
    loaded, tokenizer = local
    served, whole, direct, cpu = [], [], [], [0.0, 0.0]
    for r in range(repeat):
        for i, prompt in enumerate(prompts):
            for side in ((0, 1, 2), (1, 2, 0), (2, 0, 1))[(i + r) % 3]:
                await asyncio.sleep(SETTLE_S)
                if side == 0:
                    before = cpu_seconds(pid)
                    served.append(await complete(client, url, model, prompt, max_tokens))
                    cpu = [used + now - then for used, now, then in zip(cpu, cpu_seconds(pid), before, strict=True)]
                elif side == 1:
                    whole.append(await complete(client, url, model, prompt, max_tokens, stream=False))
                else:
                    start = time.perf_counter()
                    out = generate(loaded, tokenizer, prompt, do_sample=False, max_new_tokens=max_tokens)
                    direct.append(Answer(out.text, out.new_tokens, None, time.perf_counter() - start))
    return served, whole, direct, cpu


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, interpolated between the two nearest ranks."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    low = math.floor(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def level_row(clients: int, answers: list[Answer], wall: float, cpu: list[float], reference: list[str]) -> dict:
    """One level's figures; `cpu` is the CPU seconds of the server and of this client process over it,
    `reference` generate's text for each answer."""
    ttfts = [a.ttft_s for a in answers if a.ttft_s is not None]
    return {
        "clients": clients, "requests": len(answers), "wall_s": wall,
        "requests_per_s": len(answers) / wall, "tokens_per_s": sum(a.tokens for a in answers) / wall,
        "tokens": sum(a.tokens for a in answers),
        "ttft_p50_s": percentile(ttfts, 50) if ttfts else None, "ttft_p99_s": percentile(ttfts, 99) if ttfts else None,
        "latency_p50_s": percentile([a.latency_s for a in answers], 50),
        "server_cores": cpu[0] / wall, "client_cores": cpu[1] / wall,
        "same_text": sum(a.text == ref for a, ref in zip(answers, reference, strict=True)),
    }


async def measure(args, url: str, pid: int, model: str, local, prompts: list[str], levels: list[int]) -> dict:
    limits = httpx2.Limits(max_connections=max(levels) + 4, max_keepalive_connections=max(levels) + 4)
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(None), limits=limits) as client:
        # warm-up: one whole request each way, then the batched path once at the most clients
        await complete(client, url, model, prompts[0], args.max_tokens)
        generate(*local, prompts[0], do_sample=False, max_new_tokens=args.max_tokens)
        await run_level(client, url, model, [prompts[i % len(prompts)] for i in range(max(levels))], max(levels), 2)

        served, whole, direct, cpu = await paired_passes(client, url, pid, model, local, prompts, args.max_tokens,
                                                         args.repeat)
        n = len(prompts)

        def over(answers: list[Answer]) -> list[float]:
            return [sum(a.latency_s for a in answers[p * n: (p + 1) * n])
                    / sum(a.latency_s for a in direct[p * n: (p + 1) * n]) for p in range(args.repeat)]

        overheads, whole_overheads = over(served), over(whole)
        if args.engine == "transformers":  # vLLM's kernels round differently in bf16: its texts are counted only
            assert [a.text for a in whole] == [a.text for a in direct], "a whole answer differs from generate's"
        reference = [a.text for a in direct[:n]]
        baseline_s = sum(a.latency_s for a in direct)
        baseline = {
            "requests": len(direct), "wall_s": baseline_s, "requests_per_s": len(direct) / baseline_s,
            "tokens_per_s": sum(a.tokens for a in direct) / baseline_s, "tokens": sum(a.tokens for a in direct),
            "latency_p50_s": percentile([a.latency_s for a in direct], 50),
            "short": sum(a.tokens < args.max_tokens for a in direct[:n]),
        }
        rows = [level_row(1, served, sum(a.latency_s for a in served), cpu, reference * args.repeat)]
        for clients in levels[1:]:
            count = max(n, clients)  # every client gets a request: the prompts again, in order, past n
            before = cpu_seconds(pid)
            answers, wall = await run_level(client, url, model, [prompts[i % n] for i in range(count)], clients,
                                            args.max_tokens)
            cpu = [now - then for now, then in zip(cpu_seconds(pid), before, strict=True)]
            rows.append(level_row(clients, answers, wall, cpu, [reference[i % n] for i in range(count)]))
    for row in rows:
        row["over_generate"] = row["tokens_per_s"] / baseline["tokens_per_s"]
    return {"baseline": baseline, "levels": rows, "overhead_passes": overheads,
            "overhead": statistics.median(overheads), "whole_overhead_passes": whole_overheads,
            "whole_overhead": statistics.median(whole_overheads)}


def print_report(what: str, args, threads: int, result: dict) -> None:
    base = result["baseline"]
    load = result["load_average"]
    print(f"{what} on CPU, {threads} torch thread(s) in the server and here; {args.max_tokens} new tokens a request, "
          f"greedy, streamed /v1/completions; 1-minute load average {load['before'][0]:.2f} before, "
          f"{load['after'][0]:.2f} after")

    def ms(seconds: float | None) -> str:
        return f"{seconds * 1000:9.1f}" if seconds is not None else f"{'-':>9}"

    print(f"  {'way':8} {'clients':>7} {'requests':>8} {'req/s':>7} {'tokens/s':>9} {'x gen':>6} {'TTFT p50':>9} "
          f"{'TTFT p99':>9} {'lat. p50':>9} {'same text':>9} {'server CPU':>10} {'client CPU':>10}")
    print(f"  {'generate':8} {1:7d} {base['requests']:8d} {base['requests_per_s']:7.2f} {base['tokens_per_s']:9.1f} "
          f"{1:6.2f} {ms(None)} {ms(None)} {ms(base['latency_p50_s'])} {'-':>9} {'-':>10} {'-':>10}")
    for row in result["levels"]:
        same = f"{row['same_text']}/{row['requests']}"
        print(f"  {'serve':8} {row['clients']:7d} {row['requests']:8d} {row['requests_per_s']:7.2f} "
              f"{row['tokens_per_s']:9.1f} {row['over_generate']:6.2f} {ms(row['ttft_p50_s'])} "
              f"{ms(row['ttft_p99_s'])} {ms(row['latency_p50_s'])} {same:>9} {row['server_cores']:10.2f} "
              f"{row['client_cores']:10.2f}")
    passes = ", ".join(f"{o:.3f}" for o in result["overhead_passes"])
    whole = ", ".join(f"{o:.3f}" for o in result["whole_overhead_passes"])
    print(f"  server overhead, 1 client, streamed: mean latency / generate's = {result['overhead']:.3f} "
          f"(median of {args.repeat} passes: {passes}; target <= 1.05)")
    print(f"  server overhead, 1 client, whole answer (stream false, as generate returns it): "
          f"{result['whole_overhead']:.3f} (passes: {whole})")
    print("  x gen: tokens/s over generate's one at a time; CPU: cores busy on average (CPU seconds over wall seconds)")
    if base["short"]:
        print(f"  {base['short']} of {args.requests} prompts reach end of text before {args.max_tokens} tokens "
              f"(the tokens they did generate are counted)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="A checkpoint directory (default: build a tiny one in a temporary directory).")
    parser.add_argument("--arch", choices=list(SIZES), help="Build this size's architecture, random weights, instead.")
    parser.add_argument("--dtype", default="fp32", help="The dtype of the server and of the baseline (and of --arch's "
                                                        "weights).")
    parser.add_argument("--clients", default="1,4,16,64", help="Concurrency levels, comma-separated.")
    parser.add_argument("--requests", type=int, help="Distinct requests (a level with more clients sends them "
                                                     "again to reach one each); default 64, 16 with --arch.")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, help="Passes of the 1-client pairing; default 5, 1 with --arch.")
    parser.add_argument("--threads", type=int, help="torch CPU threads of both the server and the baseline "
                                                    "(default: torch's default, the same in both).")
    parser.add_argument("--engine", default="transformers", choices=["transformers", "vllm"],
                        help="The server's engine (the baseline is transformers either way).")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    levels = sorted({int(c) for c in args.clients.split(",")} | {1})
    args.requests = args.requests or (16 if args.arch else 64)
    args.repeat = args.repeat or (1 if args.arch else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    quiet_transformers()

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as work:
        prompts = make_prompts(args.requests)
        path = Path(args.model) if args.model else build_checkpoint(args.arch, args.dtype, Path(work), prompts)
        model = str(path)
        load_before = os.getloadavg()
        with serving(model, args.dtype, max(levels), args.threads, args.engine) as (url, pid):
            local = load(model, dtype=args.dtype, device="cpu")
            params = sum(p.numel() for p in local[0].parameters())
            what = (f"OLMo 2 {args.arch} architecture, random weights" if args.arch else f"checkpoint {path.name}"
                    if args.model else "tiny checkpoint") + f" ({params:,} params, {args.dtype})"
            what += f", server on {args.engine}"
            print(f"{what}: serving at {url}", file=sys.stderr)
            result = asyncio.run(measure(args, url, pid, model, local, prompts, levels))
        result["load_average"] = {"before": load_before, "after": os.getloadavg()}
    print_report(what, args, threads, result)
    if args.json:
        args.json.write_text(json.dumps({"what": what, "engine": args.engine, "device": "CPU", "threads": threads,
                                         "max_tokens": args.max_tokens, "repeat": args.repeat, **result}, indent=2))


if __name__ == "__main__":
    main()
