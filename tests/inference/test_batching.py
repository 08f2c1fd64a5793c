"""The continuous-batching scheduler against transformers on the tiny checkpoint (fp32): rows that join
and leave a running batch get exactly the tokens and log probabilities they get alone."""

from __future__ import annotations

import threading

import pytest
import torch

import olmo2kit
from olmo2kit.errors import Olmo2KitError
from olmo2kit.inference.batching import (
    BatchRequest,
    BatchScheduler,
    Failed,
    Finished,
    PromptLogprobs,
    QueueFull,
    Token,
)

PROMPTS = ["Hello world", "The quick brown fox jumps over", "1 2 3 4", "Numbers, letters, and symbols: + - * / ="]


class Collected:
    """A request's events, with a flag set when it finishes."""

    def __init__(self, scheduler: BatchScheduler | None = None) -> None:
        self.events: list = []
        self.done = threading.Event()
        self.first = threading.Event()
        self.scheduler = scheduler
        self.most_running = 0  # rows decoding together when a token of this request came

    def __call__(self, event) -> None:
        self.events.append(event)
        if isinstance(event, Token):
            self.first.set()
            if self.scheduler is not None:
                self.most_running = max(self.most_running, self.scheduler.running)
        if isinstance(event, Finished | Failed):
            self.done.set()

    @property
    def tokens(self) -> list[Token]:
        return [e for e in self.events if isinstance(e, Token)]

    @property
    def ids(self) -> list[int]:
        return [t.id for t in self.tokens]

    @property
    def finish(self):
        assert self.done.wait(60), "the request never finished"
        return self.events[-1]


@pytest.fixture
def scheduler(tiny):
    model, tokenizer = tiny
    running = BatchScheduler(model, tokenizer, max_batch_size=8, max_queue=8)
    yield running
    running.close()


def encode(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt)["input_ids"]


def direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_rows_joining_and_leaving_a_running_batch_get_their_own_greedy_tokens(tiny, scheduler):
    model, tokenizer = tiny
    # A long row starts alone; the others join while it runs, and the short ones leave before it.
    lengths = [40, 6, 25, 12]
    first = Collected(scheduler)
    scheduler.submit(BatchRequest(encode(tokenizer, PROMPTS[0]), lengths[0]), first)
    assert first.first.wait(30)
    rest = []
    for prompt, n in zip(PROMPTS[1:], lengths[1:], strict=True):
        rest.append(Collected(scheduler))
        scheduler.submit(BatchRequest(encode(tokenizer, prompt), n), rest[-1])
    for prompt, n, got in zip(PROMPTS, lengths, [first, *rest], strict=True):
        assert got.finish == Finished("length")
        alone = olmo2kit.generate(model, tokenizer, prompt, do_sample=False, max_new_tokens=n)
        assert got.ids == alone.token_ids, prompt
    assert first.most_running >= 3, "the later requests never ran beside the first"


def test_logprobs_and_alternatives_equal_a_direct_forward(tiny, scheduler):
    model, tokenizer = tiny
    prompt = encode(tokenizer, PROMPTS[1])
    got = Collected()
    scheduler.submit(BatchRequest(prompt, 10, logprobs=3), got)
    assert got.finish == Finished("length")
    expected = direct_logprobs(model, prompt + got.ids)
    for k, token in enumerate(got.tokens):
        row = expected[len(prompt) - 1 + k]
        assert token.logprob == pytest.approx(row[token.id].item(), abs=1e-5)
        values, indices = row.topk(3)
        assert [t for t, _ in token.top] == indices.tolist()
        assert [lp for _, lp in token.top] == pytest.approx(values.tolist(), abs=1e-5)
        assert token.top[0][0] == token.id  # greedy picks the likeliest


def test_max_new_tokens_zero_scores_the_prompt_without_generating(tiny, scheduler):
    model, tokenizer = tiny
    prompt = encode(tokenizer, PROMPTS[3])
    got = Collected()
    scheduler.submit(BatchRequest(prompt, 0, logprobs=1, prompt_logprobs=True), got)
    assert got.finish == Finished("length")
    assert not got.tokens
    (scored,) = [e for e in got.events if isinstance(e, PromptLogprobs)]
    assert [t.id for t in scored.tokens] == prompt
    assert scored.tokens[0].logprob is None
    expected = direct_logprobs(model, prompt)
    for i, token in enumerate(scored.tokens[1:], 1):
        assert token.logprob == pytest.approx(expected[i - 1, prompt[i]].item(), abs=1e-5)


def test_a_seeded_sample_does_not_depend_on_what_runs_beside_it(tiny, scheduler):
    _, tokenizer = tiny
    request = dict(prompt=encode(tokenizer, PROMPTS[2]), max_new_tokens=20, temperature=0.9, top_p=0.9, seed=7)
    alone = Collected()
    scheduler.submit(BatchRequest(**request), alone)
    assert alone.finish == Finished("length")
    crowd = [Collected() for _ in PROMPTS]
    for prompt, got in zip(PROMPTS, crowd, strict=True):
        scheduler.submit(BatchRequest(encode(tokenizer, prompt), 30, temperature=1.0), got)
    beside = Collected()
    scheduler.submit(BatchRequest(**request), beside)
    assert beside.finish == alone.finish
    assert beside.ids == alone.ids
    other_seed = Collected()
    scheduler.submit(BatchRequest(**{**request, "seed": 8}), other_seed)
    assert other_seed.finish == Finished("length")
    assert other_seed.ids != alone.ids


def test_an_end_of_text_token_ends_the_row(tiny):
    model, tokenizer = tiny
    prompt = encode(tokenizer, PROMPTS[0])
    alone = olmo2kit.generate(model, tokenizer, PROMPTS[0], do_sample=False, max_new_tokens=12).token_ids
    end = alone[4]
    scheduler = BatchScheduler(model, tokenizer, eos_ids={end})
    try:
        got = Collected()
        scheduler.submit(BatchRequest(prompt, 12), got)
        assert got.finish == Finished("stop")
        assert got.ids == alone[: alone.index(end) + 1]
    finally:
        scheduler.close()


def test_a_cancelled_row_leaves_at_the_next_step_and_the_others_go_on(tiny, scheduler):
    model, tokenizer = tiny
    cancelled = Collected()
    handle = scheduler.submit(BatchRequest(encode(tokenizer, PROMPTS[0]), 500), cancelled)
    assert cancelled.first.wait(30)
    other = Collected()
    scheduler.submit(BatchRequest(encode(tokenizer, PROMPTS[1]), 15), other)
    handle.cancel()
    assert other.finish == Finished("length")
    assert other.ids == olmo2kit.generate(model, tokenizer, PROMPTS[1], do_sample=False, max_new_tokens=15).token_ids
    assert not cancelled.done.is_set()  # a cancelled row gets no more events
    assert len(cancelled.tokens) < 500
    assert scheduler.running == 0


def test_a_full_queue_refuses_at_once(tiny):
    model, tokenizer = tiny
    scheduler = BatchScheduler(model, tokenizer, max_batch_size=1, max_queue=1)
    try:
        running = Collected()
        first = scheduler.submit(BatchRequest(encode(tokenizer, PROMPTS[0]), 500), running)
        assert running.first.wait(30)
        waiting = Collected()
        second = scheduler.submit(BatchRequest(encode(tokenizer, PROMPTS[1]), 5), waiting)
        with pytest.raises(QueueFull):
            scheduler.submit(BatchRequest(encode(tokenizer, PROMPTS[2]), 5), Collected())
        first.cancel()
        assert waiting.finish == Finished("length")  # the waiting one gets the slot
        assert second.cancelled is False
    finally:
        scheduler.close()


def test_close_fails_what_is_left(tiny):
    model, tokenizer = tiny
    scheduler = BatchScheduler(model, tokenizer, max_batch_size=1)
    running, waiting = Collected(), Collected()
    scheduler.submit(BatchRequest(encode(tokenizer, PROMPTS[0]), 500), running)
    assert running.first.wait(30)
    scheduler.submit(BatchRequest(encode(tokenizer, PROMPTS[1]), 5), waiting)
    scheduler.close()
    assert isinstance(running.finish, Failed) and isinstance(waiting.finish, Failed)


def test_prompts_of_different_lengths_prefilled_together_match_each_alone(tiny, scheduler):
    model, tokenizer = tiny
    gate = threading.Event()
    first = Collected()
    scheduler.submit(BatchRequest(encode(tokenizer, PROMPTS[0]), 3), lambda e: (gate.wait(30), first(e)))
    together = [Collected(scheduler) for _ in PROMPTS]
    for prompt, got in zip(PROMPTS, together, strict=True):  # all queued while the first one holds the thread
        scheduler.submit(BatchRequest(encode(tokenizer, prompt), 12, logprobs=1, prompt_logprobs=True), got)
    gate.set()
    for prompt, got in zip(PROMPTS, together, strict=True):
        assert got.finish == Finished("length")
        ids = encode(tokenizer, prompt)
        assert got.ids == olmo2kit.generate(model, tokenizer, prompt, do_sample=False, max_new_tokens=12).token_ids
        expected = direct_logprobs(model, ids + got.ids)
        (scored,) = [e for e in got.events if isinstance(e, PromptLogprobs)]
        for i, token in enumerate(scored.tokens[1:], 1):
            assert token.logprob == pytest.approx(expected[i - 1, ids[i]].item(), abs=1e-5)
        for k, token in enumerate(got.tokens):
            assert token.logprob == pytest.approx(expected[len(ids) - 1 + k, token.id].item(), abs=1e-5)
    assert max(got.most_running for got in together) == len(PROMPTS) + 1  # beside the first
    assert len({len(encode(tokenizer, p)) for p in PROMPTS}) == len(PROMPTS)  # the rows carry padding


class Faulty:
    """A constraint that allows every token until its `at`-th call of `where`, which then breaks: `mask` or
    `accept` raise, `user` raises the Olmo2KitError a grammar raises for a request it cannot serve, and
    `no-token` masks every token from then on."""

    def __init__(self, where: str, at: int) -> None:
        self.where, self.at = where, at
        self.calls = {"mask": 0, "accept": 0}

    def mask(self, logits) -> None:
        self.calls["mask"] += 1
        if self.calls["mask"] < self.at:
            return
        if self.where == "mask":
            raise RuntimeError("the grammar broke")
        if self.where == "user":
            raise Olmo2KitError("no token fits the schema")
        if self.where == "no-token":
            logits.fill_(float("-inf"))

    def accept(self, token: int) -> None:
        self.calls["accept"] += 1
        if self.where == "accept" and self.calls["accept"] == self.at:
            raise RuntimeError("the grammar refused the token")


class Raising(Collected):
    """A request whose callback raises on its `at`-th token and every event after it (after recording each)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def __call__(self, event) -> None:
        super().__call__(event)
        if len(self.tokens) >= self.at:
            raise RuntimeError("the client's callback broke")


def test_a_row_that_fails_ends_alone_and_the_rows_beside_it_go_on(tiny, scheduler):
    model, tokenizer = tiny
    # (constraint, temperature, callback, tokens before the failure, words of the Failed message): failures in
    # the prefill (the first token) and in decode steps, greedy and sampled (no-token would reach multinomial).
    faults = [
        (Faulty("mask", 1), 0.0, Collected(), 0, "RuntimeError: the grammar broke"),
        (Faulty("mask", 3), 0.0, Collected(), 2, "RuntimeError: the grammar broke"),
        (Faulty("accept", 2), 0.0, Collected(), 1, "RuntimeError: the grammar refused the token"),
        (Faulty("user", 2), 0.0, Collected(), 1, "no token fits the schema"),
        (Faulty("no-token", 2), 0.0, Collected(), 1, "allows no next token"),
        (Faulty("no-token", 3), 1.0, Collected(), 2, "allows no next token"),
        (None, 0.0, Raising(at=2), 2, "RuntimeError: the client's callback broke"),
    ]
    assert len(faults) + 1 == scheduler.max_batch_size  # every bad row joins the running victim at one step
    started, queued = threading.Event(), threading.Event()
    victim = Collected(scheduler)
    running_at: list[int] = []

    def victim_emit(event) -> None:  # holds the scheduler on the victim's first token until every bad row waits
        started.set()
        queued.wait(30)
        running_at.append(scheduler.running)
        victim(event)

    scheduler.submit(BatchRequest(encode(tokenizer, PROMPTS[0]), 40), victim_emit)
    assert started.wait(30)
    for i, (constraint, temperature, got, _, _) in enumerate(faults):
        prompt = encode(tokenizer, PROMPTS[1 + i % 3])
        scheduler.submit(BatchRequest(prompt, 30, temperature=temperature, seed=i, constraint=constraint), got)
    queued.set()
    assert victim.finish == Finished("length")
    assert victim.ids == olmo2kit.generate(model, tokenizer, PROMPTS[0], do_sample=False, max_new_tokens=40).token_ids
    # The bad rows ran beside it (but the one failing at its first token, which never joined), and left.
    assert max(running_at) == 1 + len(faults) - 1 and running_at[-1] == 1
    after = Collected()  # the scheduler goes on: a later request runs, and the failed rows hear nothing more
    scheduler.submit(BatchRequest(encode(tokenizer, PROMPTS[2]), 3), after)
    assert after.finish == Finished("length")
    for constraint, _, got, tokens, words in faults:
        assert got.done.is_set()
        failures = [e for e in got.events if isinstance(e, Failed | Finished)]
        assert len(failures) == 1 and failures[0] is got.events[-1], (constraint, got.events)
        assert isinstance(got.events[-1], Failed) and words in got.events[-1].message, got.events[-1]
        assert len(got.tokens) == tokens, (constraint, got.events)
        # what the request asked for (a schema with no next token) is its own doing, a 400; a bug is not
        assert got.events[-1].by_request == ("RuntimeError" not in words), got.events[-1]


def test_running_rows_never_exceed_max_batch_size(tiny):
    model, tokenizer = tiny
    limit = 3
    scheduler = BatchScheduler(model, tokenizer, max_batch_size=limit, max_queue=32)
    running: list[int] = []  # `running` at every token; rows join at a step's prefill and all emit at its decode

    def watch(got: Collected):
        def emit(event) -> None:
            running.append(scheduler.running)
            got(event)
        return emit

    started, queued = threading.Event(), threading.Event()
    try:
        first = Collected()
        scheduler.submit(BatchRequest(encode(tokenizer, PROMPTS[0]), 5),
                         lambda e: (started.set(), queued.wait(30), watch(first)(e)))
        assert started.wait(30)
        many = [Collected() for _ in range(5 * limit)]
        for i, got in enumerate(many):  # all queued while the first holds the thread
            scheduler.submit(BatchRequest(encode(tokenizer, PROMPTS[i % len(PROMPTS)]), 3 + 4 * (i % 4)), watch(got))
        queued.set()
        for got in [first, *many]:
            assert got.finish == Finished("length")
    finally:
        scheduler.close()
    assert max(running) == limit, sorted(set(running))


def test_a_prefill_that_fails_fails_only_the_rows_joining(tiny, scheduler):
    model, tokenizer = tiny
    started, queued = threading.Event(), threading.Event()
    victim = Collected()
    scheduler.submit(BatchRequest(encode(tokenizer, PROMPTS[0]), 30),
                     lambda e: (started.set(), queued.wait(30), victim(e)))
    assert started.wait(30)
    # A token id past the embedding table makes the whole prefill pass raise (IndexError on the CPU); the
    # request prefilled with it fails too, the running victim does not.
    outside, beside = Collected(), Collected()
    scheduler.submit(BatchRequest([1, model.config.vocab_size + 5], 5), outside)
    scheduler.submit(BatchRequest(encode(tokenizer, PROMPTS[1]), 5), beside)
    queued.set()
    assert victim.finish == Finished("length")
    assert victim.ids == olmo2kit.generate(model, tokenizer, PROMPTS[0], do_sample=False, max_new_tokens=30).token_ids
    for got in (outside, beside):
        assert isinstance(got.finish, Failed) and "IndexError" in got.finish.message, got.events
        assert len(got.events) == 1


class FailingJoin(BatchScheduler):
    """Runs out of memory part way through adding rows to a running batch: at the second merge of a cache
    tensor (a layer's keys merged, its values not)."""

    def _join(self, handles, cache, mask, rows) -> None:
        if not self._batch.rows:
            return super()._join(handles, cache, mask, rows)
        cat, merges = torch.cat, []

        def failing_cat(tensors, *args, **kwargs):
            if not args and not kwargs and tensors[0].dim() == 4:  # rows merged along dim 0; padding names its dim
                merges.append(1)
                if len(merges) == 2:
                    raise torch.OutOfMemoryError("out of memory (injected)")
            return cat(tensors, *args, **kwargs)

        torch.cat = failing_cat
        try:
            return super()._join(handles, cache, mask, rows)
        finally:
            torch.cat = cat


def test_running_out_of_memory_while_rows_join_fails_only_those_rows(tiny):
    model, tokenizer = tiny
    scheduler = FailingJoin(model, tokenizer, max_batch_size=8)
    try:
        started, queued = threading.Event(), threading.Event()
        victim = Collected()
        scheduler.submit(BatchRequest(encode(tokenizer, PROMPTS[0]), 30),
                         lambda e: (started.set(), queued.wait(30), victim(e)))
        assert started.wait(30)
        joining = Collected()
        scheduler.submit(BatchRequest(encode(tokenizer, PROMPTS[1]), 5), joining)
        queued.set()
        assert victim.finish == Finished("length")
        alone = olmo2kit.generate(model, tokenizer, PROMPTS[0], do_sample=False, max_new_tokens=30).token_ids
        assert victim.ids == alone  # its keys and values were given back whole
        assert isinstance(joining.finish, Failed) and "(injected)" in joining.finish.message, joining.events
    finally:
        scheduler.close()
