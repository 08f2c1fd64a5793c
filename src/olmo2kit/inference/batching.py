"""Continuous batching: concurrent requests share every forward pass of one model.

A request joins the running batch at the next step (the prompts that arrived since the last step are
prefilled together, then their keys and values are added to the batch's cache as new rows) and leaves it
as soon as it is done, so nobody waits for the longest request of a batch. Rows are left-padded in one
transformers `DynamicCache`; each row keeps its own positions, sampling options and random generator, so a
request's tokens do not depend on what runs beside it (greedy output is the same alone or batched, exactly
in fp32).

    >>> scheduler = BatchScheduler(model, tokenizer, max_batch_size=16)  # doctest: +SKIP
    >>> handle = scheduler.submit(BatchRequest(prompt=[1, 2, 3], max_new_tokens=8), print)  # doctest: +SKIP

Everything runs on one worker thread; a request's events (`Token`, `PromptLogprobs`, `Finished`,
`Failed`) go to the callback given with it, on that thread, and it gets one last event (`Finished` or
`Failed`), nothing after it, unless cancelled. What fails in one request's own work (its constraint, its
sampling or logprobs, its callback raising) fails that request alone; the rows beside it go on untouched.
Stop strings, text and the OpenAI shapes are the caller's: the scheduler ends a row at an end-of-text
token, at `max_new_tokens`, or when cancelled.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from olmo2kit.compat import cache_keyword
from olmo2kit.errors import Olmo2KitError
from olmo2kit.inference.engines import end_of_text_ids

log = logging.getLogger("olmo2kit")

MAX_LOGPROBS = 20  # alternatives per token, as OpenAI allows


class Constraint(Protocol):
    """Constrained decoding for one row (a JSON grammar, say): which tokens may come next."""

    def mask(self, logits) -> None:
        """Set the logits (one row, float32) of the tokens that may not come next to -inf, in place."""

    def accept(self, token: int) -> None:
        """Advance past the chosen token."""


@dataclass
class BatchRequest:
    """One sequence to continue. `temperature` 0 is greedy; `logprobs` asks for the chosen token's log
    probability with that many alternatives (0 to MAX_LOGPROBS); `prompt_logprobs` for those of the
    prompt's tokens too. `max_new_tokens` 0 scores the prompt without generating."""

    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: bool = False
    constraint: Constraint | None = None


@dataclass
class Token:
    """A generated token, with its log probability (under the model, before temperature, top_p or a
    constraint) and the likeliest alternatives as (token, logprob), when asked for."""

    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class PromptLogprobs:
    """The prompt's tokens, each with its log probability given the tokens before it (None for the first)."""

    tokens: list[Token]


@dataclass
class Finished:
    reason: str  # "stop": an end-of-text token; "length": max_new_tokens reached


@dataclass
class Failed:
    message: str
    closed: bool = False  # the scheduler was closed (shutdown, or its model unloaded): the request may be retried
    by_request: bool = False  # the request asked for what cannot be done (a schema that dead-ends): not a fault


class QueueFull(Olmo2KitError):
    """The scheduler holds `max_queue` requests waiting for a row already, or it is closed: retry later."""


@dataclass(eq=False)
class Handle:
    """A submitted request: `cancel()` drops it at the scheduler's next step."""

    request: BatchRequest
    emit: Callable
    id: int
    cancelled: bool = False
    # the scheduler's own state for the row
    generated: int = 0
    ended: bool = False  # its last event (Finished or Failed) has been emitted
    length: int = 0  # tokens in the cache
    last: int = 0  # the token to feed next
    generator: object = None
    resumed: list[int] | None = None  # what it generated before llama.cpp's scheduler took it out of the cache

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Batch:
    """The running rows and their cache: row i's keys and values are the last rows[i].length positions."""

    rows: list[Handle] = field(default_factory=list)
    cache: object = None  # a DynamicCache, batch dimension = rows
    mask: object = None  # [rows, positions] attention mask, 0 on the left padding


class _Scheduler:
    """What the schedulers share: the queue of waiting requests (`submit`, bounded by `max_queue`), `close`, and
    the worker thread that runs `_run`. A subclass checks a request in `_check` and starts the thread."""

    thread_name = "olmo2kit-scheduler"

    def __init__(self, model, tokenizer, *, max_queue: int, eos_ids: set[int] | None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.eos_ids = eos_ids if eos_ids is not None else end_of_text_ids(model, tokenizer)
        self._waiting: deque[Handle] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, request: BatchRequest, emit: Callable) -> Handle:
        """Queue `request`; `emit` is called with each of its events, from the scheduler's thread."""
        self._check(request)
        handle = Handle(request, emit, next(self._ids))
        with self._wake:
            if self._closed:
                raise QueueFull("the model is being unloaded")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting already (the queue holds {self.max_queue})")
            self._waiting.append(handle)
            self._wake.notify()
        return handle

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop at the next step; requests still waiting or running get a Failed event."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout)

    def _check(self, request: BatchRequest) -> None:
        """Olmo2KitError for a request this scheduler cannot run."""

    def _run(self) -> None:
        raise NotImplementedError

    @staticmethod
    def _end(handle: Handle, event: Finished | Failed) -> None:
        """Emit a request's last event, once. A callback that raises on it is logged and the scheduler goes on:
        the request is over either way, and the other requests must still get their events."""
        if handle.ended:
            return
        handle.ended = True
        try:
            handle.emit(event)
        except Exception:
            log.exception("request %d: its callback failed on its last event", handle.id)

    @staticmethod
    def _failed(error: Exception, what: str) -> Failed:
        """The Failed event for `error`: its own message for an Olmo2KitError (the request asked what cannot be
        done), else its type and message, logged with the traceback (a bug, or out of memory)."""
        if isinstance(error, Olmo2KitError):
            log.info("%s failed: %s", what, error)
            return Failed(str(error), by_request=True)
        log.error("%s failed", what, exc_info=error)
        return Failed(f"generation failed: {type(error).__name__}: {error}")


class BatchScheduler(_Scheduler):
    """Continuous batching over one model (see the module docstring). `max_batch_size` rows decode
    together; up to `max_queue` more wait, and `submit` past that raises QueueFull at once."""

    thread_name = "olmo2kit-batching"

    def __init__(self, model, tokenizer, *, max_batch_size: int = 8, max_queue: int = 64,
                 eos_ids: set[int] | None = None) -> None:
        if max_batch_size < 1 or max_queue < 0:
            raise Olmo2KitError("max_batch_size must be at least 1 and max_queue at least 0")
        super().__init__(model, tokenizer, max_queue=max_queue, eos_ids=eos_ids)
        self.max_batch_size = max_batch_size
        self._joining: list[Handle] = []  # taken from the queue, prefilled before they join the batch
        self._batch = _Batch()
        self._thread.start()

    @property
    def running(self) -> int:
        return len(self._batch.rows)

    @property
    def busy(self) -> bool:
        """Whether any request is waiting, being prefilled or running."""
        with self._wake:  # a request moves from the queue to the prefill under this lock
            return bool(self._batch.rows or self._waiting or self._joining)

    def _check(self, request: BatchRequest) -> None:
        if request.logprobs is not None and not 0 <= request.logprobs <= MAX_LOGPROBS:
            raise Olmo2KitError(f"logprobs must be from 0 to {MAX_LOGPROBS}, got {request.logprobs}")

    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._closed and not self._waiting and not self._batch.rows:
                        self._wake.wait()
                    if self._closed:
                        break
                    while self._waiting and len(self._batch.rows) + len(self._joining) < self.max_batch_size:
                        self._joining.append(self._waiting.popleft())
                self._step()
        for handle in list(self._waiting) + self._batch.rows:
            self._end(handle, Failed("the model was unloaded or the server is shutting down", closed=True))
        self._waiting.clear()
        self._batch = _Batch()

    def _step(self) -> None:
        """Prefill the rows that join, then decode one token of every running row. What fails in one row's own
        work (its constraint, sampling, logprobs, or its callback raising) ends that row alone, in
        `_advance_rows`; here is what fails a whole pass (out of memory, a bug), and which rows it takes."""
        joining = [h for h in self._joining if not h.cancelled]
        try:
            if joining:
                self._prefill(joining)
        except Exception as e:  # the joining rows' own pass; `_join` leaves the batch as it was when it fails
            failed = self._failed(e, "a prefill")
            for handle in joining:
                self._end(handle, failed)
        finally:
            with self._wake:
                self._joining = []
        try:
            self._drop([h for h in self._batch.rows if h.cancelled])
            if self._batch.rows:
                self._decode()
        except Exception as e:
            # The decode pass writes every row's keys and values into the shared cache, layer by layer: after a
            # failure part way no row's cache can be trusted, so every running row fails.
            failed = self._failed(e, "a decode step")
            for handle in self._batch.rows:
                self._end(handle, failed)
            self._batch = _Batch()

    def _prefill(self, handles: list[Handle]) -> None:
        """Run the new prompts together (left-padded), report prompt logprobs where asked, choose each row's
        first token, and add the rows that go on to the batch."""
        import torch
        from transformers import DynamicCache

        lengths = [len(h.request.prompt) for h in handles]
        width = max(lengths)
        ids = torch.full((len(handles), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(handles), width), dtype=torch.long)
        for j, handle in enumerate(handles):
            ids[j, width - lengths[j]:] = torch.tensor(handle.request.prompt)
            mask[j, width - lengths[j]:] = 1
            handle.length = lengths[j]
            handle.generator = request_generator(handle.request.seed)
        device = self.model.device
        ids, mask = ids.to(device), mask.to(device)
        cache = DynamicCache(config=self.model.config)
        keep = 0 if any(h.request.prompt_logprobs for h in handles) else 1  # every position's logits, or the last
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                         use_cache=True, logits_to_keep=keep, **{cache_keyword(): cache})
        logits = out.logits.float()
        generating = []
        for j, handle in enumerate(handles):
            try:
                if handle.request.prompt_logprobs:
                    handle.emit(PromptLogprobs(self._prompt_tokens(handle.request, logits[j, width - lengths[j]:])))
                if handle.request.max_new_tokens == 0:
                    self._end(handle, Finished("length"))
                else:
                    generating.append(j)
            except Exception as e:  # this row's own work: it fails alone
                self._end(handle, self._failed(e, f"request {handle.id}"))
        going = self._advance_rows([handles[j] for j in generating], logits[generating, -1]) if generating else []
        rows = [j for j, go in zip(generating, going, strict=True) if go]
        if rows:
            self._join([handles[j] for j in rows], cache, mask, rows)

    def _prompt_tokens(self, request: BatchRequest, logits) -> list[Token]:
        import torch

        logprobs = torch.log_softmax(logits[:-1], dim=-1)
        prompt = torch.tensor(request.prompt[1:], device=logits.device)
        chosen = logprobs.gather(1, prompt[:, None])[:, 0].tolist()
        top = _top(logprobs, request.logprobs or 0)
        pairs = enumerate(zip(request.prompt[1:], chosen, strict=True))
        return [Token(request.prompt[0])] + [Token(token, lp, top[i] if top else None) for i, (token, lp) in pairs]

    def _decode(self) -> None:
        """One forward pass over every running row, then one token for each."""
        import torch

        batch = self._batch
        rows = batch.rows
        device = self.model.device
        input_ids = torch.tensor([[h.last] for h in rows], device=device)
        positions = torch.tensor([[h.length] for h in rows], device=device)
        mask = torch.cat([batch.mask, torch.ones(len(rows), 1, dtype=batch.mask.dtype, device=device)], dim=1)
        past = batch.mask.shape[1]
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                         cache_position=torch.tensor([past], device=device), use_cache=True,
                         **{cache_keyword(): batch.cache})
        batch.mask = mask
        for h in rows:
            h.length += 1
        going = self._advance_rows(rows, out.logits[:, -1].float())
        self._drop([h for h, go in zip(rows, going, strict=True) if not go])

    def _advance_rows(self, rows: list[Handle], logits) -> list[bool]:
        """Choose each row's next token from its logits ([rows, vocab], float32) and emit it; whether each goes on.
        A row whose own work fails (its constraint, sampling or logprobs, its callback) ends alone with Failed."""
        import torch

        logprobs = torch.log_softmax(logits, dim=-1) if any(h.request.logprobs is not None for h in rows) else None
        greedy = logits.argmax(dim=-1).tolist()
        going = []
        for i, handle in enumerate(rows):
            try:
                going.append(self._advance(handle, logits[i], greedy[i], None if logprobs is None else logprobs[i]))
            except Exception as e:
                self._end(handle, self._failed(e, f"request {handle.id}"))
                going.append(False)
        return going

    def _advance(self, handle: Handle, logits, greedy: int, logprobs) -> bool:
        """One row's next token from its logits ([vocab]), emitted; whether the row goes on."""
        request = handle.request
        if request.constraint is not None or request.temperature > 0:
            token = self._choose(request, logits.clone(), handle.generator)
        else:
            token = greedy
        if request.constraint is not None:
            request.constraint.accept(token)
        if logprobs is not None and request.logprobs is not None:
            top = _top(logprobs[None], request.logprobs)
            handle.emit(Token(token, logprobs[token].item(), top[0] if top else None))
        else:
            handle.emit(Token(token))
        handle.generated += 1
        handle.last = token
        if token in self.eos_ids:
            self._end(handle, Finished("stop"))
        elif handle.generated >= request.max_new_tokens:
            self._end(handle, Finished("length"))
        else:
            return True
        return False

    @staticmethod
    def _choose(request: BatchRequest, logits, generator) -> int:
        """One row's token: masked by its constraint, then greedy or sampled with temperature and top_p."""
        import torch

        if request.constraint is not None:
            request.constraint.mask(logits)
            if bool((logits == float("-inf")).all()):  # argmax would pick token 0, and multinomial raise
                raise Olmo2KitError("the response_format schema allows no next token: check that some JSON fits it")
        if request.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / request.temperature, dim=-1)
        if request.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(0) - sorted_probs > request.top_p  # keeps at least the likeliest
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs.cpu(), 1, generator=generator))

    def _join(self, handles: list[Handle], cache, mask, rows: list[int]) -> None:
        """Add prefilled rows (`rows` of a prefill's cache and mask) to the batch, left-padding the narrower side."""
        import torch

        batch = self._batch
        index = torch.tensor(rows, device=mask.device)
        start = mask.shape[1] - max(h.length for h in handles)  # padding none of these rows needs
        mask = mask[index, start:]
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]
        if not batch.rows:
            batch.rows, batch.cache, batch.mask = list(handles), cache, mask
            return
        width, length = batch.mask.shape[1], mask.shape[1]
        merged = []  # (layer, name) already replaced by the batch's rows and the new ones
        try:
            joined_mask = torch.cat([_pad_left(batch.mask, length - width, dim=1),
                                     _pad_left(mask, width - length, dim=1)])
            for mine, theirs in zip(batch.cache.layers, cache.layers, strict=True):
                for name in ("keys", "values"):
                    old, new = getattr(mine, name), getattr(theirs, name)
                    setattr(mine, name, torch.cat([_pad_left(old, length - width), _pad_left(new, width - length)]))
                    merged.append((mine, name))
        except BaseException:
            # Out of memory part way: the running rows get back their own keys and values (views of what was
            # merged, no new memory), so that only the joining rows fail.
            for layer, name in merged:
                setattr(layer, name, getattr(layer, name)[: len(batch.rows), :, max(length - width, 0):])
            raise
        batch.mask = joined_mask
        batch.rows += handles

    def _drop(self, leaving: list[Handle]) -> None:
        """Take rows out of the batch and the padding no remaining row needs off the left."""
        if not leaving:
            return
        import torch

        batch = self._batch
        keep = [i for i, h in enumerate(batch.rows) if h not in leaving]
        if not keep:
            self._batch = _Batch()
            return
        index = torch.tensor(keep, device=batch.mask.device)
        rows = [batch.rows[i] for i in keep]
        start = batch.mask.shape[1] - max(h.length for h in rows)
        for layer in batch.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
        batch.mask = batch.mask[index, start:]
        batch.rows = rows


def request_generator(seed: int | None):
    """A request's own random generator: seeded by it, else at random."""
    import torch

    return torch.Generator().manual_seed(seed if seed is not None else random.randrange(2**63))


def _pad_left(tensor, n: int, dim: int = 2):
    """`tensor` with n zeros before it along `dim` (itself when n <= 0)."""
    if n <= 0:
        return tensor
    import torch

    shape = list(tensor.shape)
    shape[dim] = n
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _top(logprobs, k: int) -> list[list[tuple[int, float]]] | None:
    """The k likeliest tokens of each row with their logprobs; None for k 0."""
    if not k:
        return None
    values, indices = logprobs.topk(k, dim=-1)
    return [list(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
