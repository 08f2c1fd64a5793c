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
    "SIZES": "olmo2kit.model.sizes",
    "hf_config": "olmo2kit.model.sizes",
    "weight_bytes": "olmo2kit.model.sizes",
    "load": "olmo2kit.model.loading",
    "resolve_model": "olmo2kit.model.loading",
    "load_model": "olmo2kit.model.engines",
    "VllmOptions": "olmo2kit.model.vllm",
    "build_tiny": "olmo2kit.model.tiny",
    "export_gguf": "olmo2kit.model.gguf",
    "export_ollama": "olmo2kit.model.gguf",
    "export_olmo_core": "olmo2kit.model.olmo_core",
    "import_olmo_core": "olmo2kit.model.olmo_core",
    "soup": "olmo2kit.model.soup",
    "Revision": "olmo2kit.model.revisions",
    "parse_revision": "olmo2kit.model.revisions",
    "list_revisions": "olmo2kit.model.revisions",
    "nearest_revision": "olmo2kit.model.revisions",
    "render_chat": "olmo2kit.model.chat_template",
    "generate": "olmo2kit.inference.generation",
    "stream_generate": "olmo2kit.inference.generation",
    "Generation": "olmo2kit.inference.generation",
    "ChatSession": "olmo2kit.inference.chat",
    "run_job": "olmo2kit.inference.jobs",
    "perplexity": "olmo2kit.evals.perplexity",
    "PerplexityResult": "olmo2kit.evals.perplexity",
    "evaluate_tasks": "olmo2kit.evals.tasks",
    "published_scores": "olmo2kit.evals.scores",
    "Sweep": "olmo2kit.evals.sweep",
    "estimate": "olmo2kit.evals.estimate",
    "prepare_data": "olmo2kit.training.data",
    "load_prepared": "olmo2kit.training.data",
    "PreparedData": "olmo2kit.training.data",
    "load_preference": "olmo2kit.training.data",
    "PreferenceData": "olmo2kit.training.data",
    "FinetuneConfig": "olmo2kit.training.finetune",
    "FinetuneResult": "olmo2kit.training.finetune",
    "finetune": "olmo2kit.training.finetune",
    "create_app": "olmo2kit.server.app",
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
