"""model / revision / dtype / quantization -> (model, tokenizer), ready to generate."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from olmo2kit.compat import hub_network_errors, offline_mode, quiet_bitsandbytes
from olmo2kit.devices import resolve_device, resolve_dtype
from olmo2kit.errors import Olmo2KitError
from olmo2kit.model.sizes import DEFAULT_MODEL, QUANTIZATIONS, aliases, resolve_alias

log = logging.getLogger("olmo2kit")

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from: a local directory, or a Hub repo at a revision."""

    source: str  # local path or repo id
    revision: str | None
    local: bool

    def __str__(self) -> str:
        return self.source if self.local or not self.revision else f"{self.source}@{self.revision}"


def resolve_model(model: str, revision: str | None = None) -> ModelRef:
    """Turn a size alias, repo id, `repo@revision` or local directory into a ModelRef.

    >>> resolve_model("1b-instruct").source
    'allenai/OLMo-2-0425-1B-Instruct'
    """
    model = model.strip()
    if not model:
        raise Olmo2KitError("no model given: pass a size alias (e.g. 1b), a repo id or a local directory")
    path = Path(model).expanduser()
    if path.is_dir():
        if revision:
            raise Olmo2KitError(f"{model} is a local directory: --revision applies to Hub repos only")
        return ModelRef(str(path), None, local=True)
    name, _, at_revision = model.partition("@")
    if at_revision:
        if revision and revision != at_revision:
            raise Olmo2KitError(
                f"two revisions given ({at_revision!r} in the model, {revision!r} as --revision): keep one"
            )
        revision = at_revision
    repo = resolve_alias(name)
    if repo:
        return ModelRef(repo, revision or None, local=False)
    if path.exists():
        raise Olmo2KitError(f"{model} is a file: give a checkpoint directory, a size alias or a Hub repo id")
    if model.startswith((".", "/", "~")) or (os.sep in model and not _REPO_ID.match(name)):
        raise Olmo2KitError(f"no such directory: {model} (make one with `olmo2kit tiny {model}`)")
    if _REPO_ID.match(name):
        return ModelRef(name, revision or None, local=False)
    raise Olmo2KitError(
        f"unknown model {model!r}: use a size alias ({', '.join(aliases())}), "
        "a Hub repo id like allenai/OLMo-2-0425-1B, or a local directory"
    )


def quantization_config(quantize: str, compute_dtype):
    """The BitsAndBytesConfig for int8, nf4 or fp4 (the model card's load_in_8bit=True is gone)."""
    if quantize not in QUANTIZATIONS:
        raise Olmo2KitError(f"unknown quantization {quantize!r}: use one of {', '.join(QUANTIZATIONS)}")
    quiet_bitsandbytes()
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise Olmo2KitError(
            f"--quantize {quantize} needs bitsandbytes: pip install 'bitsandbytes>=0.49'"
        ) from None
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_compute_dtype=compute_dtype
    )


def load(
    model: str = DEFAULT_MODEL,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    quantize: str | None = None,
    device: str = "auto",
):
    """Load an OLMo 2 model and its tokenizer, ready for generation.

    `model` is a size alias (`1b`, `7b-instruct`, ...), a Hub repo id, `repo@revision`
    or a local directory. Weights load from safetensors only; remote code never runs.
    The model is in eval mode with the KV cache on (instruct configs ship it off),
    and the tokenizer pads on the left for batched generation.

    >>> model, tokenizer = load("1b", quantize="nf4")  # doctest: +SKIP
    """
    quiet_bitsandbytes()  # peft and quantization import it
    ref = resolve_model(model, revision)
    if ref.local and (Path(ref.source) / "adapter_config.json").exists():
        return _load_adapter(Path(ref.source), dtype=dtype, quantize=quantize, device=device)
    if ref.local and not (Path(ref.source) / "config.json").is_file():
        raise Olmo2KitError(
            f"{ref.source} holds no config.json: it is not a checkpoint (save one with save_pretrained, "
            "or make a tiny one with `olmo2kit tiny DIR`)"
        )
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    kwargs: dict = dict(dtype=torch_dtype, use_safetensors=True, trust_remote_code=False)
    if ref.revision:
        kwargs["revision"] = ref.revision
    if quantize:
        kwargs["quantization_config"] = quantization_config(quantize, torch_dtype)
    # device="auto" on a GPU lets accelerate spread a model that does not fit one device.
    kwargs["device_map"] = "auto" if device == "cuda" else device
    if not ref.local and not offline_mode():
        if _hub_reachable(ref):
            if ref.revision:
                from olmo2kit.model.revisions import check_revision

                check_revision(ref.source, ref.revision)
        elif _cached(ref):
            log.warning(f"cannot reach the Hub: loading the cached copy of {ref}")
            kwargs["local_files_only"] = True
        else:
            # a name like out/1b-sft may have been meant as a directory: say it is not one
            nowhere = "" if resolve_alias(model.split("@")[0]) else f" (nor is there a local directory {ref.source})"
            raise Olmo2KitError(
                f"{ref} is not in the local cache and the Hub cannot be reached (check the network and "
                "HF_ENDPOINT); for an offline try, build a tiny checkpoint with `olmo2kit tiny ./tiny` "
                f"and pass --model ./tiny{nowhere}"
            )

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(ref.source, revision=ref.revision, trust_remote_code=False,
                                                  local_files_only=kwargs.get("local_files_only", False))
        loaded = AutoModelForCausalLM.from_pretrained(ref.source, **kwargs)
    except OSError as e:
        raise Olmo2KitError(explain_load_error(ref, e)) from e
    loaded.eval()
    loaded.config.use_cache = True
    loaded.generation_config.use_cache = True
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return loaded, tokenizer


def load_tokenizer(model: str = DEFAULT_MODEL, revision: str | None = None):
    """The tokenizer of a model (alias, repo id, repo@revision or local directory), without its weights."""
    from transformers import AutoTokenizer

    ref = resolve_model(model, revision)
    try:
        return AutoTokenizer.from_pretrained(ref.source, revision=ref.revision, trust_remote_code=False)
    except OSError as e:
        raise Olmo2KitError(explain_load_error(ref, e)) from e


def _load_adapter(path: Path, **options):
    """A LoRA adapter directory (from `olmo2kit finetune --lora`): its base model, then the adapter."""
    import json

    from peft import PeftModel

    config = json.loads((path / "adapter_config.json").read_text())
    base_name = config.get("base_model_name_or_path")
    if not base_name:
        raise Olmo2KitError(f"{path} holds a LoRA adapter without base_model_name_or_path: cannot tell its base model")
    base, tokenizer = load(base_name, revision=config.get("revision"), **options)
    adapted = PeftModel.from_pretrained(base, path).eval()
    if (path / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        tokenizer.padding_side = "left"
    return adapted, tokenizer


def _hub_reachable(ref: ModelRef) -> bool:
    """Ask the Hub about the repo once, without retries: True if it answered.

    A missing or gated repo is a user error here, before any download starts; a network
    failure returns False, so that a cached copy can load at once instead of after
    huggingface_hub's retries (about 45 s).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        HfApi().model_info(ref.source)
    except GatedRepoError:
        return True  # the download will say it needs a token
    except RepositoryNotFoundError:
        raise Olmo2KitError(
            f"{ref.source} not found on the Hub: check the repo id, or for a private repo set HF_TOKEN "
            "or run `hf auth login`"
        ) from None
    except HfHubHTTPError:
        return True  # the Hub answered; the download reports what is wrong
    except hub_network_errors():
        return False
    return True


def _cached(ref: ModelRef) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(ref.source, "config.json", revision=ref.revision)
    return isinstance(found, str)


def explain_load_error(ref: ModelRef, error: OSError) -> str:
    message = str(error)
    if ref.local:
        first_line = message.splitlines()[0]
        return f"cannot load {ref.source}: {first_line} (it needs config.json, a tokenizer and *.safetensors)"
    if "safetensors" in message.lower() and "pytorch_model" in message.lower():
        return f"{ref} has no safetensors weights; olmo2kit loads safetensors only"
    return (
        f"{ref} is neither in the local cache nor reachable on the Hub "
        f"({'offline mode' if offline_mode() else 'check the network, HF_ENDPOINT and HF_TOKEN'}); "
        "for an offline try, build a tiny checkpoint with `olmo2kit tiny ./tiny` and pass --model ./tiny"
    )
