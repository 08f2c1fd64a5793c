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
(reference.py), so no second model is held while training. The "length-normalized" loss is
open-instruct's `dpo_norm`, which OLMo 2's DPO stage uses: each log-probability (policy and reference) is the
mean over the answer's tokens instead of the sum (allenai/open-instruct open_instruct/dpo_utils.py: `dpo_norm`
sets `average_log_prob`, and `_get_batch_logps` divides by the labelled tokens; TRL calls it `sigmoid_norm`).
The rewards are beta * (policy - reference) of each answer, on the same (summed or averaged) log-probabilities,
as open-instruct logs them; `accuracy` is the share of pairs whose chosen reward is the larger.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator

import numpy as np

from olmo2kit.training.data import PreferenceData, PreparedData

if typing.TYPE_CHECKING:
    import torch


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
    log_probs, _ = labelled_log_probs(model, data.input_ids[index][:, :seq_len], data.label_mask[index][:, :seq_len],
                                      device)
    return -log_probs.sum()


def labelled_log_probs(model, ids: np.ndarray, mask: np.ndarray, device):
    """(each row's summed log-probability of its labelled tokens, their number), in one forward pass over the
    positions up to the last labelled token."""
    import torch
    import torch.nn.functional as F

    length = run_length(mask)
    ids = torch.from_numpy(ids[:, :length].astype(np.int64)).to(device)
    learn = torch.from_numpy(mask[:, :length].copy()).to(device)
    # Position t predicts token t + 1. Shifting the labels, not the logits, spares a copy of the logits.
    labels = F.pad(ids.masked_fill(~learn, -100)[:, 1:], (0, 1), value=-100)
    logits = model(input_ids=ids).logits
    nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="none")
    return -nll.view(ids.shape).sum(dim=1), (labels != -100).sum(dim=1)


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
    ids = np.concatenate([data.chosen_ids[index][:, :seq_len], data.rejected_ids[index][:, :seq_len]])
    return labelled_log_probs(model, ids, pair_masks(data, index, seq_len), device)


def process_share(rows: np.ndarray, batch_size: int, accelerator) -> Iterator[tuple[np.ndarray, bool]]:
    """This process's share of `rows` (every world-th), as (micro-batch, whether it counts) pairs.

    Every process runs as many forward passes as the others (FSDP gathers the weights in each): one that has run
    out of rows runs `rows[:1]` again, which it must not count.
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = rows[rank::world]
    for i in range(-(-len(rows) // (world * batch_size))):
        index = mine[i * batch_size:(i + 1) * batch_size]
        yield (index, True) if len(index) else (rows[:1], False)
