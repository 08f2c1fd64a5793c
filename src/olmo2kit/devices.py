"""Devices and dtypes: the one dtype table, device names, device sync and memory.

Nothing here imports torch at import time.
"""

from __future__ import annotations

import logging
import re
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

from olmo2kit.errors import Olmo2KitError

log = logging.getLogger("olmo2kit")


@dataclass(frozen=True)
class Dtype:
    name: str  # what olmo2kit calls it: bf16, fp16, fp32
    torch_name: str  # the attribute of torch: bfloat16, float16, float32
    bytes: int  # per element


DTYPES: dict[str, Dtype] = {d.name: d for d in (
    Dtype("bf16", "bfloat16", 2),
    Dtype("fp16", "float16", 2),
    Dtype("fp32", "float32", 4),
)}
# Other spellings accepted for each, torch's own names among them.
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32"}
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def get_dtype(name: str) -> Dtype:
    """The table entry for a dtype name or one of its spellings (bf16, bfloat16, fp16, half, ...)."""
    key = _DTYPE_ALIASES.get(name, name)
    if key not in DTYPES:
        raise Olmo2KitError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[key]


def dtype_name(torch_dtype) -> str:
    """olmo2kit's name (bf16, fp16, fp32) for a torch dtype."""
    torch_name = str(torch_dtype).removeprefix("torch.")
    return next(d.name for d in DTYPES.values() if d.torch_name == torch_name)


def check_device(device: str) -> None:
    """Olmo2KitError unless `device` is auto, cpu, cuda, cuda:N or mps."""
    if not DEVICE.match(device):
        raise Olmo2KitError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps")


def resolve_device(device: str = "auto") -> str:
    """'auto' is cuda when a GPU is visible, else cpu; anything else is checked and kept."""
    check_device(device)
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise Olmo2KitError(f"device {device!r} asked for, but no CUDA GPU is visible: use --device cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise Olmo2KitError("device 'mps' asked for, but MPS is not available: use --device cpu")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively: AVX512-BF16 or AMX (Intel from Cooper Lake, AMD from Zen 4).

    Measured on such a CPU (docs/benchmarks.md, "The CPU default"): the 1B decodes 1.23x faster in bf16 than in
    fp32, with its first token 3x sooner and 0.6x the memory. Without them bf16 arithmetic is emulated; no such CPU
    was at hand to measure, so fp32 stays the default there.
    """
    import torch

    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


def resolve_dtype(dtype: str, device: str):
    """The torch dtype for a name. 'auto' is bf16 on a CUDA device that supports it and on a CPU with native
    bf16 (`cpu_has_native_bf16`), else fp32."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES and dtype not in _DTYPE_ALIASES:
        raise Olmo2KitError(f"unknown dtype {dtype!r}: use auto, bf16, fp16 or fp32")
    entry = get_dtype(dtype)
    if entry.name == "fp16":
        log.warning("fp16 asked for: OLMo 2 was trained in bf16 and its activations can overflow fp16")
    return getattr(torch, entry.torch_name)


def sync(device) -> None:
    """Wait for the device's queued work (a no-op off CUDA): call it around anything timed."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, resident set size elsewhere."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9


def device_memory(device: str = "auto") -> tuple[str, int | None]:
    """(device name, bytes available to a model on it): the GPU's total memory, else the machine's RAM."""
    import torch

    check_device(device)
    wants_gpu = device in ("auto", "cuda") or device.startswith("cuda:")
    if wants_gpu and torch.cuda.is_available():
        index = torch.device(device if device.startswith("cuda:") else "cuda").index or 0
        return torch.cuda.get_device_name(index), torch.cuda.get_device_properties(index).total_memory
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return "CPU", int(line.split()[1]) * 1024
    except OSError:
        pass
    return "CPU", None
