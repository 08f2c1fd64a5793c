import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from olmo2kit.errors import Olmo2KitError
from olmo2kit.inference.generation import Detokenizer, Generation, generate, stream_generate
from olmo2kit.model.loading import load

PROMPT = "Language modeling is "


def raw_greedy(model, tokenizer, prompts, max_new_tokens=20):
    """What plain transformers gives: generate, then decode the new tokens."""
    tokenizer.padding_side = "left"
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, return_token_type_ids=False)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(row[inputs["input_ids"].shape[1]:], skip_special_tokens=True) for row in out]


def raw_new_ids(model, tokenizer, prompts, max_new_tokens, **options):
    """Each row's new token ids from plain transformers generate on a left-padded greedy batch, pads kept."""
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", return_token_type_ids=False)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, **options)
    return out[:, inputs["input_ids"].shape[1]:].tolist()


def early_token_of_one_row(rows):
    """(row, token): a token first met at position 2, 3 or 4 of one row and nowhere in the other rows."""
    for r, row in enumerate(rows):
        others = {t for o, other in enumerate(rows) if o != r for t in other}
        for i in range(2, 5):
            if row.index(row[i]) == i and row[i] not in others:
                return r, row[i]
    raise AssertionError(f"no token ends one row early: {rows}")


def test_greedy_matches_raw_transformers_fp32(tiny, tiny_path):
    model, tokenizer = tiny
    raw_model = AutoModelForCausalLM.from_pretrained(tiny_path)
    raw_tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    result = generate(model, tokenizer, PROMPT, do_sample=False, max_new_tokens=20)
    assert isinstance(result, Generation)
    assert result.text == raw_greedy(raw_model, raw_tokenizer, [PROMPT])[0]
    assert result.new_tokens == 20 == len(result.token_ids)
    assert result.finish_reason == "length"
    assert result.prompt_tokens == len(tokenizer(PROMPT)["input_ids"])
    assert result.tokens_per_s > 0 and result.elapsed_s > 0


@pytest.mark.parametrize("quantize", ["int8", "nf4"])
def test_greedy_matches_raw_transformers_quantized(tiny_path, quantize):
    model, tokenizer = load(str(tiny_path), quantize=quantize, dtype="fp32", device="cpu")
    config = (BitsAndBytesConfig(load_in_8bit=True) if quantize == "int8" else
              BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    raw_model = AutoModelForCausalLM.from_pretrained(tiny_path, quantization_config=config, device_map="cpu",
                                                     dtype=torch.float32)
    raw_tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    result = generate(model, tokenizer, PROMPT, do_sample=False, max_new_tokens=12)
    assert result.text == raw_greedy(raw_model, raw_tokenizer, [PROMPT], 12)[0]


def test_batch_matches_raw_batched_generate(tiny, tiny_path):
    model, tokenizer = tiny
    prompts = [PROMPT, "Hello", "The quick brown fox jumps over"]
    raw = raw_greedy(AutoModelForCausalLM.from_pretrained(tiny_path), AutoTokenizer.from_pretrained(tiny_path), prompts)
    results = generate(model, tokenizer, prompts, do_sample=False, max_new_tokens=20)
    assert [r.text for r in results] == raw
    assert [r.prompt_tokens for r in results] == [len(tokenizer(p)["input_ids"]) for p in prompts]


def test_stream_pieces_add_up_to_generate(tiny):
    model, tokenizer = tiny
    chunks = list(stream_generate(model, tokenizer, PROMPT, do_sample=False, max_new_tokens=20))
    whole = generate(model, tokenizer, PROMPT, do_sample=False, max_new_tokens=20)
    assert "".join(c.text for c in chunks) == whole.text
    assert sum(len(c.token_ids) for c in chunks) == 20
    assert [c.new_tokens for c in chunks] == sorted(c.new_tokens for c in chunks)
    assert chunks[-1].finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].prompt_tps > 0 and chunks[-1].peak_memory_gb > 0


def test_stream_closed_early_stops_generation(tiny, monkeypatch):
    model, tokenizer = tiny
    produced = []
    plain_generate = model.generate

    def counting_generate(*args, **kwargs):
        out = plain_generate(*args, **kwargs)
        produced.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    monkeypatch.setattr(model, "generate", counting_generate)
    uncut = len(generate(model, tokenizer, PROMPT, do_sample=False, max_new_tokens=500).token_ids)
    stream = stream_generate(model, tokenizer, PROMPT, do_sample=False, max_new_tokens=500)
    first = next(stream)
    stream.close()  # joins the generation thread; must not hang
    assert first.new_tokens < 500
    assert produced[0] == uncut == 500  # left alone, generation runs to the limit
    assert produced[1] < uncut // 2  # closed, it stops at the next token, not at the limit


def test_stop_string_ends_text(tiny):
    model, tokenizer = tiny
    full = generate(model, tokenizer, PROMPT, do_sample=False, max_new_tokens=30).text
    stop = full[10:13]
    assert stop.strip(), "the tiny model's greedy text should have a usable piece"
    cut = full[: full.find(stop)]
    result = generate(model, tokenizer, PROMPT, do_sample=False, max_new_tokens=30, stop=[stop])
    assert (result.text, result.finish_reason) == (cut, "stop")
    streamed = list(stream_generate(model, tokenizer, PROMPT, do_sample=False, max_new_tokens=30, stop=stop))
    assert "".join(c.text for c in streamed) == cut and streamed[-1].finish_reason == "stop"


@pytest.mark.parametrize("before, after", [(1, 3), (2, 2), (3, 1)])
def test_a_stop_string_split_across_two_tokens_never_shows_in_the_stream(tiny, before, after):
    """The stream holds back text that may begin a stop string: a stop string whose first `before` characters
    end one token and whose last `after` start the next never shows, in part, in any chunk."""
    model, tokenizer = tiny
    ids = generate(model, tokenizer, PROMPT, do_sample=False, max_new_tokens=30).token_ids
    pieces = [tokenizer.decode([t]) for t in ids]
    # The first two neighbouring tokens long enough, of printable characters only (no half characters), after
    # some text that streams before them.
    k = next(i for i in range(1, len(pieces) - 1) if len(pieces[i]) >= before and len(pieces[i + 1]) >= after
             and (pieces[i] + pieces[i + 1]).isprintable() and "\ufffd" not in pieces[i] + pieces[i + 1])
    stop = pieces[k][-before:] + pieces[k + 1][:after]
    through_k = tokenizer.decode(ids[: k + 1])
    assert stop not in through_k and tokenizer.decode(ids[: k + 2]).find(stop) == len(through_k) - before, stop
    expected = through_k[:-before]
    shown = ""
    chunks = list(stream_generate(model, tokenizer, PROMPT, do_sample=False, max_new_tokens=30, stop=[stop]))
    for chunk in chunks:
        shown += chunk.text
        assert expected.startswith(shown), (stop, shown)  # nothing of the stop string, even for a while
    assert shown == expected and chunks[-1].finish_reason == "stop"
    assert len(chunks) > 1  # streamed, not in one piece at the end


def test_end_of_text_token_finishes_with_stop(tiny_path):
    model, tokenizer = load(str(tiny_path), dtype="fp32", device="cpu")
    first = generate(model, tokenizer, PROMPT, do_sample=False, max_new_tokens=1).token_ids[0]
    model.generation_config.eos_token_id = first  # make the model's next token its end of text
    result = generate(model, tokenizer, PROMPT, do_sample=False, max_new_tokens=10)
    assert (result.token_ids, result.finish_reason) == ([first], "stop")
    chunks = list(stream_generate(model, tokenizer, PROMPT, do_sample=False, max_new_tokens=10))
    assert chunks[-1].finish_reason == "stop" and chunks[-1].new_tokens == 1


@pytest.mark.parametrize("compile", [False, True])
def test_batch_row_ending_early_keeps_its_tokens_through_end_of_text(tiny, compile):
    model, tokenizer = tiny
    prompts = [PROMPT, "Hello", "The quick brown fox jumps over"]
    row, end = early_token_of_one_row(raw_new_ids(model, tokenizer, prompts, 12))
    eos = [tokenizer.eos_token_id, end]
    expected = raw_new_ids(model, tokenizer, prompts, 12, eos_token_id=eos)
    kept = expected[row][: expected[row].index(end) + 1]
    assert expected[row][len(kept):] == [tokenizer.pad_token_id] * (12 - len(kept))  # transformers pads the rest
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = eos  # the session model: restored below
    try:
        results = generate(model, tokenizer, prompts, do_sample=False, max_new_tokens=12, compile=compile)
    finally:
        model.generation_config.eos_token_id = saved
    hit = results[row]
    assert hit.token_ids == kept and hit.token_ids[-1] == end and 3 <= len(kept) <= 5
    assert (hit.new_tokens, hit.finish_reason) == (len(kept), "stop")
    assert hit.text == tokenizer.decode(kept, skip_special_tokens=True)
    for result, raw in zip(results, expected, strict=True):
        if result is not hit:
            assert (result.token_ids, result.new_tokens, result.finish_reason) == (raw, 12, "length")


def test_seed_makes_sampling_repeatable(tiny):
    model, tokenizer = tiny
    a = generate(model, tokenizer, PROMPT, seed=7, max_new_tokens=20).token_ids
    b = generate(model, tokenizer, PROMPT, seed=7, max_new_tokens=20).token_ids
    c = generate(model, tokenizer, PROMPT, seed=8, max_new_tokens=20).token_ids
    assert a == b
    assert a != c


def test_context_overflow_is_a_clear_error(tiny):
    model, tokenizer = tiny
    long_prompt = "hello " * 1000  # the tiny model's context is 1024 tokens
    with pytest.raises(Olmo2KitError, match="context"):
        generate(model, tokenizer, long_prompt, max_new_tokens=100)
    with pytest.raises(Olmo2KitError, match="lower max_new_tokens"):
        generate(model, tokenizer, "hello " * 200, max_new_tokens=1000)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": 0.0}, "temperature"),
        ({"seed": -1}, "seed"),
        ({"stop": [""]}, "stop string"),
        ({"beams": 2}, "unknown generation option"),
    ],
)
def test_invalid_options(tiny, options, message):
    model, tokenizer = tiny
    with pytest.raises(Olmo2KitError, match=message):
        generate(model, tokenizer, PROMPT, **options)


def test_empty_prompt(tiny):
    model, tokenizer = tiny
    with pytest.raises(Olmo2KitError, match="empty prompt"):
        generate(model, tokenizer, "   ")
    with pytest.raises(Olmo2KitError, match="no prompt"):
        generate(model, tokenizer, [])


def test_cache_as_long_as_the_prompt_is_a_user_error(tiny):
    model, tokenizer = tiny
    ids = tokenizer(PROMPT, return_tensors="pt", return_token_type_ids=False)["input_ids"]
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    assert cache.get_seq_length() == ids.shape[1]
    with pytest.raises(Olmo2KitError, match="must hold fewer than the prompt's"):
        list(stream_generate(model, tokenizer, PROMPT, cache=cache, do_sample=False, max_new_tokens=4))


def test_decoder_for_another_batch_size_is_a_user_error(tiny):
    from olmo2kit.inference.compiled import decoder_for

    model, tokenizer = tiny
    batch = tokenizer([PROMPT, "Hello"], return_tensors="pt", padding=True, padding_side="left",
                      return_token_type_ids=False)
    decoder = decoder_for(model, 1, 40, compile=False)
    with pytest.raises(Olmo2KitError, match="built for batches of 1 .* not 2 of"):
        decoder.decode(batch["input_ids"], batch["attention_mask"], 8, eos_ids={tokenizer.eos_token_id},
                       pad_id=tokenizer.pad_token_id)


def test_compiled_generate_equals_plain_greedy(tiny):
    model, tokenizer = tiny
    plain = generate(model, tokenizer, PROMPT, do_sample=False, max_new_tokens=24)
    compiled = generate(model, tokenizer, PROMPT, do_sample=False, max_new_tokens=24, compile=True)
    assert (compiled.text, compiled.token_ids, compiled.finish_reason) == (plain.text, plain.token_ids, "length")
    prompts = [PROMPT, "Hello"]
    batch_plain = generate(model, tokenizer, prompts, do_sample=False, max_new_tokens=24)
    batch_compiled = generate(model, tokenizer, prompts, do_sample=False, max_new_tokens=24, compile=True)
    assert [r.token_ids for r in batch_compiled] == [r.token_ids for r in batch_plain]


def test_compiled_stream_and_stop_strings(tiny):
    model, tokenizer = tiny
    full = generate(model, tokenizer, PROMPT, do_sample=False, max_new_tokens=30)
    chunks = list(stream_generate(model, tokenizer, PROMPT, do_sample=False, max_new_tokens=30, compile=True))
    assert "".join(c.text for c in chunks) == full.text and chunks[-1].new_tokens == 30
    stop = full.text[10:13]
    plain = generate(model, tokenizer, PROMPT, do_sample=False, max_new_tokens=30, stop=[stop])
    compiled = generate(model, tokenizer, PROMPT, do_sample=False, max_new_tokens=30, stop=[stop], compile=True)
    assert (compiled.text, compiled.finish_reason) == (plain.text, "stop")
    assert compiled.token_ids == plain.token_ids  # not the tokens decoded past the stop string
    streamed = list(stream_generate(model, tokenizer, PROMPT, do_sample=False, max_new_tokens=30, stop=stop,
                                    compile=True))
    assert "".join(c.text for c in streamed) == plain.text and streamed[-1].finish_reason == "stop"
    assert sum(len(c.token_ids) for c in streamed) == len(plain.token_ids)


def test_draft_model_keeps_greedy_output(tiny, tmp_path):
    from olmo2kit.model.tiny import build_tiny

    model, tokenizer = tiny
    draft, _ = load(str(build_tiny(tmp_path / "draft", seed=9)), device="cpu")
    alone = generate(model, tokenizer, PROMPT, do_sample=False, max_new_tokens=20)
    assisted = generate(model, tokenizer, PROMPT, do_sample=False, max_new_tokens=20, draft_model=draft)
    assert assisted.token_ids == alone.token_ids
    streamed = list(stream_generate(model, tokenizer, PROMPT, do_sample=False, max_new_tokens=20, draft_model=draft))
    assert "".join(c.text for c in streamed) == alone.text
    with pytest.raises(Olmo2KitError, match="one prompt at a time"):
        generate(model, tokenizer, [PROMPT, "Hello"], draft_model=draft)
    with pytest.raises(Olmo2KitError, match="choose one"):
        generate(model, tokenizer, PROMPT, draft_model=draft, compile=True)


@given(ids=st.lists(st.integers(0, 511), max_size=60), cuts=st.lists(st.integers(1, 7), min_size=1, max_size=60),
       stop=st.sampled_from([(), ("e",), ("th", "\n")]))
@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_streamed_text_decoded_a_few_tokens_at_a_time_is_the_whole_decode(tiny, ids, cuts, stop):
    """Any tokens (byte pieces that split characters, special tokens), handed over in any steps: the chunks
    join to what one decode of all of them gives, cut at the first stop string."""
    _, tokenizer = tiny
    detokenizer = Detokenizer(tokenizer, stop, set(), 1, 0.0, stream=True)
    chunks, start = [], 0
    for cut in cuts * 60:
        if start >= len(ids):
            break
        chunks += detokenizer.add(ids[start: start + cut])
        start += cut
    chunks += detokenizer.finish()
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    cuts_at = [i for i in (whole.find(s) for s in stop) if i >= 0]
    expected = whole[: min(cuts_at)] if cuts_at else whole
    assert "".join(c.text for c in chunks) == expected
    assert chunks[-1].finish_reason == ("stop" if cuts_at else "length")
