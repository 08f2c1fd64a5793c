"""Souping: checkpoints of one architecture and one tokenizer averaged tensor by tensor, as OLMo 2's `main` was made
from its stage-2 ingredients (allenai/OLMo-core README.md, "OLMo-2 Model Training": the final souped model, "weights
averaged in Python").

Memory stays bounded whatever the model's size: each tensor is read a piece at a time (`CHUNK_ELEMENTS` elements)
from every ingredient's safetensors file with plain reads (no mmap, whose pages would count in the process's
memory), accumulated in fp32, rounded to the ingredients' dtype and written at once to the output file, whose header
is computed from the shapes first. The output is laid out in files as the first ingredient is (one file, or its
shards and their index), and appears whole or not at all.

    >>> soup(["7b@stage2-ingredient1-step11931-tokens50B", "7b@stage2-ingredient2-step11931-tokens50B"],
    ...      "out/7b-soup", compare="main")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from olmo2kit.devices import get_dtype
from olmo2kit.errors import Olmo2KitError
from olmo2kit.files import (
    check_new_output_dir,
    file_sha256,
    make_output_dir,
    output_lock,
    staged_output_dir,
    write_json_atomic,
)
from olmo2kit.model.hub_cache import download
from olmo2kit.model.loading import resolve_model
from olmo2kit.model.sizes import checkpoint_architecture, read_config

log = logging.getLogger("olmo2kit")

# Elements of a tensor read, averaged and written at a time: the working memory is about 14 bytes an element
# (fp32 sum and term, one piece read, one written), so 4 M elements hold it near 60 MB for any model.
CHUNK_ELEMENTS = 1 << 22
# The safetensors format (github.com/huggingface/safetensors, README "Format"): an 8-byte little-endian header
# length, a JSON header of {name: {dtype, shape, data_offsets}} and "__metadata__", then the bytes. Its dtype names
# of the float types a soup averages, as olmo2kit's dtype table (devices.DTYPES) names them.
SAFETENSORS_DTYPES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}
HEADER_MAX_BYTES = 100_000_000  # safetensors' own limit on a header (README: "the header is limited to 100MB")
INDEX = "model.safetensors.index.json"
RECORD = "soup.json"
# What a soup copies from its first ingredient besides the weights: the configs and the tokenizer's files.
COPIED = ("config.json", "generation_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
          "merges.txt", "chat_template.jinja", "chat_template.json")
# Config keys that say nothing of what the weights compute: two checkpoints of one model may differ in them.
BOOKKEEPING = frozenset({"architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path",
                         "use_cache", "output_attentions", "output_hidden_states", "return_dict", "bos_token_id",
                         "eos_token_id", "pad_token_id"})  # the token ids: the tokenizers are compared on their own
# What transformers reads where an OLMo 2 config leaves a key out (transformers/models/olmo2/configuration_olmo2.py,
# Olmo2Config; rope_theta 10000 in rope_parameters' default), so that a key left out and its default agree.
DEFAULTS = {"hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False, "attention_dropout": 0.0,
            "rms_norm_eps": 1e-5, "initializer_range": 0.02, "max_position_embeddings": 2048}
# Weights in pickle formats, which olmo2kit never reads.
_PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class Ingredient:
    """A checkpoint as given and where it resolved: a Hub repo at a commit, or a local directory."""

    name: str
    directory: Path
    repo: str | None = None
    revision: str | None = None
    commit: str | None = None

    def to_dict(self) -> dict:
        where = {"directory": str(self.directory)} if self.repo is None else \
            {"repo": self.repo, "revision": self.revision, "commit": self.commit}
        return {"name": self.name, **where}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie in a safetensors file."""

    file: Path
    dtype: str  # the safetensors name: BF16, F16, F32
    shape: tuple[int, ...]
    offset: int  # from the start of the file
    nbytes: int

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


@dataclass
class _Checkpoint:
    ingredient: Ingredient
    config: dict
    tensors: dict[str, TensorInfo]  # in the order of the files and of each file's bytes
    layout: dict[str, list[str]]  # file name -> its tensors, in order
    indexed: bool  # sharded with a model.safetensors.index.json


@dataclass(frozen=True)
class Comparison:
    """The largest absolute difference of each tensor between the soup (as written, in its dtype) and a
    reference checkpoint, in fp32; NaN where either holds one."""

    reference: Ingredient
    differences: dict[str, float]

    @property
    def max_abs_diff(self) -> float:
        return _largest(self.differences.values())

    @property
    def worst_tensor(self) -> str | None:
        """The tensor of the largest difference (None when there are no tensors)."""
        largest = self.max_abs_diff
        return next((name for name, d in self.differences.items() if d == largest or math.isnan(d)), None)

    def to_dict(self) -> dict:
        def number(d: float) -> float | None:
            return None if math.isnan(d) else d

        return {"reference": self.reference.to_dict(), "max_abs_diff": number(self.max_abs_diff),
                "worst_tensor": self.worst_tensor,
                "tensors": [{"name": k, "max_abs_diff": number(d)} for k, d in self.differences.items()]}


@dataclass(frozen=True)
class SoupResult:
    """What `soup` did: its ingredients and normalised weights, what it wrote (None without an output), and the
    comparison with a reference (None without one)."""

    ingredients: list[Ingredient]
    weights: list[float]
    output: Path | None
    tensors: int
    parameters: int
    bytes: int
    comparison: Comparison | None = field(default=None)

    def to_dict(self) -> dict:
        return {"output": None if self.output is None else str(self.output),
                "ingredients": [{**i.to_dict(), "weight": w} for i, w in zip(self.ingredients, self.weights,
                                                                              strict=True)],
                "tensors": self.tensors, "parameters": self.parameters, "bytes": self.bytes,
                "comparison": None if self.comparison is None else self.comparison.to_dict()}


def soup(
    checkpoints: Sequence[str],
    output: str | os.PathLike | None = None,
    *,
    weights: Sequence[float] | None = None,
    compare: str | None = None,
    say: Callable[[str], None] = log.info,
    progress: Callable[[str, int, int], None] | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> SoupResult:
    """Average `checkpoints` (aliases, repo ids, `repo@revision`, local directories) tensor by tensor into
    `output`, a new or empty directory; with `compare`, also report the largest difference of each tensor from
    that reference checkpoint (a name as above, or a bare revision of the ingredients' one Hub repo, e.g. `main`).
    Either or both: without `output` the average is computed and compared, not written.

    `weights` (one per checkpoint, finite, 0 or more, not all 0; default equal) are normalised to sum 1. The
    checkpoints must share architecture, tokenizer, tensor names, shapes and dtypes (bf16, fp16 or fp32), else an
    Olmo2KitError says which differ and nothing is written. Sums are fp32 (equal weights as OLMo's soup script
    sums: `+= x / N` from zeros, bit for bit in fp32); the soup is written in the ingredients' dtype with their
    config, generation config and tokenizer files, and `soup.json` naming each ingredient (its repo and commit,
    or its directory) and weight. `progress(what, bytes done, bytes in all)` follows downloads and the averaging.
    """
    if isinstance(checkpoints, str):
        raise Olmo2KitError("soup takes a list of checkpoints, not one name: soup([first, second, ...], ...)")
    if len(checkpoints) < 2:
        raise Olmo2KitError(f"a soup needs 2 checkpoints or more, {len(checkpoints)} given: name each ingredient")
    normalised = check_weights(weights, len(checkpoints))
    if output is None and compare is None:
        raise Olmo2KitError("nothing to do: give --output DIR to write the soup, --compare REF to compare it, or both")
    target = None if output is None else check_new_output_dir(output)
    report = progress or (lambda what, done, total: None)
    if weights is not None:
        say(f"weights {', '.join(f'{w:g}' for w in weights)} normalised to sum 1: "
            f"{', '.join(f'{w:.4g}' for w in normalised)}")
    parts = [_open_checkpoint(name, report) for name in checkpoints]
    for other in parts[1:]:
        _check_same(parts[0], other)
    reference = None
    if compare is not None:
        reference = _open_checkpoint(_reference_name(compare, parts), report)
        _check_reference(parts[0], reference)
    first = parts[0]
    total = sum(info.nbytes for info in first.tensors.values())
    result = dict(ingredients=[p.ingredient for p in parts], weights=normalised, tensors=len(first.tensors),
                  parameters=sum(info.elements for info in first.tensors.values()), bytes=total)
    averaged = _Averager(parts, normalised, reference, chunk_elements, lambda done: report("averaging", done, total))
    with contextlib.closing(averaged):
        if target is None:
            for name in first.tensors:
                for _ in averaged.pieces(name):
                    pass
        else:
            _write_soup(target, parts, normalised, weights, averaged, total)
    comparison = None if reference is None else Comparison(reference.ingredient, averaged.differences)
    return SoupResult(output=target, comparison=comparison, **result)


def check_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """`weights` normalised to sum 1 (equal ones for None), or an Olmo2KitError unless there is one per
    checkpoint, each finite and 0 or more, and not all 0."""
    if weights is None:
        return [1.0 / count] * count
    values = list(weights)
    if len(values) != count:
        raise Olmo2KitError(f"{len(values)} weights for {count} checkpoints: give one weight per checkpoint")
    for w in values:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise Olmo2KitError(f"weight {w!r}: each weight is a finite number, 0 or more")
    largest = max(values)
    if not largest > 0:
        raise Olmo2KitError("the weights add up to 0: give at least one above 0")
    scaled = [w / largest for w in values]  # first, so that weights near the largest float add up without overflow
    total = math.fsum(scaled)
    return [w / total for w in scaled]


def _reference_name(compare: str, parts: list[_Checkpoint]) -> str:
    """The checkpoint `--compare` names: as any model name, or a bare revision (`main`) of the ingredients' repo."""
    try:
        resolve_model(compare)
        return compare
    except Olmo2KitError:
        repos = {p.ingredient.repo for p in parts}
        if "/" in compare or "@" in compare or len(repos) != 1 or None in repos:
            raise
        return f"{repos.pop()}@{compare}"


def _open_checkpoint(name: str, report: Callable[[str, int, int], None]) -> _Checkpoint:
    """A checkpoint resolved (downloaded from the Hub into its cache), its config and weights' layout read."""
    ref = resolve_model(name)
    if ref.local:
        directory = Path(ref.source)
        ingredient = Ingredient(name, directory.resolve())
    else:
        directory = download(ref.source, ref.revision, progress=lambda done, total: report(f"downloading {ref}",
                                                                                           done, total))
        ingredient = Ingredient(name, directory, ref.source, ref.revision or "main", directory.name)
    if (directory / "adapter_config.json").is_file():
        raise Olmo2KitError(f"{name} is a LoRA adapter: merge it into its base first (`olmo2kit merge {name} OUT`), "
                            "then soup OUT")
    if not (directory / "config.json").is_file():
        raise Olmo2KitError(f"{name} holds no config.json: it is not a checkpoint")
    config = read_config(directory / "config.json")
    checkpoint_architecture(name, config)
    tensors, layout, indexed = read_layout(directory, name)
    return _Checkpoint(ingredient, config, tensors, layout, indexed)


def read_layout(directory: Path, name: str) -> tuple[dict[str, TensorInfo], dict[str, list[str]], bool]:
    """The tensors of a checkpoint directory's safetensors files (by their index, where it has one), their files
    and whether it has an index; an Olmo2KitError naming the file for anything that is not safetensors."""
    if (directory / INDEX).is_file():
        weight_map = read_config(directory / INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise Olmo2KitError(f"{directory / INDEX} holds no weight_map: copy the checkpoint again")
        files = list(dict.fromkeys(weight_map.values()))
        for file in files:
            if not isinstance(file, str) or not _plain_name(file) or not (directory / file).is_file():
                raise Olmo2KitError(f"{directory / INDEX} names {file!r}, which is not a safetensors file beside it: "
                                    "copy the checkpoint again")
        indexed = True
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors") if not p.name.startswith("."))
        indexed = False
        if not files:
            pickled = sorted(p.name for p in directory.iterdir() if p.name.endswith(_PICKLED))
            what = f"pickled weights ({', '.join(pickled[:2])})" if pickled else "no weights"
            raise Olmo2KitError(f"{name} holds {what} and no safetensors: olmo2kit soups safetensors only "
                                "(save the checkpoint with save_pretrained, which writes them)")
    tensors: dict[str, TensorInfo] = {}
    layout: dict[str, list[str]] = {}
    for file in files:
        header = read_header(directory / file)
        layout[file] = list(header)
        for tensor, info in header.items():
            if tensor in tensors:
                raise Olmo2KitError(f"{name} holds the tensor {tensor} twice ({tensors[tensor].file.name}, {file}): "
                                    "copy the checkpoint again")
            tensors[tensor] = info
    if indexed:
        wrong = sorted(t for t in {*tensors, *weight_map} if weight_map.get(t) != (tensors[t].file.name
                                                                                   if t in tensors else None))
        if wrong:
            raise Olmo2KitError(f"{directory / INDEX} and the files it names disagree about {len(wrong)} tensors "
                                f"({', '.join(wrong[:3])}): copy the checkpoint again")
    return tensors, layout, indexed


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, in the order of their bytes; an Olmo2KitError naming the file when it
    is not safetensors, is cut short, or holds a tensor that is not bf16, fp16 or fp32."""
    def bad(why: str) -> Olmo2KitError:
        return Olmo2KitError(f"{path} is not a whole safetensors file ({why}): copy the checkpoint again")

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            length = int.from_bytes(f.read(8), "little")
            if size < 8 or length > min(HEADER_MAX_BYTES, size - 8):
                raise bad(f"a header of {length} bytes in a file of {size}")
            raw = f.read(length)
    except OSError as e:
        raise Olmo2KitError(f"cannot read {path} ({e.strerror}): check the file and its permissions") from None
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        raise bad("its header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    data_size = size - 8 - length
    metadata = header.get("__metadata__")  # null or a map of strings, as safetensors reads it
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise bad("its __metadata__ is not a map of strings to strings")
    tensors = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise bad(f"the entry of {name} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_size):
            raise bad(f"the shape or offsets of {name}")
        if dtype not in SAFETENSORS_DTYPES:
            raise Olmo2KitError(f"{path} holds {name} as {dtype}: a soup averages BF16, F16 and F32 tensors only")
        nbytes = math.prod(shape) * get_dtype(SAFETENSORS_DTYPES[dtype]).bytes
        if offsets[1] - offsets[0] != nbytes:
            raise bad(f"{name} takes {offsets[1] - offsets[0]} bytes, its shape {nbytes}")
        tensors.append((offsets[0], offsets[1], name, TensorInfo(path, dtype, tuple(shape), 8 + length + offsets[0],
                                                                  nbytes)))
    # As safetensors' own reader demands (safetensors/src/tensor.rs, Metadata::validate): sorted by offset, each
    # tensor starts where the one before ends, from 0, and the last ends where the file does.
    end = 0
    for begin, stop, name, _ in sorted(tensors):
        if begin != end:
            raise bad(f"{name} starts at byte {begin} of the data, the tensor before it ends at {end}")
        end = stop
    if end != data_size:
        raise bad(f"its tensors end at byte {end} of {data_size} bytes of data")
    return {name: info for _, _, name, info in sorted(tensors)}


def _check_same(first: _Checkpoint, other: _Checkpoint) -> None:
    """An Olmo2KitError naming what differs when `other` cannot be averaged with `first`."""
    a, b = first.ingredient.name, other.ingredient.name
    _check_architecture(first, other)
    if not _same_tokenizer(first.ingredient, other.ingredient):
        raise Olmo2KitError(f"{b} has another tokenizer than {a} (their tokenizer files differ): soup checkpoints "
                            "that share one tokenizer")
    _check_tensors(first, other, dtypes=True)


def _check_reference(first: _Checkpoint, reference: _Checkpoint) -> None:
    """A reference has the soup's architecture and tensors; its dtype may differ (both compare in fp32)."""
    _check_architecture(first, reference)
    _check_tensors(first, reference, dtypes=False)


def _check_architecture(first: _Checkpoint, other: _Checkpoint) -> None:
    mine, theirs = _architecture(first), _architecture(other)  # the first key that differs is named
    for key in sorted(mine.keys() | theirs.keys()):
        if mine.get(key) != theirs.get(key):
            raise Olmo2KitError(f"{other.ingredient.name} has another architecture than {first.ingredient.name} "
                                f"({key} {theirs.get(key)!r} against {mine.get(key)!r}): soup checkpoints of one model")


def _architecture(checkpoint: _Checkpoint) -> dict:
    """What must agree for two checkpoints' tensors to mean the same: the whole config less `BOOKKEEPING`, with
    transformers' defaults where a key is left out and the rope settings in one place (`rope_parameters`, as
    transformers 5 saves them; rope_theta and rope_scaling at the top level in configs transformers 4 saved)."""
    config = {**DEFAULTS, **{k: v for k, v in checkpoint.config.items() if k not in BOOKKEEPING}}
    if config.get("num_key_value_heads") is None:
        config["num_key_value_heads"] = config.get("num_attention_heads")
    rope: dict = {"rope_type": "default", "rope_theta": config.pop("rope_theta", 10000.0)}
    for key in ("rope_scaling", "rope_parameters"):
        settings = config.pop(key, None)
        if isinstance(settings, dict):
            rope.update({("rope_type" if k == "type" else k): v for k, v in settings.items()})
        elif settings is not None:
            rope[key] = settings  # not a map: compared as it is
    return {**config, "rope_parameters": rope}


def _same_tokenizer(first: Ingredient, other: Ingredient) -> bool:
    """Whether two checkpoints have one tokenizer: their tokenizer files byte for byte (read a piece at a time: the
    common case, and nothing parsed), else the vocabularies of their tokenizer.json (token -> id, added tokens
    included), parsed one file at a time."""
    if _files_digest(first) == _files_digest(other):
        return True
    if not ((first.directory / "tokenizer.json").is_file() and (other.directory / "tokenizer.json").is_file()):
        return False
    return _vocabulary_digest(first.directory / "tokenizer.json") == _vocabulary_digest(
        other.directory / "tokenizer.json")


def _files_digest(ingredient: Ingredient) -> str:
    """A digest of a checkpoint's tokenizer files: its tokenizer.json, or where there is none the others."""
    digest = hashlib.sha256()
    names = ["tokenizer.json"] if (ingredient.directory / "tokenizer.json").is_file() else \
        ["vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json"]
    found = False
    for name in names:
        if (ingredient.directory / name).is_file():
            found = True
            digest.update(name.encode() + b"\0")
            digest.update(bytes.fromhex(file_sha256(ingredient.directory / name)))
    if not found:
        raise Olmo2KitError(f"{ingredient.name} holds no tokenizer files: copy them from the model it came from")
    return digest.hexdigest()


def _vocabulary_digest(path: Path) -> str:
    """A digest of the vocabulary of a tokenizer.json (its model's vocab and its added tokens, token -> id); the
    parsed file is dropped before the next is read."""
    def bad(why: str) -> Olmo2KitError:
        return Olmo2KitError(f"{path} is not a tokenizer file ({why}): copy it again")

    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError):
        raise bad("not JSON") from None
    model = data.get("model") if isinstance(data, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    added = data.get("added_tokens", []) if isinstance(data, dict) else None
    if not isinstance(vocab, dict) or not isinstance(added, list) or \
            not all(isinstance(t, dict) and "content" in t and "id" in t for t in added):
        raise bad("no model.vocab map, or added_tokens that are not a list of tokens")
    tokens = {**vocab, **{t["content"]: t["id"] for t in added}}
    return hashlib.sha256(json.dumps(sorted(tokens.items(), key=repr)).encode()).hexdigest()


def _check_tensors(first: _Checkpoint, other: _Checkpoint, *, dtypes: bool) -> None:
    a, b = first.ingredient.name, other.ingredient.name
    missing = [t for t in first.tensors if t not in other.tensors]
    extra = [t for t in other.tensors if t not in first.tensors]
    if missing or extra:
        names = ", ".join((missing or extra)[:3]) + (", ..." if len(missing or extra) > 3 else "")
        what = f"lacks {len(missing)} tensors of" if missing else f"has {len(extra)} tensors besides those of"
        raise Olmo2KitError(f"{b} {what} {a} ({names}): soup checkpoints of one model")
    for tensor, info in first.tensors.items():
        theirs = other.tensors[tensor]
        if theirs.shape != info.shape:
            raise Olmo2KitError(f"{tensor} has shape {list(theirs.shape)} in {b} and {list(info.shape)} in {a}: "
                                "soup checkpoints of one model")
        if dtypes and theirs.dtype != info.dtype:
            raise Olmo2KitError(f"{tensor} is {theirs.dtype} in {b} and {info.dtype} in {a}: soup checkpoints saved "
                                "in one dtype (save one again in the other's)")


def _plain_name(name: str) -> bool:
    """A file name a soup may write: no folder, nothing hidden, a safetensors file."""
    return name.endswith(".safetensors") and "/" not in name and "\\" not in name and not name.startswith(".")


class _Averager:
    """The weighted average of each tensor, a piece at a time, in a few buffers allocated once; with a reference,
    the largest difference of each tensor from it (`differences`)."""

    def __init__(self, parts: list[_Checkpoint], weights: list[float], reference: _Checkpoint | None,
                 chunk_elements: int, done: Callable[[int], None]) -> None:
        import torch

        self.parts, self.weights, self.reference, self.done = parts, weights, reference, done
        # Equal weights average as OLMo's own soup script does (allenai/OLMo, branch peteish13-augusta-conversion,
        # scripts/olmo_soup.py, commit 58a9e5b0: `checkpoint_average[k] += state_dict[k] / len(args.checkpoints)`
        # from zeros, in the checkpoints' order and dtype, fp32 for OLMo 2's): each term divided by N, not
        # multiplied by 1/N, which rounds otherwise in about 4 elements of 10, so that `--compare main` can be 0.
        self.divisor = len(weights) if len(set(weights)) == 1 else None
        self.chunk = max(1, chunk_elements)
        largest = max(info.elements for info in parts[0].tensors.values()) if parts[0].tensors else 1
        n = min(self.chunk, max(largest, 1))
        self.sum = torch.empty(n, dtype=torch.float32)
        self.term = torch.empty(n, dtype=torch.float32)
        self.read = torch.empty(4 * n, dtype=torch.uint8)  # 4 bytes: the widest dtype read
        self.out = torch.empty(4 * n, dtype=torch.uint8)
        self.files: dict[Path, int] = {}
        self.written = 0
        self.differences: dict[str, float] = {}

    def pieces(self, tensor: str) -> Iterator[memoryview]:
        """The bytes of the average of `tensor` in its dtype, a piece at a time (each valid until the next)."""
        import torch

        info = self.parts[0].tensors[tensor]
        dtype = getattr(torch, get_dtype(SAFETENSORS_DTYPES[info.dtype]).torch_name)
        width = info.nbytes // info.elements if info.elements else 1
        largest = 0.0
        for start in range(0, info.elements, self.chunk):
            n = min(self.chunk, info.elements - start)
            total, term = self.sum[:n].zero_(), self.term[:n]
            for part, weight in zip(self.parts, self.weights, strict=True):
                if weight:
                    term.copy_(self._read(part.tensors[tensor], start, n))  # to fp32 first, then divided
                    total.add_(term.div_(self.divisor) if self.divisor else term.mul_(weight))
            out = self.out[: n * width].view(dtype)
            out.copy_(total)
            if self.reference is not None:
                term.copy_(out)
                largest = _largest([largest, float(term.sub_(self._read(self.reference.tensors[tensor], start, n))
                                                   .abs_().max())])
            self.written += n * width
            yield memoryview(self.out[: n * width].numpy())
            self.done(self.written)
        if self.reference is not None:
            self.differences[tensor] = largest

    def _read(self, info: TensorInfo, start: int, n: int):
        """Elements start..start+n of a tensor, read into the read buffer (as that tensor's dtype)."""
        import torch

        width = info.nbytes // info.elements
        buffer = self.read[: n * width]
        view = memoryview(buffer.numpy())
        offset = info.offset + start * width
        fd = self._fd(info.file)
        while view:
            try:
                got = os.preadv(fd, [view], offset)
            except OSError as e:
                raise Olmo2KitError(f"cannot read {info.file} ({e.strerror}): check the file") from None
            if not got:
                raise Olmo2KitError(f"{info.file} was cut short while the soup read it: copy the checkpoint again")
            view, offset = view[got:], offset + got
        return buffer.view(getattr(torch, get_dtype(SAFETENSORS_DTYPES[info.dtype]).torch_name))

    def _fd(self, path: Path) -> int:
        if path not in self.files:
            self.files[path] = os.open(path, os.O_RDONLY)
        return self.files[path]

    def close(self) -> None:
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()


def _largest(values) -> float:
    """The largest of `values`, NaN if any is NaN, 0 for none."""
    largest = 0.0
    for v in values:
        if math.isnan(v):
            return math.nan
        largest = max(largest, v)
    return largest


def _write_soup(target: Path, parts: list[_Checkpoint], weights: list[float], given: Sequence[float] | None,
                averaged: _Averager, total: int) -> None:
    """Write the soup into a staging directory beside `target`, then rename it into place (`files.staged_output_dir`:
    a killed run leaves its staging directory only, never part of a soup, and the next run removes it before it
    counts the free space), all under a lock (`files.output_lock`, on a file beside `target` so that it is not part
    of the soup), so that a second run into the same output is refused at once rather than at the rename."""
    # The lock file (`.NAME.soup.lock`) stays, as every output_lock file does: removing it would let a run that
    # opened it before the removal and one that creates it anew both hold "the" lock.
    make_output_dir(target.parent)
    with output_lock(target.with_name(f"{target.name}.soup"), option="--output"):
        check_new_output_dir(target)  # again, under the lock: a run that held it may have finished meanwhile
        with staged_output_dir(target, "give an --output you can write to") as staging:
            free = shutil.disk_usage(target.parent).free
            if free < total:
                raise Olmo2KitError(f"the soup needs {total / 1e9:.2f} GB in {target.parent}, which has "
                                    f"{free / 1e9:.2f} GB free: free some space or give another --output")
            _write_files(staging, parts, weights, given, averaged)
            _sync(staging)
        _sync(target.parent)


def safetensors_header(entries) -> bytes:
    """The header of a safetensors file whose tensors' bytes follow in the order of `entries` ((name, dtype tag,
    shape, bytes) each): its length first, then the JSON, padded so the bytes start 8-aligned, as the safetensors
    library writes it (the format above)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded


def _write_files(staging: Path, parts: list[_Checkpoint], weights: list[float], given: Sequence[float] | None,
                 averaged: _Averager) -> None:
    first = parts[0]
    for file, names in first.layout.items():
        entries = [(name, first.tensors[name].dtype, first.tensors[name].shape, first.tensors[name].nbytes)
                   for name in names]
        with open(staging / file, "wb") as f:
            f.write(safetensors_header(entries))
            for name in names:
                for piece in averaged.pieces(name):
                    f.write(piece)
            f.flush()
            os.fsync(f.fileno())
    if first.indexed:
        total = sum(info.nbytes for info in first.tensors.values())
        weight_map = {name: file for file, names in first.layout.items() for name in names}
        write_json_atomic(staging / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    source = first.ingredient.directory
    for item in sorted(source.iterdir()):
        if item.is_file() and (item.name in COPIED or item.name.startswith("tokenizer")):
            shutil.copyfile(item, staging / item.name)
    write_json_atomic(staging / RECORD, {
        "made_by": "olmo2kit soup",
        "ingredients": [{**p.ingredient.to_dict(), "weight": w} for p, w in zip(parts, weights, strict=True)],
        "weights_given": None if given is None else list(given),  # the weights above are these normalised
    })


def _sync(directory: Path) -> None:
    """fsync the files of `directory` (not in folders) and the directory itself, so a rename publishes them whole."""
    for item in directory.iterdir():
        if item.is_file():
            fd = os.open(item, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
