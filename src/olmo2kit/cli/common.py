"""Steps most commands take: load a model with its load time on stderr, check sampling options early.

This module imports no command module; torch and transformers load inside the functions.
"""

from __future__ import annotations

import time

from olmo2kit.cli.output import info
from olmo2kit.inference.sampling import DEFAULTS, SamplingOptions


def load_model(model: str, revision: str | None, dtype: str, quantize: str | None, device: str):
    """Load through the library, with the load time on stderr and transformers' bars off."""
    from olmo2kit.compat import quiet_transformers
    from olmo2kit.model.loading import load

    quiet_transformers()
    start = time.perf_counter()
    loaded, tokenizer = load(model, revision=revision, dtype=dtype, quantize=quantize, device=device)
    where = f"{loaded.dtype}".removeprefix("torch.") + (f", {quantize}" if quantize else "")
    info(f"loaded {loaded.name_or_path} ({where}, {loaded.device}) in {time.perf_counter() - start:.1f} s")
    return loaded, tokenizer


def sampling_options(max_new_tokens: int, temperature: float, top_k: int, top_p: float, greedy: bool,
                     seed: int | None, stop=(), *, min_p: float = DEFAULTS.min_p,
                     repetition_penalty: float = DEFAULTS.repetition_penalty) -> dict:
    """The sampling options as generate takes them, checked before a model loads."""
    options = dict(max_new_tokens=max_new_tokens, do_sample=not greedy, temperature=temperature, top_k=top_k,
                   top_p=top_p, seed=seed, stop=tuple(stop), min_p=min_p, repetition_penalty=repetition_penalty)
    SamplingOptions(**options)
    return options
