"""olmo2kit: load, run, inspect and fine-tune the OLMo 2 language models.

    >>> import olmo2kit
    >>> model, tokenizer = olmo2kit.load("1b")                      # doctest: +SKIP
    >>> olmo2kit.generate(model, tokenizer, "Language modeling is ").text  # doctest: +SKIP

Names resolve on first use, so `import olmo2kit` stays light (no torch until needed).
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "Olmo2KitError": "olmo2kit.errors",
    "SIZES": "olmo2kit.sizes",
    "hf_config": "olmo2kit.sizes",
    "weight_bytes": "olmo2kit.sizes",
    "load": "olmo2kit.loading",
    "resolve_model": "olmo2kit.loading",
    "generate": "olmo2kit.generation",
    "stream_generate": "olmo2kit.generation",
    "Generation": "olmo2kit.generation",
    "build_tiny": "olmo2kit.tiny",
    "Revision": "olmo2kit.revisions",
    "parse_revision": "olmo2kit.revisions",
    "list_revisions": "olmo2kit.revisions",
    "nearest_revision": "olmo2kit.revisions",
    "ChatSession": "olmo2kit.chat",
    "render_chat": "olmo2kit.chat",
    "run_job": "olmo2kit.jobs",
    "perplexity": "olmo2kit.evaluate",
    "PerplexityResult": "olmo2kit.evaluate",
    "evaluate_tasks": "olmo2kit.evaluate",
    "published_scores": "olmo2kit.scores",
    "Sweep": "olmo2kit.sweep",
    "estimate": "olmo2kit.bench",
    "prepare_data": "olmo2kit.data",
    "load_prepared": "olmo2kit.data",
    "PreparedData": "olmo2kit.data",
    "FinetuneConfig": "olmo2kit.finetune",
    "FinetuneResult": "olmo2kit.finetune",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'olmo2kit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
