"""What the IM channels share: the inbound event, the platform interface, delivery outcomes.

Each platform module (``telegram``, ``slack``, ``webhooks``) turns a verified request into
``Inbound`` events (pure), and implements ``Platform``: how an answer is addressed on that
platform (``reply``, ``notice``, ``vote``: outbox rows, pure), what happens at once
(``acknowledge``, ``preview``) and how one outbox row is delivered (``deliver`` ->
``Outcome``). The inbox worker (``server.channels.inbox``) and the outbox worker
(``server.channels.outbox``) are written once, against this interface.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import httpx

from feedback.inbox import InboxItem
from feedback.outbox import OutboxItem, OutboxRow
from server.replies import new_id


class Channel(StrEnum):
    """``conversations.channel`` of IM conversations; their ``site`` is the bot, app or sender name."""

    TELEGRAM = "telegram"
    SLACK = "slack"
    WEBHOOK = "webhook"


class EventKind(StrEnum):
    MESSAGE = "message"  # a user wrote: answer in the thread's conversation
    RATING = "rating"  # a user pressed a thumb (or a sender reported a rating)


@dataclass(frozen=True)
class Inbound:
    """One thing a platform asked of us, parsed from a verified request."""

    kind: EventKind
    key: str  # repeated by the platform when it redelivers: the dedupe key
    thread: str | None  # the platform conversation (chat, thread): one learnloop conversation at a time
    user: str | None = None  # namespaced: telegram:<id>, slack:<team>:<id>, webhook:<name>:<id>
    text: str = ""
    new_conversation: bool = False  # a message that starts a new conversation in its thread
    known_thread_only: bool = False  # answer only inside a thread we already converse in
    message_id: str | None = None  # a rating: the rated reply
    value: int = 0  # a rating: 1 or -1
    reason: str | None = None
    comment: str | None = None
    address: dict[str, Any] = field(default_factory=dict)  # where the answer goes, in the platform's terms

    def to_payload(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> Inbound:
        values = dict(payload)
        values["kind"] = EventKind(values["kind"])
        return cls(**values)


DEFAULT_GREETING = "Hello! Ask me anything."


def lane(channel: Channel, site: str, part: str) -> str:
    """The name of an ordered lane of work: one per thread (rows of a lane go one at a time, in order)."""
    return f"{channel}:{site}:{part}"


def inbox_item(channel: Channel, site: str, event: Inbound) -> InboxItem:
    """What ``store.inbox.receive`` stores for ``event``: messages of a thread queue behind each other,
    each rating in a lane of its own (a thumb never waits for a reply being written)."""
    part = event.thread if event.kind is EventKind.MESSAGE and event.thread else f"{event.kind}:{event.key}"
    return InboxItem(
        channel=str(channel),
        site=site,
        key=event.key,
        lane=lane(channel, site, part),
        kind=str(event.kind),
        payload=event.to_payload(),
        turn_id=new_id(),
        reply_id=new_id(),
        user_id=event.user,
    )


@dataclass(frozen=True)
class ReplyView:
    """A stored reply, as a platform shows it."""

    message_id: str
    conversation_id: str
    text: str
    finish_reason: str
    version: str | None


# --- delivery outcomes -------------------------------------------------------------------


@dataclass(frozen=True)
class Delivered:
    response: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Retry:
    error: str
    retry_after: float | None = None  # the platform said when (429, Retry-After)
    uncertain: bool = False  # the request may have arrived (a timeout after sending it)


@dataclass(frozen=True)
class Failed:
    error: str  # refused for good (a bad request, a blocked bot): retrying cannot help


Outcome = Delivered | Retry | Failed


def transport_outcome(exc: httpx.TransportError) -> Retry:
    """A request that failed on the way: certainly not delivered when it never connected, else maybe."""
    sent = not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
    return Retry(f"{type(exc).__name__}: {exc}".strip(": "), uncertain=sent)


def retry_after_header(headers: Mapping[str, str]) -> float | None:
    """``Retry-After`` in seconds (the date form is ignored: the backoff applies instead)."""
    value = headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


# --- the platform interface --------------------------------------------------------------


class Preview(Protocol):
    """A reply shown while it is written (Telegram edits one message as the text grows)."""

    async def add(self, delta: str) -> None: ...

    async def close(self) -> dict[str, Any]:
        """Stop; what the platform shows now (kept with the event, for the final delivery)."""
        ...


Remember = Callable[[dict[str, Any]], Awaitable[None]]


class Platform(Protocol):
    """One configured bot, app or sender of one IM platform."""

    channel: Channel
    site: str
    greeting: str  # the answer to a message without text (a new-conversation command alone, a bare mention)

    def reply(self, event: Inbound, reply: ReplyView, *, shown: Mapping[str, Any]) -> list[OutboxItem]:
        """The calls that deliver ``reply`` to ``event`` (``shown``: what a preview already shows)."""
        ...

    def notice(self, event: Inbound, text: str, *, key: str) -> list[OutboxItem]:
        """The calls that answer ``event`` with a plain notice (a greeting, an apology)."""
        ...

    def vote(self, event: Inbound, reply: ReplyView) -> list[OutboxItem]:
        """The calls that show the rating ``event`` on the rated reply."""
        ...

    async def acknowledge(self, event: Inbound, text: str) -> None:
        """Answer at once, best effort (Telegram's answerCallbackQuery); nothing elsewhere."""
        ...

    def preview(self, event: Inbound, *, shown: Mapping[str, Any], remember: Remember) -> Preview | None:
        """Show the reply while it is generated, or None."""
        ...

    async def deliver(self, row: OutboxRow) -> Outcome:
        """Make one outbox row's call."""
        ...
