"""generate, stream_generate, and the Generation record they return.

Three layers, as in mlx-lm: an engine yields token ids (`olmo2kit.inference.engines`); one
detokenizer per row turns them into text, holds back what may be the start of a stop string,
and builds the `Generation` records; `stream_generate` yields them, and `generate` drains the
streams of a batch.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass

from olmo2kit.errors import Olmo2KitError
from olmo2kit.inference.engines import Engine, check_acceleration, engine_for
from olmo2kit.inference.sampling import SamplingOptions
from olmo2kit.model.chat_template import check_messages, check_text, encode_chat
from olmo2kit.model.sizes import ContextExceeded, check_context


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


def join_chunks(chunks: Sequence[Generation]) -> Generation:
    """The whole generation the streamed `chunks` make: their text and tokens, the last one's metrics."""
    return dataclasses.replace(chunks[-1], text="".join(c.text for c in chunks),
                               token_ids=[i for c in chunks for i in c.token_ids])


def generate(
    model, tokenizer, prompt: str | Sequence[str] | None = None, *, messages: Sequence | None = None,
    compile: bool = False, draft_model=None, engine: Engine | None = None, **options
) -> Generation | list[Generation]:
    """Continue `prompt`, or reply to `messages`. One gives one Generation; a list gives one each, batched.

    `messages` is a conversation, `[{"role": "system" | "user" | "assistant", "content": str}, ...]`,
    rendered with the tokenizer's chat template (the official OLMo 2 one, with a warning, when it has
    none), or a list of conversations.

    Options: max_new_tokens (100), do_sample (True), temperature (1.0), top_k (50),
    top_p (0.95), min_p (0.0: off), repetition_penalty (1.0: off), seed (0 to 2**32 - 1),
    stop (strings that end the text; not included in it). They work as transformers' `generate` options.

    `compile=True` decodes through the static-cache compiled path (`olmo2kit.inference.compiled`);
    `draft_model` (a smaller OLMo 2, same tokenizer) turns on speculative decoding through
    transformers' assisted generation, for one prompt at a time. Greedy output is the same
    either way (exactly in fp32). `engine` runs another engine instead (see
    `olmo2kit.inference.engines`).

    >>> generate(model, tokenizer, "Language modeling is ", do_sample=False).text  # doctest: +SKIP
    >>> generate(model, tokenizer, messages=[{"role": "user", "content": "Hi!"}]).text  # doctest: +SKIP
    """
    requests, single = _requests(prompt, messages)
    check_acceleration(compile, draft_model, len(requests))
    engine = engine or engine_for(model, tokenizer, compile=compile, draft_model=draft_model)
    sampling = SamplingOptions.from_options(options)
    chunks: list[list[Generation]] = [[] for _ in requests]
    for row, chunk in stream_rows(engine, requests, sampling, stream=False):
        chunks[row].append(chunk)
    results = [join_chunks(row) for row in chunks]
    return results[0] if single else results


def stream_generate(
    model, tokenizer, prompt: str | None = None, *, messages: Sequence | None = None, cache=None,
    compile: bool = False, draft_model=None, engine: Engine | None = None, **options
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
    requests, single = _requests(prompt, messages)
    if not single:
        raise Olmo2KitError("stream_generate takes one prompt or conversation; use generate for a list")
    check_acceleration(compile, draft_model, 1)
    engine = engine or engine_for(model, tokenizer, compile=compile, draft_model=draft_model, cache=cache)
    sampling = SamplingOptions.from_options(options)
    for _, chunk in stream_rows(engine, requests, sampling, stream=True):
        yield chunk


def stream_rows(engine: Engine, requests: list, sampling: SamplingOptions, *,
                stream: bool) -> Iterator[tuple[int, Generation]]:
    """(row, chunk) for each prompt or conversation in `requests`, as the engine's tokens come in; each
    row's last chunk has its finish_reason set. Checked and encoded first: nothing runs on a bad request."""
    prompts = encode_requests(engine.tokenizer, requests, engine.context_length)
    for ids in prompts:
        check_context(len(ids), sampling.max_new_tokens, engine.context_length)
    eos_ids = engine.eos_ids()
    start = time.perf_counter()
    rows = [Detokenizer(engine.tokenizer, sampling.stop, eos_ids, len(ids), start, stream, engine.peak_memory_gb)
            for ids in prompts]
    steps = engine.tokens(prompts, sampling, eos_ids, stream=stream)
    try:
        for step in steps:
            for row, (detokenizer, new) in enumerate(zip(rows, step, strict=True)):
                yield from ((row, chunk) for chunk in detokenizer.add(new))
            if all(d.finished for d in rows):
                break
        for row, detokenizer in enumerate(rows):
            yield from ((row, chunk) for chunk in detokenizer.finish())
    finally:
        steps.close()


class Detokenizer:
    """One row's tokens turned into text: cut at end of text or a stop string, with the text that
    may begin a stop string (or is half a character) held back until it is known. It builds every
    `Generation` that `generate` and `stream_generate` return."""

    def __init__(self, tokenizer, stop: Iterable[str], eos_ids: set[int], prompt_tokens: int, start: float,
                 stream: bool, peak_memory_gb: Callable[[], float | None] = lambda: None) -> None:
        self.tokenizer = tokenizer
        self.peak_memory_gb = peak_memory_gb
        self.stop = tuple(stop)
        self.eos_ids = eos_ids
        self.prompt_tokens = prompt_tokens
        self.start = start
        self.stream = stream
        self.ids: list[int] = []
        self.pending: list[int] = []  # tokens not yet yielded
        self.emitted = ""  # text already yielded
        # The text of ids[:read], decoded a few tokens at a time (decoding all ids each token is quadratic in
        # the length); ids[prefix:read] is the context the next tokens are decoded in, so that a character
        # split over several tokens comes out whole.
        self.text = ""
        self.prefix = self.read = 0
        self.prompt_tps: float | None = None
        self.finished = False

    def add(self, new: list[int]) -> Iterator[Generation]:
        """The chunks `new` tokens make ready: none, one, or the last one."""
        if self.finished:
            return
        if self.prompt_tps is None and self.stream:
            self.prompt_tps = self.prompt_tokens / max(time.perf_counter() - self.start, 1e-9)
        new = _through_eos(new, self.eos_ids)  # tokens past the end of text are padding
        self.ids += new
        self.pending += new
        text, stopped = _cut_at_stop(self._decode_new(), self.stop)
        ended = bool(self.ids) and self.ids[-1] in self.eos_ids
        if stopped:  # decoding may run past a stop string: keep the tokens up to it
            kept = _ids_through_stop(self.tokenizer, self.ids, self.stop)
            self.pending = self.pending[: max(len(self.pending) - (len(self.ids) - len(kept)), 0)]
            self.ids = kept
        if stopped or ended:
            yield self._chunk(text, "stop")
            return
        ready = _safe_prefix(text, self.stop)
        if self.stream and len(ready) > len(self.emitted):
            yield self._chunk(ready, None)

    def finish(self) -> Iterator[Generation]:
        """The last chunk of a row the engine stopped feeding without an end: max_new_tokens reached."""
        if not self.finished:
            yield self._chunk(self._decode(self.ids), "length")

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _decode_new(self) -> str:
        """The text of all ids so far; `text` is extended with the new tokens unless they end inside a
        character (then they are decoded again with the next ones)."""
        before = self._decode(self.ids[self.prefix: self.read])
        after = self._decode(self.ids[self.prefix:])
        if not after.startswith(before):  # the tokenizer rewrote the context: decode it all once
            self.text = self._decode(self.ids)
            self.prefix = self.read = len(self.ids)
            return self.text
        if after.endswith("\ufffd"):
            return self.text + after[len(before):]
        self.text += after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        return self.text

    def _chunk(self, text: str, finish_reason: str | None) -> Generation:
        elapsed = time.perf_counter() - self.start
        chunk = Generation(
            text=text[len(self.emitted):],
            token_ids=self.pending,
            prompt_tokens=self.prompt_tokens,
            new_tokens=len(self.ids),
            finish_reason=finish_reason,
            tokens_per_s=len(self.ids) / elapsed if elapsed > 0 else 0.0,
            elapsed_s=elapsed,
            prompt_tps=self.prompt_tps,
            peak_memory_gb=self.peak_memory_gb() if finish_reason else None,
        )
        self.emitted, self.pending = text, []
        self.finished = finish_reason is not None
        return chunk


def _requests(prompt, messages) -> tuple[list, bool]:
    """The prompts or conversations to run, and whether a single one was given."""
    if prompt is not None and messages is not None:
        raise Olmo2KitError("give a prompt or messages, not both")
    if messages is None:
        if isinstance(prompt, str):
            return [prompt], True
        return list(prompt or ()), False
    if isinstance(messages, Sequence) and messages and all(isinstance(m, Mapping) for m in messages):
        return [check_messages(messages)], True
    if isinstance(messages, str | Mapping):
        raise Olmo2KitError('messages must be a list of {"role": ..., "content": ...} dicts')
    return [check_messages(conversation) for conversation in messages], False


# Bytes of a prompt or conversation read before its tokens are counted: a thousand times what OLMo 2's 4096-token
# context holds, so only a mistake (a whole file piped in, say) meets it, and it is refused before tokenizing.
MAX_PROMPT_BYTES = 1 << 22


def encode_requests(tokenizer, requests: list, context: int | None = None) -> list[list[int]]:
    """Token ids of each prompt (str) or conversation (a list of messages), unpadded.

    With the model's `context`, a prompt that cannot fit it is refused (`ContextExceeded`) before it is tokenized
    whole, where its length shows it (see `check_prompt_tokens`)."""
    if not requests:
        raise Olmo2KitError("no prompt given")
    encoded = []
    for request in requests:
        if isinstance(request, str):
            if not request.strip():
                raise Olmo2KitError("empty prompt: give some text to continue")
            check_text(request, "the prompt")
        check_prompt_size(request)
        if context is not None:
            check_prompt_tokens(tokenizer, request, context)
        if isinstance(request, str):
            encoded.append(tokenizer(request, return_token_type_ids=False)["input_ids"])
        else:
            encoded.append(encode_chat(tokenizer, request))
    return encoded


def check_prompt_size(request: str | list[dict]) -> None:
    """Olmo2KitError when a prompt, or a conversation's messages together, pass MAX_PROMPT_BYTES."""
    texts = [request] if isinstance(request, str) else [m["content"] for m in request]
    size = sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)  # a lone surrogate is checked apart
    if size > MAX_PROMPT_BYTES:
        what = "the prompt" if isinstance(request, str) else "the conversation"
        raise Olmo2KitError(f"{what} is {size:,} bytes, more than the {MAX_PROMPT_BYTES:,} olmo2kit reads before "
                            "counting tokens (the model's context holds far fewer): shorten it")


# Characters of a long prompt tokenized first to count its tokens, per token of context: English runs at about
# four characters a token, so this head of a text that cannot fit holds more tokens than the context.
HEAD_CHARS_PER_TOKEN = 8
# Tokens the head of a text may have beyond the whole text's (the cut can split a word the whole text keeps in
# fewer tokens); a head that passes the context by more than this proves the whole does.
HEAD_SLACK = 64
_longest: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_prompt_tokens(tokenizer, request: str | list[dict], context: int) -> None:
    """ContextExceeded when a prompt's or conversation's text shows it holds `context` tokens or more, without
    tokenizing it whole: no token covers more characters than the tokenizer's longest, so a text of more
    characters than `context` times that cannot fit; and a text longer than HEAD_CHARS_PER_TOKEN characters per
    token of context is refused when its head alone holds more tokens than the context."""
    texts = [request] if isinstance(request, str) else [m["content"] for m in request]
    chars = sum(len(text) for text in texts)
    what = "the prompt" if isinstance(request, str) else "the conversation"
    least = -(-chars // _longest_token(tokenizer))
    if least >= context:
        raise ContextExceeded(f"{what} is at least {least} tokens ({chars:,} characters), which fills the "
                              f"model's {context}-token context: shorten it")
    head = HEAD_CHARS_PER_TOKEN * context
    if chars > head:
        tokens = len(tokenizer("".join(texts)[:head], add_special_tokens=False)["input_ids"])
        if tokens > context + HEAD_SLACK:
            raise ContextExceeded(f"{what} is over {tokens - HEAD_SLACK} tokens in its first {head:,} characters "
                                  f"alone, which fills the model's {context}-token context: shorten it")


def _longest_token(tokenizer) -> int:
    """Characters in the tokenizer's longest token (a byte-level token's spelling has a character per byte, at
    least as many as its text), at least 1."""
    longest = _longest.get(tokenizer)
    if longest is None:
        longest = _longest[tokenizer] = max(map(len, tokenizer.get_vocab()), default=1) or 1
    return longest


def _ids_through_stop(tokenizer, ids: list[int], stop: Sequence[str]) -> list[int]:
    """The shortest prefix of `ids` whose text holds a stop string."""
    for n in range(1, len(ids) + 1):
        if _cut_at_stop(tokenizer.decode(ids[:n], skip_special_tokens=True), stop)[1]:
            return ids[:n]
    return ids


def _through_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    """`ids` up to and including the first end-of-text."""
    for i, token in enumerate(ids):
        if token in eos_ids:
            return ids[: i + 1]
    return ids


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
