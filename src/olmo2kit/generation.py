"""generate, stream_generate, and the Generation record they return."""

from __future__ import annotations

import logging
import queue
import resource
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass

from olmo2kit.errors import Olmo2KitError

log = logging.getLogger("olmo2kit")

# The model card's sampling defaults.
DEFAULT_MAX_NEW_TOKENS = 100
DEFAULT_TOP_K = 50
DEFAULT_TOP_P = 0.95


@dataclass
class Generation:
    """One generation, or one streamed chunk of it, with its own metrics.

    From `generate`, `text` is the whole continuation (the prompt is not repeated)
    and `token_ids` the tokens generated, end-of-text included when it was produced.
    From `stream_generate`, `text` and `token_ids` are the new piece only, the
    counters run, and `finish_reason` is set on the last chunk: "stop" (end of text or a
    stop string) or "length" (max_new_tokens reached).
    """

    text: str
    token_ids: list[int]
    prompt_tokens: int
    new_tokens: int
    finish_reason: str | None
    tokens_per_s: float  # new tokens over the wall time of the call so far
    elapsed_s: float
    prompt_tps: float | None = None  # prompt tokens over time to first token (streaming)
    peak_memory_gb: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SamplingOptions:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = DEFAULT_TOP_K
    top_p: float = DEFAULT_TOP_P
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise Olmo2KitError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.do_sample:
            if not 0.0 < self.top_p <= 1.0:
                raise Olmo2KitError(f"top_p must be in (0, 1], got {self.top_p}")
            if self.top_k < 0:
                raise Olmo2KitError(f"top_k must be 0 (off) or positive, got {self.top_k}")
            if not self.temperature > 0.0:
                raise Olmo2KitError(f"temperature must be positive (use greedy decoding for 0), got {self.temperature}")
        if self.seed is not None and self.seed < 0:
            raise Olmo2KitError(f"seed must be 0 or positive, got {self.seed}")
        if any(not s for s in self.stop):
            raise Olmo2KitError("a stop string cannot be empty")

    def generate_kwargs(self, tokenizer) -> dict:
        kwargs: dict = dict(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            use_cache=True,  # the instruct configs ship use_cache: false
            pad_token_id=tokenizer.pad_token_id,
        )
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_k=self.top_k or None, top_p=self.top_p)
        if self.stop:
            kwargs.update(stop_strings=list(self.stop), tokenizer=tokenizer)
        return kwargs


def generate(
    model, tokenizer, prompt: str | Sequence[str] | None = None, *, messages: Sequence | None = None,
    compile: bool = False, draft_model=None, **options
) -> Generation | list[Generation]:
    """Continue `prompt`, or reply to `messages`. One gives one Generation; a list gives one each, batched.

    `messages` is a conversation, `[{"role": "system" | "user" | "assistant", "content": str}, ...]`,
    rendered with the tokenizer's chat template (the official OLMo 2 one, with a warning, when it has
    none), or a list of conversations.

    Options: max_new_tokens (100), do_sample (True), temperature (1.0), top_k (50),
    top_p (0.95), seed, stop (strings that end the text; not included in it).

    `compile=True` decodes through the static-cache compiled path (`olmo2kit.compiled`);
    `draft_model` (a smaller OLMo 2, same tokenizer) turns on speculative decoding through
    transformers' assisted generation, for one prompt at a time. Greedy output is the same
    either way (exactly in fp32).

    >>> generate(model, tokenizer, "Language modeling is ", do_sample=False).text  # doctest: +SKIP
    >>> generate(model, tokenizer, messages=[{"role": "user", "content": "Hi!"}]).text  # doctest: +SKIP
    """
    import torch

    requests, single = _requests(prompt, messages)
    sampling = SamplingOptions(**normalize_options(options))
    _check_acceleration(compile, draft_model, len(requests))
    inputs = _encode(model, tokenizer, requests, sampling)
    eos_ids = _eos_ids(model, tokenizer)
    _seed(sampling.seed)
    start = time.perf_counter()
    if compile:
        rows = _decode_compiled(model, tokenizer, inputs, sampling, eos_ids).tokens.tolist()
    else:
        extra = {"assistant_model": draft_model} if draft_model is not None else {}
        with torch.inference_mode():
            output = model.generate(**inputs, **sampling.generate_kwargs(tokenizer), **extra)
        rows = output[:, inputs["input_ids"].shape[1]:].tolist()
    elapsed = time.perf_counter() - start
    prompt_counts = inputs["attention_mask"].sum(dim=1).tolist()
    peak = peak_memory_gb(model)
    results = []
    for row, prompt_tokens in zip(rows, prompt_counts, strict=True):
        ids = _trim(row, eos_ids, tokenizer.pad_token_id)
        text, stopped = _cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), sampling.stop)
        if stopped:  # decoding may run past a stop string (always on the compiled path): keep tokens up to it
            ids = _ids_through_stop(tokenizer, ids, sampling.stop)
        finished = stopped or (ids and ids[-1] in eos_ids)
        results.append(
            Generation(
                text=text,
                token_ids=ids,
                prompt_tokens=int(prompt_tokens),
                new_tokens=len(ids),
                finish_reason="stop" if finished else "length",
                tokens_per_s=len(ids) / elapsed if elapsed > 0 else 0.0,
                elapsed_s=elapsed,
                peak_memory_gb=peak,
            )
        )
    return results[0] if single else results


def stream_generate(
    model, tokenizer, prompt: str | None = None, *, messages: Sequence | None = None, cache=None,
    compile: bool = False, draft_model=None, **options
) -> Iterator[Generation]:
    """Yield the continuation of `prompt`, or the reply to `messages`, piece by piece as it is generated.

    Takes the same options as `generate`, for one prompt or one conversation. Closing the
    iterator early (or Ctrl-C in the consumer) stops generation at the next token.
    `cache`, a transformers `DynamicCache` holding the keys and values of the first tokens
    of this prompt (fewer than all), saves computing them again; it is extended in place.
    `compile` and `draft_model` work as in `generate` (the compiled path keeps its own
    static cache and takes no `cache`; it hands text over every 8 tokens).

    >>> for chunk in stream_generate(model, tokenizer, "Hello"):  # doctest: +SKIP
    ...     print(chunk.text, end="", flush=True)
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    requests, single = _requests(prompt, messages)
    if not single:
        raise Olmo2KitError("stream_generate takes one prompt or conversation; use generate for a list")
    sampling = SamplingOptions(**normalize_options(options))
    _check_acceleration(compile, draft_model, 1)
    if compile and cache is not None:
        raise Olmo2KitError("the compiled path keeps its own static cache: pass no cache with compile=True")
    inputs = _encode(model, tokenizer, requests, sampling)
    prompt_tokens = int(inputs["input_ids"].shape[1])
    if cache is not None:
        if cache.get_seq_length() >= prompt_tokens:
            raise ValueError(f"the cache holds {cache.get_seq_length()} tokens, not fewer than the prompt's")
        inputs[cache_keyword()] = cache
    tokens: queue.Queue = queue.Queue()
    cancel = threading.Event()

    class Feed(BaseStreamer):
        first = True

        def put(self, value):
            if self.first:  # generate hands the prompt over first
                self.first = False
                return
            tokens.put(value.reshape(-1).tolist())

        def end(self):
            tokens.put(None)

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

    failure: list[BaseException] = []
    eos_ids = _eos_ids(model, tokenizer)

    class Stop(Exception):
        pass

    def feed_chunk(chunk) -> None:  # the compiled path's hand-over, every few tokens
        if cancel.is_set():
            raise Stop
        tokens.put(chunk[0].tolist())

    def run() -> None:
        try:
            if compile:
                _decode_compiled(model, tokenizer, inputs, sampling, eos_ids, check_every=8, on_tokens=feed_chunk)
                tokens.put(None)
                return
            extra = {"assistant_model": draft_model} if draft_model is not None else {}
            with torch.inference_mode():
                model.generate(
                    **inputs,
                    **sampling.generate_kwargs(tokenizer),
                    **extra,
                    streamer=Feed(),
                    stopping_criteria=StoppingCriteriaList([Cancelled()]),
                )
        except Stop:
            tokens.put(None)
        except BaseException as e:  # re-raised in the consumer's thread
            failure.append(e)
            tokens.put(None)

    _seed(sampling.seed)
    start = time.perf_counter()
    worker = threading.Thread(target=run, name="olmo2kit-generate", daemon=True)
    worker.start()
    ids: list[int] = []
    emitted = ""  # text already yielded
    pending: list[int] = []  # tokens not yet yielded
    prompt_tps = None
    finish = "length"
    try:
        while (new := tokens.get()) is not None:
            now = time.perf_counter()
            if prompt_tps is None:
                prompt_tps = prompt_tokens / max(now - start, 1e-9)
            new = _trim(new, eos_ids, None)  # the compiled path hands over tokens past the end of text as padding
            ids += new
            pending += new
            text, stopped = _cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), sampling.stop)
            if ids[-1] in eos_ids or stopped:
                finish = "stop"
                if stopped:  # drop the tokens decoded past the stop string
                    kept = _ids_through_stop(tokenizer, ids, sampling.stop)
                    pending = pending[: max(len(pending) - (len(ids) - len(kept)), 0)]
                    ids = kept
                break
            ready = _safe_prefix(text, sampling.stop)
            if len(ready) > len(emitted):
                yield _chunk(ready[len(emitted):], pending, ids, prompt_tokens, None, start, prompt_tps, model)
                emitted, pending = ready, []
        else:
            text = tokenizer.decode(ids, skip_special_tokens=True)
        if failure:
            raise failure[0]
        yield _chunk(text[len(emitted):], pending, ids, prompt_tokens, finish, start, prompt_tps, model)
    finally:
        cancel.set()
        worker.join()


def _chunk(text, pending, ids, prompt_tokens, finish, start, prompt_tps, model) -> Generation:
    elapsed = time.perf_counter() - start
    return Generation(
        text=text,
        token_ids=list(pending),
        prompt_tokens=prompt_tokens,
        new_tokens=len(ids),
        finish_reason=finish,
        tokens_per_s=len(ids) / elapsed if elapsed > 0 else 0.0,
        elapsed_s=elapsed,
        prompt_tps=prompt_tps,
        peak_memory_gb=peak_memory_gb(model) if finish else None,
    )


def normalize_options(options: dict) -> dict:
    stop = options.get("stop")
    if isinstance(stop, str):
        options = {**options, "stop": (stop,)}
    elif stop is not None:
        options = {**options, "stop": tuple(stop)}
    unknown = set(options) - set(SamplingOptions.__dataclass_fields__)
    if unknown:
        raise Olmo2KitError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
    return {k: v for k, v in options.items() if v is not None}


def _requests(prompt, messages) -> tuple[list, bool]:
    """The prompts or conversations to run, and whether a single one was given."""
    if prompt is not None and messages is not None:
        raise Olmo2KitError("give a prompt or messages, not both")
    if messages is None:
        if isinstance(prompt, str):
            return [prompt], True
        return list(prompt or ()), False
    from olmo2kit.chat import check_messages

    if isinstance(messages, Sequence) and messages and all(isinstance(m, Mapping) for m in messages):
        return [check_messages(messages)], True
    if isinstance(messages, str | Mapping):
        raise Olmo2KitError('messages must be a list of {"role": ..., "content": ...} dicts')
    return [check_messages(conversation) for conversation in messages], False


def _encode(model, tokenizer, requests: list, sampling: SamplingOptions) -> dict:
    """Tokenize prompts (str) or conversations (lists of messages), padded on the left, and check the context."""
    if not requests:
        raise Olmo2KitError("no prompt given")
    if all(isinstance(r, str) for r in requests):
        if any(not p.strip() for p in requests):
            raise Olmo2KitError("empty prompt: give some text to continue")
        inputs = tokenizer(requests, return_tensors="pt", padding=True, return_token_type_ids=False)
    else:
        from olmo2kit.chat import encode_chat

        ids = [encode_chat(tokenizer, r) for r in requests]
        inputs = tokenizer.pad({"input_ids": ids}, return_tensors="pt", padding_side="left")
    context = getattr(model.config, "max_position_embeddings", None)
    length = inputs["input_ids"].shape[1]
    if context and length >= context:
        raise Olmo2KitError(f"the prompt is {length} tokens, which fills the model's {context}-token context")
    if context and length + sampling.max_new_tokens > context:
        raise Olmo2KitError(
            f"the prompt ({length} tokens) plus max_new_tokens ({sampling.max_new_tokens}) passes the "
            f"model's {context}-token context: lower max_new_tokens to {context - length} or shorten the prompt"
        )
    # Inputs go where the first layer lives (with a device map that may not be model.device's GPU).
    return {k: v.to(model.device) for k, v in inputs.items()}


def _check_acceleration(compile: bool, draft_model, batch: int) -> None:
    if compile and draft_model is not None:
        raise Olmo2KitError("choose one of compile and a draft model: speculative decoding runs on the plain path")
    if draft_model is not None and batch > 1:
        raise Olmo2KitError("speculative decoding (a draft model) takes one prompt at a time")


def _decode_compiled(model, tokenizer, inputs: dict, sampling: SamplingOptions, eos_ids: set[int], **kwargs):
    """Decode `inputs` on the compiled path, sampling on the device; the model's decoder is reused."""
    from olmo2kit.compiled import decoder_for

    batch, length = inputs["input_ids"].shape
    decoder = decoder_for(model, batch, length + sampling.max_new_tokens, compile=True)
    return decoder.decode(
        inputs["input_ids"], inputs["attention_mask"], sampling.max_new_tokens, eos_ids=eos_ids,
        pad_id=tokenizer.pad_token_id, greedy=not sampling.do_sample, temperature=sampling.temperature,
        top_k=sampling.top_k, top_p=sampling.top_p, **kwargs,
    )


def _ids_through_stop(tokenizer, ids: list[int], stop: Sequence[str]) -> list[int]:
    """The shortest prefix of `ids` whose text holds a stop string."""
    for n in range(1, len(ids) + 1):
        if _cut_at_stop(tokenizer.decode(ids[:n], skip_special_tokens=True), stop)[1]:
            return ids[:n]
    return ids


def cache_keyword() -> str:
    """generate's keyword for a KV cache: `cache` since transformers renamed it, `past_key_values` before."""
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


def _seed(seed: int | None) -> None:
    if seed is not None:
        from transformers import set_seed

        set_seed(seed)


def _eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _trim(row: list[int], eos_ids: set[int], pad_id: int | None) -> list[int]:
    """A generated row up to and including its first end-of-text, without batch padding."""
    for i, token in enumerate(row):
        if token in eos_ids:
            return row[: i + 1]
    while row and row[-1] == pad_id:
        row = row[:-1]
    return row


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _safe_prefix(text: str, stop: Sequence[str]) -> str:
    """The part of `text` that can be shown now: no half character, no possible stop-string start."""
    text = text.rstrip("\ufffd")  # an incomplete UTF-8 sequence decodes to U+FFFD until it completes
    hold = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return text[: len(text) - hold]


def peak_memory_gb(model) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, resident set size on a CPU."""
    import torch

    if model.device.type == "cuda":
        return torch.cuda.max_memory_allocated(model.device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9
