"""One reply, whatever the channel: stream it from the engine, store it, report how it ended.

The websocket gateway, the OpenAI-compatible API and the IM webhooks are thin shells over
these functions and the same store: a conversation is opened the same way (pinned to the
canary for the canary's share), a reply is stored the same way (with the version that wrote
it, its time to first token and why it ended), so every channel's customers train the same
model and are measured by the same numbers. A customer's turn that follows a reply is read as
implicit feedback on it the same way too (``reaction_after``), and stored with the turn.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from feedback import FeedbackStore, FinishReason, Message, Reaction, Role
from server.engines import Engine, SamplingConfig
from server.protocol import Turn
from training.implicit import ImplicitConfig, classify_reaction, reaction_record


class StopSignal(threading.Event):
    """A reply's stop flag, with why it was set: the client's ``stop`` or the server shutting down."""

    reason: FinishReason = FinishReason.CANCELLED


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Reply:
    """A stored reply; ``finish_reason`` ERROR means generation failed (stored empty, never trained on)."""

    message_id: str
    text: str
    version: str
    finish_reason: FinishReason
    n_tokens: int
    latency_ms: float | None

    @property
    def failed(self) -> bool:
        return self.finish_reason is FinishReason.ERROR


async def open_conversation(
    store: FeedbackStore,
    *,
    assign_version: Callable[[str], str | None],
    user: str | None,
    channel: str,
    site: str | None = None,
    conversation_id: str | None = None,
) -> tuple[str, str | None]:
    """A new stored conversation: (its id, new unless given; the canary it is pinned to or None for live)."""
    conversation_id = conversation_id or new_id()
    pinned = assign_version(conversation_id)
    await store.conversations.create(conversation_id, user_id=user, model_version=pinned, channel=channel, site=site)
    return conversation_id, pinned


def latest_branch(messages: Iterable[Message]) -> list[Turn]:
    """The conversation's latest branch, oldest first: from its newest message up the parent links.

    Failed replies are skipped (they are stored only to count errors per version).
    """
    usable = [m for m in messages if m.finish_reason is not FinishReason.ERROR]
    by_id = {m.id: m for m in usable}
    branch: list[Turn] = []
    node = usable[-1] if usable else None
    while node is not None:
        branch.append(Turn(node.id, str(node.role), node.text))
        node = by_id.get(node.parent_id) if node.parent_id else None
    branch.reverse()
    return branch


REACTION_READ_CHARS = 1000
"""How much of a turn (and of the question before it) the rules read: reactions are short, and the
rules run in the event loop (measured: up to 29 ms for 4,000 adversarial characters, 2-3 ms for 1,000)."""


def reaction_after(branch: Sequence[Turn], *, message_id: str, text: str, config: ImplicitConfig) -> Reaction | None:
    """The customer's new turn ``text`` (id ``message_id``) read as implicit feedback on the reply it
    follows: ``branch`` is the conversation up to that turn, oldest first, and its last turn the reply.
    None when the turn follows no assistant reply (the first turn of a conversation)."""
    if not branch or branch[-1].role != Role.ASSISTANT:
        return None
    previous = branch[-2].text if len(branch) > 1 and branch[-2].role == Role.USER else None
    reading = classify_reaction(
        text[:REACTION_READ_CHARS],
        previous_user=None if previous is None else previous[:REACTION_READ_CHARS],
        config=config,
    )
    return reaction_record(reading, reply_id=branch[-1].id, message_id=message_id)


def scan_stop(text: str, stops: Sequence[str]) -> tuple[int, bool]:
    """How much of ``text`` may be shown, and whether a stop sequence was reached.

    With a stop sequence in ``text``: everything before the first one, True. Otherwise all but
    the longest tail that could begin a stop sequence (held back until the next piece), False.
    """
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    if hits:
        return min(hits), True
    held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return len(text) - held, False


async def stream_reply(
    store: FeedbackStore,
    engine: Engine,
    *,
    conversation_id: str,
    context: Iterable[Turn],
    message_id: str,
    parent_id: str,
    version: str,
    sampling: SamplingConfig,
    on_delta: Callable[[str], Awaitable[None]],
    cancel: threading.Event | None = None,
    regenerated_from: str | None = None,
    stop: Sequence[str] = (),
    before_store: Awaitable[object] | None = None,
    on_version: Callable[[str], None] | None = None,
) -> Reply:
    """Stream a reply to ``context`` from ``version`` (``on_delta`` per piece of text), then store it.

    The reply carries the version that wrote it: ``version``, or the one the engine started it on
    when ``version`` was demoted (rolled back, replaced) while the reply waited in the queue
    (``on_version`` hears of it before the first ``on_delta``).

    ``stop``: sequences that end the reply where they first appear (not included; the reply's
    finish reason is ``stop``). ``before_store``: awaited before the reply is stored (the writes
    of its context, run beside generation); if it raises, the reply is not stored. A failed reply is stored too (empty, no latency): error rates per
    version are compared. Exceptions of the engine (overloaded, unknown version) propagate before
    anything is stored.
    """
    started = time.monotonic()
    first_token_s: float | None = None
    text, shown, stopped = "", 0, False
    finish_reason, n_tokens = FinishReason.ERROR, 0
    messages = [{"role": t.role, "content": t.text} for t in context]
    cancel = cancel if cancel is not None or not stop else threading.Event()
    async for chunk in engine.stream(messages, version=version, sampling=sampling, cancel=cancel):
        if chunk.version and chunk.version != version:  # a demoted version's reply starts on the one that replaced it
            version = chunk.version
            if on_version is not None:
                on_version(version)
        if "\x00" in chunk.delta:  # a NUL means nothing in a reply, and PostgreSQL's text cannot hold one
            chunk = dataclasses.replace(chunk, delta=chunk.delta.replace("\x00", ""))
        if chunk.delta and not stopped:
            if first_token_s is None:
                first_token_s = time.monotonic() - started
            text += chunk.delta
            end, stopped = scan_stop(text, stop) if stop else (len(text), False)
            if stopped:
                text = text[:end]
                assert cancel is not None
                cancel.set()  # the engine ends the reply at its next step
            if end > shown:
                await on_delta(text[shown:end])
                shown = end
        if chunk.finish_reason is not None:
            finish_reason, n_tokens = FinishReason(chunk.finish_reason), chunk.n_tokens
    if stopped and finish_reason is not FinishReason.ERROR:
        finish_reason = FinishReason.STOP
    elif shown < len(text) and finish_reason is not FinishReason.ERROR:  # a held-back tail that was no stop
        await on_delta(text[shown:])
    if finish_reason is FinishReason.CANCELLED and isinstance(cancel, StopSignal):
        finish_reason = cancel.reason
    failed = finish_reason is FinishReason.ERROR
    reply = Reply(
        message_id=message_id,
        text="" if failed else text,
        version=version,
        finish_reason=finish_reason,
        n_tokens=0 if failed else n_tokens,
        latency_ms=None if failed else (first_token_s or 0.0) * 1000,
    )
    if before_store is not None:
        await before_store
    await store.conversations.add_message(
        message_id=message_id,
        conversation_id=conversation_id,
        role=Role.ASSISTANT,
        text=reply.text,
        parent_id=parent_id,
        regenerated_from=None if failed else regenerated_from,
        model_version=version,
        latency_ms=reply.latency_ms,
        finish_reason=finish_reason,
        n_tokens=None if failed else n_tokens,
    )
    return reply
