"""Steps most commands take: load a model with its load time on stderr, check sampling options early.

This module imports no command module; torch and transformers load inside the functions.
"""

from __future__ import annotations

import time

from olmo2kit.cli.output import info
from olmo2kit.errors import Olmo2KitError
from olmo2kit.inference.sampling import DEFAULTS, SamplingOptions


def load_model(model: str, revision: str | None, dtype: str, quantize: str | None, device: str, *,
               engine: str = "transformers", vllm=None, unsupported: str | None = None, start: bool = True,
               batched: bool = False, cpu_llamacpp: bool = False, keep_transformers: str | None = None):
    """Load through the library on the engine asked for, with the load time on stderr and transformers' bars off.

    `engine` "auto" says on stderr which engine it took and why, once the model has loaded (an error about the
    input before that stays one line). `vllm` is the `VllmOptions`; `unsupported`
    names an option of the command that vLLM does not take; `cpu_llamacpp` and `keep_transformers` are
    `choose_engine`'s (auto may take llama.cpp on a CPU). A vLLM model starts its engine here unless
    `start` is False (lm-evaluation-harness starts its own); a llama.cpp model loads its GGUF here: as the
    weights of `Decoder` contexts for a command that runs through them (`batched`: serve, perplexity, eval, sweep),
    else as the one-sequence `Llama` that generate and chat run.
    """
    from olmo2kit.compat import quiet_transformers
    from olmo2kit.model.engines import load_model as load_on

    quiet_transformers()
    chosen, note = pick_engine(engine, model, quantize, device, vllm, unsupported, dtype=dtype,
                               cpu_llamacpp=cpu_llamacpp, keep_transformers=keep_transformers)
    start_time = time.perf_counter()
    loaded, tokenizer = load_on(model, engine=chosen, revision=revision, dtype=dtype, quantize=quantize,
                                device=device, vllm=vllm, say=info)
    if chosen == "vllm" and start:
        loaded.llm  # noqa: B018  (starts vLLM's engine processes, timed with the load)
    if chosen == "llamacpp" and start:
        # Loads the GGUF into llama.cpp now, so that a file it cannot load fails here, once (and only the one way
        # the command runs it: each holds the weights and a key/value cache).
        loaded.weights if batched else loaded.llama  # noqa: B018
    where = f"{loaded.dtype}".removeprefix("torch.") + (f", {quantize}" if quantize else "")
    if chosen == "llamacpp":
        where = f"GGUF {loaded.dtype}"
    elif dtype == "auto" and str(loaded.device) == "cpu" and not quantize:  # the CPU default depends on the CPU
        where += (": auto, this CPU has native bf16 (--dtype fp32 for fp32)" if "bfloat16" in where
                  else ": auto, this CPU has no native bf16")
    on = f", {chosen}" if chosen != "transformers" else ""
    info(f"loaded {loaded.name_or_path} ({where}, {loaded.device}{on}) in {time.perf_counter() - start_time:.1f} s")
    if note:
        info(note)
    return loaded, tokenizer


def pick_engine(engine: str, model: str, quantize: str | None, device: str, vllm,
                unsupported: str | None = None, *, dtype: str = "auto", cpu_llamacpp: bool = False,
                keep_transformers: str | None = None) -> tuple[str, str | None]:
    """The engine to run, and for "auto" the line that says which and why (None otherwise), for the caller to
    say once the model has loaded; vLLM options given for transformers are an error."""
    from olmo2kit.model.engines import choose_engine

    said = []
    chosen = choose_engine(engine, model, quantize=quantize, dtype=dtype, device=device, options=vllm,
                           unsupported=unsupported, cpu_llamacpp=cpu_llamacpp, keep_transformers=keep_transformers,
                           say=said.append)
    if vllm is not None and chosen != "vllm":
        raise Olmo2KitError("--tensor-parallel-size and the other vLLM engine options need the vLLM engine, "
                            "and the engine is transformers: give --engine vllm")
    return chosen, (said[0] if said else None)


def keep_sampling_on_transformers(options: dict) -> str | None:
    """Why auto keeps generate's or chat's sampling on transformers though llama.cpp would run it: a repetition
    penalty, which llama.cpp's own sampling applies to the last 64 tokens only (inference.engines.LlamaCppEngine)."""
    if options["repetition_penalty"] != DEFAULTS.repetition_penalty:
        return "--repetition-penalty: llama.cpp's looks back 64 tokens, transformers' at the whole text"
    return None


def vllm_options(tensor_parallel_size: int, pipeline_parallel_size: int, data_parallel_size: int,
                 gpu_memory_utilization: float, max_model_len: int | None, enforce_eager: bool, engine: str):
    """The `VllmOptions` the vLLM options ask for, checked before a model loads (None: all at their defaults)."""
    from olmo2kit.model.vllm import VllmOptions

    options = VllmOptions(tensor_parallel_size, pipeline_parallel_size, data_parallel_size, gpu_memory_utilization,
                          max_model_len, enforce_eager)
    if options == VllmOptions():
        return None
    if engine == "transformers":
        raise Olmo2KitError("--tensor-parallel-size and the other vLLM engine options need --engine vllm (or auto)")
    return options


def sampling_options(max_new_tokens: int, temperature: float, top_k: int, top_p: float, greedy: bool,
                     seed: int | None, stop=(), *, min_p: float = DEFAULTS.min_p,
                     repetition_penalty: float = DEFAULTS.repetition_penalty) -> dict:
    """The sampling options as generate takes them, checked before a model loads."""
    options = dict(max_new_tokens=max_new_tokens, do_sample=not greedy, temperature=temperature, top_k=top_k,
                   top_p=top_p, seed=seed, stop=tuple(stop), min_p=min_p, repetition_penalty=repetition_penalty)
    SamplingOptions(**options)
    return options
