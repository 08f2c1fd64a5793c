"""OLMo-core checkpoints of OLMo 2, both ways: what OLMo's trainer loads to train on, and what it writes, back.

OLMo-core (`ai2-olmo-core`, OLMo's trainer since the 1B and 32B of OLMo 2) keeps a model as a torch distributed
checkpoint (DCP: a `.metadata` index and `*.distcp` shards, each rank writing its own), in `stepN/model_and_optim/`
beside the run's `config.json`, whose `model` entry is the `TransformerConfig`. Both ways use OLMo-core's own code:
its config (`olmo_core.nn.transformer.TransformerConfig`), its key mapping (`olmo_core.nn.hf.convert_state_from_hf`,
`convert_state_to_hf`, `get_hf_config`) and its checkpoint functions (`olmo_core.distributed.checkpoint`).

An export writes what OLMo-core's own converter writes (allenai/OLMo-core,
src/examples/huggingface/convert_checkpoint_from_hf.py): `OUT/model_and_optim/` and `OUT/config.json` holding
`{"model": ..., "dataset": {"tokenizer": ...}}`; and, for the way back without a network, the Hugging Face
tokenizer in `OUT/tokenizer/`. OLMo-core's trainer loads it as `load_path=OUT/model_and_optim`: its Checkpointer
takes a directory with a DCP index and no trainer state for model (and optimizer) weights alone
(olmo_core/train/checkpoint.py, Checkpointer.load and dir_is_checkpoint); `OUT` itself it does not take for a
checkpoint, having no `train/` state, and a trainer's `load_path=OUT` would start from scratch.

Each conversion is checked before anything is written: a probe batch runs through OLMo-core's model and through
transformers' in fp32, and logits further apart than OLMo-core's own check allows are refused. The output directory
is built beside its place and renamed into it whole.

Reading a DCP means unpickling: its `.metadata` is a pickle and each shard a `torch.save` file, which OLMo-core's
reader loads with `weights_only=False`. Checkpoints are read here through a reader that unpickles only the
checkpoint's own metadata classes and loads tensors with `weights_only=True`, so a checkpoint cannot run code. Its
config.json could, through OLMo-core's `Config.from_dict` (which imports and calls what a `_CLASS_` field names):
only OLMo-core's config classes are let through to it.

    >>> export_olmo_core("1b", "olmo2-1b-olmo-core")          # doctest: +SKIP
    >>> import_olmo_core("run/step1000", "olmo2-1b-step1000")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import logging
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from olmo2kit.errors import Olmo2KitError, first_line
from olmo2kit.files import check_new_output_dir, staged_output_dir
from olmo2kit.model.sizes import CONTEXT_LENGTH, MODEL_TYPE, read_config

log = logging.getLogger("olmo2kit")

MODEL_DIR = "model_and_optim"  # OLMo-core's Checkpointer: the model (and optimizer) state of a step
CONFIG_FILE = "config.json"  # OLMo-core's experiment config, beside model_and_optim (ConfigSaverCallback)
TOKENIZER_DIR = "tokenizer"  # olmo2kit's addition: the Hugging Face tokenizer of an exported checkpoint
# The Makefile's `make olmo-core`: OLMo-core 3.0.0 pins huggingface_hub<2 through cached-path, so it goes in
# without its declared dependencies, and the ones it uses are named.
INSTALL = ("run `make olmo-core`, or: pip install --no-deps ai2-olmo-core==3.0.0 cached-path==1.8.10 && "
           "pip install bettermap==1.3.1 dataclass-extensions==0.5.0 importlib_resources==7.1.0 "
           "google-cloud-storage==3.17.2 boto3==1.44.18")
_WRITE_HINT = "give a directory you can write to, with room for the model"
# The probe: two rows of 64 token ids drawn with a fixed seed.
PROBE_ROWS, PROBE_TOKENS, PROBE_SEED = 2, 64, 0
# OLMo-core's own check of a conversion: torch.testing.assert_close(rtol=1e-4, atol=1e-4) on the logits
# (olmo_core/nn/hf/convert_checkpoint.py, validate_conversion).
RTOL = ATOL = 1e-4
# Fields of old experiment configs that TransformerConfig no longer takes; OLMo-core's converter drops them too
# (convert_checkpoint.py, convert_checkpoint_to_hf).
_DEPRECATED_FIELDS = ("compile", "dp_config", "tp_config", "float8_config")


@dataclass(frozen=True)
class Conversion:
    """What a conversion wrote: the directory, the largest logit difference of the probe between OLMo-core's
    model and transformers', the number of tensors and parameters, and the weights' dtype."""

    path: Path
    max_logit_diff: float
    tensors: int
    parameters: int
    dtype: str


def require_olmo_core() -> None:
    """An Olmo2KitError saying how to install OLMo-core, where it is not installed."""
    # OLMo-core warns on import that NVIDIA's transformer_engine is missing (olmo_core/nn/attention/te_attn_api.py):
    # a GPU kernel library that no conversion uses.
    logging.getLogger("olmo_core.nn.attention.te_attn_api").setLevel(logging.ERROR)
    try:
        import olmo_core  # noqa: F401
    except ImportError:
        raise Olmo2KitError(f"this needs OLMo-core, OLMo's trainer: {INSTALL}") from None


def export_olmo_core(model: str, out: str | os.PathLike, *, revision: str | None = None,
                     say=log.info) -> Conversion:
    """Write the checkpoint `model` (size alias, `repo@revision`, local or fine-tuned directory, or a LoRA
    adapter, merged into its base) as an OLMo-core checkpoint in the new directory `out`, in the checkpoint's own
    dtype; an Olmo2KitError, and nothing written, where OLMo-core's model does not give transformers' logits."""
    require_olmo_core()
    out = check_new_output_dir(out)
    hf_model, tokenizer, dtype, tokenizer_ref = _load_hf(model, revision, say)
    say(f"building OLMo-core's model of {model}")
    hf_config, model_config = hf_model.config, transformer_config(hf_model.config)
    oc_model = _build(model_config)
    ids = probe_ids(hf_config.vocab_size)
    expected = logits(hf_model, ids)
    from olmo_core.nn.hf import convert_state_from_hf

    state = hf_model.state_dict()
    del hf_model  # its tensors go one by one as they are converted: one model in memory, not two
    oc_model.load_state_dict(convert_each(convert_state_from_hf, hf_config, state), assign=True)
    diff = check_logits(expected, logits(oc_model, ids), what=f"{model} in OLMo-core's model")
    tensors, parameters = _count(oc_model)
    _cast_exactly(oc_model, dtype, what=model)
    with staged_output_dir(out, _WRITE_HINT) as staging:
        from olmo_core.distributed.checkpoint import save_model_and_optim_state

        say(f"writing the OLMo-core checkpoint ({_dtype_name(dtype)}) to {out}")
        with warnings.catch_warnings():  # torch's note that a process with no process group saves alone
            warnings.simplefilter("ignore", UserWarning)
            save_model_and_optim_state(str(staging / MODEL_DIR), oc_model)
        experiment = {"model": model_config.as_config_dict(),
                      "dataset": {"tokenizer": _tokenizer_config(tokenizer, tokenizer_ref)}}
        (staging / CONFIG_FILE).write_text(json.dumps(experiment, indent=2))
        tokenizer.save_pretrained(staging / TOKENIZER_DIR)
    return Conversion(out, diff, tensors, parameters, _dtype_name(dtype))


def import_olmo_core(checkpoint: str | os.PathLike, out: str | os.PathLike, *, tokenizer: str | None = None,
                     say=log.info) -> Conversion:
    """Write the OLMo-core checkpoint `checkpoint` (a step directory its trainer wrote, `stepN/` or
    `stepN/model_and_optim/`, sharded by any number of ranks; or a directory `export_olmo_core` wrote) as a Hugging
    Face checkpoint (safetensors, config.json, tokenizer) in the new directory `out`, in the checkpoint's dtype.

    The tokenizer is `tokenizer` (a name or directory olmo2kit loads) when given, else the one an export left
    beside the checkpoint, else the one its config names (`dataset.tokenizer.identifier`, e.g.
    allenai/dolma2-tokenizer). An Olmo2KitError, and nothing written, where transformers' model does not give
    OLMo-core's logits."""
    require_olmo_core()
    weights, config_path = find_checkpoint(checkpoint)
    experiment = read_config(config_path)
    model_config = _config_of(experiment, config_path)
    out = check_new_output_dir(out)
    dtype = checkpoint_dtype(weights)
    hf_tokenizer = _tokenizer_for(weights, experiment, tokenizer, config_path)
    oc_model = _build(model_config)
    _check_shapes(oc_model, weights)  # before any memory is taken: a config's sizes may be anything
    from olmo_core.nn.hf import convert_state_to_hf

    hf_config = _olmo2_hf_config(oc_model, config_path)
    _check_tokenizer(hf_tokenizer, hf_config.vocab_size, experiment, config_path)
    _allocate(oc_model, config_path)
    say(f"reading the OLMo-core checkpoint {weights} ({_dtype_name(dtype)})")
    load_checkpoint(weights, oc_model)
    _set_token_ids(hf_config, hf_tokenizer)
    hf_config.max_position_embeddings = _context_length(hf_config, hf_tokenizer)
    ids = probe_ids(hf_config.vocab_size)
    expected = logits(oc_model, ids)
    state = oc_model.state_dict()
    del oc_model  # its tensors go one by one as they are converted: one model in memory, not two
    hf_model = _hf_model(hf_config, convert_each(convert_state_to_hf, hf_config, state))
    diff = check_logits(expected, logits(hf_model, ids), what=f"{checkpoint} in transformers' model")
    tensors, parameters = _count(hf_model)
    _cast_exactly(hf_model, dtype, what=str(checkpoint))
    with staged_output_dir(out, _WRITE_HINT) as staging:
        say(f"writing the Hugging Face checkpoint ({_dtype_name(dtype)}) to {out}")
        hf_model.save_pretrained(staging)
        hf_tokenizer.save_pretrained(staging)
    return Conversion(out, diff, tensors, parameters, _dtype_name(dtype))


def transformer_config(hf_config):
    """OLMo-core's `TransformerConfig` of an OLMo 2 transformers config: OLMo 2's blocks (norms after attention
    and feed-forward, "reordered_norm"; QK-norm over all heads) at its sizes, as OLMo-core's olmo2_* presets
    build them (olmo_core/nn/transformer/config.py), with the feed-forward width given as it is. For the four
    OLMo 2 sizes it equals the preset OLMo-core trains them with (olmo2_1B_v2, olmo2_7B, olmo2_13B, olmo2_32B)."""
    from olmo_core.config import DType
    from olmo_core.nn.feed_forward import FeedForwardConfig
    from olmo_core.nn.transformer import TransformerBlockType, TransformerConfig

    rope = getattr(hf_config, "rope_parameters", None) or {}
    unsupported = [what for what, present in (
        ("attention biases", getattr(hf_config, "attention_bias", False)),
        ("tied embeddings", getattr(hf_config, "tie_word_embeddings", False)),
        (f"RoPE scaling ({rope.get('rope_type')})", rope.get("rope_type", "default") != "default"),
        (f"the activation {hf_config.hidden_act}", hf_config.hidden_act != "silu"),
    ) if present]
    if unsupported:
        raise Olmo2KitError(f"the checkpoint has {', '.join(unsupported)}, which OLMo 2 has not: olmo2kit converts "
                            "OLMo 2's architecture only")
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", None))
    return TransformerConfig.llama_like(
        d_model=hf_config.hidden_size,
        vocab_size=hf_config.vocab_size,
        n_layers=hf_config.num_hidden_layers,
        n_heads=hf_config.num_attention_heads,
        # None when every head has its own keys and values, as OLMo-core's presets leave it
        n_kv_heads=None if hf_config.num_key_value_heads == hf_config.num_attention_heads
        else hf_config.num_key_value_heads,
        qk_norm=True,
        layer_norm_eps=hf_config.rms_norm_eps,
        rope_theta=int(theta),
        block_name=TransformerBlockType.reordered_norm,
        feed_forward=FeedForwardConfig(hidden_size=hf_config.intermediate_size, bias=False, dtype=DType.float32),
    )


def find_checkpoint(path: str | os.PathLike) -> tuple[Path, Path]:
    """(the DCP directory, the experiment config.json) of an OLMo-core checkpoint: `path` is a step directory
    (`model_and_optim/` in it) or the DCP directory itself (its config.json beside it or one level up)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise Olmo2KitError(f"no such directory: {path} (give an OLMo-core checkpoint, e.g. RUN/step1000)")
    if (path / MODEL_DIR / ".metadata").is_file():
        weights = path / MODEL_DIR
    elif (path / ".metadata").is_file():
        weights = path
    else:
        steps = sorted((p for p in path.glob("step*") if (p / MODEL_DIR / ".metadata").is_file()),
                       key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else -1)
        if steps:
            raise Olmo2KitError(f"{path} holds the checkpoints of a run ({', '.join(p.name for p in steps[-3:])}): "
                                f"give one of them, e.g. {steps[-1]}")
        raise Olmo2KitError(f"{path} is not an OLMo-core checkpoint: it holds no {MODEL_DIR}/.metadata (a torch "
                            "distributed checkpoint); give a step directory its trainer wrote, e.g. RUN/step1000")
    for place in (weights.parent, weights) if weights.name == MODEL_DIR else (weights, weights.parent):
        if (place / CONFIG_FILE).is_file():
            return weights, place / CONFIG_FILE
    raise Olmo2KitError(f"no {CONFIG_FILE} beside {weights}: OLMo-core's trainer writes the run's config there "
                        "(its ConfigSaverCallback); copy it from the run's save folder")


def checkpoint_dtype(weights: Path):
    """The dtype of the model's weights in the DCP directory `weights`: one for all of them, or an Olmo2KitError."""
    tensors = _model_tensors(weights)
    if "embeddings.weight" not in tensors:
        raise Olmo2KitError(f"{weights} holds no model.embeddings.weight: it is not an OLMo-core model's checkpoint")
    dtypes = {entry.properties.dtype for entry in tensors.values()}
    if len(dtypes) > 1:
        named = ", ".join(f"{_dtype_name(d)} ({next(n for n, e in tensors.items() if e.properties.dtype == d)})"
                          for d in sorted(dtypes, key=str))
        raise Olmo2KitError(f"{weights} holds the model's weights in several dtypes ({named}): olmo2kit writes a "
                            "checkpoint in one; cast them to one with OLMo-core first")
    return dtypes.pop()


def _model_tensors(weights: Path) -> dict:
    """The model's tensors in the DCP index of `weights`: {name in the model: TensorStorageMetadata}."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return {name.removeprefix("model."): entry for name, entry in read_metadata(weights).state_dict_metadata.items()
            if name.startswith("model.") and isinstance(entry, TensorStorageMetadata)}


def _check_shapes(oc_model, weights: Path) -> None:
    """An Olmo2KitError where the model `oc_model` (on meta: no memory) does not have the tensors, by name and
    shape, that the DCP index of `weights` holds."""
    stored = _model_tensors(weights)
    for name, tensor in oc_model.state_dict().items():
        entry = stored.get(name)
        if entry is None:
            raise Olmo2KitError(f"{weights} holds no model.{name}, which the model of its config.json has: give the "
                                "config of this run")
        if tuple(entry.size) != tuple(tensor.shape):
            raise Olmo2KitError(f"{weights} holds model.{name} of shape {tuple(entry.size)} where its config.json "
                                f"makes {tuple(tensor.shape)}: give the config of this run")


def read_metadata(weights: Path):
    """The DCP index (`.metadata`) of `weights`, unpickled with only the classes a DCP index holds."""
    path = weights / ".metadata"
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except OSError as e:
        raise Olmo2KitError(f"cannot read {path} ({e.strerror}): check the checkpoint") from None
    except Exception as e:  # a pickle of the allowed classes may be built to fail in any way
        raise Olmo2KitError(f"{path} is not a torch distributed checkpoint's index ({first_line(e)}): copy the "
                            "checkpoint again") from None
    problem = _index_problem(metadata)
    if problem:
        raise Olmo2KitError(f"{path} is not a torch distributed checkpoint's index ({problem}): copy the checkpoint "
                            "again")
    return metadata


def _index_problem(metadata) -> str | None:
    """What is wrong with an unpickled DCP index, as torch's reader and olmo2kit use it; None when nothing is. A
    shard is a file name in the checkpoint's directory, never a path out of it."""
    import torch
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    if not isinstance(metadata, Metadata):
        return f"it holds a {type(metadata).__name__}"
    entries, storage = metadata.state_dict_metadata, metadata.storage_data
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        return "it lists no tensors and shards"
    for name, entry in entries.items():
        if not isinstance(name, str) or not isinstance(entry, (TensorStorageMetadata, BytesStorageMetadata)):
            return f"an entry {name!r} is no tensor"
        if isinstance(entry, TensorStorageMetadata) and not (
                isinstance(entry.properties, TensorProperties) and isinstance(entry.properties.dtype, torch.dtype)
                and isinstance(entry.size, torch.Size) and isinstance(entry.chunks, list)):
            return f"the entry {name} has no dtype, size or chunks"
    for index, info in storage.items():
        where = getattr(info, "relative_path", None)
        if not isinstance(index, MetadataIndex) or type(info).__name__ != "_StorageInfo":
            return "a shard entry is not one"
        if not isinstance(where, str) or where in ("", ".", "..") or os.path.basename(where) != where \
                or "\\" in where:
            return f"a shard is at {where!r}, not a file of the checkpoint's directory"
        if not all(isinstance(getattr(info, n, None), int) for n in ("offset", "length")):
            return f"the shard {where} has no offset and length"
    return None


# What a DCP index unpickles to: torch's checkpoint metadata (torch/distributed/checkpoint/metadata.py), the shard
# locations of OLMo-core's writer and of torch's own, sizes, layouts and dtypes. Anything else is refused.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "olmo_core.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch":
            import torch

            if name == "Size" or isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which no checkpoint index holds")


def load_checkpoint(weights: Path, oc_model) -> None:
    """Load the model state of the DCP directory `weights` into the OLMo-core model `oc_model` (in place, in its
    dtype), through OLMo-core's reader with tensors loaded as weights only and no pickled objects read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    state = {"model": oc_model.state_dict()}
    try:
        with warnings.catch_warnings():  # torch's note that a process with no process group loads alone
            warnings.simplefilter("ignore", UserWarning)
            dcp.state_dict_loader.load(state, checkpoint_id=str(weights), storage_reader=_safe_reader(weights))
    except Olmo2KitError:
        raise
    except (Exception, CheckpointException) as e:  # DCP wraps each failure (a shape, a short file) in its own,
        # a BaseException (torch/distributed/checkpoint/api.py)
        raise Olmo2KitError(f"cannot read the model of {weights} ({_dcp_failure(e)}): the checkpoint does not "
                            "match its config.json, or a shard is missing or cut short") from None
    oc_model.load_state_dict(state["model"])


def _dcp_failure(error: Exception) -> str:
    """The line that says what went wrong, from DCP's wrapped failures (CheckpointException lists each rank's)."""
    from olmo_core.exceptions import OLMoCheckpointError

    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        error = next(iter(failures.values()))
        if isinstance(error, tuple) and error:  # (exception, frames): torch's WRAPPED_EXCEPTION
            error = error[0]
        error = getattr(error, "exc", error)
    if isinstance(error, OLMoCheckpointError):  # its message lists every file it tried, the failure last
        return (str(error).strip().splitlines() or [type(error).__name__])[-1].strip()
    return first_line(error)


def _safe_reader(weights: Path):
    """OLMo-core's DCP reader (local or remote paths, its shard layout) reading the index with
    `_MetadataUnpickler`, and tensors with `torch.load(weights_only=True)`; pickled objects are refused."""
    import torch
    from olmo_core.distributed.checkpoint.filesystem import RemoteFileSystemReader, _narrow_tensor_by_index
    from torch.distributed.checkpoint.metadata import StorageMeta
    from torch.distributed.checkpoint.planner import LoadItemType
    from torch.futures import Future

    class SafeReader(RemoteFileSystemReader):
        def read_metadata(self):
            if self._metadata is None:
                metadata = read_metadata(Path(self.path))
                if getattr(metadata, "storage_meta", None) is None:
                    metadata.storage_meta = StorageMeta()
                metadata.storage_meta.load_id = self.load_id
                self._metadata = metadata
            return self._metadata

        def read_data(self, plan, planner):
            for item in plan.items:  # as RemoteFileSystemReader.read_data, one item at a time
                if item.type == LoadItemType.BYTE_IO:
                    raise Olmo2KitError(f"{weights} holds a pickled object where the model's tensors are: "
                                        "olmo2kit reads tensors only")
                _, content = self._get_content_for_read(item)
                tensor = torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
                tensor = _narrow_tensor_by_index(tensor, item.storage_offsets, item.lengths)
                target = planner.resolve_tensor(item).detach()
                if target.size() != tensor.size():
                    raise Olmo2KitError(f"{weights} holds {item.storage_index.fqn} of shape {tuple(tensor.size())} "
                                        f"where its config.json makes {tuple(target.size())}: give the config of "
                                        "this run")
                target.copy_(tensor)
                planner.commit_tensor(item, target)
            done: Future = Future()
            done.set_result(None)
            return done

    return SafeReader(str(weights), thread_count=1)


def convert_each(convert, hf_config, state: dict) -> dict:
    """`convert` (OLMo-core's convert_state_from_hf or convert_state_to_hf) of `state`, a tensor at a time, each
    taken out of `state` as it is converted. OLMo 2's mapping is one name to one name, and the converter copies:
    each tensor is checked to come out as it went in, under a name no other took, else an Olmo2KitError."""
    import torch

    converted = {}
    for name in list(state):
        source = state.pop(name)
        one = convert(hf_config, {name: source})
        new_name, tensor = next(iter(one.items())) if len(one) == 1 else (None, None)
        if new_name is None or new_name in converted or tensor.shape != source.shape \
                or not torch.allclose(tensor, source, rtol=0, atol=0, equal_nan=True):  # a NaN is checked later
            raise Olmo2KitError(f"OLMo-core's mapping did not copy {name} to one tensor as it is: nothing written; "
                                "the installed OLMo-core converts OLMo 2 otherwise than olmo2kit expects (3.0.0)")
        converted[new_name] = tensor
    return converted


def probe_ids(vocab_size: int):
    """The probe batch: PROBE_ROWS rows of PROBE_TOKENS token ids, the same every time."""
    import torch

    generator = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randint(0, vocab_size, (PROBE_ROWS, PROBE_TOKENS), generator=generator)


def logits(model, ids):
    """The fp32 logits of `model` (transformers' or OLMo-core's, which it leaves in fp32) on `ids`."""
    import torch

    model.float().eval()
    with torch.no_grad():
        out = model(input_ids=ids)
    return getattr(out, "logits", out)


def check_logits(expected, got, *, what: str) -> float:
    """The largest difference between the probe's logits `expected` (from the checkpoint as it was read) and `got`
    (from the converted model); an Olmo2KitError naming `what` where they differ by more than OLMo-core's own check
    allows, or are not finite."""
    import torch

    if not torch.isfinite(got).all() or not torch.isfinite(expected).all():
        raise Olmo2KitError(f"{what} gives logits that are not finite on a probe batch: nothing written; the "
                            "checkpoint's weights hold NaN or infinity")
    diff = (expected - got).abs()
    largest = float(diff.max())
    if not torch.all(diff <= ATOL + RTOL * expected.abs()):
        raise Olmo2KitError(f"{what} does not give the same logits as the checkpoint (largest difference "
                            f"{largest:.3g}, over {ATOL:g} + {RTOL:g} x |logit|): nothing written; the checkpoint's "
                            "weights do not fit its config, or a tensor is damaged")
    return largest


def _load_hf(model: str, revision: str | None, say):
    """The transformers model of `model` in fp32 on the CPU (an adapter merged), its tokenizer, the dtype of its
    weights as saved, and the ModelRef its tokenizer was loaded from."""
    from olmo2kit.model.loading import load, resolve_model

    resolve_model(model, revision)  # a name that is no model is said before any loading is
    say(f"loading {model}")
    loaded, tokenizer = load(model, revision=revision, dtype="fp32", device="cpu")
    weights_ref, tokenizer_ref = _sources(model, revision)
    if hasattr(loaded, "merge_and_unload"):  # a LoRA adapter on its base
        loaded = loaded.merge_and_unload()
    return loaded, tokenizer, _saved_dtype(weights_ref), tokenizer_ref


def _sources(model: str, revision: str | None):
    """(where the weights of `model` come from, where its tokenizer comes from), as ModelRefs, as `load` takes them:
    a LoRA adapter's weights are its base's (at the revision its adapter_config.json gives), and so is its tokenizer
    unless the adapter directory holds one (olmo2kit/model/loading.py, _load_adapter)."""
    from olmo2kit.model.loading import resolve_model

    ref = resolve_model(model, revision)
    folder = Path(ref.source)
    if not (ref.local and (folder / "adapter_config.json").is_file()):
        return ref, ref
    adapter = json.loads((folder / "adapter_config.json").read_text())  # `load` has checked it
    base = resolve_model(adapter["base_model_name_or_path"], adapter.get("revision"))
    return base, ref if (folder / "tokenizer_config.json").exists() else base


def _saved_dtype(ref):
    """The dtype the config.json at `ref` (its revision: the one loaded) gives for its weights; fp32 if none."""
    import torch
    from transformers import AutoConfig

    try:
        saved = AutoConfig.from_pretrained(ref.source, revision=ref.revision, local_files_only=True,
                                           trust_remote_code=False)
    except (OSError, ValueError):
        return torch.float32
    dtype = getattr(saved, "dtype", None) or getattr(saved, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _build(model_config):
    """OLMo-core's model of `model_config` on meta (no memory: weights are assigned, or given memory by
    `_allocate` once their shapes are checked), with its plain-torch attention (as OLMo-core's converter runs it:
    no flash attention on a CPU). It has no buffers: every tensor is a weight."""
    from olmo_core.nn.attention import AttentionBackendName, AttentionConfig
    from olmo_core.nn.transformer import TransformerBlockConfig

    model_config = copy.deepcopy(model_config)
    block = model_config.block
    if not isinstance(block, TransformerBlockConfig) or not isinstance(block.sequence_mixer, AttentionConfig) \
            or block.feed_forward_moe is not None or model_config.block_overrides:
        raise Olmo2KitError("the checkpoint's model is not OLMo 2's (its blocks are not attention and one "
                            "feed-forward, the same in every layer): olmo2kit converts OLMo 2 only")
    block.sequence_mixer.backend = AttentionBackendName.torch
    block.sequence_mixer.use_flash = None
    try:
        built = model_config.build(init_device="meta")
    except Exception as e:  # OLMo-core's configuration errors, of many types
        raise Olmo2KitError(f"OLMo-core cannot build the checkpoint's model ({first_line(e)}): give the config.json "
                            "of its run") from None
    return built


def _allocate(oc_model, config_path) -> None:
    """Give the model `oc_model`, built on meta, its (empty) tensors in CPU memory, or an Olmo2KitError."""
    try:
        oc_model.to_empty(device="cpu")
    except (RuntimeError, MemoryError) as e:  # torch's CPU allocator raises RuntimeError ("can't allocate memory")
        raise Olmo2KitError(f"there is no memory for the model of {config_path} ({first_line(e)}): run it where "
                            "there is more") from None


def _cast_exactly(module, dtype, *, what: str) -> None:
    """Cast `module` to `dtype` in place, a weight at a time (each old one freed as it goes), where every weight keeps
    its values exactly; else an Olmo2KitError naming the first that would not (the module is then part cast, and not
    to be written)."""
    import torch

    for owner in module.modules():
        for name, param in owner.named_parameters(recurse=False):
            cast = param.data.to(dtype)
            if not torch.equal(cast.to(param.dtype), param.data):
                raise Olmo2KitError(f"a weight of {what} ({name}) is not exactly representable in "
                                    f"{_dtype_name(dtype)}, the dtype its checkpoint gives: nothing written, as the "
                                    "cast would change its weights; fix the dtype in its config.json")
            param.data = cast
    module.to(dtype)  # what is not a parameter (buffers computed from the config)


def _config_of(experiment: dict, config_path: Path):
    """The `TransformerConfig` of an experiment config (its `model` entry)."""
    from olmo_core.nn.transformer import TransformerConfig

    model = experiment.get("model")
    if not isinstance(model, dict):
        raise Olmo2KitError(f"{config_path} has no model entry: it is not an OLMo-core experiment config")
    model = {k: v for k, v in copy.deepcopy(model).items() if k not in _DEPRECATED_FIELDS}
    _check_classes(model, config_path)
    try:
        return TransformerConfig.from_dict(model)
    except Exception as e:  # from_dict raises what the dataclasses raise
        raise Olmo2KitError(f"the model entry of {config_path} is not a TransformerConfig OLMo-core 3.0 reads "
                            f"({first_line(e)})") from None


# A `_CLASS_` of a config: an OLMo-core module (dotted identifiers) and a name in it.
_CONFIG_CLASS = re.compile(r"(?P<module>olmo_core(?:\.[A-Za-z_]\w*)+)\.(?P<name>[A-Za-z_]\w*)")


def _check_classes(entry: dict, config_path: Path) -> None:
    """An Olmo2KitError where a `_CLASS_` field of the config `entry` names anything but one of OLMo-core's config
    classes. OLMo-core's Config.from_dict imports the module a `_CLASS_` names and calls what it finds there with
    the entry's fields (olmo_core/config.py): a config.json naming any other function would run it. The name is
    checked before its module is imported. as_config_dict writes a `_CLASS_` for each dataclass a config holds
    (Config subclasses, and any other dataclass), and enums as their values: so a class defined in OLMo-core that is
    a Config or a dataclass is let through, and nothing else."""
    from importlib import import_module

    from olmo_core.config import Config

    stack = [entry]
    while stack:  # a loop, not recursion: a config may nest deeper than Python's stack
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        if not isinstance(node, dict):
            continue
        stack.extend(node.values())
        if Config.CLASS_NAME_FIELD not in node:
            continue
        named = node[Config.CLASS_NAME_FIELD]
        match = _CONFIG_CLASS.fullmatch(named) if isinstance(named, str) else None
        found = None
        if match:
            try:
                found = getattr(import_module(match["module"]), match["name"], None)
            except Exception:  # an OLMo-core module that does not import here (one needing beaker, say)
                found = None
        if not (isinstance(found, type) and found.__module__.startswith("olmo_core.")
                and (issubclass(found, Config) or dataclasses.is_dataclass(found))):
            raise Olmo2KitError(f"{config_path} names {str(named)[:80]!r} as a class (_CLASS_), which is not one of "
                                "OLMo-core's config classes: refused unread, as OLMo-core would call it; give the "
                                "config.json its trainer wrote")


def _olmo2_hf_config(oc_model, config_path: Path):
    """OLMo-core's transformers config of `oc_model` (its get_hf_config), or an Olmo2KitError where it is not
    OLMo 2's."""
    from olmo_core.nn.hf import get_hf_config

    try:
        hf_config = get_hf_config(oc_model)
    except (NotImplementedError, ValueError, RuntimeError) as e:
        raise Olmo2KitError(f"OLMo-core has no transformers model for the model of {config_path} "
                            f"({first_line(e)}): olmo2kit converts OLMo 2 only") from None
    if hf_config.model_type != MODEL_TYPE:
        raise Olmo2KitError(f"the model of {config_path} is {hf_config.model_type}, not OLMo 2 ({MODEL_TYPE}): "
                            "olmo2kit converts OLMo 2 only")
    hf_config.architectures = ["Olmo2ForCausalLM"]
    return hf_config


def _hf_model(hf_config, state: dict):
    """transformers' OLMo 2 model of `hf_config` holding the tensors of `state` (not copied)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(hf_config)
    missing, unexpected = hf_model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise Olmo2KitError(f"OLMo-core's mapping left {len(missing)} weights missing and {len(unexpected)} "
                            "unexpected: the checkpoint is not OLMo 2's")
    rotary = hf_model.model.rotary_emb  # its buffers are computed from the config, not loaded: made here
    hf_model.model.rotary_emb = type(rotary)(config=hf_config)
    hf_model.generation_config = GenerationConfig(bos_token_id=hf_config.bos_token_id,
                                                  eos_token_id=hf_config.eos_token_id,
                                                  pad_token_id=hf_config.pad_token_id)
    return hf_model.eval()


def _tokenizer_for(weights: Path, experiment: dict, tokenizer: str | None, config_path: Path):
    """The Hugging Face tokenizer to write beside an imported checkpoint (see `import_olmo_core`)."""
    from olmo2kit.model.loading import load_tokenizer

    if tokenizer is None:
        for place in (weights.parent, weights):
            if (place / TOKENIZER_DIR / "tokenizer_config.json").is_file():
                tokenizer = str(place / TOKENIZER_DIR)
                break
    if tokenizer is None:
        named = _dataset_tokenizer(experiment).get("identifier")
        if not isinstance(named, str) or not named:
            raise Olmo2KitError(f"{config_path} names no tokenizer (dataset.tokenizer.identifier): give one with "
                                "--tokenizer, e.g. allenai/dolma2-tokenizer or the directory of a checkpoint")
        tokenizer = named
    return load_tokenizer(tokenizer)


def _dataset_tokenizer(experiment: dict) -> dict:
    """The run's tokenizer config (`dataset.tokenizer`, OLMo-core's TokenizerConfig), {} where there is none."""
    dataset = experiment.get("dataset")
    named = dataset.get("tokenizer") if isinstance(dataset, dict) else None
    return named if isinstance(named, dict) else {}


def _check_tokenizer(tokenizer, vocab_size: int, experiment: dict, config_path: Path) -> None:
    """An Olmo2KitError where `tokenizer` does not fit the model (more tokens than its embeddings have rows) or
    is not the run's (its config's dataset.tokenizer gives another size or end-of-text token)."""
    if len(tokenizer) > vocab_size:
        raise Olmo2KitError(f"the tokenizer has {len(tokenizer):,} tokens, more than the {vocab_size:,} the model "
                            f"of {config_path} has embeddings for: give the run's tokenizer with --tokenizer")
    run = _dataset_tokenizer(experiment)
    for field, have in (("vocab_size", len(tokenizer)), ("eos_token_id", tokenizer.eos_token_id)):
        want = run.get(field)
        if isinstance(want, int) and not isinstance(want, bool) and want != have:
            raise Olmo2KitError(f"the tokenizer has {field} {have}, where the run's ({config_path}, dataset.tokenizer)"
                                f" has {want}: give the run's tokenizer with --tokenizer")


def _tokenizer_config(tokenizer, ref) -> dict:
    """OLMo-core's TokenizerConfig of `tokenizer`, loaded from `ref`, as its `config.json` keeps it
    (olmo_core/data/tokenizer.py)."""
    # "a path or HuggingFace identifier" (TokenizerConfig.identifier): the checkpoint's, so that the steps a
    # trainer writes from it, whose config.json carries this on, name their tokenizer
    return {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
            "identifier": str(Path(ref.source).expanduser().resolve()) if ref.local else ref.source}


def _context_length(hf_config, tokenizer) -> int:
    """The context to write in config.json, where OLMo-core's exporter writes -1 (olmo_core/nn/hf/config.py,
    get_hf_config): the size table's for an OLMo 2 size, else the tokenizer's `model_max_length` where it gives one
    (OLMo-core's converter takes it from there too), else the size table's."""
    from olmo2kit.model.sizes import SIZES, Size

    architecture = Size.from_config("the checkpoint", hf_config)
    if any(size.same_architecture(architecture) for size in SIZES.values()):
        return CONTEXT_LENGTH
    given = getattr(tokenizer, "model_max_length", None)
    return given if isinstance(given, int) and 0 < given <= 1 << 20 else CONTEXT_LENGTH


def _set_token_ids(hf_config, tokenizer) -> None:
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(hf_config, name, getattr(tokenizer, name))


def _count(module) -> tuple[int, int]:
    state = module.state_dict()
    return len(state), sum(t.numel() for t in state.values())


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")
