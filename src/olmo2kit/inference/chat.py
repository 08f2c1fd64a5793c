"""Multi-turn chat sessions with the OLMo 2 instruct models, and their transcripts.

    >>> session = ChatSession(model, tokenizer, system="Be brief.", do_sample=False)  # doctest: +SKIP
    >>> session.reply("What is the capital of France?").text  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from olmo2kit.errors import Olmo2KitError
from olmo2kit.files import write_atomic
from olmo2kit.inference.generation import Generation, join_chunks, stream_generate
from olmo2kit.inference.sampling import SamplingOptions, normalize_options
from olmo2kit.model.chat_template import encode_chat


def save_transcript(path: str | os.PathLike, model: str, messages: Sequence[Mapping]) -> Path:
    """Write `{"model": ..., "messages": [...]}` to `path` as JSON, whole or not at all."""
    path = Path(path).expanduser()
    if not path.parent.is_dir():
        raise Olmo2KitError(f"cannot save to {path}: there is no directory {path.parent}")
    if path.is_dir():
        raise Olmo2KitError(f"cannot save to {path}: it is a directory; give a file name")
    text = json.dumps({"model": model, "messages": list(messages)}, indent=2, ensure_ascii=False) + "\n"
    try:
        return write_atomic(path, text.encode("utf-8"))
    except OSError as e:
        raise Olmo2KitError(f"cannot save to {path} ({e.strerror}): give a file you can write to") from None


class ChatSession:
    """A conversation with one model: the system message, the turns so far, sampling options, a KV cache.

    `send(text)` streams the reply and adds both messages to the history. The keys and values
    computed for one turn are kept, and the next turn computes only the tokens after the
    longest prefix it shares with them (`reused_tokens` says how many were reused), so the
    history is not read again on every turn. Greedy replies are the same with or without it.
    """

    def __init__(self, model, tokenizer, *, system: str | None = None, reuse_cache: bool = True,
                 compile: bool = False, **options) -> None:
        self.model = model
        self.compile = compile  # the compiled path keeps its own static cache: no reuse across turns
        self.tokenizer = tokenizer
        self.system = system or None
        self.turns: list[dict] = []
        self.options: dict = {}
        self.set_options(**options)
        self.reuse_cache = reuse_cache and not compile
        self.reused_tokens = 0
        self._cache = None
        self._cache_ids: list[int] = []  # the tokens whose keys and values self._cache holds

    @property
    def messages(self) -> list[dict]:
        """The conversation so far, system message first."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [dict(m) for m in self.turns]

    @property
    def sampling(self) -> SamplingOptions:
        return SamplingOptions(**self.options)

    def set_options(self, **changes) -> None:
        """Change sampling options (checked first: a bad value changes nothing); None restores a default."""
        merged = {**self.options, **changes}
        options = normalize_options(merged)
        SamplingOptions(**options)
        self.options = options

    def reset(self) -> None:
        """Forget the turns (the system message stays)."""
        self.turns = []
        self._drop_cache()

    def set_system(self, text: str | None) -> None:
        """Set the system message, or remove it with None or ""; the turns stay."""
        self.system = text or None

    def reply(self, text: str) -> Generation:
        """Send `text` and return the whole reply as one Generation."""
        return join_chunks(list(self.send(text)))

    def send(self, text: str) -> Iterator[Generation]:
        """Stream the reply to the user message `text`; the history keeps both messages.

        If the caller stops early (closes the iterator, or Ctrl-C), the history keeps the reply
        as far as it was yielded; if nothing was yielded yet, the user message is dropped as well.
        """
        if not text.strip():
            raise Olmo2KitError("empty message: type some text")
        self.turns.append({"role": "user", "content": text})
        try:
            prompt_ids = encode_chat(self.tokenizer, self.messages)
            cache = self._cache_for(prompt_ids) if self.reuse_cache else None
            stream = stream_generate(self.model, self.tokenizer, messages=self.messages, cache=cache,
                                     compile=self.compile, **self.options)
            first = next(stream)  # the context check happens here, before any text
        except BaseException:
            self.turns.pop()
            self._drop_cache()
            raise
        pieces = [first.text]
        ids = list(first.token_ids)
        finished = first.finish_reason is not None
        try:
            yield first
            for chunk in stream:
                pieces.append(chunk.text)
                ids += chunk.token_ids
                yield chunk
            finished = True
        finally:
            stream.close()
            reply = "".join(pieces)
            if reply or finished:
                self.turns.append({"role": "assistant", "content": reply})
            else:
                self.turns.pop()
            if finished and cache is not None:
                self._keep_cache(cache, prompt_ids + ids)
            else:  # after an interruption the generation thread may still be finishing a step
                self._drop_cache()

    def save(self, path: str | os.PathLike, model: str) -> Path:
        """Write the transcript, `{"model": model, "messages": [...]}`, to `path`."""
        return save_transcript(path, model, self.messages)

    def _cache_for(self, prompt_ids: list[int]):
        """The kept cache cut to the longest prefix shared with `prompt_ids`, or a new one."""
        from transformers import DynamicCache

        shared = 0
        for old, new in zip(self._cache_ids, prompt_ids[:-1], strict=False):  # the last token is always computed
            if old != new:
                break
            shared += 1
        if shared == 0:
            self._drop_cache()
            self._cache = DynamicCache(config=self.model.config)
        elif shared < self._cache.get_seq_length():
            self._cache.crop(shared - self._cache.get_seq_length())  # a negative count removes that many
        self._cache_ids = self._cache_ids[:shared]
        self.reused_tokens = shared
        return self._cache

    def _keep_cache(self, cache, known_ids: list[int]) -> None:
        """Keep the cache for the next turn, cut to the tokens known to have produced it."""
        length = cache.get_seq_length()
        if length > len(known_ids):  # generation ran past what was read (a stop string)
            cache.crop(len(known_ids) - length)
            length = len(known_ids)
        self._cache = cache
        self._cache_ids = known_ids[:length]

    def _drop_cache(self) -> None:
        self._cache = None
        self._cache_ids = []
