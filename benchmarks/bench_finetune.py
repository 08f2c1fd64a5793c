"""Training speed and memory of olmo2kit.training.finetune against a minimal direct torch/transformers loop.

    python benchmarks/bench_finetune.py                                  # tiny checkpoint, CPU
    python benchmarks/bench_finetune.py --device cuda --size 1b          # OLMo 2 1B architecture, random weights

Both ways run the same optimizer steps on the same prepared rows (full fine-tuning, AdamW,
gradient clipping, bf16 autocast on a GPU that has it, fp32 master weights):
  direct     AutoModelForCausalLM.from_pretrained, then per step model(input_ids, labels=...).loss,
             backward, clip, step: the bare loop, no logging, no checkpoints
  olmo2kit   olmo2kit.training.finetune.finetune(...) with its loss log (one fsynced line a step)
Each run is its own process (so peak RSS on a CPU is its own), the two alternate --repeat times,
and the median is reported. Tokens/s counts positions run through the model; MFU on a GPU is
6 N tokens/s over --peak-flops, with N all the model's parameters (attention FLOPs not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("direct", "olmo2kit")


def build(args, work: Path) -> tuple[Path, Path, int]:
    """A checkpoint and prepared data in `work`: (model dir, data dir, parameter count)."""
    import torch

    from olmo2kit.model.tiny import build_tiny, build_tokenizer
    from olmo2kit.training.data import prepare_data

    if args.size:
        from transformers import Olmo2ForCausalLM

        from olmo2kit.model.sizes import hf_config

        tokenizer = build_tokenizer()
        with torch.device(args.device):
            model = Olmo2ForCausalLM(hf_config(args.size, pad_token_id=tokenizer.pad_token_id, **args.arch))
        params = sum(p.numel() for p in model.parameters())
        model.to(torch.bfloat16).save_pretrained(work / "model")  # loaded back as fp32 master weights
        tokenizer.save_pretrained(work / "model")
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()  # the timed runs are other processes: leave them the whole GPU
    else:
        from safetensors.torch import load_file

        build_tiny(work / "model", seed=0)
        params = sum(t.numel() for t in load_file(work / "model" / "model.safetensors").values())
    # Text rows that fill seq_len, so every position is trained and both loops run the same shapes.
    words = "the model reads a sequence of tokens and predicts the next word in the text".split()
    rows = (args.steps + 1) * args.batch_size
    lines = [json.dumps({"text": " ".join(words[(i * 7 + j) % len(words)] for j in range(args.seq_len * 2))})
             for i in range(rows)]
    (work / "text.jsonl").write_text("\n".join(lines) + "\n")
    prepare_data(work / "text.jsonl", work / "data", model=str(work / "model"), seq_len=args.seq_len, format="text")
    return work / "model", work / "data", params


def run_variant(args) -> dict:
    """One timed run in this process; prints its figures as JSON."""
    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    if args.variant == "olmo2kit":
        from olmo2kit.training.finetune import FinetuneConfig, finetune

        result = finetune(FinetuneConfig(
            data=str(work / "data"), output=str(work / f"out-{os.getpid()}"), model=str(work / "model"),
            max_steps=args.steps, lr=1e-5, warmup=0.0, batch_size=args.batch_size, device=args.device, seed=0,
            gradient_checkpointing=args.gradient_checkpointing,
        ))
        return {"tokens": result.tokens, "seconds": result.elapsed_s, "peak_memory_gb": result.peak_memory_gb}
    return direct_loop(args, work)


def direct_loop(args, work: Path) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from olmo2kit.devices import peak_memory_gb, sync
    from olmo2kit.training.data import load_prepared
    from olmo2kit.training.finetune import DataOrder

    device = args.device
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32, device_map=device)
    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    model.train()
    data = load_prepared(work / "data")
    order = DataOrder(data.rows, args.batch_size, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    tokens = 0
    sync(device)
    start = time.perf_counter()
    for step in range(args.steps):
        rows = np.sort(order.batch(step))
        ids = torch.from_numpy(data.input_ids[rows].astype(np.int64)).to(device)
        labels = ids.masked_fill(~torch.from_numpy(data.label_mask[rows].copy()).to(device), -100)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the step's loss reaches the host, as olmo2kit's log line needs it
        tokens += ids.numel()
    sync(device)
    return {"tokens": tokens, "seconds": time.perf_counter() - start, "peak_memory_gb": peak_memory_gb(model.device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", help="Random-init this OLMo 2 size (e.g. 1b) instead of the tiny checkpoint.")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=None, help="Optimizer steps per run (default 30 CPU, 20 GPU).")
    parser.add_argument("--batch-size", type=int, default=None, help="Rows a step (default 4 CPU, 2 GPU).")
    parser.add_argument("--seq-len", type=int, default=None, help="Tokens a row (default 256 CPU, 4096 GPU).")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--repeat", type=int, default=3, help="Runs of each way, alternating.")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run.")
    parser.add_argument("--peak-flops", type=float, default=989e12,
                        help="The device's dense bf16 peak, for MFU (H100/H200 SXM: 989e12).")
    parser.add_argument("--arch", action="append", default=[], metavar="KEY=VALUE",
                        help="Override a config value of --size (a CPU smoke test: --arch num_hidden_layers=1).")
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    gpu = args.device == "cuda"
    args.arch = {key: int(value) for key, _, value in (item.partition("=") for item in args.arch)}
    args.steps = args.steps or (20 if gpu else 30)
    args.batch_size = args.batch_size or (2 if gpu else 4)
    args.seq_len = args.seq_len or (4096 if gpu else 256)

    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        work = Path(tmp)
        params = build(args, work)[2]
        child = [sys.executable, __file__, "--work", str(work), "--device", args.device, "--steps", str(args.steps),
                 "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
        if args.gradient_checkpointing:
            child.append("--gradient-checkpointing")
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TRANSFORMERS_VERBOSITY": "error"}
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for i in range(args.repeat):
            for variant in VARIANTS if i % 2 == 0 else VARIANTS[::-1]:
                done = subprocess.run([*child, "--variant", variant], capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    sys.exit(f"{variant} run failed:\n{done.stderr[-4000:]}")
                runs[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))

    report = summarize(args, runs, params)
    print_report(args, report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def summarize(args, runs: dict, params: int) -> dict:
    import torch

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} thread(s)"
    figures = {}
    for variant, results in runs.items():
        tps = statistics.median(r["tokens"] / r["seconds"] for r in results)
        figures[variant] = {
            "tokens_per_s": tps,
            "peak_memory_gb": statistics.median(r["peak_memory_gb"] for r in results),
            "mfu": 6 * params * tps / args.peak_flops if args.device == "cuda" else None,
            "runs": results,
        }
    return {
        "what": (f"OLMo 2 {args.size} architecture{' with ' + str(args.arch) if args.arch else ''}, random weights"
                 if args.size else "tiny checkpoint"),
        "params": params, "device": device, "steps": args.steps, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "gradient_checkpointing": args.gradient_checkpointing, "repeat": args.repeat,
        "peak_flops": args.peak_flops, "figures": figures,
        "ratio_tokens_per_s": figures["olmo2kit"]["tokens_per_s"] / figures["direct"]["tokens_per_s"],
        "ratio_peak_memory": figures["olmo2kit"]["peak_memory_gb"] / figures["direct"]["peak_memory_gb"],
    }


def print_report(args, report: dict) -> None:
    print(f"{report['what']} ({report['params']:,} params) on {report['device']}: full fine-tuning, "
          f"{args.steps} steps of {args.batch_size} x {args.seq_len} tokens, median of {args.repeat}")
    memory = "peak GPU memory" if args.device == "cuda" else "peak RSS"
    print(f"  {'':10} {'tokens/s':>10}  {memory:>15}" + ("  MFU" if args.device == "cuda" else ""))
    for variant, f in report["figures"].items():
        mfu = f"  {f['mfu'] * 100:4.1f}%" if f["mfu"] is not None else ""
        print(f"  {variant:10} {f['tokens_per_s']:10,.0f}  {f['peak_memory_gb']:12.2f} GB{mfu}")
    print(f"  olmo2kit / direct: tokens/s {report['ratio_tokens_per_s']:.3f}, "
          f"peak memory {report['ratio_peak_memory']:.3f}")


if __name__ == "__main__":
    main()
