"""Sampling options and their defaults: the one source the library and the CLI read them from.

The defaults are the model card's: sampling with top_k 50 and top_p 0.95, 100 new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

from olmo2kit.errors import Olmo2KitError

# Seeds go to transformers.set_seed, which seeds numpy as well as torch. In .venv, numpy 2.4.6's
# np.random.seed takes 0 to 2**32 - 1 ("Seed must be between 0 and 2**32 - 1" past it), while torch 2.13's
# manual_seed takes any 64-bit value: numpy's range is the one every seed must fit.
SEED_LIMIT = 2**32
TEMPERATURE_RANGE = (0.01, 100.0)
PENALTY_RANGE = (0.01, 100.0)


def check_seed(seed, name: str = "seed") -> int:
    """`seed`, or an Olmo2KitError unless it is an integer in [0, SEED_LIMIT); `name` is how the user gave it."""
    if isinstance(seed, bool) or not isinstance(seed, Integral) or not 0 <= seed < SEED_LIMIT:
        raise Olmo2KitError(f"{name} must be an integer from 0 to {SEED_LIMIT - 1}, got {seed}")
    return seed


@dataclass(frozen=True)
class SamplingOptions:
    max_new_tokens: int = 100
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 50  # 0: off
    top_p: float = 0.95
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0  # 1: off; above 1 makes tokens already in the text less likely
    min_p: float = 0.0  # 0: off; drops tokens less likely than min_p times the likeliest (sampling only)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise Olmo2KitError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.do_sample:
            if not 0.0 < self.top_p <= 1.0:
                raise Olmo2KitError(f"top_p must be in (0, 1], got {self.top_p}")
            if self.top_k < 0:
                raise Olmo2KitError(f"top_k must be 0 (off) or positive, got {self.top_k}")
            # Past these the logits over- or underflow float32 and sampling fails: colder is greedy, hotter uniform.
            if not TEMPERATURE_RANGE[0] <= self.temperature <= TEMPERATURE_RANGE[1]:
                low, high = TEMPERATURE_RANGE
                raise Olmo2KitError(f"temperature must be from {low} to {high} (use greedy decoding for 0), got "
                                    f"{self.temperature}")
        if self.seed is not None:
            check_seed(self.seed)
        if not PENALTY_RANGE[0] <= self.repetition_penalty <= PENALTY_RANGE[1]:
            low, high = PENALTY_RANGE
            raise Olmo2KitError(f"repetition_penalty must be from {low} to {high} (1 is off), got "
                                f"{self.repetition_penalty}")
        if not 0.0 <= self.min_p < 1.0:
            raise Olmo2KitError(f"min_p must be in [0, 1) (0 is off), got {self.min_p}")
        if any(not s for s in self.stop):
            raise Olmo2KitError("a stop string cannot be empty")

    @classmethod
    def from_options(cls, options: dict) -> SamplingOptions:
        """Options as `generate` takes them (`stop` may be one string; None means the default)."""
        return cls(**normalize_options(options))


DEFAULTS = SamplingOptions()


def normalize_options(options: dict) -> dict:
    """`options` with `stop` as a tuple and None values left out; Olmo2KitError for an unknown name."""
    stop = options.get("stop")
    if isinstance(stop, str):
        options = {**options, "stop": (stop,)}
    elif stop is not None:
        options = {**options, "stop": tuple(stop)}
    unknown = set(options) - set(SamplingOptions.__dataclass_fields__)
    if unknown:
        raise Olmo2KitError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
    return {k: v for k, v in options.items() if v is not None}
