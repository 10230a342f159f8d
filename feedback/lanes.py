"""What the inbox and the outbox share: a table of rows in *lanes*, each lane worked in order.

A lane is one chat or thread: its rows are processed one at a time, oldest first, so the
head of each lane (its oldest pending row) is what a worker may take next. ``LaneTable``
holds the queries both tables ask the same way; each table names itself and how a stored
row becomes its record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import StrEnum
from typing import Any, Generic, TypeVar

from feedback.db import Connection, Database, Row

RowT = TypeVar("RowT")


class LaneTable(Generic[RowT]):
    """Rows of ``table`` (``inbox`` or ``outbox``) read as ``parse`` makes them."""

    def __init__(self, db: Database, table: str, parse: Callable[[Row], RowT]) -> None:
        self._db = db
        self._table = table
        self._parse = parse
        # the oldest pending row of each lane: rows behind it wait their turn
        self._heads = (
            f"SELECT * FROM {table} WHERE id IN (SELECT MIN(id) FROM {table} WHERE state = 'pending' GROUP BY lane)"
        )

    async def due(self, now: float, *, skip_lanes: Iterable[str] = (), limit: int = 64) -> list[RowT]:
        """The head row of each lane that is due, oldest first (lanes in ``skip_lanes`` left out)."""
        skip = sorted(set(skip_lanes))
        busy = f" AND lane NOT IN ({','.join('?' * len(skip))})" if skip else ""
        found = await self._db.read(
            f"{self._heads} AND next_attempt_at <= ?{busy} ORDER BY id LIMIT ?", (now, *skip, limit)
        )
        return [self._parse(r) for r in found]

    async def next_due_at(self) -> float | None:
        """When the earliest lane head is due (None: nothing is pending)."""
        found = await self._db.read(f"SELECT MIN(next_attempt_at) FROM ({self._heads}) AS heads")
        return float(found[0][0]) if found and found[0][0] is not None else None

    async def get(self, row_id: int) -> RowT | None:
        found = await self._db.read(f"SELECT * FROM {self._table} WHERE id = ?", (row_id,))
        return self._parse(found[0]) if found else None

    async def rows(self, *, state: StrEnum | None = None, limit: int = 50) -> list[RowT]:
        """The newest rows (of one state), newest first."""
        if state is None:
            found = await self._db.read(f"SELECT * FROM {self._table} ORDER BY id DESC LIMIT ?", (limit,))
        else:
            found = await self._db.read(
                f"SELECT * FROM {self._table} WHERE state = ? ORDER BY id DESC LIMIT ?", (state, limit)
            )
        return [self._parse(r) for r in found]

    async def _update(self, row_id: int, assignments: str, params: tuple[Any, ...] = ()) -> None:
        async def op(conn: Connection) -> None:
            await conn.execute(f"UPDATE {self._table} SET {assignments} WHERE id = ?", (*params, row_id))

        await self._db.write(op)
