"""Sampling options: seed range, repetition_penalty and min_p, token for token against transformers' generate."""

import json
import math

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

from olmo2kit.errors import Olmo2KitError
from olmo2kit.inference.generation import generate, stream_generate
from olmo2kit.inference.sampling import DEFAULTS, SEED_LIMIT, SamplingOptions

PROMPT = "Language modeling is "


@pytest.fixture(scope="module")
def raw(tiny_path):
    """The tiny checkpoint through plain transformers, as the reference."""
    return AutoModelForCausalLM.from_pretrained(tiny_path), AutoTokenizer.from_pretrained(tiny_path)


def raw_new_ids(raw, prompts, seed=None, **options):
    """Each row's new token ids from plain model.generate on a left-padded batch, seeded as olmo2kit seeds."""
    model, tokenizer = raw
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", return_token_type_ids=False)
    if seed is not None:
        set_seed(seed)
    out = model.generate(**inputs, pad_token_id=tokenizer.pad_token_id, **options)
    return out[:, inputs["input_ids"].shape[1]:].tolist()


def test_seeds_are_those_set_seed_takes(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError):  # the limit is transformers' own (numpy's, through set_seed)
        set_seed(SEED_LIMIT)
    set_seed(SEED_LIMIT - 1)
    assert generate(model, tokenizer, PROMPT, seed=SEED_LIMIT - 1, max_new_tokens=3).new_tokens == 3
    for seed in (SEED_LIMIT, 2**64, -1, 1.5):
        with pytest.raises(Olmo2KitError, match="seed must be an integer from 0 to 4294967295"):
            SamplingOptions(seed=seed)
        with pytest.raises(Olmo2KitError, match="seed must be"):
            generate(model, tokenizer, PROMPT, seed=seed, max_new_tokens=3)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"repetition_penalty": 0.0}, "repetition_penalty must be from 0.01 to 100.0"),
        ({"repetition_penalty": -1.2}, "repetition_penalty must be from 0.01 to 100.0"),
        ({"repetition_penalty": math.nan}, "repetition_penalty must be from 0.01 to 100.0"),
        ({"repetition_penalty": math.inf}, "repetition_penalty must be from 0.01 to 100.0"),
        ({"min_p": -0.1}, r"min_p must be in \[0, 1\)"),
        ({"min_p": 1.0}, r"min_p must be in \[0, 1\)"),
        ({"min_p": math.nan}, r"min_p must be in \[0, 1\)"),
        ({"min_p": 1.0, "do_sample": False}, r"min_p must be in \[0, 1\)"),
    ],
)
def test_bad_penalty_and_min_p(tiny, options, message):
    model, tokenizer = tiny
    with pytest.raises(Olmo2KitError, match=message):
        generate(model, tokenizer, PROMPT, max_new_tokens=3, **options)


def test_defaults_are_off_and_leave_the_call_unchanged(tiny, monkeypatch):
    """At their defaults neither option reaches model.generate, so a default call is what it was."""
    model, tokenizer = tiny
    assert (DEFAULTS.repetition_penalty, DEFAULTS.min_p) == (1.0, 0.0)
    calls = []
    plain_generate = model.generate

    def recording_generate(*args, **kwargs):
        calls.append(kwargs)
        return plain_generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    generate(model, tokenizer, PROMPT, max_new_tokens=3)
    generate(model, tokenizer, PROMPT, max_new_tokens=3, do_sample=False, min_p=0.5)  # min_p is for sampling
    generate(model, tokenizer, PROMPT, max_new_tokens=3, repetition_penalty=2, min_p=0.5)
    assert all("repetition_penalty" not in kw and "min_p" not in kw for kw in calls[:2])
    assert calls[2]["repetition_penalty"] == 2.0 and isinstance(calls[2]["repetition_penalty"], float)
    assert calls[2]["min_p"] == 0.5


def test_repetition_penalty_equals_transformers(tiny, raw):
    model, tokenizer = tiny
    prompts = [PROMPT, "Hello"]  # a padded batch: the penalty counts the prompt's tokens, not its padding
    plain = generate(model, tokenizer, PROMPT, do_sample=False, max_new_tokens=30).token_ids
    penalized = generate(model, tokenizer, prompts, do_sample=False, max_new_tokens=30, repetition_penalty=1.5)
    expected = raw_new_ids(raw, prompts, do_sample=False, max_new_tokens=30, repetition_penalty=1.5)
    assert [g.token_ids for g in penalized] == expected
    assert len(set(penalized[0].token_ids)) > len(set(plain))  # the tiny model repeats itself less with it
    streamed = stream_generate(model, tokenizer, PROMPT, do_sample=False, max_new_tokens=30, repetition_penalty=1.5)
    assert [i for chunk in streamed for i in chunk.token_ids] == expected[0]
    sampled = generate(model, tokenizer, PROMPT, seed=5, max_new_tokens=30, repetition_penalty=0.7)
    assert sampled.token_ids == raw_new_ids(raw, [PROMPT], seed=5, do_sample=True, top_k=50, top_p=0.95,
                                            max_new_tokens=30, repetition_penalty=0.7)[0]


def test_min_p_equals_transformers(tiny, raw):
    model, tokenizer = tiny
    greedy = generate(model, tokenizer, PROMPT, do_sample=False, max_new_tokens=30).token_ids
    unfiltered = generate(model, tokenizer, PROMPT, seed=3, max_new_tokens=30).token_ids
    filtered = generate(model, tokenizer, PROMPT, seed=3, max_new_tokens=30, min_p=0.9).token_ids
    assert filtered == raw_new_ids(raw, [PROMPT], seed=3, do_sample=True, top_k=50, top_p=0.95, min_p=0.9,
                                   max_new_tokens=30)[0]
    assert filtered != unfiltered
    # only the likeliest token is within 0.999 of itself: sampling becomes greedy
    assert generate(model, tokenizer, PROMPT, seed=3, max_new_tokens=30, min_p=0.999).token_ids == greedy
    assert generate(model, tokenizer, PROMPT, do_sample=False, max_new_tokens=30, min_p=0.5).token_ids == greedy


def test_compiled_path_takes_both(tiny, raw):
    model, tokenizer = tiny
    prompts = [PROMPT, "Hello"]
    compiled = generate(model, tokenizer, prompts, do_sample=False, max_new_tokens=30, repetition_penalty=1.5,
                        compile=True)
    expected = raw_new_ids(raw, prompts, do_sample=False, max_new_tokens=30, repetition_penalty=1.5)
    assert [g.token_ids for g in compiled] == expected
    greedy = generate(model, tokenizer, PROMPT, do_sample=False, max_new_tokens=30).token_ids
    assert generate(model, tokenizer, PROMPT, seed=3, max_new_tokens=30, min_p=0.999, compile=True).token_ids == greedy


def test_chat_options_and_set(cli, tiny_instruct, tiny_instruct_path, tmp_path):
    model, tokenizer = tiny_instruct
    transcript = tmp_path / "chat.json"
    # min_p 0.99999: the tiny model's second likeliest token comes within 0.99991 of the first at one step here
    script = (f"Hi\n/set repetition_penalty=1 min_p=0.99999 greedy=off\n/set\nHi again\n/set min_p=1\n"
              f"/save {transcript}\n")
    code, out, err = cli("chat", "--model", str(tiny_instruct_path), "-n", "30", "--greedy", "--repetition-penalty",
                         "1.5", "--min-p", "0.2", "--dtype", "fp32", stdin=script)
    assert code == 0 and "Traceback" not in err
    messages = json.loads(transcript.read_text())["messages"]
    greedy = dict(do_sample=False, max_new_tokens=30)
    first = generate(model, tokenizer, messages=messages[:1], repetition_penalty=1.5, **greedy).text
    assert messages[1]["content"] == first != generate(model, tokenizer, messages=messages[:1], **greedy).text
    # min_p 0.99999 keeps only the likeliest token: sampling gives the greedy reply
    assert messages[3]["content"] == generate(model, tokenizer, messages=messages[:3], **greedy).text
    assert "top_p=0.95 min_p=0.99999 repetition_penalty=1.0 seed=none greedy=off" in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: min_p must be in [0, 1) (0 is off), got 1.0"
    ]
    for option, value, message in (("--min-p", "1", "min_p must be in [0, 1)"),
                                   ("--repetition-penalty", "0", "repetition_penalty must be from 0.01 to 100.0")):
        code, out, err = cli("chat", "--model", str(tiny_instruct_path), option, value, stdin="Hi\n")
        assert code == 2 and out == "" and err.strip().startswith(f"error: {message}")


def test_generate_command_passes_repetition_penalty_and_min_p(cli, tiny, tiny_path):
    """The CLI's --repetition-penalty and --min-p reach generation: the same text as the library's."""
    import json

    from olmo2kit.inference.generation import generate

    model, tokenizer = tiny
    for options, flags in (({"repetition_penalty": 1.8}, ["--repetition-penalty", "1.8"]),
                           ({"min_p": 0.5, "seed": 3}, ["--min-p", "0.5", "--seed", "3"])):
        greedy = "repetition_penalty" in options
        expected = generate(model, tokenizer, "Hello", max_new_tokens=12, do_sample=not greedy, **options).text
        plain = generate(model, tokenizer, "Hello", max_new_tokens=12, do_sample=not greedy,
                         **({"seed": 3} if not greedy else {})).text
        code, out, err = cli("generate", "Hello", "--model", str(tiny_path), "-n", "12", "--json", "--device", "cpu",
                             "--dtype", "fp32", *flags, *(["--greedy"] if greedy else []))
        assert code == 0, err
        assert json.loads(out)["text"] == expected
        if greedy:
            assert expected != plain  # the option changes the text, so the equality above says it was passed


@pytest.mark.parametrize("options, needle", [
    ({"temperature": 1e-300}, "temperature must be from 0.01 to 100.0"),
    ({"temperature": float("inf")}, "temperature must be from 0.01 to 100.0"),
    ({"temperature": float("nan")}, "temperature must be from 0.01 to 100.0"),
    ({"repetition_penalty": 1e-300}, "repetition_penalty must be from 0.01 to 100.0"),
    ({"repetition_penalty": 1e300}, "repetition_penalty must be from 0.01 to 100.0"),
])
def test_values_that_overflow_the_logits_are_refused(options, needle):
    """A temperature or penalty of 1e-300 passed as positive and broke sampling with a RuntimeError."""
    with pytest.raises(Olmo2KitError, match=needle):
        SamplingOptions(**options)


def test_a_lone_surrogate_in_a_prompt_or_message_is_one_line(tiny):
    from olmo2kit.inference.chat import ChatSession
    from olmo2kit.inference.generation import generate

    model, tokenizer = tiny
    with pytest.raises(Olmo2KitError, match=r"the prompt holds a lone surrogate \('\\ud800' at character 3\)"):
        generate(model, tokenizer, "ab\ud800", max_new_tokens=2)
    session = ChatSession(model, tokenizer, max_new_tokens=2)
    with pytest.raises(Olmo2KitError, match="message 1's content holds a lone surrogate"):
        session.reply("a\ud800")
    assert session.messages == [] and session.reply("Hi").new_tokens > 0  # the session goes on
