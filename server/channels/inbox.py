"""Processes the inbox: each platform event answered once, through the same reply path as every channel.

A message event goes to its thread's conversation (opened with ``replies.open_conversation``
on the first message, or when the message asks for a new one), is stored as the user's turn
and answered with ``replies.stream_reply``; the reply's platform calls are queued and the
event marked done in one transaction (``store.inbox.finish``). A rating event is checked (the
rated reply belongs to this bot and thread), rate-limited per rater like the websocket's,
stored with the event's key as its idempotency key, acknowledged and shown.

Processing again after a crash repeats nothing: the event keeps the conversation it chose
and the ids of its user turn and reply from the moment it arrived, so a second pass finds
the turn (not stored twice) and the reply (not generated twice) and only queues what is
missing. A refusal to generate now (``overloaded``) and unexpected errors are retried with
backoff; an event not done within ``outbox.max_age_s`` is given up and logged.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from feedback import FeedbackStore, FinishReason, InvalidError, NotFoundError, Role
from feedback.inbox import InboxRow, Thread
from feedback.outbox import OutboxItem
from server.channels.config import OutboxConfig
from server.channels.im import EventKind, Inbound, Platform, ReplyView
from server.channels.lanes import LaneWorker
from server.channels.outbox import next_attempt_at
from server.engines import Engine, OverloadedError, SamplingConfig
from server.limiters import RateLimiter
from server.replies import latest_branch, open_conversation, reaction_after, stream_reply
from training.implicit import ImplicitConfig

log = logging.getLogger("learnloop.channels.inbox")

MAX_TRIES = 5  # unexpected failures of one event before it is given up (overloaded waits do not count)
TOO_LONG = "Your message is too long: at most {limit} characters, please."
SORRY = "Sorry, something went wrong while answering. Please try again."
THANKS = "Thanks for your feedback!"
NOT_HERE = "This reply cannot be rated here."
SLOW_DOWN = "Too many ratings; please try again in a minute."


async def _ignore(delta: str) -> None:
    return None


class InboxWorker(LaneWorker[InboxRow]):
    """Answers pending inbox events until stopped; ``wake()`` when one was received."""

    def __init__(
        self,
        store: FeedbackStore,
        engine: Engine,
        platforms: Mapping[tuple[str, str], Platform],
        config: OutboxConfig,
        *,
        sampling: SamplingConfig,
        assign_version: Callable[[str], str | None],
        serving_version: Callable[[str | None], str],
        rating_limiter: RateLimiter,
        max_text_chars: int,
        queued: Callable[[], None],
        rand: Callable[[], float] = random.random,
        implicit: ImplicitConfig | None = None,
    ) -> None:
        super().__init__(name="inbox", concurrency=config.concurrency, max_age_s=config.max_age_s)
        self.store = store
        self.engine = engine
        self.platforms = platforms
        self.config = config
        self.sampling = sampling
        self.assign_version = assign_version
        self.serving_version = serving_version
        self.rating_limiter = rating_limiter
        self.max_text_chars = max_text_chars
        self._queued = queued  # wakes the outbox
        self._rand = rand
        self.implicit = implicit or ImplicitConfig()  # how a turn after a reply is read

    async def due(self, now: float, *, skip_lanes: Iterable[str], limit: int) -> list[InboxRow]:
        return await self.store.inbox.due(now, skip_lanes=skip_lanes, limit=limit)

    async def next_due_at(self) -> float | None:
        return await self.store.inbox.next_due_at()

    async def give_up(self, *, older_than: float) -> None:
        for row in await self.store.inbox.give_up(received_before=older_than):
            log.error("inbox event %d (%s/%s %s) given up: %s", row.id, row.channel, row.site, row.key, row.last_error)

    async def handle(self, row: InboxRow) -> None:
        platform = self.platforms.get((row.channel, row.site))
        if platform is None:
            await self.store.inbox.fail(row.id, error=f"{row.channel} {row.site!r} is no longer configured")
            return
        event = Inbound.from_payload(row.payload)
        try:
            if event.kind is EventKind.RATING:
                send = await self._rate(row, event, platform)
            else:
                send = await self._answer(row, event, platform)
        except OverloadedError as exc:  # the engine is full: wait, without counting it as a failure
            at = time.time() + (exc.retry_after or 1.0)
            await self.store.inbox.retry_later(row.id, error=exc.message, at=at, count=False)
            return
        except Exception as exc:
            log.exception("inbox event %d (%s/%s %s) failed", row.id, row.channel, row.site, row.key)
            if row.attempts + 1 >= MAX_TRIES:
                await self.store.inbox.fail(row.id, error=f"{type(exc).__name__}: {exc}")
                return
            at = next_attempt_at(
                time.time(),
                row.attempts + 1,
                retry_after=None,
                min_s=self.config.min_backoff_s,
                max_s=self.config.max_backoff_s,
                rand=self._rand(),
            )
            await self.store.inbox.retry_later(row.id, error=f"{type(exc).__name__}: {exc}", at=at)
            return
        await self.store.inbox.finish(row.id, send=send)
        if send:
            self._queued()

    # --- a message: the conversation, the user's turn, the reply ------------------------------

    async def _conversation(self, row: InboxRow, event: Inbound) -> str | None:
        """The conversation this event goes to (None: a thread we do not converse in)."""
        if row.conversation_id is not None:
            return row.conversation_id
        assert event.thread is not None
        thread = Thread(row.channel, row.site, event.thread)
        found = None if event.new_conversation else await self.store.inbox.thread_conversation(thread)
        if found is None:
            if event.known_thread_only:
                return None
            found, _ = await open_conversation(
                self.store, assign_version=self.assign_version, user=event.user, channel=row.channel, site=row.site
            )
            await self.store.inbox.map_thread(found, thread)
        await self.store.inbox.set_conversation(row.id, found)
        return found

    async def _answer(self, row: InboxRow, event: Inbound, platform: Platform) -> list[OutboxItem]:
        conversation_id = await self._conversation(row, event)
        notice_key = f"notice:{row.channel}:{row.site}:{row.key}"
        if conversation_id is None:
            return []
        if not event.text:
            return platform.notice(event, platform.greeting, key=notice_key)
        if len(event.text) > self.max_text_chars:
            return platform.notice(event, TOO_LONG.format(limit=self.max_text_chars), key=notice_key)
        messages = await self.store.conversations.messages(conversation_id)
        stored = next((m for m in messages if m.id == row.reply_id), None)
        shown: dict[str, Any] = dict(row.preview)
        if stored is not None:  # answered before a crash: deliver what was stored
            reply = ReplyView(stored.id, conversation_id, stored.text, str(stored.finish_reason), stored.model_version)
        else:
            reply, shown = await self._generate(row, event, platform, conversation_id, messages)
        if reply.finish_reason == FinishReason.ERROR:
            return platform.notice(event, SORRY, key=notice_key)
        return platform.reply(event, reply, shown=shown)

    async def _generate(
        self, row: InboxRow, event: Inbound, platform: Platform, conversation_id: str, messages: list[Any]
    ) -> tuple[ReplyView, dict[str, Any]]:
        turn = next((m for m in messages if m.id == row.turn_id), None)
        if turn is None:
            branch = latest_branch(messages)
            turn = await self.store.conversations.add_message(
                message_id=row.turn_id,
                conversation_id=conversation_id,
                role=Role.USER,
                text=event.text,
                parent_id=branch[-1].id if branch else None,
                reaction=reaction_after(branch, message_id=row.turn_id, text=event.text, config=self.implicit),
            )
            messages = [*messages, turn]
        context = latest_branch([m for m in messages if m.seq <= turn.seq])
        conversation = await self.store.conversations.get(conversation_id)
        version = self.serving_version(conversation.model_version)
        remember = functools.partial(self.store.inbox.set_preview, row.id)
        preview = platform.preview(event, shown=row.preview, remember=remember)
        try:
            reply = await stream_reply(
                self.store,
                self.engine,
                conversation_id=conversation_id,
                context=context,
                message_id=row.reply_id,
                parent_id=row.turn_id,
                version=version,
                sampling=self.sampling,
                on_delta=preview.add if preview is not None else _ignore,
            )  # no cancel event: a stop cancels this task, so no cut-off reply is stored (it is written again)
        finally:
            shown = await preview.close() if preview is not None else dict(row.preview)
        view = ReplyView(reply.message_id, conversation_id, reply.text, str(reply.finish_reason), reply.version)
        return view, shown

    # --- a rating -------------------------------------------------------------------------------

    async def _rate(self, row: InboxRow, event: Inbound, platform: Platform) -> list[OutboxItem]:
        assert event.message_id is not None and event.user is not None
        try:
            message = await self.store.conversations.get_message(event.message_id)
        except NotFoundError:
            await platform.acknowledge(event, NOT_HERE)
            return []
        thread = await self.store.inbox.thread_of(message.conversation_id)
        if (
            thread is None
            or (thread.channel, thread.site) != (row.channel, row.site)
            or (event.thread is not None and thread.thread != event.thread)
        ):
            # a forged button or another bot's reply: thumbs count only where the reply was given
            await platform.acknowledge(event, NOT_HERE)
            return []
        if await self.rating_limiter.check(event.user) is not None:
            await platform.acknowledge(event, SLOW_DOWN)
            return []
        try:
            await self.store.conversations.add_rating(
                message_id=message.id,
                value=event.value,
                rater=event.user,
                client_id=event.key,  # the platform's event id: a redelivery stores it once
                reason=event.reason,
                comment=event.comment,
            )
        except InvalidError:
            await platform.acknowledge(event, NOT_HERE)
            return []
        await platform.acknowledge(event, THANKS)
        view = ReplyView(
            message.id, message.conversation_id, message.text, str(message.finish_reason), message.model_version
        )
        return platform.vote(event, view)
