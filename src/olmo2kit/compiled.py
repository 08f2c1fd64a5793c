"""A compiled decode path: static KV cache, one-token step under torch.compile, sampling inside it.

Read top to bottom, gpt-fast style: prefill the prompt into a static cache, then run a one-token
step that takes the last token, writes its keys/values in place and returns the next token. On
CUDA the step is compiled with mode="reduce-overhead", so it replays as a CUDA graph: no Python per
layer and no host sync per token (end of text is checked every `check_every` tokens). Sampling
(temperature, top-k, top-p) happens on the device inside the step, by the exponential-race trick,
so it needs no `multinomial` sync either.

Greedy output equals the plain path's in fp32. Padded batches work: pads are masked, and each row
keeps the slot index as its position, which changes nothing under rotary embeddings (attention
depends only on the distance between positions).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from olmo2kit.bench import sync


def _pick(logits: torch.Tensor, temperature: torch.Tensor, top_k: int, top_p: torch.Tensor,
          greedy: bool) -> torch.Tensor:
    """The next token of each row, from logits [batch, vocab], on the device."""
    if greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    # top-p: drop the tail whose mass lies past top_p (always keep the most likely token)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    tail = (sorted_probs.cumsum(dim=-1) - sorted_probs) > top_p
    probs = probs.scatter(-1, order, sorted_probs.masked_fill(tail, 0.0))
    # argmax(p / E) with E ~ Exp(1) samples from p (up to normalization) without a host sync
    noise = torch.empty_like(probs).exponential_(1)
    return (probs / noise).argmax(dim=-1)


@dataclass
class DecodeResult:
    tokens: torch.Tensor  # [batch, new tokens], stopped rows padded with pad_id
    prefill_s: float
    decode_s: float


class StaticDecoder:
    """Decoding for one model at a fixed batch size and cache length, compiled once and reused."""

    def __init__(self, model, batch_size: int, max_cache_len: int, compile: bool | None = None):
        from transformers import StaticCache

        self.model = model
        self.device = model.device
        self.batch_size = batch_size
        self.max_cache_len = max_cache_len
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        self.mask = torch.ones(batch_size, max_cache_len, dtype=torch.long, device=self.device)
        self.position = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        compile = self.device.type == "cuda" if compile is None else compile
        self.step = torch.compile(self._step, mode="reduce-overhead", fullgraph=True) if compile else self._step
        self.compiled = compile

    def _step(self, token: torch.Tensor, temperature, top_k: int, top_p, greedy: bool) -> torch.Tensor:
        logits = self.model(input_ids=token, attention_mask=self.mask, position_ids=self.position,
                            cache=self.cache, use_cache=True).logits[:, -1]
        return _pick(logits, temperature, top_k, top_p, greedy)

    @torch.inference_mode()
    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, *,
               eos_ids: set[int], pad_id: int, greedy: bool = True, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, check_every: int = 16, on_tokens=None) -> DecodeResult:
        batch, length = input_ids.shape
        if batch != self.batch_size or length + max_new_tokens > self.max_cache_len:
            raise ValueError("StaticDecoder was built for another batch size or a shorter cache")
        self.cache.reset()
        self.mask.fill_(1)
        self.mask[:, :length] = attention_mask
        temperature_t = torch.tensor(float(temperature), device=self.device)
        top_p_t = torch.tensor(float(top_p), device=self.device)
        eos = torch.tensor(sorted(eos_ids), device=self.device)
        out = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=self.device)
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)

        start = time.perf_counter()
        positions = torch.arange(length, device=self.device)[None]
        logits = self.model(input_ids=input_ids, attention_mask=self.mask, position_ids=positions,
                            cache=self.cache, use_cache=True).logits[:, -1]
        token = _pick(logits, temperature_t, top_k, top_p_t, greedy)
        sync(self.device)
        prefill_s = time.perf_counter() - start

        start = time.perf_counter()
        produced = max_new_tokens
        reported = 0
        for i in range(max_new_tokens):
            out[:, i] = torch.where(done, pad_id, token)
            done |= torch.isin(token, eos)
            if i + 1 == max_new_tokens:
                break
            if (i + 1) % check_every == 0:  # the only host syncs: every check_every tokens
                if on_tokens is not None:
                    on_tokens(out[:, reported: i + 1])
                    reported = i + 1
                if bool(done.all()):
                    produced = i + 1
                    break
            self.position.fill_(length + i)
            token = self.step(token[:, None].clone(), temperature_t, top_k, top_p_t, greedy).clone()
        sync(self.device)
        decode_s = time.perf_counter() - start
        if on_tokens is not None and reported < produced:
            on_tokens(out[:, reported:produced])
        return DecodeResult(out[:, :produced], prefill_s, decode_s)



def decoder_for(model, batch_size: int, needed_len: int, compile: bool | None = None) -> StaticDecoder:
    """The model's StaticDecoder for this batch size, reused while its cache is long enough.

    Cache lengths are rounded up to a multiple of 256 so that nearby prompt lengths share one
    compiled graph.
    """
    decoders = model.__dict__.setdefault("_olmo2kit_decoders", {})
    key = (batch_size, compile)
    decoder = decoders.get(key)
    if decoder is None or decoder.max_cache_len < needed_len:
        limit = getattr(model.config, "max_position_embeddings", None) or needed_len
        length = min(-(-needed_len // 256) * 256, max(limit, needed_len))
        decoder = decoders[key] = StaticDecoder(model, batch_size, length, compile)
    return decoder
