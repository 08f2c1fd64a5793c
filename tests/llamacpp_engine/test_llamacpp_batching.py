"""LlamaCppScheduler, in process, on the tiny checkpoint's f32 GGUF: requests decoding together, in parts, after
a reused prefix or after being preempted, get the tokens and log probabilities they get alone, and transformers'
(BatchScheduler over the fp32 checkpoint); cancel, close, constraints and seeds behave as on BatchScheduler.

What the scheduler hands llama.cpp is seen by wrapping its Decoder's `add` and `decode` on the instance (olmo2kit's
own code, run unchanged), not by mocking llama.cpp."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter

import pytest

from olmo2kit.errors import Olmo2KitError
from olmo2kit.inference.batching import BatchRequest, BatchScheduler, Failed, Finished, PromptLogprobs, QueueFull, Token
from olmo2kit.inference.llamacpp_batching import STEP_TOKENS, LlamaCppScheduler
from olmo2kit.model.llamacpp import LlamaCppModel
from olmo2kit.model.tiny import TINY_VOCAB

pytestmark = pytest.mark.usefixtures("one_thread")  # transformers' side: the tiny model is fastest on one thread

PROMPTS = ["Hello world", "The quick brown fox jumps over", "1 2 3 4", "Numbers, letters, and symbols: + - * / =",
           "The capital of France is", "Language modeling is the task of"]
# llama.cpp's f32 logits are transformers' fp32 ones to rounding (test_llamacpp_engine.LOGIT_TOLERANCE: 1e-5)
LOGPROB_TOLERANCE = 1e-4
SMALL_CACHE = 64  # positions of the preemption tests' cache: a few short requests fill it


class Collected:
    """A request's events, in order, with a flag set at its last one."""

    def __init__(self, scheduler=None, *, block_at: int | None = None) -> None:
        self.events: list = []
        self.done = threading.Event()
        self.scheduler = scheduler
        self.most_running = 0  # requests running when one of this request's tokens came
        # at its `block_at`-th token the scheduler's thread waits (in this callback) until `release` is set
        self.block_at, self.blocked, self.release = block_at, threading.Event(), threading.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        if isinstance(event, Token):
            if self.scheduler is not None:
                self.most_running = max(self.most_running, self.scheduler.running)
            if len(self.tokens) == self.block_at:
                self.blocked.set()
                assert self.release.wait(30)
        if isinstance(event, Finished | Failed):
            self.done.set()

    @property
    def tokens(self) -> list[Token]:
        return [e for e in self.events if isinstance(e, Token)]

    @property
    def ids(self) -> list[int]:
        return [t.id for t in self.tokens]

    @property
    def scored(self) -> list[PromptLogprobs]:
        return [e for e in self.events if isinstance(e, PromptLogprobs)]

    @property
    def finish(self):
        assert self.done.wait(60), f"the request never finished: {self.events[-3:]}"
        return self.events[-1]


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def random_prompt(length: int, seed: int) -> list[int]:
    """`length` random token ids of the tiny vocabulary, none of its two special tokens (0 and 1)."""
    rng = random.Random(seed)
    return [rng.randrange(2, TINY_VOCAB) for _ in range(length)]


def submit_together(scheduler, requests: list[BatchRequest], collectors: list[Collected]) -> list:
    """Submit `requests` so that the scheduler takes them from its queue in the same step, however this thread is
    scheduled: a request of one token holds the scheduler's thread (in its callback) while they are queued."""
    gate = Collected(block_at=1)
    scheduler.submit(BatchRequest([2], 1), gate)
    assert gate.blocked.wait(60)
    try:
        return [scheduler.submit(request, got) for request, got in zip(requests, collectors, strict=True)]
    finally:
        gate.release.set()


def run(scheduler, requests: list[BatchRequest]) -> list[Collected]:
    """Submit `requests` together; each one's events once all have finished."""
    got = [Collected(scheduler) for _ in requests]
    if len(requests) == 1:
        scheduler.submit(requests[0], got[0])
    else:
        submit_together(scheduler, requests, got)
    for collected in got:
        assert collected.done.wait(60), f"a request never finished: {collected.events[-3:]}"
    return got


def assert_close(ours: list[Token], theirs: list[Token]) -> None:
    """Same token ids, log probabilities within LOGPROB_TOLERANCE, and the same alternatives (but where two of
    them tie within the tolerance at the edge of the top k, either may be listed)."""
    assert [t.id for t in ours] == [t.id for t in theirs]
    for position, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if b.logprob is None:
            assert a.logprob is None
            continue
        assert a.logprob == pytest.approx(b.logprob, abs=LOGPROB_TOLERANCE), position
        assert (a.top is None) == (b.top is None)
        if b.top is None:
            continue
        assert [lp for _, lp in a.top] == pytest.approx([lp for _, lp in b.top], abs=LOGPROB_TOLERANCE), position
        mine, yours = dict(a.top), dict(b.top)
        for token in mine.keys() & yours.keys():
            assert mine[token] == pytest.approx(yours[token], abs=LOGPROB_TOLERANCE), position
        for token in mine.keys() ^ yours.keys():  # listed by one side only: it ties the other's k-th
            value, kth = (mine[token], min(yours.values())) if token in mine else (yours[token], min(mine.values()))
            assert value == pytest.approx(kth, abs=2 * LOGPROB_TOLERANCE), position


class Steps:
    """What the scheduler hands its Decoder, step by step: {sequence: tokens added} for each `decode`."""

    def __init__(self, scheduler: LlamaCppScheduler, monkeypatch) -> None:
        self.steps: list[Counter] = []
        self._current: Counter = Counter()
        decoder = scheduler.decoder
        add, decode = decoder.add, decoder.decode

        def counted_add(token: int, position: int, sequence: int, *, logits: bool) -> None:
            self._current[sequence] += 1
            add(token, position, sequence, logits=logits)

        def counted_decode():
            self.steps.append(self._current)
            self._current = Counter()
            return decode()

        monkeypatch.setattr(decoder, "add", counted_add)
        monkeypatch.setattr(decoder, "decode", counted_decode)

    @property
    def tokens(self) -> int:
        return sum(sum(step.values()) for step in self.steps)


@pytest.fixture(scope="module")
def scheduler(llamacpp_tiny):
    """Four requests at a time over the tiny checkpoint's context (1024 positions), shared by the tests here."""
    running = LlamaCppScheduler(*llamacpp_tiny, max_batch_size=4, max_queue=16)
    yield running
    running.close()


@pytest.fixture(scope="module")
def reference(tiny):
    """Transformers' continuous batching over the fp32 checkpoint: the tokens and log probabilities to match."""
    running = BatchScheduler(*tiny, max_batch_size=8, max_queue=16)
    yield running
    running.close()


@pytest.fixture(scope="module")
def small(llamacpp_tiny, tiny_path):
    """Three requests at a time in a cache of SMALL_CACHE positions (the model's context cut to fit): a few
    requests fill it, so the scheduler must preempt."""
    model, tokenizer = llamacpp_tiny
    short = LlamaCppModel(model.gguf, tiny_path, model.ref, model.dtype, threads=model.threads, context=SMALL_CACHE)
    running = LlamaCppScheduler(short, tokenizer, max_batch_size=3, max_queue=16)
    yield running
    running.close()


def test_requests_decoding_together_get_their_tokens_alone_and_transformers(llamacpp_tiny, scheduler, reference):
    """More requests than slots, of different lengths, some of one or two tokens, submitted at once."""
    tokenizer = llamacpp_tiny[1]
    requests = [BatchRequest(encode(tokenizer, prompt), n) for prompt, n in zip(PROMPTS, [30, 1, 24, 2, 40, 12],
                                                                                strict=True)]
    together = run(scheduler, requests)
    alone = [run(scheduler, [request])[0] for request in requests]
    theirs = run(reference, requests)
    for request, mine, single, expected in zip(requests, together, alone, theirs, strict=True):
        assert mine.finish == Finished("length") and len(mine.ids) == request.max_new_tokens
        assert mine.ids == single.ids == expected.ids, tokenizer.decode(request.prompt)
    assert max(c.most_running for c in together) == 4, "the requests never decoded together"


def test_a_long_prompt_is_read_in_parts_while_the_others_decode(llamacpp_tiny, scheduler, reference, monkeypatch):
    tokenizer = llamacpp_tiny[1]
    steps = Steps(scheduler, monkeypatch)
    decoding = [BatchRequest(encode(tokenizer, PROMPTS[0]), 60), BatchRequest(encode(tokenizer, PROMPTS[1]), 60)]
    long = BatchRequest(random_prompt(STEP_TOKENS + 200, seed=1), 8)
    first = Collected(scheduler, block_at=2)  # the long prompt comes while both others decode
    other = Collected(scheduler)
    submit_together(scheduler, decoding, [first, other])
    assert first.blocked.wait(60)
    reading = Collected(scheduler)
    scheduler.submit(long, reading)
    first.release.set()
    for got in (first, other, reading):
        assert got.finish == Finished("length")
    for got, expected in zip([first, other, reading], run(reference, [*decoding, long]), strict=True):
        assert got.ids == expected.ids
    reader = max({sequence for step in steps.steps for sequence in step},
                 key=lambda sequence: sum(step[sequence] for step in steps.steps))  # the long prompt's slot
    parts = [step for step in steps.steps if step[reader] > 1]
    assert [step[reader] for step in parts] == [STEP_TOKENS - 2, len(long.prompt) - (STEP_TOKENS - 2)]
    for step in parts:  # each part shares its step with one token of each decoding request
        assert sorted(step.values()) == [1, 1, step[reader]], step


def test_prompt_logprobs_equal_transformers_for_prompts_read_in_parts(llamacpp_tiny, scheduler, reference):
    tokenizer = llamacpp_tiny[1]
    requests = [BatchRequest(encode(tokenizer, PROMPTS[3]), 0, logprobs=3, prompt_logprobs=True),
                BatchRequest(encode(tokenizer, PROMPTS[1]), 6, logprobs=2, prompt_logprobs=True),
                BatchRequest(random_prompt(STEP_TOKENS + 100, seed=2), 3, logprobs=5, prompt_logprobs=True),
                BatchRequest(encode(tokenizer, PROMPTS[5]), 5, logprobs=0)]
    for mine, theirs in zip(run(scheduler, requests), run(reference, requests), strict=True):
        assert isinstance(mine.finish, Finished)
        assert len(mine.scored) == len(theirs.scored)
        for a, b in zip(mine.scored, theirs.scored, strict=True):
            assert_close(a.tokens, b.tokens)
        if mine.scored:
            assert mine.events[0] is mine.scored[0]  # before any token
        assert_close(mine.tokens, theirs.tokens)


def test_a_prompt_extending_a_finished_request_computes_only_its_new_tokens(llamacpp_tiny, scheduler, reference,
                                                                            monkeypatch):
    """A chat's next turn: the slot kept the first request's prompt and tokens, so only what is new is read."""
    tokenizer = llamacpp_tiny[1]
    prompt = encode(tokenizer, "Language modeling is the task of predicting")
    (first,) = run(scheduler, [BatchRequest(prompt, 10)])
    extra = encode(tokenizer, " and then the sea is wide")
    follow_up = BatchRequest(prompt + first.ids + extra, 6)
    steps = Steps(scheduler, monkeypatch)
    (mine,) = run(scheduler, [follow_up])
    # the first request's last token was chosen but never read, so it is read with the new ones
    assert steps.tokens == len(extra) + 1 + (6 - 1)
    assert mine.ids == run(reference, [follow_up])[0].ids
    # prompt log probabilities need the logits of every prompt position: nothing is reused for them
    steps.steps.clear()
    (scored,) = run(scheduler, [BatchRequest(follow_up.prompt, 0, prompt_logprobs=True)])
    assert steps.tokens == len(follow_up.prompt)
    assert_close(scored.scored[0].tokens, run(reference, [BatchRequest(follow_up.prompt, 0, prompt_logprobs=True)])
                 [0].scored[0].tokens)


class Preemptions(logging.Handler):
    """The requests the scheduler takes out of its cache, with how many events each had then."""

    def __init__(self, watched: dict[int, Collected]) -> None:
        super().__init__(logging.INFO)
        self.watched = watched
        self.seen: list[tuple[int, int]] = []  # (request id, its events so far)

    def emit(self, record: logging.LogRecord) -> None:
        if "the key/value cache is full" in record.getMessage():
            request = record.args[0]
            self.seen.append((request, len(self.watched[request].events) if request in self.watched else -1))


@pytest.fixture
def preemptions():
    logger = logging.getLogger("olmo2kit")
    handler, level = Preemptions({}), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_requests_filling_the_cache_are_preempted_and_all_finish_with_their_tokens(llamacpp_tiny, small, reference,
                                                                                    preemptions):
    tokenizer = llamacpp_tiny[1]
    with pytest.raises(Olmo2KitError, match=f"do not fit the key/value cache of {SMALL_CACHE} positions"):
        small.submit(BatchRequest(random_prompt(SMALL_CACHE - 10, seed=3), 11), Collected())
    with pytest.raises(Olmo2KitError, match=f"must hold the model's context \\({SMALL_CACHE} tokens\\)"):
        LlamaCppScheduler(small.model, tokenizer, cells=SMALL_CACHE // 2)
    # three requests of 44 to 56 positions each in a cache of 64; the one that joins last, preempted first, samples
    requests = [BatchRequest(encode(tokenizer, prompt), 40) for prompt in PROMPTS[1:3]]
    requests.append(BatchRequest(encode(tokenizer, PROMPTS[3]), 40, temperature=1.0, seed=7))
    mine = run(small, requests)
    for got, expected in zip(mine, run(reference, requests), strict=True):
        assert got.finish == Finished("length")
        assert got.ids == expected.ids  # the sampled one draws on with its own generator
    preempted = Counter(request for request, _ in preemptions.seen)
    assert len(preempted) >= 2, preempted


def test_a_preempted_request_keeps_its_prompt_logprobs_and_tokens_once(llamacpp_tiny, small, reference, preemptions):
    """A request scoring its prompt is preempted before its PromptLogprobs (it reads its prompt again) and after
    (it reads its prompt and tokens again, without scoring them): one PromptLogprobs event, no token twice."""
    tokenizer = llamacpp_tiny[1]
    # In 64 positions: two requests of 5 and 17 prompt tokens and 40 new ones hold 20 + 32 at the first one's 16th
    # token, when one scoring 12 prompt tokens comes: 52 + 12 fit, so it is admitted, but not with the two tokens the
    # others add in the same step: it is taken out while scoring, and waits until it fits beside them. Later, as
    # the cache fills again, the one that joined last, the scoring one, goes out again with tokens of its own.
    decoding = [BatchRequest(encode(tokenizer, PROMPTS[0]), 40), BatchRequest(encode(tokenizer, PROMPTS[3]), 40)]
    assert [len(request.prompt) for request in decoding] == [5, 17]
    scoring = BatchRequest(random_prompt(12, seed=4), 16, logprobs=2, prompt_logprobs=True)
    first, other, scored = Collected(small, block_at=16), Collected(small), Collected(small)
    submit_together(small, decoding, [first, other])
    assert first.blocked.wait(60)
    scoring_id = small.submit(scoring, scored).id
    preemptions.watched[scoring_id] = scored
    first.release.set()
    for got in (first, other, scored):
        assert got.finish == Finished("length")
    expected = run(reference, [*decoding, scoring])
    assert first.ids == expected[0].ids and other.ids == expected[1].ids
    assert len(scored.scored) == 1 and scored.events[0] is scored.scored[0]
    assert_close(scored.scored[0].tokens, expected[2].scored[0].tokens)
    assert_close(scored.tokens, expected[2].tokens)  # no token twice, none missing
    when = [events for request, events in preemptions.seen if request == scoring_id]
    assert 0 in when, "never preempted while scoring its prompt"
    assert any(events > 1 for events in when), "never preempted once it had tokens"


def test_a_cancelled_request_frees_its_slot_for_a_waiting_one(llamacpp_tiny, scheduler, reference):
    tokenizer = llamacpp_tiny[1]
    running, cancelled = [Collected() for _ in range(3)], Collected(block_at=1)
    *handles, handle = submit_together(scheduler, [BatchRequest(encode(tokenizer, p), 200) for p in PROMPTS[:4]],
                                       [*running, cancelled])
    assert cancelled.blocked.wait(60)  # every slot is taken: the next request waits
    waiting = BatchRequest(encode(tokenizer, PROMPTS[4]), 5)
    late = Collected()
    scheduler.submit(waiting, late)
    assert scheduler.running == 4 and scheduler.waiting == 1
    handle.cancel()
    cancelled.release.set()
    assert late.finish == Finished("length") and late.ids == run(reference, [waiting])[0].ids
    assert not any(got.done.is_set() for got in running), "the waiting request had a slot only once they finished"
    for other in handles:
        other.cancel()
    for _ in range(200):
        if not scheduler.busy:
            break
        time.sleep(0.05)
    assert not scheduler.busy and scheduler.running == 0
    assert len(cancelled.events) == 1  # the token it was given as it was cancelled, then nothing
    assert not any(got.done.is_set() for got in running)  # a cancelled request gets no last event


def test_close_fails_the_running_and_the_waiting_requests(llamacpp_tiny):
    model, tokenizer = llamacpp_tiny
    closing = LlamaCppScheduler(model, tokenizer, max_batch_size=1)
    running, waiting = Collected(block_at=1), Collected()
    closing.submit(BatchRequest(encode(tokenizer, PROMPTS[0]), 1000), running)
    assert running.blocked.wait(60)
    closing.submit(BatchRequest(encode(tokenizer, PROMPTS[1]), 5), waiting)
    closing.close(timeout=0)  # it stops after this step, the one giving the running request its first token
    running.release.set()
    closing.close()
    for got in (running, waiting):
        assert isinstance(got.finish, Failed) and got.finish.closed, got.events[-2:]
        assert sum(isinstance(e, Finished | Failed) for e in got.events) == 1
    assert not waiting.tokens
    with pytest.raises(QueueFull):
        closing.submit(BatchRequest(encode(tokenizer, PROMPTS[1]), 5), Collected())


class EvenTokens:
    """A constraint allowing only even token ids; it raises at its `fail_at`-th mask, when given."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at, self.masks, self.accepted = fail_at, 0, []

    def mask(self, logits) -> None:
        self.masks += 1
        if self.masks == self.fail_at:
            raise RuntimeError("the constraint broke (injected)")
        logits[1::2] = float("-inf")

    def accept(self, token: int) -> None:
        self.accepted.append(token)


def test_constraints_apply_per_request_and_one_that_raises_fails_alone(llamacpp_tiny, scheduler, reference):
    tokenizer = llamacpp_tiny[1]
    prompts = [encode(tokenizer, prompt) for prompt in PROMPTS[:3]]
    constrained = [EvenTokens(), EvenTokens()]
    requests = [BatchRequest(prompts[0], 12, constraint=constrained[0]),
                BatchRequest(prompts[1], 12, constraint=EvenTokens(fail_at=4)),
                BatchRequest(prompts[2], 12)]
    mine = run(scheduler, requests)
    theirs = run(reference, [BatchRequest(prompts[0], 12, constraint=constrained[1]), requests[2]])
    assert mine[0].finish == Finished("length") and mine[0].ids == theirs[0].ids == constrained[0].accepted
    assert all(token % 2 == 0 for token in mine[0].ids)
    broken = mine[1]
    assert isinstance(broken.finish, Failed) and "(injected)" in broken.finish.message
    assert len(broken.tokens) == 3 and sum(isinstance(e, Finished | Failed) for e in broken.events) == 1
    assert mine[2].finish == Finished("length") and mine[2].ids == theirs[1].ids


def test_a_seeded_sample_repeats_alone_and_beside_others(llamacpp_tiny, scheduler, reference):
    tokenizer = llamacpp_tiny[1]
    sampled = BatchRequest(encode(tokenizer, PROMPTS[4]), 24, temperature=1.0, top_p=0.9, seed=1234)
    (alone,) = run(scheduler, [sampled])
    beside = run(scheduler, [BatchRequest(encode(tokenizer, PROMPTS[0]), 10), sampled,
                             BatchRequest(encode(tokenizer, PROMPTS[1]), 30, temperature=1.0, seed=5)])
    assert alone.ids == beside[1].ids
    assert alone.ids == run(reference, [sampled])[0].ids  # BatchScheduler's draws, on the same probabilities
    assert alone.ids != run(scheduler, [BatchRequest(sampled.prompt, 24)])[0].ids  # it sampled


def test_a_request_taken_from_the_queue_keeps_the_scheduler_busy(llamacpp_tiny, scheduler, monkeypatch):
    """The server unloads a model whose scheduler is not busy (registry._make_room): a request on its way from
    the queue to its slot must count, or its model can be closed under it (the client gets a 503)."""
    forget, seen = scheduler.decoder.forget, []

    def watched(sequence: int, start: int = 0) -> None:  # called as the request takes its slot
        seen.append(scheduler.busy)
        forget(sequence, start)

    monkeypatch.setattr(scheduler.decoder, "forget", watched)
    (got,) = run(scheduler, [BatchRequest(encode(llamacpp_tiny[1], PROMPTS[2]), 3)])
    assert got.finish == Finished("length")
    assert seen and all(seen), seen


def test_a_prompt_token_outside_the_vocabulary_fails_no_other_request(llamacpp_tiny, scheduler, reference):
    """llama.cpp refuses a whole batch holding a token it does not know (llama_decode returns -1): such a prompt
    must be refused before it shares a step with the others, as a request of its own fails alone on transformers."""
    tokenizer = llamacpp_tiny[1]
    request = BatchRequest(encode(tokenizer, PROMPTS[1]), 30)
    running = Collected(block_at=1)
    scheduler.submit(request, running)
    assert running.blocked.wait(60)
    bad = Collected()
    try:
        scheduler.submit(BatchRequest([5, TINY_VOCAB + 10, 7], 4), bad)
    except Olmo2KitError:
        bad.done.set()
    finally:
        running.release.set()
    assert running.finish == Finished("length") and running.ids == run(reference, [request])[0].ids
    assert bad.done.wait(60) and not bad.tokens


def test_a_seed_torch_refuses_fails_that_request_and_the_scheduler_goes_on(llamacpp_tiny):
    """A request's own bad option (a seed torch.Generator.manual_seed refuses: 2**64 and above) is refused at
    submit or fails that request; it must not end the scheduler's thread, leaving every later request waiting."""
    model, tokenizer = llamacpp_tiny
    own = LlamaCppScheduler(model, tokenizer, max_batch_size=1)
    try:
        bad = Collected()
        try:
            own.submit(BatchRequest(encode(tokenizer, PROMPTS[0]), 4, temperature=1.0, seed=2**70), bad)
        except Olmo2KitError:
            bad.done.set()
        (after,) = run(own, [BatchRequest(encode(tokenizer, PROMPTS[1]), 4)])
        assert after.finish == Finished("length") and len(after.tokens) == 4
        assert bad.done.is_set() and not bad.tokens
    finally:
        own.close()


def test_more_requests_together_than_llama_cpp_decodes_is_refused_with_its_limit(llamacpp_tiny):
    """llama.cpp makes no context of more than 256 sequences (LLAMA_MAX_SEQ, src/llama-cparams.h): `serve
    --max-batch-size 300` must say so, not ask for fewer positions."""
    with pytest.raises(Olmo2KitError, match="256"):
        LlamaCppScheduler(*llamacpp_tiny, max_batch_size=300)


def test_cancelled_waiting_requests_leave_the_queue_while_every_slot_is_taken(llamacpp_tiny, scheduler):
    """Clients that gave up while waiting take no place in the queue (else `submit` would answer QueueFull to new
    clients until a slot frees), even while no request can be admitted."""
    tokenizer = llamacpp_tiny[1]
    running, holder = [Collected() for _ in range(3)], Collected(block_at=1)
    *handles, held = submit_together(scheduler, [BatchRequest(encode(tokenizer, p), 200) for p in PROMPTS[:4]],
                                     [*running, holder])
    assert holder.blocked.wait(60)  # every slot is taken
    gone = [scheduler.submit(BatchRequest(encode(tokenizer, p), 5), Collected()) for p in PROMPTS[4:8]]
    assert scheduler.waiting == len(gone)
    for handle in gone:
        handle.cancel()
    holder.release.set()  # the scheduler steps on, all four slots still running
    for _ in range(200):
        if scheduler.waiting == 0:
            break
        time.sleep(0.05)
    assert scheduler.waiting == 0 and scheduler.running == 4
    for handle in [*handles, held]:
        handle.cancel()
    for _ in range(200):
        if not scheduler.busy:
            break
        time.sleep(0.05)
    assert not scheduler.busy
