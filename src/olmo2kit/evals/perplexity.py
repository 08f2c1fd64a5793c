"""Perplexity of a loaded model over text.

Perplexity slides a window over the tokens, as in transformers' perplexity guide: each
window holds up to `max_length` tokens, moves on by `stride`, and scores only the tokens
the previous window did not, so every token is scored once, with at least
`max_length - stride` tokens of context once the first window is full. The text is preceded by the
tokenizer's beginning-of-text token (OLMo 2's `<|endoftext|>`) so that its first token is
scored too, as lm-eval does for rolling log-likelihoods; bits per byte then covers every byte.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from olmo2kit.errors import Olmo2KitError
from olmo2kit.files import read_stdin
from olmo2kit.inference.engines import engine_for
from olmo2kit.model.sizes import CONTEXT_LENGTH


@dataclass
class PerplexityResult:
    """Perplexity of one text (or, from `combine_perplexities`, of several pooled)."""

    perplexity: float  # exp(nll / tokens)
    bits_per_byte: float  # nll / ln 2 / bytes
    nll: float  # summed over the scored tokens, in nats
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes of the text
    windows: int  # forward passes
    elapsed_s: float
    tokens_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def perplexity(
    model,
    tokenizer,
    texts: str | Sequence[str],
    *,
    max_length: int | None = None,
    stride: int | None = None,
) -> PerplexityResult | list[PerplexityResult]:
    """Token-level perplexity and bits per byte of a text, or of each of a list of texts.

    `max_length` (tokens per window) defaults to the model's context (4096 tokens for a model that
    gives none; on vLLM one less, see `Engine.scoring_context`), `stride` to half of `max_length`. Works on
    any dtype or quantization `olmo2kit.load` gives, on every engine.

    >>> perplexity(model, tokenizer, open("wiki.txt").read()).perplexity  # doctest: +SKIP
    """
    engine = engine_for(model, tokenizer)
    context = engine.scoring_context
    if max_length is None and context is None:
        max_length = CONTEXT_LENGTH  # a model that gives no context: windows of OLMo 2's
    limit = "the model's context" if context == engine.context_length else \
        f"the model's context ({engine.context_length}) less the token {engine.name} generates to score a window"
    max_length, stride = check_window(max_length, stride, context, limit)
    single = isinstance(texts, str)
    texts = [texts] if single else list(texts)
    for i, text in enumerate(texts):
        if not text:
            raise Olmo2KitError(f"text {i + 1} is empty: there is nothing to score")
    results = [_perplexity(engine, text, max_length, stride) for text in texts]
    return results[0] if single else results


def check_window(max_length: int | None, stride: int | None, context: int | None = None,
                 limit: str = "the model's context") -> tuple[int, int]:
    """(max_length, stride), the defaults filled in where the model's `context` is known.

    Olmo2KitError if either is out of range; without `context`, what can be checked is.
    """
    if max_length is None:
        max_length = context
    if max_length is not None:
        if max_length < 2:
            raise Olmo2KitError(f"--max-length must be 2 or more, not {max_length}")
        if context is not None and max_length > context:
            raise Olmo2KitError(f"--max-length must be at most {context}, {limit}, not {max_length}")
        if stride is None:
            stride = max_length // 2
    if stride is not None and stride < 1:
        raise Olmo2KitError(f"--stride must be 1 or more, not {stride}")
    if stride is not None and max_length is not None and stride >= max_length:
        raise Olmo2KitError(
            f"--stride must be less than --max-length ({max_length}), not {stride}: "
            "each window needs a token of context before the first one it scores"
        )
    return max_length, stride


def _perplexity(engine, text: str, max_length: int, stride: int) -> PerplexityResult:
    start = time.perf_counter()
    tokenizer = engine.tokenizer
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    # verbose=False: a text longer than the context is the point here, not something to warn about.
    ids = [prefix, *tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]]
    windows = _windows(len(ids), max_length, stride)
    nlls = engine.scored_nll([(ids[begin:end], context) for begin, end, context in windows])
    total = math.fsum(nlls)
    tokens = len(ids) - 1
    elapsed = time.perf_counter() - start
    n_bytes = len(text.encode("utf-8"))
    return PerplexityResult(
        perplexity=math.exp(total / tokens), bits_per_byte=total / math.log(2) / n_bytes, nll=total,
        tokens=tokens, bytes=n_bytes, windows=len(windows), elapsed_s=elapsed, tokens_per_s=tokens / elapsed,
    )


def _windows(length: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, context) of each window over `length` tokens: it reads tokens begin to end and scores the
    last end - begin - context of them, those the window before did not (position 0, the prefix, is context)."""
    windows = []
    scored_to = 1
    for begin in range(0, length, stride):
        end = min(begin + max_length, length)
        windows.append((begin, end, scored_to - begin))
        scored_to = end
        if end == length:
            break
    return windows


def combine_perplexities(results: Sequence[PerplexityResult]) -> PerplexityResult:
    """The pooled perplexity of several texts: their summed NLL over their summed tokens and bytes."""
    nll = sum(r.nll for r in results)
    tokens = sum(r.tokens for r in results)
    n_bytes = sum(r.bytes for r in results)
    elapsed = sum(r.elapsed_s for r in results)
    return PerplexityResult(
        perplexity=math.exp(nll / tokens), bits_per_byte=nll / math.log(2) / n_bytes, nll=nll, tokens=tokens,
        bytes=n_bytes, windows=sum(r.windows for r in results), elapsed_s=elapsed, tokens_per_s=tokens / elapsed,
    )


def read_text(path: str | os.PathLike) -> str:
    """A text file's contents; `-` reads stdin. Olmo2KitError if it is missing, empty or not UTF-8."""
    if str(path) == "-":
        text = read_stdin()
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise Olmo2KitError(f"no such file: {path}") from None
        except IsADirectoryError:
            raise Olmo2KitError(f"{path} is a directory: pass text files") from None
        except UnicodeDecodeError as e:
            raise Olmo2KitError(f"{path} is not UTF-8 text (byte {e.start}): convert it first") from None
        except OSError as e:
            raise Olmo2KitError(f"cannot read {path}: {e.strerror}") from None
    if not text.strip():
        raise Olmo2KitError(f"{path} is empty: there is nothing to measure")
    return text
