"""OpenAI's `response_format` as constrained decoding: a JSON grammar that masks each row's logits.

`constraint_factory` reads the request field and returns None for plain text, or a factory that makes one
`JsonConstraint` per generated row; before each token the row's logits go through `mask`, and the chosen token
through `accept`:

    >>> make = constraint_factory({"type": "json_object"}, tokenizer, vocab_size, {eos_id})  # doctest: +SKIP
    >>> constraint = make()  # doctest: +SKIP
    >>> constraint.mask(logits); token = int(logits.argmax()); constraint.accept(token)  # doctest: +SKIP

Built on xgrammar (https://xgrammar.mlc.ai/docs/api/python/): `TokenizerInfo.from_huggingface` reads the
vocabulary, `GrammarCompiler.compile_json_schema` turns a schema into a `CompiledGrammar`, and each row's
`GrammarMatcher` follows the tokens accepted so far (`accept_token`) and writes the tokens that may come next
into a bitmask (`allocate_token_bitmask`, `fill_next_token_bitmask`). Once the JSON is complete only the
end-of-text tokens may come.

What the grammar allows:
- compact JSON (`any_whitespace=False`: one space after each `:` and `,`, no other whitespace outside strings),
  so that a model cannot spend its tokens on whitespace;
- for `json_schema`, no property or item the schema does not name, whatever its `strict` says (xgrammar's
  `strict_mode`): the output is still valid under the schema, and a model cannot wander into properties nobody
  asked for;
- for `json_object`, any object, through the schema {"type": "object"} (xgrammar's builtin JSON grammar admits a
  top-level array and any whitespace);
- valid UTF-8 only: xgrammar 0.2.8 takes an encoded surrogate (ED A0 80) for one character, which the text layer
  turns into U+FFFD, so each row also follows a UTF-8 automaton over the bytes of its tokens and masks every
  token that would make the bytes invalid (surrogates, overlong forms, bytes F5 to FF, a stray continuation
  byte, a sequence cut short); special tokens and raw control characters are never allowed in the text.

A schema is refused (an Olmo2KitError naming the keyword and where it is, as a JSON pointer such as
`#/properties/name`) unless every keyword at every level is one xgrammar 0.2.8 enforces, tried one by one: xgrammar
compiles many keywords it then ignores, and a reply could break them. Enforced, and so accepted:
- `type` (a name or a non-empty list of names), `enum` and `const` (their values must fit `type`; nothing else
  beside them: the grammar writes the listed values whatever else the schema says);
- strings: `minLength`, `maxLength`, `pattern`, and `format` for the formats the grammar writes in full
  (`_FORMATS`: email, time, duration, uuid, uri, uri-reference, uri-template, json-pointer,
  relative-json-pointer; date, date-time, hostname, ipv4 and ipv6 are refused, since it lets through 2024-02-31,
  labels over 63 characters and 1.2.3.04). `pattern` or `format` with a length, or with each other, is refused
  (the grammar drops one), and so is a pattern with what the grammar ignores or reads otherwise: lookahead and
  lookbehind, back-references, `\\b`, flags such as `(?i)`, a quantifier on a quantifier (`a*+`, `a{2}{3}`),
  `^` or `$` anywhere but at either end, escapes other than `\\d \\w \\s \\n \\r \\t \\f \\v \\xHH \\uHHHH` and
  escaped punctuation, `\\D \\W \\S` and `\\d \\w \\s` in a negated class (the grammar reads them by ASCII, so it
  writes é for `\\W` and U+00A0 for `\\S`, which Unicode-aware validators such as Python's refuse), and a quote,
  backslash or control character outside a class (written unescaped, it would break the JSON, or could never
  be written);
- numbers: `minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum`; `multipleOf` only for integers, by a
  whole number, without bounds (elsewhere the grammar ignores it);
- objects: `properties`, `required` (only names `properties` defines: the grammar writes no other property),
  `additionalProperties`, `minProperties` (only with `additionalProperties` false: with any other, a key may
  repeat and the parsed object hold fewer), `maxProperties`, `unevaluatedProperties: false`;
- arrays: `items`, `prefixItems`, `minItems`, `maxItems`, `unevaluatedItems: false`, `uniqueItems: false`;
- `anyOf`; `oneOf` whose schemas are disjoint (by type, by their values, or by a required property with
  different values in each), since the grammar enforces an overlapping `oneOf` as `anyOf`; `allOf` of one schema
  (the grammar does not enforce several); `$ref` to `#` or `#/...` in the same document (a remote or `#anchor`
  reference is not followed); each of these with nothing beside it but annotations and `$defs`, since the
  grammar ignores the rest;
- a keyword for one kind of value (`maxLength`, `minimum`, `properties`, `items`, ...) only where `type` names
  that kind beside it: without it the grammar ignores some of them;
- annotations, which constrain nothing: title, description, $comment, $schema, $id (at the root), default,
  examples, deprecated, readOnly, writeOnly, discriminator; `$defs` and `definitions`.
Everything else is refused: `not`, `if`/`then`/`else`, `dependentRequired`, `dependentSchemas`,
`dependencies`, `patternProperties`, `propertyNames`, `contains`, `minContains`, `maxContains`, `uniqueItems:
true`, `unevaluated*` other than false, `$anchor`, `$dynamicRef`, `additionalItems`, `content*`, and any unknown
keyword.

A schema nothing can satisfy is refused too: `enum: []`, an empty `anyOf`, bounds that leave nothing (`minimum`
over `maximum`, `minLength` over `maxLength`, ...), a `$ref` cycle through no object or array, recursion that
only an infinitely deep value would fit, and, after compiling, a grammar that allows no first token. A schema
nested deeper than MAX_SCHEMA_DEPTH is refused before anything reads it, and one nested deeper than
MAX_SCHEMA_CHAIN through its $refs before xgrammar reads it (a chain of some thousands overflows its stack and
kills the process); a `oneOf` of more than MAX_ONE_OF schemas that do not all list their values is refused too,
since telling them apart takes every pair. Should a grammar still reach a dead end while decoding (a pattern
nothing matches, say), `mask` raises an Olmo2KitError rather than leave every logit at -inf; it does too when
the grammar takes over MAX_MASK_SECONDS to find one token's successors, as some patterns come to (their parse
grows at each token), since the whole batch waits on it.
"""

from __future__ import annotations

import functools
import json
import re
import reprlib
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, NoReturn

from olmo2kit.errors import Olmo2KitError

if TYPE_CHECKING:
    import numpy
    import torch

RESPONSE_FORMATS = ("text", "json_object", "json_schema")
GRAMMAR_CACHE_SIZE = 64  # compiled grammars kept per tokenizer; the least recently used goes first
MAX_SCHEMA_DEPTH = 64  # objects and arrays nested in a schema document, as vLLM allows: compiling grows steeply
MAX_SCHEMA_CHAIN = 512  # schemas nested through $refs; xgrammar's stack overflows past some 3,000 (see check_chains)
MAX_ONE_OF = 64  # the schemas of a "oneOf" checked pair by pair (a "oneOf" of listed values, any number)
# The longest one row's grammar may take to find its next tokens (usually well under a millisecond): a pattern
# that nests optional repeats (^(?:(-*|(\w?|[^a-c]|é*){2})*?)*$) takes longer at each token, 7 s by the 60th.
MAX_MASK_SECONDS = 1.0
_ANY_OBJECT = '{"type":"object"}'
_EXAMPLE = '{"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object", ...}}}'
_WHERE = "response_format.json_schema.schema"
# xgrammar's messages start with where in its C++ source they were raised: "[05:24:09] /project/cpp/x.cc:5082: ".
_XGRAMMAR_PREFIX = re.compile(r"^\[[^\]]*\] \S+:\d+: ")
_CONTROL_CHARACTER = re.compile(rb"[\x00-\x1f]")

_lock = threading.Lock()  # guards _compilers; never held while compiling
_compilers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> _Once of its _Compilers


def constraint_factory(
    response_format: dict, tokenizer, vocab_size: int, eos_ids: set[int]
) -> Callable[[], JsonConstraint] | None:
    """None for `{"type": "text"}`; for `{"type": "json_object"}` or `{"type": "json_schema", "json_schema":
    {"name": ..., "schema": {...}}}`, a function that makes a fresh `JsonConstraint` for each generated row.

    `vocab_size` is the model's (the length of its logits, which may exceed the tokenizer's); `eos_ids` are the
    tokens that end the text, the only ones allowed once the JSON is complete. Anything else in `response_format`,
    a schema the grammar would not enforce or nothing could satisfy among it, is an Olmo2KitError. Compiled
    grammars are cached per tokenizer; compiling one schema does not hold up requests for another.
    """
    kind, schema, text = _read_response_format(response_format)
    if kind == "text":
        return None
    with _lock:
        compilers = _compilers.get(tokenizer)  # not setdefault: that would build a _Once for every request
        if compilers is None:
            compilers = _compilers[tokenizer] = _Once()
    key = (vocab_size, tuple(sorted(eos_ids)))
    compiler = compilers.get(key, lambda: _Compiler(tokenizer, vocab_size, eos_ids))
    grammar = compiler.grammar(text, schema, strict=kind == "json_schema")
    return functools.partial(JsonConstraint, grammar, compiler.tokens)


class JsonConstraint:
    """One row's JSON grammar: which tokens may come next, given the tokens accepted so far.

    Call `mask` on the row's logits, choose a token from them, then `accept` it; once more for every token.
    """

    def __init__(self, grammar, tokens: _TokenTables) -> None:
        import xgrammar

        self._matcher = xgrammar.GrammarMatcher(grammar)
        self._bitmask = xgrammar.allocate_token_bitmask(1, tokens.vocab_size)
        self._tokens = tokens
        self._utf8 = 0  # the UTF-8 automaton's state after the bytes accepted so far
        self._accepted = 0

    def mask(self, logits: torch.Tensor) -> None:
        """Set to -inf, in place, the logits (one row, [vocab_size], float32) of the tokens that may not come
        next; once the JSON is complete, of every token but the end-of-text ones. An Olmo2KitError, before any
        logit is changed, when no token may come (a schema that cannot be completed) or when finding them took
        over MAX_MASK_SECONDS."""
        start = time.perf_counter()
        allowed = self._tokens.allowed(self._matcher, self._bitmask, self._utf8)
        took = time.perf_counter() - start
        if took > MAX_MASK_SECONDS:  # every row of the batch waits on this one: end it before it gets slower
            raise Olmo2KitError(f"the response_format schema takes too long to follow ({took:.1f} s for token "
                                f"{self._accepted + 1}): simplify its patterns (nested repeats of optional parts)")
        if not allowed.any():
            raise Olmo2KitError(f"the response_format schema allows no next token after the {self._accepted} "
                                "tokens written so far: no reply can complete it; check its patterns and $refs")
        logits.masked_fill_(~allowed.to(logits.device), float("-inf"))

    def accept(self, token: int) -> None:
        """Advance past `token`, chosen from logits `mask` left finite; any other token is a bug."""
        state = int(self._tokens.utf8_next[self._utf8, token])
        if state == _UTF8_REJECT or not self._matcher.accept_token(token):
            raise AssertionError(f"token {token} is outside the grammar: it was not chosen from masked logits")
        self._utf8 = state
        self._accepted += 1


class _Once:
    """Values made once per key and kept (the `size` most recently used, when given): the first caller of a key
    makes its value while later callers of that key wait for it, and callers of other keys wait for nothing (the
    lock is held only to look up and to store, never while making). A failure is not kept: the next caller tries
    again."""

    def __init__(self, size: int | None = None) -> None:
        self._size = size
        self._values: OrderedDict = OrderedDict()
        self._making: dict[object, Future] = {}
        self._lock = threading.Lock()

    def get(self, key, make: Callable[[], object]):
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
            future = self._making.get(key)
            mine = future is None
            if mine:
                future = self._making[key] = Future()
        if not mine:
            try:
                return future.result()
            except Olmo2KitError as e:  # a fresh exception: one instance raised in several threads shares a traceback
                raise Olmo2KitError(str(e)) from None
        try:
            value = make()
        except BaseException as e:
            with self._lock:
                del self._making[key]
            future.set_exception(e)
            raise
        with self._lock:
            self._values[key] = value
            if self._size is not None and len(self._values) > self._size:
                self._values.popitem(last=False)
            del self._making[key]
        future.set_result(value)
        return value


class _Compiler:
    """xgrammar's compiler over one tokenizer's vocabulary, the tables every row's mask reads, and the grammars it
    compiled last."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: set[int]) -> None:
        import xgrammar

        info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(eos_ids)
        )
        self._compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)  # its cache has no bound; _grammars has
        self._grammars = _Once(GRAMMAR_CACHE_SIZE)
        self.tokens = _TokenTables(tokenizer, info.decoded_vocab, vocab_size, eos_ids)

    def grammar(self, text: str, schema: dict, strict: bool):
        """The compiled grammar of `schema` (`text` is its JSON, the cache key), from the cache when it is there."""
        return self._grammars.get((text, strict), lambda: self._compile(text, schema, strict))

    def _compile(self, text: str, schema: dict, strict: bool):
        import xgrammar

        _SchemaCheck(schema).run()
        try:
            compiled = self._compiler.compile_json_schema(text, any_whitespace=False, strict_mode=strict)
        except RuntimeError as e:  # how xgrammar reports a schema it cannot read or does not support
            message = _XGRAMMAR_PREFIX.sub("", str(e).strip()).splitlines()[0]
            raise Olmo2KitError(f"{_WHERE} cannot be used: {message}") from None
        matcher = xgrammar.GrammarMatcher(compiled)
        if not self.tokens.allowed(matcher, xgrammar.allocate_token_bitmask(1, self.tokens.vocab_size), 0).any():
            raise Olmo2KitError(f"{_WHERE} cannot be used: it allows no first token, so no reply fits it")
        return compiled


class _TokenTables:
    """What a row's mask needs besides its grammar, made once per vocabulary:
    - `utf8_allowed[state, token]`: the tokens that may come in each state of the UTF-8 automaton (`_UTF8_LEADS`),
      less those never allowed in a reply: special tokens such as <|pad|> (xgrammar reads them as their text,
      which a JSON string may hold, but the text layer drops them, so one chosen would vanish from the string and
      its minLength) and tokens with a raw control character (U+0000 to U+001F: JSON strings must escape them,
      yet xgrammar lets a string with a minLength or maxLength hold them raw, which json.loads rejects);
      end-of-text tokens come only in the automaton's start state;
    - `utf8_next[state, token]`: the automaton's state after the token's bytes.
    """

    def __init__(self, tokenizer, vocabulary: list[bytes], vocab_size: int, eos_ids: set[int]) -> None:
        import torch

        self.vocab_size = vocab_size
        vocabulary = list(vocabulary[:vocab_size]) + [b""] * max(0, vocab_size - len(vocabulary))
        after = _utf8_states(vocabulary)
        special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
        never = [i for i, text in enumerate(vocabulary)
                 if i in special or i in eos_ids or _CONTROL_CHARACTER.search(text)]
        after[:, never] = _UTF8_REJECT
        after[0, [i for i in eos_ids if i < vocab_size]] = 0  # the text may end between characters only
        self.utf8_next = after
        self.utf8_allowed = torch.from_numpy(after != _UTF8_REJECT)
        self._bits = torch.arange(32, dtype=torch.int32)

    def allowed(self, matcher, bitmask: torch.Tensor, state: int) -> torch.Tensor:
        """The tokens (bool, [vocab_size]) that `matcher`'s grammar allows next and the UTF-8 automaton allows
        in `state`; `bitmask` is scratch space for the grammar's."""
        matcher.fill_next_token_bitmask(bitmask)
        bits = (bitmask[0, :, None] >> self._bits) & 1  # bit j of word i is token 32 i + j
        return bits.flatten()[: self.vocab_size].bool() & self.utf8_allowed[state]


# The UTF-8 automaton (RFC 3629, section 4): state 0 is between characters; the others say which bytes may
# continue the character begun. A token is allowed in a state when its bytes lead to a state other than REJECT.
_UTF8_REJECT = 8
_UTF8_LEADS = (  # from state 0: (first byte, last byte, next state)
    (0x00, 0x7F, 0), (0xC2, 0xDF, 1), (0xE0, 0xE0, 4), (0xE1, 0xEC, 2), (0xED, 0xED, 5), (0xEE, 0xEF, 2),
    (0xF0, 0xF0, 6), (0xF1, 0xF3, 3), (0xF4, 0xF4, 7),
)
_UTF8_CONTINUATIONS = (  # (state, first byte, last byte, next state)
    (1, 0x80, 0xBF, 0), (2, 0x80, 0xBF, 1), (3, 0x80, 0xBF, 2),
    (4, 0xA0, 0xBF, 1),  # E0: no overlong three-byte form
    (5, 0x80, 0x9F, 1),  # ED: no surrogate (U+D800 to U+DFFF)
    (6, 0x90, 0xBF, 2),  # F0: no overlong four-byte form
    (7, 0x80, 0x8F, 2),  # F4: nothing past U+10FFFF
)


@functools.cache
def _utf8_table() -> numpy.ndarray:
    """[state, byte] -> next state, REJECT included (it never leaves)."""
    import numpy

    table = numpy.full((_UTF8_REJECT + 1, 256), _UTF8_REJECT, dtype=numpy.int8)
    for first, last, state in _UTF8_LEADS:
        table[0, first: last + 1] = state
    for state, first, last, following in _UTF8_CONTINUATIONS:
        table[state, first: last + 1] = following
    return table


def _utf8_states(vocabulary: list[bytes]) -> numpy.ndarray:
    """[state, token] -> the automaton's state after the token's bytes from that state (int8, REJECT included).

    Vectorised over the vocabulary: tokens sorted longest first, byte j of the first k of them (those longer
    than j) steps every state at once, so the work is the vocabulary's bytes times the states."""
    import numpy

    table = _utf8_table()
    lengths = numpy.fromiter(map(len, vocabulary), dtype=numpy.int64, count=len(vocabulary))
    order = numpy.argsort(-lengths, kind="stable")
    data = numpy.frombuffer(b"".join(vocabulary), dtype=numpy.uint8)
    starts = (numpy.cumsum(lengths) - lengths)[order]
    longer = numpy.searchsorted(-lengths[order], -numpy.arange(lengths.max(initial=0)), side="left")
    states = numpy.repeat(numpy.arange(_UTF8_REJECT, dtype=numpy.int8)[:, None], len(vocabulary), axis=1)
    for j, k in enumerate(longer):
        states[:, :k] = table[states[:, :k], data[starts[:k] + j]]
    after = numpy.empty_like(states)
    after[:, order] = states
    return after


# --- which schemas the grammar enforces (see the module docstring) ------------------------------------------

_ANNOTATIONS = frozenset({"title", "description", "$comment", "$schema", "default", "examples", "deprecated",
                          "readOnly", "writeOnly", "discriminator"})
_DEFINITIONS = ("$defs", "definitions")
_COMBINATIONS = ("$ref", "anyOf", "oneOf", "allOf")
_TYPES = ("string", "number", "integer", "boolean", "null", "object", "array")
_KEYWORDS_OF = {  # the keywords for one kind of value: enforced only where "type" names the kind beside them
    "string": ("minLength", "maxLength", "pattern", "format"),
    "number": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"),
    "object": ("properties", "required", "additionalProperties", "unevaluatedProperties", "minProperties",
               "maxProperties"),
    "array": ("items", "prefixItems", "unevaluatedItems", "minItems", "maxItems", "uniqueItems"),
}
_KIND = {keyword: kind for kind, keywords in _KEYWORDS_OF.items() for keyword in keywords}
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_FORMATS = ("email", "time", "duration", "uuid", "uri", "uri-reference", "uri-template", "json-pointer",
            "relative-json-pointer")  # those xgrammar writes in full
_LOOSE_FORMATS = {  # those it writes by a looser syntax, and a value of each it lets through
    "date": "2024-02-31", "date-time": "2024-02-31T00:00:00Z", "hostname": "a label of 64 letters",
    "ipv4": "1.2.3.04", "ipv6": "::ffff:1.2.3.04",
}
_NAMED_GROUP = re.compile(r"\(\?P?<[A-Za-z_]")
_ESCAPES = frozenset("dwsnrtfv")  # the letters xgrammar reads after a backslash as a regex means them


def _refuse(at: str, problem: str) -> NoReturn:
    raise Olmo2KitError(f"{_WHERE} at {at}: {problem}")


def _pointer(at: str, *names) -> str:
    """The JSON pointer `at` followed by `names`, escaped as RFC 6901 says."""
    return "/".join([at, *(str(n).replace("~", "~0").replace("/", "~1") for n in names)])


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _kinds(value) -> set[str]:
    """The types a JSON value has ("integer" and "number" both for 2 and 2.0)."""
    if value is None:
        return {"null"}
    if isinstance(value, bool):
        return {"boolean"}
    if _is_number(value):
        return {"integer", "number"} if float(value).is_integer() else {"number"}
    return {str: {"string"}, list: {"array"}, dict: {"object"}}[type(value)]


def _canonical(value) -> str:
    """The JSON text of `value` that JSON Schema's equality compares: keys sorted, 2.0 written as 2."""
    def normal(v):
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, list):
            return [normal(x) for x in v]
        return {k: normal(x) for k, x in v.items()} if isinstance(v, dict) else v

    return json.dumps(normal(value), sort_keys=True)


def _schema_depth_exceeds(schema, limit: int) -> bool:
    """Whether objects and arrays nest in `schema` deeper than `limit` (breadth first: no recursion)."""
    level = [schema]
    for _ in range(limit):
        level = [child for node in level for child in (node.values() if isinstance(node, dict) else node)
                 if isinstance(child, dict | list)]
        if not level:
            return False
    return True


def _pattern_problem(pattern: str) -> str | None:
    """What in `pattern` xgrammar ignores or reads otherwise than a regex means it, or None when nothing is.
    xgrammar always matches a whole string, which fits JSON Schema's search anywhere; it writes a character the
    pattern names outside a class as it is, unescaped, so a quote or backslash would break the JSON and a control
    character could never be written (inside a class it leaves them out)."""
    i, n, in_class, negated, quantified = 0, len(pattern), False, False, ""  # quantified: "", "greedy", "lazy"
    while i < n:
        c, step, literal = pattern[i], 1, pattern[i]
        if c == "\\":
            e = pattern[i + 1: i + 2]
            if e == "x" and re.fullmatch(r"[0-9A-Fa-f]{2}", pattern[i + 2: i + 4]):
                step, literal = 4, chr(int(pattern[i + 2: i + 4], 16))
            elif e == "u" and re.fullmatch(r"[0-9A-Fa-f]{4}", pattern[i + 2: i + 6]):
                step, literal = 6, chr(int(pattern[i + 2: i + 6], 16))
            elif e and (e in "WDS" or (e in "wds" and in_class and negated)):
                return f"\\{e}{' in a negated class' * (e in 'wds')} (the grammar reads \\w, \\d and \\s by ASCII, " \
                       "Unicode-aware validators do not)"
            elif e and e in _ESCAPES:
                step, literal = 2, "\n" if e in "nrtfv" else None
            elif e and e.isascii() and not e.isalnum():
                step, literal = 2, e
            else:
                return f"the escape \\{e}" if e else "a backslash at the end"
        if literal is not None and not in_class and (literal in '"\\' or literal < " "):
            return "a quote, a backslash or a control character outside a class (the grammar writes it unescaped)"
        if in_class:  # (c is "\\" for an escape, which none of these take for a class, group, anchor or quantifier)
            in_class = c != "]"
        elif c == "[":
            in_class, negated = True, pattern[i + 1: i + 2] == "^"
        elif c == "(" and pattern.startswith("(?", i) and not (
                pattern.startswith("(?:", i) or _NAMED_GROUP.match(pattern, i)):
            return f"the group {pattern[i: i + 4]}... (a lookaround or flags)"
        elif c == "^" and i > 0:
            return "^ after the start"
        elif c == "$" and i < n - 1:
            return "$ before the end"
        elif c in "*+?{" and quantified and not (c == "?" and quantified == "greedy"):  # a lazy "?" may follow
            return "a quantifier on a quantifier (possessive, or repeated)"
        if c == "?" and quantified == "greedy":
            quantified = "lazy"
        else:
            quantified = "greedy" if not in_class and c in "*+?}" else ""
        i += step
    return None


class _SchemaCheck:
    """The walk that refuses a schema the grammar would not enforce or nothing could satisfy: `run()`."""

    def __init__(self, root: dict) -> None:
        self.root = root
        self.nodes: dict[str, dict | bool] = {}  # JSON pointer -> every schema in the document, in walk order
        self.children: dict[str, list[str]] = {}  # JSON pointer -> the schemas written inside that one
        self.one_of: list[str] = []  # the schemas with a "oneOf" of several

    def run(self) -> None:
        self.visit(self.root, "#")
        self.check_references()
        self.check_chains()
        self.check_cycles()
        for at in self.one_of:
            self.check_disjoint(at)
        self.check_finite()

    def visit_child(self, at: str, schema, *names) -> None:
        child = _pointer(at, *names)
        self.children.setdefault(at, []).append(child)
        self.visit(schema, child)

    def visit(self, node, at: str) -> None:
        if node is True:
            self.nodes[at] = node
            return
        if not isinstance(node, dict):
            _refuse(at, "false: no value fits it" if node is False else "a schema must be an object or true")
        self.nodes[at] = node
        if "type" in node and not _is_type(node["type"]):
            _refuse(at, f'"type" must be one of {", ".join(_TYPES)}, or a non-empty list of them without repeats')
        self.check_siblings(node, at)
        for key, value in node.items():
            if key in _ANNOTATIONS:
                continue
            if key == "$id":
                if at != "#":
                    _refuse(at, '"$id" below the root would change what "$ref" means: remove it')
            elif key in _DEFINITIONS:
                if not isinstance(value, dict):
                    _refuse(at, f'"{key}" must be an object of schemas')
                for name, schema in value.items():
                    self.visit_child(at, schema, key, name)
            elif key in _COMBINATIONS:
                self.combination(key, value, at)
            elif key in ("enum", "const"):
                self.values(node, key, value, at)
            elif key == "type":
                continue  # checked above: the other keywords read it
            elif key in _KIND:
                self.typed(node, key, value, at)
            else:
                _refuse(at, f'"{key}" is not enforced by the grammar, so a reply could break it: remove it')
        self.check_bounds(node, at)

    @staticmethod
    def check_siblings(node: dict, at: str) -> None:
        """A combination or a list of values takes nothing beside it but annotations (and "type" beside values):
        the grammar would ignore it."""
        combinations = [k for k in _COMBINATIONS if k in node]
        values = [k for k in ("enum", "const") if k in node]
        rest = [k for k in node if k not in _ANNOTATIONS and k not in _DEFINITIONS and k != "$id"]
        if len(combinations + values) > 1:
            first, second = (combinations + values)[:2]
            _refuse(at, f'"{first}" and "{second}" together are not enforced by the grammar: nest one inside '
                        f'the other')
        if combinations and len(rest) > 1:
            other = next(k for k in rest if k != combinations[0])
            _refuse(at, f'"{other}" beside "{combinations[0]}" is ignored by the grammar: move it into the '
                        f'schema{"" if combinations[0] == "$ref" else "s"} of "{combinations[0]}"')
        if values and len(rest) > 1 + ("type" in node):
            other = next(k for k in rest if k not in (values[0], "type"))
            _refuse(at, f'"{other}" beside "{values[0]}" is ignored by the grammar (it writes only the values '
                        f'listed): remove it, or the values it excludes')

    def combination(self, key: str, value, at: str) -> None:
        if key == "$ref":
            if not isinstance(value, str) or not (value == "#" or value.startswith("#/")):
                _refuse(at, f'"$ref" {reprlib.repr(value)} is not a reference within this schema ("#" or '
                            f'"#/..."), the only ones the grammar follows: put the schema under "$defs"')
            if "~" in value or "%" in value:
                _refuse(at, f'"$ref" {reprlib.repr(value)} has an escape, which the grammar does not read: '
                            f"rename what it points at")
            return
        if not isinstance(value, list) or not value:
            _refuse(at, f'"{key}" must be a non-empty list of schemas')
        if key == "allOf" and len(value) > 1:
            _refuse(at, '"allOf" of several schemas is not enforced by the grammar: merge them into one schema')
        for i, schema in enumerate(value):
            self.visit_child(at, schema, key, i)
        if key == "oneOf" and len(value) > 1:
            self.one_of.append(at)

    @staticmethod
    def values(node: dict, key: str, value, at: str) -> None:
        if key == "enum" and not isinstance(value, list):
            _refuse(at, '"enum" must be a list of values')
        if key == "enum" and not value:
            _refuse(at, '"enum" is empty: no value fits it')
        types = _types_of(node)
        for v in [value] if key == "const" else value:
            if types and not types & _kinds(v):
                _refuse(at, f'"{key}" value {reprlib.repr(v)} is not of "type" {node["type"]!r}, yet the grammar '
                            "would write it: remove it")

    def typed(self, node: dict, key: str, value, at: str) -> None:
        """A keyword for one kind of value: `type` must name the kind, and the value must be one the grammar
        enforces."""
        kind = _KIND[key]
        wanted = {"number", "integer"} if kind == "number" else {kind}
        if not _types_of(node) & wanted:
            _refuse(at, f'"{key}" needs "type": "{kind}" beside it: the grammar enforces it only there')
        if key in _COUNTS and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            _refuse(at, f'"{key}" must be a whole number, 0 or more')
        if key in _BOUNDS and not _is_number(value):
            _refuse(at, f'"{key}" must be a number')
        if key in ("pattern", "format"):
            self.string_shape(node, key, value, at)
        elif key == "multipleOf" and not (
                isinstance(value, int) and not isinstance(value, bool) and value > 0
                and "number" not in _types_of(node) and not any(k in node for k in _BOUNDS)):
            _refuse(at, '"multipleOf" is enforced by the grammar only for "type": "integer", by a whole number, '
                        "without a minimum or maximum beside it: remove it")
        elif key in ("unevaluatedProperties", "unevaluatedItems", "uniqueItems") and value is not False:
            _refuse(at, f'"{key}" is enforced by the grammar only as false: remove it')
        elif key == "minProperties" and node.get("additionalProperties", False) is not False:
            _refuse(at, '"minProperties" is not enforced where "additionalProperties" is not false (a key may '
                        'repeat, and the parsed object hold fewer): set "additionalProperties": false')
        elif key in ("properties", "prefixItems", "items", "additionalProperties"):
            self.subschemas(key, value, at)
        elif key == "required":
            self.required(node, value, at)

    @staticmethod
    def string_shape(node: dict, key: str, value, at: str) -> None:
        if not isinstance(value, str):
            _refuse(at, f'"{key}" must be a string')
        length = next((k for k in ("minLength", "maxLength") if k in node), None)
        if length:
            _refuse(at, f'"{key}" with "{length}" is not enforced by the grammar (it drops the length): '
                        + ("write the length into the pattern, as {1,8}" if key == "pattern" else "keep one of them"))
        if key == "format" and "pattern" in node:
            _refuse(at, '"format" with "pattern" is not enforced by the grammar (it drops the pattern): keep one')
        if key == "format" and value in _LOOSE_FORMATS:
            _refuse(at, f'"format": "{value}" is not enforced exactly by the grammar (it lets {_LOOSE_FORMATS[value]} '
                        'through): use a "pattern"')
        if key == "format" and value not in _FORMATS:
            _refuse(at, f'"format": {reprlib.repr(value)} is not enforced by the grammar (it knows '
                        f'{", ".join(_FORMATS)}): use a "pattern"')
        problem = _pattern_problem(value) if key == "pattern" else None
        if problem:
            _refuse(at, f'"pattern" {reprlib.repr(value)} uses {problem}, which the grammar does not enforce: '
                        "write it without")

    def subschemas(self, key: str, value, at: str) -> None:
        if key == "properties":
            if not isinstance(value, dict):
                _refuse(at, '"properties" must be an object of schemas')
            for name, schema in value.items():
                self.visit_child(at, schema, key, name)
        elif key == "prefixItems":
            if not isinstance(value, list):
                _refuse(at, '"prefixItems" must be a list of schemas')
            for i, schema in enumerate(value):
                self.visit_child(at, schema, key, i)
        elif not isinstance(value, bool):  # items or additionalProperties: false forbids, true allows anything
            if not isinstance(value, dict):
                _refuse(at, f'"{key}" must be a schema' + (' (a list of schemas is "prefixItems")' * (key == "items")))
            self.visit_child(at, value, key)

    @staticmethod
    def required(node: dict, value, at: str) -> None:
        if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
            _refuse(at, '"required" must be a list of property names')
        properties = node.get("properties") if isinstance(node.get("properties"), dict) else {}
        missing = [name for name in value if name not in properties]
        if missing:
            _refuse(at, f'"required" names {reprlib.repr(missing[0])}, which "properties" does not define, and '
                        "the grammar writes no other property: define it in \"properties\"")

    @staticmethod
    def check_bounds(node: dict, at: str) -> None:
        """Bounds that leave no value."""
        for low, high in (("minLength", "maxLength"), ("minItems", "maxItems"), ("minProperties", "maxProperties")):
            if low in node and high in node and node[low] > node[high]:
                _refuse(at, f'"{low}" {node[low]} is over "{high}" {node[high]}: no value fits')
        lows = [(node[k], k) for k in ("minimum", "exclusiveMinimum") if k in node]
        highs = [(node[k], k) for k in ("maximum", "exclusiveMaximum") if k in node]
        for low, low_key in lows:
            for high, high_key in highs:
                if low > high or (low == high and "exclusive" in low_key + high_key):
                    _refuse(at, f'"{low_key}" {low} and "{high_key}" {high} leave no number')

    def check_references(self) -> None:
        for at, node in self.nodes.items():
            if isinstance(node, dict) and "$ref" in node and node["$ref"] not in self.nodes:
                _refuse(at, f'"$ref" {reprlib.repr(node["$ref"])} points at no schema of this document')

    def check_chains(self) -> None:
        """Schemas nested through $refs past MAX_SCHEMA_CHAIN: xgrammar converts a schema by recursion, each
        $ref target once, and a chain of some thousands of them overflows its stack (the process dies). No
        recursion of its can nest deeper than the longest path of schemas, a cycle counted whole: found over the
        strongly connected components (Tarjan's, which finishes a component after those it leads to)."""
        graph = {at: self.children.get(at, []) + ([node["$ref"]] if isinstance(node, dict) and "$ref" in node else [])
                 for at, node in self.nodes.items()}
        order: dict[str, int] = {}
        low: dict[str, int] = {}
        component: dict[str, int] = {}
        longest: list[int] = []  # component -> the most schemas on a path from it
        stack: list[str] = []
        for root in graph:
            if root in order:
                continue
            order[root] = low[root] = len(order)
            stack.append(root)
            walk = [(root, iter(graph[root]))]
            while walk:
                at, children = walk[-1]
                child = next(children, None)
                if child is not None:
                    if child not in order:
                        order[child] = low[child] = len(order)
                        stack.append(child)
                        walk.append((child, iter(graph[child])))
                    elif child not in component:  # on the stack: in the component being found
                        low[at] = min(low[at], order[child])
                    continue
                walk.pop()
                if walk:
                    low[walk[-1][0]] = min(low[walk[-1][0]], low[at])
                if low[at] == order[at]:
                    members = []
                    while not members or members[-1] != at:
                        members.append(stack.pop())
                        component[members[-1]] = len(longest)
                    after = [longest[component[c]] for m in members for c in graph[m] if component.get(c) is not None
                             and component[c] != len(longest)]
                    longest.append(len(members) + max(after, default=0))
        if max(longest) > MAX_SCHEMA_CHAIN:
            _refuse("#", f"it nests too deeply through its $refs (a chain of more than {MAX_SCHEMA_CHAIN} "
                         "schemas): flatten it")

    def same_place(self, at: str) -> list[str]:
        """The schemas that describe the same value as the one at `at`: what its $ref, anyOf, oneOf, allOf name."""
        node = self.nodes[at]
        if node is True:
            return []
        if "$ref" in node:
            return [node["$ref"]]
        key = next((k for k in ("anyOf", "oneOf", "allOf") if k in node), None)
        return [_pointer(at, key, i) for i in range(len(node[key]))] if key else []

    def check_cycles(self) -> None:
        """A $ref cycle through no object or array: the grammar finds no value for it, and validators recurse."""
        state: dict[str, bool] = {}  # True while on the path of the walk, False once done
        for start in self.nodes:
            if start in state:
                continue
            path, stack = [start], [iter(self.same_place(start))]
            state[start] = True
            while stack:
                child = next(stack[-1], None)
                if child is None:
                    stack.pop()
                    state[path.pop()] = False
                elif state.get(child):
                    cycle = " -> ".join(path[path.index(child):] + [child])
                    _refuse(child, f"it refers back to itself ({cycle}) through no object or array, so no value "
                                   "fits it: break the cycle")
                elif child not in state:
                    state[child] = True
                    path.append(child)
                    stack.append(iter(self.same_place(child)))

    def where(self, at: str) -> str:
        """The pointer of the schema at `at` once its $refs and one-schema allOfs are followed (no cycle is left)."""
        node = self.nodes[at]
        while isinstance(node, dict) and ("$ref" in node or "allOf" in node):
            at = node["$ref"] if "$ref" in node else _pointer(at, "allOf", 0)
            node = self.nodes[at]
        return at

    def resolved(self, at: str) -> dict | bool:
        return self.nodes[self.where(at)]

    def types_at(self, at: str) -> set[str] | None:
        """The types every value the schema at `at` admits has ("number" for "integer" too), None for any."""
        node = self.resolved(at)
        if node is True:
            return None
        if "type" in node:
            found = _types_of(node)
        elif "const" in node or "enum" in node:
            found = set().union(*map(_kinds, [node["const"]] if "const" in node else node["enum"]))
        elif "anyOf" in node or "oneOf" in node:
            key = "anyOf" if "anyOf" in node else "oneOf"
            branches = [self.types_at(_pointer(at, key, i)) for i in range(len(node[key]))]
            found = None if None in branches else set().union(*branches)
        else:
            return None
        return found | {"number"} if found is not None and "integer" in found else found

    def values_at(self, at: str) -> set[str] | None:
        """The values (canonical JSON) the schema at `at` admits when it lists them, else None."""
        node = self.resolved(at)
        if node is True or not ("const" in node or "enum" in node):
            return None
        return {_canonical(v) for v in ([node["const"]] if "const" in node else node["enum"])}

    def disjoint(self, a: str, b: str) -> bool:
        """Whether no value fits both schemas, as far as their types, listed values or a required property with
        listed values tell."""
        types_a, types_b = self.types_at(a), self.types_at(b)
        if types_a is not None and types_b is not None and not types_a & types_b:
            return True
        values_a, values_b = self.values_at(a), self.values_at(b)
        if values_a is not None and values_b is not None:
            return not values_a & values_b
        node_a, node_b = self.resolved(a), self.resolved(b)
        if types_a != {"object"} or types_b != {"object"}:
            return False
        for name in set(node_a.get("required", ())) & set(node_b.get("required", ())):
            values_a = self.values_at(_pointer(self.where(a), "properties", name))
            values_b = self.values_at(_pointer(self.where(b), "properties", name))
            if values_a is not None and values_b is not None and not values_a & values_b:
                return True
        return False

    def check_disjoint(self, at: str) -> None:
        branches = [_pointer(at, "oneOf", i) for i in range(len(self.nodes[at]["oneOf"]))]
        listed = [self.values_at(b) for b in branches]
        if None not in listed:  # values only: disjoint when no value is listed twice (in one pass, for long lists)
            if sum(map(len, listed)) == len(set().union(*listed)):
                return
        elif len(branches) > MAX_ONE_OF:
            _refuse(at, f'"oneOf" of more than {MAX_ONE_OF} schemas is not checked for overlaps unless each lists '
                        'its values ("const" or "enum"): use "anyOf"')
        for i, a in enumerate(branches):
            for j in range(i + 1, len(branches)):
                if not self.disjoint(a, branches[j]):
                    _refuse(at, f'"oneOf" schemas {i} and {j} may both fit one value, and the grammar enforces '
                                '"oneOf" only as "anyOf": use "anyOf", or set them apart by "type" or by a required '
                                'property with a "const" of its own in each')

    def needs(self, at: str) -> list[list[str]]:
        """What a finite value of the schema at `at` needs: one of the lists returned, each of schemas that all
        need a finite value ([[]]: nothing)."""
        node = self.nodes[at]
        if node is True or "enum" in node or "const" in node:
            return [[]]
        if "$ref" in node:
            return [[node["$ref"]]]
        if "allOf" in node or "anyOf" in node or "oneOf" in node:
            branches = self.same_place(at)
            return [branches] if "allOf" in node else [[b] for b in branches]
        options = []
        for kind in _types_of(node) or _TYPES:
            if kind == "object":
                options.append([_pointer(at, "properties", name) for name in node.get("required", ())])
            elif kind == "array":
                prefix = len(node.get("prefixItems", ()))
                wanted = [_pointer(at, "prefixItems", i) for i in range(min(node.get("minItems", 0), prefix))]
                if node.get("minItems", 0) > prefix and isinstance(node.get("items"), dict):
                    wanted.append(_pointer(at, "items"))
                options.append(wanted)
            else:
                options.append([])
        return options

    def check_finite(self) -> None:
        """Recursion that only an infinitely deep value fits (a required property or item that leads back to its
        own schema): the least fixed point of "has a finite value", found with a worklist."""
        needs = {at: self.needs(at) for at in self.nodes}
        users: dict[str, list[str]] = {}
        for at, options in needs.items():
            for wanted in {w for option in options for w in option}:
                users.setdefault(wanted, []).append(at)
        finite: set[str] = set()
        work = list(self.nodes)
        while work:
            at = work.pop()
            if at not in finite and any(all(w in finite for w in option) for option in needs[at]):
                finite.add(at)
                work.extend(users.get(at, ()))
        infinite = [at for at in self.nodes if at not in finite]
        if infinite:
            at = next((a for a in infinite if "/$defs/" in a or "/definitions/" in a), infinite[0])
            _refuse(at, "only an infinitely deep value fits it (its $refs lead back to it through required "
                        "properties or items): make the recursion optional")


def _is_type(value) -> bool:
    if isinstance(value, list):
        return bool(value) and all(isinstance(t, str) and t in _TYPES for t in value) and len(set(value)) == len(value)
    return isinstance(value, str) and value in _TYPES


def _types_of(node: dict) -> set[str]:
    """The types `node`'s "type" names (none when it has none)."""
    value = node.get("type")
    return {value} if isinstance(value, str) else set(value) if isinstance(value, list) else set()


def _read_response_format(response_format) -> tuple[str, dict | None, str]:
    """The kind of `response_format`, its schema and the schema's JSON text, or an Olmo2KitError saying what is
    wrong."""
    if not isinstance(response_format, dict):
        raise Olmo2KitError(
            f'response_format must be an object such as {{"type": "json_object"}}, got {reprlib.repr(response_format)}'
        )
    kind = response_format.get("type")
    if kind not in RESPONSE_FORMATS:
        raise Olmo2KitError(f"response_format.type must be one of {', '.join(RESPONSE_FORMATS)}, got "
                            f"{reprlib.repr(kind)}")
    if kind != "json_schema":
        return kind, json.loads(_ANY_OBJECT), _ANY_OBJECT
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise Olmo2KitError(f"{_WHERE} must be a JSON Schema object, as in {_EXAMPLE}")
    if _schema_depth_exceeds(schema, MAX_SCHEMA_DEPTH):
        raise Olmo2KitError(f"{_WHERE} nests too deeply (objects and arrays more than {MAX_SCHEMA_DEPTH} levels "
                            "deep): flatten it")
    try:
        # Not sorted: the order of "properties" is the order the grammar writes them in.
        return kind, schema, json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise Olmo2KitError(f"{_WHERE} is not JSON: {e}") from None
