"""OpenAI's `response_format` as constrained decoding: a JSON grammar that masks each row's logits.

`constraint_factory` reads the request field and returns None for plain text, or a factory that makes one
`JsonConstraint` per generated row; before each token the row's logits go through `mask`, and the chosen token
through `accept`:

    >>> make = constraint_factory({"type": "json_object"}, tokenizer, vocab_size, {eos_id})  # doctest: +SKIP
    >>> constraint = make()  # doctest: +SKIP
    >>> constraint.mask(logits); token = int(logits.argmax()); constraint.accept(token)  # doctest: +SKIP

Built on xgrammar (https://xgrammar.mlc.ai/docs/api/python/): `TokenizerInfo.from_huggingface` reads the
vocabulary, `GrammarCompiler.compile_json_schema` turns a schema into a `CompiledGrammar`, and each row's
`GrammarMatcher` follows the tokens accepted so far (`accept_token`), writes the tokens that may come next into a
bitmask (`allocate_token_bitmask`, `fill_next_token_bitmask`), which `apply_token_bitmask_inplace` applies to the
logits. Once the JSON is complete only the end-of-text tokens may come.

What the grammar allows:
- compact JSON (`any_whitespace=False`: one space after each `:` and `,`, no other whitespace outside strings),
  so that a model cannot spend its tokens on whitespace;
- for `json_schema`, no property or item the schema does not name, whatever its `strict` says (xgrammar's
  `strict_mode`): the output is still valid under the schema, and a model cannot wander into properties nobody
  asked for;
- for `json_object`, any object, through the schema {"type": "object"} (xgrammar's builtin JSON grammar admits a
  top-level array and any whitespace).
"""

from __future__ import annotations

import functools
import json
import re
import reprlib
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from olmo2kit.errors import Olmo2KitError

if TYPE_CHECKING:
    import torch

RESPONSE_FORMATS = ("text", "json_object", "json_schema")
GRAMMAR_CACHE_SIZE = 64  # compiled grammars kept per tokenizer; the least recently used goes first
_ANY_OBJECT = '{"type":"object"}'
_EXAMPLE = '{"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object", ...}}}'
# xgrammar's messages start with where in its C++ source they were raised: "[05:24:09] /project/cpp/x.cc:5082: ".
_XGRAMMAR_PREFIX = re.compile(r"^\[[^\]]*\] \S+:\d+: ")
_CONTROL_CHARACTER = re.compile(rb"[\x00-\x1f]")

_lock = threading.Lock()  # guards the caches; a second request for a schema being compiled waits for it
_compilers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {(vocab_size, eos): _Compiler}


def constraint_factory(
    response_format: dict, tokenizer, vocab_size: int, eos_ids: set[int]
) -> Callable[[], JsonConstraint] | None:
    """None for `{"type": "text"}`; for `{"type": "json_object"}` or `{"type": "json_schema", "json_schema":
    {"name": ..., "schema": {...}}}`, a function that makes a fresh `JsonConstraint` for each generated row.

    `vocab_size` is the model's (the length of its logits, which may exceed the tokenizer's); `eos_ids` are the
    tokens that end the text, the only ones allowed once the JSON is complete. Anything else in `response_format`,
    a schema xgrammar cannot compile among it, is an Olmo2KitError. Compiled grammars are cached per tokenizer.
    """
    kind, schema = _read_response_format(response_format)
    if kind == "text":
        return None
    with _lock:
        compiler = _compiler(tokenizer, vocab_size, eos_ids)
        grammar = compiler.grammar(schema, strict=kind == "json_schema")
    return functools.partial(JsonConstraint, grammar, vocab_size, compiler.banned_ids)


class JsonConstraint:
    """One row's JSON grammar: which tokens may come next, given the tokens accepted so far.

    Call `mask` on the row's logits, choose a token from them, then `accept` it; once more for every token.
    """

    def __init__(self, grammar, vocab_size: int, banned_ids: torch.Tensor) -> None:
        import xgrammar

        self._matcher = xgrammar.GrammarMatcher(grammar)
        self._bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)
        self._vocab_size = vocab_size
        self._banned_ids = banned_ids

    def mask(self, logits: torch.Tensor) -> None:
        """Set to -inf, in place, the logits (one row, [vocab_size], float32) of the tokens that may not come
        next; once the JSON is complete, of every token but the end-of-text ones."""
        import xgrammar

        self._matcher.fill_next_token_bitmask(self._bitmask)
        xgrammar.apply_token_bitmask_inplace(logits, self._bitmask.to(logits.device), vocab_size=self._vocab_size)
        logits[self._banned_ids] = float("-inf")

    def accept(self, token: int) -> None:
        """Advance past `token`, chosen from logits `mask` left finite; any other token is a bug."""
        if not self._matcher.accept_token(token):
            raise AssertionError(f"token {token} is outside the grammar: it was not chosen from masked logits")


class _Compiler:
    """xgrammar's compiler over one tokenizer's vocabulary, and the grammars it compiled last."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: set[int]) -> None:
        import xgrammar

        info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(eos_ids)
        )
        self._compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)  # its cache has no bound; _grammars has
        self._grammars: OrderedDict[tuple[str, bool], object] = OrderedDict()
        self.banned_ids = _banned_ids(tokenizer, info.decoded_vocab, eos_ids)

    def grammar(self, schema: str, strict: bool):
        """The compiled grammar of `schema` (JSON text), from the cache when it is there."""
        key = (schema, strict)
        if key in self._grammars:
            self._grammars.move_to_end(key)
            return self._grammars[key]
        try:
            compiled = self._compiler.compile_json_schema(schema, any_whitespace=False, strict_mode=strict)
        except RuntimeError as e:  # how xgrammar reports a schema it cannot read or does not support
            message = _XGRAMMAR_PREFIX.sub("", str(e).strip()).splitlines()[0]
            raise Olmo2KitError(f"response_format.json_schema.schema cannot be used: {message}") from None
        self._grammars[key] = compiled
        if len(self._grammars) > GRAMMAR_CACHE_SIZE:
            self._grammars.popitem(last=False)
        return compiled


def _banned_ids(tokenizer, vocabulary: list[bytes], eos_ids: set[int]) -> torch.Tensor:
    """The tokens no compact JSON text holds that xgrammar may still allow, end of text aside:
    - special tokens such as <|pad|>: xgrammar reads them as their text, which a JSON string may hold, but the
      text layer drops them, so one chosen would vanish from the string (and from its minLength);
    - tokens with a control character (U+0000 to U+001F): JSON strings must escape them, yet xgrammar 0.2.9
      lets a string with a minLength or maxLength hold them raw (its characters exclude only the quote, the
      backslash, CR and LF), which json.loads rejects.
    """
    import torch

    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    banned = [i for i, text in enumerate(vocabulary)
              if (i in special or _CONTROL_CHARACTER.search(text)) and i not in eos_ids]
    return torch.tensor(banned, dtype=torch.long)


def _compiler(tokenizer, vocab_size: int, eos_ids: set[int]) -> _Compiler:
    by_vocabulary = _compilers.setdefault(tokenizer, {})
    key = (vocab_size, tuple(sorted(eos_ids)))
    if key not in by_vocabulary:
        by_vocabulary[key] = _Compiler(tokenizer, vocab_size, eos_ids)
    return by_vocabulary[key]


def _read_response_format(response_format) -> tuple[str, str]:
    """The kind of `response_format` and the JSON text of its schema, or an Olmo2KitError saying what is wrong."""
    if not isinstance(response_format, dict):
        raise Olmo2KitError(
            f'response_format must be an object such as {{"type": "json_object"}}, got {reprlib.repr(response_format)}'
        )
    kind = response_format.get("type")
    if kind not in RESPONSE_FORMATS:
        raise Olmo2KitError(f"response_format.type must be one of {', '.join(RESPONSE_FORMATS)}, got "
                            f"{reprlib.repr(kind)}")
    if kind != "json_schema":
        return kind, _ANY_OBJECT
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise Olmo2KitError(f"response_format.json_schema.schema must be a JSON Schema object, as in {_EXAMPLE}")
    try:
        # Not sorted: the order of "properties" is the order the grammar writes them in.
        return kind, json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise Olmo2KitError(f"response_format.json_schema.schema is not JSON: {e}") from None
    except RecursionError:
        raise Olmo2KitError("response_format.json_schema.schema nests too deeply: flatten it") from None
