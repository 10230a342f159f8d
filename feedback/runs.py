"""Training runs and the lease that keeps training to one run at a time.

``store.runs``: a run starts with the feedback watermarks it was built from, reports
progress, may be asked to cancel, and ends in a ``RunState``. The lease is taken across
server processes and CLIs through the same database.
"""

from __future__ import annotations

import json
import time
from typing import Any

from feedback import rows
from feedback.accounts import write_audit
from feedback.db import Connection, Database, fetch_one
from feedback.exceptions import NotFoundError
from feedback.records import RunState, TrainingRun


class Runs:
    """Training runs and leases in the feedback database (``store.runs``)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def start(self, *, max_rating_id: int, max_correction_id: int) -> int:
        """A new ``running`` run over the feedback up to these ids; returns its id."""
        now = time.time()

        async def op(conn: Connection) -> int:
            row = await fetch_one(
                conn,
                "INSERT INTO training_runs (state, started_at, max_rating_id, max_correction_id) VALUES (?, ?, ?, ?)"
                " RETURNING id",
                (RunState.RUNNING, now, max_rating_id, max_correction_id),
            )
            assert row is not None
            return int(row[0])

        return await self._db.write(op)

    async def update(self, run_id: int, *, progress: dict[str, Any]) -> None:
        async def op(conn: Connection) -> None:
            await conn.execute("UPDATE training_runs SET progress = ? WHERE id = ?", (json.dumps(progress), run_id))

        await self._db.write(op)

    async def finish(
        self, run_id: int, *, state: RunState, version: str | None = None, detail: str | None = None
    ) -> None:
        now = time.time()

        async def op(conn: Connection) -> None:
            await conn.execute(
                "UPDATE training_runs SET state = ?, finished_at = ?, version = ?, detail = ? WHERE id = ?",
                (state, now, version, detail, run_id),
            )

        await self._db.write(op)

    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take (or renew) a named lease; False while another holder's lease is unexpired.

        This is what keeps training to one run at a time across server processes and CLIs. One
        statement decides: on PostgreSQL two processes asking at once would both have read the
        lease free before either wrote it (READ COMMITTED); the upsert's ``WHERE`` is checked on
        the row as it is once the other's insert or update committed.
        """
        now = time.time()

        async def op(conn: Connection) -> bool:
            row = await fetch_one(
                conn,
                "INSERT INTO leases (name, holder, expires_at) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at"
                " WHERE leases.holder = excluded.holder OR leases.expires_at <= ? RETURNING holder",
                (name, holder, now + ttl_s, now),
            )
            return row is not None

        return await self._db.write(op)

    async def release_lease(self, name: str, holder: str) -> None:
        async def op(conn: Connection) -> None:
            await conn.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))

        await self._db.write(op)

    async def fail_interrupted(self) -> int:
        """Runs left 'running' by a process that died (its lease expired) become failed."""
        now = time.time()

        async def op(conn: Connection) -> int:
            cursor = await conn.execute(
                "UPDATE training_runs SET state = ?, finished_at = ?, detail = 'interrupted: the training process died'"
                " WHERE state IN (?, ?)",
                (RunState.FAILED, now, RunState.RUNNING, RunState.CANCELLING),
            )
            return int(cursor.rowcount)

        return await self._db.write(op)

    async def request_cancel(self, run_id: int, *, actor: str) -> bool:
        """Ask a running run to stop (the cycle kills its job); False when it is not running."""

        async def op(conn: Connection) -> bool:
            cursor = await conn.execute(
                "UPDATE training_runs SET state = ? WHERE id = ? AND state = ?",
                (RunState.CANCELLING, run_id, RunState.RUNNING),
            )
            if cursor.rowcount:
                await write_audit(conn, actor, "cancel-run", str(run_id), {})
            return bool(cursor.rowcount)

        return await self._db.write(op)

    async def get(self, run_id: int) -> TrainingRun:
        found = await self._db.read("SELECT * FROM training_runs WHERE id = ?", (run_id,))
        if not found:
            raise NotFoundError(f"training run {run_id} does not exist")
        return rows.run(found[0])

    async def last_consumed(self) -> TrainingRun | None:
        """The newest run whose data counts as used (it trained, whatever the gate said)."""
        found = await self._db.read(
            "SELECT * FROM training_runs WHERE state = ? ORDER BY id DESC LIMIT 1", (RunState.SUCCEEDED,)
        )
        return rows.run(found[0]) if found else None

    async def counts(self) -> dict[str, int]:
        """Training runs per state."""
        found = await self._db.read("SELECT state, COUNT(*) FROM training_runs GROUP BY state")
        return {str(r[0]): int(r[1]) for r in found}

    async def recent(self, limit: int = 20) -> list[TrainingRun]:
        """The newest ``limit`` runs, newest first."""
        found = await self._db.read("SELECT * FROM training_runs ORDER BY id DESC LIMIT ?", (limit,))
        return [rows.run(r) for r in found]
