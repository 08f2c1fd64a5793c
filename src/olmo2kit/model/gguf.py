"""GGUF files of OLMo 2 checkpoints, for llama.cpp: written by llama.cpp's own converter, cached, reused.

A checkpoint (size alias, `repo@revision`, local or fine-tuned directory) is converted once per GGUF type
and kept in the GGUF cache beside the Hub cache (`$OLMO2KIT_GGUF_CACHE`, else `olmo2kit-gguf/` next to
`$HF_HUB_CACHE`), keyed by repo, the commit the revision resolved to, and the type; a local directory is
keyed by its path and its files' sizes and times, so a fine-tune written again is converted again. A
conversion is written beside its place and renamed into it: the cache holds whole files or none.

llama.cpp's converter (`convert_hf_to_gguf.py`, its `conversion` package and `gguf-py`) is not in the
`llama-cpp-python` wheel; `make llamacpp` copies it from the same llama.cpp source into
`<venv>/share/llama.cpp` (`$OLMO2KIT_LLAMA_CPP` names another copy). olmo2kit runs it unchanged: where it
does not recognise the tokenizer's fingerprint (any tokenizer but OLMo 2's own, a tiny one say), the OLMo 2
pre-tokenizer is named explicitly when the tokenizer declares OLMo 2's split pattern.

    >>> path = gguf_file("1b-instruct", gguf_type="q8_0")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from olmo2kit.errors import Olmo2KitError
from olmo2kit.files import cannot_write, make_output_dir
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


def cache_path(ref: ModelRef, source: Path, gguf_type: str, cache: Path | None = None) -> Path:
    """Where the GGUF of `ref` (read from `source`) in `gguf_type` is cached (in `cache`, else the GGUF cache)."""
    cache = cache or gguf_cache_dir()
    if ref.local:
        # The path and every file's size and time: a checkpoint written again gets a new key.
        resolved = source.resolve()
        stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(resolved.iterdir()) if p.is_file()]
        key = hashlib.sha256(json.dumps([str(resolved), stamp]).encode()).hexdigest()[:24]
        return cache / "local" / f"{resolved.name}-{key}" / f"{gguf_type}.gguf"
    commit = source.name  # the Hub cache's snapshot directory is named by the commit
    return cache / ("models--" + ref.source.replace("/", "--")) / commit / f"{gguf_type}.gguf"


def gguf_file(model: str, *, revision: str | None = None, gguf_type: str = "bf16", say=log.info) -> Path:
    """The cached GGUF of a checkpoint in `gguf_type`, converted first if it is not cached yet."""
    check_gguf_type(gguf_type)
    return cached_gguf(*checkpoint_dir(model, revision), gguf_type, say=say)


def cached_gguf(ref: ModelRef, source: Path, gguf_type: str, *, say=log.info, cache: Path | None = None) -> Path:
    """As `gguf_file`, for a checkpoint `checkpoint_dir` has resolved (in `cache`, else the GGUF cache)."""
    kind = check_gguf_type(gguf_type)
    path = cache_path(ref, source, kind.name, cache)
    if path.is_file():
        return path
    say(f"converting {ref} to GGUF ({kind.name}) for llama.cpp, once: it is cached in {path.parent}")
    make_output_dir(path.parent)
    _remove_abandoned(path)
    convert(source, path, kind.name, name=_gguf_name(ref))
    return path


def convert(source: Path, out: Path, gguf_type: str, *, name: str | None = None) -> Path:
    """Write the GGUF of the checkpoint directory `source` to `out` in `gguf_type` with llama.cpp's converter
    (and its quantizer for the k-quants): beside `out` first, renamed into place when whole.

    The converter runs in a child process: it changes process-wide state (its logging, sys.path, its class
    registry) that the caller keeps none of. The child dies with this process (Linux), so a killed conversion
    stops."""
    kind = check_gguf_type(gguf_type)
    converter = converter_dir()
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        done = subprocess.run(
            [sys.executable, "-c", "from olmo2kit.model.gguf import _convert_main; _convert_main()",
             str(converter), str(source), str(partial), kind.name, name or source.name],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            errors="replace", preexec_fn=_die_with_parent, check=False,
        )
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            said = next((line.removeprefix("error: ") for line in reversed(lines) if line.startswith("error: ")),
                        lines[-1] if lines else f"exit status {done.returncode}")
            raise Olmo2KitError(f"llama.cpp's converter failed on {source}: {said}")
        os.replace(partial, out)
    except OSError as e:
        raise cannot_write(out, e, "give a directory you can write to, with room for the model") from None
    finally:
        for leftover in out.parent.glob(f".{out.name}.{os.getpid()}.*partial"):
            leftover.unlink(missing_ok=True)
    return out


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
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _die_with_parent() -> None:
    """In the child, before it runs: be killed when the parent dies (Linux's PR_SET_PDEATHSIG; elsewhere nothing)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def _remove_abandoned(path: Path) -> None:
    """Remove partial conversions of `path` whose process is gone (killed mid-conversion)."""
    for partial in path.parent.glob(f".{path.name}.*.partial"):
        pid = partial.name.removeprefix(f".{path.name}.").split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            partial.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # there, and another user's
        pass
    return True


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
        raise Olmo2KitError(f"llama.cpp's quantizer failed on {source}")


def export_gguf(model: str, out: str | os.PathLike, *, revision: str | None = None, gguf_type: str = "bf16",
                say=log.info) -> Path:
    """Write the GGUF of a checkpoint to `out` (a new file), in `gguf_type`: copied from the GGUF cache when
    it is there, else converted straight to `out`. `out` appears whole or not at all."""
    kind = check_gguf_type(gguf_type)
    out = _new_output_file(out, ".gguf")
    return _write_gguf(*checkpoint_dir(model, revision), out, kind, say)


def _write_gguf(ref: ModelRef, source: Path, out: Path, kind: GgufType, say) -> Path:
    """`export_gguf` for a checkpoint `checkpoint_dir` has resolved."""
    cached = cache_path(ref, source, kind.name)
    if cached.is_file():
        say(f"copying the cached GGUF ({kind.name}) of {ref}")
        _copy_atomic(cached, out)
    else:
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


def _copy_atomic(source: Path, out: Path) -> None:
    import shutil

    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        shutil.copyfile(source, partial)
        os.replace(partial, out)
    except OSError as e:
        raise cannot_write(out, e, "give a directory you can write to, with room for the model") from None
    finally:
        partial.unlink(missing_ok=True)
