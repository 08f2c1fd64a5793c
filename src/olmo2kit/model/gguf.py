"""GGUF files of OLMo 2 checkpoints, for llama.cpp: written by llama.cpp's own converter, cached, reused.

A checkpoint (size alias, `repo@revision`, local or fine-tuned directory) is converted once per GGUF type
and kept in the GGUF cache beside the Hub cache (`$OLMO2KIT_GGUF_CACHE`, else `olmo2kit-gguf/` next to
`$HF_HUB_CACHE`), keyed by repo, the commit the revision resolved to, and the type; a local directory is
keyed by its content, a sha256 of every file the converter reads, so another checkpoint copied over it (with
the old mtimes, as tar, Docker and Nix copy) is converted again. A conversion is written beside its place and
renamed into it, with a record of its size and sha256: before a cached GGUF is used or exported it is checked
against that record, and one that fails (cut short, its bytes changed) is removed and converted again.

llama.cpp's converter (`convert_hf_to_gguf.py`, its `conversion` package and `gguf-py`) is not in the
`llama-cpp-python` wheel; `make llamacpp` copies it from the same llama.cpp source into
`<venv>/share/llama.cpp` (`$OLMO2KIT_LLAMA_CPP` names another copy). olmo2kit runs it unchanged: where it
does not recognise the tokenizer's fingerprint (any tokenizer but OLMo 2's own, a tiny one say), the OLMo 2
pre-tokenizer is named explicitly when the tokenizer declares OLMo 2's split pattern.

    >>> path = gguf_file("1b-instruct", gguf_type="q8_0")  # doctest: +SKIP
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from olmo2kit.errors import Olmo2KitError
from olmo2kit.files import (
    cannot_write,
    file_sha256,
    file_stamp,
    make_output_dir,
    remove_abandoned_staging,
    staging_path,
    write_json_atomic,
)
from olmo2kit.model.chat_template import OLMO2_OLLAMA_TEMPLATE, OLMO2_STOP
from olmo2kit.model.hub_cache import download
from olmo2kit.model.loading import ModelRef, resolve_model
from olmo2kit.model.tiny import OLMO2_SPLIT_PATTERN

log = logging.getLogger("olmo2kit")

# llama.cpp recognises the real OLMo 2 tokenizer by its fingerprint as "dbrx", whose pre-tokenizer is OLMo 2's
# split pattern (llama.cpp src/llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_DBRX: "same as llama3"; conversion/base.py,
# get_vocab_base_pre); a tokenizer that declares that pattern is named so.
OLMO2_LLAMA_CPP_PRE = "dbrx"


@dataclass(frozen=True)
class GgufType:
    name: str
    converter: str  # the converter's --outtype that writes it, or the type quantized from
    quantize: str | None = None  # llama.cpp's quantizer's file type, for types the converter does not write


# bf16: OLMo 2's own type (lossless from its bf16 checkpoints); f16, f32; q8_0: llama.cpp's 8-bit blocks;
# q4_k_m: its mixed 4-bit k-quants, made by llama.cpp's quantizer from the bf16 file.
GGUF_TYPES = {t.name: t for t in (
    GgufType("bf16", "bf16"),
    GgufType("f16", "f16"),
    GgufType("f32", "f32"),
    GgufType("q8_0", "q8_0"),
    GgufType("q4_k_m", "bf16", quantize="LLAMA_FTYPE_MOSTLY_Q4_K_M"),
)}


def check_gguf_type(name: str) -> GgufType:
    if name not in GGUF_TYPES:
        raise Olmo2KitError(f"unknown GGUF type {name!r}: use one of {', '.join(GGUF_TYPES)}")
    return GGUF_TYPES[name]


def converter_dir() -> Path:
    """Where llama.cpp's converter is: $OLMO2KIT_LLAMA_CPP, else `share/llama.cpp` in this environment."""
    where = os.environ.get("OLMO2KIT_LLAMA_CPP")
    path = Path(where).expanduser() if where else Path(sys.prefix) / "share" / "llama.cpp"
    if not (path / "convert_hf_to_gguf.py").is_file():
        raise Olmo2KitError(f"llama.cpp's GGUF converter is not in {path}: run `make llamacpp` (it copies it from "
                            "llama-cpp-python's source), or set OLMO2KIT_LLAMA_CPP to a llama.cpp source directory")
    return path


def gguf_cache_dir() -> Path:
    """The GGUF cache: $OLMO2KIT_GGUF_CACHE, else `olmo2kit-gguf` beside the Hub cache."""
    if override := os.environ.get("OLMO2KIT_GGUF_CACHE"):
        return Path(override).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser().parent / "olmo2kit-gguf"


def checkpoint_dir(model: str, revision: str | None = None) -> tuple[ModelRef, Path]:
    """The resolved name and the local directory of a checkpoint (downloaded first from the Hub), or an
    Olmo2KitError when it is not a whole OLMo 2 checkpoint in safetensors."""
    ref = resolve_model(model, revision)
    if not ref.local:
        return ref, download(ref.source, ref.revision)
    path = Path(ref.source).expanduser()
    if (path / "adapter_config.json").is_file():
        raise Olmo2KitError(f"{model} is a LoRA adapter: merge it into its base first "
                            "(`olmo2kit finetune ... --lora --merge`), then convert the merged checkpoint")
    if not (path / "config.json").is_file():
        raise Olmo2KitError(f"{path} holds no config.json: it is not a checkpoint")
    if not list(path.glob("*.safetensors")):
        raise Olmo2KitError(f"{path} has no safetensors weights; olmo2kit converts safetensors only")
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != "olmo2":
        raise Olmo2KitError(f"{path} is a {config.get('model_type')} checkpoint, not OLMo 2")
    return ref, path


def cache_path(ref: ModelRef, source: Path, gguf_type: str, cache: Path | None = None, *, say=log.info) -> Path:
    """Where the GGUF of `ref` (read from `source`) in `gguf_type` is cached (in `cache`, else the GGUF cache).

    A Hub checkpoint is keyed by its commit (content-addressed already), a local directory by a sha256 of the
    files the converter reads (`converter_inputs`); reading them is remembered per file (`DIGESTS`), so only a
    checkpoint's first load, or one after it changed, reads it whole (`say` tells of a long read)."""
    cache = cache or gguf_cache_dir()
    if ref.local:
        resolved = source.resolve()
        digests = file_digests(converter_inputs(resolved), cache / "local" / DIGESTS, say=say)
        named = [(Path(path).name, digest) for path, digest in digests.items()]
        key = hashlib.sha256(json.dumps([_gguf_name(ref), named]).encode()).hexdigest()[:24]  # the name is in the GGUF
        return cache / "local" / f"{resolved.name}-{key}" / f"{gguf_type}.gguf"
    commit = source.name  # the Hub cache's snapshot directory is named by the commit
    return cache / ("models--" + ref.source.replace("/", "--")) / commit / f"{gguf_type}.gguf"


# Weights in pickle formats: the converter reads them only where a checkpoint has no safetensors, and olmo2kit
# converts safetensors only (`checkpoint_dir`), so a fine-tune's optimizer state or training arguments are not read.
_PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def converter_inputs(source: Path) -> list[Path]:
    """The files of the checkpoint directory `source` that a conversion may read: every file at its top (config,
    tokenizer files, safetensors, chat templates...) but hidden ones (locks, partial writes) and pickled weights."""
    return sorted(p for p in source.iterdir()
                  if p.is_file() and not p.name.startswith(".") and not p.name.endswith(_PICKLED))


# The JSON file, beside the local conversions, that remembers each checkpoint file's sha256 by its stamp.
DIGESTS = "digests.json"
# A file changed this recently could be written again within the same tick of the file system's clock, its
# stamp unchanged: its digest is remembered only once it is older.
SETTLED_NS = 100_000_000


def file_digests(files: list[Path], memo: Path, *, say=log.info) -> dict[str, str]:
    """The sha256 of each of `files`, by path, in their order: remembered in `memo` while a file's stamp
    (`files.file_stamp`: size, mtime, ctime, inode) is the one it had when read, else read again."""
    remembered = _read_memo(memo)
    digests, unread = {}, []
    for p in files:
        stamp = file_stamp(p.stat())
        if remembered.get(str(p), {}).get("stamp") == stamp:
            digests[str(p)] = remembered[str(p)]["sha256"]
        else:
            unread.append((p, stamp))
    if (size := sum(stamp[0] for _, stamp in unread)) > 1 << 30:
        say(f"reading {size / 1e9:.1f} GB of {files[0].parent} once, to key its GGUF by content")
    for p, stamp in unread:
        digests[str(p)] = file_sha256(p)
        after = p.stat()
        if file_stamp(after) != stamp:
            raise Olmo2KitError(f"{p} changed while olmo2kit read it: run again once it is written")
        if time.time_ns() - after.st_ctime_ns > SETTLED_NS:
            remembered[str(p)] = {"stamp": stamp, "sha256": digests[str(p)]}
    if unread:
        _write_memo(memo, remembered)
    return {str(p): digests[str(p)] for p in files}


def _read_memo(memo: Path) -> dict[str, dict]:
    """The remembered digests, {path: {"stamp", "sha256"}}; none where the file is missing or not one of these."""
    try:
        entries = json.loads(memo.read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(entries, dict):
        return {}
    return {path: entry for path, entry in entries.items() if isinstance(entry, dict)
            and isinstance(entry.get("stamp"), list) and isinstance(entry.get("sha256"), str)}


def _write_memo(memo: Path, entries: dict[str, dict]) -> None:
    """Write the remembered digests, less those of files gone or changed since. A memo that cannot be written
    (a read-only cache) is no error: the files are read again next time. Two processes writing at once can lose
    one another's entries, never make one wrong."""
    def current(path: str, stamp: list[int]) -> bool:
        try:
            return file_stamp(os.stat(path)) == stamp
        except OSError:
            return False

    kept = {path: entry for path, entry in entries.items() if current(path, entry["stamp"])}
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(memo, kept)
    except (OSError, Olmo2KitError) as e:
        log.debug("the GGUF cache's digests are not remembered: %s", e)


def gguf_file(model: str, *, revision: str | None = None, gguf_type: str = "bf16", say=log.info) -> Path:
    """The cached GGUF of a checkpoint in `gguf_type`, converted first if it is not cached yet."""
    check_gguf_type(gguf_type)
    return cached_gguf(*checkpoint_dir(model, revision), gguf_type, say=say)


def cached_gguf(ref: ModelRef, source: Path, gguf_type: str, *, say=log.info, cache: Path | None = None) -> Path:
    """As `gguf_file`, for a checkpoint `checkpoint_dir` has resolved (in `cache`, else the GGUF cache). A cached
    file that fails its check (`checked_record`) is removed, said, and converted again."""
    kind = check_gguf_type(gguf_type)
    path = cache_path(ref, source, kind.name, cache, say=say)
    _remove_abandoned(path.parent)  # a folder not made yet holds nothing to remove
    if checked_record(path, say) is not None:
        return path
    say(f"converting {ref} to GGUF ({kind.name}) for llama.cpp, once: it is cached in {path.parent}")
    make_output_dir(path.parent)
    convert(source, path, kind.name, name=_gguf_name(ref), record=True)
    return path


def record_path(gguf: Path) -> Path:
    """The record of a cached GGUF's conversion: {"size", "sha256", "stamp"} (`files.file_stamp`) as written."""
    return gguf.with_name(gguf.name + ".json")


def checked_record(path: Path, say=log.info) -> dict | None:
    """The record of the cached GGUF `path` when the file passes its check, else None (none there, or one that
    fails, which is removed and said through `say`).

    The check: a record of the conversion, the size written, a GGUF header, and, when the file's stamp is not the
    one recorded (it was copied, touched or written to since), its sha256, read whole; a file that passes is
    recorded with its new stamp, so it is read whole once."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    record = _read_record(path)
    problem = _damage(path, stat.st_size, record)
    stamp = file_stamp(stat)
    if problem is None and record["stamp"] != stamp:
        if stat.st_size > 1 << 30:
            say(f"reading the cached GGUF {path} whole, once, to check it: it was copied or touched since written")
        if file_sha256(path) != record["sha256"]:
            problem = "its bytes are not those written"
        elif file_stamp(path.stat()) == stamp:
            record["stamp"] = stamp
            _write_record(path, record)
    if problem is None:
        return record
    _discard(path, problem, say)
    return None


def _damage(path: Path, size: int, record: dict | None) -> str | None:
    """What is wrong with the cached GGUF `path` of `size` bytes that a read of its header can tell, or None."""
    if record is None:
        return "no record of its conversion"
    if size != record["size"]:
        return f"{size:,} bytes where {record['size']:,} were written"
    if not _gguf_header(path, size):
        return "no GGUF header"
    return None


def _gguf_header(path: Path, size: int) -> bool:
    """Whether `path` starts as a GGUF file: its magic, a version llama.cpp reads (2 or 3), and counts of tensors
    and metadata entries that fit in the file."""
    with path.open("rb") as f:
        head = f.read(24)
    if len(head) < 24:
        return False
    magic, version, tensors, entries = struct.unpack("<4sIQQ", head)
    return magic == b"GGUF" and version in (2, 3) and tensors < size and entries < size


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(record_path(path).read_bytes())
    except (OSError, ValueError):
        return None
    fields = {"size": int, "sha256": str, "stamp": (list, type(None))}
    if not isinstance(record, dict) or not all(isinstance(record.get(k), t) for k, t in fields.items()):
        return None
    return record


def _write_record(path: Path, record: dict) -> None:
    try:
        write_json_atomic(record_path(path), record)
    except Olmo2KitError as e:  # a read-only cache: the file is read whole again next time
        log.debug("the record of %s is not updated: %s", path, e)


def _discard(path: Path, problem: str, say=log.info) -> None:
    """Remove the cached GGUF `path` and its record, saying why (`problem`) through `say`."""
    say(f"the cached GGUF {path} failed its check ({problem}): converting it again")
    try:
        path.unlink(missing_ok=True)
        record_path(path).unlink(missing_ok=True)
    except OSError as e:
        raise Olmo2KitError(f"cannot remove the damaged {path} ({e.strerror}): remove it, then run again") from None


def convert(source: Path, out: Path, gguf_type: str, *, name: str | None = None, record: bool = False) -> Path:
    """Write the GGUF of the checkpoint directory `source` to `out` in `gguf_type` with llama.cpp's converter
    (and its quantizer for the k-quants): beside `out` first, renamed into place when whole; with `record`, its
    record (`record_path`) too, written before the file appears, so a reader never finds a GGUF without one.

    The converter runs in a child process: it changes process-wide state (its logging, sys.path, its class
    registry) that the caller keeps none of. The child dies with this process (Linux), so a killed conversion
    stops, and its partial file is removed by the next conversion or export in that folder (`_remove_abandoned`).
    A failed write (a full disk, say) is an Olmo2KitError saying why in one line."""
    kind = check_gguf_type(gguf_type)
    converter = converter_dir()
    partial = staging_path(out)
    try:
        done = subprocess.run(
            [sys.executable, "-c", "from olmo2kit.model.gguf import _convert_main; _convert_main()",
             str(converter), str(source), str(partial), kind.name, name or source.name],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            errors="replace", preexec_fn=_die_with_parent, check=False,
        )
        if done.returncode != 0:
            _raise_converter_failure(source, done.returncode, done.stderr)
        _place(partial, out, record)
    except OSError as e:
        raise cannot_write(out, e, "give a directory you can write to, with room for the model") from None
    finally:
        for leftover in out.parent.glob(f".{out.name}.{os.getpid()}.*partial"):
            leftover.unlink(missing_ok=True)
    return out


# How the converter's process names the errno of a failed write, on a line of its own on stderr.
_ERRNO = "olmo2kit-errno: "
_PROGRESS = re.compile(r"\d+%\|")  # a line of tqdm's progress bar


def _raise_converter_failure(source: Path, returncode: int, stderr: str) -> None:
    """Raise what the converter's process said of its failure: OSError for a failed write (its errno), else an
    Olmo2KitError with its `error: ` line, or the last line it wrote (a traceback's, for a bug)."""
    # The converter's progress bar redraws itself without a newline, even after the error: not a line to say.
    lines = [line for line in stderr.splitlines() if line.strip() and not _PROGRESS.search(line)]
    code = next((line.removeprefix(_ERRNO) for line in reversed(lines) if line.startswith(_ERRNO)), "")
    if code.isdigit():
        raise OSError(int(code), os.strerror(int(code)))
    said = next((line.removeprefix("error: ") for line in reversed(lines) if line.startswith("error: ")),
                lines[-1] if lines else f"exit status {returncode}")
    raise Olmo2KitError(f"llama.cpp's converter failed on {source}: {said}")


def _place(partial: Path, out: Path, record: bool) -> None:
    """Rename the whole file `partial` to `out`; with `record`, its record first, and after the rename the stamp
    of the file this process wrote (through its own descriptor: another process may put its file at `out`)."""
    if not record:
        os.replace(partial, out)
        return
    written = {"size": partial.stat().st_size, "sha256": file_sha256(partial), "stamp": None}
    write_json_atomic(record_path(out), written)
    fd = os.open(partial, os.O_RDONLY)
    try:
        os.replace(partial, out)
        written["stamp"] = file_stamp(os.fstat(fd))  # the rename changed its ctime
    finally:
        os.close(fd)
    write_json_atomic(record_path(out), written)


def _convert_main() -> None:
    """The child process of `convert`: CONVERTER SOURCE OUT TYPE NAME."""
    converter, source, out, gguf_type, name = sys.argv[1:6]
    kind = check_gguf_type(gguf_type)
    out = Path(out)
    try:
        if kind.quantize:
            unquantized = out.with_name(f"{out.name}.{kind.converter}.partial")
            _run_converter(Path(converter), Path(source), unquantized, kind.converter, name)
            _quantize(unquantized, out, kind.quantize)
        else:
            _run_converter(Path(converter), Path(source), out, kind.converter, name)
    except Olmo2KitError as e:
        print(f"\nerror: {e}", file=sys.stderr)  # on a line of its own, after the progress bar's
        sys.exit(2)
    except OSError as e:
        # The GGUF writer writes tensors with numpy's tofile, whose OSError on a full disk carries no errno
        # ("N requested and M written"): a file system left with no room says what it was.
        code = e.errno or (errno.ENOSPC if _out_of_space(out.parent) else None)
        print(f"\n{_ERRNO}{code}" if code else f"\nerror: {e}", file=sys.stderr)
        sys.exit(2)


def _out_of_space(folder: Path) -> bool:
    """Whether the file system of `folder` has less than a MiB left for this user."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1 << 20


def _die_with_parent() -> None:
    """In the child, before it runs: be killed when the parent dies (Linux's PR_SET_PDEATHSIG; elsewhere nothing)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def _remove_abandoned(folder: Path) -> None:
    """Remove the partial GGUF files in `folder` whose process is gone (killed mid-conversion or mid-copy): the
    file `.NAME.gguf.PID.partial` this module writes beside a GGUF before renaming it into place, and the
    converter's unquantized output `.NAME.gguf.PID.partial.TYPE.partial`."""
    remove_abandoned_staging(folder, r".+\.gguf")


def _run_converter(converter: Path, source: Path, out: Path, outtype: str, name: str) -> None:
    """llama.cpp's converter in this process, on an OLMo 2 checkpoint directory."""
    import importlib

    if str(converter) not in sys.path:
        sys.path.insert(0, str(converter))
    if str(converter / "gguf-py") not in sys.path:
        sys.path.insert(1, str(converter / "gguf-py"))
    import torch

    _no_remote_code()
    conversion = importlib.import_module("conversion")
    gguf = importlib.import_module("gguf")
    # olmo2kit names the pre-tokenizer the converter's warning is about, and says what failed itself.
    logging.getLogger("hf-to-gguf").setLevel(logging.ERROR)
    logging.getLogger("gguf").setLevel(logging.ERROR)  # its duplicate-key note, when the template is set again
    hparams = conversion.ModelBase.load_hparams(source, False)
    architecture = conversion.get_model_architecture(hparams, conversion.ModelType.TEXT)
    if architecture != "Olmo2ForCausalLM":
        raise Olmo2KitError(f"{source} is a {architecture} checkpoint, not OLMo 2 (Olmo2ForCausalLM)")
    base = conversion.get_model_class(architecture)
    template = _chat_template_to_write(source)

    class Olmo2Gguf(base):
        model_arch = base.model_arch  # the converter asks each class to name its architecture

        def get_vocab_base_pre(self, tokenizer) -> str:
            try:
                return super().get_vocab_base_pre(tokenizer)
            except NotImplementedError:  # the fingerprint of a tokenizer llama.cpp has not seen
                return named_pre_tokenizer(source)

        def set_vocab(self) -> None:
            super().set_vocab()
            if template is not None:  # a base model's: the OLMo 2 template, as olmo2kit renders its chats
                self.gguf_writer.add_chat_template(template)

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    with torch.inference_mode():
        Olmo2Gguf(source, file_type, out, model_name=name).write()


def _no_remote_code() -> None:
    """Make the converter's tokenizer loads refuse a checkpoint's own code: it asks transformers for
    `trust_remote_code=True` (conversion/base.py, get_vocab_base), which olmo2kit never allows."""
    from transformers import AutoTokenizer

    load = AutoTokenizer.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        kwargs["trust_remote_code"] = False
        return load(cls, *args, **kwargs)

    AutoTokenizer.from_pretrained = classmethod(from_pretrained)


def named_pre_tokenizer(source: Path) -> str:
    """llama.cpp's name for the pre-tokenizer `source`'s tokenizer.json declares, when it is OLMo 2's."""
    try:
        declared = json.loads((source / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
    except (OSError, ValueError):
        declared = {}
    steps = declared.get("pretokenizers", [declared])
    patterns = [(s.get("pattern") or {}).get("Regex") for s in steps if s.get("type") == "Split"]
    if patterns == [OLMO2_SPLIT_PATTERN]:
        return OLMO2_LLAMA_CPP_PRE
    raise Olmo2KitError(f"llama.cpp does not know the pre-tokenizer of {source}'s tokenizer, and it is not OLMo 2's "
                        "split pattern: olmo2kit converts OLMo 2 tokenizers only")


def _chat_template_to_write(source: Path) -> str | None:
    """The OLMo 2 template, for a checkpoint whose tokenizer has none (the converter writes a tokenizer's own)."""
    from olmo2kit.model.chat_template import chat_template_of
    from olmo2kit.model.loading import load_tokenizer

    template, origin = chat_template_of(load_tokenizer(str(source)))
    return template if origin == "olmo2" else None


def _quantize(source: Path, out: Path, file_type: str) -> None:
    """llama.cpp's quantizer (through its Python bindings) from `source` to `out`."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, file_type)
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) != 0:
        if _out_of_space(out.parent):  # llama.cpp says why only in its log
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise Olmo2KitError(f"llama.cpp's quantizer failed on {source}")


def export_gguf(model: str, out: str | os.PathLike, *, revision: str | None = None, gguf_type: str = "bf16",
                say=log.info) -> Path:
    """Write the GGUF of a checkpoint to `out` (a new file), in `gguf_type`: copied from the GGUF cache when
    it is there, else converted straight to `out`. `out` appears whole or not at all."""
    kind = check_gguf_type(gguf_type)
    out = _new_output_file(out, ".gguf")
    return _write_gguf(*checkpoint_dir(model, revision), out, kind, say)


def _write_gguf(ref: ModelRef, source: Path, out: Path, kind: GgufType, say) -> Path:
    """`export_gguf` for a checkpoint `checkpoint_dir` has resolved: the cached GGUF when it passes its check and
    its copy has the bytes recorded, else a conversion straight to `out`."""
    _remove_abandoned(out.parent)
    cached = cache_path(ref, source, kind.name, say=say)
    record = checked_record(cached, say)
    if record is not None:
        say(f"copying the cached GGUF ({kind.name}) of {ref}")
        if _copy_checked(cached, out, record["sha256"]):
            return out
        _discard(cached, "its bytes are not those written", say)
    say(f"converting {ref} to GGUF ({kind.name})")
    convert(source, out, kind.name, name=_gguf_name(ref))
    return out


def export_ollama(model: str, directory: str | os.PathLike, *, revision: str | None = None,
                  gguf_type: str = "q4_k_m", parameters: dict | None = None, say=log.info) -> Path:
    """Write an ollama model to `directory`: the GGUF and a Modelfile with the OLMo 2 chat template, its stop
    tokens, the context length and `parameters` (sampling defaults, `{"top_p": 0.95}` say), so that
    `ollama create NAME -f DIRECTORY/Modelfile` imports it."""
    from olmo2kit.files import write_atomic

    kind = check_gguf_type(gguf_type)
    ref, source = checkpoint_dir(model, revision)
    directory = make_output_dir(directory)
    gguf_name = f"{_gguf_name(ref)}-{kind.name}.gguf"
    if (directory / gguf_name).exists() or (directory / "Modelfile").exists():
        raise Olmo2KitError(f"{directory} holds {gguf_name} or a Modelfile already: give an empty directory")
    _write_gguf(ref, source, _new_output_file(directory / gguf_name, ".gguf"), kind, say)
    context = json.loads((source / "config.json").read_text()).get("max_position_embeddings")
    write_atomic(directory / "Modelfile", ollama_modelfile(gguf_name, context, parameters or {}).encode())
    return directory


def ollama_modelfile(gguf_name: str, context: int | None, parameters: dict) -> str:
    """The Modelfile of an exported OLMo 2 GGUF: the template, its stop tokens, the context and `parameters`."""
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{OLMO2_OLLAMA_TEMPLATE}"""']
    lines += [f'PARAMETER stop "{stop}"' for stop in OLMO2_STOP]
    lines += [f"PARAMETER {name} {value:g}" for name, value in parameters.items()]
    if context:
        lines.append(f"PARAMETER num_ctx {context}")
    return "\n".join(lines) + "\n"


def _gguf_name(ref: ModelRef) -> str:
    """The model's name in a GGUF and in its file name: the repo or directory, and the revision asked for."""
    name = Path(ref.source).name
    return f"{name}-{ref.revision}" if ref.revision else name


def _new_output_file(out: str | os.PathLike, suffix: str) -> Path:
    """`out` as a file olmo2kit may create: named *`suffix`*, not there yet, in a directory it can write to."""
    out = Path(out).expanduser()
    if out.suffix != suffix:
        raise Olmo2KitError(f"{out} does not end in {suffix}: name the file to write, e.g. model{suffix}")
    if out.exists() or out.is_symlink():
        raise Olmo2KitError(f"{out} exists: remove it or give another name")
    make_output_dir(out.parent)
    probe = out.with_name(f".{out.name}.{os.getpid()}.probe")
    try:  # a file made and removed: the one test of writing that holds for root and read-only mounts alike
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        probe.unlink()
    except OSError as e:
        raise Olmo2KitError(f"cannot write in {out.parent} ({e.strerror}): give a directory you can write to") from None
    return out


def _copy_checked(source: Path, out: Path, sha256: str) -> bool:
    """Copy `source` to `out` when its bytes have the digest `sha256` (read once, as they are copied): `out`
    appears whole, or not at all and False where they do not."""
    partial = staging_path(out)
    digest = hashlib.sha256()
    try:
        with source.open("rb") as read, partial.open("xb") as write:
            while piece := read.read(1 << 20):
                digest.update(piece)
                write.write(piece)
        if digest.hexdigest() != sha256:
            return False
        os.replace(partial, out)
    except OSError as e:
        raise cannot_write(out, e, "give a directory you can write to, with room for the model") from None
    finally:
        partial.unlink(missing_ok=True)
    return True
