"""`olmo2kit serve --engine llamacpp` against llama.cpp's own llama-server on the same GGUF file, in one run:
generated tokens/s at 1 and 16 clients, and the time to first token of a 10-turn chat's first and last turns.

    make llama-server   # llama.cpp's server, built from the source llama-cpp-python was built from
    PYTHONPATH=src .venv/bin/python benchmarks/bench_llamacpp_serve.py --work /tmp/bench-llamacpp-serve
    PYTHONPATH=src .venv/bin/python benchmarks/bench_llamacpp_serve.py --size tiny --work /tmp/bls-tiny  # quick check

The model: --size's architecture (the 1B by default) with random weights and the tiny byte-level tokenizer
(`evals.bench.load_random`), saved once under --work and reused. Random weights pick ids all over the vocabulary,
and most have no text in a 512-token tokenizer: a streamed chunk would wait for text that never comes and
time to first token would read as the whole request. So the output rows (lm_head) of every id that is not a plain
ASCII word piece, end of text included, are zeroed: greedy decoding then picks a word piece at every step, no
request ends early, and the work per token is unchanged. Speed does not depend on the weights' values.

Each GGUF type (--types, Q8_0 and bf16 by default) is made once through olmo2kit's own GGUF cache (`gguf_file`,
$OLMO2KIT_GGUF_CACHE under --work), and both servers run on that very file, started together:
  olmo2kit     `olmo2kit serve --model CKPT --engine llamacpp --quantize TYPE --max-batch-size 16 --port P`
  llama-server `llama-server -m FILE --host 127.0.0.1 --port P -np 16 -t THREADS` (its defaults otherwise:
               cache_prompt on, a slot per client), THREADS = the cores this process may use, as olmo2kit uses
Throughput (bench_serve's `run_level`): C closed-loop clients on loopback share --requests streamed greedy
/v1/completions requests of --max-tokens new tokens; tokens are the completion_tokens each server reports. The
requests are split into passes (--passes, 4 by default, at most one request per client each: 2 passes of 16 at
16 clients), the servers alternating A B B A ..., each level starting with the other server than the last; a
side's tokens/s is its tokens over its seconds, summed over its passes. On a shared machine a burst of other work
slows whichever server runs then: the table also gives each pass and the median of the passes' ratios (each pass
of one server beside the other's pass next to it).
Chat: a conversation of --turns user turns of about --turn-tokens tokens, each sent as a streamed greedy
/v1/chat/completions of --reply-tokens tokens with the whole conversation so far, the reply appended as the
assistant's turn; time to first token is from the send to the first streamed chunk with a choice (both servers
send it with the first token). --chats conversations, distinct from their first words, the servers in turn;
the median per turn is reported. With prefix reuse the last turn reads only its new messages; for scale, the last
turn is also sent with another first word, which no cache holds (the whole conversation read again).
Targets (issue 24): olmo2kit / llama-server at 16 clients >= 0.90, at 1 client >= 0.95, for Q8_0 and bf16;
olmo2kit's TTFT of the last turn <= 1.20x its first turn's. The output is Markdown, for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2

from bench_batch import SENTENCES, make_prompts
from bench_serve import run_level, wait_healthy
from olmo2kit.evals.bench import TINY_SIZES, load_random
from olmo2kit.model.sizes import SIZES

LLAMA_SERVER = Path(sys.prefix) / "llama.cpp-build" / "bin" / "llama-server"
SETTLE_S = 0.5  # untimed pause before each timed pass: the other server's spinning threads go back to sleep
TARGETS = {1: 0.95, 16: 0.90}  # olmo2kit / llama-server tokens/s at 1 and 16 clients (issue 24)
TTFT_TARGET = 1.20  # olmo2kit's last-turn TTFT over its first turn's (issue 24)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


def word_only_checkpoint(size: str, path: Path) -> None:
    """`size` with random weights in bf16 safetensors and the tiny tokenizer, every output row but those of plain
    word pieces zeroed (see the module docstring)."""
    import torch

    model, tokenizer = load_random(size, "bf16", None, "cpu")
    special = set(tokenizer.all_special_ids)
    keep = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        keep[i] = i not in special and text.isascii() and text.strip().isalnum()
    with torch.no_grad():
        model.lm_head.weight[~keep] = 0
    print(f"{size}: {int(keep.sum())} of {model.config.vocab_size} ids kept as outputs", file=sys.stderr)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(name: str, command: list[str], port: int, log: Path, env: dict | None = None) -> Iterator[int]:
    """A server's process id once GET /health answers 200, its output in `log`; stopped on the way out."""
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        try:
            wait_healthy(f"http://127.0.0.1:{port}", process)
        except SystemExit:
            tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
            raise SystemExit(f"{name} did not start ({' '.join(command)}):\n{tail}") from None
        yield process.pid
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def model_name(url: str) -> str:
    return httpx2.get(f"{url}/models", timeout=30).json()["data"][0]["id"]


async def throughput(client, sides: dict[str, tuple[str, str]], prompts: list[str], clients: int, passes: int,
                     max_tokens: int, first: int) -> dict[str, dict]:
    """Each side's tokens/s at `clients` clients over `prompts` split into `passes` passes (fewer where a pass
    would give a client no request), the sides alternating (A B, B A, ...; side `first` starts)."""
    names = list(sides)
    names = names[first:] + names[:first]
    passes = min(passes, len(prompts) // clients)
    per_pass = len(prompts) // passes
    totals = {name: {"tokens": 0, "wall_s": 0.0, "requests": 0, "short": 0, "passes": []} for name in names}
    for p in range(passes):
        chunk = prompts[p * per_pass:(p + 1) * per_pass]
        for name in names if p % 2 == 0 else names[::-1]:
            url, model = sides[name]
            await asyncio.sleep(SETTLE_S)
            answers, wall = await run_level(client, url, model, chunk, clients, max_tokens)
            total = totals[name]
            total["tokens"] += sum(a.tokens for a in answers)
            total["wall_s"] += wall
            total["requests"] += len(answers)
            total["short"] += sum(a.tokens < max_tokens for a in answers)
            total["passes"].append(sum(a.tokens for a in answers) / wall)  # tokens/s: how much the passes vary
    for total in totals.values():
        total["tokens_per_s"] = total["tokens"] / total["wall_s"]
    return totals


async def chat_turn(client, url: str, model: str, messages: list[dict], max_tokens: int) -> tuple[str, float, dict]:
    """(reply, seconds to the first streamed chunk with a choice, the usage the server reports) of one greedy chat
    request."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    pieces, ttft, usage = [], None, {}
    start = time.perf_counter()
    async with client.stream("POST", f"{url}/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                raise RuntimeError(f"the server failed a request: {chunk['error']}")
            if chunk.get("choices"):
                ttft = ttft if ttft is not None else time.perf_counter() - start
                pieces.append(chunk["choices"][0]["delta"].get("content") or "")
            usage = chunk.get("usage") or usage
    return "".join(pieces), ttft, usage


def user_turns(tokenizer, conversation: int, turns: int, tokens: int) -> list[str]:
    """`turns` user messages of about `tokens` tokens each, distinct from their first words on."""
    words = " ".join(SENTENCES).split()
    out = []
    for turn in range(turns):
        text, i = f"Chat {conversation} turn {turn + 1}:", conversation * 7 + turn * 3
        while len(tokenizer(text, add_special_tokens=False).input_ids) < tokens:
            text += " " + words[i % len(words)]
            i += 1
        out.append(text)
    return out


async def chat_ttfts(client, sides: dict[str, tuple[str, str]], conversations: list[list[str]], max_tokens: int,
                     first: int) -> dict[str, list[dict]]:
    """Each side's conversations, the sides in turn per conversation: {"turns": [(TTFT, usage) per turn],
    "cold": (TTFT, usage)}, "cold" the last turn sent again with another first word, so that no cached prefix
    serves it: what the last turn costs without reuse."""
    names = list(sides)
    out: dict[str, list[dict]] = {name: [] for name in names}
    for c, turns in enumerate(conversations):
        order = names[(first + c) % 2:] + names[:(first + c) % 2]
        for name in order:
            url, model = sides[name]
            await asyncio.sleep(SETTLE_S)
            messages, times = [], []
            for text in turns:
                messages.append({"role": "user", "content": text})
                reply, ttft, usage = await chat_turn(client, url, model, messages, max_tokens)
                messages.append({"role": "assistant", "content": reply})
                times.append((ttft, usage))
            cold = [dict(m) for m in messages[:-1]]
            cold[0]["content"] = "Anew. " + cold[0]["content"]
            _, ttft, usage = await chat_turn(client, url, model, cold, max_tokens)
            out[name].append({"turns": times, "cold": (ttft, usage)})
    return out


async def measure_type(args, sides: dict[str, tuple[str, str]], prompts: list[str], conversations, k: int) -> dict:
    levels = sorted({int(c) for c in args.clients.split(",")})
    # A connection per request, to both servers: llama-server at times closes a connection after a streamed
    # response that advertised keep-alive, and the next request sent on it fails ("Server disconnected").
    limits = httpx2.Limits(max_connections=max(levels) + 4, max_keepalive_connections=0)
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(None), limits=limits) as client:
        for url, model in sides.values():  # warm-up: the batched path once at the most clients, a few tokens
            await run_level(client, url, model, prompts[:max(levels)], max(levels), 4)
        result: dict = {"levels": {}}
        for n, clients in enumerate(levels):
            row = await throughput(client, sides, prompts, clients, args.passes, args.max_tokens, (k + n) % 2)
            row["ratio"] = row["olmo2kit"]["tokens_per_s"] / row["llama-server"]["tokens_per_s"]
            row["median_pass_ratio"] = statistics.median(
                ours / theirs for ours, theirs in zip(row["olmo2kit"]["passes"], row["llama-server"]["passes"],
                                                      strict=True))
            result["levels"][clients] = row
            print(f"  {clients} clients: olmo2kit {row['olmo2kit']['tokens_per_s']:.2f}, llama-server "
                  f"{row['llama-server']['tokens_per_s']:.2f} tokens/s ({row['ratio']:.3f}x); passes "
                  + ", ".join(f"{name} {' '.join(f'{x:.2f}' for x in row[name]['passes'])}" for name in sides),
                  file=sys.stderr)
        if conversations:
            ttfts = await chat_ttfts(client, sides, conversations, args.reply_tokens, k % 2)
            chat = {}
            for name, runs in ttfts.items():
                turns = len(runs[0]["turns"])
                median = [statistics.median(run["turns"][t][0] for run in runs) for t in range(turns)]
                cold = statistics.median(run["cold"][0] for run in runs)
                # the prompt's tokens, and those the server says it read from its cache (llama-server says;
                # olmo2kit reports no cached_tokens), of each turn of the first conversation, then of its cold turn
                usage = [(u.get("prompt_tokens"), (u.get("prompt_tokens_details") or {}).get("cached_tokens"))
                         for _, u in [*runs[0]["turns"], runs[0]["cold"]]]
                chat[name] = {"runs_s": [[t for t, _ in run["turns"]] for run in runs], "median_s": median,
                              "cold_runs_s": [run["cold"][0] for run in runs], "cold_median_s": cold,
                              "last_over_first": median[-1] / median[0], "prompt_and_cached_tokens": usage}
                print(f"  chat {name}: TTFT turn 1 {median[0] * 1000:.0f} ms, turn {turns} "
                      f"{median[-1] * 1000:.0f} ms, turn {turns} uncached {cold * 1000:.0f} ms; (prompt, cached) "
                      f"tokens {usage}", file=sys.stderr)
            result["chat"] = chat
    return result


def machine() -> dict:
    """What the figures were measured on: CPU model and flags that matter to llama.cpp, cores, memory, load."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    memory = next((int(line.split()[1]) / 2**20 for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), None) if Path("/proc/meminfo").is_file() else None
    hypervisor = "hypervisor" in flags
    return {"cpu": model, "cores": usable_cores(), "memory_gib": round(memory, 1) if memory else None,
            "flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8"}),
            "virtual": hypervisor, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def commit() -> str | None:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent, check=False)
    return done.stdout.strip() or None


def print_report(report: dict) -> None:
    """The figures as Markdown, ready for docs/benchmarks.md."""
    m, args = report["machine"], report["args"]
    print(f"Machine: {m['cpu']}, {m['cores']} cores{' (virtual)' if m['virtual'] else ''}, {m['memory_gib']} GiB, "
          f"{', '.join(m['flags'])}; olmo2kit {report['commit']}; {m['date']}, {report['minutes']:.1f} min; "
          f"load average (1, 5, 15 min) before {fmt_load(report['load_before'])}, after "
          f"{fmt_load(report['load_after'])}.")
    print(f"Model: {report['what']}. {args['requests']} requests of {args['max_tokens']} new tokens, greedy, streamed "
          f"/v1/completions, closed-loop clients on loopback, up to {args['passes']} alternating passes; llama-server "
          f"`-np {args['max_batch_size']} -t {report['threads']}`.\n")
    print("| GGUF | clients | olmo2kit tokens/s | llama-server tokens/s | olmo2kit / llama-server | target "
          "| median of the passes' ratios | each pass, olmo2kit; llama-server |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, result in report["types"].items():
        for clients, row in result["levels"].items():
            target = TARGETS.get(int(clients))
            mark = "" if target is None else f">= {target:.2f} {'(met)' if row['ratio'] >= target else '(missed)'}"
            short = sum(row[s]["short"] for s in ("olmo2kit", "llama-server"))
            note = f" ({short} requests short)" if short else ""
            passes = "; ".join(" ".join(f"{x:.2f}" for x in row[side]["passes"])
                               for side in ("olmo2kit", "llama-server"))
            print(f"| {kind} | {clients} | {row['olmo2kit']['tokens_per_s']:.2f} | "
                  f"{row['llama-server']['tokens_per_s']:.2f} | **{row['ratio']:.3f}**{note} | {mark} | "
                  f"{row['median_pass_ratio']:.3f} | {passes} |")
    if any("chat" in result for result in report["types"].values()):
        turns = args["turns"]
        print(f"\nChat: time to first token, median of {args['chats']} conversations of {turns} user turns "
              f"(~{args['turn_tokens']} tokens each, {args['reply_tokens']}-token replies appended), streamed "
              "/v1/chat/completions.\n")
        print(f"| GGUF | server | turn 1 | turn {turns} | turn {turns} / turn 1 | target | turn {turns} with no cached "
              f"prefix | prompt tokens, turn 1; turn {turns} (cached, where reported) |")
        print("|---|---|---|---|---|---|---|---|")
        for kind, result in report["types"].items():
            for name, chat in result.get("chat", {}).items():
                ratio = chat["last_over_first"]
                mark = (f"<= {TTFT_TARGET:.2f} {'(met)' if ratio <= TTFT_TARGET else '(missed)'}"
                        if name == "olmo2kit" else "reference")
                (first, _), (last, cached) = chat["prompt_and_cached_tokens"][0], chat["prompt_and_cached_tokens"][-2]
                tokens = f"{first}; {last}" + (f" ({cached} cached)" if cached is not None else "")
                print(f"| {kind} | {name} | {chat['median_s'][0] * 1000:.0f} ms | {chat['median_s'][-1] * 1000:.0f} ms "
                      f"| **{ratio:.2f}** | {mark} | {chat['cold_median_s'] * 1000:.0f} ms | {tokens} |")


def fmt_load(load: list[float]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1b", choices=[*SIZES, *TINY_SIZES])
    parser.add_argument("--work", type=Path, required=True, help="Directory for the checkpoint, the GGUF cache and "
                                                                 "the servers' logs (reused).")
    parser.add_argument("--types", default="q8_0,bf16", help="GGUF types, comma-separated.")
    parser.add_argument("--clients", default="1,16", help="Concurrency levels, comma-separated.")
    parser.add_argument("--requests", type=int, default=32, help="Requests per level and server.")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--passes", type=int, default=4, help="Alternating passes the requests are split into "
                                                               "(fewer at a level where a client would get none).")
    parser.add_argument("--max-batch-size", type=int, default=16, help="olmo2kit's --max-batch-size and "
                                                                       "llama-server's -np.")
    parser.add_argument("--chats", type=int, default=3, help="Conversations timed per server (0: no chat).")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--turn-tokens", type=int, default=40)
    parser.add_argument("--reply-tokens", type=int, default=16)
    parser.add_argument("--json", type=Path, help="Also write every figure here.")
    args = parser.parse_args()
    # stopped with SIGTERM, the servers are stopped too (the `server` blocks' cleanup runs on SystemExit)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not LLAMA_SERVER.is_file():
        raise SystemExit(f"{LLAMA_SERVER} is missing: build llama.cpp's server with `make llama-server`")
    if any(args.requests < int(c) or args.requests % min(args.passes, args.requests // int(c))
           for c in args.clients.split(",")):
        raise SystemExit("--requests must split evenly into the passes of every level (--passes, or --requests over "
                         "the clients where that is fewer)")

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = work / f"{args.size}-random-words"
    cache = work / "gguf-cache"
    os.environ["OLMO2KIT_GGUF_CACHE"] = str(cache)  # this process's gguf_file and the olmo2kit servers share it
    env = {**os.environ, "OLMO2KIT_API_KEY": ""}
    if not (checkpoint / "config.json").is_file():
        word_only_checkpoint(args.size, checkpoint)
    from olmo2kit.model.gguf import gguf_file
    from olmo2kit.model.loading import load_tokenizer

    files = {kind: gguf_file(str(checkpoint), gguf_type=kind, say=lambda s: print(s, file=sys.stderr))
             for kind in args.types.split(",")}
    tokenizer = load_tokenizer(str(checkpoint))
    conversations = [user_turns(tokenizer, c, args.turns, args.turn_tokens) for c in range(args.chats)]
    prompts = make_prompts(args.requests)
    threads = usable_cores()
    report: dict = {"what": f"OLMo 2 {args.size} architecture, random weights (outputs limited to word pieces), "
                            "tiny tokenizer", "args": vars(args) | {"work": str(work), "json": str(args.json)},
                    "machine": machine(), "commit": commit(), "threads": threads, "types": {},
                    "load_before": list(os.getloadavg())}
    start = time.monotonic()
    for k, (kind, gguf) in enumerate(files.items()):
        ports = free_port(), free_port()
        ours = [sys.executable, "-m", "olmo2kit", "serve", "--model", str(checkpoint), "--engine", "llamacpp",
                "--quantize", kind, "--max-batch-size", str(args.max_batch_size), "--port", str(ports[0])]
        theirs = [str(LLAMA_SERVER), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(ports[1]),
                  "-np", str(args.max_batch_size), "-t", str(threads)]
        print(f"{kind}: {gguf} ({gguf.stat().st_size / 2**30:.2f} GiB)", file=sys.stderr)
        with server("olmo2kit serve", ours, ports[0], work / f"olmo2kit-{kind}.log", env), \
                server("llama-server", theirs, ports[1], work / f"llama-server-{kind}.log"):
            if "converting" in (work / f"olmo2kit-{kind}.log").read_text():
                print(f"warning: olmo2kit serve converted its own {kind} GGUF: not the file llama-server runs",
                      file=sys.stderr)
            urls = [f"http://127.0.0.1:{port}/v1" for port in ports]
            sides = {name: (url, model_name(url)) for name, url in zip(("olmo2kit", "llama-server"), urls,
                                                                        strict=True)}
            report["types"][kind] = asyncio.run(measure_type(args, sides, prompts, conversations, k))
    report["minutes"] = (time.monotonic() - start) / 60
    report["load_after"] = list(os.getloadavg())
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
