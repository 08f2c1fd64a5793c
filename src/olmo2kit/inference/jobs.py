"""Batch generation jobs: prompts from a JSONL file, results appended to another, resumable.

Input, one JSON object a line (blank lines are skipped):

    {"id": "q1", "prompt": "Language modeling is "}
    {"id": "q2", "messages": [{"role": "user", "content": "Hi!"}], "temperature": 0.7, "max_new_tokens": 50}

A line holds an id, a prompt or messages, its own sampling options over the job's (max_new_tokens,
or its OpenAI-style alias max_tokens, do_sample, temperature, top_k, top_p, min_p, repetition_penalty,
seed, stop), and a
`metadata` object carried through to the output untouched. Any other key is a mistake (a typo such
as "temprature" would otherwise be ignored), so the line is reported and skipped, as is a line over
1 MiB. An id is a string or an integer; a line without one gets its line number (from 1).

Output, one JSON object a line, in input order (on Ray, in the order shards finish): the id, the model and
revision, the engine and its version (`engine`, `engine_version`: a job resumed on the other engine says so line by
line), the input line (less its id), the sampling options used, `request_sha256` (the hash of the request as sent:
prompt or messages, and options), and the `Generation` fields (text, token_ids, prompt_tokens, new_tokens,
finish_reason, tokens_per_s, elapsed_s, prompt_tps, peak_memory_gb; the speeds are those of the batched call that
made the line).

Running a job again with the same output skips the ids already there, so a job stopped at any
point, even by SIGKILL or a full disk, ends with every id exactly once. A line too long for the model's
context is reported and skipped; any other failure while generating is the model's, not the line's (the
model cannot load, say), so the job stops there with an Olmo2KitError, keeping the results written before.
An id whose request changed since its result was written is an error. Lines are appended whole and
synced to disk a batch at a time; a last line cut short is dropped when the job resumes. A job holds a
lock on its output while it runs, so a second job on the same output stops at once.

On Ray (`run_job_on_ray`), the lines still to do go out in shards, each a task that a worker runs with
`GenerateShard` on the model it keeps loaded between shards; the driver alone appends each shard's results as
it comes back, so the rules above hold: the output is in the order the shards finish, each id once, and a
shard that fails for good is reported while the others go on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from olmo2kit.errors import Olmo2KitError
from olmo2kit.files import JsonlStore, numbered_lines, output_lock
from olmo2kit.inference.generation import Generation, generate
from olmo2kit.inference.ray_pool import RayPool
from olmo2kit.inference.sampling import SamplingOptions, normalize_options
from olmo2kit.model.chat_template import check_messages, user_messages
from olmo2kit.model.engines import engine_info, load_model
from olmo2kit.model.sizes import ContextExceeded
from olmo2kit.model.vllm import VllmModel, VllmOptions

log = logging.getLogger("olmo2kit")

OPTION_KEYS = tuple(SamplingOptions.__dataclass_fields__)
# What a line may hold; `max_tokens` is the OpenAI-style name of max_new_tokens.
LINE_KEYS = ("id", "prompt", "messages", "metadata", "max_tokens", *OPTION_KEYS)
# The bytes of one input line, checked before it is parsed or tokenized: 1 MiB of text is some 250,000
# tokens, far past OLMo 2's 4096-token context, so no line that could run is refused.
MAX_LINE_BYTES = 1 << 20


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


def _is_number(value) -> bool:
    """The type of a sampling option missing from _OPTION_TYPES: the rest are numbers."""
    return _is_int(value) or isinstance(value, float)


@dataclass(frozen=True)
class JobItem:
    """One valid input line: what to generate and with which options."""

    line: int  # in the input file, from 1
    id: str | int
    input: dict  # the line as read, less its id
    request: str | list[dict]  # a prompt, or a conversation
    sampling: SamplingOptions
    sha256: str  # of the request and the sampling options: what makes the result


@dataclass
class JobSummary:
    total: int  # valid input lines
    already_done: int  # of those, found in the output and skipped
    written: int  # results appended by this run
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, problem): malformed or failed lines
    failed: list[tuple[str, str]] = field(default_factory=list)  # (shard, why): Ray shards that failed for good


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
        for number, raw in numbered_lines(f, MAX_LINE_BYTES):
            if raw is not None and not raw.strip():
                continue
            try:
                if raw is None:
                    raise Olmo2KitError(f"longer than {MAX_LINE_BYTES >> 20} MiB, the cap on a line: shorten it")
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
    lock: bool = True,
    **options,
) -> JobSummary:
    """Generate for every line of `input_path` whose id is not yet in `output_path`, appending results in order.

    `options` are the job's sampling options (as for `generate`); `batch_size` prompts go to
    the model at once. `progress(done, total)` is called as batches finish; `model_name` and
    `revision` are recorded on each line (default: the model's name_or_path). The job holds
    `files.output_lock` on `output_path` while it runs; `lock=False` when the caller holds it.
    The model failing (not a line: see the module's docstring) stops the job with an Olmo2KitError
    naming the model, the line it stopped at and the cause; what was written stays, and a rerun resumes.

    >>> run_job(model, tokenizer, "prompts.jsonl", "results.jsonl", do_sample=False)  # doctest: +SKIP
    """
    input_path, output_path = check_job(input_path, output_path, batch_size, **options)
    warn = on_warning or log.warning
    model_name = model_name or model.name_or_path
    with output_lock(output_path, option="--output") if lock else contextlib.nullcontext():
        store, pending, summary = _open_job(input_path, output_path, model_name, revision, chat=chat, system=system,
                                            strict=strict, warn=warn, options=options)

        def fail(item: JobItem, error: Olmo2KitError) -> None:
            _skip_line(summary, input_path, item.line, str(error), strict=strict, warn=warn)

        def stop(items: list[JobItem], error: Olmo2KitError) -> Olmo2KitError:
            # Every later line would fail the same way (and a model that cannot load would be loaded again
            # for each): stop, as for a full disk, with the results so far on disk for the rerun.
            return Olmo2KitError(
                f"{model_name} failed at line {min(item.line for item in items)} of {input_path}, so the job "
                f"stopped (the results before it stay in {output_path}; the same command resumes there): {error}"
            )

        if progress:
            progress(0, len(pending))
        done = 0
        for batch, records in _generated(model, tokenizer, pending, batch_size, model_name, revision, fail, stop):
            store.append(records)
            summary.written += len(records)
            done += len(batch)
            if progress:
                progress(done, len(pending))
    return summary


def _generated(model, tokenizer, items: list[JobItem], batch_size: int, model_name: str, revision: str | None,
               fail, stop) -> Iterator[tuple[list[JobItem], list[dict]]]:
    """`items` generated `batch_size` at a time: each batch and its result lines (those `fail` did not skip)."""
    engine = engine_info(model)
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        results = _generate_batch(model, tokenizer, batch, fail, stop)
        yield batch, [_record(item, results[item.line], model_name, revision, engine)
                      for item in batch if item.line in results]


@dataclass(frozen=True)
class JobModel:
    """The model a job's shards run on, as `model.engines.load_model` takes it (a local checkpoint by its absolute
    path: a Ray worker does not start in the driver's directory). `engine` "auto" is chosen on each worker, for
    the hardware it has."""

    model: str
    revision: str | None = None
    dtype: str = "auto"
    quantize: str | None = None
    device: str = "auto"
    engine: str = "auto"
    vllm: VllmOptions | None = None


# The model this process loaded for a job's shards, kept for the next shard: Ray runs one task after another in
# the same worker process, and loading is the slow part of a shard. One at a time: a worker holds one model.
_loaded: dict[JobModel, tuple] = {}


def loaded_model(spec: JobModel) -> tuple:
    """`(model, tokenizer)` of `spec`, loaded by this process once; another spec replaces it (a vLLM engine
    closed first, so its memory is free for the next)."""
    if spec not in _loaded:
        for model, _ in _loaded.values():
            if isinstance(model, VllmModel):
                model.close()
        _loaded.clear()
        _loaded[spec] = load_model(spec.model, engine=spec.engine, revision=spec.revision, dtype=spec.dtype,
                                   quantize=spec.quantize, device=spec.device, vllm=spec.vllm)
    return _loaded[spec]


@dataclass(frozen=True)
class GenerateShard:
    """One shard of a job's lines, run on a Ray worker: called with the lines (`JobItem`s), it generates them
    `batch_size` at a time on the worker's `loaded_model` and returns (the result lines, in the shard's order,
    as the job writes them; the lines skipped, as (line, why)). It writes nothing: the driver does. The model
    failing raises an Olmo2KitError naming the first line of the batch it failed on."""

    model: JobModel
    model_name: str  # recorded on each result line, with `revision`
    revision: str | None
    batch_size: int = 8

    def __call__(self, items: list[JobItem]) -> tuple[list[dict], list[tuple[int, str]], list[str]]:
        records: list[dict] = []
        skipped: list[tuple[int, str]] = []

        def stop(items: list[JobItem], error: Olmo2KitError) -> Olmo2KitError:
            return Olmo2KitError(f"{self.model_name} failed at line {min(item.line for item in items)}: {error}")

        with _warnings_said() as warnings:
            model, tokenizer = loaded_model(self.model)
            for _, made in _generated(model, tokenizer, items, self.batch_size, self.model_name, self.revision,
                                      lambda item, e: skipped.append((item.line, str(e))), stop):
                records += made
        return records, skipped, warnings


@contextlib.contextmanager
def _warnings_said() -> Iterator[list[str]]:
    """The warnings olmo2kit logs in this block (a base model's missing chat template, say), for a Ray worker to
    hand back: the driver says them, since a worker's own log does not reach the user."""
    said: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())
    log.addHandler(handler)
    try:
        yield said
    finally:
        log.removeHandler(handler)


def run_job_on_ray(
    shard: GenerateShard,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    pool: RayPool,
    *,
    shard_lines: int = 256,
    chat: bool = False,
    system: str | None = None,
    strict: bool = False,
    progress: Callable[[int, int], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
    lock: bool = True,
    **options,
) -> JobSummary:
    """`run_job` with the lines still to do cut into shards of `shard_lines`, each a task of `pool` that runs
    `shard` on a worker; this process alone appends the results, a shard's lines at a time in the order shards
    finish (within a shard, in input order), so a killed driver or a lost worker resumes as `run_job` does.

    One worker loads the model first: one that cannot load there is an Olmo2KitError before any shard runs. A
    shard that fails for good (after the pool's retries; at once for an Olmo2KitError) is left out of the output
    and named in the summary's `failed`, and the other shards go on; a rerun tries its lines again.
    `progress(done, total)` counts lines, failed ones included.

    >>> shard = GenerateShard(JobModel("7b", engine="vllm"), "allenai/OLMo-2-1124-7B", None)  # doctest: +SKIP
    >>> run_job_on_ray(shard, "prompts.jsonl", "results.jsonl", RayPool(RayOptions("auto")))  # doctest: +SKIP
    """
    input_path, output_path = check_job(input_path, output_path, shard.batch_size, shard_lines=shard_lines,
                                        **options)
    warn = on_warning or log.warning
    with output_lock(output_path, option="--output") if lock else contextlib.nullcontext():
        store, pending, summary = _open_job(input_path, output_path, shard.model_name, shard.revision, chat=chat,
                                            system=system, strict=strict, warn=warn, options=options)
        if pending:
            # One worker loads the model before the shards go out: a model that cannot load (a typo in its name, a
            # broken checkpoint) stops the job once, here, rather than failing every shard.
            pool.call(_load_on_worker, shard.model)
        shards = {_lines(part): (part,) for part in
                  (pending[start : start + shard_lines] for start in range(0, len(pending), shard_lines))}
        done, said = 0, set()
        if progress:
            progress(0, len(pending))
        for unit in pool.map(shard, shards):
            if unit.error is None:
                records, skipped, warnings = unit.value
                for message in warnings:
                    if message not in said:  # each worker warns once: say it once
                        said.add(message)
                        warn(message)
                for line, error in skipped:
                    _skip_line(summary, input_path, line, error, strict=strict, warn=warn)
                store.append(records)  # the driver alone writes, whichever worker generated the lines
                summary.written += len(records)
            else:
                summary.failed.append((unit.key, unit.error))
            done += len(shards[unit.key][0])
            if progress:
                progress(done, len(pending))
    return summary


def _load_on_worker(spec: JobModel) -> None:
    loaded_model(spec)


def _lines(items: list[JobItem]) -> str:
    """How a shard is named: the input lines it spans."""
    first, last = items[0].line, items[-1].line
    return f"line {first}" if first == last else f"lines {first}-{last}"


def _open_job(input_path: Path, output_path: Path, model_name: str, revision: str | None, *, chat: bool,
              system: str | None, strict: bool, warn: Callable[[str], None],
              options: dict) -> tuple[JsonlStore, list[JobItem], JobSummary]:
    """The job's results store (a torn last line cut off), its lines not yet in it, and the summary so far."""
    skipped: list[tuple[int, str]] = []
    items = read_job(input_path, chat=chat, system=system, strict=strict, on_warning=warn, skipped=skipped, **options)
    store = _results_store(output_path)
    done = _finished_requests(store, model_name, revision, warn)
    _check_unchanged(items, done, output_path)
    pending = [item for item in items if id_key(item.id) not in done]
    return store, pending, JobSummary(total=len(items), already_done=len(items) - len(pending), written=0,
                                      skipped=skipped)


def _skip_line(summary: JobSummary, input_path: Path, line: int, error: str, *, strict: bool,
               warn: Callable[[str], None]) -> None:
    """A line that cannot run (too long for the context): skipped and said, or with `strict` the job's end."""
    if strict:
        raise Olmo2KitError(f"line {line} of {input_path}: {error}")
    warn(f"line {line} of {input_path}: {error}; skipped")
    summary.skipped.append((line, error))


def check_job(input_path: str | os.PathLike, output_path: str | os.PathLike, batch_size: int, *,
              shard_lines: int = 1, **options) -> tuple[Path, Path]:
    """The job's two paths, after checking what can be checked before a model loads: the input file is
    there, the output can be written, the batch size, the lines of a Ray shard and the job's sampling options
    are valid."""
    if batch_size < 1:
        raise Olmo2KitError(f"--batch-size must be at least 1, got {batch_size}")
    if shard_lines < 1:
        raise Olmo2KitError(f"--ray-shard-lines must be at least 1, got {shard_lines}")
    SamplingOptions(**normalize_options(options))  # bad job options fail before any line is read
    input_path, output_path = _check_input(input_path), Path(output_path).expanduser()
    if output_path.exists() and output_path.samefile(input_path):
        raise Olmo2KitError("the output file is the input file: give another --output")
    if not output_path.parent.is_dir():
        raise Olmo2KitError(f"cannot write {output_path}: there is no directory {output_path.parent}")
    _results_store(output_path).check()  # a directory, a device such as /dev/zero, a fifo
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
    line = _json_object(raw)
    unknown = [key for key in line if key not in LINE_KEYS]
    if unknown:
        raise Olmo2KitError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: a line holds id, "
            f"prompt or messages, metadata (an object, carried through) and sampling options ({', '.join(OPTION_KEYS)})"
        )
    item_id = line.get("id", number)
    if isinstance(item_id, bool) or not isinstance(item_id, str | int) or item_id == "":
        raise Olmo2KitError(f"the id must be a string or an integer, got {item_id!r}")
    if "metadata" in line and not isinstance(line["metadata"], dict):
        raise Olmo2KitError(f'"metadata" must be a JSON object, got {json.dumps(line["metadata"])[:40]}')
    request = _request(line, chat=chat, system=system)
    sampling = _sampling(line, defaults)
    return JobItem(number, item_id, {k: v for k, v in line.items() if k != "id"}, request, sampling,
                   _request_sha256(request, sampling))


def _json_object(raw: bytes) -> dict:
    try:
        line = json.loads(raw)
    except UnicodeDecodeError:
        raise Olmo2KitError("not UTF-8 text") from None
    except RecursionError:
        raise Olmo2KitError("not JSON (nested deeper than it can be read)") from None
    except ValueError as e:
        raise Olmo2KitError(f"not JSON ({e})") from None
    if not isinstance(line, dict):
        raise Olmo2KitError('not a JSON object: write {"id": ..., "prompt": ...}')
    try:
        json.dumps(line, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise Olmo2KitError("holds a lone surrogate escape (\\ud800 to \\udfff), which is not text") from None
    return line


def _request(line: dict, *, chat: bool, system: str | None) -> str | list[dict]:
    """The prompt, or the conversation, as the model will get it."""
    has_prompt, has_messages = "prompt" in line, "messages" in line
    if has_prompt == has_messages:
        raise Olmo2KitError('give either "prompt" or "messages"' + (", not both" if has_prompt else ""))
    if has_prompt:
        prompt = line["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise Olmo2KitError('"prompt" must be a string with some text')
        return user_messages(prompt, system) if chat else prompt
    request = check_messages(line["messages"])
    if system and request[0]["role"] != "system":
        request = [{"role": "system", "content": system}, *request]
    return request


def _sampling(line: dict, defaults: dict) -> SamplingOptions:
    """The line's own sampling options over the job's `defaults`."""
    own = {k: line[k] for k in OPTION_KEYS if k in line}
    if "max_tokens" in line:
        if "max_new_tokens" in line:
            raise Olmo2KitError("give max_new_tokens or its alias max_tokens, not both")
        own["max_new_tokens"] = line["max_tokens"]
    for key, value in own.items():
        if not _OPTION_TYPES.get(key, _is_number)(value):
            raise Olmo2KitError(f"{'max_tokens' if key not in line else key} has the wrong type: {value!r}")
    return SamplingOptions(**normalize_options({**defaults, **own}))


def _request_sha256(request: str | list[dict], sampling: SamplingOptions) -> str:
    """The hash that, with the id, keys a result: of what makes it, the request as sent and the options."""
    options = {**asdict(sampling), "stop": list(sampling.stop)}
    text = json.dumps({"request": request, "options": options}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _is_result(row: dict) -> bool:
    """A line of this job's results: an id as the input's ids are (a string or an integer) and the model's name."""
    item_id = row.get("id")
    return isinstance(item_id, str | int) and not isinstance(item_id, bool) and isinstance(row.get("model"), str)


def _results_store(path: Path) -> JsonlStore:
    return JsonlStore(path, what="result line, so the job cannot resume into it",
                      hint="give another --output", is_record=_is_result)


def _finished_requests(store: JsonlStore, model_name: str, revision: str | None,
                       warn: Callable[[str], None]) -> dict[str, str | None]:
    """The ids already in the results, each with the hash of the request that made it; a torn last line
    (a write cut short) is cut off the file. A line without `request_sha256` gives None: it matches its id
    whatever the request."""
    done: dict[str, str | None] = {}
    for record in store.records():  # a line at a time: only the ids and hashes are kept
        if (record.get("model"), record.get("revision")) != (model_name, revision):
            raise Olmo2KitError(
                f"{store.path} holds results from {_label(record.get('model'), record.get('revision'))}, and this "
                f"job runs {_label(model_name, revision)}: give another --output, or the same model to resume"
            )
        done[id_key(record["id"])] = record.get("request_sha256")
    if store.repair():
        warn(f"{store.path}: dropping an incomplete last line (the run that wrote it was cut short)")
    return done


def _check_unchanged(items: list[JobItem], done: dict[str, str | None], output: Path) -> None:
    """Raise Olmo2KitError if an id's request changed since its result was written.

    An error rather than a warning: keeping the old result would pass it off as the answer to the new
    request, and generating again would leave two results for one id.
    """
    changed = [item.id for item in items if done.get(id_key(item.id)) not in (None, item.sha256)]
    if changed:
        shown = ", ".join(id_key(i) for i in changed[:5]) + (", ..." if len(changed) > 5 else "")
        raise Olmo2KitError(
            f"{len(changed)} id(s) changed their request (prompt, messages or options) since {output} was written "
            f"({shown}): give another --output, or remove those lines from it"
        )


def _generate_batch(model, tokenizer, batch: list[JobItem], fail, stop) -> dict[int, Generation]:
    """Generations for a batch, by line number; lines that share kind and options share a call. A line too
    long for the context goes to `fail(item, error)`; any other failure raises `stop(items, error)`."""
    import torch

    groups: dict[tuple[str, SamplingOptions], list[JobItem]] = {}
    for item in batch:
        groups.setdefault(("prompt" if isinstance(item.request, str) else "messages", item.sampling), []).append(item)
    results: dict[int, Generation] = {}
    try:
        for (kind, sampling), group in groups.items():
            for item, generation in _generate_group(model, tokenizer, group, kind, asdict(sampling), fail, stop):
                results[item.line] = generation
    except torch.OutOfMemoryError:
        raise Olmo2KitError(
            f"out of memory with batches of {len(batch)}: rerun with a smaller --batch-size "
            "(the rerun does only the lines not yet written)"
        ) from None
    return results


def _generate_group(model, tokenizer, group: list[JobItem], kind: str, options: dict, fail, stop):
    try:
        made = generate(model, tokenizer, **{kind: [item.request for item in group]}, **options)
    except ContextExceeded as error:
        if len(group) == 1:
            fail(group[0], error)
            return []
        # One line is at fault: run them one at a time to find it.
        return [pair for item in group for pair in _generate_group(model, tokenizer, [item], kind, options, fail,
                                                                   stop)]
    except Olmo2KitError as error:
        # Each line was checked as it was read, and the context is the one check left to generate: what fails
        # now is the model (it cannot load, say), not a line.
        raise stop(group, error) from None
    return list(zip(group, made, strict=True))


def _label(model_name, revision) -> str:
    return f"{model_name}@{revision}" if revision else str(model_name)


def _record(item: JobItem, generation: Generation, model_name: str, revision: str | None, engine: dict) -> dict:
    options = asdict(item.sampling)
    options["stop"] = list(options["stop"])
    return {
        "id": item.id,
        "model": model_name,
        "revision": revision,
        **engine,
        "input": item.input,
        "options": options,
        "request_sha256": item.sha256,
        **generation.to_dict(),
    }
