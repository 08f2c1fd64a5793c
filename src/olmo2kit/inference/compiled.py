"""A compiled decode path: static KV cache, one-token step under torch.compile, sampling inside it.

Read top to bottom, gpt-fast style: prefill the prompt into a static cache, then run a one-token
step that takes the last token, writes its keys/values in place and returns the next token. On
CUDA the step is compiled with mode="reduce-overhead", so it replays as a CUDA graph: no Python per
layer and no host sync per token (end of text is checked every `check_every` tokens). Sampling
(repetition penalty, temperature, top-k, top-p, min-p, in transformers' order) happens on the device
inside the step, by the exponential-race trick, so it needs no `multinomial` sync either.

The step is `FusedOlmo2` wherever the model is a plain OLMo 2 on one device: the architecture written
out for decoding over the model's own weights, with q/k/v and gate/up each one matrix. Quantized,
PEFT-wrapped or other models step through transformers with a `StaticCache`.

Greedy output equals the plain path's in fp32. Padded batches work: pads are masked, and each row
keeps the slot index as its position, which changes nothing under rotary embeddings (attention
depends only on the distance between positions).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from olmo2kit.compat import cache_keyword
from olmo2kit.devices import sync
from olmo2kit.errors import Olmo2KitError
from olmo2kit.model.sizes import context_length


def _pick(logits: torch.Tensor, temperature: torch.Tensor, top_k: int, top_p: torch.Tensor, greedy: bool,
          min_p: torch.Tensor | None = None, seen: torch.Tensor | None = None,
          penalty: torch.Tensor | None = None) -> torch.Tensor:
    """The next token of each row, from logits [batch, vocab], on the device.

    `seen` [batch, vocab] marks the tokens of each row so far, whose logits `penalty` moves towards
    less likely (divided if positive, multiplied if negative: transformers' repetition penalty); `min_p`
    drops the tokens less likely than min_p times the likeliest, after top-k and top-p. None is off.
    """
    if seen is not None:
        logits = logits.float()
        logits = torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
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
    if min_p is not None:  # a ratio of two probabilities: the same before and after normalizing
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    # argmax(p / E) with E ~ Exp(1) samples from p (up to normalization) without a host sync
    noise = torch.empty_like(probs).exponential_(1)
    return (probs / noise).argmax(dim=-1)


@dataclass
class DecodeResult:
    tokens: torch.Tensor  # [batch, new tokens], stopped rows padded with pad_id
    prefill_s: float
    decode_s: float


class StaticDecoder:
    """Decoding for one model at a fixed batch size and cache length, compiled once and reused.

    `fused=True` (the default where the model allows it) decodes with `FusedOlmo2`, a forward of the
    OLMo 2 architecture written out for decoding over the model's own weights; otherwise each step
    calls the transformers model with a `StaticCache`. `tuning=True` lets inductor tune its kernels
    by coordinate descent (gpt-fast does the same), which lengthens the first compile.
    """

    def __init__(self, model, batch_size: int, max_cache_len: int, compile: bool | None = None,
                 fused: bool | None = None, tuning: bool = False):
        self.model = model
        self.device = model.device
        self.batch_size = batch_size
        self.max_cache_len = max_cache_len
        self.fused = FusedOlmo2.supports(model) if fused is None else fused
        if self.fused:
            self.forward = FusedOlmo2(model, batch_size, max_cache_len)
        else:
            self.forward = _TransformersForward(model, batch_size, max_cache_len)
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)
        self.seen = torch.zeros(batch_size, model.config.vocab_size, dtype=torch.bool, device=self.device)
        for tensor in (self.position, self.seen):
            torch._dynamo.mark_static_address(tensor)  # updated between steps, read in place by the graph
        compile = self.device.type == "cuda" if compile is None else compile
        if compile:
            # every decoder compiles the same method anew (its guards hold `self`): allow more of them
            # than dynamo's default of 8 before it gives up and runs the step uncompiled
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            options = {"triton.cudagraphs": True, "coordinate_descent_tuning": tuning}  # "reduce-overhead", tuned
            self.step = torch.compile(self._step, fullgraph=True, options=options)
        else:
            self.step = self._step
        self.compiled = compile

    def current(self) -> bool:
        """Whether this decoder still decodes the model as it is now (not moved, weights not replaced)."""
        return self.model.device == self.device and self.forward.current()

    def _step(self, token: torch.Tensor, *pick) -> torch.Tensor:
        logits = self.forward(token, self.position)
        return _pick(logits, *pick)

    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, *, eos_ids: set[int],
               pad_id: int, **options) -> DecodeResult:
        """All new tokens at once, with the time of the prefill and of the decode loop; `options` as `steps` takes
        them."""
        steps = self.steps(input_ids, attention_mask, max_new_tokens, eos_ids=eos_ids, pad_id=pad_id, **options)
        start = time.perf_counter()
        chunks = [next(steps)]  # the prefill's token
        sync(self.device)
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        chunks += list(steps)
        sync(self.device)
        return DecodeResult(torch.cat(chunks, dim=1), prefill_s, time.perf_counter() - start)

    def steps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, *,
              eos_ids: set[int], pad_id: int, greedy: bool = True, temperature: float = 1.0, top_k: int = 0,
              top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
              check_every: int = 16) -> Iterator[torch.Tensor]:
        """Yield the new tokens [batch, k]: the prefill's first, then every `check_every` tokens (the only
        host syncs), until every row has ended or `max_new_tokens` are out. A row that has ended is padded
        with `pad_id`. Closing the generator stops decoding. The sampling options work as transformers'
        (the repetition penalty counts the prompt's tokens, not its padding)."""
        batch, length = input_ids.shape
        if batch != self.batch_size or length + max_new_tokens > self.max_cache_len:
            raise Olmo2KitError(
                f"this decoder was built for batches of {self.batch_size} and {self.max_cache_len} tokens, not "
                f"{batch} of {length} + {max_new_tokens}: get one from decoder_for"
            )
        with torch.inference_mode():
            self.forward.reset(attention_mask)
            pick = self._pick_arguments(input_ids, attention_mask, greedy, temperature, top_k, top_p, min_p,
                                        repetition_penalty)
            eos = torch.tensor(sorted(eos_ids), device=self.device)
            out = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=self.device)
            done = torch.zeros(batch, dtype=torch.bool, device=self.device)
            logits = self.forward(input_ids, torch.arange(length, device=self.device))
            token = _pick(logits, *pick)
        reported = 0
        for i in range(max_new_tokens):
            with torch.inference_mode():
                out[:, i] = torch.where(done, pad_id, token)
                done |= torch.isin(token, eos)
                if repetition_penalty != 1.0:
                    self.seen.scatter_(1, token[:, None], True)
            if i == 0 or i + 1 == max_new_tokens or (i + 1) % check_every == 0:
                yield out[:, reported: i + 1].clone()
                reported = i + 1
                if i + 1 == max_new_tokens or bool(done.all()):
                    return
            with torch.inference_mode():
                self.position.fill_(length + i)
                token = self.step(token[:, None].clone(), *pick).clone()

    def _pick_arguments(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, greedy: bool,
                        temperature: float, top_k: int, top_p: float, min_p: float,
                        repetition_penalty: float) -> tuple:
        """`_pick`'s arguments after the logits: values that change from call to call are tensors on the
        device (a compiled step is not compiled again for them), and what is off is None."""
        seen = penalty = None
        if repetition_penalty != 1.0:
            counts = torch.zeros(self.seen.shape, dtype=torch.int32, device=self.device)
            # Every token of input_ids, the left padding included, as transformers' RepetitionPenaltyLogitsProcessor
            # counts them (it gathers over all of input_ids): a padded row's pad token is penalized there too.
            counts.scatter_add_(1, input_ids, torch.ones_like(input_ids, dtype=torch.int32))
            seen = self.seen.copy_(counts > 0)
            penalty = torch.tensor(float(repetition_penalty), device=self.device)
        temperature_t, top_p_t = (torch.tensor(float(v), device=self.device) for v in (temperature, top_p))
        min_p_t = torch.tensor(float(min_p), device=self.device) if min_p and not greedy else None
        return temperature_t, top_k, top_p_t, greedy, min_p_t, seen, penalty


class _TransformersForward:
    """The transformers model over a StaticCache: logits of the last position of each row."""

    def __init__(self, model, batch_size: int, max_cache_len: int):
        from transformers import StaticCache

        self.model = model
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        self.cache_keyword = cache_keyword()
        self.mask = torch.ones(batch_size, max_cache_len, dtype=torch.long, device=model.device)

    def current(self) -> bool:
        return True  # reads the model's weights at each call

    def reset(self, attention_mask: torch.Tensor) -> None:
        self.cache.reset()
        self.mask.fill_(1)
        self.mask[:, :attention_mask.shape[1]] = attention_mask

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens, attention_mask=self.mask, position_ids=positions[None],
                          use_cache=True, **{self.cache_keyword: self.cache}).logits[:, -1]


class FusedOlmo2:
    """The OLMo 2 forward written out for decoding, over a transformers `Olmo2ForCausalLM`.

    It runs the model's own norms, rotary embeddings and attention function in transformers' order
    (post-norm blocks, RMSNorm over the whole q and k projections), with fewer and larger kernels
    per layer: q, k and v are one matrix, gate and up are one matrix, and the keys and values go to
    a static cache of this object's own. The fused matrices are built once and the model's Linear
    weights become views into them, so they cost no extra memory and the model stays the same
    model (it saves, trains and generates as before).
    """

    def __init__(self, model, batch_size: int, max_cache_len: int):
        config = model.config
        self.model = model
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        device, dtype = model.device, model.dtype
        with torch.inference_mode(False), torch.no_grad():  # the model's weights must stay trainable
            self.layers = [_fuse_layer(layer) for layer in model.model.layers]
        shape = (batch_size, self.kv_heads, max_cache_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.valid = torch.ones(batch_size, max_cache_len, dtype=torch.bool, device=device)
        self.slots = torch.arange(max_cache_len, device=device)
        cos, sin = model.model.rotary_emb(self.valid, self.slots[None])  # fp32, one row per position
        self.cos, self.sin = cos[0], sin[0]
        fused = [t for layer in self.layers for t in (layer.qkv, layer.gate_up)]
        for tensor in (*model.parameters(), *fused, *self.k_cache, *self.v_cache, self.valid, self.slots, self.cos,
                       self.sin):
            torch._dynamo.mark_static_address(tensor)  # CUDA graphs read these in place, no copies

    @staticmethod
    def supports(model) -> bool:
        """Plain Olmo2ForCausalLM weights on one device, with the default rotary embeddings."""
        from transformers import Olmo2ForCausalLM

        config = model.config
        rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
        return (type(model) is Olmo2ForCausalLM and rope == "default" and not config.attention_bias
                and config.hidden_act == "silu" and getattr(model, "hf_quantizer", None) is None
                and all(type(p) is torch.nn.Parameter and p.device == model.device for p in model.parameters()))

    def current(self) -> bool:
        """False once the model's weights were moved or replaced (the decoder must then be rebuilt)."""
        return all(layer.qkv.data_ptr() == layer.block.self_attn.q_proj.weight.data_ptr() for layer in self.layers)

    def reset(self, attention_mask: torch.Tensor) -> None:
        for cache in (*self.k_cache, *self.v_cache):
            cache.zero_()
        self.valid.fill_(True)
        self.valid[:, :attention_mask.shape[1]] = attention_mask.bool()

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [batch, vocab] of the last position; tokens [batch, T] go to cache slots `positions` [T]."""
        from transformers.models.olmo2.modeling_olmo2 import apply_rotary_pos_emb

        batch, length = tokens.shape
        x = self.model.model.embed_tokens(tokens)
        cos, sin = self.cos[positions][None], self.sin[positions][None]
        # a slot is visible to a query if it is at or before it and holds a real token; a pad query sees
        # itself, so that no row is fully masked (that would give NaNs)
        seen = self.slots <= positions[:, None]
        mask = (seen & (self.valid[:, None, :] | (self.slots == positions[:, None])))[:, None]
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for layer, k_cache, v_cache in zip(self.layers, self.k_cache, self.v_cache, strict=True):
            attention, mlp = layer.block.self_attn, layer.block.mlp
            q, k, v = F.linear(x, layer.qkv).split((q_size, kv_size, kv_size), dim=-1)
            q = attention.q_norm(q).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
            k = attention.k_norm(k).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k_cache.index_copy_(2, positions, k)
            v_cache.index_copy_(2, positions, v)
            y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, scale=attention.scaling,
                                               enable_gqa=self.heads != self.kv_heads)
            y = attention.o_proj(y.transpose(1, 2).reshape(batch, length, q_size))
            x = x + layer.block.post_attention_layernorm(y)
            gate, up = F.linear(x, layer.gate_up).chunk(2, dim=-1)
            y = mlp.down_proj(mlp.act_fn(gate) * up)
            x = x + layer.block.post_feedforward_layernorm(y)
        return self.model.lm_head(self.model.model.norm(x[:, -1]))


@dataclass
class _FusedLayer:
    block: torch.nn.Module  # the transformers decoder layer
    qkv: torch.Tensor
    gate_up: torch.Tensor


def _fuse_layer(layer) -> _FusedLayer:
    """One decoder layer, with q/k/v and gate/up each made one matrix that the model's Linear
    weights then view (no copy is left behind). A layer fused before is reused as it is."""
    attention, mlp = layer.self_attn, layer.mlp
    return _FusedLayer(layer, _fused((attention.q_proj, attention.k_proj, attention.v_proj)),
                       _fused((mlp.gate_proj, mlp.up_proj)))


def _fused(linears) -> torch.Tensor:
    weights = [linear.weight for linear in linears]
    first = weights[0]
    rows = sum(w.shape[0] for w in weights)
    offsets = [sum(w.numel() for w in weights[:i]) for i in range(len(weights))]
    if all(w.untyped_storage().data_ptr() == first.untyped_storage().data_ptr() and w.storage_offset() == offset
           for w, offset in zip(weights, offsets, strict=True)):  # fused before: view the same storage again
        return first.new_empty(0).set_(first.untyped_storage(), 0, (rows, first.shape[1]))
    fused = torch.cat([w.data for w in weights])
    for linear, w, offset in zip(linears, weights, offsets, strict=True):
        linear.weight.data = fused[offset // w.shape[1]: offset // w.shape[1] + w.shape[0]]
    return fused


def decoder_for(model, batch_size: int, needed_len: int, compile: bool | None = None, fused: bool | None = None,
                tuning: bool = False) -> StaticDecoder:
    """The model's StaticDecoder for this batch size, reused while its cache is long enough; it
    replaces the model's decoder for any other batch size or setting.

    Cache lengths are powers of two from 256 up (capped at the model's context), so that nearby
    lengths share one compiled graph and a chat that grows to the full context compiles at most five.
    """
    decoders = model.__dict__.setdefault("_olmo2kit_decoders", {})
    key = (batch_size, compile, fused, tuning)
    decoder = decoders.get(key)
    if decoder is None or decoder.max_cache_len < needed_len or not decoder.current():
        limit = context_length(model.config) or needed_len
        length = min(max(256, 1 << (needed_len - 1).bit_length()), max(limit, needed_len))
        decoders.clear()  # one decoder a model: a cache for each batch size met would pile up memory
        decoder = decoders[key] = StaticDecoder(model, batch_size, length, compile, fused, tuning)
    return decoder
