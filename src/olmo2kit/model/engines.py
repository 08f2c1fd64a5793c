"""Which engine holds the weights: the one seam every command loads through.

transformers is the default engine. vLLM (`olmo2kit.model.vllm`) is chosen with `engine="vllm"`, or by
`engine="auto"` where it is installed, a CUDA GPU is visible and the request is one vLLM runs as asked.
llama.cpp (`olmo2kit.model.llamacpp`), for CPU speed, is chosen with `engine="llamacpp"`, or by "auto" when
`quantize` names a GGUF type (q8_0, q4_k_m, ...), which only llama.cpp runs.

    >>> model, tokenizer = load_model("1b-instruct", engine="llamacpp", quantize="q8_0")  # doctest: +SKIP
"""

from __future__ import annotations

import logging

from olmo2kit.errors import Olmo2KitError
from olmo2kit.model.gguf import GGUF_TYPES
from olmo2kit.model.llamacpp import LlamaCppModel, llamacpp_refusal, llamacpp_version, load_llamacpp
from olmo2kit.model.loading import load
from olmo2kit.model.vllm import VllmModel, VllmOptions, load_vllm, visible_gpus, vllm_refusal, vllm_version

log = logging.getLogger("olmo2kit")

ENGINES = ("auto", "transformers", "vllm", "llamacpp")
_NAMES = {"vllm": "vLLM", "llamacpp": "llama.cpp"}


def choose_engine(engine: str, model: str, *, quantize: str | None = None, device: str = "auto",
                  options: VllmOptions | None = None, unsupported: str | None = None, say=log.info) -> str:
    """The engine to run: `engine` itself, or for "auto" llama.cpp when `quantize` is a GGUF type, else vLLM
    when it is installed, a CUDA GPU is visible and the request is one vLLM runs as asked, else transformers.

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
    if not reason and device == "cpu":
        reason = "--device cpu: vLLM is chosen on GPUs only unless asked for"
    if not reason and not visible_gpus():
        reason = "no CUDA GPU is visible"
    reason = reason or vllm_refusal(model, quantize=quantize, device=device, options=options)
    chosen = "transformers" if reason else "vllm"
    say(f"engine: {chosen}" + (f" ({reason.split(':')[0]})" if reason else ""))
    return chosen


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
