"""Honest speed numbers: `bench` for any OLMo 2 size or checkpoint.

`bench` loads a model,
or with `random_init=True` builds the exact architecture of a size with random weights, and
measures load time, time to first token, prefill and decode rates, peak memory, and how close
decoding comes to the memory-bandwidth floor: each decode step must read every weight it uses once
(all but the input embedding table, of which it reads one row per token) and the keys and values
cached so far, and can go no faster than the device's measured bandwidth allows.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from olmo2kit.devices import dtype_name, peak_memory_gb, resolve_device, resolve_dtype, sync
from olmo2kit.errors import Olmo2KitError
from olmo2kit.evals.estimate import estimate
from olmo2kit.model.engines import engine_info, load_model
from olmo2kit.model.llamacpp import LlamaCppModel, load_llamacpp
from olmo2kit.model.sizes import (
    DEFAULT_MODEL,
    SIZES,
    Size,
    check_context,
    context_length,
    get_size,
    hf_config,
    weight_bytes,
)
from olmo2kit.model.tiny import TINY_HEAD_DIM, build_tokenizer, tiny_config
from olmo2kit.model.vllm import VllmModel, VllmOptions


@dataclass
class BenchResult:
    model: str
    device: str
    dtype: str
    quantize: str | None
    compile: bool
    batch_size: int
    prompt_len: int
    new_tokens: int
    repeat: int
    load_s: float
    ttft_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    ms_per_token: float
    peak_memory_gb: float | None  # None on vLLM: its memory is in its own processes
    weight_bytes: int
    bytes_per_step: int  # weights read per decode step (all but the input embeddings) plus the mean KV cache read
    bandwidth_gbps: float
    floor_tokens_per_s: float
    floor_fraction: float
    engine: str = "transformers"
    engine_version: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def measure_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Memory bandwidth in bytes/s, counting bytes read and written by a large device copy."""
    import torch

    n = nbytes // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / min(times)


# The tiny architecture by name, for quick tries: its head size; tiny64's is one vLLM's CPU attention runs.
TINY_SIZES = {"tiny": TINY_HEAD_DIM, "tiny64": 64}


def load_random(size: str, dtype: str, quantize: str | None, device: str, engine: str = "transformers",
                vllm: VllmOptions | None = None):
    """The exact architecture of `size` with random weights; quantized, or on vLLM, through a temporary
    checkpoint (vLLM reads it while it starts, so it is gone once the model is loaded)."""
    import torch
    from transformers import Olmo2ForCausalLM

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    tokenizer = build_tokenizer()
    if size in TINY_SIZES:  # the tiny test architecture, for quick runs of benchmark scripts
        config = tiny_config(tokenizer, TINY_SIZES[size])
    else:
        config = hf_config(get_size(size))
    if quantize is None and engine == "transformers":
        with torch.device(device):  # built in the target dtype: no fp32 copy to inflate peak memory
            model = Olmo2ForCausalLM._from_config(config, dtype=torch_dtype).eval()
        tokenizer.padding_side = "left"
        return model, tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        with torch.device(device):
            Olmo2ForCausalLM._from_config(config, dtype=torch_dtype).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if engine == "llamacpp":  # its GGUF goes with the checkpoint, not into the GGUF cache
            loaded, tokenizer = load_llamacpp(tmp, dtype=dtype, quantize=quantize, device=device,
                                              gguf_cache=Path(tmp) / "gguf")
            loaded.llama  # noqa: B018  (llama.cpp maps the file now, while the directory is there)
            return loaded, tokenizer
        loaded, tokenizer = load_model(tmp, engine=engine, dtype=dtype, quantize=quantize, device=device, vllm=vllm)
        if engine == "vllm":
            loaded.llm  # noqa: B018  (vLLM reads the weights now, while the directory is there)
        return loaded, tokenizer


# progress(stage, done, total): "load" (0 of 1, as loading starts), "runs" (done of the warm-up run and the
# timed runs, from 0 before the first), "bandwidth" (0 of 1, as the measurement starts).
Progress = Callable[[str, int, int], None]


def bench(model: str | None = None, *, size: str | None = None, random_init: bool = False, dtype: str = "auto",
          quantize: str | None = None, device: str = "auto", batch_size: int = 1, prompt_len: int = 32,
          new_tokens: int = 128, compile: bool = False, repeat: int = 3, revision: str | None = None,
          progress: Progress | None = None, engine: str = "transformers",
          vllm: VllmOptions | None = None) -> BenchResult:
    """Measure one configuration. Medians over `repeat` runs after one warm-up run.

    `engine` "vllm" runs vLLM (`vllm` its layout), timed the same way through its own `generate`.

    `progress(stage, done, total)`, if given, hears of each stage as it starts and of each run as it
    ends (see `Progress`): on a CPU a 1B takes minutes.
    """
    import torch

    progress = progress or _no_progress
    if batch_size < 1 or prompt_len < 1 or new_tokens < 2 or repeat < 1:
        raise Olmo2KitError("batch size, prompt length and repeat must be at least 1, new tokens at least 2")
    if engine == "llamacpp" and (batch_size > 1 or compile):
        raise Olmo2KitError("olmo2kit runs llama.cpp on one sequence at a time, compiled by llama.cpp: bench it with "
                            "--batch-size 1 and no --compile")
    device = resolve_device(device)
    name = (size or model) if random_init else (model or size or DEFAULT_MODEL)
    if random_init and name not in SIZES and name not in TINY_SIZES:
        raise Olmo2KitError(f"--random-init needs a size: {', '.join(SIZES)} (or tiny, for quick tries; tiny64 "
                            "for vLLM on the CPU)")
    _check_fit(name, dtype, quantize, device, prompt_len + new_tokens, batch_size)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    progress("load", 0, 1)
    start = time.perf_counter()
    if random_init:
        loaded, tokenizer = load_random(name, dtype, quantize, device, engine, vllm)
        label = f"{name} (random init)"
    else:
        label = name
        loaded, tokenizer = load_model(label, engine=engine, revision=revision, dtype=dtype, quantize=quantize,
                                       device=device, vllm=vllm)
    on_vllm = isinstance(loaded, VllmModel)
    on_llamacpp = isinstance(loaded, LlamaCppModel)
    if on_vllm:
        loaded.llm  # noqa: B018  (vLLM's start-up is part of the load)
    elif on_llamacpp:
        loaded.llama  # noqa: B018  (llama.cpp maps the GGUF: part of the load)
    else:
        sync(loaded.device)
    load_s = time.perf_counter() - start
    check_context(prompt_len, new_tokens, context_length(loaded.config), prompt="--prompt-len", new="--new-tokens")

    ttft_s, decode_s = _median_runs(loaded, tokenizer, batch_size, prompt_len, new_tokens, compile, repeat, progress)
    decode_tps = batch_size * (new_tokens - 1) / decode_s
    arch = Size.from_config(label, loaded.config)
    # the footprint leaves out the fp32 block scales that 4-bit decoding reads too; vLLM's weights are in its engine
    if on_llamacpp:  # the GGUF's tensors, as llama.cpp maps them; its keys and values are f16
        weights, element_bytes = loaded.gguf_bytes, 2
    elif quantize in ("nf4", "fp4") or on_vllm:
        weights, element_bytes = weight_bytes(arch, dtype_name(loaded.dtype), quantize), loaded.dtype.itemsize
    else:
        weights, element_bytes = loaded.get_memory_footprint(), loaded.dtype.itemsize
    step_bytes = bytes_per_step(arch, weights, element_bytes, batch_size, prompt_len + new_tokens / 2)
    progress("bandwidth", 0, 1)
    device_type = torch.device(loaded.device).type
    bandwidth = measure_bandwidth(torch.device(loaded.device))
    floor = bandwidth / step_bytes
    return BenchResult(
        model=label, device=torch.cuda.get_device_name() if device_type == "cuda" else "CPU",
        dtype=str(loaded.dtype).removeprefix("torch."), quantize=quantize, compile=compile, batch_size=batch_size,
        prompt_len=prompt_len, new_tokens=new_tokens, repeat=repeat, load_s=load_s, ttft_s=ttft_s,
        prefill_tokens_per_s=batch_size * prompt_len / ttft_s, decode_tokens_per_s=decode_tps,
        ms_per_token=1000 * decode_s / (new_tokens - 1),
        peak_memory_gb=None if on_vllm or on_llamacpp else peak_memory_gb(loaded.device),
        weight_bytes=weights, bytes_per_step=step_bytes, bandwidth_gbps=bandwidth / 1e9, floor_tokens_per_s=floor,
        floor_fraction=(decode_tps / batch_size) / floor, **engine_info(loaded),
    )


def _median_runs(model, tokenizer, batch_size: int, prompt_len: int, new_tokens: int, compile: bool, repeat: int,
                 progress: Progress) -> tuple[float, float]:
    """(time to first token, time for the rest) of a random prompt, medians of `repeat` runs after a warm-up."""
    import torch

    vocab = min(model.config.vocab_size, len(tokenizer))
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, vocab, (batch_size, prompt_len), generator=generator)
    if isinstance(model, VllmModel):
        return _median_of(progress, repeat, lambda: _timed_vllm_run(model, input_ids.tolist(), new_tokens))
    if isinstance(model, LlamaCppModel):
        return _median_of(progress, repeat, lambda: _timed_llamacpp_run(model, tokenizer, input_ids[0].tolist(),
                                                                        new_tokens))
    input_ids = input_ids.to(model.device)
    mask = torch.ones_like(input_ids)
    return _median_of(progress, repeat, lambda: _timed_run(model, tokenizer, input_ids, mask, new_tokens, compile))


def _median_of(progress: Progress, repeat: int, timed_run) -> tuple[float, float]:
    ttft, decode = [], []
    progress("runs", 0, repeat + 1)
    for run in range(repeat + 1):  # the first run warms up (and compiles)
        first, rest = timed_run()
        if run:
            ttft.append(first)
            decode.append(rest)
        progress("runs", run + 1, repeat + 1)
    return statistics.median(ttft), statistics.median(decode)


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


def bytes_per_step(size: Size, weights: int, element_bytes: int, batch_size: int, mean_context: float) -> int:
    """Bytes one decode step must read at least: the weights less the input embedding table (a step
    reads one row of it per sequence), plus each sequence's cached keys and values."""
    embeddings = size.vocab_size * size.hidden_size * element_bytes
    kv = size.kv_bytes_per_token(element_bytes) * batch_size * mean_context
    return int(weights - embeddings + kv)


def _check_fit(model: str, dtype: str, quantize: str | None, device: str, context: int, batch_size: int) -> None:
    """Olmo2KitError before any download or allocation when the estimate says the model cannot fit."""
    try:
        need = estimate(model, dtype=dtype, quantize=quantize, context=context, batch_size=batch_size, device=device)
    except Olmo2KitError:
        return  # an architecture only loading can tell: no estimate to check against
    if need.fits is False:
        raise Olmo2KitError(
            f"{model} in {need.dtype}{' ' + quantize if quantize else ''} needs about {need.total_bytes / 1e9:.1f} GB "
            f"but {need.device} has {need.device_bytes / 1e9:.1f} GB: try --quantize nf4, a smaller size or a GPU "
            f"(`olmo2kit estimate {model} --dtype {need.dtype}`)"
        )


def _timed_vllm_run(model, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """As `_timed_run`, through vLLM's `LLM.generate` (every row decodes exactly `new_tokens`)."""
    from vllm import SamplingParams

    requests = [{"prompt_token_ids": ids} for ids in prompts]
    timings = []
    for count in (1, new_tokens):
        params = SamplingParams(max_tokens=count, min_tokens=count, ignore_eos=True, temperature=0.0,
                                detokenize=False)
        start = time.perf_counter()
        model.llm.generate(requests, params, use_tqdm=False)
        timings.append(time.perf_counter() - start)
    first, whole = timings
    return first, max(whole - first, 1e-9)


def _timed_llamacpp_run(model, tokenizer, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """As `_timed_run`, through olmo2kit's llama.cpp engine (the prompt prefilled anew each run)."""
    from olmo2kit.inference.engines import engine_for
    from olmo2kit.inference.sampling import SamplingOptions

    model.llama.reset()  # no prefix of an earlier run is reused
    steps = engine_for(model, tokenizer).tokens([prompt], SamplingOptions(do_sample=False, max_new_tokens=new_tokens),
                                                set(), stream=True)
    start = time.perf_counter()
    first = None
    for _ in steps:
        first = first if first is not None else time.perf_counter() - start
    whole = time.perf_counter() - start
    return first, max(whole - first, 1e-9)


def _timed_run(model, tokenizer, input_ids, mask, new_tokens: int, compile: bool) -> tuple[float, float]:
    """(time to first token, time for the remaining new_tokens - 1) of one generation."""
    import torch

    if compile:
        from olmo2kit.inference.compiled import decoder_for

        decoder = decoder_for(model, input_ids.shape[0], input_ids.shape[1] + new_tokens, compile=True)
        result = decoder.decode(input_ids, mask, new_tokens, eos_ids={-1}, pad_id=tokenizer.pad_token_id,
                                check_every=new_tokens)
        return result.prefill_s, result.decode_s
    kwargs = dict(attention_mask=mask, do_sample=False, pad_token_id=tokenizer.pad_token_id, use_cache=True,
                  eos_token_id=None)
    with torch.inference_mode():
        sync(model.device)
        start = time.perf_counter()
        model.generate(input_ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        sync(model.device)
        first = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        sync(model.device)
        whole = time.perf_counter() - start
    return first, max(whole - first, 1e-9)
