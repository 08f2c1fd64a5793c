"""response_format schemas, many of them. What the grammar would not enforce, or what nothing could satisfy, is an
Olmo2KitError naming the keyword and where it is; what it accepts, sampled hot on the tiny random model over many
seeds, always parses and validates (the `jsonschema` package judges), in valid UTF-8."""

from __future__ import annotations

import functools
import json
import threading

import pytest

from olmo2kit.errors import Olmo2KitError
from olmo2kit.server.grammar import constraint_factory
from serving import SCHEMA, assert_fits_schema

pytestmark = pytest.mark.usefixtures("one_thread")  # from conftest.py: the tiny model is 30x faster on one thread

SEEDS = range(16)
TEMPERATURES = (1.0, 1.5, 2.0)
MAX_NEW_TOKENS = 200


def factory(tiny, schema: dict):
    model, tokenizer = tiny
    return constraint_factory({"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}, tokenizer,
                              model.config.vocab_size, {tokenizer.eos_token_id})


def string(**more) -> dict:
    return {"type": "string", **more}


def integer(low: int = 0, high: int = 9) -> dict:
    return {"type": "integer", "minimum": low, "maximum": high}


def record(**properties) -> dict:
    """An object of `properties`, all required."""
    return {"type": "object", "properties": properties, "required": list(properties)}


# (schema, what the message names, where: the JSON pointer of the schema that holds it)
REFUSED = [
    ({"type": "integer", "not": {"const": 3}}, '"not"', "#"),
    ({"allOf": [{"type": "string"}, {"enum": ["yes", "no"]}]}, '"allOf" of several schemas', "#"),
    ({"allOf": []}, '"allOf" must be a non-empty list', "#"),
    ({"type": "integer", "allOf": [{"minimum": 5}]}, '"type" beside "allOf"', "#"),
    ({"type": "object", "properties": {"a": integer()}, "required": ["a", "b"]}, '"required" names \'b\'', "#"),
    ({"type": "object", "required": ["b"], "additionalProperties": True}, '"required" names \'b\'', "#"),
    ({"type": "object", "properties": {"a": integer(), "b": integer()}, "dependentRequired": {"a": ["b"]}},
     '"dependentRequired"', "#"),
    ({"type": "object", "properties": {"a": integer()}, "dependentSchemas": {"a": {"required": ["a"]}}},
     '"dependentSchemas"', "#"),
    ({"type": "object", "properties": {"a": integer()}, "dependencies": {"a": ["a"]}}, '"dependencies"', "#"),
    ({"type": "integer", "if": {"minimum": 5}, "then": {"maximum": 6}}, '"if"', "#"),
    ({"type": "integer", "then": {"maximum": 6}}, '"then"', "#"),
    ({"type": "integer", "else": {"maximum": 6}}, '"else"', "#"),
    ({"type": []}, '"type" must be one of', "#"),
    ({"type": ["string", "string"]}, '"type" must be one of', "#"),
    ({"type": "nope"}, '"type" must be one of', "#"),
    ({"$ref": "http://example.com/schema.json"}, "is not a reference within this schema", "#"),
    ({"$ref": "other.json#/a"}, "is not a reference within this schema", "#"),
    ({"$ref": "#a", "$defs": {"a": {"$anchor": "a", "type": "integer"}}}, "is not a reference within", "#"),
    ({"$defs": {"a": {"$anchor": "a", "type": "integer"}}}, '"$anchor"', "#/$defs/a"),
    ({"$defs": {"a b": integer()}, "$ref": "#/$defs/a%20b"}, "has an escape", "#"),
    ({"$ref": "#/$defs/missing"}, "points at no schema", "#"),
    ({"$defs": {"a": integer()}, "$ref": "#/$defs"}, "points at no schema", "#"),
    ({"$defs": {"a": integer()}, "$ref": "#/$defs/a", "maximum": 3}, '"maximum" beside "$ref"', "#"),
    ({"anyOf": [integer()], "oneOf": [string()]}, '"anyOf" and "oneOf" together', "#"),
    ({"anyOf": []}, '"anyOf" must be a non-empty list', "#"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, '"oneOf" schemas 0 and 1 may both fit', "#"),
    ({"oneOf": [record(k={"const": "a"}), record(k={"enum": ["a", "b"]})]}, '"oneOf" schemas 0 and 1', "#"),
    ({"oneOf": [{"const": 1}, {"const": 3}, {"enum": [2, 1.0]}]}, '"oneOf" schemas 0 and 2 may both fit', "#"),
    ({"type": "object", "patternProperties": {"^a": integer()}}, '"patternProperties"', "#"),
    ({"type": "object", "propertyNames": {"maxLength": 1}}, '"propertyNames"', "#"),
    ({"type": "object", "properties": {"a": integer()}, "unevaluatedProperties": string()},
     '"unevaluatedProperties" is enforced by the grammar only as false', "#"),
    ({"type": "array", "prefixItems": [integer()], "unevaluatedItems": string()}, '"unevaluatedItems"', "#"),
    ({"type": "array", "items": integer(), "contains": {"const": 3}}, '"contains"', "#"),
    ({"type": "array", "items": integer(), "minContains": 1}, '"minContains"', "#"),
    ({"type": "array", "items": integer(), "maxContains": 1}, '"maxContains"', "#"),
    ({"type": "array", "items": integer(), "uniqueItems": True}, '"uniqueItems" is enforced', "#"),
    ({"type": "array", "items": [integer()]}, '"items" must be a schema', "#"),
    ({"type": "array", "items": [integer()], "additionalItems": string()}, '"items" must be a schema', "#"),
    ({"type": "number", "multipleOf": 0.5}, '"multipleOf"', "#"),
    ({"type": "integer", "multipleOf": 3, "minimum": 0}, '"multipleOf"', "#"),
    ({"type": "integer", "multipleOf": 1.5}, '"multipleOf"', "#"),
    ({"type": "object", "additionalProperties": integer(), "minProperties": 1}, '"minProperties" is not enforced', "#"),
    ({"type": "string", "contentEncoding": "base64"}, '"contentEncoding"', "#"),
    ({"type": "string", "contentMediaType": "text/html"}, '"contentMediaType"', "#"),
    ({"type": "string", "nullable": True}, '"nullable"', "#"),
    ({"$defs": {"a": integer()}, "$dynamicRef": "#a"}, '"$dynamicRef"', "#"),
    ({"maxLength": 3}, '"maxLength" needs "type": "string"', "#"),
    ({"minimum": 3}, '"minimum" needs "type": "number"', "#"),
    ({"properties": {"a": integer()}}, '"properties" needs "type": "object"', "#"),
    ({"type": "string", "minItems": 1}, '"minItems" needs "type": "array"', "#"),
    ({"type": "string", "enum": ["abc", "a"], "maxLength": 2}, '"maxLength" beside "enum"', "#"),
    ({"type": "string", "enum": [1, "a"]}, '"enum" value 1 is not of "type"', "#"),
    ({"type": "string", "const": 1}, '"const" value 1 is not of "type"', "#"),
    ({"enum": ["a"], "const": "a"}, '"enum" and "const" together', "#"),
    ({"type": "string", "format": "regex"}, '"format": \'regex\' is not enforced', "#"),
    ({"type": "string", "format": "date"}, '"format": "date" is not enforced exactly', "#"),
    ({"type": "string", "format": "date-time"}, '"format": "date-time" is not enforced exactly', "#"),
    ({"type": "string", "format": "hostname"}, '"format": "hostname" is not enforced exactly', "#"),
    ({"type": "string", "format": "ipv4"}, '"format": "ipv4" is not enforced exactly', "#"),
    ({"type": "string", "format": "ipv6"}, '"format": "ipv6" is not enforced exactly', "#"),
    ({"type": "string", "format": "uuid", "maxLength": 5}, '"format" with "maxLength"', "#"),
    ({"type": "string", "format": "uuid", "pattern": "^2"}, '"format" with "pattern"', "#"),
    ({"type": "string", "pattern": "^a+$", "maxLength": 3}, '"pattern" with "maxLength"', "#"),
    ({"type": "string", "pattern": "^a(?=b).*$"}, "(a lookaround or flags)", "#"),
    ({"type": "string", "pattern": "^a(?!b).*$"}, "(a lookaround or flags)", "#"),
    ({"type": "string", "pattern": "^.*(?<=a)b$"}, "(a lookaround or flags)", "#"),
    ({"type": "string", "pattern": "(?i)^ab$"}, "(a lookaround or flags)", "#"),
    ({"type": "string", "pattern": "^(a)\\1$"}, "the escape \\1", "#"),
    ({"type": "string", "pattern": "^(?<x>a)\\k<x>$"}, "the escape \\k", "#"),
    ({"type": "string", "pattern": "^a\\b"}, "the escape \\b", "#"),
    ({"type": "string", "pattern": "\\Aa\\Z"}, "the escape \\A", "#"),
    ({"type": "string", "pattern": "^\\p{L}$"}, "the escape \\p", "#"),
    ({"type": "string", "pattern": "^[\\1]$"}, "the escape \\1", "#"),
    ({"type": "string", "pattern": "^\\W{1,3}$"}, "\\W (the grammar reads \\w, \\d and \\s by ASCII", "#"),
    ({"type": "string", "pattern": "^\\D$"}, "\\D (the grammar reads", "#"),
    ({"type": "string", "pattern": "^\\S+$"}, "\\S (the grammar reads", "#"),
    ({"type": "string", "pattern": "^[^\\d]$"}, "\\d in a negated class", "#"),
    ({"type": "string", "pattern": "^[^a\\w]$"}, "\\w in a negated class", "#"),
    ({"type": "string", "pattern": "a^b"}, "^ after the start", "#"),
    ({"type": "string", "pattern": "x(a|^b)"}, "^ after the start", "#"),
    ({"type": "string", "pattern": "a$b"}, "$ before the end", "#"),
    ({"type": "string", "pattern": "^a*+a$"}, "a quantifier on a quantifier", "#"),
    ({"type": "string", "pattern": "^a{2}{3}$"}, "a quantifier on a quantifier", "#"),
    ({"type": "string", "pattern": "^a+??$"}, "a quantifier on a quantifier", "#"),
    ({"type": "string", "pattern": '^a"$'}, "a quote, a backslash or a control character", "#"),
    ({"type": "string", "pattern": "^\\\\$"}, "a quote, a backslash or a control character", "#"),
    ({"type": "string", "pattern": "^a\\n$"}, "a quote, a backslash or a control character", "#"),
    ({"type": "string", "pattern": "^\\x22$"}, "a quote, a backslash or a control character", "#"),
    ({"type": "object", "properties": {"a": {"type": "integer", "not": {}}}}, '"not"', "#/properties/a"),
    ({"type": "object", "properties": {"a/b": {"type": "integer", "not": {}}}}, '"not"', "#/properties/a~1b"),
    ({"type": "array", "items": {"anyOf": [integer(), {"type": "string", "pattern": "(?=x)"}]}}, "lookaround",
     "#/items/anyOf/1"),
    ({"$defs": {"a": {"type": "string", "uniqueItems": True}}, "$ref": "#/$defs/a"}, '"uniqueItems" needs',
     "#/$defs/a"),
    ({"type": "object", "properties": {"a": {"$id": "x", "type": "integer"}}}, '"$id" below the root',
     "#/properties/a"),
    ({"type": "object", "properties": {"a": False}}, "false: no value fits it", "#/properties/a"),
    ({"$defs": {f"a{i}": record(next={"$ref": f"#/$defs/a{i + 1}"}) for i in range(300)} | {"a300": integer()},
      "$ref": "#/$defs/a0"}, "nests too deeply through its $refs (a chain of more than 512 schemas)", "#"),
    ({"oneOf": [record(k=integer(i, i)) for i in range(65)]}, '"oneOf" of more than 64 schemas', "#"),
    # schemas nothing satisfies
    ({"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}, "refers back to itself (#/$defs/a -> #/$defs/a)",
     "#/$defs/a"),
    ({"$ref": "#/$defs/a", "$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, integer()]}}}, "refers back to itself",
     "#/$defs/a"),
    ({"$ref": "#"}, "refers back to itself", "#"),
    ({"$defs": {"a": record(next={"$ref": "#/$defs/a"})}, "$ref": "#/$defs/a"}, "only an infinitely deep value",
     "#/$defs/a"),
    ({"$defs": {"a": {"type": "array", "items": {"$ref": "#/$defs/a"}, "minItems": 1}}, "$ref": "#/$defs/a"},
     "only an infinitely deep value", "#/$defs/a"),
    ({"enum": []}, '"enum" is empty', "#"),
    ({"type": "number", "minimum": 5, "maximum": 1}, '"minimum" 5 and "maximum" 1 leave no number', "#"),
    ({"type": "number", "exclusiveMinimum": 1, "maximum": 1}, '"exclusiveMinimum" 1 and "maximum" 1', "#"),
    ({"type": "integer", "minimum": 2, "exclusiveMaximum": 2}, '"minimum" 2 and "exclusiveMaximum" 2', "#"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, '"minLength" 5 is over "maxLength" 2', "#"),
    ({"type": "array", "items": integer(), "minItems": 3, "maxItems": 1}, '"minItems" 3 is over "maxItems" 1', "#"),
    ({"type": "object", "properties": {"a": integer()}, "minProperties": 2, "maxProperties": 1},
     '"minProperties" 2 is over "maxProperties" 1', "#"),
    ({"type": "object", "properties": {"a": {"type": "string", "minLength": 3, "maxLength": 1}}},
     '"minLength" 3 is over "maxLength" 1', "#/properties/a"),
]


@pytest.mark.parametrize("schema, names, at", REFUSED, ids=lambda v: None if isinstance(v, dict) else repr(v)[:40])
def test_what_the_grammar_does_not_enforce_is_refused(tiny, schema, names, at):
    with pytest.raises(Olmo2KitError) as error:
        factory(tiny, schema)
    message = str(error.value)
    assert message.startswith(f"response_format.json_schema.schema at {at}: "), message
    assert names in message and "\n" not in message


@pytest.mark.parametrize("schema", [
    {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "https://example.com/a", "title": "A",
     "description": "d", "$comment": "c", "default": {}, "examples": [{}], "deprecated": False, "readOnly": False,
     "writeOnly": False, "type": "object", "properties": {}},
    {"$defs": {"a": integer()}, "allOf": [{"$ref": "#/$defs/a"}], "description": "pydantic v1 wraps a $ref so"},
    {"type": "object", "properties": {"a": integer()}, "additionalProperties": False, "unevaluatedProperties": False},
    {"type": "array", "prefixItems": [integer()], "items": False, "unevaluatedItems": False, "uniqueItems": False},
    {"type": "integer", "multipleOf": 7},
    {"oneOf": [{"const": i, "description": f"choice {i}"} for i in range(1000)]},
    {"$defs": {"node": {"type": "object", "properties": {"name": string(maxLength=3), "kids": {
        "type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}}, "required": ["name"]}},
     "$ref": "#/$defs/node"},
    {"$defs": {f"a{i}": {"type": "object", "properties": {"next": {"$ref": f"#/$defs/a{i + 1}"}}} for i in range(200)}
     | {"a200": integer()}, "$ref": "#/$defs/a0"},
    {"type": "string", "pattern": "^(?:[a-z]|(?P<d>\\d)|(?<u>_)){1,3}\\.\\-\\/[^\"\\\\\\n]*?$"},
    {"type": "object", "properties": {"pet": {"oneOf": [{"$ref": "#/$defs/cat"}, {"$ref": "#/$defs/dog"}],
                                              "discriminator": {"propertyName": "kind"}}}, "required": ["pet"],
     "$defs": {"cat": record(kind={"const": "cat", "type": "string"}), "dog": record(kind={"enum": ["dog"]})}},
])
def test_what_the_grammar_enforces_is_accepted(tiny, schema):
    assert factory(tiny, schema) is not None


SCHEMAS = {  # each, sampled hot, must finish within MAX_NEW_TOKENS: strings, numbers and arrays are bounded
    "serving": SCHEMA,
    "strings": record(short=string(minLength=2, maxLength=5), code=string(pattern="^[A-Z]{2}-\\d{3}$"),
                      words=string(pattern="^[a-z]{1,4}( [a-z]{1,4}){0,2}$"), any=string(maxLength=6),
                      other=string(pattern="^[^a-z\"]{1,3}\\w\\d\\s\\.$")),
    "enums": record(color={"enum": ["red", "green", "blue"]}, size={"type": ["integer", "null"], "enum": [1, 2, None]},
                    fixed={"const": "fixed"}, odd={"enum": [{"a": [1, "é"]}, [True, None], 2.5, "x\"\n"]}),
    "nested": record(outer=record(inner=record(flag={"type": "boolean"}, nothing={"type": "null"}),
                                  label=string(maxLength=4))),
    "arrays": record(tags={"type": "array", "items": string(maxLength=3), "minItems": 1, "maxItems": 3},
                     pair={"type": "array", "prefixItems": [integer(), {"type": "boolean"}], "items": False},
                     empty={"type": "array", "items": integer(), "maxItems": 0}),
    "numbers": record(x={"type": "number", "minimum": -1.5, "maximum": 2.5},
                      n={"type": "integer", "exclusiveMinimum": -3, "exclusiveMaximum": 3},
                      big=integer(-1000, 1000)),
    "optional": {"type": "object", "properties": {"a": integer(), "b": string(maxLength=2), "c": {"type": "boolean"}},
                 "required": ["b"], "minProperties": 2, "maxProperties": 2, "additionalProperties": False},
    "any_of": record(v={"anyOf": [string(maxLength=3), integer(0, 5), {"type": "null"}]},
                     w={"type": ["string", "integer"], "maxLength": 2, "minimum": 0, "maximum": 3}),
    "one_of": record(shape={"oneOf": [record(kind={"const": "circle"}, r=integer(1, 9)),
                                      record(kind={"const": "square"}, side=integer(1, 9))]}),
    "refs": {"$defs": {"point": record(x=integer(), y=integer()), "name": string(maxLength=3)},
             **record(a={"$ref": "#/$defs/point"}, b={"allOf": [{"$ref": "#/$defs/point"}]},
                      c={"$ref": "#/properties/a"}, label={"$ref": "#/$defs/name"})},
    "top_level_array": {"type": "array", "items": integer(0, 3), "minItems": 2, "maxItems": 4},
    "formats": record(id=string(format="uuid"), at=string(format="time")),
}


@pytest.fixture(scope="module")
def scheduler(tiny):
    from olmo2kit.inference.batching import BatchScheduler

    model, tokenizer = tiny
    running = BatchScheduler(model, tokenizer, max_batch_size=len(SEEDS) * len(TEMPERATURES),
                             max_queue=len(SEEDS) * len(TEMPERATURES))
    yield running
    running.close()


@functools.cache
def vocabulary(tokenizer) -> list[bytes]:
    """Each token's bytes, as xgrammar reads the vocabulary."""
    import xgrammar

    return xgrammar.TokenizerInfo.from_huggingface(tokenizer).decoded_vocab


def sample(scheduler, tiny, make) -> list[tuple[list[int], object]]:
    """Every seed at every temperature under constraints from `make`, in one batch: (tokens, last event) each."""
    from olmo2kit.inference.batching import BatchRequest, Failed, Finished, Token

    _, tokenizer = tiny
    prompt = tokenizer.encode("The capital of France is", add_special_tokens=False)
    rows = []
    for seed in SEEDS:
        for temperature in TEMPERATURES:
            tokens, last, done = [], [], threading.Event()

            def emit(event, tokens=tokens, last=last, done=done):
                if isinstance(event, Token):
                    tokens.append(event.id)
                elif isinstance(event, Finished | Failed):
                    last.append(event)
                    done.set()

            scheduler.submit(BatchRequest(prompt, MAX_NEW_TOKENS, temperature=temperature, seed=seed,
                                          constraint=make()), emit)
            rows.append((tokens, last, done))
    for _, _, done in rows:
        assert done.wait(120)
    return [(tokens, last[0]) for tokens, last, _ in rows]


@pytest.mark.parametrize("name", SCHEMAS)
def test_sampled_replies_fit_the_schema(tiny, scheduler, name):
    import jsonschema

    from olmo2kit.inference.batching import Finished

    _, tokenizer = tiny
    schema = SCHEMAS[name]
    vocab = vocabulary(tokenizer)
    for tokens, last in sample(scheduler, tiny, factory(tiny, schema)):
        assert last == Finished("stop"), (last, tokenizer.decode(tokens))
        text = b"".join(vocab[t] for t in tokens[:-1]).decode("utf-8")  # strict: valid UTF-8, every byte
        assert tokenizer.decode(tokens, skip_special_tokens=True) == text
        assert_fits_schema(text, schema)
        if name == "formats":
            jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
