"""model / revision / dtype / quantization -> (model, tokenizer), ready to generate."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from olmo2kit.compat import hub_network_errors, offline_mode, quiet_bitsandbytes
from olmo2kit.devices import resolve_device, resolve_dtype
from olmo2kit.errors import Olmo2KitError, first_line
from olmo2kit.model.sizes import (
    DEFAULT_MODEL,
    QUANTIZATIONS,
    aliases,
    checkpoint_architecture,
    read_config,
    resolve_alias,
)

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
    path = _as_path(model)
    if path is not None and path.is_dir():
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
    if path is not None and path.exists():
        raise Olmo2KitError(f"{model} is a file: give a checkpoint directory, a size alias or a Hub repo id")
    if model.startswith((".", "/", "~")) or (os.sep in model and not _REPO_ID.match(name)):
        raise Olmo2KitError(f"no such directory: {model} (make one with `olmo2kit tiny {model}`)")
    if _REPO_ID.match(name):
        return ModelRef(name, revision or None, local=False)
    raise Olmo2KitError(
        f"unknown model {model!r}: use a size alias ({', '.join(aliases())}), "
        "a Hub repo id like allenai/OLMo-2-0425-1B, or a local directory"
    )


def _as_path(model: str) -> Path | None:
    """`model` as a path here (`~` expanded), or None where no file can have that name: over the system's length
    limits, a NUL byte, `~user` of no user, a folder it may not look in. Such a name is no local checkpoint, and
    asking the file system about it again would raise."""
    try:
        path = Path(model).expanduser()
        path.exists()
    except (OSError, ValueError, RuntimeError):
        return None
    return path


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

    A checkpoint of another architecture (its config.json's model_type is not olmo2), and weights
    that do not fill the architecture exactly (missing, unexpected or of another shape, which
    transformers would leave random or drop), are an Olmo2KitError, as are unreadable files.

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
    # A Hub model: the Hub is asked once, and when it cannot be reached the cached copy loads, if there is one.
    kwargs["local_files_only"] = not ref.local and not offline_mode() and cached_instead(ref, model)

    config = _checked_config(ref, kwargs["local_files_only"])
    tokenizer = _load_tokenizer(ref, kwargs["local_files_only"])
    _check_vocabulary(ref, tokenizer, config)
    loaded = _load_weights(ref, config, kwargs)
    loaded.eval()
    loaded.config.use_cache = True
    loaded.generation_config.use_cache = True
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return loaded, tokenizer


def load_tokenizer(model: str = DEFAULT_MODEL, revision: str | None = None):
    """The tokenizer of a model (alias, repo id, repo@revision or local directory), without its weights."""
    return _load_tokenizer(resolve_model(model, revision))


def cached_instead(ref: ModelRef, model: str) -> bool:
    """Whether a Hub model must load from the cache because the Hub cannot be reached (said on stderr);
    an Olmo2KitError when the Hub is down and nothing is cached. Checks a revision the Hub lists."""
    if _hub_reachable(ref):
        if ref.revision:
            from olmo2kit.model.revisions import check_revision

            check_revision(ref.source, ref.revision)
        return False
    if _cached(ref):
        log.warning(f"cannot reach the Hub: loading the cached copy of {ref}")
        return True
    # a name like out/1b-sft may have been meant as a directory: say it is not one
    nowhere = "" if resolve_alias(model.split("@")[0]) else f" (nor is there a local directory {ref.source})"
    raise Olmo2KitError(
        f"{ref} is not in the local cache and the Hub cannot be reached (check the network and "
        "HF_ENDPOINT); for an offline try, build a tiny checkpoint with `olmo2kit tiny ./tiny` "
        f"and pass --model ./tiny{nowhere}"
    )


def _checked_config(ref: ModelRef, local_files_only: bool):
    """The checkpoint's config, refused before any weight loads unless it is OLMo 2's with positive sizes."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    if ref.local:  # read here first, so that whatever is wrong with it is named in olmo2kit's words
        checkpoint_architecture(ref.source, read_config(Path(ref.source) / "config.json"))
    try:
        config = AutoConfig.from_pretrained(ref.source, revision=ref.revision, trust_remote_code=False,
                                            local_files_only=local_files_only)
    except OSError as e:
        raise Olmo2KitError(explain_load_error(ref, e)) from e
    except (ValueError, StrictDataclassError) as e:  # a model_type transformers does not know, a value of a wrong type
        raise Olmo2KitError(f"the config.json of {ref} is not one transformers can read ({first_line(e)}): "
                            "restore the checkpoint's own") from None
    checkpoint_architecture(str(ref), config)
    return config


def _load_tokenizer(ref: ModelRef, local_files_only: bool = False):
    from transformers import AutoTokenizer

    if ref.local:
        _check_tokenizer_files(Path(ref.source))
    try:
        return AutoTokenizer.from_pretrained(ref.source, revision=ref.revision, trust_remote_code=False,
                                             local_files_only=local_files_only)
    except OSError as e:
        raise Olmo2KitError(explain_load_error(ref, e)) from e
    except ValueError as e:  # no tokenizer file it can use (missing, or one it cannot convert)
        raise Olmo2KitError(f"cannot load the tokenizer of {ref} ({first_line(e)}): a checkpoint needs its "
                            "tokenizer.json and tokenizer_config.json, copy them from the model it came from") from None


def _check_vocabulary(ref: ModelRef, tokenizer, config) -> None:
    """A tokenizer with more tokens than the model has embeddings would index past them on its last tokens
    (an IndexError mid-generation): refused at load. Fewer is normal: OLMo 2 pads its 100,278 to 100,352."""
    if len(tokenizer) > config.vocab_size:
        raise Olmo2KitError(f"the tokenizer of {ref} has {len(tokenizer):,} tokens, more than the model's "
                            f"{config.vocab_size:,} embeddings: it is another model's tokenizer, copy this one's")


def _check_tokenizer_files(directory: Path) -> None:
    """Olmo2KitError naming the file when a local checkpoint's tokenizer files cannot be parsed.

    transformers reports each kind of damage by another exception (KeyError, TypeError,
    AttributeError, ...) from deep inside; checked here, each is named by file.
    """
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (directory / name).is_file():
            read_config(directory / name)
    tokenizer_json = directory / "tokenizer.json"
    if not tokenizer_json.is_file():
        return
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(tokenizer_json))
    except Exception as e:
        if type(e) is not Exception:  # tokenizers reports a file it cannot parse as a bare Exception
            raise
        raise Olmo2KitError(f"{tokenizer_json} is not a tokenizer file ({e}): copy it again from the model it "
                            "came from") from None


def _load_weights(ref: ModelRef, config, kwargs: dict):
    """The model from its safetensors files, every weight of the architecture loaded from them."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        # Mis-shaped weights come back in the report below instead of as transformers' RuntimeError.
        loaded, report = AutoModelForCausalLM.from_pretrained(
            ref.source, config=config, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )
    except OSError as e:
        raise Olmo2KitError(explain_load_error(ref, e)) from e
    except SafetensorError as e:
        raise Olmo2KitError(f"{_weights_files(ref)} truncated or not safetensors ({e}): "
                            f"{_fetch_again(ref)}") from None
    _check_loading_report(str(ref), report)
    return loaded


def _check_loading_report(name: str, report: dict) -> None:
    """Olmo2KitError when transformers' loading report (`output_loading_info=True`) lists weights the
    checkpoint lacks, has besides, or has in another shape: loading would leave them random or drop them."""
    problems = []
    for key, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"),
                      ("mismatched_keys", "of another shape")):
        names = sorted(k if isinstance(k, str) else k[0] for k in report.get(key, ()))
        if names:
            more = ", ..." if len(names) > 3 else ""
            problems.append(f"{len(names)} {what} ({', '.join(names[:3])}{more})")
    if problems:
        raise Olmo2KitError(f"the weights of {name} do not match its config.json: {'; '.join(problems)}; give the "
                            "config.json that was saved with these weights")


def _weights_files(ref: ModelRef) -> str:
    """What holds a checkpoint's weights, for a message: 'DIR/model.safetensors is' or 'the ... are'."""
    if ref.local:
        files = sorted(Path(ref.source).glob("*.safetensors"))
        if len(files) == 1:
            return f"{files[0]} is"
        return f"a *.safetensors file in {ref.source} is"
    return f"the cached weights of {ref} are"


def _fetch_again(ref: ModelRef) -> str:
    if ref.local:
        return "copy the checkpoint again from where it came, or save it again"
    return f"remove them with `hf cache rm model/{ref.source}` and load again"


def _load_adapter(path: Path, **options):
    """A LoRA adapter directory (from `olmo2kit finetune --lora`): its base model, then the adapter."""
    base_name, revision = _adapter_base(path)
    base, tokenizer = load(base_name, revision=revision, **options)
    adapted = _apply_adapter(base, path)
    if (path / "tokenizer_config.json").exists():
        tokenizer = _load_tokenizer(ModelRef(str(path), None, local=True))
        tokenizer.padding_side = "left"
    return adapted, tokenizer


def _adapter_base(path: Path) -> tuple[str, str | None]:
    """(base model, its revision) of a LoRA adapter directory, its adapter_config.json checked first."""
    config_path = path / "adapter_config.json"
    config = read_config(config_path)
    base_name = config.get("base_model_name_or_path")
    if not base_name or not isinstance(base_name, str):
        raise Olmo2KitError(f"{path} holds a LoRA adapter without base_model_name_or_path: cannot tell its base model")
    _check_adapter_base(config_path, base_name)
    if config.get("peft_type") != "LORA":
        raise Olmo2KitError(f"{config_path} gives peft_type {config.get('peft_type')!r}: olmo2kit loads LoRA "
                            "adapters (peft_type 'LORA'), restore the adapter's own")
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise Olmo2KitError(f"{config_path} gives r {rank!r}: a LoRA rank is a positive whole number, restore the "
                            "adapter's own")
    revision = config.get("revision")
    if revision is not None and not isinstance(revision, str):
        raise Olmo2KitError(f"{config_path} gives revision {revision!r}: a revision is a branch, tag or commit name")
    if not (path / "adapter_model.safetensors").is_file():
        raise Olmo2KitError(f"{path} holds no adapter_model.safetensors: copy the adapter again, or save it again")
    return base_name, revision


def _apply_adapter(base, path: Path):
    """The adapter of `path` on `base`, in eval mode."""
    from peft import PeftModel
    from peft.utils.error import NoMatchingPeftModuleError
    from safetensors import SafetensorError

    try:
        return PeftModel.from_pretrained(base, str(path)).eval()
    except SafetensorError as e:
        raise Olmo2KitError(f"{path / 'adapter_model.safetensors'} is truncated or not safetensors ({e}): "
                            "copy the adapter again, or save it again") from None
    except NoMatchingPeftModuleError:
        raise Olmo2KitError(f"the LoRA adapter {path} targets modules its base model lacks: it was made for "
                            "another model, give that one as base_model_name_or_path") from None
    except RuntimeError as e:
        if "size mismatch" not in str(e):  # torch's load_state_dict: the adapter's shapes are not its base's
            raise
        raise Olmo2KitError(f"the LoRA adapter {path} does not fit its base model (its weights have other shapes): "
                            "it was made for another model or another r, give the right base or save it again") \
            from None


def _check_adapter_base(config_path: Path, base: str) -> None:
    """Olmo2KitError when an adapter records its base as a relative path: that resolves against the folder
    olmo2kit runs in, not the adapter's, and could load whatever lies there. Aliases and repo ids are fine."""
    name = base.partition("@")[0]
    local = Path(base).expanduser()
    if local.is_absolute() or resolve_alias(name):
        return
    if _REPO_ID.match(name) and not local.exists():
        return  # a Hub repo id, not a directory here
    raise Olmo2KitError(
        f"{config_path} records its base model as the relative path {base!r}, which depends on the folder olmo2kit "
        "runs in: give the base's absolute path there (base_model_name_or_path), or save the adapter again"
    )


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
