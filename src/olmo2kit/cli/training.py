"""`olmo2kit prepare-data`, `finetune` and `merge`: training data in OLMo's layout, fine-tuning on it, and
merging a LoRA adapter into its base."""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer

from olmo2kit.cli.options import DeviceOpt, JsonOpt, ModelOpt, QuantizeOpt, RevisionOpt
from olmo2kit.cli.output import ProgressBar, format_bytes, info, print_table
from olmo2kit.errors import Olmo2KitError


def prepare_data_command(
    source: Annotated[str, typer.Argument(
        help='JSONL of {"messages": [...]}, {"text": ...} or {"chosen": [...], "rejected": [...]}, or a dataset name.'
    )],
    outdir: Annotated[str, typer.Argument(help="Directory for the .npy files and manifest.json.")],
    model: ModelOpt = "1b",
    revision: RevisionOpt = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per row; longer examples are cut.")] = 4096,
    data_format: Annotated[
        str | None, typer.Option("--format", help="chat, text or preference (default: from the first example).")
    ] = None,
    split: Annotated[str, typer.Option(help="Dataset split, when SOURCE is a dataset name.")] = "train",
    as_json: JsonOpt = False,
) -> None:
    """Tokenize chat, text or preference examples into OLMo's training layout.

    Writes input_ids.npy (headerless uint32 memmap, rows x seq-len, padded
    with the pad id), label_mask.npy (bool memmap, True on the tokens to
    learn: assistant content and its end-of-text for chat, every token for
    text) and manifest.json, last. OLMo's own trainer reads the same files.
    Preference pairs ({"chosen": [...], "rejected": [...]}, a shared prompt
    and two answers) go to chosen_ and rejected_ input_ids.npy and
    label_mask.npy, row i of each the same pair, labelled on the answer
    only, for `finetune --method dpo`.
    Examples with nothing to learn are dropped and counted; an interrupted
    run continues where it stopped, and a second run into OUTDIR while one
    is going is refused. Progress goes to stderr.

    Examples:

      olmo2kit prepare-data chats.jsonl data/sft --model 1b

      olmo2kit prepare-data notes.jsonl data/notes --format text --json

      olmo2kit prepare-data allenai/tulu-3-sft-olmo-2-mixture data/tulu

      olmo2kit prepare-data allenai/olmo-2-1124-7b-preference-mix data/prefs
    """
    from olmo2kit.compat import quiet_transformers
    from olmo2kit.training.data import prepare_data

    quiet_transformers()
    bar = ProgressBar("examples")
    try:
        manifest = prepare_data(source, outdir, model=model, revision=revision, seq_len=seq_len, format=data_format,
                                split=split, progress=bar.update)
    finally:
        bar.close()
    if as_json:
        print(json.dumps(manifest, indent=2))
        return
    print_table([
        ("rows", "seq_len", "examples", "truncated", "dropped", "tokens", "labelled", "format"),
        (str(manifest["rows"]), str(manifest["seq_len"]), str(manifest["examples"]), str(manifest["truncated"]),
         str(manifest["dropped"]), f"{manifest['tokens']:,}", f"{manifest['label_tokens']:,}", manifest["format"]),
    ])
    written = ", ".join([*manifest["files"].values(), "manifest.json"])
    info(f"wrote {outdir}/{written} (tokenizer {manifest['tokenizer']})")


def finetune_command(
    data: Annotated[str | None, typer.Option("--data", help="Directory written by prepare-data.")] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Directory for the result.")] = None,
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    config: Annotated[str | None, typer.Option("--config", help="YAML recipe, e.g. configs/finetune/NAME.yaml; "
                                                                "options given here override it.")] = None,
    lora: Annotated[bool | None, typer.Option("--lora/--no-lora", help="Train a LoRA adapter (peft).")] = None,
    lora_r: Annotated[int | None, typer.Option("--lora-r", help="LoRA rank (default 16).")] = None,
    lora_alpha: Annotated[int | None, typer.Option("--lora-alpha", help="LoRA scaling alpha (default 32).")] = None,
    quantize: QuantizeOpt = None,
    epochs: Annotated[int | None, typer.Option(help="Passes over the data (default 1).")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Optimizer steps, instead of --epochs.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    warmup: Annotated[
        float | None, typer.Option(help="Share of the steps with a linear warm-up, then linear decay (default 0.03).")
    ] = None,
    weight_decay: Annotated[
        float | None, typer.Option("--weight-decay", help="AdamW weight decay (default 0).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Rows per process per micro-batch.")] = None,
    grad_accum: Annotated[int | None, typer.Option("--grad-accum", help="Micro-batches per optimizer step.")] = None,
    seq_len: Annotated[int | None, typer.Option("--seq-len", help="Cut rows to this many tokens.")] = None,
    gradient_checkpointing: Annotated[
        bool | None, typer.Option("--gradient-checkpointing/--no-gradient-checkpointing",
                                  help="Activation checkpointing: recompute each decoder layer's activations in "
                                       "the backward pass (--fsdp too): less memory, slower.")
    ] = None,
    save_every: Annotated[int | None, typer.Option("--save-every", help="Steps between checkpoints.")] = None,
    val_fraction: Annotated[
        float | None, typer.Option("--val-fraction", help="Share of the rows held out to evaluate, never trained on.")
    ] = None,
    eval_every: Annotated[
        int | None, typer.Option("--eval-every", help="Steps between evaluations of the held-out rows (and the end).")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in --output.")] = False,
    merge: Annotated[
        bool | None,
        typer.Option("--merge/--no-merge", help="LoRA: also save the merged model (adapter in DIR/adapter)."),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for the data order and the LoRA init.")] = None,
    fsdp: Annotated[
        bool | None,
        typer.Option("--fsdp/--no-fsdp", help="Shard the model over torchrun's processes with torch's FSDP2 "
                                              "(CPUs over gloo, one GPU a process over NCCL)."),
    ] = None,
    mixed_precision: Annotated[
        bool | None,
        typer.Option("--mixed-precision/--no-mixed-precision",
                     help="With --fsdp: FSDP2's bf16 policy, bf16 compute and fp32 gradient reduction (the weights and "
                          "optimizer stay fp32)."),
    ] = None,
    device: DeviceOpt = None,
    method: Annotated[
        str | None, typer.Option("--method", help="sft (prepared examples, the default) or dpo (preference pairs).")
    ] = None,
    beta: Annotated[
        float | None, typer.Option("--beta", help="DPO: how far the model may move from the reference "
                                                  "(default 0.1; 5 with --dpo-loss length-normalized).")
    ] = None,
    dpo_loss: Annotated[
        str | None, typer.Option("--dpo-loss", help="DPO: sigmoid (the default) or length-normalized "
                                                    "(OLMo 2's recipe: log-probabilities averaged over the answer).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune a model or checkpoint on prepared data: full, LoRA or QLoRA; SFT or DPO.

    Runs unchanged under torchrun and accelerate launch (configs/accelerate/).
    The loss log is DIR/train_log.jsonl; with --val-fraction it also holds
    the loss on the held-out rows. --save-every N writes
    DIR/checkpoints/step-N; --resume continues from the last one, with the
    same data order. A loss that becomes NaN stops the run and keeps the
    checkpoints. A run from a Hub revision starts a fresh optimizer: Hub
    checkpoints hold weights only (OLMo's --reset_trainer_state).

    --method dpo trains on preference pairs (prepare-data --format
    preference) against the starting model: its log-probabilities of every
    answer are computed once and stored in DATA/reference/ for later runs.
    The log then also holds chosen_reward, rejected_reward, margin and
    accuracy per step.

    Examples:

      olmo2kit finetune --config configs/finetune/olmo2-1b-sft.yaml \\
        --data data/sft --output out/1b-sft

      olmo2kit finetune --model 7b --lora --quantize nf4 --lora-r 64 \\
        --data data/sft --output out/7b-qlora --max-steps 500

      olmo2kit finetune --model 1b --data data/sft --output out/1b \\
        --val-fraction 0.05 --eval-every 100

      olmo2kit finetune --model 1b --revision stage1-step140000-tokens294B \\
        --data data/sft --output out/early --resume

      torchrun --nproc_per_node 8 $(which olmo2kit) finetune \\
        --config configs/finetune/olmo2-1b-sft.yaml --data data/sft -o out/1b

      torchrun --nproc_per_node 2 $(which olmo2kit) finetune --fsdp \\
        --mixed-precision --gradient-checkpointing \\
        --model ./tiny --data data/tiny -o out/tiny-fsdp --device cpu

      torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 --rdzv-id sft $(which olmo2kit) finetune \\
        --config configs/finetune/olmo2-1b-sft.yaml --data data/sft \\
        -o /shared/out/1b   (the same line on each of the two machines)

      olmo2kit finetune --method dpo --dpo-loss length-normalized \
        --model out/1b-sft --data data/prefs -o out/1b-dpo --lr 5e-7

      olmo2kit generate "Hello" --model out/1b-sft
    """
    from olmo2kit.compat import quiet_transformers
    from olmo2kit.training.finetune import FinetuneConfig, finetune, load_config

    given = dict(
        data=data, output=output, model=model, revision=revision, lora=lora, lora_r=lora_r, lora_alpha=lora_alpha,
        quantize=quantize, epochs=epochs, max_steps=max_steps, lr=lr, warmup=warmup, weight_decay=weight_decay,
        batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, gradient_checkpointing=gradient_checkpointing,
        save_every=save_every, val_fraction=val_fraction, eval_every=eval_every, merge=merge, seed=seed, fsdp=fsdp,
        mixed_precision=mixed_precision, device=device, method=method, beta=beta, dpo_loss=dpo_loss,
    )
    values = load_config(config) if config else {}
    values.update({key: value for key, value in given.items() if value is not None})
    if epochs is not None or max_steps is not None:  # one given here replaces the recipe's other
        values = {k: v for k, v in values.items() if k not in ("epochs", "max_steps") or given[k] is not None}
    values["resume"] = resume
    for required in ("data", "output"):
        if not values.get(required):
            raise Olmo2KitError(f"--{required} is required (on the command line or in the --config file)")
    quiet_transformers()
    settings = FinetuneConfig(**values)
    bar = ProgressBar("steps")
    try:
        result = finetune(settings, say=info, progress=lambda step, total, loss: bar.update(
            step, total, "loss -" if loss is None else f"loss {loss:.4f}"))
    finally:
        bar.close()
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    loss = "-" if result.loss is None else f"{result.loss:.4f}"
    eval_loss = "-" if result.eval_loss is None else f"{result.eval_loss:.4f}"
    print_table([
        ("steps", "tokens", "last loss", "eval loss", "tokens/s", "peak memory", "saved"),
        (str(result.steps), f"{result.tokens:,}", loss, eval_loss, f"{result.tokens_per_s:,.0f}",
         format_bytes(result.peak_memory_gb * 1e9), f"{result.saved} in {result.output}"),
    ])


def merge_command(
    adapter: Annotated[str, typer.Argument(help="A LoRA adapter directory, as finetune --lora writes.")],
    out: Annotated[str, typer.Argument(help="A new (or empty) directory for the merged model.")],
    device: DeviceOpt = "auto",
) -> None:
    """Merge a LoRA adapter into a full-precision copy of its base model.

    The base is the one the adapter records (a local directory, or a Hub
    repo at a revision), loaded unquantized even for a QLoRA adapter. OUT
    must be new or empty; it appears whole or not at all.

    Examples:

      olmo2kit merge out/7b-qlora out/7b-merged

      olmo2kit generate "Hello" --model out/7b-merged
    """
    from olmo2kit.compat import quiet_transformers
    from olmo2kit.training.finetune import merge_adapter

    quiet_transformers()
    info(f"merging {adapter} into its base model")
    merged = merge_adapter(adapter, out, device=device)
    info(f"wrote the merged model to {merged}")
