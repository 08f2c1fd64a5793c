"""response_format as constrained decoding: the tiny random model, decoded greedily under the grammar, writes JSON
that fits the schema, and without it does not."""

from __future__ import annotations

import functools
import json

import pytest

from olmo2kit.errors import Olmo2KitError
from olmo2kit.server.grammar import constraint_factory
from serving import SCHEMA, assert_fits_schema

JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
PROMPT = "The capital of France is"
TOO_DEEP = functools.reduce(lambda inner, _: {"items": inner}, range(5000), {})  # past Python's recursion limit


def greedy(tiny, prompt: str, make=None, limit: int = 300) -> tuple[str, bool]:
    """The text greedy decoding writes after `prompt` (masked by a constraint from `make`), and whether it
    reached end of text within `limit` tokens."""
    import torch

    model, tokenizer = tiny
    constraint = make() if make else None
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    new = []
    with torch.no_grad():
        for _ in range(limit):
            logits = model(ids).logits[0, -1].float()
            if constraint:
                constraint.mask(logits)
            token = int(logits.argmax())
            if constraint:
                constraint.accept(token)
            if token == tokenizer.eos_token_id:
                return tokenizer.decode(new, skip_special_tokens=True), True
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True), False


def factory(tiny, response_format: dict, extra_vocab: int = 0):
    model, tokenizer = tiny
    return constraint_factory(response_format, tokenizer, model.config.vocab_size + extra_vocab,
                              {tokenizer.eos_token_id})


def test_json_schema_output_fits_the_schema(tiny):
    text, finished = greedy(tiny, PROMPT, factory(tiny, JSON_SCHEMA))
    assert finished, text
    assert_fits_schema(text)


def test_json_object_output_is_an_object(tiny):
    # The tiny random model either closes the object at once or writes one key forever: this prompt closes it.
    text, finished = greedy(tiny, "Write a short poem about the sea.", factory(tiny, {"type": "json_object"}))
    assert finished, text
    assert isinstance(json.loads(text), dict)


def test_without_the_constraint_the_output_is_not_json(tiny):
    text, _ = greedy(tiny, PROMPT, limit=40)
    with pytest.raises(ValueError):
        json.loads(text)


def logits_after(tiny, text: str):
    """Zero logits masked by a JSON_SCHEMA constraint that has accepted the tokens of `text`."""
    import torch

    model, tokenizer = tiny
    constraint = factory(tiny, JSON_SCHEMA)()
    for token in tokenizer.encode(text, add_special_tokens=False):
        constraint.accept(token)
    logits = torch.zeros(model.config.vocab_size)
    constraint.mask(logits)
    return logits


def test_complete_json_allows_only_end_of_text(tiny):
    import torch

    _, tokenizer = tiny
    logits = logits_after(tiny, '{"name": "Paris", "count": 3, "ok": true}')
    assert torch.isfinite(logits).nonzero().flatten().tolist() == [tokenizer.eos_token_id]


def test_special_and_control_tokens_never_come_inside_a_string(tiny):
    import torch

    _, tokenizer = tiny
    logits = logits_after(tiny, '{"name": "')
    assert torch.isinf(logits[tokenizer.convert_tokens_to_ids(["<|pad|>", "<|endoftext|>"])]).all()
    assert torch.isinf(logits[tokenizer.convert_tokens_to_ids("ğ")])  # byte 0x1f: JSON strings escape it
    assert torch.isfinite(logits[tokenizer.convert_tokens_to_ids("a")])


def test_padded_vocabulary_is_masked(tiny):
    """The model's vocabulary may be larger than the tokenizer's (OLMo 2's is): the padding is never allowed."""
    import torch

    vocab_size = tiny[0].config.vocab_size
    constraint = factory(tiny, {"type": "json_object"}, extra_vocab=32)()
    logits = torch.zeros(vocab_size + 32)
    constraint.mask(logits)
    assert torch.isinf(logits[vocab_size:]).all()
    assert torch.isfinite(logits[:vocab_size]).any()


def test_token_outside_the_grammar_is_a_bug(tiny):
    _, tokenizer = tiny
    constraint = factory(tiny, JSON_SCHEMA)()
    with pytest.raises(AssertionError, match="outside the grammar"):
        constraint.accept(tokenizer.convert_tokens_to_ids("a"))  # JSON starts with "{"


def test_compiled_grammars_are_cached(tiny, monkeypatch):
    import xgrammar

    compiled = []
    compile_json_schema = xgrammar.GrammarCompiler.compile_json_schema

    def counting(self, schema, **options):
        compiled.append(schema)
        return compile_json_schema(self, schema, **options)

    monkeypatch.setattr(xgrammar.GrammarCompiler, "compile_json_schema", counting)
    schema = {"type": "object", "properties": {"cached": {"type": "integer"}, "too": {"type": "boolean"}}}
    reordered = {"properties": {"too": {"type": "boolean"}, "cached": {"type": "integer"}}, "type": "object"}
    for each in (schema, schema, reordered, reordered):
        factory(tiny, {"type": "json_schema", "json_schema": {"name": "c", "schema": each}})
    assert len(compiled) == 2  # the order of properties is the order of the output, so it is part of the key


def test_text_needs_no_constraint(tiny):
    assert factory(tiny, {"type": "text"}) is None


@pytest.mark.parametrize("response_format, message", [
    ("json_object", "must be an object"),
    (None, "must be an object"),
    ({}, "type must be one of"),
    ({"type": "xml"}, "type must be one of"),
    ({"type": ["json_object"]}, "type must be one of"),
    ({"type": "json_schema"}, "must be a JSON Schema object"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "must be a JSON Schema object"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": "object"}}, "must be a JSON Schema object"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}, '"type" must be one of'),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "integer", "minimum": 5, "maximum": 1}}},
     '"minimum" 5 and "maximum" 1 leave no number'),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "("}}}, "parenthesis"),
    ({"type": "json_schema", "json_schema": {"schema": {"$ref": "#/$defs/missing"}}}, "points at no schema"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "number", "maximum": float("nan")}}}, "not JSON"),
    ({"type": "json_schema", "json_schema": {"schema": TOO_DEEP}}, "nests too deeply"),
])
def test_bad_response_format_is_a_user_error(tiny, response_format, message):
    with pytest.raises(Olmo2KitError, match="^response_format") as error:
        factory(tiny, response_format)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


# --- what the mask allows: valid UTF-8 only, the grammar's tokens, and an error at a dead end ---------------


@functools.cache
def vocabulary(tokenizer) -> list[bytes]:
    """Each token's bytes, as xgrammar reads the vocabulary."""
    import xgrammar

    return xgrammar.TokenizerInfo.from_huggingface(tokenizer).decoded_vocab


def byte_token(tokenizer, byte: int) -> int:
    """The token of one byte (the tiny tokenizer is byte-level BPE: it has all 256)."""
    return vocabulary(tokenizer).index(bytes([byte]))


# A completion of each kind a UTF-8 prefix may need: a first continuation byte at each edge of the ranges that
# RFC 3629 allows after E0, ED, F0 and F4, then any continuation bytes.
COMPLETIONS = [b""] + [bytes([b]) + b"\x80" * k for b in (0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF) for k in range(3)]


def valid_utf8_prefix(data: bytes) -> bool:
    """Whether some bytes can follow `data` to make valid UTF-8 (Python's decoder is the judge)."""
    for completion in COMPLETIONS:
        try:
            (data + completion).decode("utf-8")
            return True
        except UnicodeDecodeError:
            pass
    return False


def string_constraint(tiny, prefix: bytes):
    """A constraint inside the string of {"type": "string", "maxLength": 8} that has accepted `prefix` byte by byte."""
    _, tokenizer = tiny
    constraint = factory(tiny, {"type": "json_schema", "json_schema": {
        "name": "s", "schema": {"type": "string", "maxLength": 8}}})()
    for byte in b'"' + prefix:
        constraint.accept(byte_token(tokenizer, byte))
    return constraint


def test_an_encoded_surrogate_is_never_allowed(tiny):
    """xgrammar 0.2.8 takes ED A0 80 (U+D800 encoded) for one character; the text layer would make it U+FFFD."""
    import torch

    _, tokenizer = tiny
    logits = torch.zeros(tiny[0].config.vocab_size)
    string_constraint(tiny, b"\xed").mask(logits)
    for byte in range(0x80, 0xC0):
        assert torch.isfinite(logits[byte_token(tokenizer, byte)]) == (byte < 0xA0), hex(byte)


@pytest.mark.parametrize("prefix", [b"", b"\xc3", b"\xe1", b"\xe1\x80", b"\xf1", b"\xe0", b"\xed", b"\xf0", b"\xf4",
                                    b"\xf4\x80"], ids=lambda p: p.hex() or "start")
def test_every_token_allowed_keeps_the_bytes_valid_utf8(tiny, prefix):
    """Inside a string, after each kind of unfinished character: surrogates, overlong forms, bytes past F4, stray
    continuation bytes and sequences cut short are all masked, and something is always allowed."""
    import torch

    _, tokenizer = tiny
    logits = torch.zeros(tiny[0].config.vocab_size)
    string_constraint(tiny, prefix).mask(logits)
    allowed = torch.isfinite(logits).nonzero().flatten().tolist()
    assert allowed
    vocab = vocabulary(tokenizer)
    assert [vocab[t] for t in allowed if not valid_utf8_prefix(prefix + vocab[t])] == []
    if prefix:  # the character must be finished before the string may close or the text end
        assert not {byte_token(tokenizer, ord('"')), tokenizer.eos_token_id} & set(allowed)


@pytest.mark.parametrize("text", ["", '{"name": "Paris", ', '{"name": "Paris", "count": 3, "ok": true}'])
def test_the_mask_is_xgrammars_outside_strings(tiny, text):
    """Where every byte is ASCII the mask is xgrammar's own bitmask (applied by xgrammar), less special tokens."""
    import torch
    import xgrammar

    model, tokenizer = tiny
    make = factory(tiny, JSON_SCHEMA)
    constraint, reference = make(), make()
    for token in tokenizer.encode(text, add_special_tokens=False):
        constraint.accept(token)
        reference.accept(token)
    logits = torch.zeros(model.config.vocab_size)
    constraint.mask(logits)
    expected = torch.zeros(model.config.vocab_size)
    bitmask = xgrammar.allocate_token_bitmask(1, model.config.vocab_size)
    reference._matcher.fill_next_token_bitmask(bitmask)
    xgrammar.apply_token_bitmask_inplace(expected, bitmask)
    expected[tokenizer.convert_tokens_to_ids(["<|pad|>"])] = float("-inf")
    assert torch.isfinite(logits).nonzero().flatten().tolist() == torch.isfinite(expected).nonzero().flatten().tolist()


def test_a_dead_end_raises_before_masking_every_token(tiny):
    """A pattern the grammar can start but never finish (its class holds only a control character, which a JSON
    string cannot hold raw): after '"a' nothing may come, and sampling from all -inf would fail the whole batch."""
    import torch

    _, tokenizer = tiny
    constraint = factory(tiny, {"type": "json_schema", "json_schema": {
        "name": "d", "schema": {"type": "string", "pattern": "^a[\\x01]$"}}})()
    for token in tokenizer.encode('"a', add_special_tokens=False):
        constraint.accept(token)
    logits = torch.zeros(tiny[0].config.vocab_size)
    with pytest.raises(Olmo2KitError, match="^the response_format schema allows no next token after the 2 tokens"):
        constraint.mask(logits)
    assert torch.isfinite(logits).all()  # left as it was


def test_a_grammar_that_allows_no_first_token_is_refused(tiny, monkeypatch):
    """The check after compiling catches what the schema checks before it would miss (here made to miss a cycle)."""
    from olmo2kit.server import grammar

    monkeypatch.setattr(grammar._SchemaCheck, "check_cycles", lambda self: None)
    monkeypatch.setattr(grammar._SchemaCheck, "check_finite", lambda self: None)
    cycle = {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}
    with pytest.raises(Olmo2KitError, match="allows no first token"):
        factory(tiny, {"type": "json_schema", "json_schema": {"name": "c", "schema": cycle}})


def test_compiling_one_schema_holds_up_no_other(tiny, monkeypatch):
    """A slow schema compiles while others compile beside it; a second request for it waits for the same grammar."""
    import threading

    import xgrammar

    inside, release = threading.Event(), threading.Event()
    compiled = []
    compile_json_schema = xgrammar.GrammarCompiler.compile_json_schema

    def slow_for_one(self, schema, **options):
        compiled.append(schema)
        if "slow" in schema:
            inside.set()
            assert release.wait(60)
        return compile_json_schema(self, schema, **options)

    monkeypatch.setattr(xgrammar.GrammarCompiler, "compile_json_schema", slow_for_one)

    def response_format(name: str) -> dict:
        schema = {"type": "object", "properties": {name: {"type": "integer"}}, "required": [name]}
        return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}

    made = {}

    def make(key: str, name: str) -> None:
        made[key] = factory(tiny, response_format(name))

    first = threading.Thread(target=make, args=("first", "slow"))
    first.start()
    assert inside.wait(60)
    other = threading.Thread(target=make, args=("other", "quick"))
    other.start()
    other.join(30)
    finished_beside = not other.is_alive()  # before the slow one is released
    second = threading.Thread(target=make, args=("second", "slow"))
    second.start()
    release.set()
    for thread in (first, other, second):
        thread.join(60)
    assert finished_beside, "a schema waited for another one to compile"
    assert made["first"].args[0] is made["second"].args[0]
    assert sum("slow" in schema for schema in compiled) == 1


def test_a_deep_schema_is_refused_before_compiling(tiny):
    deep = functools.reduce(lambda inner, _: {"type": "array", "items": inner}, range(450), {})
    with pytest.raises(Olmo2KitError, match="nests too deeply .*64 levels"):
        factory(tiny, {"type": "json_schema", "json_schema": {"name": "d", "schema": deep}})


def test_a_grammar_too_slow_to_follow_raises(tiny, monkeypatch):
    """This pattern's parse grows at each character (7 s a token by the 60th sampled); the whole batch would wait."""
    import torch

    from olmo2kit.server import grammar

    monkeypatch.setattr(grammar, "MAX_MASK_SECONDS", 0.05)
    _, tokenizer = tiny
    constraint = factory(tiny, {"type": "json_schema", "json_schema": {
        "name": "slow", "schema": {"type": "string", "pattern": "^(?:(-*|(\\w?|[^a-c]|é*){2})*?)*$"}}})()
    constraint.accept(byte_token(tokenizer, ord('"')))
    with pytest.raises(Olmo2KitError, match="^the response_format schema takes too long to follow .* simplify"):
        for _ in range(80):
            constraint.mask(torch.zeros(tiny[0].config.vocab_size))
            constraint.accept(byte_token(tokenizer, ord("x")))
