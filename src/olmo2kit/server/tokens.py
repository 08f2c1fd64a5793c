"""How a token is named in log probabilities: distinct tokens get distinct names, as OpenAI writes them.

A byte-level BPE token (OLMo 2's tokenizer is one) may hold part of a UTF-8 character: decoded alone it is
U+FFFD, so several such tokens would share one name and collide as keys of `top_logprobs`. OpenAI names such a
token by its bytes, `bytes:\\xe2\\x80` (the chat API's `bytes` field then holds those bytes); a token whose
bytes are whole UTF-8 text is named by that text.

    >>> names = token_names(tokenizer)             # doctest: +SKIP
    >>> names.name(token_id), names.bytes(token_id)  # doctest: +SKIP

The table is built once per tokenizer (a pass over its vocabulary) and read for every token after that, so
formatting log probabilities costs no decoding on the server's event loop.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

_tables: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lock = threading.Lock()


@dataclass(frozen=True)
class TokenNames:
    """Each token id's name and bytes."""

    names: list[str]
    raw: list[bytes]

    def name(self, token: int) -> str:
        return self.names[token] if 0 <= token < len(self.names) else f"token_id:{token}"

    def data(self, token: int) -> bytes:
        return self.raw[token] if 0 <= token < len(self.raw) else b""

    def bytes(self, token: int) -> list[int]:
        return list(self.data(token))


def token_names(tokenizer) -> TokenNames:
    """The names of `tokenizer`'s tokens (built on first use, then cached for the tokenizer's life)."""
    with _lock:
        table = _tables.get(tokenizer)
        if table is None:
            table = _tables[tokenizer] = _build(tokenizer)
        return table


def _build(tokenizer) -> TokenNames:
    size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    byte_level = type(getattr(tokenizer.backend_tokenizer, "decoder", None)).__name__ == "ByteLevel"
    added = {i for i in tokenizer.added_tokens_decoder}
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # the byte-level alphabet of GPT-2's BPE

    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    names, raw = [], []
    for i, piece in enumerate(pieces):
        if piece is None:
            data = b""
        elif byte_level and i not in added and all(c in to_byte for c in piece):
            data = bytes(to_byte[c] for c in piece)
        else:
            data = tokenizer.decode([i]).encode("utf-8")
        raw.append(data)
        names.append(_name(data))
    seen: dict[str, int] = {}
    for i, name in enumerate(names):  # an added token spelled as a vocabulary token: both stay distinct
        if seen.setdefault(name, i) != i:
            names[i] = f"token_id:{i}"
    return TokenNames(names, raw)


def _name(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)
