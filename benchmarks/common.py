"""What the benchmark scripts share: the model under test and the interleaved timing loop.

Scripts run as `python benchmarks/NAME.py`, which puts this folder on sys.path: `from common import ...`.
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from collections.abc import Callable, Hashable
from pathlib import Path

import torch

from olmo2kit.devices import sync
from olmo2kit.evals.bench import load_random
from olmo2kit.model.loading import load
from olmo2kit.model.sizes import SIZES
from olmo2kit.model.tiny import build_tiny


def add_model_args(parser, dtype: str = "auto") -> None:
    """--size (random-init this size instead of tiny), --device and --dtype (bf16 with --size)."""
    parser.add_argument("--size", choices=list(SIZES), help="Random-init this size instead of tiny.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bf16" if "--size" in sys.argv else dtype)


def setup_model(size: str | None, dtype: str, device: str):
    """(model, tokenizer, description): a size's architecture with random weights, or a tiny checkpoint."""
    if size:
        model, tokenizer = load_random(size, dtype, None, device)
        return model, tokenizer, f"OLMo 2 {size} architecture, random weights, {dtype}"
    path = build_tiny(Path(tempfile.mkdtemp()) / "tiny", seed=0)
    model, tokenizer = load(str(path), device=device, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    return model, tokenizer, f"tiny checkpoint ({params:,} params, {str(model.dtype).removeprefix('torch.')})"


def time_interleaved(runs: dict[Hashable, Callable[[], object]], repeat: int, device: str) -> dict[Hashable, list]:
    """Wall seconds of each run, `repeat` times after one warm-up each, in a shuffled order every round
    so that no way gets a fixed place in the sequence."""
    for run in runs.values():
        run()
    times: dict[Hashable, list[float]] = {key: [] for key in runs}
    order = list(runs)
    shuffle = random.Random(0).shuffle
    for _ in range(repeat):
        shuffle(order)
        for key in order:
            sync(device)
            start = time.perf_counter()
            runs[key]()
            sync(device)
            times[key].append(time.perf_counter() - start)
    return times


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
