"""Fine-tune OLMo 2 on prepared data: full, LoRA or QLoRA, in one process or many, with SFT on examples or DPO on
preference pairs.

The loop is plain torch, readable top to bottom (loop.py; the losses in objectives.py, DPO's reference
log-probabilities in reference.py, checkpoints in checkpoints.py). accelerate's Accelerator only sets up the
processes (so `accelerate launch` and `torchrun` run the same command), wraps the model for DDP or FSDP and turns
on bf16 autocast; checkpoints go through torch.distributed.checkpoint's state-dict API, which reads plain, DDP and
FSDP models alike. `fsdp` shards the model with torch's own FSDP2 (`fully_shard`), on CPU processes (gloo) and on
GPUs (NCCL) alike, with an optional bf16 policy that reduces gradients in fp32; accelerate's FSDP config
(configs/accelerate/fsdp.yaml) runs on GPUs only and gets the same policy.

Output in DIR:
  config.json, model.safetensors, tokenizer   full fine-tune, or the merged model with --merge
  adapter_config.json, adapter_model...       a LoRA adapter (olmo2kit.load puts it on its base)
  adapter/                                     the adapter, when --merge put the merged model in DIR
  train_log.jsonl                              {"step", "loss", "lr", "tokens"} per step (DPO adds "chosen_reward",
                                               "rejected_reward", "margin", "accuracy"), and
                                               {"step", "eval_loss"} per evaluation of the validation split
  checkpoints/step-N/                          trainable weights and optimizer as each process's DCP shards, RNG,
                                               step (for --resume, on any number of processes)
  finetune.json                                the settings and results; written last
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from olmo2kit.compat import keep_4bit_trainable, quiet_bitsandbytes
from olmo2kit.devices import peak_memory_gb, resolve_device
from olmo2kit.errors import Olmo2KitError
from olmo2kit.files import LOCK_NAME, JsonlStore, file_stamp, make_output_dir, output_lock, write_json_atomic
from olmo2kit.model.loading import ModelRef, load, resolve_model
from olmo2kit.training.checkpoints import (
    CHECKPOINTS,
    check_same_run,
    check_same_start,
    checkpoint_to_resume,
    fsync_dir,
    fsync_tree,
    load_checkpoint,
    run_identity,
    save_weights_from_shards,
    saved_checkpoints,
    sharded,
    state_dict_options,
)
from olmo2kit.training.config import FinetuneConfig, load_config
from olmo2kit.training.data import PreferenceData, PreparedData, load_preference, load_prepared
from olmo2kit.training.loop import DataOrder, Run, train
from olmo2kit.training.objectives import DPO, SFT
from olmo2kit.training.reference import reference_key, stored_or_computed

if typing.TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "load_config", "merge_adapter"]

LOG = "train_log.jsonl"
RESULT = "finetune.json"
_STAGING = ".result.tmp"
_OWN = {LOG, CHECKPOINTS, _STAGING, LOCK_NAME}  # what an unfinished run leaves in its output directory


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
    >>> finetune(FinetuneConfig(data="data/prefs", output="out/1b-dpo", model="out/1b-sft", method="dpo",
    ...                         dpo_loss="length-normalized"))  # doctest: +SKIP
    """
    data = load_preference(config.data) if config.method == "dpo" else load_prepared(config.data)
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


def _run(config: FinetuneConfig, run: Run, progress: Callable[[int, int, float | None], None] | None
         ) -> FinetuneResult:
    """Load the model, train it from the checkpoint or the start, save the result and record it in finetune.json."""
    model, optimizer, tokenizer, ref, weights = _model_to_train(config, run)
    # A full SFT checkpoint holds every weight, so only a LoRA base or DPO's reference depends on the start.
    if run.checkpoint is not None and (config.lora or config.method == "dpo"):
        check_same_start(run.checkpoint, weights)
    run.identity["weights"] = weights  # recorded in every checkpoint, for the check above
    run.objective = _objective(config, run, model, ref)  # before a checkpoint's weights load: DPO's reference
    start_step, start_tokens = _starting_point(run, model, optimizer, ref)
    held_out = f" ({len(run.order.val_rows)} held out for validation)" if len(run.order.val_rows) else ""
    rows = "pairs" if config.method == "dpo" else "rows"
    run.say(f"{run.data.rows} {rows} of {run.seq_len} tokens{held_out}, global batch {run.order.global_batch} {rows}, "
            f"{run.order.steps_per_epoch} steps per epoch, {run.total} steps, "
            f"{run.accelerator.num_processes} process(es)" + (", bf16 autocast" if run.bf16 else "")
            + (", activation checkpointing" if run.accelerator.unwrap_model(model).is_gradient_checkpointing else ""))

    loss, eval_loss, tokens, elapsed = train(config, run, model, optimizer, start_step, start_tokens, progress)
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
    from accelerate.utils import InitProcessGroupKwargs

    device = resolve_device(config.device)
    _check_sharding(config, device)
    if device.startswith("cuda:") and "LOCAL_RANK" not in os.environ:
        torch.cuda.set_device(device)  # one process on the GPU asked for; under torchrun each takes its own
    # --mixed-precision's FSDP2 policy computes in bf16 itself: autocast on top would only cast again.
    bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported() and not config.mixed_precision
    # Under --fsdp the other processes wait in a collective while the first loads the whole checkpoint (a 32B's
    # download and 129 GB in fp32 on the CPU): longer than NCCL's 10-minute default, so wait up to 6 hours.
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision="bf16" if bf16 else "no",
                              fsdp_plugin=_accelerate_fsdp_plugin(device),
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=6))])
    if config.fsdp and accelerator.num_processes == 1:
        raise Olmo2KitError("--fsdp shards the model over several processes: launch with "
                            "`torchrun --nproc_per_node N $(which olmo2kit) finetune ...`, or drop --fsdp")
    return accelerator, bf16


def _accelerate_fsdp():
    """Whether `accelerate launch` runs this process with an FSDP config (configs/accelerate/fsdp.yaml sets this)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _check_sharding(config: FinetuneConfig, device: str) -> None:
    """Refuse an FSDP request that would not shard as asked: accelerate (1.15) runs FSDP on GPUs only."""
    if config.fsdp and not (device == "cpu" or device.startswith("cuda")):
        raise Olmo2KitError(f"--fsdp shards CPU processes (gloo) or CUDA GPUs (NCCL), not {device}: drop --fsdp")
    # On CPUs accelerate quietly wraps the model in DDP under an FSDP config.
    if device == "cpu" and _accelerate_fsdp() and not config.fsdp:
        raise Olmo2KitError("accelerate runs FSDP on GPUs only, so on CPUs this config would train unsharded (DDP): "
                            "add --fsdp to shard the CPU processes with torch's FSDP2")
    if device != "cpu" and _accelerate_fsdp() and config.fsdp:  # two shardings of one model
        raise Olmo2KitError("configs/accelerate/fsdp.yaml already shards on GPUs: drop --fsdp, or launch "
                            "`torchrun ... $(which olmo2kit) finetune --fsdp` without that config")


def bf16_policy():
    """FSDP2's policy for --mixed-precision (pytorch.org/docs/stable/distributed.fsdp.fully_shard.html): each unit's
    weights gathered and computed with in bf16, its gradients reduce-scattered in fp32 into the fp32 shards."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def _accelerate_fsdp_plugin(device: str):
    """Under configs/accelerate/fsdp.yaml on GPUs, accelerate's FSDP2 plugin with `bf16_policy`: left to itself,
    accelerate's mixed_precision bf16 reduces gradients in bf16 too (FullyShardedDataParallelPlugin.set_mixed_precision
    in accelerate 1.15 sets param_dtype and reduce_dtype both; it keeps a policy given). None elsewhere."""
    if device == "cpu" or not _accelerate_fsdp():
        return None
    from accelerate import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(mixed_precision_policy=bf16_policy())  # the rest from the config


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


def _set_up_run(config: FinetuneConfig, data: PreparedData | PreferenceData, output: Path, accelerator: Accelerator,
                bf16: bool, order: DataOrder, say: Callable[[str], None] | None) -> Run:
    """The run's length and the checkpoint it resumes, if any (checked to come from the same settings)."""
    seq_len = min(config.seq_len or data.seq_len, data.seq_len)
    checkpoint = checkpoint_to_resume(output, config)
    identity = run_identity(config, data, order.global_batch, seq_len)
    if checkpoint is not None:
        check_same_run(checkpoint, identity)
    return Run(
        accelerator=accelerator, bf16=bf16, data=data, output=output, seq_len=seq_len, order=order,
        total=config.max_steps or (config.epochs or 1) * order.steps_per_epoch, checkpoint=checkpoint,
        identity=identity, train_log=_log_store(output),
        say=say if (say and accelerator.is_main_process) else (lambda message: None),
    )


def _model_to_train(config: FinetuneConfig, run: Run):
    """The model and its AdamW optimizer, prepared for this run's processes; also the tokenizer, ModelRef and the
    starting weights' identity (`_starting_weights`)."""
    import torch

    torch.manual_seed(config.seed)  # the same LoRA initialisation in every process
    if config.fsdp:  # sharded as it loads, before the optimizer: sharding replaces the parameters
        model, tokenizer, ref, weights = _load_sharded(config, run)
    else:
        model, tokenizer, ref, weights = _load_model(config, run.accelerator, run.bf16, run.data)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    if config.fsdp:
        optimizer = run.accelerator.prepare(optimizer)  # not the model: on CPUs accelerate would wrap it in DDP too
    else:
        model, optimizer = run.accelerator.prepare(model, optimizer)
    torch.manual_seed(config.seed + run.accelerator.process_index)  # dropout differs between processes
    return model, optimizer, tokenizer, ref, weights


def _load_sharded(config: FinetuneConfig, run: Run):
    """`_load_model`'s model, sharded over the processes, without any process holding it whole on its device: the
    first process loads it in CPU memory; every process builds the same model on the meta device (no memory),
    shards it (`_shard`), gives its own shards memory on its device, then receives them from the first process
    (set_model_state_dict's broadcast_from_rank0, the loading torch documents for FSDP2: pytorch.org/docs/stable/
    distributed.checkpoint.html#torch.distributed.checkpoint.state_dict.set_model_state_dict). A failure on the
    first process stops every process (a user error with its message), rather than leave them waiting."""
    import torch
    import torch.distributed as dist
    from accelerate import init_empty_weights
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoModelForCausalLM

    full, tokenizer, weights, shared, failure = None, None, None, [None], None
    if run.main:
        try:
            loaded, tokenizer, _, weights = _load_model(config, run.accelerator, run.bf16, run.data, device="cpu")
            base = loaded.get_base_model() if hasattr(loaded, "get_base_model") else loaded  # under LoRA's adapter
            shared = [(base.config, base.generation_config, loaded.dtype, weights, None)]
            full = loaded.state_dict()
            del loaded
        except Exception as e:  # noqa: BLE001 - told to the others, which would wait for the weights, then raised
            failure = e
            said = str(e) if isinstance(e, Olmo2KitError) else f"the first process could not load {config.model}"
            shared = [(None, None, None, None, said)]
    dist.broadcast_object_list(shared, src=0)
    hf_config, generation_config, dtype, weights, error = shared[0]
    if failure is not None:
        raise failure
    if error is not None:
        raise Olmo2KitError(error)
    ref = _base(config)
    with init_empty_weights(include_buffers=False):  # the weights on meta; buffers (RoPE's frequencies) computed
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.tie_weights()  # from_config under init_empty_weights leaves lm_head apart from tied embeddings
    model.generation_config = generation_config  # the checkpoint's, saved with the result (from_config makes one)
    model = _ready_to_train(model, config, ref)
    _shard(model, run, config.mixed_precision)
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model.to_empty(device=run.accelerator.device)  # each process's shards, uninitialised; buffers too, so put back
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    set_model_state_dict(model, full or {}, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    return model, tokenizer, ref, weights


def _shard(model, run: Run, mixed_precision: bool) -> None:
    """Shard `model` over the processes with torch's FSDP2, one decoder layer a unit, as configs/accelerate/fsdp.yaml
    has accelerate do on GPUs: each process keeps its share of the weights, gradients and optimizer state. With
    `mixed_precision`, `bf16_policy`; without it on a GPU, bf16 autocast as accelerate gives an unsharded model."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers.models.olmo2.modeling_olmo2 import Olmo2DecoderLayer

    policy = bf16_policy() if mixed_precision else MixedPrecisionPolicy()  # fp32 throughout
    if run.bf16:  # accelerate autocasts a model it prepares; this one it does not prepare
        model.forward = torch.autocast("cuda", dtype=torch.bfloat16)(model.forward)
    for module in model.modules():
        if isinstance(module, Olmo2DecoderLayer):
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)  # the rest: embeddings, final norm, output layer
    held = sum(p.to_local().numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    precision = ", bf16 compute and fp32 reduction" if mixed_precision else ""
    run.say(f"FSDP2 over {run.accelerator.num_processes} processes{precision}: the first holds {held:,} of the "
            f"{total:,} weights")


def _objective(config: FinetuneConfig, run: Run, model, ref: ModelRef) -> SFT | DPO:
    """What the run minimises; for DPO, with the reference log-probabilities of the model as loaded (the base, for
    LoRA), read from the data directory or computed now and stored there for the next run."""
    if config.method == "sft":
        return SFT(run.data, run.seq_len)
    return DPO(run.data, run.seq_len, _reference(config, run, model, ref), config.beta,
               length_normalized=config.dpo_loss == "length-normalized")


def _reference(config: FinetuneConfig, run: Run, model, ref: ModelRef):
    """The reference log-probabilities of every pair (reference.py): stored ones, else computed now and stored."""
    key = reference_key(str(ref), run.identity["weights"], config.quantize,
                        dtype="bf16" if run.bf16 and config.lora else "fp32", autocast=run.bf16, seq_len=run.seq_len,
                        data=run.identity["data"], mixed_precision=config.mixed_precision)
    unwrapped = run.accelerator.unwrap_model(model)
    without_adapter = unwrapped.disable_adapter if config.lora else nullcontext  # a LoRA run's reference: its base
    return stored_or_computed(key, model, run.data, run.seq_len, config.batch_size, run.accelerator, without_adapter,
                              run.say)


def _starting_point(run: Run, model, optimizer, ref) -> tuple[int, int]:
    """(step, tokens) to start from: the checkpoint's, loaded into `model` and `optimizer`, else (0, 0).

    The training log keeps the lines of the steps up to there.
    """
    start_step, tokens = 0, 0
    if run.checkpoint is not None:
        start_step, tokens = load_checkpoint(run.checkpoint, model, optimizer, run.accelerator)
        run.say(f"resuming from {run.checkpoint} (step {start_step} of {run.total})")
    elif not ref.local and ref.revision:
        run.say(f"starting from {ref}: Hub checkpoints hold weights only, so the optimizer starts fresh "
                "(OLMo's --reset_trainer_state)")
    if run.main:  # the steps after it are trained, and logged, again
        run.train_log.rewrite(e for e in run.train_log.read() if e["step"] <= start_step)
    return start_step, tokens


def _record_result(config: FinetuneConfig, run: Run, ref, result: FinetuneResult) -> None:
    """Write finetune.json, the settings and results; last, so it marks a finished run."""
    write_json_atomic(run.output / RESULT, {
        "config": dataclasses.asdict(config), "base": str(ref), "data_manifest": run.data.manifest,
        "result": result.to_dict(), "processes": run.accelerator.num_processes,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })


def _load_model(config: FinetuneConfig, accelerator, bf16: bool, data: PreparedData | PreferenceData,
                device: str | None = None):
    """The base model ready to train (full weights, or with a LoRA adapter), its tokenizer, ModelRef and starting
    weights' identity, on `device` (by default this process's). A LoRA adapter to start from is merged into its base
    first: training starts from the merged model, which is also DPO's reference."""
    ref = _base(config)
    device = device or _process_device(accelerator)
    # Full fine-tuning keeps fp32 master weights under bf16 autocast; a frozen base can be bf16.
    dtype = "bf16" if bf16 and config.lora else "fp32"
    adapter = ref.local and (Path(ref.source) / "adapter_config.json").is_file()
    if adapter and (config.lora or config.quantize):
        # A new adapter records the base it trains on, and a merged start exists on no disk for it to name.
        raise Olmo2KitError(f"{config.model} is a LoRA adapter: merge it into its base first (`olmo2kit merge "
                            f"{config.model} DIR`), then fine-tune DIR with --lora")
    # An adapter records the name the base loaded from (peft's base_model_name_or_path) and its revision.
    model, tokenizer = load(ref.source, revision=ref.revision, dtype=dtype, quantize=config.quantize, device=device)
    weights = _starting_weights(ref, model)
    if adapter:
        model = model.merge_and_unload()
        model.requires_grad_(True)  # peft froze the base it merged into
    _check_tokenizer(data, tokenizer, model, config)
    return _ready_to_train(model, config, ref), tokenizer, ref, weights


def _ready_to_train(model, config: FinetuneConfig, ref: ModelRef):
    """`model` as it trains: without a KV cache, prepared for k-bit training, with activation checkpointing and a
    LoRA adapter, as `config` asks."""
    model.config.use_cache = False
    if config.quantize:
        from peft import prepare_model_for_kbit_training

        keep_4bit_trainable(model)
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
    return model


def _starting_weights(ref: ModelRef, model) -> dict:
    """Which weights a run starts from: a directory's by the stamps of its safetensors files (a rewritten file
    changes them), a Hub revision's by the commit it resolved to; an adapter's and its base's both."""
    weights = {"files": _stamps(Path(ref.source))} if ref.local else {"commit": _commit(model)}
    if ref.local and (Path(ref.source) / "adapter_config.json").is_file():
        base = model.peft_config["default"].base_model_name_or_path
        weights["base"] = {"files": _stamps(Path(base))} if Path(base).is_dir() else {"commit": _commit(model)}
    return weights


def _stamps(directory: Path) -> dict:
    return {p.name: file_stamp(p.stat()) for p in sorted(directory.glob("*.safetensors"))}


def _commit(model) -> str | None:
    """The Hub commit the model's files came from (transformers records it in the config it loads)."""
    return getattr(model.config, "_commit_hash", None)


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


def _check_tokenizer(data: PreparedData | PreferenceData, tokenizer, model, config: FinetuneConfig) -> None:
    manifest = data.manifest
    if manifest.get("eos_token_id") != tokenizer.eos_token_id or manifest.get("vocab_size", 0) != len(tokenizer):
        raise Olmo2KitError(
            f"{data.path} was prepared with the tokenizer of {manifest.get('tokenizer')}, which does not match "
            f"{config.model}'s: run `olmo2kit prepare-data ... --model {config.model}` again"
        )
    if manifest.get("vocab_size", 0) > model.config.vocab_size:
        raise Olmo2KitError(f"{data.path} has token ids beyond the model's {model.config.vocab_size}-token vocabulary")


def _finished(output: Path, config: FinetuneConfig) -> FinetuneResult | None:
    """The result of a finished run in `output` when resuming it, an error when not; None if unfinished."""
    if not (output / RESULT).exists():
        checkpoints = saved_checkpoints(output)
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


def _log_store(output: Path) -> JsonlStore:
    """The training log: {"step", "loss", "lr", "tokens"} a line, with DPO's "chosen_reward", "rejected_reward",
    "margin" and "accuracy", and {"step", "eval_loss"} after each evaluation."""
    return JsonlStore(output / LOG, what="training log line", hint="pick another --output",
                      is_record=lambda row: isinstance(row.get("step"), int))


def _save_result(output: Path, model, tokenizer, accelerator, config: FinetuneConfig, say) -> str:
    """Save the trained model in HF format into `output`: full weights, an adapter, or the merged model. It is
    written into a staging directory, moved into `output` once whole."""
    saved = "merged" if config.merge else "adapter" if config.lora else "full"
    staging = output / _STAGING
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    accelerator.wait_for_everyone()
    _save_weights(model, staging / "adapter" if config.merge else staging, accelerator, config)
    if not accelerator.is_main_process:
        return saved
    if config.merge:
        say("merging the adapter into the base weights")
        _merge(staging / "adapter", staging, _process_device(accelerator))
    else:
        tokenizer.save_pretrained(staging)
    for item in staging.iterdir():
        target = output / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    staging.rmdir()
    fsync_dir(output)  # the renames on disk before finetune.json, written next, says the run finished
    return saved


def _save_weights(model, directory: Path, accelerator, config: FinetuneConfig) -> None:
    """The trained weights, and their config, in HF format in `directory`, every process taking part.

    A model sharded by FSDP is written a tensor at a time (`save_weights_from_shards`): save_pretrained would first
    gather it whole on the first process. An adapter, a small part of the model, is gathered whole.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    unwrapped = accelerator.unwrap_model(model)
    main = accelerator.is_main_process
    if not config.lora:
        unwrapped.config.use_cache = True  # off while training; on for generation from the saved model
    if not config.lora and sharded(unwrapped):
        if main:  # the config files save_pretrained writes, as it writes them (transformers 5.19, modeling_utils.py)
            unwrapped.config.dtype = str(unwrapped.dtype).removeprefix("torch.")
            unwrapped.config.save_pretrained(directory)
            if unwrapped.can_generate():
                unwrapped.generation_config.save_pretrained(directory)
        save_weights_from_shards(unwrapped, directory, main)
        return
    state_dict = get_model_state_dict(model, options=state_dict_options(ignore_frozen_params=config.lora))
    if main and config.lora:
        # The adapter leaves embeddings alone; saying so spares peft a Hub lookup of the base config.
        unwrapped.save_pretrained(directory, state_dict=state_dict, save_embedding_layers=False)
    elif main:
        unwrapped.save_pretrained(directory, state_dict=state_dict)
    del unwrapped, state_dict
    accelerator.free_memory()


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
        fsync_tree(staging)
        os.replace(staging, output)  # an empty directory is replaced whole
        fsync_dir(output.parent)
    except OSError as e:
        raise Olmo2KitError(f"cannot write {output} ({e.strerror}): give a new directory you can write to") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output

