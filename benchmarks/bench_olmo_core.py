"""Time and peak memory of `olmo2kit export olmo-core` and `import olmo-core` on a checkpoint of the 1B's shape.

    python benchmarks/bench_olmo_core.py [--size 1b] [--dtype bf16] [--json out.json]

No weights are downloaded: the checkpoint is random, of the real architecture (`olmo2kit.model.sizes.hf_config`:
the 1B's 16 layers of 2048, its 100,352-token vocabulary, untied embeddings), in safetensors of the dtype asked,
with the tiny tokenizer. Each way runs as the CLI command in a child process; its wall time and its peak resident
memory (ru_maxrss, from wait4) are reported, with the largest logit difference the command said. At the end the
round trip is checked tensor by tensor: HF -> OLMo-core -> HF gives back every tensor bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OLMO2KIT = Path(sys.executable).with_name("olmo2kit")


def make_checkpoint(path: Path, size: str, dtype: str, layers: int | None = None) -> int:
    """A random checkpoint of `size`'s architecture (with `layers` layers, if given) in `dtype` at `path`; returns
    its weights' bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import Olmo2ForCausalLM

    from olmo2kit.model.sizes import hf_config
    from olmo2kit.model.tiny import build_tokenizer

    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    tokenizer = build_tokenizer()
    config = hf_config(size, dtype=str(torch_dtype).removeprefix("torch."), eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id,
                       **({"num_hidden_layers": layers} if layers else {}))
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in Olmo2ForCausalLM(config).state_dict().items()}
    path.mkdir()
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=torch_dtype)
        else:
            tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch_dtype)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def run_measured(*args: str) -> dict:
    """One olmo2kit command in a child process: its wall time, peak resident memory (the child reaped by wait4
    here: Popen's own wait would lose its rusage) and the largest logit difference it said."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen([str(OLMO2KIT), *args], stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        err.seek(0)
        stderr = err.read()
    if child.returncode != 0:
        raise SystemExit(f"olmo2kit {' '.join(args)} failed:\n{stderr[-3000:]}")
    found = re.search(r"largest difference ([0-9.e+-]+)", stderr)
    return {"seconds": seconds, "peak_rss": usage.ru_maxrss * 1024,
            "max_logit_diff": float(found[1]) if found else None, "said": stderr.strip().splitlines()[-1]}


def same_tensors(a: Path, b: Path) -> tuple[int, list[str]]:
    """(tensors compared, names that differ in value, dtype or shape) between two safetensors files, a tensor at a
    time."""
    import torch
    from safetensors import safe_open

    differ = []
    with safe_open(a, "pt") as first, safe_open(b, "pt") as second:
        names = sorted(first.keys())
        if names != sorted(second.keys()):
            return len(names), ["(the names differ)"]
        for name in names:
            x, y = first.get_tensor(name), second.get_tensor(name)
            if x.dtype != y.dtype or not torch.equal(x, y):
                differ.append(name)
    return len(names), differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1b")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    parser.add_argument("--layers", type=int, help="Fewer layers than the size's, for a quick try.")
    parser.add_argument("--dir", type=Path, help="Work here (default: a temporary directory).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        weights = make_checkpoint(root / "hf", args.size, args.dtype, args.layers)
        print(f"random {args.size} checkpoint, {args.dtype}: {weights / 1e9:.2f} GB of weights, made in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        rows = []
        for way, command in (("export", ["export", "olmo-core", str(root / "hf"), str(root / "oc")]),
                             ("import", ["import", "olmo-core", str(root / "oc"), str(root / "back")])):
            figures = run_measured(*command)
            on_disk = sum(p.stat().st_size for p in (root / ("oc" if way == "export" else "back")).rglob("*")
                          if p.is_file())
            row = {"way": way, "size": args.size, "dtype": args.dtype, "weights_bytes": weights,
                   "written_bytes": on_disk, **figures, "peak_over_weights": figures["peak_rss"] / weights}
            rows.append(row)
            print(f"{way}: {figures['seconds']:.1f} s, peak RSS {figures['peak_rss'] / 1e9:.2f} GB "
                  f"({row['peak_over_weights']:.2f} x the weights), wrote {on_disk / 1e9:.2f} GB, largest logit "
                  f"difference {figures['max_logit_diff']}", flush=True)
        count, differ = same_tensors(root / "hf" / "model.safetensors", root / "back" / "model.safetensors")
        print(f"round trip: {count} tensors, {len(differ)} differ{': ' + ', '.join(differ[:5]) if differ else ''}")
        rows.append({"way": "round trip", "tensors": count, "differ": len(differ)})
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
