"""Conversations: the message check, the official OLMo 2 chat template, and rendering with it.

A conversation is a list of `{"role": "system" | "user" | "assistant", "content": str}` dicts,
rendered with the tokenizer's chat template. The -SFT, -DPO and -Instruct tokenizers carry
the official OLMo 2 template; a tokenizer without one (a base model's) gets that same
template, with a warning that the model was not trained to chat.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping, Sequence

from olmo2kit.errors import Olmo2KitError

log = logging.getLogger("olmo2kit")

ROLES = ("system", "user", "assistant")

# The chat template of the OLMo 2 instruct models, verbatim from
# allenai/OLMo-2-1124-7B-SFT (and -DPO, -Instruct, OLMo-2-0425-1B-*) tokenizer_config.json.
OLMO2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<|system|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'assistant' %}"
    "{% if not loop.last %}{{ '<|assistant|>\n'  + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ '<|assistant|>\n'  + message['content'] + eos_token }}{% endif %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}"
)

# OLMO2_CHAT_TEMPLATE in ollama's Go template language (a Modelfile's TEMPLATE), for `olmo2kit export ollama`:
# the same text for the same messages, ending with the assistant's header, as ollama always asks for a reply.
OLMO2_OLLAMA_TEMPLATE = (
    "<|endoftext|>{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
    "{{ if eq .Role \"system\" }}<|system|>\n{{ .Content }}\n"
    "{{ else if eq .Role \"user\" }}<|user|>\n{{ .Content }}\n"
    "{{ else if eq .Role \"assistant\" }}<|assistant|>\n{{ .Content }}{{ if not $last }}<|endoftext|>\n{{ end }}"
    "{{ end }}{{ if and $last (ne .Role \"assistant\") }}<|assistant|>\n{{ end }}{{ end }}"
)
# Where a reply ends in the OLMo 2 template: end of text, or the model starting the next turn itself.
OLMO2_STOP = ("<|endoftext|>", "<|user|>", "<|system|>")

_warned_no_template: weakref.WeakSet = weakref.WeakSet()


def check_messages(messages: Sequence[Mapping], *, need_user: bool = True) -> list[dict]:
    """The conversation as plain `{"role", "content"}` dicts, or an Olmo2KitError saying what is wrong.

    Messages are counted from 1. `need_user` asks for a user message with text (what a model
    replies to); training data may do without one.
    """
    if isinstance(messages, str | Mapping) or not isinstance(messages, Sequence):
        raise Olmo2KitError('messages must be a list of {"role": ..., "content": ...} dicts')
    if not messages:
        raise Olmo2KitError("no messages given: a conversation needs at least one message")
    checked = []
    for i, message in enumerate(messages, 1):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise Olmo2KitError(f'message {i} is not a {{"role": ..., "content": ...}} dict')
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise Olmo2KitError(f"message {i} has role {role!r}: the OLMo 2 template knows {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise Olmo2KitError(f"message {i}'s content must be a string")
        check_text(content, f"message {i}'s content")
        checked.append({"role": role, "content": content})
    if need_user and not any(m["role"] == "user" and m["content"].strip() for m in checked):
        raise Olmo2KitError("the conversation has no user message with text")
    return checked


def check_text(text: str, what: str) -> str:
    """`text`, or an Olmo2KitError when it holds a lone surrogate (a JSON \\ud800 escape without its pair, say):
    such a string is no Unicode text, so no tokenizer can encode it and no file can hold it as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Olmo2KitError(f"{what} holds a lone surrogate ({text[e.start]!r} at character {e.start + 1}), which "
                            "is not text: fix it") from None
    return text


def user_messages(prompt: str, system: str | None = None) -> list[dict]:
    """`prompt` as a user message, after `system` as a system message when given."""
    head = [{"role": "system", "content": system}] if system else []
    return [*head, {"role": "user", "content": prompt}]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_template_of(tokenizer) -> tuple[str, str]:
    """(template, where it came from: "tokenizer" or "olmo2"): the tokenizer's own, else the official one."""
    if isinstance(tokenizer.chat_template, str) and tokenizer.chat_template:
        return tokenizer.chat_template, "tokenizer"
    return OLMO2_CHAT_TEMPLATE, "olmo2"


def chat_template(tokenizer) -> str | None:
    """The template to render with: None for the tokenizer's own, else the official OLMo 2 one (warned once)."""
    if has_chat_template(tokenizer):
        return None
    if tokenizer not in _warned_no_template:
        _warned_no_template.add(tokenizer)
        log.warning(
            f"{tokenizer.name_or_path or 'this tokenizer'} has no chat template, so the official OLMo 2 one is used; "
            "a base model was not trained to chat: use an -SFT, -DPO or -Instruct model (e.g. 1b-instruct)"
        )
    return OLMO2_CHAT_TEMPLATE


def render_chat(tokenizer, messages: Sequence[Mapping], *, add_generation_prompt: bool = True) -> str:
    """The conversation as the model reads it, ending with the assistant's header by default.

    >>> render_chat(tokenizer, [{"role": "user", "content": "Hi"}])  # doctest: +SKIP
    '<|endoftext|><|user|>\\nHi\\n<|assistant|>\\n'
    """
    return tokenizer.apply_chat_template(
        check_messages(messages), chat_template=chat_template(tokenizer),
        add_generation_prompt=add_generation_prompt, tokenize=False,
    )


def encode_chat(tokenizer, messages: Sequence[Mapping]) -> list[int]:
    """Token ids of the rendered conversation; the template writes the special tokens itself."""
    return tokenizer(render_chat(tokenizer, messages), add_special_tokens=False)["input_ids"]
