import pytest
import torch

from olmo2kit.compiled import decoder_for

PROMPTS = ["Language modeling is ", "Hello", "The quick brown fox jumps over the lazy"]


def plain_greedy(model, tokenizer, enc, new_tokens):
    out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[:, enc["input_ids"].shape[1]:]


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["batch1", "padded-batch3"])
def test_static_decode_equals_plain_greedy_fp32(tiny, prompts):
    model, tokenizer = tiny
    enc = tokenizer(prompts, return_tensors="pt", padding=True, return_token_type_ids=False)
    expected = plain_greedy(model, tokenizer, enc, 30)
    decoder = decoder_for(model, len(prompts), enc["input_ids"].shape[1] + 30, compile=False)
    result = decoder.decode(enc["input_ids"], enc["attention_mask"], 30, eos_ids={-1}, pad_id=tokenizer.pad_token_id)
    assert torch.equal(result.tokens, expected)


def test_torch_compiled_step_equals_plain_greedy_fp32(tiny):
    model, tokenizer = tiny
    enc = tokenizer(PROMPTS[:1], return_tensors="pt", return_token_type_ids=False)
    expected = plain_greedy(model, tokenizer, enc, 20)
    decoder = decoder_for(model, 1, enc["input_ids"].shape[1] + 20, compile=True)
    assert decoder.compiled
    for _ in range(2):  # the second call replays the compiled step
        result = decoder.decode(enc["input_ids"], enc["attention_mask"], 20, eos_ids={-1},
                                pad_id=tokenizer.pad_token_id)
        assert torch.equal(result.tokens, expected)


def test_decoder_is_reused_while_the_cache_is_long_enough(tiny):
    model, _ = tiny
    first = decoder_for(model, 2, 100, compile=False)
    assert decoder_for(model, 2, 200, compile=False) is first  # both round up to 256
    assert decoder_for(model, 2, 300, compile=False) is not first


def test_end_of_text_stops_and_pads(tiny):
    model, tokenizer = tiny
    enc = tokenizer(PROMPTS[:1], return_tensors="pt", return_token_type_ids=False)
    first = plain_greedy(model, tokenizer, enc, 1)[0, 0].item()
    decoder = decoder_for(model, 1, enc["input_ids"].shape[1] + 64, compile=False)
    result = decoder.decode(enc["input_ids"], enc["attention_mask"], 64, eos_ids={first},
                            pad_id=tokenizer.pad_token_id, check_every=8)
    assert result.tokens.shape[1] == 8  # stopped at the first check after the end of text
    assert result.tokens[0, 0].item() == first
    assert (result.tokens[0, 1:] == tokenizer.pad_token_id).all()


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
    assert torch.equal(sample(3, top_k=1), plain_greedy(model, tokenizer, enc, 20))
    assert torch.equal(sample(4, top_p=1e-6), plain_greedy(model, tokenizer, enc, 20))
