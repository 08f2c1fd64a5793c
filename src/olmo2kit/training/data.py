"""Training data in OLMo's layout: chat or text examples -> input_ids.npy, label_mask.npy, manifest.json;
preference pairs -> chosen_input_ids.npy, chosen_label_mask.npy, rejected_input_ids.npy, rejected_label_mask.npy.

The files are what OLMo's trainer reads with `--data.paths` and `--data.label_mask_paths`:

  input_ids.npy    headerless uint32 memmap, rows x seq_len token ids, right-padded with the pad id.
                   uint32 because OLMo 2's 100,278 tokens overflow the uint16 of OLMo's own script.
  label_mask.npy   headerless bool memmap of the same shape: True exactly on the tokens to learn
                   (assistant content and its end-of-text for chat; every real token for text).
  manifest.json    shape, dtypes, tokenizer and counts; written last, so its presence marks a
                   complete run.

One example fills one row (OLMo's `prepare_tulu_data.py` does the same); longer ones are cut.
A preference pair ({"chosen": [messages], "rejected": [messages]}, the layout of AllenAI's preference mixes, e.g.
allenai/olmo-2-1124-7b-preference-mix) fills row i of each of its four files, in the same layout: a shared prompt
(unlabelled) and one answer each, labelled on the answer's content and end-of-text.
A run is resumable: progress is kept beside the partial files and a rerun with the same
input and settings goes on from the last recorded line.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from olmo2kit.compat import drop_messages
from olmo2kit.errors import Olmo2KitError
from olmo2kit.files import make_output_dir, numbered_lines, output_lock, write_json_atomic
from olmo2kit.model.chat_template import chat_template_of, check_messages
from olmo2kit.model.loading import load_tokenizer, resolve_model
from olmo2kit.model.sizes import DEFAULT_MODEL

log = logging.getLogger("olmo2kit")

INPUT_IDS = "input_ids.npy"
LABEL_MASK = "label_mask.npy"
MANIFEST = "manifest.json"
CHOSEN_INPUT_IDS = "chosen_input_ids.npy"
CHOSEN_LABEL_MASK = "chosen_label_mask.npy"
REJECTED_INPUT_IDS = "rejected_input_ids.npy"
REJECTED_LABEL_MASK = "rejected_label_mask.npy"
FORMATS = ("chat", "text", "preference")
# The (ids, mask) files of each format, one pair per side of an example: one side for chat and text, two for a
# preference pair (chosen, then rejected).
_SIDES = {
    "chat": ((INPUT_IDS, LABEL_MASK),),
    "text": ((INPUT_IDS, LABEL_MASK),),
    "preference": ((CHOSEN_INPUT_IDS, CHOSEN_LABEL_MASK), (REJECTED_INPUT_IDS, REJECTED_LABEL_MASK)),
}
_ALL_FILES = {name for sides in _SIDES.values() for side in sides for name in side}
LAYOUT_VERSION = 1
_PROGRESS = ".prepare-progress.json"
_SYNC_EVERY = 2000  # examples between progress records: what a killed run loses at most
# A row is one example; a million tokens is 250 times OLMo 2's context, and a row of it already takes 4 MB.
MAX_SEQ_LEN = 1 << 20
# An example is one line, cut to at most MAX_SEQ_LEN tokens, so a line past this many bytes is a mistake
# (a file without newlines, say), refused before it is held in memory.
MAX_LINE_BYTES = 256 << 20
_CHECK_BYTES = 1 << 26  # how much of input_ids.npy load_prepared reads at a time to check the token ids
# A JSON escape of half a surrogate pair (\ud800 to \udfff) makes a str no tokenizer can encode.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


@dataclass
class PreparedData:
    """A prepared data directory, read back as memmaps (no copy)."""

    path: Path
    input_ids: np.memmap  # uint32 [rows, seq_len]
    label_mask: np.memmap  # bool [rows, seq_len]
    manifest: dict

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]


@dataclass
class PreferenceData:
    """A prepared preference directory, read back as memmaps (no copy): row i of chosen_* and of rejected_* is pair i,
    both with the same prompt (unlabelled) and each with its answer labelled."""

    path: Path
    chosen_ids: np.memmap  # uint32 [rows, seq_len]
    chosen_mask: np.memmap  # bool [rows, seq_len]
    rejected_ids: np.memmap  # uint32 [rows, seq_len]
    rejected_mask: np.memmap  # bool [rows, seq_len]
    manifest: dict

    @property
    def rows(self) -> int:
        return self.chosen_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.chosen_ids.shape[1]


def tokenize_chat(tokenizer, messages: list[dict], template: str | None = None, *,
                  answer_only: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of a rendered conversation and its label mask: True on each assistant turn's content and end.

    Each assistant span (what the template renders after the assistant header: the content and
    its end-of-text) is tokenized on its own, as the model produces it at inference after the
    generation prompt, so the labelled tokens decode to exactly that text. With `answer_only`
    only the last assistant turn is labelled (the answer of a preference pair); the ids are the same.
    """
    template = template or chat_template_of(tokenizer)[0]

    def render(turns: list[dict], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=generation_prompt, chat_template=template
        )

    text = render(messages, False)
    spans = [_assistant_span(render, messages, i, text) for i, m in enumerate(messages) if m["role"] == "assistant"]
    ids: list[int] = []
    mask: list[bool] = []
    start = 0
    for k, (span_start, span_end) in enumerate([*spans, (len(text), len(text))]):  # the end: text after the last reply
        labelled = not answer_only or k == len(spans) - 1
        for segment, learn in ((text[start:span_start], False), (text[span_start:span_end], labelled)):
            if segment:
                piece = tokenizer.encode(segment, add_special_tokens=False)
                ids += piece
                mask += [learn] * len(piece)
        start = span_end
    return ids, mask


def _assistant_span(render: Callable, messages: list[dict], i: int, text: str) -> tuple[int, int]:
    """Where assistant turn `i`'s content and end marker sit in the rendered conversation `text`.

    Rendered alone as the last turn, the turn is `before + header + content + end`. `before` is
    the conversation so far with the generation prompt, which usually holds the header; the
    header left in the turn (a conversation that opens with the assistant) is found by
    rendering the same turn with empty content.
    """
    before = render(messages[:i], True) if i else ""  # templates refuse an empty conversation
    turn = render(messages[: i + 1], False)
    empty = render([*messages[:i], {**messages[i], "content": ""}], False)
    content = messages[i]["content"]
    if not (text.startswith(before) and turn.startswith(before) and empty.startswith(before)
            and text.startswith(turn)):
        raise ValueError(f"message {i + 1}: the chat template renders this assistant turn differently in context")
    tail, empty_tail = turn[len(before):], empty[len(before):]
    for header in range(len(empty_tail) + 1):
        if empty_tail[:header] + content + empty_tail[header:] == tail:
            return len(before) + header, len(turn)
    raise ValueError(f"message {i + 1}: the chat template does not render this assistant turn as header, content, end")


def tokenize_text(tokenizer, text: str) -> tuple[list[int], list[bool]]:
    """A document as OLMo 2 saw them in pretraining: start marker, text, end-of-text; every token learned."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = [start, *tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
    return ids, [True] * len(ids)


def prepare_data(
    source: str | os.PathLike,
    outdir: str | os.PathLike,
    *,
    model: str = DEFAULT_MODEL,
    revision: str | None = None,
    seq_len: int = 4096,
    format: str | None = None,
    split: str = "train",
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Tokenize `source` into OLMo's layout in `outdir` and return the manifest.

    `source` is a JSONL file of {"messages": [...]} (chat), {"text": ...} (text) or
    {"chosen": [...], "rejected": [...]} (preference) objects, or a dataset name or directory for
    `datasets.load_dataset` (the `datasets` extra; other columns are ignored). `format` is
    guessed from the first example when not given. `progress(read, total)` is called as examples are
    read (from the resumed position on; for a file, lines), and once with read == total at the end.
    `outdir` is locked for the run. Examples with no token to learn are dropped;
    longer ones are cut to `seq_len`; both are counted in the manifest. A preference pair is
    dropped when either answer is cut entirely, and counted as truncated when either is cut. A bad line raises
    Olmo2KitError naming its line number, and leaves no file that looks complete.

    >>> prepare_data("chats.jsonl", "data/sft", model="1b", seq_len=4096)["rows"]  # doctest: +SKIP
    """
    if seq_len < 2:
        raise Olmo2KitError(f"--seq-len must be at least 2, got {seq_len}")
    if seq_len > MAX_SEQ_LEN:
        raise Olmo2KitError(f"--seq-len must be at most {MAX_SEQ_LEN:,} tokens, got {seq_len:,}: a row holds one "
                            "example, and OLMo 2's context is 4,096 tokens")
    if format is not None and format not in FORMATS:
        raise Olmo2KitError(f"unknown format {format!r}: use chat, text or preference")
    outdir = Path(outdir)
    source = _open_source(str(source), split)
    make_output_dir(outdir)
    with output_lock(outdir, option="OUTDIR"):  # two runs into one directory would interleave their rows
        return _prepare(source, outdir, model, revision, seq_len, format, split, progress)


def _prepare(source: _Source, outdir: Path, model: str, revision: str | None, seq_len: int, format: str | None,
             split: str, progress: Callable[[int, int], None] | None) -> dict:
    """prepare_data's work, in a locked `outdir`."""
    origin = source.origin
    tokenizer = _checked_tokenizer(model, revision, seq_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    template, template_origin = chat_template_of(tokenizer)
    settings = {
        "layout_version": LAYOUT_VERSION, "source": origin, "tokenizer": _tokenizer_name(model, revision),
        "seq_len": seq_len, "format": format, "split": split if origin["kind"] == "dataset" else None,
    }

    state = _read_progress(outdir, settings)
    if state is None:  # progress of other settings must not vouch for the files this run writes
        (outdir / _PROGRESS).unlink(missing_ok=True)
    fmt, counts = _write_rows(outdir, source, tokenizer, template, pad_id, settings, state, progress)
    if counts["rows"] == 0:
        _discard_partial(outdir)
        need = ("each pair's prompt and the start of both answers must fit in --seq-len" if fmt == "preference" else
                "chat examples need an assistant turn, and --seq-len must leave room for it")
        raise Olmo2KitError(f"no example in {source.name} has a token to learn "
                            f"({counts['examples']} read, {counts['dropped']} dropped): {need}")
    manifest = _manifest(tokenizer, settings, fmt, counts, pad_id, template_origin)
    _publish(outdir, manifest)
    return manifest


def _checked_tokenizer(model: str, revision: str | None, seq_len: int):
    """The model's tokenizer, refused without an end-of-text token; warns when `seq_len` passes its context."""
    tokenizer = load_tokenizer(model, revision)
    if tokenizer.eos_token_id is None:
        raise Olmo2KitError(f"the tokenizer of {model} has no end-of-text token: it cannot mark where examples end")
    context = getattr(tokenizer, "model_max_length", None)
    if context and context < 1_000_000 and seq_len > context:  # tokenizers without a limit report ~1e30
        log.warning(f"--seq-len {seq_len} is longer than the model's {context}-token context")
    return tokenizer


def _write_rows(outdir: Path, source: _Source, tokenizer, template: str, pad_id: int, settings: dict,
                state: dict | None, progress: Callable[[int, int], None] | None) -> tuple[str, dict]:
    """Tokenize the records after `state`'s position into the partial files: (format, counts), all rows synced.

    Without `state` the partial files start empty. A progress record is written every `_SYNC_EVERY`
    examples, after the rows it counts are on disk. An Olmo2KitError discards the partial files.
    """
    origin, seq_len = settings["source"], settings["seq_len"]
    counts = state["counts"] if state else {"examples": 0, "rows": 0, "truncated": 0, "dropped": 0, "tokens": 0,
                                             "label_tokens": 0}
    position = start = state["position"] if state else 0
    report = progress or (lambda done, total: None)
    files: dict = {}
    try:
        # The format picks the files, so it is known before they open: from the first record when not given.
        fmt = state["format"] if state else settings["format"] or _first_format(source)
        files = _open_partials(outdir, fmt, counts["rows"] * seq_len if state else None)
        report(position, source.total)
        for position, record in source.records(start):
            sides = _tokenize_record(tokenizer, record, fmt, template, origin, position)
            _append_example(files, _SIDES[fmt], counts, sides, seq_len, pad_id)
            report(position, source.total)
            if counts["examples"] % _SYNC_EVERY == 0:
                _write_progress(outdir, files, settings, fmt, position, counts)
        _sync(files)
        if position != source.total:  # blank lines at the end: the count still reaches the total
            report(source.total, source.total)
    except Olmo2KitError:
        _discard_partial(outdir)  # a bad example comes back on a rerun: nothing here is worth resuming
        raise
    finally:
        for f in files.values():
            f.close()
    return fmt, counts


def _open_partials(outdir: Path, fmt: str, resume_items: int | None) -> dict:
    """The partial files of `fmt` by final name, open at their end: empty, or cut to `resume_items` items each
    (anything written after the last progress record dropped)."""
    files = {}
    for ids_name, mask_name in _SIDES[fmt]:
        for name, itemsize in ((ids_name, 4), (mask_name, 1)):
            f = files[name] = open(outdir / _partial(name), "wb" if resume_items is None else "r+b")
            if resume_items is not None:
                f.truncate(resume_items * itemsize)
                f.seek(0, os.SEEK_END)
    return files


def _partial(name: str) -> str:
    return f".{name}.partial"


def _append_example(files: dict, sides_files: tuple, counts: dict, sides: list[tuple[list[int], list[bool]]],
                    seq_len: int, pad_id: int) -> None:
    """Count one tokenized example and write each of its sides (one, or a pair's two) as a row cut or padded to
    `seq_len` into that side's files, unless a side has nothing left to learn: then the example is dropped."""
    counts["examples"] += 1
    cut = [(ids[:seq_len], mask[:seq_len]) for ids, mask in sides]
    # The first token has no context to be predicted from; a pair goes whole, so that its rows stay aligned.
    if not all(any(mask[1:]) for _, mask in cut):
        counts["dropped"] += 1
        return
    counts["rows"] += 1
    counts["truncated"] += any(len(ids) > seq_len for ids, _ in sides)
    for (ids, mask), (ids_name, mask_name) in zip(cut, sides_files, strict=True):
        counts["tokens"] += len(ids)
        counts["label_tokens"] += sum(mask[1:])
        row = np.full(seq_len, pad_id, dtype=np.uint32)
        row[: len(ids)] = ids
        files[ids_name].write(row.tobytes())
        row_mask = np.zeros(seq_len, dtype=np.bool_)
        row_mask[: len(mask)] = mask
        files[mask_name].write(row_mask.tobytes())


def _manifest(tokenizer, settings: dict, fmt: str, counts: dict, pad_id: int, template_origin) -> dict:
    return {
        "layout": "olmo", "layout_version": LAYOUT_VERSION,
        "files": {name.removesuffix(".npy"): name for side in _SIDES[fmt] for name in side},
        "dtype": "uint32", "label_mask_dtype": "bool", "seq_len": settings["seq_len"], "rows": counts["rows"],
        "format": fmt, "tokenizer": settings["tokenizer"], "vocab_size": len(tokenizer),
        "pad_token_id": pad_id, "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
        "chat_template": template_origin if fmt in ("chat", "preference") else None,
        "source": settings["source"], "split": settings["split"],
        "examples": counts["examples"], "truncated": counts["truncated"], "dropped": counts["dropped"],
        "tokens": counts["tokens"], "label_tokens": counts["label_tokens"],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _publish(outdir: Path, manifest: dict) -> None:
    """Rename the synced partial files into place, then write the manifest: the mark of a complete run."""
    # A directory that held an earlier run stops looking complete before its files change.
    (outdir / MANIFEST).unlink(missing_ok=True)
    names = manifest["files"].values()
    for name in _ALL_FILES - set(names):
        (outdir / name).unlink(missing_ok=True)  # an earlier run's files of another format: no manifest holds them
    for name in names:
        os.replace(outdir / _partial(name), outdir / name)
    write_json_atomic(outdir / MANIFEST, manifest)
    (outdir / _PROGRESS).unlink(missing_ok=True)


def load_prepared(path: str | os.PathLike) -> PreparedData:
    """Open a directory written by `prepare_data` in chat or text format, checked against its manifest: shapes, and
    every token id below the manifest's vocab_size (a larger one would fail deep in training)."""
    path = Path(path)
    manifest = _read_manifest(path, "")
    if manifest.get("format") == "preference":
        raise Olmo2KitError(f"{path} holds preference data (chosen and rejected answers), not examples to fine-tune on:"
                            " train on it with `olmo2kit finetune --method dpo`")
    return PreparedData(path, *_open_arrays(path, manifest, _SIDES["chat"]), manifest)


def load_preference(path: str | os.PathLike) -> PreferenceData:
    """Open a directory written by `prepare_data` in preference format, checked as `load_prepared` checks: the four
    files' shapes, every token id below the manifest's vocab_size.

    >>> load_preference("data/prefs").chosen_ids.shape  # doctest: +SKIP
    """
    path = Path(path)
    manifest = _read_manifest(path, " --format preference")
    if manifest.get("format") != "preference":
        raise Olmo2KitError(f"{path} holds {manifest.get('format')} data, not preference pairs: fine-tune on it with "
                            "`olmo2kit finetune` (SFT), or prepare chosen/rejected pairs with "
                            "`olmo2kit prepare-data INPUT DIR --format preference` for --method dpo")
    return PreferenceData(path, *_open_arrays(path, manifest, _SIDES["preference"]), manifest)


def _read_manifest(path: Path, options: str) -> dict:
    """The checked manifest of prepared directory `path`; its absence says to run prepare-data with `options`."""
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        what = "was interrupted" if (path / _PROGRESS).exists() else "is not prepared data"
        raise Olmo2KitError(f"{path} {what} (no {MANIFEST}): run `olmo2kit prepare-data INPUT {path}{options}`")
    try:
        manifest = json.loads(manifest_path.read_text())
        rows, seq_len, vocab_size = int(manifest["rows"]), int(manifest["seq_len"]), int(manifest["vocab_size"])
        if manifest["dtype"] != "uint32":
            raise ValueError(f"dtype {manifest['dtype']}")
        if min(rows, seq_len, vocab_size) < 1:
            raise ValueError("rows, seq_len and vocab_size must be positive")
    except (ValueError, KeyError, TypeError) as e:
        raise Olmo2KitError(f"{manifest_path} is damaged ({e}): run prepare-data again") from None
    return manifest


def _open_arrays(path: Path, manifest: dict, sides: tuple) -> list[np.memmap]:
    """The (ids, mask) files of each of `sides` in `path`, flat, as read-only memmaps of the manifest's shape (ids
    uint32, masks bool); Olmo2KitError on a file of the wrong size or an id beyond the vocabulary."""
    rows, seq_len = int(manifest["rows"]), int(manifest["seq_len"])
    arrays = []
    for ids_name, mask_name in sides:
        for name, dtype in ((ids_name, np.uint32), (mask_name, np.bool_)):
            file = path / name
            expected = rows * seq_len * np.dtype(dtype).itemsize
            if not file.exists() or file.stat().st_size != expected:
                raise Olmo2KitError(f"{file} is missing or not the {expected:,} bytes {MANIFEST} says: prepare it "
                                    "again")
            arrays.append(np.memmap(file, dtype=dtype, mode="r", shape=(rows, seq_len)))
    for ids_name, _ in sides:
        _check_token_ids(path / ids_name, rows, seq_len, int(manifest["vocab_size"]))
    return arrays


def _check_token_ids(file: Path, rows: int, seq_len: int, vocab_size: int) -> None:
    """Olmo2KitError naming the first row of `file` with a token id of `vocab_size` or more.

    Reads `_CHECK_BYTES` at a time into memory that is freed as it goes; pages of a memmap would stay
    counted in the process's memory.
    """
    step = max(1, _CHECK_BYTES // (seq_len * 4))
    with open(file, "rb") as f:
        for start in range(0, rows, step):
            chunk = np.frombuffer(f.read(step * seq_len * 4), dtype=np.uint32).reshape(-1, seq_len)
            if chunk.max() >= vocab_size:
                row, column = np.argwhere(chunk >= vocab_size)[0]
                raise Olmo2KitError(
                    f"{file} row {start + row + 1} of {rows} holds token id {chunk[row, column]}, beyond the "
                    f"{vocab_size:,} tokens of its tokenizer ({MANIFEST}): the file is damaged; prepare it again"
                )


def _tokenizer_name(model: str, revision: str | None) -> str:
    ref = resolve_model(model, revision)
    return str(Path(ref.source).resolve()) if ref.local else str(ref)


@dataclass
class _Source:
    """Where examples come from: `records(after)` gives (number, record) from a position on, numbered from 1."""

    name: str  # as the user gave it
    origin: dict  # what identifies it, for resuming
    total: int  # lines of a file, examples of a dataset
    records: Callable[[int], Iterator[tuple[int, dict]]]


def _open_source(source: str, split: str) -> _Source:
    """A JSONL file or a dataset, opened to be read from any position."""
    path = Path(source).expanduser()
    if path.is_file():
        return _jsonl_source(source, path)
    if not path.is_dir() and (source.startswith((".", "/", "~")) or source.endswith((".jsonl", ".json"))):
        raise Olmo2KitError(f"no such file: {source}")
    try:
        import datasets
    except ImportError:
        raise Olmo2KitError(
            f"{source} is not a file; reading it as a dataset name needs the datasets extra: "
            "pip install 'olmo2kit[datasets]'"
        ) from None
    datasets.disable_progress_bars()
    # datasets logs a JSON file it cannot parse, with pyarrow's message, before raising: the error below says it
    drop_messages("datasets.packaged_modules.json.json", "Failed to load JSON")
    try:
        dataset = datasets.load_dataset(source, split=split)
    except (FileNotFoundError, ValueError, ConnectionError, datasets.exceptions.DatasetNotFoundError,
            datasets.exceptions.DatasetGenerationError) as e:
        # A generation error wraps the reason (a file that is not JSON, say) in its cause.
        reason = str(e.__cause__ or e) if isinstance(e, datasets.exceptions.DatasetGenerationError) else str(e)
        raise Olmo2KitError(f"cannot load dataset {source!r} split {split!r}: {reason.splitlines()[0]}") from None
    origin = {"kind": "dataset", "name": source, "fingerprint": getattr(dataset, "_fingerprint", None)}

    def rows(after: int) -> Iterator[tuple[int, dict]]:
        yield from enumerate(dataset.select(range(after, len(dataset))), start=after + 1)

    return _Source(source, origin, len(dataset), rows)


def _jsonl_source(source: str, path: Path) -> _Source:
    stat = path.stat()
    origin = {"kind": "jsonl", "path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    def jsonl(after: int) -> Iterator[tuple[int, dict]]:
        with open(path, "rb") as f:  # bytes, so that a line that is not UTF-8 is reported with its number
            for number, line in numbered_lines(f, MAX_LINE_BYTES):
                if line is None:
                    raise Olmo2KitError(f"{source} line {number}: longer than {MAX_LINE_BYTES:,} bytes, the cap on "
                                        "an example: split it")
                if number > after and line.strip():
                    yield number, _parse_line(source, number, line)

    return _Source(source, origin, _count_lines(path), jsonl)


def _parse_line(source: str, number: int, line: bytes) -> dict:
    """One JSONL line as a dict of text a tokenizer can encode; Olmo2KitError naming the line otherwise."""
    where = f"{source} line {number}"
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Olmo2KitError(f"{where}: not UTF-8 text (byte {e.start + 1} of the line); convert the file to UTF-8") \
            from None
    try:
        record = json.loads(text)
    except RecursionError:
        raise Olmo2KitError(f"{where}: not JSON (nested deeper than it can be read); fix or remove it") from None
    except ValueError as e:
        raise Olmo2KitError(f"{where}: not JSON ({e}); fix or remove it") from None
    if not isinstance(record, dict):
        raise Olmo2KitError(f"{where}: expected a JSON object, got {_kind(record)}")
    if _SURROGATE_ESCAPE.search(line):
        try:
            json.dumps(record, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise Olmo2KitError(f"{where}: an escape \\uXXXX is half of a surrogate pair, which is no text; "
                                "fix or remove it") from None
    return record


def _count_lines(path: Path) -> int:
    """Lines in a file, a last one without its newline included."""
    lines, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")


def _first_format(source: _Source) -> str:
    """The format of `source`'s first record; chat for a source without one (whose run then writes no row)."""
    for number, record in source.records(0):
        return _guess_format(record, source.origin, number)
    return "chat"


def _guess_format(record: dict, origin: dict, number: int) -> str:
    if "chosen" in record and "rejected" in record:
        return "preference"
    if "messages" in record:
        return "chat"
    if "text" in record:
        return "text"
    raise Olmo2KitError(f"{_where(origin, number)}: has neither a 'messages' (chat) nor a 'text' (text) field, nor "
                        "'chosen' and 'rejected' (preference)")


def _tokenize_record(tokenizer, record: dict, fmt: str, template: str, origin: dict,
                     number: int) -> list[tuple[list[int], list[bool]]]:
    """The (ids, mask) of each side of one record: one for chat and text, chosen and rejected for preference."""
    where = _where(origin, number)
    if fmt == "preference":
        return _tokenize_pair(tokenizer, record, template, where)
    field = "text" if fmt == "text" else "messages"
    if field not in record:
        raise Olmo2KitError(f"{where}: has no {field!r} field, which every example needs in {fmt} format; "
                            "give each example 'messages' (chat) or each 'text' (text)")
    if fmt == "text":
        text = record["text"]
        if not isinstance(text, str):
            raise Olmo2KitError(f"{where}: 'text' must be a string, got {_kind(text)}")
        return [tokenize_text(tokenizer, text)]
    turns = _checked_messages(record, "messages", where)
    if not any(m["role"] == "assistant" for m in turns):
        return [([], [])]  # nothing to learn: dropped and counted
    try:
        return [tokenize_chat(tokenizer, turns, template)]
    except ValueError as e:
        raise Olmo2KitError(f"{where}: {e}") from None


def _tokenize_pair(tokenizer, record: dict, template: str, where: str) -> list[tuple[list[int], list[bool]]]:
    """Chosen and rejected, each tokenized whole with only its answer (the last message) labelled; Olmo2KitError
    unless both are message lists that share every message but the last and end in a non-empty assistant answer."""
    for field in ("chosen", "rejected"):
        if field not in record:
            raise Olmo2KitError(f"{where}: has no {field!r} field, which every pair needs in preference format; give "
                                "each pair 'chosen' and 'rejected' message lists that share their prompt")
    sides = {field: _checked_messages(record, field, where) for field in ("chosen", "rejected")}
    for field, turns in sides.items():
        answer = turns[-1]
        if answer["role"] != "assistant":
            raise Olmo2KitError(f"{where}: the last message of {field!r} has role {answer['role']!r}: each list of a "
                                "pair ends with the assistant's answer")
        if not answer["content"].strip():
            raise Olmo2KitError(f"{where}: the answer in {field!r} (its last message) is empty")
    chosen, rejected = sides["chosen"], sides["rejected"]
    if len(chosen) != len(rejected):
        raise Olmo2KitError(f"{where}: 'chosen' has {len(chosen)} messages and 'rejected' {len(rejected)}: a pair "
                            "shares its prompt (every message but the last) and differs in the answer")
    for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1], strict=True), 1):
        if a != b:
            raise Olmo2KitError(f"{where}: 'chosen' and 'rejected' differ at message {i}: a pair shares its prompt "
                                "(every message but the last) and differs in the answer")
    try:
        return [tokenize_chat(tokenizer, turns, template, answer_only=True) for turns in (chosen, rejected)]
    except ValueError as e:
        raise Olmo2KitError(f"{where}: {e}") from None


def _checked_messages(record: dict, field: str, where: str) -> list[dict]:
    """`record[field]` checked as a conversation (check_messages), errors naming the record and, for a pair's
    lists, the field."""
    messages = record[field]
    if not isinstance(messages, list):
        raise Olmo2KitError(f"{where}: {field!r} must be a list, got {_kind(messages)}")
    try:
        return check_messages(messages, need_user=False)
    except Olmo2KitError as e:
        raise Olmo2KitError(f"{where}: {e}" if field == "messages" else f"{where}: {field!r}: {e}") from None


def _where(origin: dict, number: int) -> str:
    if origin["kind"] == "jsonl":
        return f"{origin['path']} line {number}"
    return f"{origin['name']} example {number}"


def _kind(value) -> str:
    return "nothing" if value is None else type(value).__name__


def _read_progress(outdir: Path, settings: dict) -> dict | None:
    """The recorded progress of an interrupted run with the same settings, else None (start over)."""
    try:
        state = json.loads((outdir / _PROGRESS).read_text())
        if state["settings"] != settings:
            return None
        items = state["counts"]["rows"] * settings["seq_len"]
        for ids_name, mask_name in _SIDES[state["format"]]:
            if (outdir / _partial(ids_name)).stat().st_size < items * 4 or \
                    (outdir / _partial(mask_name)).stat().st_size < items:
                return None
        return state
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_progress(outdir: Path, files: dict, settings: dict, fmt: str, position: int, counts: dict) -> None:
    _sync(files)  # the rows a record counts are on disk before the record is
    write_json_atomic(outdir / _PROGRESS, {"settings": settings, "format": fmt, "position": position,
                                           "counts": counts})


def _sync(files: dict) -> None:
    for f in files.values():
        f.flush()
        os.fsync(f.fileno())


def _discard_partial(outdir: Path) -> None:
    for name in (*map(_partial, _ALL_FILES), _PROGRESS):
        (outdir / name).unlink(missing_ok=True)
