"""The rules of takeovers shared by several server processes: pure, no I/O, no clock.

``server/presence.py`` is the shell: it writes a takeover to the store, tells its own
connections at once, and sends a ``Notice`` to the other processes (PostgreSQL's ``NOTIFY``,
``feedback/takeovers.py``); each of them reads the notice back with ``decode``, keeps its view of
who answers what with ``apply``, and tells its own connections. When its notifications were cut
(a lost ``LISTEN`` connection), a process reloads every takeover from the store and ``changes``
says what its connections missed: joins and leaves are caught up; an operator's reply sent
meanwhile is not pushed (it is in the store: the customer sees it on resuming).

A notice names the conversation, never its text: the payload of a ``NOTIFY`` is seen by every
listener of the database, and it holds 8,000 bytes at most. A process that has the conversation
open reads the operator's reply from the store by ``message_id``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum

from feedback import Takeover


class Kind(StrEnum):
    JOINED = "joined"  # an operator took the conversation over: the model stops answering in it
    REPLY = "reply"  # the operator's reply, stored as ``message_id``
    LEFT = "left"  # handed back to the model


@dataclass(frozen=True)
class Notice:
    """What one process tells the others about a conversation's takeover."""

    origin: str  # the process that sent it (it told its own connections already)
    kind: Kind
    conversation_id: str
    operator: str | None = None  # joined, reply
    since: float | None = None  # joined
    message_id: str | None = None  # reply


def encode(notice: Notice) -> str:
    return json.dumps({k: v for k, v in asdict(notice).items() if v is not None}, separators=(",", ":"))


def decode(payload: str) -> Notice | None:
    """A notice, or None for a payload that is not one (another version's, a stray ``NOTIFY``)."""
    try:
        data = json.loads(payload)
        kind = Kind(data["kind"])
        origin, conversation_id = data["origin"], data["conversation_id"]
        operator, since, message_id = data.get("operator"), data.get("since"), data.get("message_id")
    except (ValueError, TypeError, KeyError):
        return None
    if not isinstance(origin, str) or not isinstance(conversation_id, str):
        return None
    if kind is not Kind.LEFT and not isinstance(operator, str):
        return None
    if kind is Kind.JOINED and not isinstance(since, int | float):
        return None
    if kind is Kind.REPLY and not isinstance(message_id, str):
        return None
    return Notice(origin, kind, conversation_id, operator, since, message_id)


def apply(takeovers: Mapping[str, Takeover], notice: Notice) -> dict[str, Takeover]:
    """Who answers what once ``notice`` is taken in (a reply changes nothing: it follows a join)."""
    after = dict(takeovers)
    if notice.kind is Kind.JOINED:
        assert notice.operator is not None and notice.since is not None
        after[notice.conversation_id] = Takeover(notice.conversation_id, notice.operator, notice.since)
    elif notice.kind is Kind.LEFT:
        after.pop(notice.conversation_id, None)
    return after


def changes(before: Mapping[str, Takeover], after: Mapping[str, Takeover], *, origin: str) -> list[Notice]:
    """The notices that take a process from ``before`` to ``after`` (the store's, reloaded after its
    notifications were cut): a leave for each takeover gone, a join for each new or changed one."""
    out = [Notice(origin, Kind.LEFT, cid) for cid in before if cid not in after]
    for cid, t in after.items():
        if before.get(cid) != t:
            out.append(Notice(origin, Kind.JOINED, cid, t.operator, t.since))
    return out


def reply_refusal(held: Takeover | None, operator: str) -> str | None:
    """Why ``operator`` may not answer in a conversation held as ``held`` (None: it may)."""
    if held is None or held.operator != operator:
        return "take the conversation over before answering in it"
    return None
