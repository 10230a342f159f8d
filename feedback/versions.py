"""The registry of model versions: their states, the live one, the canary, rollback, stats.

``store.versions``. A version is born a ``candidate`` (``register``), and moves through
the states of ``VersionState`` (docs/architecture.md, "Model versions"): one version is live and at
most one is a canary at any time; rolling back a live version hands back to the one it
replaced. Every change is written to the audit log in the same transaction.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from feedback import rows
from feedback.accounts import write_audit
from feedback.browse import THUMBS
from feedback.db import Connection, Database, Row, fetch_one
from feedback.exceptions import InvalidError, NotFoundError
from feedback.records import BASE_VERSION, ModelVersion, VersionState, VersionStats

_NEWEST_IN_STATE = "SELECT * FROM model_versions WHERE state = ? ORDER BY seq DESC LIMIT 1"


def rollback_refusal(name: str, replaced: str | None, target_deleted: float | None) -> str | None:
    """Why the live version ``name`` cannot roll back (None: it can, to ``replaced`` or to base)."""
    if name == BASE_VERSION:
        return "base is the model itself: there is nothing to roll back to"
    if target_deleted is not None:
        return f"{replaced} was trained on erased data and its adapter is deleted: promote another version instead"
    return None


class Versions:
    """Model versions in the feedback database (``store.versions``)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def ensure_base(self, base_model: str) -> ModelVersion:
        """Make sure a version row exists and one version is live (the base model at first)."""
        now = time.time()

        async def op(conn: Connection) -> None:
            row = await fetch_one(conn, "SELECT COUNT(*) FROM model_versions WHERE state = ?", (VersionState.LIVE,))
            has_live = bool(row and row[0])
            await conn.execute(
                "INSERT INTO model_versions (name, seq, state, base_model, created_at, updated_at)"
                # no conflict target: a process started at the same moment may have inserted the
                # row first, and PostgreSQL then reports the clash on seq's unique index, not name's
                " VALUES (?, 0, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (BASE_VERSION, VersionState.RETIRED if has_live else VersionState.LIVE, base_model, now, now),
            )

        await self._db.write(op)
        return await self.live()

    async def register(
        self,
        *,
        adapter_path: str,
        sha256: str,
        parent: str | None,
        base_model: str,
        eval_report: dict[str, Any],
        feedback_ids: dict[str, list[int]],
        training_run_id: int | None,
        name: str | None = None,
    ) -> ModelVersion:
        """Record a trained adapter as a ``candidate``; names are ``v<seq>`` and never reused."""
        now = time.time()

        async def op(conn: Connection) -> str:
            row = await fetch_one(conn, "SELECT COALESCE(MAX(seq), 0) + 1 FROM model_versions")
            seq = int(row[0]) if row else 1
            version_name = name or f"v{seq}"
            await conn.execute(
                "INSERT INTO model_versions (name, seq, state, adapter_path, sha256, parent, base_model,"
                " eval_report, feedback_ids, training_run_id, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    version_name,
                    seq,
                    VersionState.CANDIDATE,
                    adapter_path,
                    sha256,
                    parent,
                    base_model,
                    json.dumps(eval_report),
                    json.dumps(feedback_ids),
                    training_run_id,
                    now,
                    now,
                ),
            )
            await write_audit(conn, "training", "register", version_name, {"sha256": sha256, "parent": parent})
            return version_name

        return await self.get(await self._db.write(op))

    async def next_name(self) -> str:
        """The name ``register`` would give the next version (unless another registers first)."""
        found = await self._db.read("SELECT COALESCE(MAX(seq), 0) + 1 FROM model_versions")
        return f"v{int(found[0][0])}"

    async def set_state(
        self, name: str, state: VersionState, *, actor: str, reasons: Iterable[str] = ()
    ) -> ModelVersion:
        """Move a version to ``state``. Making one live retires the version that was live."""
        reasons = tuple(reasons)
        now = time.time()

        async def op(conn: Connection) -> None:
            row = await fetch_one(conn, "SELECT state FROM model_versions WHERE name = ?", (name,))
            if row is None:
                raise NotFoundError(f"model version {name!r} does not exist")
            if state is VersionState.LIVE:
                old = await fetch_one(
                    conn,
                    "SELECT name FROM model_versions WHERE state = ? AND name != ? ORDER BY seq DESC LIMIT 1",
                    (VersionState.LIVE, name),
                )
                if old is not None:
                    await conn.execute("UPDATE model_versions SET replaced = ? WHERE name = ?", (old[0], name))
            if state in (VersionState.LIVE, VersionState.CANARY):  # one of each: a newer one ends the older
                await conn.execute(
                    "UPDATE model_versions SET state = ?, updated_at = ? WHERE state = ? AND name != ?",
                    (VersionState.RETIRED, now, state, name),
                )
            current = await fetch_one(conn, "SELECT gate_reasons FROM model_versions WHERE name = ?", (name,))
            previous = json.loads(current[0] if current and current[0] else "[]")
            await conn.execute(
                "UPDATE model_versions SET state = ?, gate_reasons = ?, updated_at = ? WHERE name = ?",
                (state, json.dumps(previous + list(reasons)), now, name),
            )
            await write_audit(conn, actor, f"state:{state}", name, {"from": row["state"], "reasons": list(reasons)})

        await self._db.write(op)
        return await self.get(name)

    async def get(self, name: str) -> ModelVersion:
        found = await self._db.read("SELECT * FROM model_versions WHERE name = ?", (name,))
        if not found:
            raise NotFoundError(f"model version {name!r} does not exist")
        return rows.version(found[0])

    async def live(self) -> ModelVersion:
        found = await self._db.read(_NEWEST_IN_STATE, (VersionState.LIVE,))
        if not found:
            raise NotFoundError("no live model version: call ensure_base() first")
        return rows.version(found[0])

    async def canary(self) -> ModelVersion | None:
        found = await self._db.read(_NEWEST_IN_STATE, (VersionState.CANARY,))
        return rows.version(found[0]) if found else None

    async def rollback(self, name: str, *, actor: str, reasons: Iterable[str] = ()) -> ModelVersion:
        """Take a canary or live version out of service. A live one hands back to the version it replaced.

        Returns the version that is live afterwards.
        """
        reasons = list(reasons)
        now = time.time()

        async def op(conn: Connection) -> str:
            row = await fetch_one(
                conn, "SELECT state, replaced, gate_reasons FROM model_versions WHERE name = ?", (name,)
            )
            if row is None:
                raise NotFoundError(f"model version {name!r} does not exist")
            if row["state"] not in (VersionState.CANARY, VersionState.LIVE):
                raise InvalidError(f"version {name} is {row['state']}: only a canary or the live version can roll back")
            if row["state"] == VersionState.LIVE:
                back = await fetch_one(
                    conn,
                    "SELECT adapter_deleted FROM model_versions WHERE name = ?",
                    (row["replaced"] or BASE_VERSION,),
                )
                reason = rollback_refusal(name, row["replaced"], back["adapter_deleted"] if back else None)
                if reason:
                    raise InvalidError(reason)
            notes = json.loads(row["gate_reasons"] or "[]") + reasons
            await conn.execute(
                "UPDATE model_versions SET state = ?, gate_reasons = ?, updated_at = ? WHERE name = ?",
                (VersionState.ROLLED_BACK, json.dumps(notes), now, name),
            )
            await write_audit(
                conn, actor, f"state:{VersionState.ROLLED_BACK}", name, {"from": row["state"], "reasons": reasons}
            )
            if row["state"] == VersionState.LIVE:
                target = row["replaced"] or BASE_VERSION
                await conn.execute(
                    "UPDATE model_versions SET state = ?, updated_at = ? WHERE name = ?",
                    (VersionState.LIVE, now, target),
                )
                await write_audit(
                    conn, actor, f"state:{VersionState.LIVE}", target, {"from": "retired", "reasons": reasons}
                )
            live = await fetch_one(conn, _NEWEST_IN_STATE, (VersionState.LIVE,))
            return str(live["name"]) if live else BASE_VERSION

        return await self.get(await self._db.write(op))

    async def stats(self, name: str, *, since: float = 0.0) -> VersionStats:
        """Replies, thumbs, regenerations, errors and latency of one version (model-written replies)."""
        found = await self._db.read(
            "WITH replies AS (SELECT id, conversation_id, latency_ms, n_tokens, finish_reason FROM messages"
            "  WHERE model_version = ? AND role = 'assistant' AND author IS NULL AND created_at >= ?)"
            # the conversations it replied in: live conversations are not pinned to a version
            " SELECT (SELECT COUNT(DISTINCT conversation_id) FROM replies),"
            "  (SELECT COUNT(*) FROM replies WHERE finish_reason != 'error'),"
            "  (SELECT COUNT(*) FROM ratings WHERE value = 1 AND message_id IN (SELECT id FROM replies)),"
            "  (SELECT COUNT(*) FROM ratings WHERE value = -1 AND message_id IN (SELECT id FROM replies)),"
            "  (SELECT COUNT(DISTINCT regenerated_from) FROM messages"
            "    WHERE regenerated_from IN (SELECT id FROM replies)),"
            "  (SELECT COUNT(*) FROM replies WHERE finish_reason = 'error'),"
            "  (SELECT AVG(latency_ms) FROM replies WHERE finish_reason != 'error'),"
            "  (SELECT AVG(n_tokens) FROM replies WHERE finish_reason != 'error')",
            (name, since),
        )
        r = found[0]
        return VersionStats(name, r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7])

    async def all_stats(self, *, since: float = 0.0) -> dict[str, VersionStats]:
        """``stats`` of every version in one pass over the replies (the Versions page); a version
        without replies gets zeros."""
        # the whole history reads the version index, not a lookup per row through created_at's
        when = "created_at >= ?" if since > 0 else "+created_at >= ?"
        if self._db.backend == "postgresql":  # one grouped pass over ratings, not a subquery per reply
            found = await self._db.read(
                "WITH replies AS (SELECT id, conversation_id, model_version, latency_ms, n_tokens, finish_reason"
                "  FROM messages WHERE role = 'assistant' AND author IS NULL AND model_version IS NOT NULL"
                "  AND created_at >= ?),"
                f" {THUMBS}, regens AS (SELECT DISTINCT regenerated_from AS id FROM messages"
                "  WHERE regenerated_from IS NOT NULL)"
                " SELECT p.model_version, COUNT(DISTINCT p.conversation_id),"
                "  COUNT(*) FILTER (WHERE p.finish_reason != 'error'),"
                "  CAST(COALESCE(SUM(t.ups), 0) AS INTEGER), CAST(COALESCE(SUM(t.downs), 0) AS INTEGER),"
                "  COUNT(g.id), COUNT(*) FILTER (WHERE p.finish_reason = 'error'),"
                "  AVG(CASE WHEN p.finish_reason != 'error' THEN p.latency_ms END),"
                "  AVG(CASE WHEN p.finish_reason != 'error' THEN p.n_tokens END)"
                " FROM replies p LEFT JOIN thumbs t ON t.message_id = p.id LEFT JOIN regens g ON g.id = p.id"
                " GROUP BY p.model_version",
                (since,),
            )
        else:
            found = await self._read_all_stats(when, since)
        out = {name: VersionStats(name, 0, 0, 0, 0, 0, 0, None, None) for name in await self._names()}
        for r in found:
            out[str(r[0])] = VersionStats(str(r[0]), r[1], r[2] or 0, r[3], r[4], r[5], r[6] or 0, r[7], r[8])
        return out

    async def _read_all_stats(self, when: str, since: float) -> list[Row]:
        return await self._db.read(
            "WITH replies AS (SELECT id, conversation_id, model_version, latency_ms, n_tokens, finish_reason"
            "  FROM messages WHERE role = 'assistant' AND author IS NULL AND model_version IS NOT NULL"
            f"  AND {when})"
            " SELECT model_version, COUNT(DISTINCT conversation_id), COUNT(*) FILTER (WHERE finish_reason != 'error'),"
            "  CAST(SUM((SELECT COUNT(*) FROM ratings r WHERE r.message_id = p.id AND r.value = 1)) AS INTEGER),"
            "  CAST(SUM((SELECT COUNT(*) FROM ratings r WHERE r.message_id = p.id AND r.value = -1)) AS INTEGER),"
            "  COUNT(*) FILTER (WHERE EXISTS (SELECT 1 FROM messages x WHERE x.regenerated_from = p.id)),"
            "  COUNT(*) FILTER (WHERE finish_reason = 'error'),"
            "  AVG(CASE WHEN finish_reason != 'error' THEN latency_ms END),"
            "  AVG(CASE WHEN finish_reason != 'error' THEN n_tokens END)"
            " FROM replies p GROUP BY model_version",
            (since,),
        )

    async def _names(self) -> list[str]:
        return [str(r[0]) for r in await self._db.read("SELECT name FROM model_versions ORDER BY seq")]

    async def adapter_deleted(self, name: str, *, actor: str) -> None:
        """Record that the version's adapter files were deleted (it was trained on erased data)."""
        now = time.time()

        async def op(conn: Connection) -> None:
            await conn.execute("UPDATE model_versions SET adapter_deleted = ? WHERE name = ?", (now, name))
            await write_audit(conn, actor, "adapter_deleted", name, {"reason": "trained on erased data"})

        await self._db.write(op)

    async def thumbs(self) -> dict[str, tuple[int, int]]:
        """(thumbs up, thumbs down) on model-written replies, per version, in one pass (for metrics)."""
        found = await self._db.read(
            "SELECT m.model_version, COUNT(*) FILTER (WHERE r.value = 1), COUNT(*) FILTER (WHERE r.value = -1) FROM ratings r"
            " JOIN messages m ON m.id = r.message_id"
            " WHERE m.role = 'assistant' AND m.author IS NULL AND m.model_version IS NOT NULL"
            " GROUP BY m.model_version"
        )
        return {str(r[0]): (int(r[1]), int(r[2])) for r in found}

    async def moves(self) -> dict[str, int]:
        """How many times versions moved to each state (the audit log's ``state:*`` actions)."""
        found = await self._db.read(
            "SELECT substr(action, 7), COUNT(*) FROM audit_log WHERE action LIKE 'state:%' GROUP BY action"
        )
        return {str(r[0]): int(r[1]) for r in found}

    async def all(self) -> list[ModelVersion]:
        """Every version, oldest first."""
        return [rows.version(r) for r in await self._db.read("SELECT * FROM model_versions ORDER BY seq")]

    async def erased_with_files(self) -> list[ModelVersion]:
        """Versions trained on erased data whose adapter files are not deleted yet, oldest first
        (the release polls this; it stays short however many versions there are)."""
        found = await self._db.read(
            "SELECT * FROM model_versions WHERE trained_on_erased IS NOT NULL AND adapter_deleted IS NULL ORDER BY seq"
        )
        return [rows.version(r) for r in found]
