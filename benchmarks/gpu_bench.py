"""The GPU benchmark of olmo2kit: one call, at most 8 minutes, on a fresh H100/H200 with no network.

    PYTHONPATH=src python benchmarks/gpu_bench.py --out results/          # on the GPU machine
    PYTHONPATH=src python benchmarks/gpu_bench.py --out /tmp/r --smoke    # a quick dry run on the CPU

Random-init OLMo 2 1B and 7B (the exact architectures, no download), bf16, prompt 32, 128 new tokens:
plain transformers generate vs the compiled decode path at batch 1 and 16, bitsandbytes int8 and nf4
(when bitsandbytes is importable), speculative decoding of the 7B with the 1B as draft, and the greedy
token agreement of the compiled path with the plain one. Each row is appended to OUT/gpu_bench.jsonl
as soon as it is measured, so a run cut short keeps what it measured; a table is printed at the end.
"""

from __future__ import annotations

import gc
import json
import time
import traceback

import torch

from gpu_decode import parse_args, recorder
from olmo2kit.devices import sync
from olmo2kit.evals.bench import bench, load_random

BUDGET_S = 420  # by default start no new row after this, so the call ends inside 8 minutes


def main() -> None:
    args = parse_args(budget=BUDGET_S)
    started = time.perf_counter()
    device = args.device
    big, small = ("tiny", "tiny") if args.smoke else ("7b", "1b")
    new = 8 if args.smoke else 128
    try:
        import bitsandbytes  # noqa: F401

        quantized = ["int8", "nf4"]
    except ImportError:
        quantized = []

    rows = []
    keep = recorder(args.out / "gpu_bench.jsonl", rows)

    def record(name: str, fn) -> None:
        if time.perf_counter() - started > args.budget:
            print(f"skipped {name}: over the time budget", flush=True)
            return
        t = time.perf_counter()
        try:
            row = {"name": name, **fn()}
        except Exception as e:
            traceback.print_exc()
            row = {"name": name, "error": f"{type(e).__name__}: {e}"}
        row["wall_s"] = round(time.perf_counter() - t, 1)
        keep(row)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    def speed(size, **kw):
        return lambda: bench(size=size, random_init=True, dtype="bf16", device=device, new_tokens=new,
                             repeat=1 if args.smoke else 3, **kw).to_dict()

    # In order of what matters most, should the budget run out.
    for size in (small, big):
        record(f"{size} plain b1", speed(size))
        record(f"{size} compiled b1", speed(size, compile=True))
    record(f"{small} compiled vs plain greedy agreement", lambda: agreement(small, device, new))
    record(f"{big} + {small} draft, speculative", lambda: speculative(big, small, device, new))
    for q in quantized:
        record(f"{small} {q} b1", lambda q=q: bench(size=small, random_init=True, dtype="bf16", quantize=q,
                                                    device=device, new_tokens=64, repeat=2).to_dict())
    record(f"{small} plain b16", speed(small, batch_size=16))
    record(f"{small} compiled b16", speed(small, batch_size=16, compile=True))
    record(f"{big} plain b16", speed(big, batch_size=16))

    print(f"\n{'row':42} {'decode tok/s':>13} {'ms/token':>9} {'floor %':>8} {'peak GB':>8}")
    for row in rows:
        if "decode_tokens_per_s" in row:
            print(f"{row['name']:42} {row['decode_tokens_per_s']:13.1f} {row['ms_per_token']:9.2f} "
                  f"{100 * row['floor_fraction']:8.0f} {row['peak_memory_gb']:8.2f}")
        else:
            print(f"{row['name']:42} {json.dumps({k: v for k, v in row.items() if k != 'name'})}")
    print(f"total {time.perf_counter() - started:.0f} s")


def agreement(size: str, device: str, new: int) -> dict:
    """Greedy tokens of the compiled path against the plain path, same model and prompts."""
    from olmo2kit.inference.compiled import decoder_for

    model, tokenizer = load_random(size, "bf16", None, device)
    ids = torch.randint(2, 500, (4, 32), generator=torch.Generator().manual_seed(1)).to(model.device)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        plain = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)[:, ids.shape[1]:]
    compiled = decoder_for(model, 4, 32 + new, compile=device == "cuda").decode(
        ids, mask, new, eos_ids={-1}, pad_id=tokenizer.pad_token_id).tokens
    same = (plain == compiled).float().mean().item()
    first_diff = [(row != 0).nonzero()[0].item() if (row != 0).any() else None for row in (plain != compiled).int()]
    return {"token_agreement": same, "first_difference_per_row": first_diff}


def speculative(target_size: str, draft_size: str, device: str, new: int) -> dict:
    """Greedy decoding of the target alone and with the draft (transformers' assisted generation)."""
    target, tokenizer = load_random(target_size, "bf16", None, device)
    draft, _ = load_random(draft_size, "bf16", None, device)
    ids = torch.randint(2, 500, (1, 32), generator=torch.Generator().manual_seed(2)).to(target.device)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id)
    timings = {}
    outputs = {}
    with torch.inference_mode():
        for name, extra in (("target_alone", {}), ("with_draft", {"assistant_model": draft})):
            target.generate(ids, **{**kwargs, "max_new_tokens": 8}, **extra)  # warm-up
            sync(device)
            t = time.perf_counter()
            outputs[name] = target.generate(ids, **kwargs, **extra)[0, ids.shape[1]:]
            sync(device)
            timings[name] = time.perf_counter() - t
    n = min(len(outputs["target_alone"]), len(outputs["with_draft"]))
    same = (outputs["target_alone"][:n] == outputs["with_draft"][:n]).float().mean().item()
    return {"target_alone_s": timings["target_alone"], "with_draft_s": timings["with_draft"],
            "speedup": timings["target_alone"] / timings["with_draft"], "greedy_token_agreement": same,
            "note": "random weights: the draft almost never agrees with the target, so this is the worst case"}


if __name__ == "__main__":
    main()
