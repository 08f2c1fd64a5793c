"""Batch generation jobs: prompts from a JSONL file, results appended to another, resumable.

Input, one JSON object a line (blank lines are skipped):

    {"id": "q1", "prompt": "Language modeling is "}
    {"id": "q2", "messages": [{"role": "user", "content": "Hi!"}], "temperature": 0.7, "max_new_tokens": 50}

A line may set its own sampling options (max_new_tokens, do_sample, temperature, top_k, top_p,
seed, stop) over the job's; other keys are carried through to the output untouched. An id is a
string or an integer; a line without one gets its line number (from 1).

Output, one JSON object a line, in input order: the id, the model and revision, the input line
(less its id), the sampling options used, and the `Generation` fields (text, token_ids,
prompt_tokens, new_tokens, finish_reason, tokens_per_s, elapsed_s, prompt_tps, peak_memory_gb;
the speeds are those of the batched call that made the line).

Running a job again with the same output skips the ids already there, so a job stopped at any
point, even by SIGKILL, ends with every id exactly once. Lines are appended whole and synced to
disk a batch at a time; a last line cut short by a kill is dropped when the job resumes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from olmo2kit.errors import Olmo2KitError
from olmo2kit.files import JsonlStore
from olmo2kit.inference.generation import Generation, generate
from olmo2kit.inference.sampling import SamplingOptions, normalize_options
from olmo2kit.model.chat_template import check_messages, user_messages

log = logging.getLogger("olmo2kit")

OPTION_KEYS = tuple(SamplingOptions.__dataclass_fields__)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_OPTION_TYPES: dict[str, Callable[[object], bool]] = {
    "max_new_tokens": _is_int,
    "top_k": _is_int,
    "seed": lambda v: v is None or _is_int(v),
    "temperature": lambda v: _is_int(v) or isinstance(v, float),
    "top_p": lambda v: _is_int(v) or isinstance(v, float),
    "do_sample": lambda v: isinstance(v, bool),
    "stop": lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v)),
}


@dataclass(frozen=True)
class JobItem:
    """One valid input line: what to generate and with which options."""

    line: int  # in the input file, from 1
    id: str | int
    input: dict  # the line as read, less its id
    request: str | list[dict]  # a prompt, or a conversation
    sampling: SamplingOptions


@dataclass
class JobSummary:
    total: int  # valid input lines
    already_done: int  # of those, found in the output and skipped
    written: int  # results appended by this run
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, problem): malformed or failed lines


def read_job(
    path: str | os.PathLike,
    *,
    chat: bool = False,
    system: str | None = None,
    strict: bool = False,
    on_warning: Callable[[str], None] | None = None,
    skipped: list[tuple[int, str]] | None = None,
    **options,
) -> list[JobItem]:
    """The valid lines of a job file, with `options` under each line's own sampling options.

    With `chat`, a prompt line becomes a user message; `system` is added to conversations that
    have no system message. A malformed line is reported through `on_warning` with its line
    number and skipped (and added to `skipped`), or with `strict` raises an Olmo2KitError.
    """
    path = _check_input(path)
    warn = on_warning or log.warning
    items: list[JobItem] = []
    seen: dict[str, int] = {}
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                item = _parse_line(number, raw, options, chat=chat, system=system)
                key = id_key(item.id)
                if key in seen:
                    raise Olmo2KitError(f"id {item.id!r} is already used on line {seen[key]}")
            except Olmo2KitError as e:
                if strict:
                    raise Olmo2KitError(f"line {number} of {path}: {e}") from None
                warn(f"line {number} of {path}: {e}; skipped")
                if skipped is not None:
                    skipped.append((number, str(e)))
                continue
            seen[key] = number
            items.append(item)
    return items


def run_job(
    model,
    tokenizer,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    batch_size: int = 8,
    chat: bool = False,
    system: str | None = None,
    strict: bool = False,
    model_name: str | None = None,
    revision: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
    **options,
) -> JobSummary:
    """Generate for every line of `input_path` whose id is not yet in `output_path`, appending results in order.

    `options` are the job's sampling options (as for `generate`); `batch_size` prompts go to
    the model at once. `progress(done, total)` is called as batches finish; `model_name` and
    `revision` are recorded on each line (default: the model's name_or_path).

    >>> run_job(model, tokenizer, "prompts.jsonl", "results.jsonl", do_sample=False)  # doctest: +SKIP
    """
    import torch

    input_path, output_path = check_job(input_path, output_path, batch_size, **options)
    warn = on_warning or log.warning
    model_name = model_name or model.name_or_path
    skipped: list[tuple[int, str]] = []
    items = read_job(
        input_path, chat=chat, system=system, strict=strict, on_warning=warn, skipped=skipped, **options
    )
    store = _results_store(output_path)
    done = _finished_ids(store, model_name, revision, warn)
    pending = [item for item in items if id_key(item.id) not in done]
    summary = JobSummary(total=len(items), already_done=len(items) - len(pending), written=0, skipped=skipped)
    if progress:
        progress(0, len(pending))

    def fail(item: JobItem, error: Olmo2KitError) -> None:
        if strict:
            raise Olmo2KitError(f"line {item.line} of {input_path}: {error}") from None
        warn(f"line {item.line} of {input_path}: {error}; skipped")
        skipped.append((item.line, str(error)))

    for start in range(0, len(pending), batch_size):
        batch = pending[start : start + batch_size]
        try:
            results = _generate_batch(model, tokenizer, batch, fail)
        except torch.OutOfMemoryError:
            raise Olmo2KitError(
                f"out of memory with batches of {batch_size}: rerun with a smaller --batch-size "
                "(the job resumes where it stopped)"
            ) from None
        records = [_record(item, results[item.line], model_name, revision) for item in batch if item.line in results]
        store.append(records)
        summary.written += len(records)
        if progress:
            progress(start + len(batch), len(pending))
    return summary


def check_job(input_path: str | os.PathLike, output_path: str | os.PathLike, batch_size: int,
              **options) -> tuple[Path, Path]:
    """The job's two paths, after checking what can be checked before a model loads: the input file is
    there, the output can be written, the batch size and the job's sampling options are valid."""
    if batch_size < 1:
        raise Olmo2KitError(f"--batch-size must be at least 1, got {batch_size}")
    SamplingOptions(**normalize_options(options))  # bad job options fail before any line is read
    input_path, output_path = _check_input(input_path), Path(output_path).expanduser()
    if output_path.exists() and output_path.samefile(input_path):
        raise Olmo2KitError("the output file is the input file: give another --output")
    if not output_path.parent.is_dir():
        raise Olmo2KitError(f"cannot write {output_path}: there is no directory {output_path.parent}")
    if output_path.is_dir():
        raise Olmo2KitError(f"cannot write {output_path}: it is a directory; give a file name")
    return input_path, output_path


def _check_input(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise Olmo2KitError(f"no such input file: {path} (one JSON object a line, with a prompt or messages)")
    return path


def id_key(value: str | int) -> str:
    """How ids compare: as JSON, so 1 and "1" are two ids."""
    return json.dumps(value)


def _parse_line(number: int, raw: bytes, defaults: dict, *, chat: bool, system: str | None) -> JobItem:
    try:
        line = json.loads(raw)
    except UnicodeDecodeError:
        raise Olmo2KitError("not UTF-8 text") from None
    except ValueError as e:
        raise Olmo2KitError(f"not JSON ({e})") from None
    if not isinstance(line, dict):
        raise Olmo2KitError('not a JSON object: write {"id": ..., "prompt": ...}')
    item_id = line.get("id", number)
    if isinstance(item_id, bool) or not isinstance(item_id, str | int) or item_id == "":
        raise Olmo2KitError(f"the id must be a string or an integer, got {item_id!r}")
    has_prompt, has_messages = "prompt" in line, "messages" in line
    if has_prompt == has_messages:
        raise Olmo2KitError('give either "prompt" or "messages"' + (", not both" if has_prompt else ""))
    if has_prompt:
        prompt = line["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise Olmo2KitError('"prompt" must be a string with some text')
        request = user_messages(prompt, system) if chat else prompt
    else:
        request = check_messages(line["messages"])
        if system and request[0]["role"] != "system":
            request = [{"role": "system", "content": system}, *request]
    own = {k: line[k] for k in OPTION_KEYS if k in line}
    for key, value in own.items():
        if not _OPTION_TYPES[key](value):
            raise Olmo2KitError(f"{key} has the wrong type: {value!r}")
    sampling = SamplingOptions(**normalize_options({**defaults, **own}))
    return JobItem(number, item_id, {k: v for k, v in line.items() if k != "id"}, request, sampling)


def _results_store(path: Path) -> JsonlStore:
    return JsonlStore(path, what="result line, so the job cannot resume into it",
                      hint="give another --output", is_record=lambda row: "id" in row)


def _finished_ids(store: JsonlStore, model_name: str, revision: str | None, warn: Callable[[str], None]) -> set[str]:
    """The ids already in the results; a torn last line (a write cut short) is cut off the file."""
    records = store.read()
    for record in records:
        if (record.get("model"), record.get("revision")) != (model_name, revision):
            raise Olmo2KitError(
                f"{store.path} holds results from {_label(record.get('model'), record.get('revision'))}, and this "
                f"job runs {_label(model_name, revision)}: give another --output, or the same model to resume"
            )
    if store.repair():
        warn(f"{store.path}: dropping an incomplete last line (the run that wrote it was cut short)")
    return {id_key(record["id"]) for record in records}


def _generate_batch(model, tokenizer, batch: list[JobItem], fail) -> dict[int, Generation]:
    """Generations for a batch, by line number; lines that share kind and options share a call."""
    groups: dict[tuple[str, SamplingOptions], list[JobItem]] = {}
    for item in batch:
        groups.setdefault(("prompt" if isinstance(item.request, str) else "messages", item.sampling), []).append(item)
    results: dict[int, Generation] = {}
    for (kind, sampling), group in groups.items():
        for item, generation in _generate_group(model, tokenizer, group, kind, asdict(sampling), fail):
            results[item.line] = generation
    return results


def _generate_group(model, tokenizer, group: list[JobItem], kind: str, options: dict, fail):
    try:
        made = generate(model, tokenizer, **{kind: [item.request for item in group]}, **options)
    except Olmo2KitError as error:
        if len(group) == 1:
            fail(group[0], error)
            return []
        # One line is at fault (too long for the context, say): run them one at a time to find it.
        return [pair for item in group for pair in _generate_group(model, tokenizer, [item], kind, options, fail)]
    return list(zip(group, made, strict=True))


def _label(model_name, revision) -> str:
    return f"{model_name}@{revision}" if revision else str(model_name)


def _record(item: JobItem, generation: Generation, model_name: str, revision: str | None) -> dict:
    options = asdict(item.sampling)
    options["stop"] = list(options["stop"])
    return {
        "id": item.id,
        "model": model_name,
        "revision": revision,
        "input": item.input,
        "options": options,
        **generation.to_dict(),
    }
