"""A fine-tune run's settings, `FinetuneConfig`, and the YAML recipes that set them (configs/finetune/)."""

from __future__ import annotations

import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path

from olmo2kit.devices import check_device
from olmo2kit.errors import Olmo2KitError
from olmo2kit.inference.sampling import check_seed
from olmo2kit.model.sizes import DEFAULT_MODEL, QUANTIZATIONS

METHODS = ("sft", "dpo")
DPO_LOSSES = ("sigmoid", "length-normalized")
# beta when none is given, per DPO loss. sigmoid: 0.1, as in Rafailov et al. (arXiv:2305.18290) and TRL's DPOConfig.
# length-normalized: 5, OLMo 2's DPO recipe (allenai/open-instruct scripts/train/olmo2/dpo_7b.sh: --loss_type dpo_norm
# --beta 5); a log-probability averaged over the answer's tokens is far smaller than a sum, so beta is larger.
DEFAULT_BETA = {"sigmoid": 0.1, "length-normalized": 5.0}


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
    gradient_checkpointing: bool = False  # activation checkpointing: each decoder layer recomputed in the backward
    save_every: int | None = None  # steps between checkpoints
    keep_checkpoints: int = 2
    resume: bool = False
    merge: bool = False  # LoRA: also write the adapter merged into the base weights
    val_fraction: float = 0.0  # share of the rows held out for validation, never trained on
    eval_every: int | None = None  # steps between evaluations of the validation split (always at the end)
    seed: int = 0
    fsdp: bool = False  # shard with torch's FSDP2 over the processes of torchrun, CPUs (gloo) or GPUs (NCCL)
    mixed_precision: bool = False  # with fsdp: FSDP2's bf16 policy (bf16 compute, fp32 reduction, fp32 shards)
    device: str = "auto"  # auto, cpu, cuda, cuda:N or mps; under torchrun each process takes its own GPU
    method: str = "sft"  # sft (prepared examples) or dpo (preference pairs)
    beta: float | None = None  # dpo: how far the policy may move from the reference (default per dpo_loss)
    dpo_loss: str | None = None  # dpo: sigmoid (the default) or length-normalized (OLMo 2's recipe)

    def __post_init__(self) -> None:
        self._check_method()
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
        if self.mixed_precision and not self.fsdp:
            raise Olmo2KitError("--mixed-precision is FSDP2's bf16 policy: add --fsdp (without it olmo2kit turns on "
                                "bf16 autocast on GPUs by itself)")
        if self.mixed_precision and self.lora:  # the policy would hold a frozen base in fp32 to gather it in bf16
            raise Olmo2KitError("--mixed-precision is for a full fine-tune: with --lora the frozen base is bf16 "
                                "already (on GPUs), so drop --mixed-precision")
        check_device(self.device)
        check_seed(self.seed)

    def _check_method(self) -> None:
        """Check the method and its options; a DPO run without a loss or beta gets sigmoid, and beta per loss."""
        if self.method not in METHODS:
            raise Olmo2KitError(f"unknown method {self.method!r}: use sft (prepared examples) or dpo (preference "
                                "pairs)")
        if self.method != "dpo":
            for name, option in (("beta", "--beta"), ("dpo_loss", "--dpo-loss")):
                if getattr(self, name) is not None:
                    raise Olmo2KitError(f"{option} applies to --method dpo: add --method dpo, or drop {option}")
            return
        self.dpo_loss = self.dpo_loss or "sigmoid"
        if self.dpo_loss not in DPO_LOSSES:
            raise Olmo2KitError(f"unknown DPO loss {self.dpo_loss!r}: use sigmoid or length-normalized")
        if self.beta is None:
            self.beta = DEFAULT_BETA[self.dpo_loss]
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise Olmo2KitError(f"beta must be a positive finite number, got {self.beta} (e.g. 0.1, or 5 with "
                                "--dpo-loss length-normalized)")


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

