"""Peak memory of the first process while a model sharded over 2 processes (FSDP2, gloo, CPU) is saved: olmo2kit's
sharded saves against gathering the whole state on the first process, as olmo2kit did before.

    MALLOC_MMAP_THRESHOLD_=131072 OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc_per_node 2 \\
        benchmarks/bench_dcp_save.py --model 1b --optimizer none --out /tmp/bench-dcp-save

The model is OLMo 2's architecture from olmo2kit's own table (model.sizes.hf_config, as `olmo2kit estimate` reads
it; --hidden-size, --intermediate-size, --layers and --vocab-size shrink it), built on the meta device, sharded with
fully_shard a decoder layer a unit as `finetune --fsdp` shards it, then given random fp32 weights, shard by shard:
no process ever holds the whole model. The optimizer is AdamW over every weight, its two moments made by a step on
zero gradients (`--optimizer adamw`, the default), or AdamW over the final norm's weight alone (`--optimizer none`:
a checkpoint of the weights, for a model whose moments would not fit the machine twice; a save needs an optimizer
with state, as torch's get_state_dict otherwise makes it by a step on zero gradients for every weight). Four saves,
in this order, each timed and measured on the first process:
  checkpoint sharded  olmo2kit's training checkpoint (checkpoints.save_checkpoint: torch.distributed.checkpoint,
                      each process writing its own shards)
  result sharded      the final model as HF safetensors (checkpoints.save_weights_from_shards: a tensor gathered
                      at a time, the first process writing it straight to the file)
  checkpoint full     what olmo2kit did before: get_state_dict(full_state_dict=True, cpu_offload=True) gathers
                      weights and optimizer on the first process, which writes them (safetensors, torch.save)
  result full         get_model_state_dict(full_state_dict=True, cpu_offload=True), then safetensors' save_file
The measure is the rise of the process's resident high-water mark (VmHWM, reset through /proc/self/clear_refs just
before the save) over its resident memory then (VmRSS): what the save itself added. MALLOC_MMAP_THRESHOLD_ makes
glibc give every freed block above 128 KiB back at once, so one save's leftovers do not serve the next.
Prints one JSON object (the first process).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def status(key: str) -> int:
    """A memory line of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0]) * 1024
    raise KeyError(key)


def measured(save) -> dict:
    """Run `save` on every process; the first process's peak rise in resident memory during it, and its seconds."""
    gc.collect()
    dist.barrier()
    before = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS (Linux, proc(5))
    start = time.perf_counter()
    save()
    seconds = time.perf_counter() - start
    peak = status("VmHWM")
    dist.barrier()
    return {"rise_bytes": peak - before, "before_bytes": before, "seconds": round(seconds, 2)}


def sharded_model(args):
    """OLMo 2 of `args.model`'s architecture, sharded over the processes, its fp32 weights random."""
    from torch.distributed.fsdp import fully_shard
    from transformers import Olmo2ForCausalLM
    from transformers.models.olmo2.modeling_olmo2 import Olmo2DecoderLayer

    from olmo2kit.model.sizes import hf_config

    overrides = {key: value for key, value in (("hidden_size", args.hidden_size), ("vocab_size", args.vocab_size),
                                               ("intermediate_size", args.intermediate_size),
                                               ("num_hidden_layers", args.layers)) if value}
    if "vocab_size" in overrides:  # the real pad and eos ids lie past a small vocabulary
        overrides.update(pad_token_id=1, eos_token_id=0)
    with torch.device("meta"):
        model = Olmo2ForCausalLM(hf_config(args.model, **overrides))
    for module in model.modules():
        if isinstance(module, Olmo2DecoderLayer):
            fully_shard(module)
    fully_shard(model)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(dist.get_rank())
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.to_local().normal_(0.0, 0.02, generator=generator)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="1b", help="a size of olmo2kit's table (model/sizes.py)")
    parser.add_argument("--hidden-size", type=int)
    parser.add_argument("--intermediate-size", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--vocab-size", type=int)
    parser.add_argument("--optimizer", choices=("adamw", "none"), default="adamw",
                        help="adamw: every weight's two moments are saved too; none: the final norm's alone")
    parser.add_argument("--max-shard-size", default=None, help="the result's file size (default: save_pretrained's)")
    parser.add_argument("--out", required=True, help="a directory for the saves (on a filesystem both processes see)")
    args = parser.parse_args()

    from accelerate import Accelerator
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    from olmo2kit.training.checkpoints import MAX_SHARD_SIZE, save_checkpoint, save_weights_from_shards
    from olmo2kit.training.config import FinetuneConfig

    accelerator = Accelerator(cpu=True)  # as finetune sets up its processes: gloo, under torchrun
    main_process = accelerator.is_main_process
    out = Path(args.out)
    model = sharded_model(args)
    # The moments made now: the first save would otherwise make them (get_state_dict does) and count them.
    trained = list(model.parameters()) if args.optimizer == "adamw" else [model.model.norm.weight]
    optimizer = torch.optim.AdamW(trained, lr=1e-5)
    for parameter in trained:
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    for name in ("sharded-result", "full-checkpoint", "full-result"):
        (out / name).mkdir(parents=True, exist_ok=True)
    config = FinetuneConfig(data=str(out), output=str(out), keep_checkpoints=1)

    def full_checkpoint() -> None:
        weights, optim = get_state_dict(model, optimizer, options=full)
        if main_process:
            save_file(weights, out / "full-checkpoint" / "trainable.safetensors")
            torch.save(optim, out / "full-checkpoint" / "optimizer.pt")

    def full_result() -> None:
        state = get_model_state_dict(model, options=full)
        if main_process:
            save_file(state, out / "full-result" / "model.safetensors", metadata={"format": "pt"})

    saves = {
        "checkpoint sharded": lambda: save_checkpoint(out, 1, 0, {}, model, optimizer, accelerator, config),
        "result sharded": lambda: save_weights_from_shards(model, out / "sharded-result", main_process,
                                                           max_shard_size=args.max_shard_size or MAX_SHARD_SIZE),
        "checkpoint full": full_checkpoint,
        "result full": full_result,
    }
    figures = {}
    for name, save in saves.items():
        figures[name] = measured(save)
        if main_process:
            print(f"{name}: {figures[name]}", file=sys.stderr, flush=True)
    if main_process:
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        largest = max(p.numel() * p.element_size() for p in model.parameters())
        print(json.dumps({
            "model": args.model, "processes": dist.get_world_size(), "architecture": {key: getattr(model.config, key)
                for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")},
            "parameters": sum(p.numel() for p in model.parameters()), "weights_bytes": weights,
            "largest_tensor_bytes": largest, "optimizer": args.optimizer, "saves": figures,
        }))


if __name__ == "__main__":
    main()
