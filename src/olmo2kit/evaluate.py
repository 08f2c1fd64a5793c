"""Evaluation of a loaded model: perplexity over text, and benchmark tasks through lm-eval.

Perplexity slides a window over the tokens, as in transformers' perplexity guide: each
window holds up to `max_length` tokens, moves on by `stride`, and scores only the tokens
the previous window did not, so every token is scored once, with at least
`max_length - stride` tokens of context once the first window is full. The text is preceded by the
tokenizer's beginning-of-text token (OLMo 2's `<|endoftext|>`) so that its first token is
scored too, as lm-eval does for rolling log-likelihoods; bits per byte then covers every byte.

Tasks run through EleutherAI's lm-evaluation-harness (`pip install 'olmo2kit[eval]'`): the
model olmo2kit loaded, quantized or not, is handed to lm-eval's HFLM as it is.
"""

from __future__ import annotations

import difflib
import functools
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from olmo2kit.errors import Olmo2KitError
from olmo2kit.loading import drop_messages


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

    `max_length` (tokens per window) defaults to the model's context, `stride` to half of
    `max_length`. Works on any dtype or quantization `olmo2kit.load` gives.

    >>> perplexity(model, tokenizer, open("wiki.txt").read()).perplexity  # doctest: +SKIP
    """
    context = model.config.max_position_embeddings
    max_length, stride = check_window(max_length, stride, context)
    single = isinstance(texts, str)
    texts = [texts] if single else list(texts)
    for i, text in enumerate(texts):
        if not text:
            raise Olmo2KitError(f"text {i + 1} is empty: there is nothing to score")
    results = [_perplexity(model, tokenizer, text, max_length, stride) for text in texts]
    return results[0] if single else results


def check_window(max_length: int | None, stride: int | None, context: int | None = None) -> tuple[int, int]:
    """(max_length, stride), the defaults filled in where the model's `context` is known.

    Olmo2KitError if either is out of range; without `context`, what can be checked is.
    """
    if max_length is None:
        max_length = context
    if max_length is not None:
        if max_length < 2:
            raise Olmo2KitError(f"--max-length must be 2 or more, not {max_length}")
        if context is not None and max_length > context:
            raise Olmo2KitError(f"--max-length must be at most the model's context ({context}), not {max_length}")
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


def _perplexity(model, tokenizer, text: str, max_length: int, stride: int) -> PerplexityResult:
    import torch
    import torch.nn.functional as F

    start = time.perf_counter()
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    # verbose=False: a text longer than the context is the point here, not something to warn about.
    encoded = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    ids = torch.tensor([[prefix, *encoded]], device=model.device)
    length = ids.shape[1]
    nll = torch.zeros((), dtype=torch.float64, device=model.device)
    windows = 0
    scored_to = 1  # position 0 is the prefix, which is context only
    with torch.inference_mode():
        for begin in range(0, length, stride):
            end = min(begin + max_length, length)
            new = end - scored_to
            # Only the logits that predict new tokens: the rest of the window is context.
            logits = model(input_ids=ids[:, begin:end], use_cache=False, logits_to_keep=new + 1).logits
            nll += F.cross_entropy(logits[0, :-1].float(), ids[0, scored_to:end], reduction="sum")
            windows += 1
            scored_to = end
            if end == length:
                break
    total = nll.item()
    tokens = length - 1
    elapsed = time.perf_counter() - start
    n_bytes = len(text.encode("utf-8"))
    return PerplexityResult(
        perplexity=math.exp(total / tokens), bits_per_byte=total / math.log(2) / n_bytes, nll=total,
        tokens=tokens, bytes=n_bytes, windows=windows, elapsed_s=elapsed, tokens_per_s=tokens / elapsed,
    )


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


@dataclass
class TaskScore:
    """One metric of one lm-eval task, as lm-eval reports it."""

    task: str
    metric: str  # e.g. acc, acc_norm, exact_match
    filter: str  # lm-eval's answer filter: "none", or e.g. "strict-match" for GSM8K
    value: float
    stderr: float | None  # None where lm-eval could not bootstrap one
    samples: int | None  # documents evaluated

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_tasks(
    model,
    tokenizer,
    tasks: str | Sequence[str],
    *,
    limit: int | None = None,
    num_fewshot: int | None = None,
    include_path: str | Path | None = None,
    batch_size: int = 1,
    chat_template: bool = False,
) -> list[TaskScore]:
    """Run lm-eval tasks (names as `lm-eval ls tasks` lists them) on a loaded model.

    `limit` evaluates the first N documents of each task, `num_fewshot` overrides the
    task's few-shot count, `include_path` adds a directory of your own task YAML files,
    `chat_template` formats prompts with the tokenizer's chat template (instruct models).
    Groups (e.g. mmlu) give a row per subtask and one for the group.

    >>> evaluate_tasks(model, tokenizer, "arc_easy", limit=100)[0].value  # doctest: +SKIP
    """
    names = parse_tasks(tasks)
    check_task_options(limit, num_fewshot, batch_size)
    if chat_template and not tokenizer.chat_template:
        raise Olmo2KitError(
            f"--chat-template: {model.name_or_path} has no chat template; use an instruct model (e.g. 1b-instruct)"
        )
    task_manager = check_tasks(names, include_path)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    _quiet_lm_eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    output = lm_eval.simple_evaluate(
        model=lm, tasks=names, task_manager=task_manager, limit=limit, num_fewshot=num_fewshot,
        apply_chat_template=chat_template, log_samples=False,
    )
    return _scores(output)


def check_task_options(limit: int | None, num_fewshot: int | None, batch_size: int) -> None:
    """Olmo2KitError unless the counts are in range: a bad one fails before any model loads."""
    if limit is not None and limit < 1:
        raise Olmo2KitError(f"--limit must be 1 or more, not {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise Olmo2KitError(f"--num-fewshot must be 0 or more, not {num_fewshot}")
    if batch_size < 1:
        raise Olmo2KitError(f"--batch-size must be 1 or more, not {batch_size}")


def _scores(output: dict) -> list[TaskScore]:
    samples = {task: counts.get("effective") for task, counts in output.get("n-samples", {}).items()}
    scores = []
    for task, row in output["results"].items():
        for key, value in row.items():
            metric, sep, answer_filter = key.partition(",")
            if not sep or metric.endswith("_stderr") or not isinstance(value, int | float):
                continue  # alias, name, sample_len and the stderr entries read below
            stderr = row.get(f"{metric}_stderr,{answer_filter}")
            scores.append(TaskScore(
                task=task, metric=metric, filter=answer_filter, value=float(value),
                stderr=float(stderr) if isinstance(stderr, int | float) else None, samples=samples.get(task),
            ))
    return scores


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """Task names from "a,b" strings or a list of them, in order, each once."""
    given = [tasks] if isinstance(tasks, str) else list(tasks)
    names = [name.strip() for entry in given for name in entry.split(",") if name.strip()]
    if not names:
        raise Olmo2KitError("no tasks given: name lm-eval tasks, e.g. --tasks arc_easy,hellaswag")
    return list(dict.fromkeys(names))


def check_tasks(tasks: Sequence[str], include_path: str | Path | None = None):
    """The lm-eval TaskManager that knows every task in `tasks`; Olmo2KitError if one is unknown.

    Cheap enough to call before a model loads: lm-eval indexes its task YAML files, it does
    not download their data.
    """
    if include_path is not None and not Path(include_path).is_dir():
        raise Olmo2KitError(f"--include-path {include_path} is not a directory of lm-eval task YAML files")
    return _task_manager(tuple(tasks), None if include_path is None else str(Path(include_path).resolve()))


@functools.cache
def _task_manager(tasks: tuple[str, ...], include_path: str | None):
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise Olmo2KitError("evaluating tasks needs lm-eval: pip install 'olmo2kit[eval]'") from None
    if include_path is not None:
        # lm-eval's own index takes seconds to build: skip it when the local tasks are all that is asked for.
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(name in local.all_tasks for name in tasks):
            return local
    manager = TaskManager(include_path=include_path)
    for name in tasks:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.75)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise Olmo2KitError(
                f"no lm-eval task {name!r}: {hint}(`lm-eval ls tasks` lists them; "
                "--include-path DIR adds your own task YAML files)"
            )
    return manager


def _quiet_lm_eval() -> None:
    """Drop lm-eval's warnings about being handed a loaded model: olmo2kit does that on purpose."""
    drop_messages("lm_eval.models.huggingface", "`pretrained` model kwarg is not of type `str`",
                  "Passed an already-initialized")
