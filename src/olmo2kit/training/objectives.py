"""What a training step minimises, one objective per method; the loop in loop.py calls each the same way.

An objective turns a micro-batch of rows into a vector of sums: first the loss summed over the units it
averages over (labelled tokens for SFT, pairs for DPO), with its gradient, then the detached sums of what
the log records beside it (`names`). The loop divides them by `count(rows)` of the whole global batch, which
every process knows without talking to the others, so a step is the same on one process or eight.

SFT: the cross-entropy of the labelled tokens (label_mask True), as OLMo's trainer computes it.

DPO (Rafailov et al., "Direct Preference Optimization", arXiv:2305.18290): for a pair, with the policy's and
the reference's log-probabilities of the chosen (c) and rejected (r) answers, the loss is
-log sigmoid(beta * ((policy_c - reference_c) - (policy_r - reference_r))). The reference is the starting
checkpoint; its log-probabilities are computed once, before training, and stored with the data
(`reference_log_probs`), so no second model is held while training. The "length-normalized" loss is
open-instruct's `dpo_norm`, which OLMo 2's DPO stage uses: each log-probability (policy and reference) is the
mean over the answer's tokens instead of the sum (allenai/open-instruct open_instruct/dpo_utils.py: `dpo_norm`
sets `average_log_prob`, and `_get_batch_logps` divides by the labelled tokens; TRL calls it `sigmoid_norm`).
The rewards are beta * (policy - reference) of each answer, on the same (summed or averaged) log-probabilities,
as open-instruct logs them; `accuracy` is the share of pairs whose chosen reward is the larger.
"""

from __future__ import annotations

import hashlib
import json
import logging
import typing
from collections.abc import Callable
from pathlib import Path

import numpy as np

from olmo2kit.errors import Olmo2KitError
from olmo2kit.files import write_atomic
from olmo2kit.training.data import PreferenceData, PreparedData

if typing.TYPE_CHECKING:
    import torch

log = logging.getLogger("olmo2kit")

REFERENCE_DIR = "reference"  # in the data directory: one file per model, dtype and seq_len


def run_length(mask: np.ndarray) -> int:
    """Positions worth running: up to the last labelled token (later ones cannot change the loss)."""
    labelled = np.flatnonzero(mask.any(axis=0))
    return max(2, int(labelled[-1]) + 1) if len(labelled) else 2


class SFT:
    """The mean cross-entropy of the labelled tokens."""

    names = ("loss",)

    def __init__(self, data: PreparedData, seq_len: int) -> None:
        self.data, self.seq_len = data, seq_len

    def count(self, rows: np.ndarray) -> int:
        """The labelled tokens of `rows` (position 0 has nothing before it to predict it from)."""
        return int(self.data.label_mask[np.sort(rows)][:, 1:self.seq_len].sum())

    def positions(self, rows: np.ndarray) -> int:
        return len(rows) * run_length(self.data.label_mask[np.sort(rows)][:, :self.seq_len])

    def sums(self, model, index: np.ndarray, device) -> torch.Tensor:
        """[summed cross-entropy of the labelled tokens of rows `index` (sorted)]."""
        return sft_loss_sum(model, self.data, index, self.seq_len, device).reshape(1)


def sft_loss_sum(model, data: PreparedData, index: np.ndarray, seq_len: int, device):
    """The summed cross-entropy of the labelled tokens of rows `index` (sorted), cut to `seq_len` positions."""
    import torch
    import torch.nn.functional as F

    length = run_length(data.label_mask[index][:, :seq_len])
    ids = torch.from_numpy(data.input_ids[index][:, :length].astype(np.int64)).to(device)
    learn = torch.from_numpy(data.label_mask[index][:, :length].copy()).to(device)
    # Position t predicts token t + 1. Shifting the labels, not the logits, spares a copy of the logits.
    labels = F.pad(ids.masked_fill(~learn, -100)[:, 1:], (0, 1), value=-100)
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")


class DPO:
    """The DPO loss of preference pairs against stored reference log-probabilities (see the module's docstring)."""

    names = ("loss", "chosen_reward", "rejected_reward", "margin", "accuracy")

    def __init__(self, data: PreferenceData, seq_len: int, reference: np.ndarray, beta: float,
                 length_normalized: bool) -> None:
        self.data, self.seq_len, self.beta, self.length_normalized = data, seq_len, beta, length_normalized
        self.reference = reference  # [rows, 2]: summed log-probabilities of the chosen and the rejected answer

    def count(self, rows: np.ndarray) -> int:
        return len(rows)

    def positions(self, rows: np.ndarray) -> int:
        return 2 * len(rows) * run_length(pair_masks(self.data, np.sort(rows), self.seq_len))

    def sums(self, model, index: np.ndarray, device) -> torch.Tensor:
        """[summed loss, chosen rewards, rejected rewards, margins, correctly ordered pairs] of pairs `index`."""
        import torch
        import torch.nn.functional as F

        policy, tokens = answer_log_probs(model, self.data, index, self.seq_len, device)
        reference = torch.from_numpy(self.reference[index].T.reshape(-1)).to(device)  # chosen rows, then rejected
        if self.length_normalized:
            # A pair whose answer was cut away entirely has no tokens to average: divide by 1 (TRL's clamp).
            policy, reference = policy / tokens.clamp(min=1), reference / tokens.clamp(min=1)
        chosen, rejected = (self.beta * (policy - reference)).chunk(2)
        loss = -F.logsigmoid(chosen - rejected)
        chosen, rejected = chosen.detach(), rejected.detach()
        return torch.stack([loss.sum(), chosen.sum(), rejected.sum(), (chosen - rejected).sum(),
                            (chosen > rejected).float().sum()])


def pair_masks(data: PreferenceData, index: np.ndarray, seq_len: int) -> np.ndarray:
    """The label masks of pairs `index`: the chosen answers' rows, then the rejected answers'."""
    return np.concatenate([data.chosen_mask[index][:, :seq_len], data.rejected_mask[index][:, :seq_len]])


def answer_log_probs(model, data: PreferenceData, index: np.ndarray, seq_len: int, device):
    """(log-probability of each answer, its labelled tokens) for pairs `index` (sorted): the chosen answers, then
    the rejected ones, each the sum over its labelled tokens, in one forward pass."""
    import torch
    import torch.nn.functional as F

    mask = pair_masks(data, index, seq_len)
    length = run_length(mask)
    ids = np.concatenate([data.chosen_ids[index][:, :length], data.rejected_ids[index][:, :length]])
    ids = torch.from_numpy(ids.astype(np.int64)).to(device)
    learn = torch.from_numpy(mask[:, :length].copy()).to(device)
    labels = F.pad(ids.masked_fill(~learn, -100)[:, 1:], (0, 1), value=-100)  # position t predicts token t + 1
    logits = model(input_ids=ids).logits
    nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="none")
    return -nll.view(ids.shape).sum(dim=1), (labels != -100).sum(dim=1)


def reference_path(data: PreferenceData, key: dict) -> Path:
    """Where the reference log-probabilities for `key` (the model, its dtype, seq_len, the data) are stored."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return data.path / REFERENCE_DIR / f"{digest}.safetensors"


def read_reference(path: Path, key: dict, rows: int) -> np.ndarray | None:
    """The stored reference log-probabilities for `key`, or None when there are none (or they are not whole)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            if (f.metadata() or {}).get("key") != json.dumps(key, sort_keys=True):
                return None
            reference = f.get_tensor("log_probs")
    except (OSError, SafetensorError):
        return None
    return reference if reference.shape == (rows, 2) else None


def write_reference(path: Path, key: dict, reference: np.ndarray) -> None:
    """Store `reference` at `path`, whole or not at all; a directory that cannot be written only costs a rerun."""
    from safetensors.numpy import save

    try:
        path.parent.mkdir(exist_ok=True)
        write_atomic(path, save({"log_probs": reference}, metadata={"key": json.dumps(key, sort_keys=True)}))
    except (OSError, Olmo2KitError) as e:
        log.warning(f"cannot store the reference log-probabilities in {path.parent} ({e}): the next run computes "
                    "them again")


def reference_log_probs(model, data: PreferenceData, seq_len: int, batch_size: int, accelerator,
                        without_adapter: Callable) -> np.ndarray:
    """The reference model's summed log-probabilities of every pair's answers, [rows, 2] float32 (chosen, rejected).

    Runs in every process, each on its share of the pairs; all of them run as many forward passes (FSDP gathers
    the weights in each), and the shares are summed over the processes. `without_adapter()` is a context in which
    the model is its base (a LoRA run's reference), or a null context.
    """
    import torch

    rows = np.arange(data.rows)
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = rows[rank::world]
    passes = -(-data.rows // (world * batch_size))
    found = torch.zeros((data.rows, 2), dtype=torch.float32, device=accelerator.device)
    was_training = model.training
    model.eval()
    with torch.no_grad(), without_adapter():
        for i in range(passes):
            index = mine[i * batch_size:(i + 1) * batch_size]
            log_probs, _ = answer_log_probs(model, data, index if len(index) else rows[:1], seq_len,
                                            accelerator.device)
            if len(index):
                found[torch.from_numpy(index).to(accelerator.device)] = log_probs.view(2, -1).T.float()
    model.train(was_training)
    return accelerator.reduce(found, reduction="sum").cpu().numpy()
