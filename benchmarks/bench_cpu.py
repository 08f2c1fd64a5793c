"""CPU speed in one run: olmo2kit's paths on transformers and on llama.cpp, beside llama.cpp's own llama-bench on
the same GGUF files, batch 1, the 1B architecture with random weights (speed does not depend on the weights).

    make llama-bench   # llama.cpp's llama-bench, built from the source llama-cpp-python was built from
    PYTHONPATH=src .venv/bin/python benchmarks/bench_cpu.py --size 1b --work /tmp/bench-cpu
    PYTHONPATH=src .venv/bin/python benchmarks/bench_cpu.py --size tiny --work /tmp/bench-cpu-tiny   # quick check

Paths, each through `olmo2kit bench --json` in a process of its own (greedy, --prompt-len 32, --new-tokens 64,
median of --repeat runs after a warm-up): transformers fp32 (the old CPU default), the default (dtype auto), bf16
compiled, bitsandbytes int8 (fewer tokens: it is slow); llama.cpp bf16 and Q8_0 through `--engine llamacpp`;
with --vllm, vLLM's CPU build in bf16; with --torchao, torchao's int8 weight-only (in a process of its own).
llama.cpp's reference: `llama-bench -t THREADS -p 32 -n 64` on the very GGUF files the engine ran (its cache).
Time to first token for a 512-token prompt: `bench --prompt-len 512 --new-tokens 2 --repeat 1` on each path,
512 / llama-bench's pp512 rate for the reference. Conversion: the seconds `gguf_file` takes to write each type
into an empty GGUF cache (the one-time cost of `--engine llamacpp`), with the checkpoint already on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

OLMO2KIT = Path(sys.executable).with_name("olmo2kit")
LLAMA_BENCH = Path(sys.prefix) / "llama.cpp-build" / "bin" / "llama-bench"


def olmo2kit_bench(*args: str, env: dict) -> dict:
    done = subprocess.run([str(OLMO2KIT), "bench", "--device", "cpu", "--json", *args], capture_output=True,
                          text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"olmo2kit bench {' '.join(args)} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def llama_bench(gguf: Path, threads: int, prompt: int, new: int, repeat: int) -> dict:
    done = subprocess.run([str(LLAMA_BENCH), "-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", str(new),
                           "-r", str(repeat), "-o", "json"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"llama-bench failed:\n{done.stderr}")
    rows = json.loads(done.stdout)
    return {("pp" if row["n_prompt"] else "tg"): row["avg_ts"] for row in rows}


def torchao_int8(size: str, new_tokens: int, repeat: int) -> dict:
    """torchao's int8 weight-only quantization of the bf16 model (what transformers' TorchAoConfig applies),
    timed as `bench` times transformers (this process; torchao is not an olmo2kit dependency)."""
    import torch
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from olmo2kit.evals.bench import _median_runs, load_random

    model, tokenizer = load_random(size, "bf16", None, "cpu")
    quantize_(model, Int8WeightOnlyConfig())
    with torch.inference_mode():
        _, decode = _median_runs(model, tokenizer, 1, 32, new_tokens, False, repeat, lambda *a: None)
        ttft, _ = _median_runs(model, tokenizer, 1, 512, 2, False, 1, lambda *a: None)
    return {"decode_tokens_per_s": (new_tokens - 1) / decode, "ttft_512_s": ttft, "dtype": "int8 (torchao)",
            "engine": "transformers", "new_tokens": new_tokens}


def save_checkpoint(size: str, path: Path) -> None:
    """`size` with random weights, in bf16 safetensors, with the tiny tokenizer (what `bench --random-init` runs)."""
    from olmo2kit.evals.bench import load_random

    model, tokenizer = load_random(size, "bf16", None, "cpu")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1b")
    parser.add_argument("--work", type=Path, required=True, help="Directory for the checkpoint and the GGUF cache.")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-int8", action="store_true", help="Leave out bitsandbytes int8 (minutes on a 1B).")
    parser.add_argument("--torchao", action="store_true", help="Add torchao's int8 weight-only (torchao importable).")
    parser.add_argument("--vllm", action="store_true", help="Add vLLM's CPU build, bf16 (vLLM installed).")
    parser.add_argument("--only", help="Run only the paths whose name holds this text (llama-bench only for "
                                       "'llama.cpp').")
    parser.add_argument("--torchao-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torchao_child:
        print(json.dumps(torchao_int8(args.size, args.new_tokens, args.repeat)))
        return
    from olmo2kit.model.gguf import gguf_file

    threads = len(os.sched_getaffinity(0))
    work = args.work
    checkpoint = work / f"{args.size}-random"
    cache = work / "gguf-cache"
    env = {**os.environ, "OLMO2KIT_GGUF_CACHE": str(cache)}
    os.environ["OLMO2KIT_GGUF_CACHE"] = str(cache)
    if not (checkpoint / "config.json").is_file():
        save_checkpoint(args.size, checkpoint)
    shutil.rmtree(cache, ignore_errors=True)
    conversion, files = {}, {}
    for kind in ("bf16", "q8_0"):
        start = time.perf_counter()
        files[kind] = gguf_file(str(checkpoint), gguf_type=kind, say=lambda _: None)
        conversion[kind] = time.perf_counter() - start
    decode = ["--prompt-len", "32", "--new-tokens", str(args.new_tokens), "--repeat", str(args.repeat)]
    first = ["--prompt-len", "512", "--new-tokens", "2", "--repeat", "1"]
    random_init = ["--random-init", "--size", args.size]
    paths = {
        "transformers fp32 (the old default)": [*random_init, "--dtype", "fp32"],
        "transformers default (dtype auto)": [*random_init],
        "transformers bf16, compiled": [*random_init, "--dtype", "bf16", "--compile"],
        "transformers int8 (bitsandbytes)": [*random_init, "-q", "int8", "--engine", "transformers"],
        "llama.cpp bf16 (--engine llamacpp)": ["--model", str(checkpoint), "--engine", "llamacpp", "-q", "bf16"],
        "llama.cpp Q8_0 (--engine llamacpp)": ["--model", str(checkpoint), "--engine", "llamacpp", "-q", "q8_0"],
    }
    if args.vllm:
        paths["vLLM bf16 (--engine vllm)"] = [*random_init, "--dtype", "bf16", "--engine", "vllm"]
    if args.skip_int8:
        del paths["transformers int8 (bitsandbytes)"]
    if args.only:
        paths = {name: path for name, path in paths.items() if args.only in name}
    results = {}
    for name, path_args in paths.items():
        slow = "int8" in name
        runs = ["--prompt-len", "32", "--new-tokens", "16", "--repeat", "1"] if slow else decode
        result = olmo2kit_bench(*path_args, *runs, env=env)
        ttft = olmo2kit_bench(*path_args, *first, env=env)
        results[name] = {"decode_tokens_per_s": result["decode_tokens_per_s"], "ttft_512_s": ttft["ttft_s"],
                         "dtype": result["dtype"], "engine": result["engine"], "new_tokens": result["new_tokens"],
                         "load_s": result["load_s"], "floor_fraction": result["floor_fraction"]}
        print(f"{name}: {result['decode_tokens_per_s']:.2f} tokens/s, first token (512) {ttft['ttft_s']:.2f} s",
              file=sys.stderr)
    if args.torchao and not args.only:
        done = subprocess.run([sys.executable, __file__, "--torchao-child", "--size", args.size, "--work", str(work),
                               "--new-tokens", str(args.new_tokens), "--repeat", str(args.repeat)],
                              capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise SystemExit(f"torchao int8 failed:\n{done.stderr}")
        results["transformers int8 (torchao, not in olmo2kit)"] = json.loads(done.stdout.splitlines()[-1])
    reference = {}
    if args.only and "llama.cpp" not in args.only:
        pass
    elif LLAMA_BENCH.is_file():
        for kind, gguf in files.items():
            tg = llama_bench(gguf, threads, 32, args.new_tokens, args.repeat)["tg"]
            pp = llama_bench(gguf, threads, 512, 0, args.repeat)["pp"]
            reference[kind] = {"decode_tokens_per_s": tg, "ttft_512_s": 512 / pp}
    else:
        print(f"{LLAMA_BENCH} is missing (`make llama-bench`): no reference figures", file=sys.stderr)
    print(json.dumps({
        "size": args.size, "threads": threads, "cpu": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "conversion_s": conversion, "gguf_bytes": {k: f.stat().st_size for k, f in files.items()},
        "olmo2kit": results, "llama_bench": reference,
    }, indent=2))


if __name__ == "__main__":
    main()
