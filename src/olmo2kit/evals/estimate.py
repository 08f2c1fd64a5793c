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


FINETUNE_METHODS = ("full", "lora", "qlora")
# Bytes per trainable parameter of a full fine-tune: fp32 master weights, fp32 gradients and AdamW's two fp32
# moments (exp_avg, exp_avg_sq), as `finetune` trains (torch.optim.AdamW; bf16 only in autocast).
FULL_BYTES_PER_PARAM = {"weights": 4, "gradients": 4, "optimizer": 8}


@dataclass
class FinetuneEstimate:
    """Memory of ONE training process (all figures per process). `fewest_processes`: the fewest FSDP processes
    whose per-process total fits `device_bytes` (None where nothing fits or the memory is unknown)."""

    model: str
    method: str
    processes: int
    fsdp: bool
    mixed_precision: bool
    gradient_checkpointing: bool
    seq_len: int
    batch_size: int
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    working_bytes: int
    total_bytes: int
    device: str
    device_bytes: int | None
    fits: bool | None
    fewest_processes: int | None

    def to_dict(self) -> dict:
        return asdict(self)


def finetune_estimate(model: str, *, method: str = "full", processes: int = 1, fsdp: bool = False,
                      mixed_precision: bool = False, gradient_checkpointing: bool = False, seq_len: int = 4096,
                      batch_size: int = 1, lora_r: int = 16, device_bytes: int | None = None,
                      device: str = "auto") -> FinetuneEstimate:
    """Memory of one process of `finetune` on a GPU with bf16 autocast: a rough guide counted from the tensors
    training keeps (weights, gradients, AdamW's moments, the activations autograd saves for the backward pass),
    not a measurement. `fsdp` shards weights, gradients and optimizer over `processes`; without it each process
    holds them whole (DDP). `mixed_precision`: FSDP gathers each layer in bf16 and computes in it (no autocast, so
    no bf16 copy of every weight kept through the pass). `device_bytes` is each process's GPU memory (say 80e9 for
    an H100); without it, this machine's device.

    >>> e = finetune_estimate("32b", processes=16, fsdp=True, mixed_precision=True, gradient_checkpointing=True,
    ...                       device_bytes=80 * 10**9)
    >>> e.fits, e.fewest_processes
    (True, 8)
    """
    if method not in FINETUNE_METHODS:
        raise Olmo2KitError(f"unknown fine-tuning method {method!r}: use one of {', '.join(FINETUNE_METHODS)}")
    if processes < 1 or seq_len < 1 or batch_size < 1 or lora_r < 1:
        raise Olmo2KitError("processes, sequence length, batch size and LoRA rank must be at least 1")
    if mixed_precision and not fsdp:
        raise Olmo2KitError("mixed precision here is FSDP's bf16 policy: give it with --fsdp")
    if device_bytes is not None and device_bytes <= 0:
        raise Olmo2KitError("the device's memory must be more than 0")
    size = architecture(model)
    name, available = ("GPU", device_bytes) if device_bytes is not None else device_memory(resolve_device(device))

    def per_process(n: int) -> tuple[int, int, int, int, int]:
        shards = n if fsdp else 1
        if method == "full":
            state = {part: size.params * per // shards for part, per in FULL_BYTES_PER_PARAM.items()}
        else:
            # A frozen base in bf16 (nf4 for QLoRA; norms and embeddings stay bf16) and fp32 adapters with their
            # gradients and AdamW moments: r x (in + out) for every Linear of the decoder ("all-linear").
            base = weight_bytes(size, "bf16", "nf4" if method == "qlora" else None)
            adapter = lora_r * size.num_hidden_layers * _lora_width(size)
            state = {"weights": (base + 4 * adapter) // shards, "gradients": 4 * adapter // shards,
                     "optimizer": 8 * adapter // shards}
        activations = _activation_bytes(size, seq_len * batch_size, gradient_checkpointing)
        # FSDP gathers one decoder layer at a time (and prefetches the next): two layers whole, in fp32 or, with
        # the bf16 policy, in bf16 and in place of autocast's copy of every weight.
        gathered = 2 * _layer_params(size) * (2 if mixed_precision else 4) if fsdp and n > 1 else 0
        if mixed_precision:
            activations -= autocast_copy_bytes(size)
        working = CUDA_CONTEXT_BYTES + gathered
        return state["weights"], state["gradients"], state["optimizer"], activations, working

    weights, gradients, optimizer, activations, working = per_process(processes)
    total = weights + gradients + optimizer + activations + working
    fewest = None
    if available is not None and fsdp:
        fewest = next((n for n in range(1, 4097) if sum(per_process(n)) <= available), None)
    elif available is not None:
        fewest = processes if total <= available else None
    return FinetuneEstimate(model, method, processes, fsdp, mixed_precision, gradient_checkpointing, seq_len,
                            batch_size, weights, gradients, optimizer, activations, working, total, name, available,
                            None if available is None else total <= available, fewest)


def _lora_width(size) -> int:
    """Sum of (in + out) features over one decoder layer's Linear modules: a rank-r adapter adds r x that."""
    h, kv, i = size.hidden_size, size.num_key_value_heads * size.head_dim, size.intermediate_size
    return (h + h) * 2 + (h + kv) * 2 + (h + i) * 2 + (i + h)  # q, o; k, v; gate, up; down


def _layer_params(size) -> int:
    h, kv = size.hidden_size, size.num_key_value_heads * size.head_dim
    return 2 * h * h + 2 * h * kv + 3 * h * size.intermediate_size


def saved_activation_bytes(size, tokens: int, checkpointing: bool) -> int:
    """What autograd keeps at the end of the forward pass of `tokens` tokens under bf16 autocast with fp32
    weights, as torch's saved-tensor hooks show it on OLMo 2's forward (transformers' modeling_olmo2.py;
    tests/evals/test_bench.py counts them), not counting the bf16 copies of the weights (`autocast_copy_bytes`).
    Per decoder layer and token: the bf16 input each of the seven projections casts for itself (3 x 2h for q, k, v;
    2 x 2h for gate and up; the down projection's 2i input), the fp32 input and normalized output of the q and k
    norms (8h + 8kv) and of the two post-sublayer norms (2 x 8h), the attention's bf16 q, k, v and output
    (4h + 4kv), the gate, up and SiLU outputs (6i): 38h + 12kv + 8i bytes. Gradient checkpointing keeps each
    layer's fp32 input (4h) alone. Then the final norm (8h), the lm_head's bf16 input (2h) and the fp32 logits
    cross_entropy keeps (4 bytes a vocabulary entry)."""
    h, kv, i = size.hidden_size, size.num_key_value_heads * size.head_dim, size.intermediate_size
    layer = 4 * h if checkpointing else 38 * h + 12 * kv + 8 * i
    return (size.num_hidden_layers * layer + 10 * h + 4 * size.vocab_size) * tokens


def autocast_copy_bytes(size) -> int:
    """autocast casts each fp32 weight to bf16 once per forward pass and keeps the copy until the pass ends (and
    the backward pass, where autograd saved it): 2 bytes for every Linear weight, the lm_head's included."""
    return 2 * (size.linear_params + size.vocab_size * size.hidden_size)


def _activation_bytes(size, tokens: int, checkpointing: bool) -> int:
    """Peak of the activations: what the forward pass keeps, the bf16 weight copies, then at the start of the
    backward pass the logits' fp32 gradient and their bf16 copy (6 bytes a vocabulary entry), and with
    checkpointing one layer recomputed whole."""
    h, kv, i = size.hidden_size, size.num_key_value_heads * size.head_dim, size.intermediate_size
    recomputed = (38 * h + 12 * kv + 8 * i) * tokens if checkpointing else 0
    return (saved_activation_bytes(size, tokens, checkpointing) + autocast_copy_bytes(size)
            + 6 * size.vocab_size * tokens + recomputed)
