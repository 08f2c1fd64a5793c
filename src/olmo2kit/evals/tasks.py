"""Benchmark tasks through EleutherAI's lm-evaluation-harness (`pip install 'olmo2kit[eval]'`).

The model olmo2kit loaded, quantized or not, is handed to lm-eval's HFLM as it is; a model loaded for vLLM
(`olmo2kit.model.vllm`) is handed, as its directory and engine arguments, to lm-eval's own vLLM class, which
starts vLLM itself; a model llama.cpp runs is scored through olmo2kit's llama.cpp engine (`llamacpp_harness`).
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from olmo2kit.compat import drop_messages, offline_mode
from olmo2kit.errors import Olmo2KitError
from olmo2kit.inference.engines import engine_for
from olmo2kit.model.llamacpp import LlamaCppModel
from olmo2kit.model.vllm import VllmModel, prepare_vllm


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

    _quiet_lm_eval()
    lm = _harness_model(model, tokenizer, batch_size)
    try:
        output = lm_eval.simple_evaluate(
            model=lm, tasks=names, task_manager=task_manager, limit=limit, num_fewshot=num_fewshot,
            apply_chat_template=chat_template, log_samples=False,
        )
    except ConnectionError as e:  # datasets' word for a dataset it could not fetch from the Hub
        why = "HF_HUB_OFFLINE is set" if offline_mode() else "no network"
        raise Olmo2KitError(
            f"{', '.join(names)}: an lm-eval task needs its dataset, which cannot be downloaded ({why}: {e}); "
            "tasks from --include-path with local data run offline"
        ) from None
    except ValueError as e:
        if "Sample larger than population" not in str(e):  # random.sample, drawing the few-shot examples
            raise
        asked = "the task's own few-shot count" if num_fewshot is None else f"--num-fewshot {num_fewshot}"
        raise Olmo2KitError(
            f"{asked} is more examples than {', '.join(names)} has to draw them from: give a smaller --num-fewshot"
        ) from None
    return _scores(output)


def _harness_model(model, tokenizer, batch_size: int):
    """lm-eval's model class over `model`: HFLM for a transformers model, VLLM for a vLLM one, and olmo2kit's
    `LlamaCppLM` over the llama.cpp engine (which reads as many requests together as its cache holds, whatever
    `batch_size`)."""
    if isinstance(model, LlamaCppModel):
        from olmo2kit.evals.llamacpp_harness import LlamaCppLM

        return LlamaCppLM(engine_for(model, tokenizer))
    if not isinstance(model, VllmModel):
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    prepare_vllm(model.device)  # before lm-eval's module asks for vLLM's version
    from lm_eval.models.vllm_causallms import VLLM

    args = model.llm_args()
    try:
        return VLLM(pretrained=args.pop("model"), batch_size=batch_size, **args)
    except (ValueError, RuntimeError, NotImplementedError, ModuleNotFoundError) as e:
        raise Olmo2KitError(f"lm-eval's vLLM model cannot run {model.name_or_path}: {e}") from None


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
