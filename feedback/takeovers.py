"""Takeovers: the conversations an operator answers instead of the model (``store.takeovers``).

The row is the takeover: every server process on the store reads the same one, and it outlives
the process that wrote it (a restart does not hand a conversation back to the model; ``leave``
does, or erasing the conversation). One statement decides who holds a conversation, so two
operators joining at once on two processes cannot both win.

On PostgreSQL a change also goes out as a notification (``NOTIFY``) in the same transaction: it
reaches the other processes once, and only if, the change committed. The payload is the
caller's (``server/presence.py`` writes and reads it); the channel is the database's
(``Database.notify_channel``), one per schema. On SQLite (one process) nothing is sent.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from feedback import rows
from feedback.db import Connection, Database, fetch_one
from feedback.exceptions import InvalidError, NotFoundError
from feedback.records import Takeover


class Takeovers:
    """Who answers which conversation (``store.takeovers``)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def join(
        self, conversation_id: str, operator: str, *, notice: Callable[[Takeover], str] | None = None
    ) -> Takeover:
        """``operator`` takes the conversation over (again: the first join's time is kept).

        ``InvalidError`` when another operator holds it, ``NotFoundError`` for an unknown
        conversation; ``notice`` is sent to the other processes when the join commits.
        """
        now = time.time()

        async def op(conn: Connection) -> Takeover:
            if await fetch_one(conn, "SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)) is None:
                raise NotFoundError(f"conversation {conversation_id!r} does not exist")
            await conn.execute(
                "INSERT INTO takeovers (conversation_id, operator, since) VALUES (?, ?, ?)"
                " ON CONFLICT (conversation_id) DO NOTHING",
                (conversation_id, operator, now),
            )
            row = await fetch_one(conn, "SELECT * FROM takeovers WHERE conversation_id = ?", (conversation_id,))
            assert row is not None
            held = rows.takeover(row)
            if held.operator != operator:
                raise InvalidError(f"operator {held.operator} is already answering this conversation")
            await self._notify(conn, None if notice is None else notice(held))
            return held

        return await self._db.write(op)

    async def leave(self, conversation_id: str, *, notice: str | None = None) -> bool:
        """Hand the conversation back to the model; False if no operator held it (nothing is sent)."""

        async def op(conn: Connection) -> bool:
            cursor = await conn.execute("DELETE FROM takeovers WHERE conversation_id = ?", (conversation_id,))
            if cursor.rowcount == 0:
                return False
            await self._notify(conn, notice)
            return True

        return await self._db.write(op)

    async def announce(self, notice: str) -> None:
        """Send ``notice`` to the other processes (PostgreSQL), e.g. after an operator's reply was stored."""
        if self._db.notify_channel is None:
            return

        async def op(conn: Connection) -> None:
            await self._notify(conn, notice)

        await self._db.write(op)

    async def get(self, conversation_id: str) -> Takeover | None:
        found = await self._db.read("SELECT * FROM takeovers WHERE conversation_id = ?", (conversation_id,))
        return rows.takeover(found[0]) if found else None

    async def all(self) -> list[Takeover]:
        """Every takeover in force (a process loads them at start and after its notifications were cut)."""
        return [rows.takeover(r) for r in await self._db.read("SELECT * FROM takeovers ORDER BY since")]

    async def _notify(self, conn: Connection, notice: str | None) -> None:
        channel = self._db.notify_channel
        if notice is not None and channel is not None:
            await conn.execute("SELECT pg_notify(?, ?)", (channel, notice))
