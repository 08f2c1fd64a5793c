"""Fuzzing the server's two POST routes through a real `olmo2kit serve` process: random JSON bodies and random
JSON schemas. Every answer is OpenAI's error object with a 4xx status, or a 200 whose reply fits what was asked
(a `response_format` reply validates against its schema with the `jsonschema` package); never a 500, and
/health answers within a second throughout. OLMO2KIT_FUZZ_EXAMPLES sets the examples (default 30, times 2)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter

import httpx2 as httpx
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving import serving

EXAMPLES = 2 * int(os.environ.get("OLMO2KIT_FUZZ_EXAMPLES", "30"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
OUTCOMES: Counter = Counter()

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.sampled_from([-1, 0, 1, 2, 2**63, 1e30, 0.5]),
                    st.text(max_size=12), st.sampled_from(["", "\x00", "é" * 20, "1b", "tiny"]))
JSON = st.recursive(SCALARS, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=6), c,
                                                                                           max_size=3)), max_leaves=8)
BY_TYPE = {  # per type, the keywords the server's grammar enforces on it, with values that mean something
    "string": {"minLength": st.integers(0, 6), "maxLength": st.integers(0, 6),
               "pattern": st.sampled_from(["^[a-z]+$", "^\\d{2}$", "^(ab|cd)*$"])},
    "integer": {"minimum": st.integers(-5, 5), "maximum": st.integers(-5, 5), "exclusiveMinimum": st.integers(-5, 5),
                "exclusiveMaximum": st.integers(-5, 5)},
    "number": {"minimum": st.integers(-5, 5), "maximum": st.integers(-5, 5)},
    "array": {"minItems": st.integers(0, 3), "maxItems": st.integers(0, 3)},
    "object": {"additionalProperties": st.booleans()},
    "boolean": {}, "null": {},
}
OTHERS = {  # keywords and values the grammar may not enforce, or that no JSON satisfies: to be refused
    "type": st.just([]), "enum": st.just([]), "format": st.sampled_from(["email", "date", "uuid", "ipv4", "nonsense"]),
    "pattern": st.sampled_from(["(?=a)", "(a)\\1", "\\bx"]), "multipleOf": st.sampled_from([2, 3, 0.5]),
    "uniqueItems": st.booleans(), "minProperties": st.integers(0, 2), "maxProperties": st.integers(0, 2),
    "not": st.just({"type": "string"}), "dependentRequired": st.just({"a": ["b"]}),
    "$ref": st.sampled_from(["#", "#/$defs/x", "http://x/s.json"]), "contains": st.just({"type": "integer"}),
    "patternProperties": st.just({"^a": {"type": "integer"}}),
}


@st.composite
def schemas(draw, depth: int = 0):
    """A JSON schema: a type and keywords that apply to it, or an enum, a const, or anyOf; now and then a keyword
    the server must refuse."""
    shape = draw(st.sampled_from(["typed"] * 6 + ["enum", "const"] + (["anyOf"] if depth < 2 else [])))
    if shape == "enum":
        schema: dict = {"enum": draw(st.lists(SCALARS, min_size=1, max_size=3))}
    elif shape == "const":
        schema = {"const": draw(SCALARS)}
    elif shape == "anyOf":
        schema = {"anyOf": draw(st.lists(schemas(depth + 1), min_size=1, max_size=3))}
    else:
        kind = draw(st.sampled_from(list(BY_TYPE) if depth < 2 else ["string", "integer", "boolean", "null"]))
        keys = draw(st.lists(st.sampled_from(sorted(BY_TYPE[kind]) or [""]), max_size=2, unique=True))
        schema = {"type": kind, **{k: draw(BY_TYPE[kind][k]) for k in keys if k}}
        if kind == "object":
            names = draw(st.lists(st.sampled_from(["a", "b", "c"]), max_size=3, unique=True))
            schema["properties"] = {n: draw(schemas(depth + 1)) for n in names}
            schema["required"] = draw(st.lists(st.sampled_from(names), max_size=len(names), unique=True)) \
                if names else []
        elif kind == "array":
            schema["items"] = draw(schemas(depth + 1))
    if draw(st.integers(0, 4)) == 0:
        key = draw(st.sampled_from(sorted(OTHERS)))
        schema[key] = draw(OTHERS[key])
    return schema


VALID = {"temperature": st.sampled_from([0, 0.7, 1.5]), "max_tokens": st.integers(0, 24), "n": st.integers(1, 3),
         "stop": st.sampled_from(["}", ["a", " the"], "\n"]), "seed": st.integers(0, 9), "stream": st.booleans(),
         "top_p": st.sampled_from([0.5, 0.9, 1.0]), "stream_options": st.just({"include_usage": True})}
COMPLETION = {"logprobs": st.integers(0, 5), "echo": st.booleans()}
CHAT = {"logprobs": st.booleans(), "top_logprobs": st.integers(0, 20), "max_completion_tokens": st.integers(1, 24)}
COMMON = {**VALID, "logprobs": st.one_of(st.integers(-1, 21), st.booleans()), "echo": st.booleans(),
          "top_logprobs": st.integers(-1, 21), "nonsense": JSON}


def bodies(model: str, route: str):
    """Bodies of valid values, bodies of any values under the right keys, and anything."""
    text = st.one_of(st.text(min_size=1, max_size=30), st.sampled_from(["Hello", "Answer in JSON.", "日本 ✓"]))
    if route == "completions":
        main = {"prompt": st.one_of(text, st.lists(st.integers(0, 500), min_size=1, max_size=6),
                                    st.lists(text, min_size=1, max_size=2))}
        valid = {**VALID, **COMPLETION}
    else:
        message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer"]), "content": text})
        main = {"messages": st.lists(message, min_size=1, max_size=3).map(lambda m: [*m, {"role": "user",
                                                                                        "content": "Hi"}])}
        valid = {**VALID, **CHAT, "response_format": st.one_of(
            st.builds(lambda s: {"type": "json_schema", "json_schema": {"name": "f", "schema": s}}, schemas()),
            st.just({"type": "json_object"}), st.just({"type": "text"}))}
    anything = {k: st.one_of(v, JSON) for k, v in {**COMMON, **main}.items()}
    return st.one_of(
        st.fixed_dictionaries({"model": st.just(model), **main}, optional=valid),
        st.fixed_dictionaries({"model": st.just(model)}, optional=anything),
        st.dictionaries(st.sampled_from(["model", *main, *COMMON]), JSON, max_size=4),
        JSON,
    )


@pytest.fixture(scope="module")
def model(tiny_instruct_path) -> str:
    return str(tiny_instruct_path)


@pytest.fixture(scope="module")
def server(model):
    with serving("--model", model, "--dtype", "fp32", "--max-queue", "8") as running:
        done = threading.Event()
        slowest: list[float] = [0.0]

        def poll():
            while not done.wait(0.1):
                start = time.perf_counter()
                assert httpx.get(running.root + "/health", timeout=30).status_code == 200
                slowest[0] = max(slowest[0], time.perf_counter() - start)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        yield running
        done.set()
        poller.join()
        assert slowest[0] < 1.0, f"/health took {slowest[0]:.2f} s during the fuzzing"
        assert "Traceback" not in "".join(running.stderr)


def check_answer(response: httpx.Response, body) -> str:
    """The outcome of one request: 'error 4xx' or 'ok'; fails on a 500, a malformed error or a wrong reply."""
    assert response.status_code < 500, (response.status_code, response.text, body)
    if response.status_code != 200:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], response.text
        return f"error {response.status_code}"
    if isinstance(body, dict) and body.get("stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", response.text
        chunks = [json.loads(e) for e in events[:-1]]
        assert all("error" not in c for c in chunks), response.text
        return "ok stream"
    reply = response.json()
    schema = ((body.get("response_format") or {}).get("json_schema") or {}).get("schema")
    kind = (body.get("response_format") or {}).get("type")
    validated = 0
    for choice in reply["choices"]:
        if kind in ("json_schema", "json_object") and choice["finish_reason"] == "stop":
            answer = json.loads(choice["message"]["content"])
            if kind == "json_schema":
                jsonschema.validate(answer, schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
            else:
                assert isinstance(answer, dict)
            validated += 1
    return "ok, reply validated" if validated else "ok"


@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_random_bodies_get_an_error_object_or_a_reply_that_fits(server, model, route):
    @FUZZ
    @given(body=bodies(model, route))
    def run(body):
        response = httpx.post(f"{server.url}/{route}", json=body, timeout=120)
        OUTCOMES[f"{route}: {check_answer(response, body)}"] += 1

    run()


def test_random_schemas_are_refused_or_enforced(server, model):
    @FUZZ
    @given(schema=schemas(), seed=st.integers(0, 2**16))
    def run(schema, seed):
        body = {"model": model, "messages": [{"role": "user", "content": "JSON please"}], "max_tokens": 64,
                "temperature": 1.5, "seed": seed,
                "response_format": {"type": "json_schema", "json_schema": {"name": "f", "schema": schema}}}
        response = httpx.post(f"{server.url}/chat/completions", json=body, timeout=120)
        OUTCOMES[f"schema: {check_answer(response, body)}"] += 1

    run()


def test_zz_the_fuzzing_reached_both_outcomes():
    """The fuzzing tried replies as well as refusals (printed for the record: `pytest -s`)."""
    print(dict(OUTCOMES))
    assert sum(v for k, v in OUTCOMES.items() if "ok" in k) > 0
    assert sum(v for k, v in OUTCOMES.items() if "error" in k) > 0
    assert OUTCOMES["schema: ok, reply validated"] > 0
