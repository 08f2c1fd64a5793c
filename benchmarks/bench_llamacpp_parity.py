"""llama.cpp against transformers fp32: how closely each GGUF type, run as the engine runs it, gives transformers'
logits and greedy tokens.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_llamacpp_parity.py            # tiny checkpoint, one thread

The tiny checkpoint only (random weights, seed 0): its GGUFs convert in seconds and a run takes about a minute on
one thread; the 1B could run here only with random weights, near-tied logits too, for tens of minutes. Each GGUF
type is converted into a temporary GGUF cache (`olmo2kit.model.gguf.cached_gguf`) and opened with the engine's
attention settings (`olmo2kit.model.llamacpp.attention_options`): f32 without flash attention and with keys and
values in f32 (the exact setting), every other type with flash attention and llama.cpp's f16 key/value cache (the
speed setting). f32 also runs under the speed setting, which separates what the attention settings cost from what
rounded or quantized weights cost. Two measures, against transformers in fp32 (`olmo2kit.model.loading.load`):
  teacher-forced   the 40 prompts joined into one text, one forward pass on each side: the largest difference
                   of next-token log-probabilities, the share of positions where the greedy picks agree, and,
                   where they differ, the largest gap between transformers' logits of its pick and of llama.cpp's
                   (small: a near-tie). The same measure the engine's tests bound.
  free-running     each prompt alone, --new-tokens greedy tokens (end of text ignored), llama.cpp through
                   llama-cpp-python's `generate` at temperature 0 as the engine calls it: the continuations
                   equal to transformers' token for token, and where the others first differ.
Prints a markdown table; --json writes the raw figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from olmo2kit.model.gguf import GGUF_TYPES, cached_gguf, checkpoint_dir
from olmo2kit.model.llamacpp import attention_options
from olmo2kit.model.loading import load
from olmo2kit.model.tiny import build_tiny

# The engine's tests use these forty prompts too (tests/llamacpp_engine/test_llamacpp_engine.py).
PROMPTS = [subject + verb for subject in (
    "Language modeling", "The capital of France", "My favourite colour", "Water", "The quick brown fox",
    "In 1969, the first", "Python code", "Hello, world!", "I'm fine, you're", "Numbers 1 2 3 100",
) for verb in (" is", " was", " will be", " means")]


def settings(gguf_type: str) -> list[tuple[str, dict]]:
    """(name, Llama keyword arguments) to run a GGUF of `gguf_type` with: the engine's, and for f32 also the
    speed setting the other types run with."""
    own = [("engine", attention_options(gguf_type))]
    if gguf_type == "f32":
        own.append(("speed setting", attention_options("bf16")))
    return own


def describe(options: dict) -> str:
    import llama_cpp

    cache = "f32" if options.get("type_k") == llama_cpp.GGML_TYPE_F32 else "f16"  # llama.cpp's default: f16
    return f"flash {'on' if options['flash_attn'] else 'off'}, {cache} K/V"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def teacher_forced(ours: np.ndarray, theirs: np.ndarray) -> dict:
    """llama.cpp's logits (`ours`) against transformers' (`theirs`) at the same positions."""
    picked, best = ours.argmax(-1), theirs.argmax(-1)
    rows = np.arange(len(theirs))
    differ = picked != best
    gaps = theirs[rows, best] - theirs[rows, picked]
    return {"max_logprob_diff": float(np.abs(log_softmax(ours) - log_softmax(theirs)).max()),
            "max_logit_diff": float(np.abs(ours - theirs).max()),
            "agree": int((~differ).sum()), "positions": len(theirs),
            "max_gap_where_differ": float(gaps[differ].max()) if differ.any() else None}


def llama_greedy(llama, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy continuations, one prompt after another, called as olmo2kit's llama.cpp engine calls them (a
    prompt that starts as the previous one did reuses its keys and values, as in the engine)."""
    outputs = []
    for ids in prompts:
        steps = llama.generate(list(ids), temp=0.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
        tokens = []
        for token in steps:
            tokens.append(token)
            if len(tokens) >= new_tokens:
                break
        steps.close()
        outputs.append(tokens)
    return outputs


def transformers_greedy(model, tokenizer, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """transformers' greedy continuations, `new_tokens` each (end of text ignored, as on llama.cpp's side)."""
    outputs = []
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
            outputs.append(out[0, len(ids):].tolist())
    assert all(len(tokens) == new_tokens for tokens in outputs)
    return outputs


def first_difference(ours: list[int], theirs: list[int]) -> int | None:
    return next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), None)


def measure(gguf: Path, options: dict, text_ids: list[int], prompts: list[list[int]], theirs: np.ndarray,
            reference: list[list[int]], new_tokens: int, threads: int) -> dict:
    from llama_cpp import Llama

    # logits_all keeps every position's logits; the greedy run gets a Llama of its own, built as the engine
    # builds it (the model's whole context).
    scorer = Llama(model_path=str(gguf), n_ctx=len(text_ids), n_batch=512, n_threads=threads,
                   n_threads_batch=threads, logits_all=True, seed=0, verbose=False, **options)
    try:
        scorer.eval(text_ids)
        result = teacher_forced(np.asarray(scorer.scores[: len(text_ids)]), theirs)
    finally:
        scorer.close()
    decoder = Llama(model_path=str(gguf), n_ctx=0, n_batch=512, n_threads=threads, n_threads_batch=threads,
                    seed=0, verbose=False, **options)
    try:
        outputs = llama_greedy(decoder, prompts, new_tokens)
    finally:
        decoder.close()
    firsts = [first_difference(ours, ref) for ours, ref in zip(outputs, reference, strict=True)]
    return {**result, "identical": firsts.count(None), "prompts": len(prompts),
            "first_differences": sorted(i for i in firsts if i is not None)}


def table(rows: list[dict], new_tokens: int) -> str:
    lines = ["| GGUF | setting | attention, cache | max \\|Δ log-prob\\| | greedy pick agrees | largest top-two gap "
             f"where not | identical {new_tokens}-token continuations | first difference at token |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gap = "none differ" if r["max_gap_where_differ"] is None else f"{r['max_gap_where_differ']:.2g}"
        firsts = ", ".join(map(str, r["first_differences"])) or "none"
        lines.append(f"| {r['gguf_type']} | {r['setting']} | {r['attention']} | {r['max_logprob_diff']:.2g} | "
                     f"{r['agree'] / r['positions']:.3f} ({r['agree']} of {r['positions']}) | {gap} | "
                     f"{r['identical']} of {r['prompts']} | {firsts} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", default=["f32", "bf16", "f16", "q8_0", "q4_k_m"],
                        choices=list(GGUF_TYPES))
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads on each side; 1 keeps a shared machine's other work undisturbed.")
    parser.add_argument("--json", type=Path, help="Write the raw figures here.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as work:
        path = build_tiny(Path(work) / "tiny", seed=0)
        model, tokenizer = load(str(path), dtype="fp32", device="cpu")
        text_ids = tokenizer(" ".join(PROMPTS), add_special_tokens=False)["input_ids"]
        prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
        with torch.inference_mode():
            theirs = model(torch.tensor([text_ids])).logits[0].numpy()
        reference = transformers_greedy(model, tokenizer, prompts, args.new_tokens)
        top_two = np.sort(theirs, axis=-1)[:, -2:]
        scale = {"median_top_two_gap": float(np.median(top_two[:, 1] - top_two[:, 0])),
                 "max_abs_logit": float(np.abs(theirs).max())}
        ref, source = checkpoint_dir(str(path))
        rows = []
        for gguf_type in args.types:
            gguf = cached_gguf(ref, source, gguf_type, cache=Path(work) / "gguf", say=lambda _: None)
            for setting, options in settings(gguf_type):
                row = measure(gguf, options, text_ids, prompts, theirs, reference, args.new_tokens, args.threads)
                rows.append({"gguf_type": gguf_type, "setting": setting, "attention": describe(options), **row})
                print(f"{gguf_type} ({setting}) done", flush=True, file=sys.stderr)
    params = sum(p.numel() for p in model.parameters())
    print(f"tiny checkpoint ({params:,} params, seed 0) against transformers fp32; {len(PROMPTS)} prompts "
          f"({len(text_ids)} tokens joined), {args.new_tokens} greedy tokens each; {args.threads} thread(s)\n")
    print(table(rows, args.new_tokens))
    print(f"\ntransformers' logits over the joined text: median top-two gap {scale['median_top_two_gap']:.2g}, "
          f"largest |logit| {scale['max_abs_logit']:.2g}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, **scale, "new_tokens": args.new_tokens,
                                         "positions": len(text_ids)}, indent=2))


if __name__ == "__main__":
    main()
