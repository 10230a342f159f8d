"""The inbox of the IM channels: each platform event processed once, and the conversation of each thread.

``store.inbox``. A webhook from Telegram, Slack or a signed-webhook sender is written here
(``receive``) before it is acknowledged, under a key the platform repeats when it
redelivers (Telegram's ``update_id``, a Slack message's channel and ``ts``, ``webhook-id``):
a redelivery, also after a restart, finds its key and is not processed again. The server's
inbox worker (``server.channels.inbox``) then processes each pending event and ends it with
``finish``, which queues the platform calls of the answer (``feedback.outbox``) and marks
the event done in one transaction: an event is either still pending (and processed again
after a crash) or done with its answer queued, never done without it. A done event keeps
only its key (its text is dropped) until ``prune``.

A *thread* is the platform's conversation (a Telegram chat, a Slack thread, a sender's
thread id); ``channel_threads`` maps each learnloop conversation to the thread it belongs
to, and the newest conversation of a thread is the one a new message continues.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from feedback.db import Connection, Database, Row, fetch_one
from feedback.lanes import LaneTable
from feedback.outbox import OutboxItem, insert_items


class InboxState(StrEnum):
    PENDING = "pending"  # received, not yet answered (processed again after a restart)
    DONE = "done"  # answered: its calls are in the outbox; only the key is kept, for dedupe
    FAILED = "failed"  # processing kept failing until outbox.max_age_s


@dataclass(frozen=True)
class InboxItem:
    """A received platform event, as ``receive`` stores it."""

    channel: str
    site: str
    key: str  # the platform's id for the event: a redelivery repeats it
    lane: str  # events of one lane are processed in order, one at a time
    kind: str
    payload: dict[str, Any]
    turn_id: str  # ids of the user turn and the reply this event makes, fixed on arrival so that
    reply_id: str  # processing it again after a crash finds what it already stored
    user_id: str | None = None


@dataclass(frozen=True)
class InboxRow:
    id: int
    channel: str
    site: str
    key: str
    lane: str
    kind: str
    payload: dict[str, Any]
    state: InboxState
    attempts: int
    turn_id: str
    reply_id: str
    received_at: float
    user_id: str | None = None
    conversation_id: str | None = None
    preview: dict[str, Any] = field(default_factory=dict)
    last_error: str | None = None


@dataclass(frozen=True)
class Thread:
    channel: str
    site: str
    thread: str


def _row(r: Row) -> InboxRow:
    return InboxRow(
        id=int(r["id"]),
        channel=r["channel"],
        site=r["site"],
        key=r["key"],
        lane=r["lane"],
        kind=r["kind"],
        payload=json.loads(r["payload"]) if r["payload"] else {},
        state=InboxState(r["state"]),
        attempts=int(r["attempts"]),
        turn_id=r["turn_id"],
        reply_id=r["reply_id"],
        received_at=float(r["received_at"]),
        user_id=r["user_id"],
        conversation_id=r["conversation_id"],
        preview=json.loads(r["preview"]) if r["preview"] else {},
        last_error=r["last_error"],
    )


class Inbox(LaneTable[InboxRow]):
    """Received platform events and platform threads (``store.inbox``)."""

    def __init__(self, db: Database) -> None:
        super().__init__(db, "inbox", _row)

    async def receive(self, item: InboxItem) -> bool:
        """Store a received event; False when its key was received before (a redelivery: do nothing)."""
        now = time.time()

        async def op(conn: Connection) -> bool:
            cursor = await conn.execute(
                "INSERT INTO inbox (channel, site, key, lane, kind, payload, user_id, state, next_attempt_at,"
                " received_at, turn_id, reply_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (channel, site, key) DO NOTHING",
                (
                    item.channel,
                    item.site,
                    item.key,
                    item.lane,
                    item.kind,
                    json.dumps(item.payload, ensure_ascii=False),
                    item.user_id,
                    InboxState.PENDING,
                    now,
                    now,
                    item.turn_id,
                    item.reply_id,
                ),
            )
            return cursor.rowcount == 1

        return await self._db.write(op)

    async def set_conversation(self, row_id: int, conversation_id: str) -> None:
        """The conversation this event goes to, chosen once (a retry after a crash keeps it)."""
        await self._update(row_id, "conversation_id = ?", (conversation_id,))

    async def set_preview(self, row_id: int, preview: dict[str, Any]) -> None:
        """What the platform already shows of the reply (say, the Telegram message that streams it)."""
        await self._update(row_id, "preview = ?", (json.dumps(preview),))

    async def retry_later(self, row_id: int, *, error: str, at: float, count: bool = True) -> None:
        """Process it again at ``at``; ``count``: the failure counts toward giving up (a wait does not)."""
        counted = "attempts = attempts + 1, " if count else ""
        await self._update(row_id, f"{counted}last_error = ?, next_attempt_at = ?", (error[:1000], at))

    async def fail(self, row_id: int, *, error: str) -> None:
        """Give the event up: its text is dropped, its key kept (a redelivery is still a duplicate)."""
        now = time.time()
        await self._update(
            row_id, "state = ?, last_error = ?, finished_at = ?, payload = NULL", (InboxState.FAILED, error[:1000], now)
        )

    async def finish(self, row_id: int, *, send: Sequence[OutboxItem] = ()) -> None:
        """Queue the answer's platform calls and mark the event done, in one transaction."""
        now = time.time()

        async def op(conn: Connection) -> None:
            await insert_items(conn, send, now=now)
            await conn.execute(
                "UPDATE inbox SET state = ?, finished_at = ?, payload = NULL, preview = NULL WHERE id = ?",
                (InboxState.DONE, now, row_id),
            )

        await self._db.write(op)

    async def give_up(self, *, received_before: float) -> list[InboxRow]:
        """Pending events received before ``received_before`` become failed; returns them (for the log)."""

        async def op(conn: Connection) -> list[InboxRow]:
            cursor = await conn.execute(
                "SELECT * FROM inbox WHERE state = 'pending' AND received_at < ? ORDER BY id", (received_before,)
            )
            stale = [_row(r) for r in await cursor.fetchall()]
            now = time.time()
            for row in stale:
                await conn.execute(
                    "UPDATE inbox SET state = ?, finished_at = ?, payload = NULL, last_error = ? WHERE id = ?",
                    (InboxState.FAILED, now, f"gave up: {row.last_error or 'not processed in time'}"[:1000], row.id),
                )
            return stale

        return await self._db.write(op)

    async def prune(self, *, finished_before: float) -> int:
        """Forget the keys of events finished before ``finished_before`` (redeliveries end long before)."""

        async def op(conn: Connection) -> int:
            cursor = await conn.execute(
                "DELETE FROM inbox WHERE state != 'pending' AND finished_at < ?", (finished_before,)
            )
            return int(cursor.rowcount)

        return await self._db.write(op)

    # --- threads --------------------------------------------------------------------------

    async def map_thread(self, conversation_id: str, thread: Thread) -> None:
        """``conversation_id`` belongs to ``thread``, and is now its newest conversation."""
        now = time.time()

        async def op(conn: Connection) -> None:
            await conn.execute(
                "INSERT INTO channel_threads (conversation_id, channel, site, thread, created_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (conversation_id) DO NOTHING",
                (conversation_id, thread.channel, thread.site, thread.thread, now),
            )

        await self._db.write(op)

    async def thread_conversation(self, thread: Thread) -> str | None:
        """The newest conversation of ``thread``, or None."""
        found = await self._db.read(
            "SELECT conversation_id FROM channel_threads WHERE channel = ? AND site = ? AND thread = ?"
            " ORDER BY created_at DESC, rowid DESC LIMIT 1",
            (thread.channel, thread.site, thread.thread),
        )
        return str(found[0][0]) if found else None

    async def thread_of(self, conversation_id: str) -> Thread | None:
        """The platform thread a conversation belongs to (None: not an IM conversation)."""
        found = await self._db.read(
            "SELECT channel, site, thread FROM channel_threads WHERE conversation_id = ?", (conversation_id,)
        )
        return Thread(found[0][0], found[0][1], found[0][2]) if found else None


async def forget_user(conn: Connection, user_id: str) -> int:
    """Inside a write operation (an erasure): drop the user's received events (pending ones hold
    their text, done ones their id); how many."""
    row = await fetch_one(conn, "SELECT COUNT(*) FROM inbox WHERE user_id = ?", (user_id,))
    await conn.execute("DELETE FROM inbox WHERE user_id = ?", (user_id,))
    return int(row[0]) if row else 0
