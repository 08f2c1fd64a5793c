"""The OLMo 2 size table and what follows from it.

Architecture values are those of the published config.json files:
  allenai/OLMo-2-0425-1B, allenai/OLMo-2-1124-7B, allenai/OLMo-2-1124-13B,
  allenai/OLMo-2-0325-32B (https://huggingface.co/<repo>/blob/main/config.json).
Training budgets and FLOPs are from the model card of allenai/OLMo-2-0425-1B
("Training" and "Evaluation" tables), which covers all four sizes.

This module imports neither torch nor transformers at import time, so
`olmo2kit sizes` stays instant; `hf_config()` imports transformers on call.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from olmo2kit.devices import DTYPES
from olmo2kit.errors import Olmo2KitError

log = logging.getLogger("olmo2kit")

# Shared by every size (config.json of each base repo).
VOCAB_SIZE = 100352
CONTEXT_LENGTH = 4096
ROPE_THETA = 500000.0
RMS_NORM_EPS = 1e-6
EOS_TOKEN_ID = 100257  # <|endoftext|>
PAD_TOKEN_ID = 100277  # <|pad|>

VARIANTS = ("base", "sft", "dpo", "instruct")
MODEL_TYPE = "olmo2"  # config.json's model_type for every OLMo 2 checkpoint
# The fields of config.json that fix the architecture's shapes.
ARCHITECTURE_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                       "intermediate_size", "vocab_size")
CONFIG_MAX_BYTES = 16 << 20  # config files are KBs (a tokenizer_config.json at most a few MB): this is no config


@dataclass(frozen=True)
class Size:
    """One OLMo 2 size: architecture, repos and training budget."""

    name: str
    repo: str  # the base model; variants append -SFT, -DPO, -Instruct
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    stage1_tokens: int
    stage2_runs: tuple[int, ...]  # tokens of each mid-training run ("ingredient")
    tokens_per_step: int | None  # global batch in tokens, read off the Hub branch names
    published_flops: float  # the card's FLOP figure, in FLOPs
    vocab_size: int = VOCAB_SIZE

    @classmethod
    def from_config(cls, name: str, config) -> Size:
        """The architecture of any OLMo 2 config (an Olmo2Config or its config.json as a dict), for
        parameter and memory figures; it carries no training budget.

        Each size must be a positive whole number, and the heads must divide the width: otherwise an
        Olmo2KitError names the field (a negative layer count would give negative memory figures).
        """
        c = config if isinstance(config, dict) else config.to_dict()
        values = {field: c.get(field) for field in ARCHITECTURE_FIELDS}
        if values["num_key_value_heads"] is None:  # absent: one key/value head per attention head
            values["num_key_value_heads"] = values["num_attention_heads"]
        for field, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                given = "no value" if value is None else repr(value)
                raise Olmo2KitError(f"the config of {name} gives {field} {given}: it must be a positive whole number "
                                    "(fix its config.json)")
        for wide, narrow in (("hidden_size", "num_attention_heads"), ("num_attention_heads", "num_key_value_heads")):
            if values[wide] % values[narrow]:
                raise Olmo2KitError(f"the config of {name} gives {wide} {values[wide]}, not a multiple of its {narrow} "
                                    f"{values[narrow]} (fix its config.json)")
        return cls(name=name, repo=name, **values, stage1_tokens=0, stage2_runs=(), tokens_per_step=None,
                   published_flops=0.0)

    def same_architecture(self, other: Size) -> bool:
        """Whether `other` has this size's layers, widths, heads and vocabulary."""
        return all(getattr(self, f) == getattr(other, f) for f in ARCHITECTURE_FIELDS)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def training_tokens(self) -> int:
        return self.stage1_tokens + sum(self.stage2_runs)

    def repo_for(self, variant: str = "base") -> str:
        if variant not in VARIANTS:
            raise Olmo2KitError(f"unknown variant {variant!r}: use one of {', '.join(VARIANTS)}")
        suffix = {"base": "", "sft": "-SFT", "dpo": "-DPO", "instruct": "-Instruct"}[variant]
        return self.repo + suffix

    @property
    def params(self) -> int:
        """Parameter count computed from the architecture (untied embeddings)."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        attention = 2 * h * h + 2 * h * kv  # q, o, k, v; no biases
        mlp = 3 * h * self.intermediate_size  # gate, up, down
        norms = 2 * h + h + kv  # post-attention, post-feedforward, q_norm, k_norm
        layer = attention + mlp + norms
        return 2 * self.vocab_size * h + self.num_hidden_layers * layer + h

    def kv_bytes_per_token(self, element_bytes: int) -> int:
        """Bytes of keys and values one token adds to the cache (all layers)."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * element_bytes

    @property
    def linear_params(self) -> int:
        """Parameters in the decoder's Linear layers: what bitsandbytes quantizes."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        return self.num_hidden_layers * (2 * h * h + 2 * h * kv + 3 * h * self.intermediate_size)

    @property
    def training_flops(self) -> float:
        """The 6ND estimate over all training tokens (stage 1 plus every stage-2 run)."""
        return 6.0 * self.params * self.training_tokens


# Architecture: each repo's config.json. Stage-1 budgets and FLOPs: the model card of allenai/OLMo-2-0425-1B
# ("Training" and "Evaluation" tables, all four sizes). Tokens per step: the token count of a stage-1 branch over
# its step, from the Hub's branch list. Stage-2 runs: the token counts of each repo's stage2-ingredient* branches.
SIZES: dict[str, Size] = {
    s.name: s
    for s in (
        Size(
            name="1b", repo="allenai/OLMo-2-0425-1B",  # huggingface.co/allenai/OLMo-2-0425-1B/blob/main/config.json
            num_hidden_layers=16, hidden_size=2048, num_attention_heads=16, num_key_value_heads=16,
            intermediate_size=8192,
            stage1_tokens=4_000_000_000_000,  # model card: 4T
            # One 50B run kept (ingredient 3); ingredients 1 and 2 were exploratory (model card, "Model Merging").
            stage2_runs=(50_000_000_000,),
            tokens_per_step=2_097_152,  # stage1-step140000-tokens294B, stage1-step1907359-tokens4001B: 512 x 4096
            published_flops=0.35e23,  # model card
        ),
        Size(
            name="7b", repo="allenai/OLMo-2-1124-7B",  # huggingface.co/allenai/OLMo-2-1124-7B/blob/main/config.json
            num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=32,
            intermediate_size=11008,
            stage1_tokens=4_000_000_000_000,  # model card: 4T
            stage2_runs=(50_000_000_000,) * 3,  # model card: three 50B runs, souped
            tokens_per_step=4_194_304,  # stage1-step928646-tokens3896B: 1024 x 4096
            published_flops=1.8e23,  # model card
        ),
        Size(
            name="13b", repo="allenai/OLMo-2-1124-13B",  # huggingface.co/allenai/OLMo-2-1124-13B/blob/main/config.json
            num_hidden_layers=40, hidden_size=5120, num_attention_heads=40, num_key_value_heads=40,
            intermediate_size=13824,
            stage1_tokens=5_000_000_000_000,  # model card: 5T
            stage2_runs=(100_000_000_000,) * 3 + (300_000_000_000,),  # model card: 3 x 100B and 1 x 300B, souped
            tokens_per_step=8_388_608,  # stage1-step596057-tokens5001B, stage2-ingredient4-step35773-tokens300B
            published_flops=4.6e23,  # model card
        ),
        Size(
            name="32b", repo="allenai/OLMo-2-0325-32B",  # huggingface.co/allenai/OLMo-2-0325-32B/blob/main/config.json
            num_hidden_layers=64, hidden_size=5120, num_attention_heads=40, num_key_value_heads=8,  # GQA
            intermediate_size=27648,
            stage1_tokens=6_000_000_000_000,  # model card: 6T
            # Three runs, from the branch names in allenai/OLMo-core, src/scripts/official/OLMo2/README.md:
            # stage2-ingredient1-step11921-tokens101B, stage2-ingredient2-step11921-tokens101B,
            # stage2-ingredient3-step35763-tokens301B. The model card lists the 13B's recipe (3 x 100B and
            # 1 x 300B) for the 32B as well; the branches are the evidence.
            stage2_runs=(100_000_000_000, 100_000_000_000, 300_000_000_000),
            tokens_per_step=8_388_608,  # stage1-step721901-tokens6056B, stage2-ingredient1-step11921-tokens101B
            published_flops=13.0e23,  # model card
        ),
    )
}

DEFAULT_MODEL = "1b"


def aliases() -> dict[str, str]:
    """Every alias (`1b`, `1b-instruct`, `7b-sft`, ...) mapped to its repo id."""
    table = {}
    for size in SIZES.values():
        for variant in VARIANTS:
            key = size.name if variant == "base" else f"{size.name}-{variant}"
            table[key] = size.repo_for(variant)
    return table


def resolve_alias(name: str) -> str | None:
    """The repo id for an alias (case-insensitive), or None if `name` is not one."""
    return aliases().get(name.strip().lower())


def size_of(model: str) -> Size | None:
    """The Size a size name, alias or official repo id (any variant, `@revision` allowed) belongs to, else None.

    This is the one lookup from a name to the size table.

    >>> size_of("allenai/OLMo-2-1124-7B-Instruct@main").name
    '7b'
    """
    name = model.strip().split("@")[0]
    repo = (resolve_alias(name) or name).lower()
    for size in SIZES.values():
        if repo == size.repo.lower() or repo.startswith(size.repo.lower() + "-"):
            return size
    return None


def get_size(name: str) -> Size:
    """`size_of(name)`, or an Olmo2KitError naming the sizes."""
    size = size_of(name)
    if size is None:
        raise Olmo2KitError(f"unknown size {name!r}: use one of {', '.join(SIZES)}")
    return size


def architecture(model: str) -> Size:
    """The architecture of a size, alias or official repo id, or of a local checkpoint directory (its config.json)."""
    known = size_of(model)
    if known:
        return known
    config_path = Path(model).expanduser() / "config.json"
    if not config_path.is_file():
        raise Olmo2KitError(
            f"cannot tell the architecture of {model!r}: give a size ({', '.join(SIZES)}), an OLMo 2 alias or "
            "repo id, or a local checkpoint directory"
        )
    return checkpoint_architecture(model, read_config(config_path))


def checkpoint_architecture(name: str, config) -> Size:
    """The architecture of a checkpoint's config (an Olmo2Config or its config.json as a dict), or an
    Olmo2KitError when it is not OLMo 2's: another model_type, or a size that is not positive."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    if model_type != MODEL_TYPE:
        what = "gives no model_type" if model_type is None else f"gives model_type {model_type!r}"
        raise Olmo2KitError(f"{name} is not an OLMo 2 checkpoint: its config.json {what}, and olmo2kit runs OLMo 2 "
                            f"checkpoints (model_type {MODEL_TYPE!r}) only")
    return Size.from_config(name, config)


def read_config(path: str | os.PathLike) -> dict:
    """A checkpoint's JSON config file (config.json, adapter_config.json) as a dict, or an Olmo2KitError
    naming the file when it cannot be read or holds no JSON object."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(CONFIG_MAX_BYTES + 1)
    except OSError as e:
        raise Olmo2KitError(f"cannot read {path} ({e.strerror}): check the file and its permissions") from None
    if len(data) > CONFIG_MAX_BYTES:
        raise Olmo2KitError(f"{path} is over {CONFIG_MAX_BYTES >> 20} MB, too large for a config file: "
                            "restore the checkpoint's own")
    try:
        config = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # invalid UTF-8 or JSON, or nested past Python's stack
        raise Olmo2KitError(f"{path} is not valid JSON ({e}): restore the checkpoint's own") from None
    if not isinstance(config, dict):
        raise Olmo2KitError(f"{path} holds a JSON {type(config).__name__}, not an object: restore the checkpoint's own")
    return config


def context_length(config) -> int | None:
    """The context of a model config in tokens, or None when it cannot be known.

    OLMo-core's exporter writes `max_position_embeddings: -1`; a value of 0 or less means unknown. Then
    the architecture of a known OLMo 2 size gets the table's context (said once on stderr), and any
    other architecture no limit.
    """
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and context > 0:
        return context
    arch = Size.from_config("config", config)
    known = next((s for s in SIZES.values() if s.same_architecture(arch)), None)
    name = getattr(config, "name_or_path", "") or "the model"
    if name not in _warned_context:
        _warned_context.add(name)
        if known:
            log.warning(f"{name} gives no context length (max_position_embeddings {context}): using {known.name}'s "
                        f"{CONTEXT_LENGTH} tokens")
        else:
            log.warning(f"{name} gives no context length (max_position_embeddings {context}): prompt lengths are "
                        "not checked")
    return CONTEXT_LENGTH if known else None


_warned_context: set[str] = set()


class ContextExceeded(Olmo2KitError):
    """A prompt, or a prompt and the tokens asked for, that do not fit the model's context."""


def check_context(prompt_tokens: int, new_tokens: int, context: int | None, *, prompt: str = "the prompt",
                  new: str = "max_new_tokens") -> None:
    """Olmo2KitError unless `prompt_tokens` and then `new_tokens` more fit a `context` (None: no limit).

    `prompt` and `new` name the two in the message, as the caller's user knows them.
    """
    if context is None:
        return
    if prompt_tokens >= context:
        raise ContextExceeded(f"{prompt} is {prompt_tokens} tokens, which fills the model's {context}-token context")
    if prompt_tokens + new_tokens > context:
        raise ContextExceeded(
            f"{prompt} ({prompt_tokens} tokens) plus {new} ({new_tokens}) passes the model's {context}-token "
            f"context: lower {new} to {context - prompt_tokens} or shorten {prompt}"
        )


def hf_config(size: str | Size = DEFAULT_MODEL, **overrides):
    """An `Olmo2Config` equal to the published config.json of `size`.

    >>> hf_config("7b").num_hidden_layers
    32
    """
    from transformers import Olmo2Config

    s = size if isinstance(size, Size) else get_size(size)
    values = dict(
        vocab_size=s.vocab_size,
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_hidden_layers,
        num_attention_heads=s.num_attention_heads,
        num_key_value_heads=s.num_key_value_heads,
        hidden_act="silu",
        max_position_embeddings=CONTEXT_LENGTH,
        initializer_range=0.02,
        rms_norm_eps=RMS_NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        attention_bias=False,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=None,
        use_cache=True,
        architectures=["Olmo2ForCausalLM"],
    )
    values.update(overrides)
    return Olmo2Config(**values)


# Bytes per weight. Quantized layers also store their scales: bitsandbytes int8 keeps
# one fp32 scale per output row, nf4/fp4 one fp32 absmax per 64-value block
# (BitsAndBytesConfig's default blocksize, no double quantization).
QUANT_BYTES = {"int8": 1.0, "nf4": 0.5 + 4 / 64, "fp4": 0.5 + 4 / 64}
QUANTIZATIONS = tuple(QUANT_BYTES)


def weight_bytes(size: str | Size, dtype: str = "bf16", quantize: str | None = None) -> int:
    """Bytes the weights take in memory.

    Quantization converts the decoder's Linear layers; embeddings, lm_head and norms
    stay in `dtype` (transformers keeps lm_head unquantized).
    """
    s = size if isinstance(size, Size) else get_size(size)
    if dtype not in DTYPES:
        raise Olmo2KitError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    element = DTYPES[dtype].bytes
    if quantize is None:
        return int(s.params * element)
    if quantize not in QUANT_BYTES:
        raise Olmo2KitError(f"unknown quantization {quantize!r}: use one of {', '.join(QUANT_BYTES)}")
    quantized = s.linear_params * QUANT_BYTES[quantize]
    if quantize == "int8":
        quantized += 4 * s.num_hidden_layers * _linear_rows(s)
    return int(quantized + (s.params - s.linear_params) * element)


def _linear_rows(s: Size) -> int:
    """Output rows of one layer's Linear modules (int8 keeps a scale per row)."""
    kv = s.num_key_value_heads * s.head_dim
    return 2 * s.hidden_size + 2 * kv + 2 * s.intermediate_size + s.hidden_size


def table() -> list[dict]:
    """One row per size, as `olmo2kit sizes --json` prints it."""
    rows = []
    for s in SIZES.values():
        rows.append(
            {
                "size": s.name,
                "repo": s.repo,
                "variants": {v: s.repo_for(v) for v in VARIANTS},
                "params": s.params,
                "layers": s.num_hidden_layers,
                "hidden": s.hidden_size,
                "heads": s.num_attention_heads,
                "kv_heads": s.num_key_value_heads,
                "ffn": s.intermediate_size,
                "vocab": s.vocab_size,
                "context": CONTEXT_LENGTH,
                "stage1_tokens": s.stage1_tokens,
                "stage2_runs": list(s.stage2_runs),
                "tokens_per_step": s.tokens_per_step,
                "training_tokens": s.training_tokens,
                "flops_6nd": s.training_flops,
                "flops_published": s.published_flops,
                "weight_bytes": {
                    "fp32": weight_bytes(s, "fp32"),
                    "bf16": weight_bytes(s, "bf16"),
                    "int8": weight_bytes(s, "bf16", "int8"),
                    "nf4": weight_bytes(s, "bf16", "nf4"),
                },
            }
        )
    return rows
