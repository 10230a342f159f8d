"""The console's redacted view: personal data in what operators read is replaced by its kind.

Operators read customers' conversations to review them; they rarely need the card number, the
e-mail address or the street in them. Every free text the console's conversation views show
(messages, ratings' reasons and comments, corrections and their reasons, exclusion reasons, the
cues of implicit-feedback readings, the list's previews) goes through ``training.clean``'s detectors: the same that keep PII out of
training rows, so ``[EMAIL]``, ``[PHONE]``, ``[NAME]``... Identifiers the client chose (a
conversation's ``user_id``, a rating's ``rater``) go through them too: an e-mail address or a phone
number used as an id shows as ``[EMAIL]``, ``[PHONE]``. The raw text is one explicit step away
(``GET /api/v1/conversations/{id}/raw``, reviewer role), and each look at it is written to the
audit log.

This runs in the event loop the websocket gateway shares, on text customers typed: the detectors
are linear in the text (``tests/test_clean_redos.py``), and a list preview redacts a bounded
prefix of the first message, not all of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from feedback.browse import PREVIEW_CHARS
from training.clean import DEFAULT_DETECTORS, Detector, find_pii, redact

# A preview redacts the first REDACT_CHARS characters of the first message and shows none past
# REDACT_CHARS - MARGIN of them: a value cut in half at REDACT_CHARS escapes the detectors, so the
# preview stops MARGIN characters before (no e-mail address, phone or card number is that long).
REDACT_CHARS = 400
MARGIN = 100


def redact_text(text: str | None) -> str | None:
    return None if text is None else redact(text)[0]


def shorten(text: str) -> str:
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"


def preview(text: str, detectors: Sequence[Detector] = DEFAULT_DETECTORS) -> str:
    """The first message redacted, then cut to PREVIEW_CHARS (redacted before it is cut, so that no
    value is cut in half past the detectors), looking at no more than REDACT_CHARS of it."""
    head = text[:REDACT_CHARS]
    shown = len(head) if len(text) <= REDACT_CHARS else REDACT_CHARS - MARGIN
    parts: list[str] = []
    pos = 0
    for start, end, kind in find_pii(head, detectors):
        if start >= shown:
            break
        parts += [head[pos:start], f"[{kind}]"]
        pos = end
    if pos < shown:
        parts.append(head[pos:shown])
    out = "".join(parts)
    if len(text) > max(pos, shown):  # cut: say so even where the redacted head is short
        return out[: PREVIEW_CHARS - 1] + "…"
    return shorten(out)


def summary(item: dict[str, Any], *, raw: bool = False) -> dict[str, Any]:
    """A conversation's summary for the console: the preview and the user id redacted unless ``raw``."""
    text = item.get("preview") or ""
    if raw:
        return {**item, "preview": shorten(text)}
    return {**item, "preview": preview(text), "user_id": redact_text(item.get("user_id"))}


def transcript(t: dict[str, Any]) -> dict[str, Any]:
    """A transcript (``Browse.transcript``) with every free text and client-chosen id redacted;
    ``redacted: true``."""

    def rating(r: dict[str, Any]) -> dict[str, Any]:
        return {**r, **{k: redact_text(r.get(k)) for k in ("reason", "comment", "rater")}}

    def correction(k: dict[str, Any]) -> dict[str, Any]:
        return {**k, "text": redact_text(k.get("text")), "reason": redact_text(k.get("reason"))}

    def excluded(x: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if x is None else {**x, "reason": redact_text(x.get("reason"))}

    def reaction(r: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if r is None else {**r, "cue": redact_text(r.get("cue"))}

    messages = [
        {
            **m,
            "text": redact_text(m["text"]),
            "ratings": [rating(r) for r in m["ratings"]],
            "corrections": [correction(k) for k in m["corrections"]],
            "excluded": excluded(m.get("excluded")),
            "reaction": reaction(m.get("reaction")),
        }
        for m in t["messages"]
    ]
    return {**t, "conversation": summary(t["conversation"]), "messages": messages, "redacted": True}


def raters(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rater reviews for a viewer: a rater id that is personal data shows as its kind (reviewers,
    who act on a rater by its id, get them as they are)."""
    return [{**r, "rater": redact_text(r["rater"])} for r in items]


class RawViews:
    """When a look at a raw transcript goes to the audit log: an operator's first look at a
    conversation, then again once ``every_s`` passed (the console page polls every 2 s; one entry
    per look, not per poll). ``due`` asks; ``seen`` records a look once its entry is written."""

    def __init__(self, every_s: float = 900.0) -> None:
        self.every_s = every_s
        self._last: dict[tuple[str, str], float] = {}

    def due(self, operator: str, conversation_id: str, now: float) -> bool:
        return now - self._last.get((operator, conversation_id), -self.every_s) >= self.every_s

    def seen(self, operator: str, conversation_id: str, now: float) -> None:
        if len(self._last) > 10_000:  # forget the oldest looks; at worst an extra entry
            self._last = dict(sorted(self._last.items(), key=lambda kv: kv[1])[5_000:])
        self._last[(operator, conversation_id)] = now
