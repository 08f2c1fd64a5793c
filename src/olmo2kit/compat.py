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


def quiet_transformers() -> None:
    """No download or loading bars from transformers, no warnings about transformers APIs that peft, not
    the user, calls, and no load report table: olmo2kit reports missing or unexpected weights as one error."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    drop_messages("transformers.modeling_utils", "\x1b[1mOlmo2ForCausalLM LOAD REPORT", "Olmo2ForCausalLM LOAD REPORT")
    warnings.filterwarnings("ignore", message=".* is deprecated and will be removed in v6", category=FutureWarning)
