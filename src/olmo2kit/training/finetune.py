"""Fine-tune OLMo 2 on prepared data: full, LoRA or QLoRA, in one process or many.

The loop is plain torch, readable top to bottom. accelerate's Accelerator only sets up the
processes (so `accelerate launch` and `torchrun` run the same command), wraps the model for
DDP or FSDP and turns on bf16 autocast; checkpoints go through torch.distributed.checkpoint's
state-dict API, which reads plain, DDP and FSDP models alike. accelerate runs FSDP on GPUs only,
so on CPU processes `fsdp` shards the model with torch's own FSDP2 (`fully_shard`, over gloo).

One optimizer step trains on one global batch: batch_size rows per process, times grad_accum,
times the processes. Its loss is the mean over the labelled tokens of the whole global batch,
so the same global batch gives the same update on one process or eight. Rows are visited in a
seeded shuffle per epoch, a pure function of the step: a resumed run sees the same order.
With a validation split, a seeded share of the rows is held out of every epoch and evaluated
with the same loss (the mean over its labelled tokens).

Output in DIR:
  config.json, model.safetensors, tokenizer   full fine-tune, or the merged model with --merge
  adapter_config.json, adapter_model...       a LoRA adapter (olmo2kit.load puts it on its base)
  adapter/                                     the adapter, when --merge put the merged model in DIR
  train_log.jsonl                              {"step", "loss", "lr", "tokens"} per step, and
                                               {"step", "eval_loss"} per evaluation of the validation split
  checkpoints/step-N/                          trainable weights, optimizer, RNG, step (for --resume)
  finetune.json                                the settings and results; written last
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

import numpy as np

from olmo2kit.compat import quiet_bitsandbytes
from olmo2kit.devices import check_device, peak_memory_gb, resolve_device
from olmo2kit.errors import Olmo2KitError
from olmo2kit.files import LOCK_NAME, JsonlStore, make_output_dir, output_lock, write_json_atomic
from olmo2kit.inference.sampling import check_seed
from olmo2kit.model.loading import ModelRef, load, resolve_model
from olmo2kit.model.sizes import DEFAULT_MODEL, QUANTIZATIONS
from olmo2kit.training.data import PreparedData, load_prepared

if typing.TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger("olmo2kit")

LOG = "train_log.jsonl"
RESULT = "finetune.json"
CHECKPOINTS = "checkpoints"
_STAGING = ".result.tmp"
_OWN = {LOG, CHECKPOINTS, _STAGING, LOCK_NAME}  # what an unfinished run leaves in its output directory
# Identity keys a checkpoint may lack, with the value its absence means.
_IDENTITY_DEFAULTS = {"val_fraction": 0.0}


@dataclass
class FinetuneConfig:
    """Everything a fine-tune run needs; a YAML recipe sets any of these fields by name."""

    data: str
    output: str
    model: str = DEFAULT_MODEL
    revision: str | None = None
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    quantize: str | None = None  # nf4 (QLoRA) or int8, with lora
    epochs: int | None = None  # neither epochs nor max_steps: one epoch
    max_steps: int | None = None
    lr: float = 2e-5
    warmup: float = 0.03  # fraction of the steps with a linear warm-up; then linear decay to 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 1  # rows per process per micro-batch
    grad_accum: int = 1
    seq_len: int | None = None  # cut rows shorter than the data's seq_len
    gradient_checkpointing: bool = False
    save_every: int | None = None  # steps between checkpoints
    keep_checkpoints: int = 2
    resume: bool = False
    merge: bool = False  # LoRA: also write the adapter merged into the base weights
    val_fraction: float = 0.0  # share of the rows held out for validation, never trained on
    eval_every: int | None = None  # steps between evaluations of the validation split (always at the end)
    seed: int = 0
    fsdp: bool = False  # CPU processes: shard with torch's FSDP2 (on GPUs, configs/accelerate/fsdp.yaml does)
    device: str = "auto"  # auto, cpu, cuda, cuda:N or mps; under torchrun each process takes its own GPU

    def __post_init__(self) -> None:
        positive = {"lr": self.lr, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "lora_r": self.lora_r, "keep_checkpoints": self.keep_checkpoints}
        for name, value in positive.items():
            if not value > 0:
                raise Olmo2KitError(f"{name} must be positive, got {value}")
        for name in ("lr", "weight_decay", "max_grad_norm"):
            if not math.isfinite(getattr(self, name)):
                raise Olmo2KitError(f"{name} must be a finite number, got {getattr(self, name)}")
        for name in ("epochs", "max_steps", "save_every", "eval_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise Olmo2KitError(f"{name} must be at least 1, got {value}")
        if self.seq_len is not None and self.seq_len < 2:
            # One token has nothing after it to predict: the step would learn nothing.
            raise Olmo2KitError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.epochs is not None and self.max_steps is not None:
            raise Olmo2KitError("give --epochs or --max-steps, not both")
        if not 0.0 <= self.warmup < 1.0:
            raise Olmo2KitError(f"warmup is a fraction of the steps, in [0, 1); got {self.warmup}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise Olmo2KitError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise Olmo2KitError(f"val_fraction is a share of the rows, in [0, 1); got {self.val_fraction}")
        if self.eval_every is not None and not self.val_fraction:
            raise Olmo2KitError("--eval-every evaluates the validation split: add --val-fraction, e.g. 0.05")
        if self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise Olmo2KitError("weight_decay must be 0 or more and max_grad_norm positive")
        if self.quantize and not self.lora:
            raise Olmo2KitError(
                f"quantized weights cannot be trained directly: add --lora to train an adapter on the "
                f"{self.quantize} model (QLoRA)"
            )
        if self.quantize is not None and self.quantize not in QUANTIZATIONS:
            raise Olmo2KitError(f"unknown quantization {self.quantize!r}: use nf4 (QLoRA), fp4 or int8")
        if self.merge and not self.lora:
            raise Olmo2KitError("--merge merges a LoRA adapter: add --lora, or drop --merge")
        if self.fsdp and self.quantize:
            raise Olmo2KitError("--fsdp cannot shard quantized weights: drop --quantize, or --fsdp")
        check_device(self.device)
        check_seed(self.seed)


@dataclass
class FinetuneResult:
    output: Path
    steps: int
    tokens: int  # positions run through the model, all processes
    loss: float | None  # of the last step
    elapsed_s: float  # training steps of this run, without loading and saving
    tokens_per_s: float
    peak_memory_gb: float
    saved: str  # "full", "adapter" or "merged"
    eval_loss: float | None = None  # on the validation split, after the last step; None without one

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "output": str(self.output)}


def load_config(path: str | os.PathLike) -> dict:
    """The fields a YAML recipe sets, checked against FinetuneConfig."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise Olmo2KitError(f"no such config file: {path} (recipes are in configs/finetune/)")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise Olmo2KitError(f"cannot read {path} ({e.strerror}): give a recipe file you can read") from None
    except UnicodeDecodeError as e:
        raise Olmo2KitError(f"{path} is not UTF-8 text (bad byte at offset {e.start}): save it as UTF-8") from None
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise Olmo2KitError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise Olmo2KitError(f"{path} must be a mapping of option: value")
    types = typing.get_type_hints(FinetuneConfig)
    unknown = sorted(str(key) for key in values if key not in types)  # YAML keys may be numbers too
    if unknown:
        raise Olmo2KitError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(types)}")
    return {key: _coerce(path, key, value, types[key]) for key, value in values.items()}


def _coerce(path: Path, key: str, value, annotation):
    """`value` as the field's type: str, int, float or bool, or None where the field allows it."""
    # PyYAML reads 2e-5 (no dot) as a string; recipes should not have to know that.
    kinds = [t for t in typing.get_args(annotation) if t is not type(None)] or [annotation]
    kind = kinds[0]
    if value is None and type(None) in typing.get_args(annotation) or kind is str and isinstance(value, str):
        return value
    if value is None:
        raise Olmo2KitError(f"{path}: {key} needs a value ({kind.__name__})")
    whole = not (kind is int and isinstance(value, float) and not value.is_integer())  # 2.5 epochs is no int
    if (kind is bool and isinstance(value, bool) or kind is not bool and not isinstance(value, bool)) and whole:
        try:
            return kind(value)
        except (TypeError, ValueError):
            pass
    raise Olmo2KitError(f"{path}: {key} must be {kind.__name__}, got {value!r}")


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
class _Run:
    """A run as set up before the model loads: its processes, data order and length, and the checkpoint it resumes."""

    accelerator: Accelerator
    bf16: bool  # autocast, on a GPU that has it
    data: PreparedData
    output: Path
    seq_len: int  # positions of a row that train: config.seq_len, at most the data's
    order: DataOrder
    total: int  # optimizer steps, counting those of the run being resumed
    checkpoint: Path | None
    identity: dict  # what a resumed run must share with this one
    train_log: JsonlStore
    say: Callable[[str], None]  # silent outside the first process

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def finetune(
    config: FinetuneConfig,
    *,
    progress: Callable[[int, int, float | None], None] | None = None,
    say: Callable[[str], None] | None = None,
) -> FinetuneResult:
    """Fine-tune `config.model` on `config.data` and save the result in `config.output`.

    Runs in every process of `accelerate launch` / `torchrun`; only the first one writes logs,
    checkpoints and the result, and it holds a lock on `config.output` for the whole run (a second
    run on it gets an Olmo2KitError naming the first). `say` receives messages, and
    `progress(step, total, loss)` is called after each optimizer step (first process only). A loss
    that becomes NaN or infinite stops the run with an Olmo2KitError; its checkpoints are kept.

    >>> finetune(FinetuneConfig(data="data/sft", output="out/1b-sft", model="1b", epochs=2))  # doctest: +SKIP
    """
    data = load_prepared(config.data)
    output = Path(config.output)
    accelerator, bf16 = _start_processes(config)
    order = DataOrder(data.rows, config.batch_size * config.grad_accum * accelerator.num_processes, config.seed,
                      config.val_fraction)
    with _holding_output(output, accelerator):
        finished = _finished(output, config)
        if finished is not None:
            return finished
        run = _set_up_run(config, data, output, accelerator, bf16, order, say)
        return _run(config, run, progress)


def _run(config: FinetuneConfig, run: _Run, progress: Callable[[int, int, float | None], None] | None
         ) -> FinetuneResult:
    """Load the model, train it from the checkpoint or the start, save the result and record it in finetune.json."""
    model, optimizer, tokenizer, ref = _model_to_train(config, run)
    start_step, start_tokens = _starting_point(run, model, optimizer, ref)
    held_out = f" ({len(run.order.val_rows)} held out for validation)" if len(run.order.val_rows) else ""
    run.say(f"{run.data.rows} rows of {run.seq_len} tokens{held_out}, global batch {run.order.global_batch} rows, "
            f"{run.order.steps_per_epoch} steps per epoch, {run.total} steps, "
            f"{run.accelerator.num_processes} process(es)" + (", bf16 autocast" if run.bf16 else ""))

    loss, eval_loss, tokens, elapsed = _train(config, run, model, optimizer, start_step, start_tokens, progress)
    peak = peak_memory_gb(run.accelerator.device)
    saved = _save_result(run.output, model, tokenizer, run.accelerator, config, run.say)
    result = FinetuneResult(
        output=run.output, steps=run.total, tokens=tokens, loss=loss, elapsed_s=elapsed,
        tokens_per_s=(tokens - start_tokens) / elapsed if elapsed > 0 else 0.0, peak_memory_gb=peak, saved=saved,
        eval_loss=eval_loss,
    )
    if run.main:
        _record_result(config, run, ref, result)
    run.accelerator.wait_for_everyone()
    return result


def _start_processes(config: FinetuneConfig) -> tuple[Accelerator, bool]:
    """This process's accelerator, and whether it autocasts to bf16 (on a GPU that has it)."""
    import torch
    from accelerate import Accelerator

    device = resolve_device(config.device)
    _check_sharding(config, device)
    if device.startswith("cuda:") and "LOCAL_RANK" not in os.environ:
        torch.cuda.set_device(device)  # one process on the GPU asked for; under torchrun each takes its own
    bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision="bf16" if bf16 else "no")
    if config.fsdp and accelerator.num_processes == 1:
        raise Olmo2KitError("--fsdp shards the model over several processes: launch with "
                            "`torchrun --nproc_per_node N $(which olmo2kit) finetune ...`, or drop --fsdp")
    return accelerator, bf16


def _check_sharding(config: FinetuneConfig, device: str) -> None:
    """Refuse an FSDP request that would not shard: accelerate (1.15) runs FSDP on GPUs only, --fsdp on CPUs only."""
    if config.fsdp and device != "cpu":
        raise Olmo2KitError(f"--fsdp shards CPU processes; on {device}, drop it and launch with "
                            "`accelerate launch --config_file configs/accelerate/fsdp.yaml`")
    # accelerate launch sets this from an FSDP config; on CPUs accelerate then quietly wraps the model in DDP.
    if device == "cpu" and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not config.fsdp:
        raise Olmo2KitError("accelerate runs FSDP on GPUs only, so on CPUs this config would train unsharded (DDP): "
                            "add --fsdp to shard the CPU processes with torch's FSDP2")


@contextmanager
def _holding_output(output: Path, accelerator: Accelerator) -> Iterator[None]:
    """The first process creates `output` and holds its lock while the block runs; the others wait until it does.

    Only the first process writes in `output`, so only it takes the lock, and before anything in
    `output` is read: a second run can neither take over an unfinished run nor replace a finished one.
    """
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        yield
        return
    make_output_dir(output)  # before the model loads, so a bad --output fails fast
    with output_lock(output, option="--output"):
        accelerator.wait_for_everyone()
        yield


def _set_up_run(config: FinetuneConfig, data: PreparedData, output: Path, accelerator: Accelerator, bf16: bool,
                order: DataOrder, say: Callable[[str], None] | None) -> _Run:
    """The run's length and the checkpoint it resumes, if any (checked to come from the same settings)."""
    seq_len = min(config.seq_len or data.seq_len, data.seq_len)
    checkpoint = _checkpoint_to_resume(output, config)
    identity = _identity(config, data, order.global_batch, seq_len)
    if checkpoint is not None:
        _check_same_run(checkpoint, identity)
    return _Run(
        accelerator=accelerator, bf16=bf16, data=data, output=output, seq_len=seq_len, order=order,
        total=config.max_steps or (config.epochs or 1) * order.steps_per_epoch, checkpoint=checkpoint,
        identity=identity, train_log=_log_store(output),
        say=say if (say and accelerator.is_main_process) else (lambda message: None),
    )


def _model_to_train(config: FinetuneConfig, run: _Run):
    """The model and its AdamW optimizer, prepared for this run's processes; also the tokenizer and ModelRef."""
    import torch

    torch.manual_seed(config.seed)  # the same LoRA initialisation in every process
    model, tokenizer, ref = _load_model(config, run.accelerator, run.bf16, run.data)
    if config.fsdp:
        _shard(model, run)  # before the optimizer: sharding replaces the parameters
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    if config.fsdp:
        optimizer = run.accelerator.prepare(optimizer)  # not the model: on CPUs accelerate would wrap it in DDP too
    else:
        model, optimizer = run.accelerator.prepare(model, optimizer)
    torch.manual_seed(config.seed + run.accelerator.process_index)  # dropout differs between processes
    return model, optimizer, tokenizer, ref


def _shard(model, run: _Run) -> None:
    """Shard `model` over the processes with torch's FSDP2, one decoder layer a unit, as configs/accelerate/fsdp.yaml
    has accelerate do on GPUs: each process keeps its share of the weights, gradients and optimizer state."""
    from torch.distributed.fsdp import fully_shard
    from transformers.models.olmo2.modeling_olmo2 import Olmo2DecoderLayer

    for module in model.modules():
        if isinstance(module, Olmo2DecoderLayer):
            fully_shard(module)
    fully_shard(model)  # the rest: embeddings, final norm, output layer
    held = sum(p.to_local().numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    run.say(f"FSDP2 over {run.accelerator.num_processes} processes: the first holds {held:,} of the {total:,} weights")


def _starting_point(run: _Run, model, optimizer, ref) -> tuple[int, int]:
    """(step, tokens) to start from: the checkpoint's, loaded into `model` and `optimizer`, else (0, 0).

    The training log keeps the lines of the steps up to there.
    """
    start_step, tokens = 0, 0
    if run.checkpoint is not None:
        start_step, tokens = _load_checkpoint(run.checkpoint, model, optimizer, run.accelerator)
        run.say(f"resuming from {run.checkpoint} (step {start_step} of {run.total})")
    elif not ref.local and ref.revision:
        run.say(f"starting from {ref}: Hub checkpoints hold weights only, so the optimizer starts fresh "
                "(OLMo's --reset_trainer_state)")
    if run.main:  # the steps after it are trained, and logged, again
        run.train_log.rewrite(e for e in run.train_log.read() if e["step"] <= start_step)
    return start_step, tokens


def _train(config: FinetuneConfig, run: _Run, model, optimizer, start_step: int, tokens: int,
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
        loss_value, step_tokens = _train_step(model, optimizer, run.accelerator, run.data, rows, run.seq_len, lr,
                                              config)
        if loss_value is not None and not math.isfinite(loss_value):
            # The loss is reduced over the processes, so every process stops here; the weights are lost.
            raise _non_finite_loss(run, step + 1, loss_value, config.lr)
        tokens += step_tokens
        if run.main:
            run.train_log.append([{"step": step + 1, "loss": loss_value, "lr": lr, "tokens": tokens}])
        if progress is not None:
            progress(step + 1, run.total, loss_value)
        if _evaluates_after(step + 1, run, config):
            eval_loss = _evaluate(model, run, config.batch_size)
            if run.main:
                run.train_log.append([{"step": step + 1, "eval_loss": eval_loss}])
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < run.total:
            _save_checkpoint(run.output, step + 1, tokens, run.identity, model, optimizer, run.accelerator, config)
    return loss_value, eval_loss, tokens, time.perf_counter() - begin


def _evaluates_after(step: int, run: _Run, config: FinetuneConfig) -> bool:
    """Whether the validation split is evaluated after `step`: every eval_every steps, and after the last."""
    every = config.eval_every
    return len(run.order.val_rows) > 0 and (step == run.total or every is not None and step % every == 0)


def _non_finite_loss(run: _Run, step: int, loss: float, lr: float) -> Olmo2KitError:
    """The error that stops a run whose loss became NaN or infinite at `step`, saying which checkpoint is kept.

    A checkpoint of the step before holds the very weights that gave that loss, and resuming from it
    would fail the same way: it is set aside as step-N.non-finite, which --resume does not read.
    """
    found = _checkpoints(run.output)
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


def _evaluate(model, run: _Run, batch_size: int) -> float | None:
    """The validation loss, defined as in training: the mean over the labelled tokens of the held-out rows."""
    import torch

    rows, accelerator = run.order.val_rows, run.accelerator
    labelled = int(run.data.label_mask[rows][:, 1:run.seq_len].sum())
    if labelled == 0:
        return None
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = rows[rank::world]
    # Every process runs as many forward passes as the others (FSDP gathers the weights in each):
    # one that has run out of rows runs a row that it does not count.
    passes = -(-len(rows) // (world * batch_size))
    loss_sum = torch.zeros((), device=accelerator.device)
    model.eval()
    with torch.no_grad():
        for i in range(passes):
            index = mine[i * batch_size:(i + 1) * batch_size]
            loss = _loss_sum(model, run.data, index if len(index) else rows[:1], run.seq_len, accelerator.device)
            if len(index):
                loss_sum += loss
    model.train()
    return accelerator.reduce(loss_sum, reduction="sum").item() / labelled


def _record_result(config: FinetuneConfig, run: _Run, ref, result: FinetuneResult) -> None:
    """Write finetune.json, the settings and results; last, so it marks a finished run."""
    write_json_atomic(run.output / RESULT, {
        "config": dataclasses.asdict(config), "base": str(ref), "data_manifest": run.data.manifest,
        "result": result.to_dict(), "processes": run.accelerator.num_processes,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })


def _train_step(model, optimizer, accelerator, data: PreparedData, rows: np.ndarray, seq_len: int, lr: float,
                config: FinetuneConfig) -> tuple[float | None, int]:
    """One optimizer step over one global batch: (mean loss over its labelled tokens, positions run)."""
    import torch

    # Every process knows the whole global batch, so it knows the token count to divide by
    # without talking to the others.
    mask = data.label_mask[np.sort(rows)][:, :seq_len]
    labelled = int(mask[:, 1:].sum())
    micro = [rows[i:i + config.batch_size] for i in range(0, len(rows), config.batch_size)]
    lengths = [_length(data.label_mask[np.sort(m)][:, :seq_len]) for m in micro]
    positions = sum(len(m) * n for m, n in zip(micro, lengths, strict=True))
    if labelled == 0:
        return None, 0  # nothing to learn: the weights and the optimizer's moments stay as they are

    world, rank = accelerator.num_processes, accelerator.process_index
    mine = [k * world + rank for k in range(config.grad_accum)]  # micro-batches of this process
    loss_sum = torch.zeros((), device=accelerator.device)
    for n, k in enumerate(mine):
        # A model sharded by --fsdp has no no_sync: its micro-batches reduce-scatter as they go, which sums the same.
        sync = nullcontext() if n == len(mine) - 1 else accelerator.no_sync(model)
        with sync:
            token_loss = _loss_sum(model, data, np.sort(micro[k]), seq_len, accelerator.device) / labelled
            # DDP and FSDP average gradients over processes; the loss is a sum over the whole batch.
            accelerator.backward(token_loss * world)
        loss_sum += token_loss.detach()
    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return accelerator.reduce(loss_sum, reduction="sum").item(), positions


def _loss_sum(model, data: PreparedData, index: np.ndarray, seq_len: int, device):
    """The summed cross-entropy of the labelled tokens of rows `index` (sorted), cut to `seq_len` positions."""
    import torch
    import torch.nn.functional as F

    length = _length(data.label_mask[index][:, :seq_len])
    ids = torch.from_numpy(data.input_ids[index][:, :length].astype(np.int64)).to(device)
    learn = torch.from_numpy(data.label_mask[index][:, :length].copy()).to(device)
    # Position t predicts token t + 1. Shifting the labels, not the logits, spares a copy of the logits.
    labels = F.pad(ids.masked_fill(~learn, -100)[:, 1:], (0, 1), value=-100)
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")


def _length(mask: np.ndarray) -> int:
    """Positions worth running: up to the last labelled token (later ones cannot change the loss)."""
    labelled = np.flatnonzero(mask.any(axis=0))
    return max(2, int(labelled[-1]) + 1) if len(labelled) else 2


def _load_model(config: FinetuneConfig, accelerator, bf16: bool, data: PreparedData):
    """The base model ready to train (full weights, or with a LoRA adapter), its tokenizer and ModelRef."""
    ref = _base(config)
    device = _process_device(accelerator)
    # Full fine-tuning keeps fp32 master weights under bf16 autocast; a frozen base can be bf16.
    dtype = "bf16" if bf16 and config.lora else "fp32"
    # An adapter records the name the base loaded from (peft's base_model_name_or_path) and its revision.
    model, tokenizer = load(ref.source, revision=ref.revision, dtype=dtype, quantize=config.quantize, device=device)
    _check_tokenizer(data, tokenizer, model, config)
    model.config.use_cache = False
    if config.quantize:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if config.gradient_checkpointing:
        # transformers 5.24 renamed gradient_checkpointing_enable; older 5.x only have the old name.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    if config.lora:
        quiet_bitsandbytes()  # peft imports bitsandbytes, whose CPU backend logs a missing optional package
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules="all-linear", task_type="CAUSAL_LM", revision=ref.revision,
        )
        model = get_peft_model(model, lora)
    return model, tokenizer, ref


def _base(config: FinetuneConfig) -> ModelRef:
    """The base model, a local directory as an absolute path: the adapter that records it then finds the same
    base from any working directory."""
    ref = resolve_model(config.model, config.revision)
    return dataclasses.replace(ref, source=str(Path(ref.source).resolve())) if ref.local else ref


def _process_device(accelerator) -> str:
    """This process's device, as olmo2kit.load names it (one GPU per process, never device_map="auto")."""
    if accelerator.device.type == "cuda":
        return f"cuda:{accelerator.device.index or 0}"
    return accelerator.device.type


def _check_tokenizer(data: PreparedData, tokenizer, model, config: FinetuneConfig) -> None:
    manifest = data.manifest
    if manifest.get("eos_token_id") != tokenizer.eos_token_id or manifest.get("vocab_size", 0) != len(tokenizer):
        raise Olmo2KitError(
            f"{data.path} was prepared with the tokenizer of {manifest.get('tokenizer')}, which does not match "
            f"{config.model}'s: run `olmo2kit prepare-data ... --model {config.model}` again"
        )
    if manifest.get("vocab_size", 0) > model.config.vocab_size:
        raise Olmo2KitError(f"{data.path} has token ids beyond the model's {model.config.vocab_size}-token vocabulary")


def _identity(config: FinetuneConfig, data: PreparedData, global_batch: int, seq_len: int) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint."""
    return {
        "model": config.model, "revision": config.revision, "lora": config.lora, "lora_r": config.lora_r,
        "lora_alpha": config.lora_alpha, "quantize": config.quantize, "seed": config.seed,
        "global_batch": global_batch, "seq_len": seq_len, "val_fraction": config.val_fraction,
        "data": {"path": str(data.path.resolve()), "rows": data.rows, "created": data.manifest.get("created")},
    }


def _finished(output: Path, config: FinetuneConfig) -> FinetuneResult | None:
    """The result of a finished run in `output` when resuming it, an error when not; None if unfinished."""
    if not (output / RESULT).exists():
        checkpoints = _checkpoints(output)
        if not config.resume and checkpoints:
            raise Olmo2KitError(
                f"{output} holds checkpoints of an earlier run: add --resume to continue it, or pick another --output"
            )
        others = sorted(p.name for p in output.iterdir() if p.name not in _OWN) if output.is_dir() else []
        if others and not (config.resume and checkpoints):  # a kill while saving the result leaves some
            raise Olmo2KitError(f"{output} is not empty ({', '.join(others[:3])}, ...): pick a new --output directory")
        return None
    if not config.resume:
        raise Olmo2KitError(f"{output} already holds a finished fine-tune: pick another --output")
    result = json.loads((output / RESULT).read_text())["result"]
    return FinetuneResult(**{**result, "output": output})


def _checkpoints(output: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (a checkpoint is renamed into place only once whole)."""
    found = []
    for path in (output / CHECKPOINTS).glob("step-*"):
        step = path.name.removeprefix("step-")
        if step.isdigit() and (path / "state.json").exists():
            found.append((int(step), path))
    return sorted(found)


def _checkpoint_to_resume(output: Path, config: FinetuneConfig) -> Path | None:
    if not config.resume:
        return None
    found = _checkpoints(output)
    if not found:
        log.warning(f"--resume: no checkpoint in {output / 'checkpoints'} yet, so training starts at step 0")
    return found[-1][1] if found else None


def _check_same_run(checkpoint: Path, identity: dict) -> None:
    saved = {**_IDENTITY_DEFAULTS, **json.loads((checkpoint / "state.json").read_text())["identity"]}
    differ = [key for key in identity if saved.get(key) != identity[key]]
    if differ:
        details = "; ".join(f"{key}: {saved.get(key)!r} then, {identity[key]!r} now" for key in differ)
        raise Olmo2KitError(
            f"{checkpoint} is from a different run ({details}): resume with the same settings, "
            "or pick another --output"
        )


def _state_dict_options(**options):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **options)


def _trainable_names(model, accelerator) -> set[str]:
    unwrapped = accelerator.unwrap_model(model)
    return {name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
            for name, p in unwrapped.named_parameters() if p.requires_grad}


def _save_checkpoint(output: Path, step: int, tokens: int, identity: dict, model, optimizer, accelerator,
                     config: FinetuneConfig) -> None:
    """Write checkpoints/step-N whole or not at all: into a temporary directory, renamed when complete."""
    import torch
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = output / CHECKPOINTS
    staging = root / f".step-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # Frozen weights (the base of a LoRA run) come back from the base model; only what trains is saved.
    weights, optim = get_state_dict(model, optimizer, options=_state_dict_options(ignore_frozen_params=True))
    names = _trainable_names(model, accelerator)
    torch.save(_rng_state(), staging / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in weights.items() if k in names}, staging / "trainable.safetensors")
        torch.save(optim, staging / "optimizer.pt")
        # The learning rate is a function of the step, so the step is the whole scheduler state;
        # the data order is a function of the seed and the step.
        write_json_atomic(staging / "state.json", {"step": step, "tokens": tokens, "identity": identity,
                                                   "processes": accelerator.num_processes})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_tree(staging)
        final = root / f"step-{step}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        for _, old in _checkpoints(output)[:-config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _load_checkpoint(checkpoint: Path, model, optimizer, accelerator) -> tuple[int, int]:
    import torch
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = json.loads((checkpoint / "state.json").read_text())
    weights = load_file(checkpoint / "trainable.safetensors")
    names = _trainable_names(model, accelerator)
    if set(weights) != names:
        raise Olmo2KitError(f"{checkpoint} does not hold this model's trainable weights: pick another --output")
    optim = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim,
                   options=_state_dict_options(strict=False))
    rng = checkpoint / f"rng-{accelerator.process_index}.pt"
    if rng.exists():  # absent when resuming on more processes than before
        _set_rng_state(torch.load(rng, weights_only=True))
    return state["step"], state["tokens"]


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


def _fsync_tree(path: Path) -> None:
    for file in path.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())


def _log_store(output: Path) -> JsonlStore:
    """The loss log: {"step", "loss", "lr", "tokens"} a line."""
    return JsonlStore(output / LOG, what="training log line", hint="pick another --output",
                      is_record=lambda row: isinstance(row.get("step"), int))


def _save_result(output: Path, model, tokenizer, accelerator, config: FinetuneConfig, say) -> str:
    """Save the trained model in HF format into `output`: full weights, an adapter, or the merged model."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state_dict = get_model_state_dict(model, options=_state_dict_options(ignore_frozen_params=config.lora))
    saved = "merged" if config.merge else "adapter" if config.lora else "full"
    if not accelerator.is_main_process:
        accelerator.free_memory()
        return saved
    staging = output / _STAGING
    shutil.rmtree(staging, ignore_errors=True)
    unwrapped = accelerator.unwrap_model(model)
    adapter_dir = staging / "adapter" if config.merge else staging
    if config.lora:
        # The adapter leaves embeddings alone; saying so spares peft a Hub lookup of the base config.
        unwrapped.save_pretrained(adapter_dir, state_dict=state_dict, save_embedding_layers=False)
    else:
        unwrapped.config.use_cache = True
        unwrapped.save_pretrained(staging, state_dict=state_dict)
    del unwrapped, state_dict
    accelerator.free_memory()
    if config.merge:
        say("merging the adapter into the base weights")
        _merge(adapter_dir, staging, _process_device(accelerator))
    else:
        tokenizer.save_pretrained(staging)
    for item in staging.iterdir():
        target = output / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    staging.rmdir()
    return saved


def _merge(adapter_dir: Path, staging: Path, device: str) -> None:
    """Merge the adapter into an unquantized copy of its base (a QLoRA adapter too); save the model and its
    tokenizer in `staging`."""
    import torch

    adapted, tokenizer = load(str(adapter_dir), dtype="fp32", device=device)
    merged = adapted.merge_and_unload()
    merged.config.use_cache = True
    merged.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    del adapted, merged
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def merge_adapter(adapter: str | os.PathLike, output: str | os.PathLike, *, device: str = "auto") -> Path:
    """Merge a LoRA adapter directory into an unquantized copy of the base it records; save the model in `output`.

    `output` must be new or empty. It appears whole or not at all: the model is staged beside it, then renamed.

    >>> merge_adapter("out/7b-qlora", "out/7b-merged")  # doctest: +SKIP
    """
    adapter, output = Path(adapter).expanduser(), Path(output).expanduser()
    if not (adapter / "adapter_config.json").is_file():
        raise Olmo2KitError(f"{adapter} holds no LoRA adapter (no adapter_config.json): give a directory that "
                            "`olmo2kit finetune --lora` wrote")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise Olmo2KitError(f"{output} already exists: give a new or empty directory for the merged model")
    device = resolve_device(device)
    make_output_dir(output.parent)
    staging = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        staging.mkdir()
        _merge(adapter, staging, device)
        _fsync_tree(staging)
        os.replace(staging, output)  # an empty directory is replaced whole
    except OSError as e:
        raise Olmo2KitError(f"cannot write {output} ({e.strerror}): give a new directory you can write to") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output
