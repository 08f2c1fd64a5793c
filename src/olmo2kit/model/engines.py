"""Which engine holds the weights: the one seam every command loads through.

transformers is the default engine. vLLM (`olmo2kit.model.vllm`) is chosen with `engine="vllm"`, or by
`engine="auto"` where it is installed, a CUDA GPU is visible and the request is one vLLM runs as asked.
llama.cpp (`olmo2kit.model.llamacpp`), for CPU speed, is chosen with `engine="llamacpp"`, or by "auto" when
`quantize` names a GGUF type (q8_0, q4_k_m, ...), which only llama.cpp runs, and, where the caller asks for it
(`cpu_llamacpp`: the CLI's generate, chat and serve), on a CPU for a request llama.cpp runs as asked.

    >>> model, tokenizer = load_model("1b-instruct", engine="llamacpp", quantize="q8_0")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from olmo2kit.compat import offline_mode
from olmo2kit.errors import Olmo2KitError
from olmo2kit.model.gguf import GGUF_TYPES, converter_dir, gguf_cache_dir
from olmo2kit.model.llamacpp import LlamaCppModel, llamacpp_refusal, llamacpp_version, load_llamacpp
from olmo2kit.model.loading import ModelRef, load, resolve_model
from olmo2kit.model.sizes import checkpoint_architecture, read_config, size_of
from olmo2kit.model.vllm import VllmModel, VllmOptions, load_vllm, visible_gpus, vllm_refusal, vllm_version

log = logging.getLogger("olmo2kit")

ENGINES = ("auto", "transformers", "vllm", "llamacpp")
_NAMES = {"vllm": "vLLM", "llamacpp": "llama.cpp"}

# What auto on a CPU runs on llama.cpp (docs/benchmarks.md, "CPU speed: llama.cpp and olmo2kit's own paths": the
# 1B decodes at 8.3 to 9.2 tokens/s from a bf16 GGUF against transformers' 6.8 in bf16). bf16 is the one type
# measured against transformers; --dtype fp32 asks for exact results, which llama.cpp gives only on its slow path.
AUTO_LLAMACPP_DTYPES = ("auto", "bf16", "bfloat16")
# Below this a checkpoint is a test or toy model: transformers runs it in milliseconds a token, and its conversion
# to GGUF (a converter process, then a cached file) would cost more than llama.cpp saves.
AUTO_LLAMACPP_MIN_PARAMS = 100_000_000
BF16_BYTES = 2


def choose_engine(engine: str, model: str, *, quantize: str | None = None, dtype: str = "auto",
                  device: str = "auto", options: VllmOptions | None = None, unsupported: str | None = None,
                  cpu_llamacpp: bool = False, keep_transformers: str | None = None, say=log.info) -> str:
    """The engine to run: `engine` itself, or for "auto" llama.cpp when `quantize` is a GGUF type, else vLLM
    when it is installed, a CUDA GPU is visible and the request is one vLLM runs as asked, else transformers.

    With `cpu_llamacpp` (the CLI's generate, chat and serve ask for it), "auto" on a CPU (`device` cpu, or auto
    with no CUDA GPU visible) takes llama.cpp when `auto_llamacpp_refusal` finds no reason against it, and says
    why it does not otherwise. `keep_transformers` is the caller's reason to stay on transformers for a request
    llama.cpp would run otherwise than asked or slower (several prompts that decode together, say).

    `unsupported` names an option of the command that only transformers has (a draft model, say). An
    explicit engine that cannot run as asked is an Olmo2KitError, never a silent switch.
    """
    if engine not in ENGINES:
        raise Olmo2KitError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")
    gguf = quantize in GGUF_TYPES
    if engine == "auto" and gguf:
        engine = "llamacpp"
        say(f"engine: llamacpp ({quantize} is a GGUF type)")
    if gguf and engine != "llamacpp":
        raise Olmo2KitError(f"--quantize {quantize} is a GGUF type, which llama.cpp runs: add --engine llamacpp, or "
                            "use int8 or nf4 (bitsandbytes) on transformers")
    if engine == "transformers":
        return engine
    if engine == "llamacpp":
        reason = (unsupported and f"llama.cpp does not take {unsupported}: drop it, or use --engine transformers"
                  or llamacpp_refusal(model, quantize=quantize, device=device))
        if not reason and options is not None:
            reason = "--tensor-parallel-size and the other vLLM engine options need --engine vllm"
        if reason:
            raise Olmo2KitError(reason)
        return engine
    reason = unsupported and f"vLLM does not take {unsupported}: drop it, or use --engine transformers"
    if engine == "vllm":
        reason = reason or vllm_refusal(model, quantize=quantize, device=device, options=options)
        if reason:
            raise Olmo2KitError(reason)
        return engine
    if cpu_llamacpp and options is None and (device == "cpu" or device == "auto" and not visible_gpus()):
        reason = auto_llamacpp_refusal(model, quantize=quantize, dtype=dtype, unsupported=unsupported,
                                       keep_transformers=keep_transformers)
        chosen = "transformers" if reason else "llamacpp"
        say(f"engine: {chosen} ({reason or 'on a CPU llama.cpp decodes faster, from a bf16 GGUF made once'})")
        return chosen
    if not reason and device == "cpu":
        reason = "--device cpu: vLLM is chosen on GPUs only unless asked for"
    if not reason and not visible_gpus():
        reason = "no CUDA GPU is visible"
    reason = reason or vllm_refusal(model, quantize=quantize, device=device, options=options)
    chosen = "transformers" if reason else "vllm"
    say(f"engine: {chosen}" + (f" ({reason.split(':')[0]})" if reason else ""))
    return chosen


def auto_llamacpp_refusal(model: str, *, quantize: str | None = None, dtype: str = "auto",
                          unsupported: str | None = None, keep_transformers: str | None = None) -> str | None:
    """Why "auto" on a CPU keeps a request on transformers rather than llama.cpp (a short reason, said on
    stderr), or None when llama.cpp runs it as asked and its speed pays for the conversion to GGUF: llama.cpp
    and its converter installed, no bitsandbytes `quantize`, no `unsupported` option, a bf16 `dtype`, no
    `keep_transformers` reason, a checkpoint (not a LoRA adapter) of at least AUTO_LLAMACPP_MIN_PARAMS
    parameters by its config, and room beside the GGUF cache for its bf16 GGUF. Reads no weights."""
    if unsupported:
        return f"llama.cpp does not take {unsupported}"
    if quantize:  # a GGUF type was taken before this: the rest are bitsandbytes'
        return f"--quantize {quantize} is bitsandbytes, which runs on transformers"
    refusal = llamacpp_refusal(model, quantize=None, device="cpu")
    if refusal:
        return refusal.split(":")[0]
    try:
        converter_dir()
    except Olmo2KitError:
        return "llama.cpp's GGUF converter is not installed (`make llamacpp`)"
    if dtype not in AUTO_LLAMACPP_DTYPES:
        return f"--dtype {dtype}: auto runs llama.cpp in bf16, the type measured faster"
    if keep_transformers:
        return keep_transformers
    try:
        ref = resolve_model(model)
    except Olmo2KitError:  # the loader says what is wrong with the name
        ref = None
    if ref and ref.local and (Path(ref.source) / "adapter_config.json").is_file():
        return f"{model} is a LoRA adapter, which llama.cpp does not load"
    if ref and not ref.local and offline_mode() and not _cached_config(ref):  # the loader says what to do
        return f"{ref} is not in the local cache, and huggingface_hub is offline"
    params = checkpoint_params(ref) if ref else None
    if params is None and ref and not ref.local:
        return (f"the size of {model} is not known without reading it: auto takes llama.cpp for OLMo 2's own "
                "repos and local checkpoints (--engine llamacpp for this one)")
    if params is None:
        return f"the size of {model} is not known from its config.json"
    if params < AUTO_LLAMACPP_MIN_PARAMS:
        return (f"{model} has {params / 1e6:.1f}M parameters: auto takes llama.cpp from "
                f"{AUTO_LLAMACPP_MIN_PARAMS // 1_000_000}M, where its speed pays for the conversion to GGUF")
    need = BF16_BYTES * params
    cache = gguf_cache_dir()
    free = shutil.disk_usage(next(p for p in (cache, *cache.parents) if p.exists())).free
    if free < need:
        return (f"its bf16 GGUF, ~{need / 1e9:.1f} GB, would not fit the {free / 1e9:.1f} GB free for the GGUF cache "
                f"{cache}: set OLMO2KIT_GGUF_CACHE, or give --engine llamacpp where it is converted already")
    return None


def checkpoint_params(ref: ModelRef) -> int | None:
    """A checkpoint's parameter count from its config alone: a local directory's config.json, the size table for an
    official OLMo 2 repo (any revision); None for another Hub repo, or a config that cannot be read or is no
    OLMo 2 config (the loader says why)."""
    known = None if ref.local else size_of(ref.source)
    if known:
        return known.params
    # Another Hub repo is not sized: its config.json would be fetched before the loader has checked the name and
    # revision (a revision the loader refuses would cost a download first).
    config_file = Path(ref.source) / "config.json" if ref.local else None
    try:
        return checkpoint_architecture(str(ref), read_config(config_file)).params if config_file else None
    except Olmo2KitError:
        return None


def _cached_config(ref: ModelRef) -> Path | None:
    """The config.json of a Hub model in the Hugging Face cache, or None (asks no one)."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(ref.source, "config.json", revision=ref.revision)
    return Path(cached) if isinstance(cached, str) else None


def load_model(model: str, *, engine: str = "transformers", revision: str | None = None, dtype: str = "auto",
               quantize: str | None = None, device: str = "auto", vllm: VllmOptions | None = None, say=log.info):
    """`(model, tokenizer)` on the engine asked for: `load`'s transformers model, `load_vllm`'s or
    `load_llamacpp`'s (`say` tells of a first conversion to GGUF).

    `engine` is "transformers" (the default), "vllm", "llamacpp" or "auto" (see `choose_engine`).

    >>> model, tokenizer = load_model("7b-instruct", engine="vllm")  # doctest: +SKIP
    """
    chosen = choose_engine(engine, model, quantize=quantize, device=device, options=vllm)
    if chosen == "vllm":
        return load_vllm(model, revision=revision, dtype=dtype, device=device, options=vllm)
    if chosen == "llamacpp":
        return load_llamacpp(model, revision=revision, dtype=dtype, quantize=quantize, device=device, say=say)
    return load(model, revision=revision, dtype=dtype, quantize=quantize, device=device)


def engine_name(engine: str) -> str:
    """How an engine is written in prose: vLLM, llama.cpp, transformers."""
    return _NAMES.get(engine, engine)


def engine_info(model) -> dict:
    """`{"engine": name, "engine_version": version}` of a loaded model, as every output records it."""
    if isinstance(model, VllmModel):
        return {"engine": "vllm", "engine_version": vllm_version()}
    if isinstance(model, LlamaCppModel):
        return {"engine": "llamacpp", "engine_version": llamacpp_version()}
    import transformers

    return {"engine": "transformers", "engine_version": transformers.__version__}
