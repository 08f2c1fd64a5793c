import pytest
import torch

from olmo2kit.inference.compiled import _pick, decoder_for

PROMPTS = ["Language modeling is ", "Hello", "The quick brown fox jumps over the lazy"]


def plain_greedy(model, tokenizer, enc, new_tokens):
    out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[:, enc["input_ids"].shape[1]:]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "transformers-step"])
@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["batch1", "padded-batch3"])
def test_static_decode_equals_plain_greedy_fp32(tiny, prompts, fused):
    model, tokenizer = tiny
    enc = tokenizer(prompts, return_tensors="pt", padding=True, return_token_type_ids=False)
    expected = plain_greedy(model, tokenizer, enc, 30)
    decoder = decoder_for(model, len(prompts), enc["input_ids"].shape[1] + 30, compile=False, fused=fused)
    assert decoder.fused == fused
    result = decoder.decode(enc["input_ids"], enc["attention_mask"], 30, eos_ids={-1}, pad_id=tokenizer.pad_token_id)
    assert torch.equal(result.tokens, expected)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "transformers-step"])
def test_torch_compiled_step_equals_plain_greedy_fp32(tiny, fused):
    model, tokenizer = tiny
    enc = tokenizer(PROMPTS[:1], return_tensors="pt", return_token_type_ids=False)
    expected = plain_greedy(model, tokenizer, enc, 20)
    decoder = decoder_for(model, 1, enc["input_ids"].shape[1] + 20, compile=True, fused=fused)
    assert decoder.compiled and decoder.fused == fused
    for _ in range(2):  # the second call replays the compiled step
        result = decoder.decode(enc["input_ids"], enc["attention_mask"], 20, eos_ids={-1},
                                pad_id=tokenizer.pad_token_id)
        assert torch.equal(result.tokens, expected)


def test_decoder_is_reused_while_the_cache_is_long_enough(tiny):
    model, _ = tiny
    first = decoder_for(model, 2, 100, compile=False)
    assert decoder_for(model, 2, 200, compile=False) is first  # both round up to 256
    second = decoder_for(model, 2, 300, compile=False)
    assert second is not first and second.max_cache_len == 512  # powers of two: few graphs as a chat grows
    assert decoder_for(model, 2, 500, compile=False) is second
    assert decoder_for(model, 3, 100, compile=False) is not second
    assert list(model.__dict__["_olmo2kit_decoders"]) == [(3, False, None, False)]  # one decoder, one cache


def test_end_of_text_stops_and_pads(tiny):
    model, tokenizer = tiny
    enc = tokenizer(PROMPTS[:1], return_tensors="pt", return_token_type_ids=False)
    greedy = plain_greedy(model, tokenizer, enc, 3)[0].tolist()
    decoder = decoder_for(model, 1, enc["input_ids"].shape[1] + 64, compile=False)
    # The prefill's token is handed over (and checked) at once: an end of text there ends decoding.
    result = decoder.decode(enc["input_ids"], enc["attention_mask"], 64, eos_ids={greedy[0]},
                            pad_id=tokenizer.pad_token_id, check_every=8)
    assert result.tokens[0].tolist() == greedy[:1]
    # Later, decoding stops at the first check after the end of text; what follows it is padding.
    end = next(t for t in greedy[1:] if t != greedy[0])
    result = decoder.decode(enc["input_ids"], enc["attention_mask"], 64, eos_ids={end},
                            pad_id=tokenizer.pad_token_id, check_every=8)
    stop = greedy.index(end) + 1
    assert result.tokens.shape[1] == 8
    assert result.tokens[0, :stop].tolist() == greedy[:stop]
    assert (result.tokens[0, stop:] == tokenizer.pad_token_id).all()


def test_steps_hand_over_tokens_as_they_are_checked(tiny):
    model, tokenizer = tiny
    enc = tokenizer(PROMPTS[:1], return_tensors="pt", return_token_type_ids=False)
    decoder = decoder_for(model, 1, enc["input_ids"].shape[1] + 20, compile=False)
    steps = decoder.steps(enc["input_ids"], enc["attention_mask"], 20, eos_ids={-1}, pad_id=tokenizer.pad_token_id,
                          check_every=8)
    chunks = list(steps)
    assert [c.shape[1] for c in chunks] == [1, 7, 8, 4]  # the first token, then every 8, then the rest
    assert torch.equal(torch.cat(chunks, dim=1), plain_greedy(model, tokenizer, enc, 20))


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny):
    model, tokenizer = tiny
    enc = tokenizer(PROMPTS[:1], return_tensors="pt", return_token_type_ids=False)
    decoder = decoder_for(model, 1, enc["input_ids"].shape[1] + 20, compile=False)

    def sample(seed, **kw):
        torch.manual_seed(seed)
        return decoder.decode(enc["input_ids"], enc["attention_mask"], 20, eos_ids={-1},
                              pad_id=tokenizer.pad_token_id, greedy=False, **kw).tokens

    assert torch.equal(sample(1, top_k=50, top_p=0.95), sample(1, top_k=50, top_p=0.95))
    assert not torch.equal(sample(1, top_k=0, top_p=1.0), sample(2, top_k=0, top_p=1.0))
    greedy = plain_greedy(model, tokenizer, enc, 20)
    assert torch.equal(sample(3, top_k=1), greedy)
    assert torch.equal(sample(4, top_p=1e-6), greedy)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "transformers-step"])
def test_repetition_penalty_equals_transformers_greedy_fp32(tiny, fused):
    """Over a padded batch, stepping twice through one decoder: the penalty counts the prompt and, as transformers
    does, its left padding (a padded row's pad token is penalized, which decides a token of this batch)."""
    model, tokenizer = tiny
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True, return_token_type_ids=False)
    out = model.generate(**enc, max_new_tokens=30, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         repetition_penalty=1.3)
    expected = out[:, enc["input_ids"].shape[1]:]
    decoder = decoder_for(model, len(PROMPTS), enc["input_ids"].shape[1] + 30, compile=False, fused=fused)
    for penalty, wanted in ((1.3, expected), (1.0, plain_greedy(model, tokenizer, enc, 30)), (1.3, expected)):
        result = decoder.decode(enc["input_ids"], enc["attention_mask"], 30, eos_ids={-1},
                                pad_id=tokenizer.pad_token_id, repetition_penalty=penalty)
        assert torch.equal(result.tokens, wanted)
    assert not torch.equal(expected, plain_greedy(model, tokenizer, enc, 30))
    padded = (enc["attention_mask"] == 0).any(dim=1)
    assert padded.any() and torch.equal(decoder.seen[:, tokenizer.pad_token_id], padded)  # pads seen where padded


def test_pick_penalizes_repeated_tokens_as_transformers_does_negative_logits_included():
    """The compiled step's penalty against transformers' RepetitionPenaltyLogitsProcessor on negative logits:
    a repeated token's is multiplied by the penalty (made less likely), not divided."""
    from transformers import RepetitionPenaltyLogitsProcessor

    generator = torch.Generator().manual_seed(0)
    logits = -4 * torch.rand(512, 32, generator=generator) - 0.1  # all negative: the likeliest token too
    input_ids = torch.randint(0, 32, (512, 8), generator=generator)
    seen = torch.zeros(512, 32, dtype=torch.bool).scatter_(1, input_ids, True)
    expected = RepetitionPenaltyLogitsProcessor(1.5)(input_ids, logits.clone()).argmax(dim=-1)
    one = torch.tensor(1.0)
    got = _pick(logits, one, 0, one, True, seen=seen, penalty=torch.tensor(1.5))
    assert torch.equal(got, expected)
    divided = torch.where(seen, logits / 1.5, logits).argmax(dim=-1)
    assert (divided != expected).sum() > 10  # rows whose choice hangs on a negative repeated logit


def test_pick_min_p_keeps_tokens_within_min_p_of_the_likeliest():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, -1)
    one, off = torch.tensor(1.0), torch.tensor(1.0)
    torch.manual_seed(0)
    counts = torch.bincount(_pick(logits, one, 0, off, False, min_p=torch.tensor(0.4)), minlength=4)
    assert counts[2:].sum() == 0  # below 0.4 * 0.5
    assert 0.55 < counts[0] / 4000 < 0.7  # 0.5 / 0.8, renormalized over what is left
    unfiltered = torch.bincount(_pick(logits, one, 0, off, False), minlength=4)
    assert (unfiltered > 0).all()


def test_fused_logits_match_transformers_fp32(tiny):
    """Prefill, then one-token steps over a padded batch: the logits of transformers on the whole text."""
    from olmo2kit.inference.compiled import FusedOlmo2

    model, tokenizer = tiny
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True, return_token_type_ids=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    more = torch.randint(3, 200, (len(PROMPTS), 3), generator=torch.Generator().manual_seed(0))
    whole = torch.cat([ids, more], dim=1)
    whole_mask = torch.cat([mask, torch.ones_like(more)], dim=1)
    with torch.inference_mode():
        expected = model(input_ids=whole, attention_mask=whole_mask,
                         position_ids=torch.arange(whole.shape[1])[None]).logits
        fused = FusedOlmo2(model, len(PROMPTS), 64)
        fused.reset(mask)
        got = [fused(ids, torch.arange(ids.shape[1]))]
        for i in range(more.shape[1]):
            got.append(fused(more[:, i:i + 1], torch.tensor([ids.shape[1] + i])))
    for i, logits in enumerate(got):
        assert torch.allclose(logits, expected[:, ids.shape[1] - 1 + i], atol=1e-5, rtol=1e-5)


def test_fusing_keeps_the_model_and_costs_no_memory(tiny_path, tmp_path):
    from olmo2kit.model.loading import load

    model, tokenizer = load(str(tiny_path), device="cpu", dtype="fp32")
    before = {name: p.clone() for name, p in model.state_dict().items()}
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    first = decoder_for(model, 1, 64, compile=False)
    second = decoder_for(model, 2, 64, compile=False)  # fuses the already fused layers: the same storage
    assert first.fused and second.fused
    attention = model.model.layers[0].self_attn
    for decoder in (first, second):
        assert decoder.forward.layers[0].qkv.data_ptr() == attention.q_proj.weight.data_ptr()
        rows = sum(attention.get_submodule(n).weight.shape[0] for n in ("q_proj", "k_proj", "v_proj"))
        assert decoder.forward.layers[0].qkv.shape[0] == rows
    # q, k, v and gate, up now share one storage each: fewer storages, none added
    assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) == len(storages) - 3 * len(
        model.model.layers)
    assert all(torch.equal(p, before[name]) for name, p in model.state_dict().items())
    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    reloaded, _ = load(str(tmp_path / "saved"), device="cpu", dtype="fp32")
    assert all(torch.equal(p, before[name]) for name, p in reloaded.state_dict().items())


def test_decoder_is_rebuilt_when_the_weights_are_replaced(tiny_path):
    from olmo2kit.model.loading import load

    model, tokenizer = load(str(tiny_path), device="cpu", dtype="fp32")
    enc = tokenizer(PROMPTS[:1], return_tensors="pt", return_token_type_ids=False)
    decoder = decoder_for(model, 1, 64, compile=False)
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data * 2  # new tensors, as model.to() or load_state_dict(assign=True) leave
    assert not decoder.current()
    rebuilt = decoder_for(model, 1, 64, compile=False)
    assert rebuilt is not decoder
    result = rebuilt.decode(enc["input_ids"], enc["attention_mask"], 10, eos_ids={-1}, pad_id=tokenizer.pad_token_id)
    assert torch.equal(result.tokens, plain_greedy(model, tokenizer, enc, 10))


def test_quantized_model_decodes_through_transformers(tiny_path):
    from olmo2kit.model.loading import load

    model, tokenizer = load(str(tiny_path), dtype="fp32", device="cpu", quantize="nf4")
    enc = tokenizer(PROMPTS[:1], return_tensors="pt", return_token_type_ids=False)
    decoder = decoder_for(model, 1, 64, compile=False)
    assert not decoder.fused
    result = decoder.decode(enc["input_ids"], enc["attention_mask"], 10, eos_ids={-1}, pad_id=tokenizer.pad_token_id)
    assert torch.equal(result.tokens, plain_greedy(model, tokenizer, enc, 10))


def test_fusing_under_inference_mode_leaves_the_model_trainable(tiny_path):
    from olmo2kit.model.loading import load

    model, tokenizer = load(str(tiny_path), device="cpu", dtype="fp32")
    with torch.inference_mode():
        assert decoder_for(model, 1, 64, compile=False).fused
    model.train()
    ids = tokenizer(PROMPTS[:1], return_tensors="pt", return_token_type_ids=False)["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
