"""llama.cpp as an engine, through the library: the GGUF olmo2kit converts gives transformers' tokens and logits,
tokenizes and renders chats as transformers does, and works under generation, streaming, stop strings, seeds,
chat sessions and batch jobs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from olmo2kit.errors import Olmo2KitError
from olmo2kit.inference.chat import ChatSession
from olmo2kit.inference.generation import generate, stream_generate
from olmo2kit.inference.jobs import run_job
from olmo2kit.model.chat_template import render_chat
from olmo2kit.model.engines import choose_engine, engine_info
from olmo2kit.model.tiny import EOS, PAD

pytestmark = pytest.mark.usefixtures("one_thread")  # transformers' side: the tiny model is fastest on one thread

PROMPTS = ["Language modeling is", "The capital of France is", "Hello, world! 1 2 3 100 1000", "I'm fine, you're"]
GREEDY = dict(do_sample=False, max_new_tokens=24)
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Write a short poem about the sea."},
     {"role": "assistant", "content": "The sea is wide, the sea is deep."},
     {"role": "user", "content": "Again, in 12345 words, room 0100 and 10010!  Don't stop.\n\nThanks 🚀 ✅ 我想"}],
]
# An f32 GGUF runs without flash attention and with keys and values in f32 (`attention_options`): its logits
# are transformers' fp32 ones to rounding (measured up to 6e-7 on the tiny checkpoint, logits up to 0.6).
LOGIT_TOLERANCE = 1e-5
# Forty prompts, for greedy parity: with flash attention and an f16 key/value cache, 2 of them gave other tokens.
PARITY_PROMPTS = [subject + verb for subject in (
    "Language modeling", "The capital of France", "My favourite colour", "Water", "The quick brown fox",
    "In 1969, the first", "Python code", "Hello, world!", "I'm fine, you're", "Numbers 1 2 3 100",
) for verb in (" is", " was", " will be", " means")]


def test_greedy_tokens_match_transformers_one_by_one_and_in_a_batch(llamacpp_tiny, tiny):
    for prompt in PROMPTS:
        ours = generate(*llamacpp_tiny, prompt, **GREEDY)
        theirs = generate(*tiny, prompt, **GREEDY)
        assert ours.token_ids == theirs.token_ids and ours.text == theirs.text, prompt
    batch = generate(*llamacpp_tiny, PROMPTS, **GREEDY)
    assert [g.token_ids for g in batch] == [g.token_ids for g in generate(*tiny, PROMPTS, **GREEDY)]
    assert all(g.finish_reason == "length" and g.new_tokens == 24 for g in batch)


def test_fp32_greedy_tokens_equal_transformers_on_forty_prompts(llamacpp_tiny, tiny):
    """--dtype fp32 is exact: llama.cpp's greedy tokens are transformers' (fp32) on every prompt, near-ties too."""
    differ = [prompt for prompt in PARITY_PROMPTS
              if generate(*llamacpp_tiny, prompt, **GREEDY).token_ids != generate(*tiny, prompt, **GREEDY).token_ids]
    assert differ == []


def _llama_logits(gguf, gguf_type: str, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of `ids`, run as the engine runs a GGUF of `gguf_type`."""
    from llama_cpp import Llama

    from olmo2kit.model.llamacpp import attention_options

    llama = Llama(model_path=str(gguf), n_ctx=512, n_threads=1, logits_all=True, verbose=False,
                  **attention_options(gguf_type))
    try:
        llama.eval(ids)
        return np.asarray(llama.scores[: len(ids)])
    finally:
        llama.close()


def _transformers_logits(model, ids: list[int]) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_logits_agree_with_transformers(llamacpp_tiny, tiny):
    model, tokenizer = tiny
    for prompt in PROMPTS:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ours, theirs = _llama_logits(llamacpp_tiny[0].gguf, "f32", ids), _transformers_logits(model, ids)
        assert np.abs(ours - theirs).max() < LOGIT_TOLERANCE, prompt
        assert (ours.argmax(-1) == theirs.argmax(-1)).all()


# Where speed wins (every GGUF type but f32: flash attention, an f16 key/value cache, and weights rounded to bf16
# or quantized), llama.cpp's next-token log-probabilities on the forty prompts as one text (465 positions) are
# transformers' fp32 ones within the first bound, its greedy pick is transformers' at the share of positions the
# second names, and where they differ transformers' own top two were within the third (a near-tie). Measured on
# the tiny checkpoint, whose logits span only 0.6: bf16 6.3e-3, 0.994, 1.7e-3; q4_k_m 0.12, 0.85, 0.058.
SPEED_TOLERANCE = {"bf16": (2e-2, 0.95, 1e-2), "q4_k_m": (0.3, 0.7, 0.15)}


@pytest.mark.parametrize("gguf_type", SPEED_TOLERANCE)
def test_speed_types_agree_with_transformers_within_a_tolerance(tiny_path, tiny, gguf_type):
    from olmo2kit.model.gguf import gguf_file

    logprob_bound, agreement, near_tie = SPEED_TOLERANCE[gguf_type]
    model, tokenizer = tiny
    ids = tokenizer(" ".join(PARITY_PROMPTS), add_special_tokens=False)["input_ids"]
    ours = _llama_logits(gguf_file(str(tiny_path), gguf_type=gguf_type, say=lambda _: None), gguf_type, ids)
    theirs = _transformers_logits(model, ids)
    logprobs = [x - np.logaddexp.reduce(x, axis=-1, keepdims=True) for x in (ours, theirs)]
    assert np.abs(logprobs[0] - logprobs[1]).max() < logprob_bound
    picked, best = ours.argmax(-1), theirs.argmax(-1)
    assert (picked == best).mean() >= agreement
    rows = np.arange(len(ids))
    assert (theirs[rows, best] - theirs[rows, picked]).max() < near_tie


def test_gguf_carries_the_olmo2_tokenizer(llamacpp_tiny_instruct):
    model, tokenizer = llamacpp_tiny_instruct
    meta = model.llama.metadata
    assert meta["general.architecture"] == "olmo2"
    assert meta["tokenizer.ggml.pre"] == "dbrx"  # OLMo 2's pre-tokenizer, named for the tiny vocabulary
    eos, pad = tokenizer.convert_tokens_to_ids([EOS, PAD])
    assert int(meta["tokenizer.ggml.bos_token_id"]) == eos == int(meta["tokenizer.ggml.eos_token_id"])
    assert int(meta["tokenizer.ggml.padding_token_id"]) == pad
    assert model.llama.token_eos() == eos


@pytest.mark.parametrize("messages", CHATS)
def test_llama_cpp_tokenizes_a_chat_as_transformers(llamacpp_tiny_instruct, messages):
    model, tokenizer = llamacpp_tiny_instruct
    text = render_chat(tokenizer, messages)
    assert text.startswith(EOS)
    ours = model.llama.tokenize(text.encode(), add_bos=False, special=True)
    assert ours == tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("messages", CHATS)
def test_gguf_chat_template_renders_as_transformers(llamacpp_tiny_instruct, llamacpp_tiny, messages):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    for model, tokenizer in (llamacpp_tiny_instruct, llamacpp_tiny):  # the tokenizer's template; a base model's
        meta = model.llama.metadata
        formatter = Jinja2ChatFormatter(template=meta["tokenizer.chat_template"], eos_token=EOS, bos_token=EOS)
        rendered = formatter(messages=messages).prompt
        assert rendered == render_chat(tokenizer, messages)


def test_stream_and_stop_strings_as_transformers(llamacpp_tiny, tiny):
    chunks = list(stream_generate(*llamacpp_tiny, PROMPTS[1], **GREEDY))
    whole = generate(*llamacpp_tiny, PROMPTS[1], **GREEDY)
    assert len(chunks) > 1
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids
    assert "".join(c.text for c in chunks) == whole.text
    stop = whole.text[5:8]
    ours = generate(*llamacpp_tiny, PROMPTS[1], stop=[stop], **GREEDY)
    theirs = generate(*tiny, PROMPTS[1], stop=[stop], **GREEDY)
    assert ours.finish_reason == theirs.finish_reason == "stop"
    assert ours.text == theirs.text and stop not in ours.text


def test_seeded_sampling_repeats(llamacpp_tiny):
    sampled = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=24)
    first = generate(*llamacpp_tiny, PROMPTS[0], seed=7, **sampled)
    again = generate(*llamacpp_tiny, PROMPTS[0], seed=7, **sampled)
    other = generate(*llamacpp_tiny, PROMPTS[0], seed=8, **sampled)
    assert first.token_ids == again.token_ids
    assert first.token_ids != other.token_ids


def test_chat_session_as_transformers(llamacpp_tiny_instruct, tiny_instruct):
    replies = []
    for model, tokenizer in (llamacpp_tiny_instruct, tiny_instruct):
        session = ChatSession(model, tokenizer, system="You are a helpful assistant.", **GREEDY)
        replies.append([session.reply(text).token_ids for text in ("Hello", "What is the capital?")])
    assert replies[0] == replies[1]


def test_batch_job_as_transformers(llamacpp_tiny, tiny, tmp_path):
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    lines = []
    for name, (model, tokenizer) in (("llamacpp", llamacpp_tiny), ("transformers", tiny)):
        out = tmp_path / f"{name}.jsonl"
        run_job(model, tokenizer, source, out, batch_size=2, **GREEDY)
        lines.append([json.loads(line) for line in out.read_text().splitlines()])
    assert [row["text"] for row in lines[0]] == [row["text"] for row in lines[1]]
    assert {row["engine"] for row in lines[0]} == {"llamacpp"}


def test_engine_info_and_choice(llamacpp_tiny, tiny_path):
    import llama_cpp

    assert engine_info(llamacpp_tiny[0]) == {"engine": "llamacpp", "engine_version": llama_cpp.__version__}
    told = []
    assert choose_engine("auto", str(tiny_path), quantize="q8_0", say=told.append) == "llamacpp"
    assert told == ["engine: llamacpp (q8_0 is a GGUF type)"]
    assert choose_engine("auto", str(tiny_path), device="cpu", say=told.append) == "transformers"


@pytest.mark.parametrize(("engine", "options", "needle"), [
    ("llamacpp", dict(quantize="nf4"), "llama.cpp takes a GGUF type for --quantize"),
    ("llamacpp", dict(quantize="q9_9"), "not q9_9"),
    ("transformers", dict(quantize="q8_0"), "is a GGUF type, which llama.cpp runs"),
    ("vllm", dict(quantize="q4_k_m"), "is a GGUF type, which llama.cpp runs"),
    ("llamacpp", dict(device="cuda"), "runs llama.cpp on the CPU"),
    ("llamacpp", dict(unsupported="--draft-model"), "llama.cpp does not take --draft-model"),
])
def test_choose_engine_refuses(tiny_path, engine, options, needle):
    with pytest.raises(Olmo2KitError, match=needle.replace(".", r"\.")):
        choose_engine(engine, str(tiny_path), **options)


def test_llamacpp_engine_takes_no_compile(llamacpp_tiny):
    from olmo2kit.inference.engines import engine_for

    with pytest.raises(Olmo2KitError, match="takes no compile"):
        engine_for(*llamacpp_tiny, compile=True)
