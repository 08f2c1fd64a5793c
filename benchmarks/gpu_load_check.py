"""Decode speed of one 1B checkpoint loaded four ways, to check that olmo2kit.load costs no speed on a GPU.

    PYTHONPATH=src python benchmarks/gpu_load_check.py [--size 1b] [--device cuda]

The 1B architecture with random weights is saved to a temporary directory in bf16, then loaded
through olmo2kit.load, through from_pretrained with device_map, through from_pretrained then
.to(device), and built in place; each decodes 64 greedy tokens (median of 3 after a warm-up).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM

from olmo2kit.devices import sync
from olmo2kit.evals.bench import load_random
from olmo2kit.inference.generation import generate
from olmo2kit.model.loading import load


def decode_rate(model, tokenizer, device: str) -> tuple[float, str]:
    generate(model, tokenizer, "Language modeling is ", do_sample=False, max_new_tokens=8)
    rates = []
    for _ in range(3):
        sync(device)
        rates.append(generate(model, tokenizer, "Language modeling is ", do_sample=False, max_new_tokens=64)
                     .tokens_per_s)
    return statistics.median(rates), model.config._attn_implementation


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="1b")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as path:
        model, tokenizer = load_random(args.size, "bf16", None, args.device)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        ways = {
            "built in place": lambda: (model, tokenizer),
            "olmo2kit.load": lambda: load(path, dtype="bf16", device=args.device),
            "from_pretrained device_map": lambda: (AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.bfloat16, device_map=args.device), tokenizer),
            "from_pretrained .to(device)": lambda: (AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.bfloat16).to(args.device), tokenizer),
            "olmo2kit.load again": lambda: load(path, dtype="bf16", device=args.device),
        }
        for name, make in ways.items():
            start = time.perf_counter()
            loaded, tok = make()
            load_s = time.perf_counter() - start
            rate, attention = decode_rate(loaded, tok, args.device)
            print(f"{name:30} load {load_s:5.1f} s  decode {rate:7.1f} tokens/s  attention {attention}", flush=True)
            if loaded is not model:
                del loaded
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
