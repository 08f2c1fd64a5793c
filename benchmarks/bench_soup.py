"""Peak memory of `olmo2kit.soup` over 2, 3 and 4 checkpoints, against the size of one checkpoint.

    python benchmarks/bench_soup.py [--hidden 1024 --layers 8] [--counts 2,3,4] [--naive] [--json out.json]

The ingredients are random bf16 checkpoints of OLMo 2's layout (its tensor names and shapes, from transformers'
Olmo2ForCausalLM on the meta device) at a small width with the real 100,352-token vocabulary, so that the two
largest tensors (embeddings and lm_head, 100352 x hidden) are what they are in OLMo 2, at a quarter of the 1B. Their
tokenizer is as large as OLMo 2's: a byte-level BPE of 100,278 tokens (its merges made up), so that comparing the
ingredients' tokenizers costs what it does for OLMo 2.

Each soup runs in a fresh child process, which imports torch and olmo2kit, reads its resident memory (VmRSS in
/proc/self/status), runs the soup, then reads its peak resident memory (VmHWM, what ru_maxrss reports) and what is
resident at the end, split into anonymous memory (RssAnon: the process's own allocations) and file pages mapped
into it (RssFile: libraries, and any mmap'd file it touched; a soup reads with pread, so its checkpoints are not
among them). "soup memory" is the peak less the resident memory before the soup: what the soup itself added, the
interpreter, torch and olmo2kit left out. `--naive` also runs the soup everyone writes first (load every
checkpoint's tensors with safetensors, sum in fp32, save), for scale.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def status() -> dict[str, int]:
    """The memory lines of /proc/self/status, in bytes."""
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            found[key] = int(value.split()[0]) * 1024
    return found


def child(ingredients: list[str], output: str, naive: bool) -> None:
    """Run one soup in this process and print its memory figures as JSON."""
    import torch  # noqa: F401  (imported before the baseline: its own memory is not the soup's)

    from olmo2kit.model.soup import soup

    before = status()
    start = time.perf_counter()
    if naive:
        naive_soup(ingredients, output)
    else:
        soup(ingredients, output, say=lambda message: None)
    seconds = time.perf_counter() - start
    print(json.dumps({"before": before, "after": status(), "seconds": seconds}))


def naive_soup(ingredients: list[str], output: str) -> None:
    from safetensors.torch import load_file, save_file

    loaded = [load_file(Path(i) / "model.safetensors") for i in ingredients]
    averaged = {name: (sum(t[name].float() for t in loaded) / len(loaded)).to(tensor.dtype)
                for name, tensor in loaded[0].items()}
    Path(output).mkdir()
    save_file(averaged, Path(output) / "model.safetensors", metadata={"format": "pt"})


def make_checkpoints(root: Path, count: int, hidden: int, layers: int) -> list[Path]:
    """`count` random bf16 checkpoints of OLMo 2's layout at this width, with a tokenizer of OLMo 2's size."""
    import torch
    from safetensors.torch import save_file
    from transformers import Olmo2ForCausalLM

    from olmo2kit.model.sizes import hf_config
    from olmo2kit.model.tiny import write_olmo2_sized_tokenizer

    config = hf_config("1b", hidden_size=hidden, num_hidden_layers=layers, intermediate_size=4 * hidden,
                       num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, dtype="bfloat16")
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in Olmo2ForCausalLM(config).state_dict().items()}
    write_olmo2_sized_tokenizer(root / "tokenizer.json")
    paths = []
    for k in range(count):
        path = root / f"ingredient{k + 1}"
        path.mkdir()
        config.save_pretrained(path)
        shutil.copyfile(root / "tokenizer.json", path / "tokenizer.json")
        generator = torch.Generator().manual_seed(k)
        tensors = {name: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
                   for name, shape in shapes.items()}
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        del tensors
        paths.append(path)
    return paths


def measure(ingredients: list[Path], output: Path, naive: bool) -> dict:
    command = [sys.executable, __file__, "--child", str(output), *(["--naive"] if naive else []),
               *map(str, ingredients)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--counts", default="2,3,4")
    parser.add_argument("--naive", action="store_true", help="Also run the naive soup, for scale.")
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        return child(rest, args.child, args.naive)

    counts = [int(c) for c in args.counts.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ingredients = make_checkpoints(root, max(counts), args.hidden, args.layers)
        size = (ingredients[0] / "model.safetensors").stat().st_size
        print(f"one checkpoint: {size / 1e6:.0f} MB (bf16, hidden {args.hidden}, {args.layers} layers, vocab 100352)")
        print(f"{'soup':10} {'n':>2} {'before MB':>10} {'peak MB':>8} {'soup memory MB':>15} {'x checkpoint':>13} "
              f"{'RssAnon end':>12} {'RssFile end':>12} {'s':>6}")
        rows = []
        for naive in [False, True] if args.naive else [False]:
            for n in counts:
                output = root / f"soup-{'naive' if naive else 'olmo2kit'}-{n}"
                figures = measure(ingredients[:n], output, naive)
                added = figures["after"]["VmHWM"] - figures["before"]["VmRSS"]
                row = {"soup": "naive" if naive else "olmo2kit", "checkpoints": n, "checkpoint_bytes": size,
                       "rss_before": figures["before"]["VmRSS"], "peak_rss": figures["after"]["VmHWM"],
                       "soup_memory": added, "ratio": added / size, "rss_anon_end": figures["after"]["RssAnon"],
                       "rss_file_end": figures["after"]["RssFile"], "seconds": figures["seconds"]}
                rows.append(row)
                print(f"{row['soup']:10} {n:>2} {row['rss_before'] / 1e6:>10.0f} {row['peak_rss'] / 1e6:>8.0f} "
                      f"{added / 1e6:>15.0f} {row['ratio']:>13.2f} {row['rss_anon_end'] / 1e6:>12.0f} "
                      f"{row['rss_file_end'] / 1e6:>12.0f} {row['seconds']:>6.1f}")
                for file in output.iterdir():
                    file.unlink()
                output.rmdir()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
