"""Text a customer or an operator writes never becomes a control token of the model.

A chat template renders the chat to text and the tokenizer reads that text back, matching
its special tokens (``<|im_start|>``, ``<|im_end|>``, ``</s>``, ...) as exact strings. A
message that contains one would therefore open a new turn of its own, say a ``system`` turn
(template injection), both when it is served and when it is trained on. ``defuse`` breaks
every special-token string in a message's text with an invisible WORD JOINER (U+2060) after
its first character, so the tokenizer reads ordinary characters there; the stored text is
never changed. The serving engines and the training job apply it to every message, with the
special tokens their own tokenizer declares (no fixed list), so serving and training read
the same defused text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

JOINER = "\u2060"
_OPENER = re.compile(r"[<\[](?=[^\s\u2060])")


def special_strings(tokens: Iterable[str]) -> tuple[str, ...]:
    """The strings worth defusing, longest first (a longer token may hold a shorter one)."""
    return tuple(sorted({t for t in tokens if len(t) >= 2}, key=lambda t: (-len(t), t)))


def tokenizer_specials(tokenizer: Any) -> tuple[str, ...]:
    """Every special-token string a Hugging Face tokenizer declares: its special tokens and the
    added tokens marked special (what the serving engine and the training job both defuse)."""
    added = (t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return special_strings([*tokenizer.all_special_tokens, *added])


def defuse(text: str, specials: Sequence[str]) -> str:
    """``text`` with every occurrence of each of ``specials`` broken by a WORD JOINER.

    ``specials`` as ``special_strings`` orders them. Defusing twice changes nothing more.
    """
    if not specials or not text:
        return text
    for token in specials:
        if token in text:
            text = text.replace(token, token[0] + JOINER + token[1:])
    return text


def defuse_openers(text: str) -> str:
    """``text`` with a WORD JOINER after every ``<`` and ``[`` that a visible character follows.

    The fallback where the tokenizer's special tokens are not known (the ``openai`` engine without
    the served model's files): no special-token string that begins with ``<`` or ``[``
    (``<|im_start|>``, ``</s>``, ``<start_of_turn>``, ``[INST]``) survives it, at the price of
    changing ordinary text such as ``a<b``. Defusing twice changes nothing more.
    """
    return _OPENER.sub(lambda m: m.group(0) + JOINER, text) if text else text


def defuse_messages(messages: Sequence[Mapping[str, Any]], specials: Sequence[str]) -> list[dict[str, Any]]:
    """Chat messages (``{"role", "content", ...}``) with each ``content`` defused; other keys kept."""
    out: list[dict[str, Any]] = []
    for m in messages:
        copy = dict(m)
        if isinstance(copy.get("content"), str):
            copy["content"] = defuse(copy["content"], specials)
        out.append(copy)
    return out


def defuse_row(row: Mapping[str, Any], specials: Sequence[str]) -> dict[str, Any]:
    """A training row (TRL's ``prompt``/``chosen``/``rejected``/``completion``/``messages``) defused."""
    out = dict(row)
    for key in ("prompt", "chosen", "rejected", "completion", "messages"):
        value = out.get(key)
        if isinstance(value, str):
            out[key] = defuse(value, specials)
        elif isinstance(value, list):
            out[key] = defuse_messages(value, specials)
    return out
