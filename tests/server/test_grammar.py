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
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}, 'Unsupported type "nope"'),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "integer", "minimum": 5, "maximum": 1}}},
     "minimum greater than maximum"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "("}}}, "parenthesis"),
    ({"type": "json_schema", "json_schema": {"schema": {"$ref": "#/$defs/missing"}}}, "cannot be used"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "number", "maximum": float("nan")}}}, "not JSON"),
    ({"type": "json_schema", "json_schema": {"schema": TOO_DEEP}}, "nests too deeply"),
])
def test_bad_response_format_is_a_user_error(tiny, response_format, message):
    with pytest.raises(Olmo2KitError, match="^response_format") as error:
        factory(tiny, response_format)
    assert message in str(error.value)
    assert "\n" not in str(error.value)
