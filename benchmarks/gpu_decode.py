"""The compiled decode path on a GPU, one way against another: which step, which compile options.

    PYTHONPATH=src python benchmarks/gpu_decode.py --out results/             # on the GPU machine
    PYTHONPATH=src python benchmarks/gpu_decode.py --out /tmp/r --smoke       # a quick dry run on the CPU

Random-init OLMo 2 1B and 7B (the exact architectures), bf16, batch 1, prompt 32, 128 new tokens. For each
size: plain transformers `generate` (the reference), then the compiled path with the transformers model
as its step and with `FusedOlmo2` (fused q/k/v and gate/up, own cache), each with and without inductor's
coordinate-descent tuning. Each row gives compile time, decode tokens/s and ms/token (median of 3), the
fraction of the bandwidth floor, and the greedy token agreement with the plain path over 4 prompts
(in bf16, kernel rounding flips near-ties of random-weight logits, so agreement, not equality, is the
measure there). Rows are appended to OUT/gpu_decode.jsonl as they are measured; a kernel profile of each
1B row goes to OUT/profile-*.txt.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
import traceback
from pathlib import Path

import torch
import transformers

from common import device_name
from olmo2kit.devices import sync
from olmo2kit.evals.bench import bytes_per_step, load_random, measure_bandwidth
from olmo2kit.inference.compiled import StaticDecoder
from olmo2kit.model.sizes import Size, weight_bytes

PROMPT, NEW, PROMPTS = 32, 128, 4
VARIANTS = [  # (name, fused, tuning), most telling first
    ("transformers step", False, False),
    ("fused", True, False),
    ("fused + tuning", True, True),
    ("transformers step + tuning", False, True),
]


def parse_args(budget: float) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="The tiny architecture on the CPU, to test the script.")
    parser.add_argument("--budget", type=float, default=budget, help="Start no new row after this many seconds.")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.device = "cpu" if args.smoke else "cuda"
    args.new = 12 if args.smoke else NEW
    args.sizes = ("tiny",) if args.smoke else ("1b", "7b")
    return args


def recorder(path: Path, rows: list):
    """A function that keeps a row, appends it to `path` as a JSON line and prints it."""
    def record(row: dict) -> None:
        rows.append(row)
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    return record


def random_model(size: str, device: str, new: int, bandwidth: float):
    """(model, tokenizer, PROMPTS seeded prompts, bytes a batch-1 step reads, floor tokens/s) for one size."""
    model, tokenizer = load_random(size, "bf16", None, device)
    prompts = torch.randint(2, 50_000 if size != "tiny" else 200, (PROMPTS, PROMPT),
                            generator=torch.Generator().manual_seed(1)).to(model.device)
    arch = Size.from_config("loaded", model.config)
    step_bytes = bytes_per_step(arch, weight_bytes(arch, "bf16"), 2, 1, PROMPT + new / 2)
    return model, tokenizer, prompts, step_bytes, bandwidth / step_bytes


def main() -> None:
    args = parse_args(budget=380)
    started = time.perf_counter()
    device, new = args.device, args.new
    bandwidth = measure_bandwidth(device)
    rows = []
    record = recorder(args.out / "gpu_decode.jsonl", rows)

    for size in args.sizes:
        if time.perf_counter() - started > args.budget:
            print(f"skipped {size}: over the time budget", flush=True)
            continue
        model, tokenizer, prompts, step_bytes, floor = random_model(size, device, new, bandwidth)
        reference, plain_s = plain(model, tokenizer, prompts, new, device)
        record({"size": size, "way": "plain generate", "decode_tokens_per_s": (new - 1) / plain_s,
                "ms_per_token": 1000 * plain_s / (new - 1), "floor_fraction": (new - 1) / plain_s / floor,
                "floor_tokens_per_s": floor, "bytes_per_step": step_bytes, "bandwidth_gbps": bandwidth / 1e9,
                "device": device_name(device), "torch": torch.__version__,
                "transformers": transformers.__version__})
        for name, fused, tuning in VARIANTS:
            if time.perf_counter() - started > args.budget:
                print(f"skipped {size} {name}: over the time budget", flush=True)
                continue
            start = time.perf_counter()
            try:
                row = compiled(model, tokenizer, prompts, new, device, fused, tuning, reference,
                               args.out / f"profile-{size}-{name.replace(' ', '').replace('+', '-')}.txt"
                               if size in ("1b", "tiny") else None)
                row["floor_fraction"] = row["decode_tokens_per_s"] / floor
            except Exception as e:
                traceback.print_exc()
                row = {"error": f"{type(e).__name__}: {e}"}
            record({"size": size, "way": f"compiled, {name}", **row, "wall_s": round(time.perf_counter() - start, 1)})
            torch._dynamo.reset()
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        if size in ("1b", "tiny") and time.perf_counter() - started < args.budget:
            row = batched(model, tokenizer, new, device, bandwidth)
            record({"size": size, "way": "compiled, fused, batch 16", **row})
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    print(f"\n{'size':5} {'way':34} {'tok/s':>8} {'ms/tok':>7} {'floor %':>8} {'agree':>6} {'compile s':>9}")
    for r in rows:
        if "decode_tokens_per_s" in r:
            agree = f"{r['token_agreement']:.3f}" if "token_agreement" in r else ""
            print(f"{r['size']:5} {r['way']:34} {r['decode_tokens_per_s']:8.1f} {r['ms_per_token']:7.2f} "
                  f"{100 * r['floor_fraction']:8.1f} {agree:>6} {r.get('compile_s', 0):9.1f}")
        else:
            print(f"{r['size']:5} {r['way']:34} {r.get('error')}")
    print(f"total {time.perf_counter() - started:.0f} s")


def plain(model, tokenizer, prompts, new: int, device: str):
    """Greedy tokens of plain `generate` for each prompt, and the decode seconds of one (after a warm-up)."""
    kwargs = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    tokens = []
    with torch.inference_mode():
        for row in prompts:
            ids = row[None]
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                 **kwargs)
            tokens.append(out[0, ids.shape[1]:])
        ids = prompts[:1]
        times = []
        for n in (1, new, 1, new):
            sync(device)
            start = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, **kwargs)
            sync(device)
            times.append(time.perf_counter() - start)
    return torch.stack(tokens), max(times[3] - times[2], 1e-9)


def compiled(model, tokenizer, prompts, new: int, device: str, fused: bool, tuning: bool, reference,
             profile_to: Path | None, keep: list | None = None) -> dict:
    """Compile time, decode speed (median of 3) and free-running greedy agreement of one compiled way."""
    decoder = StaticDecoder(model, 1, 256, compile=True, fused=fused, tuning=tuning)
    if keep is not None:
        keep.append(decoder)

    def run(i: int, n: int = new):
        ids = prompts[i: i + 1]
        return decoder.decode(ids, torch.ones_like(ids), n, eos_ids={-1}, pad_id=tokenizer.pad_token_id,
                              check_every=n)

    start = time.perf_counter()
    run(0)  # compiles
    sync(device)
    compile_s = time.perf_counter() - start
    run(0)
    decode_s = statistics.median(run(0).decode_s for _ in range(3))
    tokens = torch.cat([run(i).tokens for i in range(len(prompts))])
    same = (tokens == reference).float()
    first_diff = [int(row.int().argmin()) if not bool(row.all()) else None for row in same.bool()]
    if profile_to is not None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            run(0, 32)
        sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
        profile_to.write_text(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70))
    return {"fused": decoder.fused, "tuning": tuning, "compile_s": compile_s,
            "decode_tokens_per_s": (new - 1) / decode_s, "ms_per_token": 1000 * decode_s / (new - 1),
            "token_agreement": same.mean().item(), "first_difference_per_prompt": first_diff}


def batched(model, tokenizer, new: int, device: str, bandwidth: float, batch: int = 16) -> dict:
    """The fused compiled path at batch 16: tokens/s over all sequences, floor fraction per sequence."""
    ids = torch.randint(2, 200, (batch, PROMPT), generator=torch.Generator().manual_seed(2)).to(model.device)
    decoder = StaticDecoder(model, batch, 256, compile=True)
    runs = [decoder.decode(ids, torch.ones_like(ids), new, eos_ids={-1}, pad_id=tokenizer.pad_token_id,
                           check_every=new).decode_s for _ in range(4)]
    decode_s = statistics.median(runs[1:])
    size = Size.from_config("loaded", model.config)
    floor = bandwidth / bytes_per_step(size, weight_bytes(size, "bf16"), 2, batch, PROMPT + new / 2)
    torch._dynamo.reset()
    return {"fused": decoder.fused, "batch_size": batch, "decode_tokens_per_s": batch * (new - 1) / decode_s,
            "ms_per_token": 1000 * decode_s / (new - 1), "floor_fraction": (new - 1) / decode_s / floor}


if __name__ == "__main__":
    main()
