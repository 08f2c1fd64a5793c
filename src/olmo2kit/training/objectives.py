"""What a training step minimises, one function per objective; the loop in loop.py calls them.

SFT: the cross-entropy of the labelled tokens (label_mask True), as OLMo's trainer computes it.
"""

from __future__ import annotations

import numpy as np

from olmo2kit.training.data import PreparedData


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


def run_length(mask: np.ndarray) -> int:
    """Positions worth running: up to the last labelled token (later ones cannot change the loss)."""
    labelled = np.flatnonzero(mask.any(axis=0))
    return max(2, int(labelled[-1]) + 1) if len(labelled) else 2

