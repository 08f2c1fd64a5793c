"""The training loop, one for every objective: the data order, the learning rate, optimizer steps over global
batches, evaluation of the validation split, the training log and progress.

One optimizer step trains on one global batch: batch_size rows (pairs, for DPO) per process, times
grad_accum, times the processes. Its loss is the objective's mean over the whole global batch (over
its labelled tokens for SFT, its pairs for DPO), so the same global batch gives the same update on one
process or eight. Rows are visited in a seeded shuffle per epoch, a pure function of the step: a
resumed run sees the same order. With a validation split, a seeded share of the rows is held out of
every epoch and evaluated with the same loss.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import typing
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from olmo2kit.errors import Olmo2KitError
from olmo2kit.files import JsonlStore
from olmo2kit.training.checkpoints import save_checkpoint, saved_checkpoints
from olmo2kit.training.config import FinetuneConfig
from olmo2kit.training.data import PreferenceData, PreparedData
from olmo2kit.training.objectives import DPO, SFT, process_share

if typing.TYPE_CHECKING:
    from accelerate import Accelerator


def learning_rate(step: int, total: int, peak: float, warmup: float) -> float:
    """The rate for optimizer step `step` (0-based): linear warm-up, then linear decay towards 0."""
    warm = math.ceil(warmup * total)
    if step < warm:
        return peak * (step + 1) / warm
    return peak * (total - step) / (total - warm)


class DataOrder:
    """Which rows each optimizer step trains on: a seeded shuffle per epoch, cut into global batches.

    The leftover rows of an epoch (fewer than a global batch) wait for the next shuffle. With a
    `val_fraction`, a seeded share of the rows (at least one) is held out as `val_rows` and never trained on.
    """

    def __init__(self, rows: int, global_batch: int, seed: int, val_fraction: float = 0.0) -> None:
        held_out = max(1, round(val_fraction * rows)) if val_fraction else 0
        # A stream of its own: the epochs' shuffles draw from [seed, epoch].
        self.val_rows = np.sort(np.random.default_rng([seed, 0, 1]).permutation(rows)[:held_out])
        self.train_rows = np.setdiff1d(np.arange(rows), self.val_rows)
        if len(self.train_rows) < global_batch:
            held = f" ({held_out} held out for validation)" if held_out else ""
            raise Olmo2KitError(
                f"the data has {rows} rows{held}, fewer than one global batch of {global_batch} "
                "(batch size x grad accum x processes): lower --batch-size or --grad-accum"
            )
        self.rows, self.global_batch, self.seed = rows, global_batch, seed
        self.steps_per_epoch = len(self.train_rows) // global_batch

    @lru_cache(maxsize=1)  # noqa: B019 (one order per run; the instance lives as long as the run)
    def _epoch(self, epoch: int) -> np.ndarray:
        return self.train_rows[np.random.default_rng([self.seed, epoch]).permutation(len(self.train_rows))]

    def batch(self, step: int) -> np.ndarray:
        epoch, index = divmod(step, self.steps_per_epoch)
        return self._epoch(epoch)[index * self.global_batch:(index + 1) * self.global_batch]


@dataclass
class Run:
    """A run as set up before the model loads: its processes, data order and length, and the checkpoint it resumes."""

    accelerator: Accelerator
    bf16: bool  # autocast, on a GPU that has it
    data: PreparedData | PreferenceData
    output: Path
    seq_len: int  # positions of a row that train: config.seq_len, at most the data's
    order: DataOrder
    total: int  # optimizer steps, counting those of the run being resumed
    checkpoint: Path | None
    identity: dict  # what a resumed run must share with this one
    train_log: JsonlStore
    say: Callable[[str], None]  # silent outside the first process
    objective: SFT | DPO | None = None  # set once the model is loaded: DPO's reference log-probabilities need it

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def train(config: FinetuneConfig, run: Run, model, optimizer, start_step: int, tokens: int,
           progress: Callable[[int, int, float | None], None] | None
           ) -> tuple[float | None, float | None, int, float]:
    """Train from `start_step` to the last step, logging each and saving checkpoints on the way.

    Returns the last step's loss, the last validation loss (None without a validation split), the
    tokens of the whole run so far, and the seconds the steps took.
    """
    model.train()
    progress = progress if run.main else None
    if progress is not None:
        progress(start_step, run.total, None)
    loss_value = eval_loss = None
    begin = time.perf_counter()
    for step in range(start_step, run.total):
        rows = run.order.batch(step)
        lr = learning_rate(step, run.total, config.lr, config.warmup)
        values, step_tokens = _train_step(model, optimizer, run, rows, lr, config)
        loss_value = values["loss"]
        if loss_value is not None and not math.isfinite(loss_value):
            # The loss is reduced over the processes, so every process stops here; the weights are lost.
            raise _non_finite_loss(run, step + 1, loss_value, config.lr)
        tokens += step_tokens
        if run.main:
            run.train_log.append([{"step": step + 1, **values, "lr": lr, "tokens": tokens}])
        if progress is not None:
            progress(step + 1, run.total, loss_value)
        if _evaluates_after(step + 1, run, config):
            eval_loss = _evaluate(model, run, config.batch_size)
            if run.main:
                run.train_log.append([{"step": step + 1, "eval_loss": eval_loss}])
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < run.total:
            save_checkpoint(run.output, step + 1, tokens, run.identity, model, optimizer, run.accelerator, config)
    return loss_value, eval_loss, tokens, time.perf_counter() - begin


def _evaluates_after(step: int, run: Run, config: FinetuneConfig) -> bool:
    """Whether the validation split is evaluated after `step`: every eval_every steps, and after the last."""
    every = config.eval_every
    return len(run.order.val_rows) > 0 and (step == run.total or every is not None and step % every == 0)


def _non_finite_loss(run: Run, step: int, loss: float, lr: float) -> Olmo2KitError:
    """The error that stops a run whose loss became NaN or infinite at `step`, saying which checkpoint is kept.

    A checkpoint of the step before holds the very weights that gave that loss, and resuming from it
    would fail the same way: it is set aside as step-N.non-finite, which --resume does not read.
    """
    found = saved_checkpoints(run.output)
    if found and found[-1][0] == step - 1:
        bad = found.pop()[1]
        if run.main:
            aside = bad.with_name(f"{bad.name}.non-finite")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(bad, aside)
    if found:
        kept = f"the last good checkpoint, {found[-1][1]}, is kept: lower --lr (now {lr:g}) and add --resume"
    else:
        kept = f"there is no good checkpoint to keep: lower --lr (now {lr:g}) and run again"
    return Olmo2KitError(f"the loss became {loss} at step {step}, so training stopped without saving a result; {kept}")


def _evaluate(model, run: Run, batch_size: int) -> float | None:
    """The validation loss, defined as in training: the objective's mean over the held-out rows."""
    import torch

    rows, accelerator, objective = run.order.val_rows, run.accelerator, run.objective
    count = objective.count(rows)
    if count == 0:
        return None
    sums = torch.zeros(len(objective.names), device=accelerator.device)
    model.eval()
    with torch.no_grad():
        for index, counted in process_share(rows, batch_size, accelerator):
            found = objective.sums(model, index, accelerator.device)
            if counted:
                sums += found
    model.train()
    return accelerator.reduce(sums, reduction="sum")[0].item() / count


def _train_step(model, optimizer, run: Run, rows: np.ndarray, lr: float, config: FinetuneConfig
                ) -> tuple[dict[str, float | None], int]:
    """One optimizer step over one global batch: (the objective's means over it, by name; positions run)."""
    import torch

    objective, accelerator = run.objective, run.accelerator
    # Every process knows the whole global batch, so it knows what to divide by (its labelled tokens
    # or its pairs) without talking to the others.
    count = objective.count(rows)
    micro = [rows[i:i + config.batch_size] for i in range(0, len(rows), config.batch_size)]
    positions = sum(objective.positions(m) for m in micro)
    if count == 0:  # nothing to learn: the weights and the optimizer's moments stay as they are
        return dict.fromkeys(objective.names), 0

    world, rank = accelerator.num_processes, accelerator.process_index
    mine = [k * world + rank for k in range(config.grad_accum)]  # micro-batches of this process
    sums = torch.zeros(len(objective.names), device=accelerator.device)
    for n, k in enumerate(mine):
        # A model sharded by --fsdp has no no_sync: its micro-batches reduce-scatter as they go, which sums the same.
        sync = nullcontext() if n == len(mine) - 1 else accelerator.no_sync(model)
        with sync:
            means = objective.sums(model, np.sort(micro[k]), accelerator.device) / count
            # DDP and FSDP average gradients over processes; the loss is a sum over the whole batch.
            accelerator.backward(means[0] * world)
        sums += means.detach()
    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return dict(zip(objective.names, accelerator.reduce(sums, reduction="sum").tolist(), strict=True)), positions
