"""One-call GPU check of the foundation: auto device/dtype, generate overhead, quantized footprints.

    PYTHONPATH=src python benchmarks/gpu_foundation.py --out results/    # on a CUDA machine
    PYTHONPATH=src python benchmarks/gpu_foundation.py --out /tmp/r --cpu-smoke   # dry run here

Sections (each reports on its own; one failing does not stop the others):
  auto      a tiny checkpoint loaded with device/dtype "auto": where it lands, greedy = streamed text
  overhead  benchmarks/bench_generate.py on the 1B and 7B architectures (random weights, bf16)
  memory    the 1B architecture saved to disk, loaded in bf16, int8 and nf4 through olmo2kit.load:
            measured footprint against sizes.weight_bytes, and greedy decode tokens/s
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def section(name, results):
    def wrap(fn):
        def run(*args):
            start = time.perf_counter()
            try:
                results[name] = fn(*args)
            except Exception as e:  # report and carry on with the next section
                traceback.print_exc()
                results[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"[{name}] {time.perf_counter() - start:.1f} s: {json.dumps(results[name])}", flush=True)
        return run
    return wrap


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cpu-smoke", action="store_true", help="Tiny sizes on the CPU, to test this script.")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.cpu_smoke else "cuda"
    results: dict = {"torch": torch.__version__,
                     "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"}
    import transformers

    results["transformers"] = transformers.__version__

    from olmo2kit.inference.generation import generate, stream_generate
    from olmo2kit.model.loading import load
    from olmo2kit.model.sizes import SIZES, Size, hf_config, weight_bytes
    from olmo2kit.model.tiny import build_tiny, build_tokenizer

    @section("auto", results)
    def auto():
        path = build_tiny(Path(tempfile.mkdtemp()) / "tiny")
        model, tokenizer = load(str(path))  # device and dtype "auto"
        greedy = generate(model, tokenizer, "Language modeling is ", do_sample=False, max_new_tokens=32)
        streamed = "".join(c.text for c in stream_generate(model, tokenizer, "Language modeling is ",
                                                           do_sample=False, max_new_tokens=32))
        batch = generate(model, tokenizer, ["a", "bb bb", "ccc ccc ccc"], max_new_tokens=8, seed=0)
        return {"device": str(model.device), "dtype": str(model.dtype),
                "hf_device_map": getattr(model, "hf_device_map", None),
                "stream_equals_generate": streamed == greedy.text, "batch_new_tokens": [b.new_tokens for b in batch]}

    @section("overhead", results)
    def overhead():
        rows = {}
        plan = [("tiny-cpu", [], 64, 5)] if args.cpu_smoke else [("1b", ["--size", "1b"], 64, 7),
                                                               ("7b", ["--size", "7b"], 64, 5)]
        for name, extra, new_tokens, repeat in plan:
            out = args.out / f"overhead_{name}.json"
            command = [sys.executable, str(HERE / "bench_generate.py"), "--device", device, *extra,
                       "--new-tokens", str(new_tokens), "--repeat", str(repeat), "--json", str(out)]
            print(subprocess.run(command, capture_output=True, text=True, check=True).stdout, flush=True)
            rows[name] = json.loads(out.read_text())
        return rows

    @section("memory", results)
    def memory():
        from transformers import Olmo2ForCausalLM

        tokenizer = build_tokenizer()
        if args.cpu_smoke:
            config = hf_config("1b", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=4)
        else:
            config = hf_config("1b")
        size = Size.from_config("measured", config)
        if not args.cpu_smoke:
            assert size.params == SIZES["1b"].params
        path = Path(tempfile.mkdtemp()) / "random-1b"
        with torch.device(device):
            Olmo2ForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
        tokenizer.save_pretrained(path)
        rows = {}
        for quantize in (None, "int8", "nf4"):
            name = quantize or "bf16"
            try:
                if device == "cuda":
                    torch.cuda.empty_cache()
                    before = torch.cuda.memory_allocated()
                model, tok = load(str(path), dtype="bf16", quantize=quantize, device=device)
                allocated = (torch.cuda.memory_allocated() - before) if device == "cuda" else None
                estimate = weight_bytes(size, "bf16", quantize)
                generate(model, tok, "Language modeling is ", do_sample=False, max_new_tokens=8)  # warm-up
                result = generate(model, tok, "Language modeling is ", do_sample=False, max_new_tokens=64)
                rows[name] = {"estimate_gb": estimate / 1e9, "footprint_gb": model.get_memory_footprint() / 1e9,
                              "cuda_allocated_gb": None if allocated is None else allocated / 1e9,
                              "tokens_per_s": result.tokens_per_s, "new_tokens": result.new_tokens}
                del model
            except Exception as e:
                rows[name] = {"error": f"{type(e).__name__}: {e}"}
        return rows

    auto()
    overhead()
    memory()
    (args.out / "gpu_foundation.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
