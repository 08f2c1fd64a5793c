"""Memory before a download: `estimate` for any OLMo 2 size, alias, repo or local checkpoint.

It needs no weights and imports torch only to look at the device. It answers for what `generate`
would load: the same dtype on the same device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from olmo2kit.devices import DTYPES, device_memory, dtype_name, resolve_device, resolve_dtype
from olmo2kit.errors import Olmo2KitError
from olmo2kit.model.sizes import architecture, weight_bytes

CUDA_CONTEXT_BYTES = 500_000_000  # CUDA context and allocator slack, measured roughly on H100/H200


@dataclass
class Estimate:
    model: str
    dtype: str
    quantize: str | None
    context: int
    batch_size: int
    weights_bytes: int
    kv_cache_bytes: int
    working_bytes: int
    total_bytes: int
    device: str
    device_bytes: int | None
    fits: bool | None

    def to_dict(self) -> dict:
        return asdict(self)


def estimate(model: str, *, dtype: str = "auto", quantize: str | None = None, context: int = 4096,
             batch_size: int = 1, device: str = "auto") -> Estimate:
    """Memory needed to run `model` at `context` tokens and `batch_size`, and whether it fits.

    The dtype and device are resolved as `olmo2kit.load` resolves them, so the answer is for what
    `generate` would load: "auto" is bf16 on a CUDA GPU that supports it and fp32 elsewhere, and a
    device that is not there (cuda without a GPU) is an Olmo2KitError. The Estimate names both.

    >>> estimate("7b", dtype="bf16", quantize="nf4").weights_bytes / 1e9  # doctest: +ELLIPSIS
    5.28...
    """
    if context < 1 or batch_size < 1:
        raise Olmo2KitError("context and batch size must be at least 1")
    device = resolve_device(device)
    dtype = dtype_name(resolve_dtype(dtype, device))
    size = architecture(model)
    weights = weight_bytes(size, dtype, quantize)
    element = DTYPES[dtype].bytes
    kv = size.kv_bytes_per_token(element) * context * batch_size
    # Prefill activations of one layer at a time (hidden states, q/k/v, the MLP's two wide
    # projections) plus fp32 logits of the last position.
    working = batch_size * context * (4 * size.hidden_size + 2 * size.intermediate_size) * element
    working += batch_size * size.vocab_size * 4
    name, available = device_memory(device)
    if name != "CPU":
        working += CUDA_CONTEXT_BYTES
    total = weights + kv + working
    return Estimate(model, dtype, quantize, context, batch_size, weights, kv, working, total, name, available,
                    None if available is None else total <= available)
