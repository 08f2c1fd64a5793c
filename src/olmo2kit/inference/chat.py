"""Multi-turn chat sessions with the OLMo 2 instruct models, and their transcripts.

A session keeps the conversation whatever happens in one turn: a reply that fails (an Olmo2KitError)
leaves the history as it was, and when the conversation outgrows the model's context the oldest
turns are dropped (never the system message), with a warning on the "olmo2kit" logger. A failure of
the model itself, not of the turn (a model that cannot load, say), is a `ModelFailed`: no later turn
could run either, so a chat ends there.

    >>> session = ChatSession(model, tokenizer, system="Be brief.", do_sample=False)  # doctest: +SKIP
    >>> session.reply("What is the capital of France?").text  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from olmo2kit.errors import Olmo2KitError
from olmo2kit.files import write_atomic
from olmo2kit.inference.engines import keeps_caller_cache
from olmo2kit.inference.generation import Generation, check_prompt_size, join_chunks, stream_generate
from olmo2kit.inference.sampling import SamplingOptions, normalize_options
from olmo2kit.model.chat_template import check_messages, encode_chat
from olmo2kit.model.sizes import ContextExceeded, check_context, context_length

log = logging.getLogger("olmo2kit")

# Bytes a transcript may have: far past any real one (OLMo 2's 4,096-token context is some 20 kB of text),
# and a bound on what /load reads of a file that is no transcript.
TRANSCRIPT_LIMIT = 64 * 2**20


class ModelFailed(Olmo2KitError):
    """The model failed on a turn that passed the session's checks (it cannot load, say): every turn would."""


def save_transcript(path: str | os.PathLike, model: str, messages: Sequence[Mapping]) -> Path:
    """Write `{"model": ..., "messages": [...]}` to `path` as JSON, whole or not at all."""
    path = Path(path).expanduser()
    if not path.parent.is_dir():
        raise Olmo2KitError(f"cannot save to {path}: there is no directory {path.parent}")
    if path.is_dir():
        raise Olmo2KitError(f"cannot save to {path}: it is a directory; give a file name")
    text = json.dumps({"model": model, "messages": list(messages)}, indent=2, ensure_ascii=False) + "\n"
    return write_atomic(path, text.encode("utf-8"))  # an Olmo2KitError naming the path if it fails


def load_transcript(path: str | os.PathLike) -> tuple[str | None, list[dict]]:
    """The model and the checked messages of a transcript as `save_transcript` writes it; Olmo2KitError
    for a file that is not one."""
    path = Path(path).expanduser()
    if not path.is_file():
        problem = "it is not a file" if path.exists() else "there is no such file"
        raise Olmo2KitError(f"cannot load {path}: {problem}")
    try:
        with path.open("rb") as f:
            data = f.read(TRANSCRIPT_LIMIT + 1)  # bounded: a huge file is refused, not read whole
    except OSError as e:
        raise Olmo2KitError(f"cannot load {path} ({e.strerror}): give a transcript you can read") from None
    if len(data) > TRANSCRIPT_LIMIT:
        raise Olmo2KitError(f"cannot load {path}: it is over {TRANSCRIPT_LIMIT >> 20} MiB, too large for a transcript")
    try:
        transcript = json.loads(data)
    except (ValueError, RecursionError):  # bytes that are not UTF-8 are a ValueError too
        raise Olmo2KitError(f"cannot load {path}: not JSON; give a transcript written by /save") from None
    if not isinstance(transcript, dict) or not isinstance(transcript.get("messages"), list):
        raise Olmo2KitError(f'cannot load {path}: a transcript is {{"model": ..., "messages": [...]}}')
    model = transcript.get("model")
    if model is not None and not isinstance(model, str):
        raise Olmo2KitError(f'cannot load {path}: "model" must be a string, got {model!r}')
    try:
        messages = check_messages(transcript["messages"], need_user=False) if transcript["messages"] else []
    except Olmo2KitError as e:
        raise Olmo2KitError(f"cannot load {path}: {e}") from None
    return model, messages


class ChatSession:
    """A conversation with one model: the system message, the turns so far, sampling options, a KV cache.

    `send(text)` streams the reply and adds both messages to the history; `retry()` replaces the last
    reply, `undo()` drops the last exchange, `save` and `load` keep it in a file. The keys and values
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
        self.reuse_cache = reuse_cache and not compile and keeps_caller_cache(model)
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

    def undo(self) -> list[dict]:
        """Drop the last user message and what follows it (its reply); return the messages dropped."""
        users = [i for i, message in enumerate(self.turns) if message["role"] == "user"]
        if not users:
            raise Olmo2KitError("nothing to undo: there is no user message")
        dropped, self.turns = self.turns[users[-1]:], self.turns[:users[-1]]
        return dropped

    def load(self, path: str | os.PathLike) -> str | None:
        """Replace the conversation, system message included, with a transcript's (see `save`); return the
        model it names. A file that is not a transcript changes nothing."""
        model, messages = load_transcript(path)
        if messages and messages[0]["role"] == "system":
            self.system, self.turns = messages[0]["content"] or None, messages[1:]
        else:
            self.system, self.turns = None, messages
        self._drop_cache()
        return model

    def reply(self, text: str) -> Generation:
        """Send `text` and return the whole reply as one Generation."""
        return join_chunks(list(self.send(text)))

    def send(self, text: str) -> Iterator[Generation]:
        """Stream the reply to the user message `text`; the history keeps both messages.

        If generating fails, the history is as it was. If the caller stops early (closes the iterator,
        or Ctrl-C), the history keeps the reply as far as it was yielded; if nothing was yielded yet,
        the user message is dropped as well.
        """
        if not text.strip():
            raise Olmo2KitError("empty message: type some text")
        yield from self._stream([*self.turns, {"role": "user", "content": text}])

    def retry(self) -> Iterator[Generation]:
        """Stream a new reply to the last user message, in place of the last reply (the same one again
        when decoding is greedy or seeded). If it fails or stops before any text, the old reply stays."""
        if len(self.turns) < 2 or [m["role"] for m in self.turns[-2:]] != ["user", "assistant"]:
            raise Olmo2KitError("nothing to retry: the conversation does not end with a reply to a user message")
        return self._stream(self.turns[:-1])

    def _stream(self, turns: list[dict]) -> Iterator[Generation]:
        """Make `turns` the conversation, stream the reply to its last message (a user message) and add
        it; the conversation goes back to what it was if that fails or is stopped before any text."""
        before, self.turns = self.turns, list(turns)
        try:
            prompt_ids, dropped = self._fit_context()
            cache = self._cache_for(prompt_ids) if self.reuse_cache else None
            stream = self._model_run(stream_generate(self.model, self.tokenizer, messages=self.messages,
                                                     cache=cache, compile=self.compile, **self.options))
            first = next(stream)
        except BaseException:
            self.turns = before
            self._drop_cache()
            raise
        if dropped:
            log.warning(f"the conversation outgrew the model's {context_length(self.model.config)}-token context: "
                        f"dropped its oldest {dropped} message(s)")
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
                self.turns = before
            if finished and cache is not None:
                self._keep_cache(cache, prompt_ids + ids)
            else:  # after an interruption the generation thread may still be finishing a step
                self._drop_cache()

    def _model_run(self, stream: Iterator[Generation]) -> Iterator[Generation]:
        """`stream`, its Olmo2KitErrors raised as ModelFailed, but for the context's: the turn passed
        `_fit_context`, and what else fails now is the model, not the turn."""
        try:
            yield from stream
        except ContextExceeded:  # an engine's context may be shorter than the config's (vLLM's max_model_len)
            raise
        except Olmo2KitError as error:
            raise ModelFailed(f"{self.model.name_or_path} cannot run: {error}") from None

    def save(self, path: str | os.PathLike, model: str) -> Path:
        """Write the transcript, `{"model": model, "messages": [...]}`, to `path`."""
        return save_transcript(path, model, self.messages)

    def _fit_context(self) -> tuple[list[int], int]:
        """The conversation's token ids, after dropping its oldest turns (never the system message) until it
        fits the model's context with max_new_tokens; how many messages were dropped. Olmo2KitError if
        the last user message does not fit even alone."""
        context, new = context_length(self.model.config), self.sampling.max_new_tokens
        head = [{"role": "system", "content": self.system}] if self.system else []
        check_prompt_size(head + self.turns[-1:])  # before tokenizing: what cannot fit is not worth the time
        alone = encode_chat(self.tokenizer, head + self.turns[-1:])
        check_context(len(alone), new, context, prompt="the message" + (" with the system message" if head else ""))
        dropped = 0
        while True:
            ids = encode_chat(self.tokenizer, self.messages)
            try:
                check_context(len(ids), new, context)
                return ids, dropped
            except Olmo2KitError:  # the oldest turn goes: up to the next user message
                cut = next(i for i, m in enumerate(self.turns) if i > 0 and m["role"] == "user")
                del self.turns[:cut]
                dropped += cut

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
