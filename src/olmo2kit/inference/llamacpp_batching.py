"""Continuous batching on llama.cpp: concurrent requests decode together in one llama.cpp context.

llama.cpp's batched decoding, as its own server runs it (tools/server/server-context.cpp of the vendored
llama.cpp): every running request is a sequence of one context whose key/value cache is one shared pool
(`model.llamacpp.Decoder`), and each step is one `llama_decode` over a batch holding the next token of every
running request and the next part of the prompts still being read (at most `batch` tokens a step, so a long
prompt never stalls the requests decoding beside it).

Each of the `max_batch_size` sequences of the context is a slot that keeps its tokens' keys and values when its
request ends; a new request takes the idle slot that shares the longest start with its prompt and computes only
the rest, so a chat's next turn reads only the new messages (llama.cpp's `cache_prompt`). When the cache has no
room for a step, the idle slots' tokens go first, then the request that joined last is taken out and waits at the
head of the queue with what it generated so far, to be read again when there is room (vLLM's recompute
preemption): no request fails because of the others.

Sampling, constraints (a JSON grammar's mask), log probabilities and the per-row failure rule are
`BatchScheduler`'s, on llama.cpp's float32 logits, so a request gets the same guarantees on both engines.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from olmo2kit.errors import Olmo2KitError
from olmo2kit.inference.batching import (
    BatchScheduler,
    Failed,
    Finished,
    Handle,
    PromptLogprobs,
    Token,
    _top,
    request_generator,
)
from olmo2kit.model.llamacpp import Decoder, LlamaCppModel

log = logging.getLogger("olmo2kit")

STEP_TOKENS = 512  # tokens of one llama_decode: llama.cpp's own default n_batch and n_ubatch


@dataclass(eq=False)
class _Slot:
    """One sequence of the context: the tokens whose keys and values it holds, and the request using it."""

    id: int
    tokens: list[int] = field(default_factory=list)
    handle: Handle | None = None
    feed: list[int] = field(default_factory=list)  # tokens to add before the request decodes (its prompt's rest)
    scored: list[Token] | None = None  # the prompt's log probabilities so far, when asked for
    used: int = 0  # when it last ran a request (for eviction, oldest first)


class LlamaCppScheduler(BatchScheduler):
    """`BatchScheduler`'s interface over llama.cpp (see the module docstring): `max_batch_size` requests decode
    together, in a key/value cache of `cells` positions (by default the model's context: as many as one request may
    need, and as llama.cpp's server gives its slots together)."""

    thread_name = "olmo2kit-llamacpp"

    def __init__(self, model: LlamaCppModel, tokenizer, *, max_batch_size: int = 16, max_queue: int = 64,
                 eos_ids: set[int] | None = None, cells: int | None = None) -> None:
        context = model.context_length or 4096
        cells = cells or context
        if cells < context:
            raise Olmo2KitError(f"the key/value cache must hold the model's context ({context} tokens), not {cells}")
        # The context is made here, before the scheduler starts, so that a model llama.cpp cannot load fails the
        # load (the server's --preload) rather than its first request.
        self.decoder = Decoder(model, cells=cells, sequences=max_batch_size, batch=STEP_TOKENS)
        self._slots = [_Slot(i) for i in range(max_batch_size)]
        self._clock = 0
        super().__init__(model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue, eos_ids=eos_ids)

    def _check(self, request) -> None:
        super()._check(request)
        if len(request.prompt) + request.max_new_tokens > self.decoder.cells:
            raise Olmo2KitError(f"the prompt and max_new_tokens ({len(request.prompt)} + {request.max_new_tokens} "
                                f"tokens) do not fit the key/value cache of {self.decoder.cells} positions")
        if not request.prompt:
            raise Olmo2KitError("the prompt has no tokens")
        vocab = self.decoder.vocab
        if not all(0 <= token < vocab for token in request.prompt):  # llama.cpp would fail the whole step's batch
            raise Olmo2KitError(f"a prompt token id is outside the vocabulary (0 to {vocab - 1})")

    @property
    def running(self) -> int:
        return sum(slot.handle is not None for slot in self._slots)

    @property
    def busy(self) -> bool:
        with self._wake:
            return bool(self._waiting or self._joining or self.running)

    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._closed and not self._waiting and not self.running:
                        self._wake.wait()
                    if self._closed:
                        break
                try:
                    self._step()
                except Exception as e:  # a fault outside any one request's work: no slot can be trusted
                    failed = self._failed(e, "a llama.cpp step")
                    for slot in self._slots:
                        if slot.handle is not None:
                            self._end(slot.handle, failed)
                        self._release(slot, keep=False)
        closed = Failed("the model was unloaded or the server is shutting down", closed=True)
        with self._wake:
            waiting, self._waiting = list(self._waiting), type(self._waiting)()
        for handle in [*waiting, *(s.handle for s in self._slots if s.handle is not None)]:
            self._end(handle, closed)
        self.decoder.close()

    def _step(self) -> None:
        for slot in self._slots:
            if slot.handle is not None and slot.handle.cancelled:
                self._release(slot)
        self._admit()
        batch = self._plan()
        if not batch:
            return
        try:
            logits = self._decode_batch(batch)
        except Exception as e:
            # llama.cpp's cache can no longer be trusted for the rows of this step: they fail, their slots are emptied
            failed = self._failed(e, "a llama.cpp step")
            for slot, _ in batch:
                if slot.handle is not None:
                    self._end(slot.handle, failed)
                self._release(slot, keep=False)
            return
        self._take(batch, logits)

    def _admit(self) -> None:
        """Give waiting requests the idle slots (the one sharing the longest prefix with each prompt), in order, while
        the cache has room for the next one beside the running requests (alone, it always fits: `_check`)."""
        while True:
            with self._wake:  # from the queue to its slot under the lock: `busy` counts the request throughout
                idle = [s for s in self._slots if s.handle is None]
                if any(h.cancelled for h in self._waiting):  # gone clients hold no place in the queue
                    self._waiting = type(self._waiting)(h for h in self._waiting if not h.cancelled)
                if not idle or not self._waiting:
                    return
                handle = self._waiting[0]
                sequence = handle.request.prompt + (handle.resumed or [])
                reuse = 0 if handle.request.prompt_logprobs and handle.resumed is None else None
                # the longest shared start; among equals the slot used longest ago (its cached tokens matter least)
                slot, common = max(((s, _common(s.tokens, sequence, reuse)) for s in idle),
                                   key=lambda pair: (pair[1], -pair[0].used))
                held = sum(len(s.tokens) + len(s.feed) for s in self._slots if s.handle is not None)
                if held and held + len(sequence) > self.decoder.cells:  # its reused start stays in its slot
                    return  # it waits for running requests to end rather than push one out at once
                self._waiting.popleft()
                slot.handle = handle
            if handle.generator is None:
                try:
                    handle.generator = request_generator(handle.request.seed)
                except Exception as e:  # a seed torch refuses: this request's own fault, it fails alone
                    self._end(handle, self._failed(e, f"request {handle.id}"))
                    self._release(slot)
                    continue
            self.decoder.forget(slot.id, common)
            slot.tokens = slot.tokens[:common]
            slot.feed = sequence[common:]
            slot.scored = [Token(sequence[0])] if reuse == 0 else None
            self._clock += 1
            slot.used = self._clock
            if handle.request.max_new_tokens == 0 and not handle.request.prompt_logprobs:
                self._end(handle, Finished("length"))
                self._release(slot)

    def _plan(self) -> list[tuple[_Slot, int]]:
        """This step's batch: (slot, tokens it adds). Decoding rows first (one token each), then prompt parts."""
        running = [s for s in self._slots if s.handle is not None]
        decoding = [s for s in running if not s.feed]
        reading = sorted((s for s in running if s.feed), key=lambda s: s.used)
        budget = STEP_TOKENS - len(decoding)
        plan = [(s, 1) for s in decoding]
        for slot in reading:
            if budget <= 0:
                break
            take = min(len(slot.feed), budget)
            plan.append((slot, take))
            budget -= take
        while plan and not self._room(sum(n for _, n in plan)):
            if not self._evict_idle():
                victim = max((s for s, _ in plan), key=lambda s: s.used)
                self._preempt(victim)
                plan = [(s, n) for s, n in plan if s is not victim]
        return plan

    def _room(self, tokens: int) -> bool:
        return sum(len(s.tokens) for s in self._slots) + tokens <= self.decoder.cells

    def _evict_idle(self) -> bool:
        """Drop the cached tokens of the idle slot used longest ago; whether there was one."""
        idle = [s for s in self._slots if s.handle is None and s.tokens]
        if not idle:
            return False
        self._release(min(idle, key=lambda s: s.used), keep=False)
        return True

    def _preempt(self, slot: _Slot) -> None:
        """Take a running request out of the cache: it waits first in the queue, to read its prompt and what it
        generated so far again when there is room."""
        handle = slot.handle
        log.info("request %d: the key/value cache is full: it waits for room (%d tokens)", handle.id,
                 len(slot.tokens) + len(slot.feed))
        if slot.scored is None:  # what it generated, with the token it was about to read
            pending = [handle.last] if handle.generated and not slot.feed else []
            handle.resumed = (slot.tokens + slot.feed)[len(handle.request.prompt):] + pending
        # else its prompt's log probabilities were being read: it starts over
        self._release(slot, keep=False)
        with self._wake:
            self._waiting.appendleft(handle)

    def _release(self, slot: _Slot, *, keep: bool = True) -> None:
        slot.handle, slot.feed, slot.scored = None, [], None
        self._clock += 1
        slot.used = self._clock  # its tokens were last used now: idle caches are evicted oldest first
        if not keep:
            self.decoder.forget(slot.id)
            slot.tokens = []

    def _decode_batch(self, plan: list[tuple[_Slot, int]]):
        import torch

        for slot, count in plan:
            wants_all = slot.scored is not None
            if slot.feed:
                part, slot.feed = slot.feed[:count], slot.feed[count:]
                last = not slot.feed
            else:
                part, last = [slot.handle.last], True
            start = len(slot.tokens)
            for i, token in enumerate(part):
                self.decoder.add(token, start + i, slot.id, logits=wants_all or (last and i == len(part) - 1))
            slot.tokens += part
        return torch.from_numpy(self.decoder.decode())

    def _take(self, plan: list[tuple[_Slot, int]], logits) -> None:
        """Hand each row of the step its logits: prompt log probabilities, then the next token where it is due."""
        row = 0
        advancing: list[tuple[_Slot, int]] = []
        for slot, count in plan:
            handle = slot.handle
            if slot.scored is not None:
                rows = logits[row:row + count]
                row += count
                try:
                    self._score(slot, rows, count)
                except Exception as e:
                    self._end(handle, self._failed(e, f"request {handle.id}"))
                    self._release(slot)
                    continue
                if slot.feed:
                    continue
                last = row - 1
            elif slot.feed:
                continue
            else:
                last = row
                row += 1
            if handle.ended:
                self._release(slot)
            else:
                advancing.append((slot, last))
        if not advancing:
            return
        for slot, _ in advancing:
            slot.handle.length = len(slot.tokens)
        handles = [s.handle for s, _ in advancing]
        going = self._advance_rows(handles, logits[[i for _, i in advancing]])
        for (slot, _), go in zip(advancing, going, strict=True):
            if not go:
                self._release(slot)

    def _score(self, slot: _Slot, rows, count: int) -> None:
        """The log probabilities of the prompt tokens that `rows` (logits of the last `count` positions) predict;
        once the prompt is read whole, they are emitted, and a request for no new tokens ends."""
        import torch

        handle, request = slot.handle, slot.handle.request
        prompt = request.prompt
        start = len(slot.tokens) - count  # position of rows[0]
        targets = prompt[start + 1:start + count + 1]
        if targets:
            logprobs = torch.log_softmax(rows[:len(targets)].float(), dim=-1)
            chosen = logprobs.gather(1, torch.tensor(targets)[:, None])[:, 0].tolist()
            top = _top(logprobs, request.logprobs or 0)
            slot.scored += [Token(t, lp, top[i] if top else None) for i, (t, lp) in enumerate(zip(targets, chosen,
                                                                                                  strict=True))]
        if slot.feed:
            return
        handle.emit(PromptLogprobs(slot.scored))
        slot.scored = None
        if request.max_new_tokens == 0:
            self._end(handle, Finished("length"))


def _common(cached: list[int], prompt: list[int], cap: int | None) -> int:
    """How many leading tokens `prompt` shares with `cached`, keeping at least one to compute (its logits give the
    next token), and at most `cap`."""
    n = 0
    for a, b in zip(cached, prompt[:-1], strict=False):
        if a != b:
            break
        n += 1
    return n if cap is None else min(n, cap)


def scheduler_for(model, tokenizer, *, max_batch_size: int = 8, max_queue: int = 64) -> BatchScheduler:
    """The scheduler for a model's engine: llama.cpp's batched decoding for a model llama.cpp runs, else
    continuous batching on transformers."""
    if isinstance(model, LlamaCppModel):
        return LlamaCppScheduler(model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue)
    return BatchScheduler(model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue)
