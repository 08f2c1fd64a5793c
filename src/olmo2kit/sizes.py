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

from dataclasses import dataclass

from olmo2kit.errors import Olmo2KitError

# Shared by every size (config.json of each base repo).
VOCAB_SIZE = 100352
CONTEXT_LENGTH = 4096
ROPE_THETA = 500000.0
RMS_NORM_EPS = 1e-6
EOS_TOKEN_ID = 100257  # <|endoftext|>
PAD_TOKEN_ID = 100277  # <|pad|>

VARIANTS = ("base", "sft", "dpo", "instruct")


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
        parameter and memory figures; it carries no training budget."""
        c = config if isinstance(config, dict) else config.to_dict()
        return cls(name, name, c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"],
                   c.get("num_key_value_heads") or c["num_attention_heads"], c["intermediate_size"], 0, (), None,
                   0.0, vocab_size=c["vocab_size"])

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


SIZES: dict[str, Size] = {
    s.name: s
    for s in (
        # Tokens per step: stage1-step140000-tokens294B and stage1-step1907359-tokens4001B
        # give 2,097,152 (512 x 4096). Stage 2: one 50B run is kept (ingredient 3);
        # ingredients 1 and 2 were exploratory (model card, "Model Merging").
        Size("1b", "allenai/OLMo-2-0425-1B", 16, 2048, 16, 16, 8192,
             4_000_000_000_000, (50_000_000_000,), 2_097_152, 0.35e23),
        # stage1-step928646-tokens3896B gives 4,194,304 (1024 x 4096); 3 x 50B souped.
        Size("7b", "allenai/OLMo-2-1124-7B", 32, 4096, 32, 32, 11008,
             4_000_000_000_000, (50_000_000_000,) * 3, 4_194_304, 1.8e23),
        # stage1-step596057-tokens5001B and stage2-ingredient4-step35773-tokens300B
        # give 8,388,608 (2048 x 4096); 3 x 100B and 1 x 300B souped.
        Size("13b", "allenai/OLMo-2-1124-13B", 40, 5120, 40, 40, 13824,
             5_000_000_000_000, (100_000_000_000,) * 3 + (300_000_000_000,), 8_388_608, 4.6e23),
        # 64 layers, 40 query heads over 8 key/value heads (GQA). stage1-step721901-tokens6056B and
        # stage2-ingredient1-step11921-tokens101B give 8,388,608 (2048 x 4096); branch names from
        # allenai/OLMo-core, src/scripts/official/OLMo2/README.md.
        Size("32b", "allenai/OLMo-2-0325-32B", 64, 5120, 40, 8, 27648,
             6_000_000_000_000, (100_000_000_000,) * 3 + (300_000_000_000,), 8_388_608, 13.0e23),
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
    """The Size an alias or an official repo id belongs to, else None."""
    repo = resolve_alias(model) or model
    for size in SIZES.values():
        if repo.lower() == size.repo.lower() or repo.lower().startswith(size.repo.lower() + "-"):
            return size
    return None


def get_size(name: str) -> Size:
    try:
        return SIZES[name.strip().lower()]
    except KeyError:
        raise Olmo2KitError(f"unknown size {name!r}: use one of {', '.join(SIZES)}") from None


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
_DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0}
_QUANT_BYTES = {"int8": 1.0, "nf4": 0.5 + 4 / 64, "fp4": 0.5 + 4 / 64}


def weight_bytes(size: str | Size, dtype: str = "bf16", quantize: str | None = None) -> int:
    """Bytes the weights take in memory.

    Quantization converts the decoder's Linear layers; embeddings, lm_head and norms
    stay in `dtype` (transformers keeps lm_head unquantized).
    """
    s = size if isinstance(size, Size) else get_size(size)
    if dtype not in _DTYPE_BYTES:
        raise Olmo2KitError(f"unknown dtype {dtype!r}: use one of {', '.join(_DTYPE_BYTES)}")
    if quantize is None:
        return int(s.params * _DTYPE_BYTES[dtype])
    if quantize not in _QUANT_BYTES:
        raise Olmo2KitError(f"unknown quantization {quantize!r}: use one of {', '.join(_QUANT_BYTES)}")
    quantized = s.linear_params * _QUANT_BYTES[quantize]
    if quantize == "int8":
        quantized += 4 * s.num_hidden_layers * _linear_rows(s)
    return int(quantized + (s.params - s.linear_params) * _DTYPE_BYTES[dtype])


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
