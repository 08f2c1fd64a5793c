"""DPO's reference log-probabilities: computed once from the starting model and stored in the data directory.

A stored file is named by a digest of its key (the starting model's name and weights, how it runs, the data) and
holds the key and a sha256 of the tensor's bytes in its metadata. A file is used only when all of that matches and
every value is a log-probability (finite, at most 0); anything else is computed again, as if it were missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from olmo2kit.errors import Olmo2KitError
from olmo2kit.files import write_atomic
from olmo2kit.training.data import PreferenceData
from olmo2kit.training.objectives import answer_log_probs, process_share

log = logging.getLogger("olmo2kit")

REFERENCE_DIR = "reference"  # in the data directory: one file per key


def reference_key(model: str, weights, quantize: str | None, dtype: str, autocast: bool, seq_len: int,
                  data: dict, mixed_precision: bool = False) -> dict:
    """What the reference log-probabilities depend on: the starting model's name and weights (file stamps, or a
    Hub commit), how it runs (FSDP's mixed precision too), the positions kept and the data's identity (its files'
    stamps)."""
    key = {"model": model, "weights": weights, "quantize": quantize, "dtype": dtype, "autocast": autocast,
           "seq_len": seq_len, "data": data}
    # Named only when set, so the references stored before the option existed keep their digests.
    return {**key, "mixed_precision": "bf16"} if mixed_precision else key


def digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def reference_path(data: PreferenceData, key: dict) -> Path:
    """Where the reference log-probabilities for `key` are stored."""
    return data.path / REFERENCE_DIR / f"{digest(key)}.safetensors"


def _tensor_sha256(reference: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(reference).tobytes()).hexdigest()


def _not_log_probs(reference: np.ndarray) -> bool:
    """Whether some value cannot be a summed log-probability: not finite, or above 0."""
    return not bool(np.isfinite(reference).all() and (reference <= 0).all())


def read_reference(path: Path, key: dict, rows: int) -> np.ndarray | None:
    """The stored reference log-probabilities for `key`, or None when there are none, or none to trust."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
            if metadata.get("key") != json.dumps(key, sort_keys=True):
                return None
            reference = f.get_tensor("log_probs")
    except (OSError, SafetensorError, KeyError):
        return None
    if (reference.dtype != np.float32 or reference.shape != (rows, 2)
            or metadata.get("sha256") != _tensor_sha256(reference) or _not_log_probs(reference)):
        log.warning(f"{path} is damaged (its values are not the log-probabilities stored): computing them again")
        return None
    return reference


def write_reference(path: Path, key: dict, reference: np.ndarray) -> None:
    """Store `reference` at `path`, whole or not at all; a directory that cannot be written only costs a rerun."""
    from safetensors.numpy import save

    metadata = {"key": json.dumps(key, sort_keys=True), "sha256": _tensor_sha256(reference)}
    try:
        path.parent.mkdir(exist_ok=True)
        write_atomic(path, save({"log_probs": reference}, metadata=metadata))
    except (OSError, Olmo2KitError) as e:
        log.warning(f"cannot store the reference log-probabilities in {path.parent} ({e}): the next run computes "
                    "them again")


def reference_log_probs(model, data: PreferenceData, seq_len: int, batch_size: int, accelerator,
                        without_adapter: Callable) -> np.ndarray:
    """The reference model's summed log-probabilities of every pair's answers, [rows, 2] float32 (chosen, rejected).

    Runs in every process, each on its share of the pairs (see `process_share`), and the shares are summed over
    the processes. `without_adapter()` is a context in which the model is its base (a LoRA run's reference), or a
    null context.
    """
    import torch

    device = accelerator.device
    found = torch.zeros((data.rows, 2), dtype=torch.float32, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad(), without_adapter():
        for index, counted in process_share(np.arange(data.rows), batch_size, accelerator):
            log_probs, _ = answer_log_probs(model, data, index, seq_len, device)
            if counted:
                found[torch.from_numpy(index).to(device)] = log_probs.view(2, -1).T.float()
    model.train(was_training)
    return accelerator.reduce(found, reduction="sum").cpu().numpy()


def stored_or_computed(key: dict, model, data: PreferenceData, seq_len: int, batch_size: int, accelerator,
                       without_adapter: Callable, say: Callable[[str], None]) -> np.ndarray:
    """The reference log-probabilities for `key`: the stored ones if every process finds them whole, else computed
    now (by all processes) and stored by the first. A starting model whose log-probabilities are not finite is an
    Olmo2KitError: training against them could only fail."""
    import torch

    path = reference_path(data, key)
    stored = read_reference(path, key, data.rows)
    found = torch.tensor(float(stored is not None), device=accelerator.device)
    if accelerator.reduce(found, reduction="sum").item() == accelerator.num_processes:
        say(f"reference log-probabilities from {path}")
        return stored
    say(f"computing the reference log-probabilities of {data.rows} pairs with {key['model']}, once: they are stored "
        f"in {path}")
    reference = reference_log_probs(model, data, seq_len, batch_size, accelerator, without_adapter)
    if not np.isfinite(reference).all():
        raise Olmo2KitError(f"the starting model {key['model']} gives non-finite log-probabilities on {data.path}: "
                            "its weights are damaged or overflow in this dtype; start from another checkpoint")
    if accelerator.is_main_process:
        write_reference(path, key, reference)
    accelerator.wait_for_everyone()
    return reference
