"""Engines: where token ids come from. Everything above an engine (stop strings, text, metrics, chat,
batch jobs) is the same whichever engine runs.

An engine takes encoded requests (the token ids of each prompt, unpadded) and sampling options, and
yields the new token ids of every row as they are decided: a list per row, possibly empty, in each
step it yields. Tokens a row gets after its end of text are ignored above. Closing the iterator stops
the engine at its next token.

    >>> engine = TransformersEngine(model, tokenizer)  # doctest: +SKIP
    >>> for step in engine.tokens([[1, 2, 3]], SamplingOptions(do_sample=False), {0}, stream=True):  # doctest: +SKIP
    ...     print(step[0])

A new engine subclasses `Engine`, lives in its own module (imported only when it is chosen, so that
its package stays optional), and is what `generate(..., engine=...)` and `stream_generate` run.
"""

from __future__ import annotations

import itertools
import math
import queue
import random
import threading
from collections.abc import Iterator
from functools import cached_property

from olmo2kit.compat import cache_keyword
from olmo2kit.devices import peak_memory_gb
from olmo2kit.errors import Olmo2KitError
from olmo2kit.inference.sampling import SEED_LIMIT, SamplingOptions
from olmo2kit.model.llamacpp import Decoder, LlamaCppModel
from olmo2kit.model.sizes import CONTEXT_LENGTH, context_length
from olmo2kit.model.vllm import VllmModel


class Engine:
    """A token source over one model and its tokenizer."""

    name = "engine"

    def __init__(self, model, tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer

    @property
    def context_length(self) -> int | None:
        """Tokens the model can attend to (prompt and new tokens together); None if unknown."""
        return context_length(self.model.config)

    @property
    def scoring_context(self) -> int | None:
        """Tokens one `scored_nll` window may hold; None if unknown."""
        return self.context_length

    def eos_ids(self) -> set[int]:
        return end_of_text_ids(self.model, self.tokenizer)

    def peak_memory_gb(self) -> float | None:
        return peak_memory_gb(self.model.device)

    def tokens(self, prompts: list[list[int]], sampling: SamplingOptions, eos_ids: set[int], *,
               stream: bool) -> Iterator[list[list[int]]]:
        """Yield each row's new token ids. `stream=False` lets the engine hand them over in as few steps
        as it likes (all at the end, say); `stream=True` asks for them as soon as they are decided."""
        raise NotImplementedError

    def scored_nll(self, windows: list[tuple[list[int], int]]) -> list[float]:
        """For each `(ids, context)`, the negative log-likelihood (nats, summed) of ids[context:], each token
        given all before it: the model's raw distribution, no sampling option applied. `context` >= 1."""
        import torch
        import torch.nn.functional as F

        nlls = []
        with torch.inference_mode():
            for ids, context in windows:
                window = torch.tensor([ids], device=self.model.device)
                new = len(ids) - context
                # Only the logits that predict new tokens: the rest of the window is context.
                logits = self.model(input_ids=window, use_cache=False, logits_to_keep=new + 1).logits
                nll = F.cross_entropy(logits[0, :-1].float(), window[0, context:], reduction="sum")
                nlls.append(float(nll.double()))
        return nlls

    def _padded(self, prompts: list[list[int]]) -> dict:
        """The prompts padded on the left, on the device of the model's first layer."""
        batch = self.tokenizer.pad({"input_ids": prompts}, return_tensors="pt", padding_side="left")
        return {k: v.to(self.model.device) for k, v in batch.items()}


class TransformersEngine(Engine):
    """transformers' `generate`: on the calling thread for whole results, on a worker thread when streamed.

    `draft_model` (a smaller OLMo 2 with the same tokenizer) turns on assisted generation, for one
    prompt at a time; `cache`, a DynamicCache holding the keys and values of the first tokens of the
    one prompt, saves computing them again (it is extended in place).
    """

    name = "transformers"

    def __init__(self, model, tokenizer, *, draft_model=None, cache=None) -> None:
        super().__init__(model, tokenizer)
        self.draft_model = draft_model
        self.cache = cache

    def tokens(self, prompts, sampling, eos_ids, *, stream):
        import torch

        inputs = self._padded(prompts)
        if self.cache is not None:
            if len(prompts) != 1 or self.cache.get_seq_length() >= len(prompts[0]):
                raise Olmo2KitError(
                    f"the cache holds {self.cache.get_seq_length()} tokens: it must hold fewer than the prompt's, "
                    "for one prompt"
                )
            inputs[cache_keyword()] = self.cache
        kwargs = dict(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=sampling.do_sample,
            use_cache=True,  # the instruct configs ship use_cache: false
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if sampling.do_sample:
            kwargs.update(temperature=sampling.temperature, top_k=sampling.top_k or None, top_p=sampling.top_p)
            if sampling.min_p:
                kwargs["min_p"] = float(sampling.min_p)
        if sampling.repetition_penalty != 1.0:  # left out at its default, so that a default call is unchanged
            kwargs["repetition_penalty"] = float(sampling.repetition_penalty)  # transformers takes only a float
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        if self.draft_model is not None:
            kwargs["assistant_model"] = self.draft_model
        _seed(sampling.seed)
        if not stream:
            with torch.inference_mode():
                output = self.model.generate(**inputs, **kwargs)
            yield output[:, inputs["input_ids"].shape[1]:].tolist()
            return
        yield from _on_worker_thread(self.model, inputs, kwargs)


def _on_worker_thread(model, inputs: dict, kwargs: dict) -> Iterator[list[list[int]]]:
    """model.generate on a worker thread, its tokens handed over step by step through a queue."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    steps: queue.Queue = queue.Queue()
    cancel = threading.Event()
    failure: list[BaseException] = []
    rows = inputs["input_ids"].shape[0]

    class Feed(BaseStreamer):
        first = True

        def put(self, value):
            if self.first:  # generate hands the prompt over first
                self.first = False
                return
            steps.put(value.reshape(rows, -1).tolist())

        def end(self):
            steps.put(None)

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

    def run() -> None:
        try:
            with torch.inference_mode():
                model.generate(**inputs, **kwargs, streamer=Feed(),
                               stopping_criteria=StoppingCriteriaList([Cancelled()]))
        except BaseException as e:  # re-raised in the consumer's thread
            failure.append(e)
            steps.put(None)

    worker = threading.Thread(target=run, name="olmo2kit-generate", daemon=True)
    worker.start()
    try:
        while (step := steps.get()) is not None:
            yield step
        if failure:
            raise failure[0]
    finally:
        cancel.set()
        worker.join()


class CompiledEngine(Engine):
    """The static-cache decoder of `olmo2kit.inference.compiled`, sampling on the device; the model's
    decoder is reused from call to call. It hands tokens over every 8 tokens when streamed."""

    name = "compiled"

    def tokens(self, prompts, sampling, eos_ids, *, stream):
        from olmo2kit.inference.compiled import decoder_for

        inputs = self._padded(prompts)
        _seed(sampling.seed)
        batch, length = inputs["input_ids"].shape
        decoder = decoder_for(self.model, batch, length + sampling.max_new_tokens, compile=True)
        steps = decoder.steps(
            inputs["input_ids"], inputs["attention_mask"], sampling.max_new_tokens, eos_ids=eos_ids,
            pad_id=self.tokenizer.pad_token_id, greedy=not sampling.do_sample, temperature=sampling.temperature,
            top_k=sampling.top_k, top_p=sampling.top_p, min_p=sampling.min_p,
            repetition_penalty=sampling.repetition_penalty, check_every=8 if stream else 16,
        )
        for chunk in steps:
            yield chunk.tolist()


class VllmEngine(Engine):
    """vLLM's engine (`olmo2kit.model.vllm.VllmModel`): every row a request of its continuous batch, stepped
    here so that tokens stream as they come and closing the iterator aborts what is left.

    vLLM stops a row at end of text itself; a stop string is given to it too (its text kept in the output),
    so that it stops early, and the detokenizer above cuts the text exactly as for transformers.
    """

    name = "vllm"

    @property
    def context_length(self) -> int | None:
        return self.model.context_length

    @property
    def scoring_context(self) -> int | None:
        # vLLM reads prompt logprobs off a request that generates one token, and a request's prompt and new
        # tokens together must fit max_model_len (vllm/v1/engine/input_processor.py, _validate_prompt_len).
        context = self.context_length
        return context - 1 if context else None

    def peak_memory_gb(self) -> float | None:
        return None  # the weights and the KV cache live in vLLM's own processes

    def sampling_params(self, sampling: SamplingOptions, **extra):
        """vLLM's SamplingParams for olmo2kit's options (greedy is temperature 0)."""
        from vllm import SamplingParams

        options = dict(max_tokens=sampling.max_new_tokens, seed=sampling.seed,
                       repetition_penalty=float(sampling.repetition_penalty), **extra)
        if sampling.do_sample:
            options.update(temperature=sampling.temperature, top_k=sampling.top_k or 0, top_p=sampling.top_p,
                           min_p=float(sampling.min_p))
        else:
            options.update(temperature=0.0)
        if sampling.stop:
            options.update(stop=list(sampling.stop), include_stop_str_in_output=True)
        else:
            options.update(detokenize=False)  # olmo2kit's detokenizer makes the text
        return SamplingParams(**options)

    def tokens(self, prompts, sampling, eos_ids, *, stream):
        from vllm.sampling_params import RequestOutputKind

        params = self.sampling_params(sampling, output_kind=RequestOutputKind.DELTA)
        engine = self.model.llm.llm_engine
        rows = {}
        for row, ids in enumerate(prompts):
            request = _request_id()  # outputs carry this id (vLLM adds a suffix for its own use)
            engine.add_request(request, {"prompt_token_ids": list(ids)}, params)
            rows[request] = row
        unfinished = set(rows)
        held = [[] for _ in prompts]
        try:
            while unfinished and engine.has_unfinished_requests():
                step = [[] for _ in prompts]
                for output in engine.step():
                    if output.request_id not in rows:
                        continue
                    step[rows[output.request_id]] += output.outputs[0].token_ids
                    if output.finished:
                        unfinished.discard(output.request_id)
                if stream:
                    yield step
                else:
                    for row, ids in enumerate(step):
                        held[row] += ids
            if not stream:
                yield held
        finally:
            if unfinished:
                engine.abort_request(list(unfinished))

    def scored_nll(self, windows):
        """As `Engine.scored_nll`, through vLLM's prompt logprobs (raw), every window in one batch."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outputs = self.model.llm.generate([{"prompt_token_ids": list(ids)} for ids, _ in windows], params,
                                          use_tqdm=False)
        return [-math.fsum(entry[token].logprob for entry, token in zip(out.prompt_logprobs[context:], ids[context:],
                                                                           strict=True))
                for out, (ids, context) in zip(outputs, windows, strict=True)]


class LlamaCppEngine(Engine):
    """llama.cpp (`olmo2kit.model.llamacpp.LlamaCppModel`): one row at a time through llama-cpp-python's
    `generate`, its tokens handed over one by one. A row's prompt that starts as the previous one did reuses
    those keys and values (llama.cpp's own prefix match), so a chat's history is not computed again.

    Sampling is llama.cpp's. Greedy decoding from an f32 GGUF (--dtype fp32) gives transformers' fp32 tokens;
    the other types run for speed (`model.llamacpp.attention_options`) and can pick another token where
    transformers' top two are near-tied. A seed repeats llama.cpp's own draws, which are not transformers' draws.
    Its repetition penalty looks back `last_n_tokens_size` (64) tokens, where transformers' looks at the whole
    sequence.
    """

    name = "llamacpp"

    @property
    def context_length(self) -> int | None:
        return self.model.context_length

    def peak_memory_gb(self) -> float | None:
        return None  # llama.cpp's memory is its own, outside torch

    def tokens(self, prompts, sampling, eos_ids, *, stream):
        llama = self.model.llama
        held = [[] for _ in prompts]
        for row, ids in enumerate(prompts):
            llama.set_seed(sampling.seed if sampling.seed is not None else random.randrange(SEED_LIMIT))
            if sampling.do_sample:
                options = dict(temp=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                               min_p=float(sampling.min_p))
            else:
                options = dict(temp=0.0, top_k=0, top_p=1.0, min_p=0.0)
            steps = llama.generate(list(ids), repeat_penalty=float(sampling.repetition_penalty), **options)
            try:
                for count, token in enumerate(steps, 1):
                    if stream:
                        step = [[] for _ in prompts]
                        step[row] = [token]
                        yield step
                    else:
                        held[row].append(token)
                    if token in eos_ids or count >= sampling.max_new_tokens:
                        break
            finally:
                steps.close()
        if not stream:
            yield held

    @cached_property
    def _scorer(self) -> Decoder:
        """The llama.cpp context that scores windows, made on first use and kept for every later call: a key/value
        cache of `scoring_context` positions shared by the windows read together."""
        return Decoder(self.model, cells=self.scoring_context or CONTEXT_LENGTH, sequences=SCORED_TOGETHER)

    def scored_nll(self, windows):
        """As `Engine.scored_nll`, on llama.cpp's float32 logits."""
        return [nll for nll, _ in self.scored(windows)]

    def scored(self, windows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """For each `(ids, context)` of `scored_nll`: the negative log-likelihood of ids[context:], and whether each
        of those tokens is the model's most likely one (lm-eval's `is_greedy`).

        Windows are read together, each a sequence of one llama.cpp context, as many as its cache holds, at most
        `Decoder.batch_size` tokens a decode; a window's last token is never read (it predicts nothing scored), so
        a window may hold one token more than the cache."""
        decoder = self._scorer
        for ids, context in windows:
            if len(ids) - 1 > decoder.cells or not 1 <= context <= len(ids):
                raise Olmo2KitError(f"a window of {len(ids)} tokens, {context} of them context, cannot be scored: "
                                    f"at most {decoder.cells + 1} tokens, and at least one of context")
        parts: list[list[float]] = [[] for _ in windows]
        greedy = [True] * len(windows)
        for group in _fitting(windows, decoder.cells, decoder.sequences):
            targets: list[tuple[int, int]] = []  # (window, token) for each logits row asked for, in order
            try:
                for sequence, row in enumerate(group):
                    ids, context = windows[row]
                    for position, token in enumerate(ids[:-1]):
                        scored = position >= context - 1
                        decoder.add(token, position, sequence, logits=scored)
                        if scored:
                            targets.append((row, ids[position + 1]))
                        if decoder.queued == decoder.batch_size:
                            _take_nll(decoder.decode(), targets, parts, greedy)
                            targets = []
                if decoder.queued:
                    _take_nll(decoder.decode(), targets, parts, greedy)
            finally:  # an interrupted group leaves nothing queued or cached for the next call
                decoder.clear()
        return [(math.fsum(p), g) for p, g in zip(parts, greedy, strict=True)]


# Windows one scoring decode may read side by side (sequences of the scoring context): lm-eval's requests are
# short, and several fill a decode of llama.cpp's 512 tokens.
SCORED_TOGETHER = 16


def _fitting(windows: list[tuple[list[int], int]], cells: int, sequences: int) -> Iterator[list[int]]:
    """The windows' indices in groups that a cache of `cells` positions and `sequences` sequences holds at once
    (a window takes its length less one), in order."""
    group: list[int] = []
    used = 0
    for row, (ids, _) in enumerate(windows):
        need = len(ids) - 1
        if group and (used + need > cells or len(group) == sequences):
            yield group
            group, used = [], 0
        group.append(row)
        used += need
    if group:
        yield group


def _take_nll(logits, targets: list[tuple[int, int]], parts: list[list[float]], greedy: list[bool]) -> None:
    """Add each row's -log_softmax at its target token (a float32 row of llama.cpp's logits) to its window's
    parts, and whether the target is the row's most likely token."""
    import torch

    if not targets:
        return
    rows = torch.from_numpy(logits)  # llama.cpp's buffer, read before the next decode
    tokens = torch.tensor([token for _, token in targets])
    picked = rows.gather(1, tokens[:, None])[:, 0]
    nlls = (torch.logsumexp(rows, dim=1) - picked).tolist()
    best = (rows.argmax(dim=1) == tokens).tolist()
    for (window, _), nll, top in zip(targets, nlls, best, strict=True):
        parts[window].append(nll)
        greedy[window] = greedy[window] and top


_requests_made = itertools.count()


def _request_id() -> str:
    return f"olmo2kit-{next(_requests_made)}"


def end_of_text_ids(model, tokenizer) -> set[int]:
    """The token ids that end a row: the generation config's end of text and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def engine_for(model, tokenizer, *, compile: bool = False, draft_model=None, cache=None) -> Engine:
    """The engine for a loaded model and `generate`'s options: vLLM's for a model vLLM loaded
    (`olmo2kit.model.vllm`); else compiled, or transformers with a draft model or a cache
    (`check_acceleration` first says which options go together)."""
    check_acceleration(compile, draft_model, 1)
    if isinstance(model, LlamaCppModel):
        if compile or draft_model is not None or cache is not None:
            raise Olmo2KitError("llama.cpp runs its own compiled kernels and keeps its own cache: it takes no compile, "
                                "draft model or cache")
        return LlamaCppEngine(model, tokenizer)
    if isinstance(model, VllmModel):
        if compile or draft_model is not None or cache is not None:
            raise Olmo2KitError("vLLM compiles, batches and caches prefixes itself: it takes no compile, "
                                "draft model or cache")
        return VllmEngine(model, tokenizer)
    if compile and cache is not None:
        raise Olmo2KitError("the compiled path keeps its own static cache: pass no cache with compile=True")
    if compile:
        return CompiledEngine(model, tokenizer)
    return TransformersEngine(model, tokenizer, draft_model=draft_model, cache=cache)


def keeps_caller_cache(model) -> bool:
    """Whether the engine of `model` takes a KV cache from the caller (a chat reusing its history's keys and
    values): transformers does; vLLM and llama.cpp keep their own, and reuse shared prefixes by themselves."""
    return not isinstance(model, VllmModel | LlamaCppModel)


def check_acceleration(compile: bool, draft_model, batch: int) -> None:
    """Olmo2KitError for options that cannot go together: compile with a draft model, or a draft model
    with more than one prompt."""
    if compile and draft_model:
        raise Olmo2KitError("choose one of compile and a draft model: speculative decoding runs on the plain path")
    if draft_model and batch > 1:
        raise Olmo2KitError("speculative decoding (a draft model) takes one prompt at a time")


def _seed(seed: int | None) -> None:
    if seed is not None:
        from transformers import set_seed

        set_seed(seed)
