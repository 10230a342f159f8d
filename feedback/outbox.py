"""The outbox: every call to an IM platform waits here until it is delivered or given up.

``store.outbox``. A row is one platform call (a Telegram ``sendMessage``, a Slack
``chat.postMessage``, a signed webhook POST) with its JSON body, written in the same
transaction as whatever made it necessary (``store.inbox.finish``), so a reply that was
stored is never without its delivery. The server's delivery worker (``server.channels.outbox``)
takes the oldest pending row of each *lane* (one chat, one thread: replies arrive in
order), and for each attempt:

1. ``begin_attempt``: the attempt is counted and the row marked ``uncertain`` (committed
   before the request leaves);
2. the request;
3. ``delivered`` (the very next step after a success: nothing runs between the answer and
   this commit), or ``retry_later`` with the next time (``uncertain`` cleared when the
   request certainly did not arrive, such as a refused connection), or ``fail``.

A row still ``uncertain`` when it is picked again was interrupted between 1 and 3 (a crash,
a timeout): the platform may have it. Each platform decides what a repeat costs (see
``server.channels.outbox``). Every row has a unique ``key`` (``INSERT ... ON CONFLICT DO
NOTHING``): writing the same reply twice queues one call. Rows of an erased conversation go
with it (``ON DELETE CASCADE``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from feedback.db import Connection, Database, Row
from feedback.lanes import LaneTable


class OutboxState(StrEnum):
    PENDING = "pending"  # waiting for its (next) attempt
    DELIVERED = "delivered"  # the platform accepted it
    FAILED = "failed"  # refused for good, or given up after outbox.max_age_s: an operator looks


@dataclass(frozen=True)
class OutboxItem:
    """A platform call to make: what ``enqueue`` and ``store.inbox.finish`` take."""

    key: str  # unique: the same key queued twice is one call
    channel: str  # telegram, slack, webhook
    site: str  # the bot, app or webhook name
    lane: str  # calls of one lane are made in order, one at a time
    method: str  # e.g. sendMessage, chat.postMessage, reply.created
    body: dict[str, Any] = field(default_factory=dict)
    conversation_id: str | None = None


@dataclass(frozen=True)
class OutboxRow:
    """A stored outbox row."""

    id: int
    key: str
    channel: str
    site: str
    lane: str
    method: str
    body: dict[str, Any]
    state: OutboxState
    attempts: int
    uncertain: bool  # the last attempt may have reached the platform
    created_at: float
    next_attempt_at: float
    conversation_id: str | None = None
    last_error: str | None = None
    delivered_at: float | None = None
    response: dict[str, Any] | None = None


def _row(r: Row) -> OutboxRow:
    return OutboxRow(
        id=int(r["id"]),
        key=r["key"],
        channel=r["channel"],
        site=r["site"],
        lane=r["lane"],
        method=r["method"],
        body=json.loads(r["body"]),
        state=OutboxState(r["state"]),
        attempts=int(r["attempts"]),
        uncertain=bool(r["uncertain"]),
        created_at=float(r["created_at"]),
        next_attempt_at=float(r["next_attempt_at"]),
        conversation_id=r["conversation_id"],
        last_error=r["last_error"],
        delivered_at=r["delivered_at"],
        response=json.loads(r["response"]) if r["response"] else None,
    )


async def insert_items(conn: Connection, items: Iterable[OutboxItem], *, now: float) -> int:
    """Inside a write operation: queue ``items`` (a key already queued is skipped); how many are new."""
    added = 0
    for item in items:
        cursor = await conn.execute(
            "INSERT INTO outbox (key, channel, site, lane, conversation_id, method, body, state, created_at,"
            " next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING",
            (
                item.key,
                item.channel,
                item.site,
                item.lane,
                item.conversation_id,
                item.method,
                json.dumps(item.body, ensure_ascii=False),
                OutboxState.PENDING,
                now,
                now,
            ),
        )
        added += cursor.rowcount
    return added


class Outbox(LaneTable[OutboxRow]):
    """Platform calls waiting for delivery (``store.outbox``)."""

    def __init__(self, db: Database) -> None:
        super().__init__(db, "outbox", _row)

    async def enqueue(self, items: Sequence[OutboxItem]) -> int:
        """Queue ``items`` in one transaction; returns how many were new (a known key is skipped)."""
        now = time.time()

        async def op(conn: Connection) -> int:
            return await insert_items(conn, items, now=now)

        return await self._db.write(op)

    async def counts(self) -> dict[str, int]:
        found = await self._db.read("SELECT state, COUNT(*) FROM outbox GROUP BY state")
        return {str(state): 0 for state in OutboxState} | {r[0]: int(r[1]) for r in found}

    async def begin_attempt(self, row_id: int) -> None:
        """Count an attempt and mark it possibly delivered, before the request leaves."""
        await self._update(row_id, "attempts = attempts + 1, uncertain = 1")

    async def delivered(self, row_id: int, response: dict[str, Any] | None = None) -> None:
        now = time.time()
        await self._update(
            row_id,
            "state = ?, uncertain = 0, delivered_at = ?, response = ?, last_error = NULL",
            (OutboxState.DELIVERED, now, json.dumps(response) if response is not None else None),
        )

    async def retry_later(self, row_id: int, *, error: str, at: float, uncertain: bool) -> None:
        """Try again at ``at``; ``uncertain``: the failed attempt may still have reached the platform."""
        await self._update(
            row_id, "next_attempt_at = ?, last_error = ?, uncertain = ?", (at, error[:1000], int(uncertain))
        )

    async def fail(self, row_id: int, *, error: str) -> None:
        await self._update(row_id, "state = ?, last_error = ?", (OutboxState.FAILED, error[:1000]))

    async def give_up(self, *, created_before: float) -> list[OutboxRow]:
        """Pending rows created before ``created_before`` become failed; returns them (for the log)."""

        async def op(conn: Connection) -> list[OutboxRow]:
            cursor = await conn.execute(
                "SELECT * FROM outbox WHERE state = 'pending' AND created_at < ? ORDER BY id", (created_before,)
            )
            stale = [_row(r) for r in await cursor.fetchall()]
            for row in stale:
                error = f"gave up after {row.attempts} attempts; last error: {row.last_error or 'none'}"
                await conn.execute(
                    "UPDATE outbox SET state = ?, last_error = ? WHERE id = ?",
                    (OutboxState.FAILED, error[:1000], row.id),
                )
            return stale

        return await self._db.write(op)

    async def requeue(self, row_ids: Sequence[int]) -> int:
        """Failed rows go back to pending, due now, with a fresh age (an operator's retry); how many."""
        now = time.time()

        async def op(conn: Connection) -> int:
            changed = 0
            for row_id in row_ids:
                cursor = await conn.execute(
                    "UPDATE outbox SET state = 'pending', created_at = ?, next_attempt_at = ? WHERE id = ?"
                    " AND state = 'failed'",
                    (now, now, row_id),
                )
                changed += cursor.rowcount
            return changed

        return await self._db.write(op)

    async def prune(self, *, delivered_before: float) -> int:
        """Forget delivered rows (they hold reply text) delivered before ``delivered_before``."""

        async def op(conn: Connection) -> int:
            cursor = await conn.execute(
                "DELETE FROM outbox WHERE state = 'delivered' AND delivered_at < ?", (delivered_before,)
            )
            return int(cursor.rowcount)

        return await self._db.write(op)
