"""Option types shared by the commands, as `Annotated` aliases (huggingface_hub's CLI does the same).

Defaults live where the library keeps them: sampling defaults are `olmo2kit.inference.sampling.DEFAULTS`.
This module imports no command module and nothing heavy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand

from olmo2kit.errors import Olmo2KitError
from olmo2kit.inference.ray_pool import LOCAL, MAX_RETRIES, RayOptions
from olmo2kit.inference.sampling import SEED_LIMIT

# Options that may be given bare, and the value a bare one stands for. Typer's own fork of click gives an option a
# value always or never (typer/_click/parser.py has no flag_value for an option that takes a value), so `Command`
# fills the value in before parsing.
BARE_VALUES = {"--ray": LOCAL}


class Command(TyperCommand):
    """Every olmo2kit command (app.py registers them with it): typer's, where an option of `BARE_VALUES` given
    bare (last, or followed by another option) means that option with its bare value: `--ray` is `--ray local`."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        names = {name for param in self.params for name in getattr(param, "opts", ())}
        return super().parse_args(ctx, with_bare_values(args, BARE_VALUES.keys() & names))


def with_bare_values(args: list[str], options) -> list[str]:
    """`args` with the bare value after each of `options` given without one (none after a `--`)."""
    filled = []
    for index, arg in enumerate(args):
        if arg == "--":
            return filled + args[index:]
        filled.append(arg)
        following = args[index + 1] if index + 1 < len(args) else None
        if arg in options and (following is None or following.startswith("-")):
            filled.append(BARE_VALUES[arg])
    return filled


# Options shared by every command that loads a model.
ModelOpt = Annotated[
    str,
    typer.Option(
        "--model", "-m",
        help="Size alias (1b, 7b-instruct, 13b-dpo, ...), Hub repo id, repo@revision, or local directory.",
    ),
]
RevisionOpt = Annotated[
    str | None, typer.Option("--revision", "-r", help="Hub branch, tag or commit, e.g. stage1-step140000-tokens294B.")
]
QuantizeOpt = Annotated[
    str | None, typer.Option("--quantize", "-q", help="bitsandbytes int8, nf4 or fp4 (transformers); or a GGUF type "
                                         "for llama.cpp: q8_0, q4_k_m, bf16, f16, f32.")
]
DtypeOpt = Annotated[
    str, typer.Option("--dtype", help="auto (bf16 on a capable GPU or a CPU with native bf16, else fp32), bf16, "
                                      "fp16 or fp32."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
CompileOpt = Annotated[
    bool, typer.Option("--compile", help="Static KV cache and a compiled decode step (CUDA graphs on a GPU).")
]
DraftOpt = Annotated[
    str | None,
    typer.Option("--draft-model", help="Speculative decoding with this smaller OLMo 2 as draft (e.g. 1b)."),
]

# Sampling options, shared by generate and chat.
MaxNewTokensOpt = Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate.")]
TemperatureOpt = Annotated[float, typer.Option(help="Sampling temperature.")]
TopKOpt = Annotated[int, typer.Option("--top-k", help="Sample from the K likeliest tokens (0: off).")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass, in (0, 1].")]
GreedyOpt = Annotated[bool, typer.Option("--greedy", help="Greedy decoding instead of sampling.")]
SeedOpt = Annotated[int | None, typer.Option(help=f"Random seed (0 to {SEED_LIMIT - 1}), for repeatable samples.")]
MinPOpt = Annotated[
    float, typer.Option("--min-p", help="Sample only tokens at least this fraction as likely as the top one (0: off).")
]
RepetitionPenaltyOpt = Annotated[
    float,
    typer.Option("--repetition-penalty", help="Above 1 makes tokens already in the text less likely (1: off)."),
]

# Evaluation options, shared by perplexity, eval and sweep.
StrideOpt = Annotated[
    int | None, typer.Option(help="Tokens each window moves on by (default: half of --max-length).")
]
MaxLengthOpt = Annotated[
    int | None, typer.Option("--max-length", help="Tokens per window (default: the model's context).")
]
LimitOpt = Annotated[int | None, typer.Option(help="Evaluate the first N documents of each task (a quick look).")]
FewshotOpt = Annotated[int | None, typer.Option("--num-fewshot", help="Few-shot examples (default: the task's).")]
IncludePathOpt = Annotated[
    Path | None, typer.Option("--include-path", help="A directory of your own lm-eval task YAML files.")
]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Requests per forward pass.")]

# The engine, and how vLLM lays the model out (shared by every command that loads a model).
_VLLM = "vLLM engine"
EngineOpt = Annotated[
    str,
    typer.Option("--engine", help="auto (llama.cpp for a GGUF --quantize type; vLLM where it is installed and a "
                                  "CUDA GPU is visible; on a CPU, llama.cpp for generate, chat and serve of a model "
                                  "of 100M+ parameters; else transformers), transformers, vllm or llamacpp (CPU)."),
]
TensorParallelOpt = Annotated[
    int, typer.Option("--tensor-parallel-size", help="GPUs each layer is split over.", rich_help_panel=_VLLM)
]
PipelineParallelOpt = Annotated[
    int, typer.Option("--pipeline-parallel-size", help="GPUs the layers are split over.", rich_help_panel=_VLLM)
]
DataParallelOpt = Annotated[
    int, typer.Option("--data-parallel-size", help="Whole copies of the model, each on its own GPUs.",
                      rich_help_panel=_VLLM)
]
GpuMemoryOpt = Annotated[
    float, typer.Option("--gpu-memory-utilization", help="Share of each GPU's memory vLLM may take.",
                        rich_help_panel=_VLLM)
]
MaxModelLenOpt = Annotated[
    int | None, typer.Option("--max-model-len", help="Tokens of prompt and reply together (default: the context).",
                             rich_help_panel=_VLLM)
]
EnforceEagerOpt = Annotated[
    bool, typer.Option("--enforce-eager", help="No torch.compile or CUDA graphs: starts sooner, runs slower.",
                       rich_help_panel=_VLLM)
]

# Units of work (a sweep's revisions, a batch job's shards) as Ray tasks: `ray_options` reads them.
_RAY = "Ray"
RayOpt = Annotated[
    str | None,
    typer.Option("--ray", metavar="[ADDRESS]", rich_help_panel=_RAY,
                 help="Run each unit as a Ray task; the results are written here. Alone (or local): start a Ray on "
                      "this machine; auto: join the one running here (or RAY_ADDRESS); HOST:PORT or ray://HOST:PORT: "
                      "a cluster's head."),
]
RayCpusOpt = Annotated[
    float | None, typer.Option("--ray-cpus", help="CPUs each Ray task asks for (default: 1).", rich_help_panel=_RAY)
]
RayGpusOpt = Annotated[
    float | None,
    typer.Option("--ray-gpus", rich_help_panel=_RAY,
                 help="GPUs each Ray task asks for (default: 1 where the cluster has GPUs, else 0)."),
]
RayRetriesOpt = Annotated[
    int | None,
    typer.Option("--ray-retries", rich_help_panel=_RAY,
                 help="Tries again of a unit that raised an exception or lost its worker, before it is reported "
                      f"(0 to {MAX_RETRIES}, default: {RayOptions.retries}). One that failed by the user's mistake "
                      "(bad data, a checkpoint that cannot load) is reported at once, never tried again."),
]


def ray_options(ray: str | None, cpus: float | None, gpus: float | None, retries: int | None) -> RayOptions | None:
    """The `RayOptions` that --ray, --ray-cpus, --ray-gpus and --ray-retries ask for, checked before anything
    loads or connects; None without --ray (the others given alone are an Olmo2KitError)."""
    if ray is None:
        given = [name for name, value in (("--ray-cpus", cpus), ("--ray-gpus", gpus), ("--ray-retries", retries))
                 if value is not None]
        if given:
            raise Olmo2KitError(f"{' and '.join(given)} size each Ray task: give them with --ray")
        return None
    defaults = RayOptions()
    return RayOptions(address=ray, cpus=defaults.cpus if cpus is None else cpus, gpus=gpus,
                      retries=defaults.retries if retries is None else retries)
