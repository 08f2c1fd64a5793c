"""Greedy agreement of the compiled path with plain transformers in bf16 on a GPU, step by step.

    PYTHONPATH=src python benchmarks/gpu_agreement.py --out results/          # on the GPU machine
    PYTHONPATH=src python benchmarks/gpu_agreement.py --out /tmp/r --smoke    # a quick dry run on the CPU

With random weights the logits are nearly flat, so in bf16 one flipped near-tie makes the rest of a
free-running output differ: counting equal tokens of two free-running outputs mostly measures where the
first flip came. This script also feeds each path the plain path's own tokens (teacher forcing) and
compares the next-token choice at every step, and for each disagreement gives the gap between the two
tokens' logits (from plain transformers over the whole text) next to the usual top-1/top-2 gap. Plain
transformers' own one-pass forward over the same text is the yardstick: it differs from its own
token-by-token decoding by kernel rounding alone. Random-init 1B and 7B, bf16, batch 1, prompt 32,
128 new tokens, 4 prompts, with the fused compiled step, whose speed is measured as in gpu_decode.py.
Rows go to OUT/gpu_agreement.jsonl as they are measured. (The run in docs/gpu-results was made at commit
08494df, which also measured a matmul attention for one-token steps: no faster, since removed.)
"""

from __future__ import annotations

import gc
import time
import traceback

import torch

from gpu_decode import PROMPT, compiled, parse_args, plain, random_model, recorder
from olmo2kit.evals.bench import measure_bandwidth


def main() -> None:
    args = parse_args(budget=240)
    started = time.perf_counter()
    device, new = args.device, args.new
    bandwidth = measure_bandwidth(device)
    record = recorder(args.out / "gpu_agreement.jsonl", [])

    for size in args.sizes:
        model, tokenizer, prompts, _, floor = random_model(size, device, new, bandwidth)
        reference, _ = plain(model, tokenizer, prompts, new, device)
        with torch.inference_mode():
            logits = model(torch.cat([prompts, reference], dim=1)).logits[:, PROMPT - 1:-1].float()
        top2 = logits.topk(2, dim=-1).values
        usual_gap = (top2[..., 0] - top2[..., 1]).median().item()
        record({"size": size, "way": "plain, one pass over the whole text",
                **forced_row(logits.argmax(-1), reference, logits, usual_gap)})
        if time.perf_counter() - started > args.budget:
            print(f"skipped {size} compiled: over the time budget", flush=True)
        else:
            keep = []
            try:
                row = compiled(model, tokenizer, prompts, new, device, True, False, reference, None, keep)
                row["floor_fraction"] = row["decode_tokens_per_s"] / floor
                forced = teacher_forced(keep[0], prompts, reference)
                row.update(forced_row(forced, reference, logits, usual_gap))
            except Exception as e:
                traceback.print_exc()
                row = {"error": f"{type(e).__name__}: {e}"}
            record({"size": size, "way": "compiled, fused", **row})
            keep.clear()
            torch._dynamo.reset()
            gc.collect()
        del model, logits
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"total {time.perf_counter() - started:.0f} s")


@torch.inference_mode()
def teacher_forced(decoder, prompts, reference) -> torch.Tensor:
    """The compiled step's next token after each prefix of the reference (the plain path's output)."""
    temperature = torch.tensor(1.0, device=decoder.device)
    top_p = torch.tensor(1.0, device=decoder.device)
    rows = []
    for prompt, ref in zip(prompts, reference, strict=True):
        ids = prompt[None]
        decoder.forward.reset(torch.ones_like(ids))
        picks = [decoder.forward(ids, torch.arange(ids.shape[1], device=ids.device)).argmax(-1)]
        for i in range(ref.shape[0] - 1):
            decoder.position.fill_(ids.shape[1] + i)
            picks.append(decoder.step(ref[i].view(1, 1).clone(), temperature, 0, top_p, True).clone())
        rows.append(torch.cat(picks))
    return torch.stack(rows)


def forced_row(picks, reference, logits, usual_gap: float) -> dict:
    """Step agreement with the reference and the logit gaps where the choice differs."""
    differ = picks != reference
    gaps = (logits.gather(-1, reference[..., None]) - logits.gather(-1, picks[..., None]))[..., 0][differ]
    return {"step_agreement": 1 - differ.float().mean().item(), "steps": differ.numel(),
            "disagreements": int(differ.sum()),
            "max_gap_at_disagreement": gaps.abs().max().item() if len(gaps) else None,
            "median_top1_top2_gap": usual_gap}


if __name__ == "__main__":
    main()
