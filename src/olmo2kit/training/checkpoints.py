"""Training checkpoints: checkpoints/step-N written whole or not at all, found and loaded again for --resume,
with the RNG state and the identity of the run that wrote them.

A checkpoint holds the trainable weights and the optimizer as torch.distributed.checkpoint (DCP) shards, each
process writing its own part (nothing is gathered whole, and a checkpoint loads on another number of processes),
each process's RNG state, and state.json: the step, the tokens so far and the run's identity, which
a resumed run must share. The learning rate and the data order are functions of the step and the
seed, so nothing else is needed to continue exactly.

The trained model of a sharded run is written by `save_weights_from_shards`, a tensor at a time, so that no process
ever holds the whole model either.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

from olmo2kit.devices import dtype_name
from olmo2kit.errors import Olmo2KitError
from olmo2kit.files import file_stamp, write_json_atomic
from olmo2kit.model.soup import INDEX, SAFETENSORS_DTYPES, safetensors_header
from olmo2kit.training.config import FinetuneConfig
from olmo2kit.training.data import PreferenceData, PreparedData

log = logging.getLogger("olmo2kit")

CHECKPOINTS = "checkpoints"
# save_pretrained's own default shard size (transformers 5.19, PreTrainedModel.save_pretrained's max_shard_size), so a
# sharded run writes the same files as one process: a single model.safetensors up to the 7B in fp32.
MAX_SHARD_SIZE = "50GB"
# Identity keys a checkpoint may lack, with the value its absence means.
_IDENTITY_DEFAULTS = {"val_fraction": 0.0, "method": "sft", "beta": None, "dpo_loss": None, "mixed_precision": False}
_OLD_LAYOUT = "trainable.safetensors"  # what olmo2kit wrote before DCP checkpoints: whole tensors, optimizer.pt


def data_identity(data: PreparedData | PreferenceData) -> dict:
    """The data a run trains on: its directory and the stamps of its arrays' files (rewritten data changes them)."""
    files = [array.filename for array in vars(data).values() if isinstance(array, np.memmap)]
    return {"path": str(data.path.resolve()), "files": {Path(f).name: file_stamp(os.stat(f)) for f in sorted(files)}}


def run_identity(config: FinetuneConfig, data: PreparedData | PreferenceData, global_batch: int, seq_len: int
                 ) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint. The starting model's weights join it
    once the model is loaded (`check_same_start`)."""
    return {
        "model": config.model, "revision": config.revision, "lora": config.lora, "lora_r": config.lora_r,
        "lora_alpha": config.lora_alpha, "quantize": config.quantize, "seed": config.seed,
        "global_batch": global_batch, "seq_len": seq_len, "val_fraction": config.val_fraction,
        "method": config.method, "beta": config.beta, "dpo_loss": config.dpo_loss, "data": data_identity(data),
        # bf16 compute changes every step's numbers; --fsdp and the process count may change (DCP reshards).
        "mixed_precision": config.mixed_precision,
    }


def staging_dir(output: Path, step: int) -> Path:
    """Where the checkpoint of `step` is written before it is renamed checkpoints/step-N once whole."""
    return output / CHECKPOINTS / f".step-{step}.tmp"


def saved_checkpoints(output: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (a checkpoint is renamed into place only once whole)."""
    found = []
    for path in (output / CHECKPOINTS).glob("step-*"):
        step = path.name.removeprefix("step-")
        if step.isdigit() and (path / "state.json").exists():
            found.append((int(step), path))
    return sorted(found)


def checkpoint_to_resume(output: Path, config: FinetuneConfig) -> Path | None:
    if not config.resume:
        return None
    found = saved_checkpoints(output)
    if not found:
        log.warning(f"--resume: no checkpoint in {output / 'checkpoints'} yet, so training starts at step 0")
    return found[-1][1] if found else None


def _state(checkpoint: Path) -> dict:
    """`checkpoint`'s state.json (written atomically, so only a damaged disk or a hand edit spoils it)."""
    try:
        state = json.loads((checkpoint / "state.json").read_text())
        if isinstance(state, dict) and {"step", "tokens", "identity"} <= state.keys():
            return state
    except (OSError, ValueError):
        pass
    raise Olmo2KitError(f"{checkpoint}/state.json is unreadable: delete {checkpoint} to resume from the checkpoint "
                        "before it, or pick another --output")


def check_same_run(checkpoint: Path, identity: dict) -> None:
    saved = {**_IDENTITY_DEFAULTS, **_state(checkpoint)["identity"]}
    differ = [key for key in identity if saved.get(key) != identity[key]]
    if differ:
        details = "; ".join(f"{key}: {saved.get(key)!r} then, {identity[key]!r} now" for key in differ)
        raise Olmo2KitError(
            f"{checkpoint} is from a different run ({details}): resume with the same settings, "
            "or pick another --output"
        )


def check_same_start(checkpoint: Path, weights) -> None:
    """Refuse to resume from starting weights other than the ones `checkpoint`'s run started from (a directory
    rewritten, a Hub branch that moved): a LoRA base or DPO reference would silently change mid-run."""
    saved = _state(checkpoint)["identity"]
    if "weights" in saved and saved["weights"] != weights:  # checkpoints from before weights were recorded lack it
        raise Olmo2KitError(f"the starting model's weights changed since {checkpoint.name} was written: resume with "
                            "the same weights, or pick another --output")


def state_dict_options(**options):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **options)


def _trainable_names(model, accelerator) -> set[str]:
    return set(_trainable_shapes(model, accelerator))


def _sharded_state(model, optimizer, accelerator) -> dict:
    """This process's part of the trainable weights and the optimizer: FSDP shards stay shards (DTensors), so
    nothing is gathered; DCP writes and reads each process's part, and reshards on load to another process count."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # Frozen weights (the base of a LoRA run) come back from the base model; only what trains is saved.
    weights, optim = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    names = _trainable_names(model, accelerator)
    return {"model": {k: v for k, v in weights.items() if k in names}, "optimizer": optim}


def save_checkpoint(output: Path, step: int, tokens: int, identity: dict, model, optimizer, accelerator,
                     config: FinetuneConfig) -> None:
    """Write checkpoints/step-N whole or not at all: each process writes its shards into a temporary directory
    (torch.distributed.checkpoint), renamed by the first process once every process has written."""
    import torch
    import torch.distributed.checkpoint as dcp

    root = output / CHECKPOINTS
    staging = staging_dir(output, step)
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with _alone_quietly():
        dcp.save(_sharded_state(model, optimizer, accelerator), checkpoint_id=staging)
    torch.save(_rng_state(), staging / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        # The learning rate is a function of the step, so the step is the whole scheduler state;
        # the data order is a function of the seed and the step.
        write_json_atomic(staging / "state.json", {"step": step, "tokens": tokens, "identity": identity,
                                                   "processes": accelerator.num_processes})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        fsync_tree(staging)
        final = root / f"step-{step}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        fsync_dir(root)  # the rename itself reaches the disk: a crash after it cannot bring the staging name back
        for _, old in saved_checkpoints(output)[:-config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(checkpoint: Path, model, optimizer, accelerator) -> tuple[int, int]:
    """Load `checkpoint` into `model` and `optimizer`, on any number of processes (DCP reshards what it reads);
    return its (step, tokens)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _state(checkpoint)
    damaged = f"{checkpoint} is damaged or incomplete"
    what_to_do = f"delete {checkpoint} to resume from the checkpoint before it, or pick another --output"
    if not (checkpoint / ".metadata").is_file():
        if (checkpoint / _OLD_LAYOUT).is_file():
            raise Olmo2KitError(f"{checkpoint} was written by an olmo2kit before sharded checkpoints: resume it "
                                "with that version, or pick another --output")
        raise Olmo2KitError(f"{damaged} (no .metadata): {what_to_do}")
    try:
        metadata = dcp.FileSystemReader(checkpoint).read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 - a damaged file fails in pickle, OSError, EOFError ... alike
        raise Olmo2KitError(f"{damaged} (.metadata: {_first_line(e)}): {what_to_do}") from None
    saved = {key.removeprefix("model."): tuple(getattr(m, "size", ())) for key, m in metadata.items()
             if key.startswith("model.")}
    shapes = _trainable_shapes(model, accelerator)
    if saved.keys() != shapes.keys():
        raise Olmo2KitError(f"{checkpoint} does not hold this model's trainable weights: pick another --output")
    differ = [name for name in shapes if saved[name] != shapes[name]]
    if differ:
        raise Olmo2KitError(f"{checkpoint} holds weights of other shapes than this model's ({differ[0]}: "
                            f"{list(saved[differ[0]])} there, {list(shapes[differ[0]])} here): resume with the model "
                            "it was written from, or pick another --output")
    sharded = _sharded_state(model, optimizer, accelerator)
    rng = checkpoint / f"rng-{accelerator.process_index}.pt"
    try:
        with _alone_quietly():
            dcp.load(sharded, checkpoint_id=checkpoint)  # every process raises when any one's read fails
        rng_state = torch.load(rng, weights_only=True) if rng.exists() else None  # none on more processes than then
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - pickle, EOFError, OSError alike
        raise Olmo2KitError(f"{damaged} ({_first_line(e)}): {what_to_do}") from None
    set_state_dict(model, optimizer, model_state_dict=sharded["model"], optim_state_dict=sharded["optimizer"],
                   options=StateDictOptions(strict=False))
    if rng_state is not None:
        _set_rng_state(rng_state)
    return state["step"], state["tokens"]


def _first_line(error: BaseException) -> str:
    """What went wrong, in a few words; for DCP's CheckpointException (a BaseException gathering each process's
    failure, torch/distributed/checkpoint/api.py), the first process's."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]  # (exception, traceback summary)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    first = lines[0] if len(lines[0]) <= 200 else lines[0][:200].rsplit(" ", 1)[0] + " ..."  # a word, not half
    return f"{type(error).__name__}: {first}"


def _trainable_shapes(model, accelerator) -> dict[str, tuple[int, ...]]:
    """The whole shape of each trainable weight, by the names DCP saves them under (a shard's DTensor has it too)."""
    unwrapped = accelerator.unwrap_model(model)
    return {name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", ""): tuple(p.shape)
            for name, p in unwrapped.named_parameters() if p.requires_grad}


def sharded(model) -> bool:
    """Whether `model`'s weights are FSDP shards (DTensors): no process holds them whole."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def save_weights_from_shards(model, directory: Path, main: bool, max_shard_size: str = MAX_SHARD_SIZE) -> None:
    """Write the weights of `model`, sharded by FSDP, into `directory` as save_pretrained writes them
    (model.safetensors, or numbered files and their index; tied weights once), every process taking part.

    The files' headers are written first, from the tensors' shapes; then each tensor in turn is gathered whole
    (`DTensor.full_tensor`, every process) and the first process appends its bytes to its file, so no process holds
    more than one gathered tensor (and the gather's buffers) beside its own shards. Only the first process (`main`)
    writes.
    """
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from torch.distributed.tensor import DTensor
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = model.state_dict()  # FSDP2 keeps the module's names; its tensors are this process's shards
    shapes = {name: torch.empty(t.shape, dtype=t.dtype, device="meta") for name, t in state.items()}
    # Which names save_pretrained keeps of tied weights, and how it splits files: its own functions, on the shapes.
    shapes = remove_tied_weights_from_state_dict(shapes, model)
    plan = split_torch_state_dict_into_shards(shapes, max_shard_size=max_shard_size)
    tags = {dtype: tag for tag, dtype in SAFETENSORS_DTYPES.items()}
    for file, names in plan.filename_to_tensors.items():
        with (open(directory / file, "wb") if main else nullcontext()) as out:
            if out is not None:
                out.write(safetensors_header([(name, tags[dtype_name(shapes[name].dtype)], shapes[name].shape,
                                                shapes[name].numel() * shapes[name].element_size())
                                               for name in names]))
            for name in names:
                tensor = state[name]
                whole = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
                if out is not None:
                    out.write(whole.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
                del whole
    if main and plan.is_sharded:
        write_json_atomic(directory / INDEX, {"metadata": {"total_parameters": sum(t.numel() for t in shapes.values()),
                                                           **plan.metadata}, "weight_map": plan.tensor_to_filename})


@contextmanager
def _alone_quietly() -> Iterator[None]:
    """Without a process group (one process), DCP reads and writes alone, as meant, and warns that it assumes so."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*unavailable or uninitialized")
        yield


def _rng_state() -> dict:
    """The random state dropout draws from (the data order needs none: it is seeded per epoch)."""
    import torch

    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fsync_tree(path: Path) -> None:
    """The files of `path` and its own entry list on disk, before it is renamed into place."""
    for file in path.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(path)


def fsync_dir(path: Path) -> None:
    """`path`'s entries (a rename into it) on disk: POSIX makes a rename durable only once its directory is synced
    (fsync(2), "Calling fsync() does not necessarily ensure that the entry in the directory ... has also reached
    disk. For that an explicit fsync() on a file descriptor for the directory is also needed")."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

