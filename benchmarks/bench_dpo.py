"""DPO training speed against SFT on the same data, through olmo2kit.training.finetune.

    .venv/bin/python benchmarks/bench_dpo.py                                   # tiny checkpoint, CPU, 1 thread
    .venv/bin/python benchmarks/bench_dpo.py --size 1b --arch num_hidden_layers=4 --arch hidden_size=256 \
        --arch intermediate_size=1024 --arch num_attention_heads=4 --arch num_key_value_heads=4 \
        --arch vocab_size=512 --arch eos_token_id=0
    .venv/bin/python benchmarks/bench_dpo.py --device cuda --size 1b --seq-len 2048 --steps 10 --batch-size 2

The same preference pairs are prepared twice: as pairs (`prepare-data --format preference`) for DPO, and
their chosen conversations as chat examples for SFT. Both runs take the same optimizer steps of the same
number of examples (pairs or chosen conversations), full fine-tuning, AdamW, one run each in its own
process. Tokens/s counts positions run through the model: a DPO step runs the chosen and the rejected
answer of each pair, so its positions are about twice SFT's; examples/s is pairs (or rows) a second.
DPO's reference log-probabilities are computed once before training (timed apart, not in tokens/s).
A DPO micro-batch of B pairs is one forward pass of 2B rows; the third run, `dpo-accum`, takes the same
steps in micro-batches of B/2 pairs (grad_accum 2), so its forward passes have SFT's B rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name: (method, grad_accum)
RUNS = {"sft": ("sft", 1), "dpo": ("dpo", 1), "dpo-accum": ("dpo", 2)}
WORDS = "the model reads a sequence of tokens and predicts the next word in the text".split()


def build(args, work: Path) -> int:
    """The checkpoint, the pairs as preference data and their chosen conversations as chat data; the parameters."""
    import torch

    from olmo2kit.model.tiny import build_tiny, build_tokenizer
    from olmo2kit.training.data import prepare_data

    if args.size:
        from transformers import Olmo2ForCausalLM

        from olmo2kit.model.sizes import hf_config

        tokenizer = build_tokenizer()
        model = Olmo2ForCausalLM(hf_config(args.size, pad_token_id=tokenizer.pad_token_id, **args.arch))
        params = sum(p.numel() for p in model.parameters())
        model.to(torch.bfloat16).save_pretrained(work / "model")
        tokenizer.save_pretrained(work / "model")
        del model
    else:
        from safetensors.torch import load_file

        build_tiny(work / "model", instruct=True, seed=0)
        params = sum(t.numel() for t in load_file(work / "model" / "model.safetensors").values())

    def text(i: int, words: int) -> str:
        return " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(words))

    # Prompts of a quarter of the row, answers that fill most of the rest: every row is mostly trained positions.
    pairs = args.steps * args.batch_size
    words = args.seq_len // 4
    lines, chats = [], []
    for i in range(pairs):
        user = {"role": "user", "content": text(i, words)}
        chosen = [user, {"role": "assistant", "content": text(i + 1, 2 * words)}]
        rejected = [user, {"role": "assistant", "content": text(i + 2, 2 * words)}]
        lines.append(json.dumps({"chosen": chosen, "rejected": rejected}))
        chats.append(json.dumps({"messages": chosen}))
    (work / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    (work / "chats.jsonl").write_text("\n".join(chats) + "\n")
    model = str(work / "model")
    prepare_data(work / "pairs.jsonl", work / "dpo", model=model, seq_len=args.seq_len, format="preference")
    prepare_data(work / "chats.jsonl", work / "sft", model=model, seq_len=args.seq_len, format="chat")
    return params


def run_method(args) -> dict:
    """One timed run (`args.run`) in this process: its figures, and the seconds DPO spent on the reference."""
    import torch

    from olmo2kit.training.finetune import FinetuneConfig, finetune

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    said: list[tuple[float, str]] = []
    method, accum = RUNS[args.run]
    result = finetune(FinetuneConfig(
        data=str(work / method), output=str(work / f"out-{args.run}"), model=str(work / "model"),
        method=method, max_steps=args.steps, lr=1e-6, warmup=0.0, batch_size=args.batch_size // accum,
        grad_accum=accum, device=args.device, seed=0,
    ), say=lambda message: said.append((time.perf_counter(), message)))
    # The reference is computed between the message that announces it and the next one.
    reference_s = next((said[i + 1][0] - t for i, (t, m) in enumerate(said[:-1]) if m.startswith("computing")), None)
    return {"tokens": result.tokens, "seconds": result.elapsed_s, "examples": args.steps * args.batch_size,
            "peak_memory_gb": result.peak_memory_gb, "reference_s": reference_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", help="Random-init this OLMo 2 size (e.g. 1b) instead of the tiny checkpoint.")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=20, help="Optimizer steps per run.")
    parser.add_argument("--batch-size", type=int, default=4, help="Pairs (DPO) or rows (SFT) a step.")
    parser.add_argument("--seq-len", type=int, default=256, help="Tokens a row.")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run.")
    parser.add_argument("--arch", action="append", default=[], metavar="KEY=VALUE",
                        help="Override a config value of --size (a small CPU model: --arch num_hidden_layers=4).")
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    parser.add_argument("--run", choices=RUNS, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.arch = {key: int(value) for key, _, value in (item.partition("=") for item in args.arch)}
    if args.run:
        print(json.dumps(run_method(args)))
        return

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        work = Path(tmp)
        params = build(args, work)
        child = [sys.executable, __file__, "--work", str(work), "--device", args.device, "--steps", str(args.steps),
                 "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TRANSFORMERS_VERBOSITY": "error"}
        for name in RUNS:
            done = subprocess.run([*child, "--run", name], capture_output=True, text=True, env=env)
            if done.returncode != 0:
                sys.exit(f"{name} run failed:\n{done.stderr[-4000:]}")
            runs[name] = json.loads(done.stdout.strip().splitlines()[-1])

    what = (f"OLMo 2 {args.size} architecture{' with ' + str(args.arch) if args.arch else ''}, random weights"
            if args.size else "tiny checkpoint")
    device = f"CPU, {args.threads} thread(s)" if args.device == "cpu" else "GPU"
    print(f"{what} ({params:,} params) on {device}: full fine-tuning, {args.steps} steps of {args.batch_size} "
          f"examples x {args.seq_len} tokens, one run each")
    print(f"  {'':9} {'tokens/s':>10} {'examples/s':>11} {'peak memory':>12} {'reference':>10}")
    for name, r in runs.items():
        reference = f"{r['reference_s']:.1f} s" if r["reference_s"] is not None else "-"
        print(f"  {name:9} {r['tokens'] / r['seconds']:10,.0f} {r['examples'] / r['seconds']:11.2f} "
              f"{r['peak_memory_gb']:9.2f} GB {reference:>10}")
    tokens = {name: r["tokens"] / r["seconds"] for name, r in runs.items()}
    examples = {name: r["examples"] / r["seconds"] for name, r in runs.items()}
    for name in ("dpo", "dpo-accum"):
        print(f"  {name} / sft: tokens/s {tokens[name] / tokens['sft']:.3f}, "
              f"examples/s {examples[name] / examples['sft']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"what": what, "params": params, "device": device, "steps": args.steps,
                                         "batch_size": args.batch_size, "seq_len": args.seq_len, "runs": runs},
                                        indent=2))


if __name__ == "__main__":
    main()
