"""The console's redacted view: personal data in what operators read is replaced by its kind.

Operators read customers' conversations to review them; they rarely need the card number, the
e-mail address or the street in them. Every text the console's conversation views show (messages,
rating comments, corrections, the list's previews) goes through ``training.clean.redact``: the
same detectors that keep PII out of training rows, so ``[EMAIL]``, ``[PHONE]``, ``[NAME]``... The
raw text is one explicit step away (``GET /api/v1/conversations/{id}/raw``, reviewer role), and
each look at it is written to the audit log.
"""

from __future__ import annotations

from typing import Any

from feedback.browse import PREVIEW_CHARS
from training.clean import redact


def redact_text(text: str | None) -> str | None:
    return None if text is None else redact(text)[0]


def shorten(text: str) -> str:
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"


def summary(item: dict[str, Any], *, raw: bool = False) -> dict[str, Any]:
    """A conversation's summary for the console; the preview redacted (before it is cut short,
    so that no value is cut in half past the detectors) unless ``raw``."""
    preview = item.get("preview") or ""
    return {**item, "preview": shorten(preview if raw else redact(preview)[0])}


def transcript(t: dict[str, Any]) -> dict[str, Any]:
    """A transcript (``Browse.transcript``) with every free text redacted; ``redacted: true``."""
    messages = [
        {
            **m,
            "text": redact_text(m["text"]),
            "ratings": [{**r, "comment": redact_text(r.get("comment"))} for r in m["ratings"]],
            "corrections": [{**k, "text": redact_text(k.get("text"))} for k in m["corrections"]],
        }
        for m in t["messages"]
    ]
    return {**t, "conversation": summary(t["conversation"]), "messages": messages, "redacted": True}


class RawViews:
    """When a look at a raw transcript goes to the audit log: an operator's first look at a
    conversation, then again once ``every_s`` passed (the console page polls every 2 s; one entry
    per look, not per poll)."""

    def __init__(self, every_s: float = 900.0) -> None:
        self.every_s = every_s
        self._last: dict[tuple[str, str], float] = {}

    def due(self, operator: str, conversation_id: str, now: float) -> bool:
        key = (operator, conversation_id)
        if now - self._last.get(key, -self.every_s) < self.every_s:
            return False
        if len(self._last) > 10_000:  # forget the oldest looks; at worst an extra entry
            self._last = dict(sorted(self._last.items(), key=lambda kv: kv[1])[5_000:])
        self._last[key] = now
        return True
