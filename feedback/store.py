"""Async feedback store on SQLite (aiosqlite).

Writes go through one writer task that groups whatever is queued into a single
``BEGIN IMMEDIATE`` transaction (group commit) and resolves each caller's future only
after ``COMMIT`` returned; so an acknowledgement sent after ``await store.add_rating(...)``
is never for a row that a crash could lose (``synchronous=FULL`` in WAL mode). Each
operation runs inside its own ``SAVEPOINT``: one failing operation does not roll back
the others that share its commit. Reads use a second connection and never wait for
the writer (WAL).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from feedback.accounts import AccountsMixin
from feedback.accounts import write_audit as _audit
from feedback.browse import BrowseMixin
from feedback.exceptions import InvalidError, NotFoundError, StoreError
from feedback.records import (
    BASE_VERSION,
    Conversation,
    Correction,
    FeedbackSnapshot,
    FinishReason,
    Message,
    ModelVersion,
    RaterState,
    Rating,
    Role,
    RunState,
    TrainingRun,
    VersionState,
    VersionStats,
    operator_author,
    subject_hash,
)
from feedback.schema import MIGRATIONS, SCHEMA_VERSION

log = logging.getLogger("learnloop.feedback")

T = TypeVar("T")
WriteOp = Callable[[aiosqlite.Connection], Awaitable[Any]]


@dataclass
class _Pending:
    op: WriteOp
    future: asyncio.Future[Any]
    outside_transaction: bool = False  # e.g. a WAL checkpoint: runs alone, between batches


_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA secure_delete=ON",  # erased rows are overwritten, not just unlinked
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
    "PRAGMA busy_timeout=10000",
)


async def _connect(path: Path) -> aiosqlite.Connection:
    conn = await aiosqlite.connect(path, isolation_level=None)
    conn.row_factory = sqlite3.Row
    for pragma in _PRAGMAS:
        await conn.execute(pragma)
    return conn


class FeedbackStore(AccountsMixin, BrowseMixin):
    """The durable store. Open with ``await FeedbackStore.open(path)``; close with ``close()``."""

    def __init__(
        self, path: Path, writer: aiosqlite.Connection, reader: aiosqlite.Connection, *, max_batch: int = 512
    ) -> None:
        self.path = path
        self._writer = writer
        self._reader = reader
        self._max_batch = max_batch
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._task = asyncio.create_task(self._write_loop(), name="feedback-writer")
        self._read_lock = asyncio.Lock()
        self.commits = 0  # number of transactions committed (group commit makes it < writes)

    # --- life cycle -------------------------------------------------------------------

    @classmethod
    async def open(cls, path: str | Path) -> FeedbackStore:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = await _connect(path)
        try:
            await _migrate(writer)
            reader = await _connect(path)
        except BaseException:
            await writer.close()  # its thread would otherwise keep the process alive
            raise
        store = cls(path, writer, reader)
        try:
            await store._reapply_tombstones()
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        await self._queue.put(None)
        await self._task
        await self._reader.close()
        await self._writer.close()

    async def __aenter__(self) -> FeedbackStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- the writer -------------------------------------------------------------------

    async def _write(self, op: WriteOp, *, outside_transaction: bool = False) -> Any:
        if self._task.done():
            raise StoreError("the store is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(op, future, outside_transaction))
        return await future

    async def _write_loop(self) -> None:
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            if first.outside_transaction:
                await self._run_alone(first)
                continue
            batch = [first]
            alone: _Pending | None = None
            while len(batch) < self._max_batch and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:
                    stopping = True
                    break
                if item.outside_transaction:
                    alone = item
                    break
                batch.append(item)
            await self._run_batch(batch)
            if alone is not None:
                await self._run_alone(alone)

    async def _run_alone(self, item: _Pending) -> None:
        try:
            item.future.set_result(await item.op(self._writer))
        except Exception as exc:
            item.future.set_exception(exc)

    async def _run_batch(self, batch: list[_Pending]) -> None:
        conn = self._writer
        results: list[tuple[_Pending, Any, BaseException | None]] = []
        try:
            await conn.execute("BEGIN IMMEDIATE")
            for item in batch:
                await conn.execute("SAVEPOINT op")
                try:
                    result = await item.op(conn)
                except Exception as exc:  # the caller gets it; the batch goes on
                    await conn.execute("ROLLBACK TO op")
                    await conn.execute("RELEASE op")
                    results.append((item, None, exc))
                else:
                    await conn.execute("RELEASE op")
                    results.append((item, result, None))
            await conn.execute("COMMIT")
            self.commits += 1
        except Exception as exc:
            log.exception("group commit of %d operations failed", len(batch))
            with contextlib.suppress(Exception):
                await conn.execute("ROLLBACK")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(StoreError(f"commit failed: {exc}"))
            return
        for item, result, error in results:
            if item.future.done():
                continue
            if error is not None:
                item.future.set_exception(error)
            else:
                item.future.set_result(result)

    async def _read(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        async with self._read_lock:
            cursor = await self._reader.execute(sql, tuple(params))
            rows = await cursor.fetchall()
            await cursor.close()
        return list(rows)

    # --- conversations and messages ---------------------------------------------------

    async def create_conversation(
        self,
        conversation_id: str,
        *,
        user_id: str | None = None,
        channel: str = "websocket",
        tenant: str | None = None,
        model_version: str | None = None,
        site: str | None = None,
    ) -> Conversation:
        now = time.time()

        async def op(conn: aiosqlite.Connection) -> None:
            await conn.execute(
                "INSERT INTO conversations (id, user_id, channel, tenant, created_at, model_version, site)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (conversation_id, user_id, channel, tenant, now, model_version, site),
            )

        await self._write(op)
        return Conversation(conversation_id, user_id, channel, now, tenant, model_version, site)

    async def get_conversation(self, conversation_id: str) -> Conversation:
        rows = await self._read("SELECT * FROM conversations WHERE id = ?", (conversation_id,))
        if not rows:
            raise NotFoundError(f"conversation {conversation_id!r} does not exist")
        return _conversation(rows[0])

    async def add_message(
        self,
        *,
        message_id: str,
        conversation_id: str,
        role: Role,
        text: str,
        parent_id: str | None,
        regenerated_from: str | None = None,
        model_version: str | None = None,
        latency_ms: float | None = None,
        finish_reason: str | None = None,
        n_tokens: int | None = None,
        author: str | None = None,
    ) -> Message:
        now = time.time()
        finish = None if finish_reason is None else FinishReason(finish_reason)  # ValueError for an unknown one

        async def op(conn: aiosqlite.Connection) -> int:
            cursor = await conn.execute(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM messages WHERE conversation_id = ?", (conversation_id,)
            )
            row = await cursor.fetchone()
            seq = int(row[0]) if row else 1
            try:
                await conn.execute(
                    "INSERT INTO messages (id, conversation_id, seq, role, text, parent_id, regenerated_from,"
                    " model_version, latency_ms, finish_reason, n_tokens, created_at, author)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        message_id,
                        conversation_id,
                        seq,
                        str(role),
                        text,
                        parent_id,
                        regenerated_from,
                        model_version,
                        latency_ms,
                        finish_reason,
                        n_tokens,
                        now,
                        author,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise NotFoundError(
                    f"conversation {conversation_id!r} or parent message does not exist: {exc}"
                ) from exc
            return seq

        seq = await self._write(op)
        return Message(
            message_id,
            conversation_id,
            seq,
            role,
            text,
            parent_id,
            regenerated_from,
            model_version,
            latency_ms,
            finish,
            n_tokens,
            now,
            author,
        )

    async def add_operator_reply(
        self, *, conversation_id: str, text: str, operator: str, message_id: str, live: bool = False
    ) -> Message:
        """An operator's own answer in a conversation (takeover); it trains as a demonstration.

        Offline (``live=False``) it answers the customer's latest message, beside any reply the
        model gave. In a live takeover it continues the conversation after its latest message.
        """
        text = text.strip()
        if not text:
            raise InvalidError("an operator reply needs a non-empty text")
        messages = [
            m for m in await self.conversation_messages(conversation_id) if m.finish_reason is not FinishReason.ERROR
        ]
        users = [m for m in messages if m.role is Role.USER]
        if not users:
            raise NotFoundError(f"conversation {conversation_id!r} has no user message to answer")
        return await self.add_message(
            message_id=message_id,
            conversation_id=conversation_id,
            role=Role.ASSISTANT,
            text=text,
            parent_id=messages[-1].id if live else users[-1].id,
            author=operator_author(operator),
            finish_reason=FinishReason.OPERATOR,
        )

    async def get_message(self, message_id: str) -> Message:
        rows = await self._read("SELECT * FROM messages WHERE id = ?", (message_id,))
        if not rows:
            raise NotFoundError(f"message {message_id!r} does not exist")
        return _message(rows[0])

    async def conversation_messages(self, conversation_id: str) -> list[Message]:
        rows = await self._read("SELECT * FROM messages WHERE conversation_id = ? ORDER BY seq", (conversation_id,))
        return [_message(r) for r in rows]

    # --- feedback ---------------------------------------------------------------------

    async def add_rating(
        self,
        *,
        message_id: str,
        value: int,
        rater: str,
        client_id: str,
        reason: str | None = None,
        comment: str | None = None,
    ) -> tuple[Rating, bool]:
        """Store a thumbs rating; idempotent on ``(message_id, client_id)``.

        Returns the stored rating and whether this call created it (False for a replay).
        """
        if value not in (1, -1):
            raise InvalidError(f"rating value must be 1 or -1, got {value!r}")
        now = time.time()

        async def op(conn: aiosqlite.Connection) -> tuple[Rating, bool]:
            await _require_assistant_message(conn, message_id)
            cursor = await conn.execute(
                "INSERT INTO ratings (message_id, value, reason, comment, rater, client_id, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (message_id, client_id) DO NOTHING",
                (message_id, value, reason, comment, rater, client_id, now),
            )
            created = cursor.rowcount == 1
            cursor = await conn.execute(
                "SELECT * FROM ratings WHERE message_id = ? AND client_id = ?", (message_id, client_id)
            )
            row = await cursor.fetchone()
            assert row is not None
            return _rating(row), created

        result: tuple[Rating, bool] = await self._write(op)
        return result

    async def add_correction(
        self, *, message_id: str, text: str, operator: str, reason: str | None = None
    ) -> Correction:
        """Store an operator's better answer for an assistant message (``reason``: a tag, e.g. wrong-fact)."""
        text = text.strip()
        if not text:
            raise InvalidError("a correction needs a non-empty text")
        reason = (reason or "").strip() or None
        if reason is not None and len(reason) > 200:
            raise InvalidError("a correction reason is at most 200 characters")
        now = time.time()

        async def op(conn: aiosqlite.Connection) -> int:
            await _require_assistant_message(conn, message_id)
            cursor = await conn.execute(
                "INSERT INTO corrections (message_id, text, operator, created_at, reason) VALUES (?, ?, ?, ?, ?)",
                (message_id, text, operator, now, reason),
            )
            await _audit(conn, operator, "correct", message_id, {"chars": len(text), "reason": reason})
            return int(cursor.lastrowid or 0)

        correction_id = await self._write(op)
        return Correction(correction_id, message_id, text, operator, now, reason)

    async def count_new_feedback(self, *, after_rating_id: int, after_correction_id: int, after_time: float) -> int:
        rows = await self._read(
            "SELECT (SELECT COUNT(*) FROM ratings WHERE id > ?)"
            " + (SELECT COUNT(*) FROM corrections WHERE id > ?)"
            " + (SELECT COUNT(*) FROM messages WHERE (regenerated_from IS NOT NULL OR author LIKE 'operator:%')"
            " AND created_at > ?)",
            (after_rating_id, after_correction_id, after_time),
        )
        return int(rows[0][0])

    async def export_feedback(self) -> FeedbackSnapshot:
        """All conversations that carry any feedback, read in one snapshot."""
        async with self._read_lock:
            conn = self._reader
            await conn.execute("BEGIN")
            try:
                cur = await conn.execute(
                    "SELECT m.* FROM messages m WHERE m.conversation_id IN ("
                    " SELECT DISTINCT x.conversation_id FROM messages x"
                    " WHERE x.regenerated_from IS NOT NULL OR x.author LIKE 'operator:%'"
                    " OR x.id IN (SELECT message_id FROM ratings)"
                    " OR x.id IN (SELECT message_id FROM corrections))"
                    " ORDER BY m.conversation_id, m.seq"
                )
                messages = tuple(_message(r) for r in await cur.fetchall())
                cur = await conn.execute("SELECT * FROM ratings ORDER BY id")
                ratings = tuple(_rating(r) for r in await cur.fetchall())
                cur = await conn.execute("SELECT * FROM corrections ORDER BY id")
                corrections = tuple(_correction(r) for r in await cur.fetchall())
                conversation_ids = sorted({m.conversation_id for m in messages})
                conversations = []
                for i in range(0, len(conversation_ids), 500):
                    chunk = conversation_ids[i : i + 500]
                    cur = await conn.execute(
                        f"SELECT * FROM conversations WHERE id IN ({','.join('?' * len(chunk))})", chunk
                    )
                    conversations += [_conversation(r) for r in await cur.fetchall()]
                cur = await conn.execute("SELECT message_id FROM training_exclusions")
                excluded = frozenset(r[0] for r in await cur.fetchall())
                cur = await conn.execute("SELECT rater, state FROM rater_reviews")
                rater_states = {r[0]: RaterState(r[1]) for r in await cur.fetchall()}
                cur = await conn.execute("SELECT subject_hash FROM erasures")
                erased = frozenset(r[0] for r in await cur.fetchall())
            finally:
                await conn.execute("COMMIT")
        return FeedbackSnapshot(
            messages=messages,
            ratings=ratings,
            corrections=corrections,
            max_rating_id=max((r.id for r in ratings), default=0),
            max_correction_id=max((c.id for c in corrections), default=0),
            conversations=tuple(conversations),
            excluded_messages=excluded,
            rater_states=rater_states,
            erased_subjects=erased,
        )

    # --- trust: exclusions and rater reviews ------------------------------------------

    async def exclude_message(self, message_id: str, *, reason: str, operator: str) -> None:
        """Keep a message (and every row built from it) out of training."""
        now = time.time()

        async def op(conn: aiosqlite.Connection) -> None:
            cursor = await conn.execute("SELECT 1 FROM messages WHERE id = ?", (message_id,))
            if await cursor.fetchone() is None:
                raise NotFoundError(f"message {message_id!r} does not exist")
            await conn.execute(
                "INSERT INTO training_exclusions (message_id, reason, operator, created_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (message_id) DO UPDATE SET reason = excluded.reason, operator = excluded.operator",
                (message_id, reason, operator, now),
            )
            await _audit(conn, operator, "exclude", message_id, {"reason": reason})

        await self._write(op)

    async def include_message(self, message_id: str, *, operator: str) -> None:
        async def op(conn: aiosqlite.Connection) -> None:
            await conn.execute("DELETE FROM training_exclusions WHERE message_id = ?", (message_id,))
            await _audit(conn, operator, "include", message_id, {})

        await self._write(op)

    async def flag_raters(self, flags: dict[str, list[str]]) -> list[str]:
        """Hold newly flagged raters for review; raters already reviewed keep their state.

        Returns the raters that became pending now.
        """
        now = time.time()

        async def op(conn: aiosqlite.Connection) -> list[str]:
            added = []
            for rater, reasons in sorted(flags.items()):
                cursor = await conn.execute(
                    "INSERT INTO rater_reviews (rater, state, reasons, updated_at) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (rater) DO NOTHING",
                    (rater, RaterState.PENDING, json.dumps(reasons), now),
                )
                if cursor.rowcount == 1:
                    added.append(rater)
                    await _audit(conn, "trust", "flag", rater, {"reasons": reasons})
            return added

        added: list[str] = await self._write(op)
        return added

    async def review_rater(self, rater: str, state: RaterState, *, reviewer: str) -> None:
        now = time.time()

        async def op(conn: aiosqlite.Connection) -> None:
            await conn.execute(
                "INSERT INTO rater_reviews (rater, state, reasons, reviewer, updated_at) VALUES (?, ?, '[]', ?, ?)"
                " ON CONFLICT (rater) DO UPDATE SET state = excluded.state, reviewer = excluded.reviewer,"
                " updated_at = excluded.updated_at",
                (rater, state, reviewer, now),
            )
            await _audit(conn, reviewer, f"rater:{state}", rater, {})

        await self._write(op)

    async def rater_reviews(self) -> list[dict[str, Any]]:
        rows = await self._read(
            "SELECT r.rater, r.state, r.reasons, r.reviewer, r.updated_at,"
            " (SELECT COUNT(*) FROM ratings x WHERE x.rater = r.rater) AS n_ratings"
            " FROM rater_reviews r ORDER BY r.updated_at DESC"
        )
        return [{**dict(r), "reasons": json.loads(r["reasons"])} for r in rows]

    # --- erasure ----------------------------------------------------------------------

    @property
    def tombstone_path(self) -> Path:
        """Erasures are also kept beside the database, so a restored older backup forgets again."""
        return self.path.with_name(self.path.name + ".erasures")

    async def erase_user(self, user_id: str, *, actor: str) -> dict[str, Any]:
        """Delete a user's conversations and feedback for good, and remember that they were erased.

        Deleted rows are overwritten (``secure_delete``) and the WAL is checkpointed and
        truncated, so no byte of their text stays in the database file or its WAL. Returns
        counts and the model versions whose training data included them.
        """
        digest = subject_hash(user_id)
        self._append_tombstone(digest)
        result = await self._erase(user_id, digest, actor=actor)
        await self._purge_search_index()
        await self._checkpoint()
        return result

    def _append_tombstone(self, digest: str) -> None:
        with open(self.tombstone_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"subject": digest, "at": time.time()}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    async def _erase(self, user_id: str, digest: str, *, actor: str) -> dict[str, Any]:
        now = time.time()

        async def op(conn: aiosqlite.Connection) -> dict[str, Any]:
            async def ids(sql: str, params: tuple[Any, ...]) -> list[Any]:
                cursor = await conn.execute(sql, params)
                return [r[0] for r in await cursor.fetchall()]

            conversations = await ids("SELECT id FROM conversations WHERE user_id = ?", (user_id,))
            marks = ",".join("?" * len(conversations))
            messages = (
                await ids(f"SELECT id FROM messages WHERE conversation_id IN ({marks})", tuple(conversations))
                if conversations
                else []
            )
            raters = [user_id] + [f"conversation:{c}" for c in conversations]
            rmarks = ",".join("?" * len(raters))
            mmarks = ",".join("?" * len(messages))
            rating_ids = await ids(f"SELECT id FROM ratings WHERE rater IN ({rmarks})", tuple(raters))
            if messages:
                rating_ids += await ids(f"SELECT id FROM ratings WHERE message_id IN ({mmarks})", tuple(messages))
            correction_ids = (
                await ids(f"SELECT id FROM corrections WHERE message_id IN ({mmarks})", tuple(messages))
                if messages
                else []
            )
            touched: list[str] = []
            cursor = await conn.execute("SELECT name, feedback_ids FROM model_versions WHERE feedback_ids IS NOT NULL")
            for row in await cursor.fetchall():
                used = json.loads(row["feedback_ids"])
                if (
                    set(used.get("messages", [])) & set(messages)
                    or set(used.get("ratings", [])) & set(rating_ids)
                    or set(used.get("corrections", [])) & set(correction_ids)
                ):
                    touched.append(row["name"])
            await conn.execute(f"DELETE FROM ratings WHERE rater IN ({rmarks})", tuple(raters))
            await conn.execute(f"DELETE FROM rater_reviews WHERE rater IN ({rmarks})", tuple(raters))
            if conversations:
                await conn.execute(f"DELETE FROM ratings WHERE message_id IN ({mmarks})", tuple(messages))
                await conn.execute(f"DELETE FROM corrections WHERE message_id IN ({mmarks})", tuple(messages))
                await conn.execute(f"DELETE FROM training_exclusions WHERE message_id IN ({mmarks})", tuple(messages))
                await conn.execute(f"DELETE FROM messages WHERE conversation_id IN ({marks})", tuple(conversations))
                await conn.execute(f"DELETE FROM conversations WHERE id IN ({marks})", tuple(conversations))
            await conn.execute(
                "INSERT INTO erasures (subject_hash, erased_at) VALUES (?, ?) ON CONFLICT DO NOTHING", (digest, now)
            )
            counts = {
                "conversations": len(conversations),
                "messages": len(messages),
                "ratings": len(set(rating_ids)),
                "corrections": len(correction_ids),
            }
            await _audit(conn, actor, "erase", digest, counts)
            return {**counts, "versions_trained_on_them": sorted(touched)}

        result: dict[str, Any] = await self._write(op)
        return result

    async def _purge_search_index(self) -> None:
        """Merge the full-text index: FTS5 keeps deleted terms in old segments until a merge."""

        async def op(conn: aiosqlite.Connection) -> None:
            await conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('optimize')")

        await self._write(op)

    async def _checkpoint(self) -> None:
        """Copy the WAL into the database file and truncate the WAL to zero bytes."""

        async def op(conn: aiosqlite.Connection) -> tuple[int, int, int]:
            cursor = await conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            row = await cursor.fetchone()
            return (row[0], row[1], row[2]) if row else (0, 0, 0)

        async with self._read_lock:  # no read snapshot may pin old WAL frames meanwhile
            busy, _, _ = await self._write(op, outside_transaction=True)
        if busy:
            log.warning("WAL checkpoint was blocked by another connection; it completes at the next checkpoint")

    async def _reapply_tombstones(self) -> None:
        """Erase again any tombstoned user that is back (say, from a restored older backup)."""
        if not self.tombstone_path.exists():
            return
        digests = set()
        for line in self.tombstone_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                digests.add(json.loads(line)["subject"])
        known = {r[0] for r in await self._read("SELECT subject_hash FROM erasures")}
        subjects = {
            r[0] for r in await self._read("SELECT DISTINCT user_id FROM conversations WHERE user_id IS NOT NULL")
        }
        subjects |= {r[0] for r in await self._read("SELECT DISTINCT rater FROM ratings")}
        back = [s for s in subjects if subject_hash(s) in digests]
        for subject in back:
            log.warning("re-erasing a user erased earlier (their data came back, e.g. from a backup)")
            await self._erase(subject, subject_hash(subject), actor="tombstone")
        missing = digests - known - {subject_hash(s) for s in back}
        for digest in missing:

            async def op(conn: aiosqlite.Connection, digest: str = digest) -> None:
                await conn.execute(
                    "INSERT INTO erasures (subject_hash, erased_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
                    (digest, time.time()),
                )

            await self._write(op)
        if back:
            await self._purge_search_index()
        await self._checkpoint()

    # --- model versions ---------------------------------------------------------------

    async def ensure_base_version(self, base_model: str) -> ModelVersion:
        """Make sure a version row exists and one version is live (the base model at first)."""
        now = time.time()

        async def op(conn: aiosqlite.Connection) -> None:
            cursor = await conn.execute("SELECT COUNT(*) FROM model_versions WHERE state = ?", (VersionState.LIVE,))
            row = await cursor.fetchone()
            has_live = bool(row and row[0])
            await conn.execute(
                "INSERT INTO model_versions (name, seq, state, base_model, created_at, updated_at)"
                " VALUES (?, 0, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
                (BASE_VERSION, VersionState.RETIRED if has_live else VersionState.LIVE, base_model, now, now),
            )

        await self._write(op)
        return await self.live_version()

    async def register_version(
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

        async def op(conn: aiosqlite.Connection) -> str:
            cursor = await conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM model_versions")
            row = await cursor.fetchone()
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
            await _audit(conn, "training", "register", version_name, {"sha256": sha256, "parent": parent})
            return version_name

        version_name = await self._write(op)
        return await self.get_version(version_name)

    async def next_version_name(self) -> str:
        rows = await self._read("SELECT COALESCE(MAX(seq), 0) + 1 FROM model_versions")
        return f"v{int(rows[0][0])}"

    async def set_version_state(
        self, name: str, state: VersionState, *, actor: str, reasons: Iterable[str] = ()
    ) -> ModelVersion:
        """Move a version to ``state``. Making one live retires the version that was live."""
        reasons = tuple(reasons)
        now = time.time()

        async def op(conn: aiosqlite.Connection) -> None:
            cursor = await conn.execute("SELECT state FROM model_versions WHERE name = ?", (name,))
            row = await cursor.fetchone()
            if row is None:
                raise NotFoundError(f"model version {name!r} does not exist")
            if state is VersionState.LIVE:
                cursor = await conn.execute(
                    "SELECT name FROM model_versions WHERE state = ? AND name != ? ORDER BY seq DESC LIMIT 1",
                    (VersionState.LIVE, name),
                )
                old = await cursor.fetchone()
                if old is not None:
                    await conn.execute("UPDATE model_versions SET replaced = ? WHERE name = ?", (old[0], name))
                await conn.execute(
                    "UPDATE model_versions SET state = ?, updated_at = ? WHERE state = ? AND name != ?",
                    (VersionState.RETIRED, now, VersionState.LIVE, name),
                )
            if state is VersionState.CANARY:  # one canary at a time: a newer one ends the older
                await conn.execute(
                    "UPDATE model_versions SET state = ?, updated_at = ? WHERE state = ? AND name != ?",
                    (VersionState.RETIRED, now, VersionState.CANARY, name),
                )
            cursor = await conn.execute("SELECT gate_reasons FROM model_versions WHERE name = ?", (name,))
            current = await cursor.fetchone()
            previous = json.loads(current[0] if current and current[0] else "[]")
            await conn.execute(
                "UPDATE model_versions SET state = ?, gate_reasons = ?, updated_at = ? WHERE name = ?",
                (state, json.dumps(previous + list(reasons)), now, name),
            )
            await _audit(conn, actor, f"state:{state}", name, {"from": row["state"], "reasons": list(reasons)})

        await self._write(op)
        return await self.get_version(name)

    async def get_version(self, name: str) -> ModelVersion:
        rows = await self._read("SELECT * FROM model_versions WHERE name = ?", (name,))
        if not rows:
            raise NotFoundError(f"model version {name!r} does not exist")
        return _version(rows[0])

    async def live_version(self) -> ModelVersion:
        rows = await self._read(
            "SELECT * FROM model_versions WHERE state = ? ORDER BY seq DESC LIMIT 1", (VersionState.LIVE,)
        )
        if not rows:
            raise NotFoundError("no live model version: call ensure_base_version() first")
        return _version(rows[0])

    async def rollback(self, name: str, *, actor: str, reasons: Iterable[str] = ()) -> ModelVersion:
        """Take a canary or live version out of service. A live one hands back to the version it replaced.

        Returns the version that is live afterwards.
        """
        reasons = list(reasons)
        now = time.time()

        async def op(conn: aiosqlite.Connection) -> str:
            cursor = await conn.execute(
                "SELECT state, replaced, gate_reasons FROM model_versions WHERE name = ?", (name,)
            )
            row = await cursor.fetchone()
            if row is None:
                raise NotFoundError(f"model version {name!r} does not exist")
            if row["state"] not in (VersionState.CANARY, VersionState.LIVE):
                raise InvalidError(f"version {name} is {row['state']}: only a canary or the live version can roll back")
            notes = json.loads(row["gate_reasons"] or "[]") + reasons
            await conn.execute(
                "UPDATE model_versions SET state = ?, gate_reasons = ?, updated_at = ? WHERE name = ?",
                (VersionState.ROLLED_BACK, json.dumps(notes), now, name),
            )
            await _audit(
                conn, actor, f"state:{VersionState.ROLLED_BACK}", name, {"from": row["state"], "reasons": reasons}
            )
            if row["state"] == VersionState.LIVE:
                target = row["replaced"] or BASE_VERSION
                await conn.execute(
                    "UPDATE model_versions SET state = ?, updated_at = ? WHERE name = ?",
                    (VersionState.LIVE, now, target),
                )
                await _audit(conn, actor, f"state:{VersionState.LIVE}", target, {"from": "retired", "reasons": reasons})
            cursor = await conn.execute(
                "SELECT name FROM model_versions WHERE state = ? ORDER BY seq DESC LIMIT 1", (VersionState.LIVE,)
            )
            live = await cursor.fetchone()
            return str(live[0]) if live else BASE_VERSION

        live_name: str = await self._write(op)
        return await self.get_version(live_name)

    async def canary_version(self) -> ModelVersion | None:
        rows = await self._read(
            "SELECT * FROM model_versions WHERE state = ? ORDER BY seq DESC LIMIT 1", (VersionState.CANARY,)
        )
        return _version(rows[0]) if rows else None

    async def pin_conversation(self, conversation_id: str, version: str) -> None:
        async def op(conn: aiosqlite.Connection) -> None:
            await conn.execute("UPDATE conversations SET model_version = ? WHERE id = ?", (version, conversation_id))

        await self._write(op)

    async def version_stats(self, name: str, *, since: float = 0.0) -> VersionStats:
        """Replies, thumbs, regenerations, errors and latency of one version (model-written replies)."""
        rows = await self._read(
            "WITH replies AS (SELECT id, latency_ms, n_tokens, finish_reason FROM messages"
            "  WHERE model_version = ? AND role = 'assistant' AND author IS NULL AND created_at >= ?)"
            " SELECT (SELECT COUNT(*) FROM conversations WHERE model_version = ? AND created_at >= ?),"
            "  (SELECT COUNT(*) FROM replies WHERE finish_reason != 'error'),"
            "  (SELECT COUNT(*) FROM ratings WHERE value = 1 AND message_id IN (SELECT id FROM replies)),"
            "  (SELECT COUNT(*) FROM ratings WHERE value = -1 AND message_id IN (SELECT id FROM replies)),"
            "  (SELECT COUNT(DISTINCT regenerated_from) FROM messages"
            "    WHERE regenerated_from IN (SELECT id FROM replies)),"
            "  (SELECT COUNT(*) FROM replies WHERE finish_reason = 'error'),"
            "  (SELECT AVG(latency_ms) FROM replies WHERE finish_reason != 'error'),"
            "  (SELECT AVG(n_tokens) FROM replies WHERE finish_reason != 'error')",
            (name, since, name, since),
        )
        r = rows[0]
        return VersionStats(name, r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7])

    async def list_versions(self) -> list[ModelVersion]:
        return [_version(r) for r in await self._read("SELECT * FROM model_versions ORDER BY seq")]

    # --- training runs ----------------------------------------------------------------

    async def start_run(self, *, max_rating_id: int, max_correction_id: int) -> int:
        now = time.time()

        async def op(conn: aiosqlite.Connection) -> int:
            cursor = await conn.execute(
                "INSERT INTO training_runs (state, started_at, max_rating_id, max_correction_id) VALUES (?, ?, ?, ?)",
                (RunState.RUNNING, now, max_rating_id, max_correction_id),
            )
            return int(cursor.lastrowid or 0)

        run_id: int = await self._write(op)
        return run_id

    async def update_run(self, run_id: int, *, progress: dict[str, Any]) -> None:
        async def op(conn: aiosqlite.Connection) -> None:
            await conn.execute("UPDATE training_runs SET progress = ? WHERE id = ?", (json.dumps(progress), run_id))

        await self._write(op)

    async def finish_run(
        self, run_id: int, *, state: RunState, version: str | None = None, detail: str | None = None
    ) -> None:
        now = time.time()

        async def op(conn: aiosqlite.Connection) -> None:
            await conn.execute(
                "UPDATE training_runs SET state = ?, finished_at = ?, version = ?, detail = ? WHERE id = ?",
                (state, now, version, detail, run_id),
            )

        await self._write(op)

    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take (or renew) a named lease; False while another holder's lease is unexpired.

        This is what keeps training to one run at a time across server processes and CLIs.
        """
        now = time.time()

        async def op(conn: aiosqlite.Connection) -> bool:
            cursor = await conn.execute("SELECT holder, expires_at FROM leases WHERE name = ?", (name,))
            row = await cursor.fetchone()
            if row is not None and row[0] != holder and row[1] > now:
                return False
            await conn.execute(
                "INSERT INTO leases (name, holder, expires_at) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at",
                (name, holder, now + ttl_s),
            )
            return True

        acquired: bool = await self._write(op)
        return acquired

    async def release_lease(self, name: str, holder: str) -> None:
        async def op(conn: aiosqlite.Connection) -> None:
            await conn.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))

        await self._write(op)

    async def fail_interrupted_runs(self) -> int:
        """Runs left 'running' by a process that died (its lease expired) become failed."""
        now = time.time()

        async def op(conn: aiosqlite.Connection) -> int:
            cursor = await conn.execute(
                "UPDATE training_runs SET state = ?, finished_at = ?, detail = 'interrupted: the training process died'"
                " WHERE state IN (?, ?)",
                (RunState.FAILED, now, RunState.RUNNING, RunState.CANCELLING),
            )
            return int(cursor.rowcount)

        n: int = await self._write(op)
        return n

    async def request_cancel(self, run_id: int, *, actor: str) -> bool:
        async def op(conn: aiosqlite.Connection) -> bool:
            cursor = await conn.execute(
                "UPDATE training_runs SET state = ? WHERE id = ? AND state = ?",
                (RunState.CANCELLING, run_id, RunState.RUNNING),
            )
            if cursor.rowcount:
                await _audit(conn, actor, "cancel-run", str(run_id), {})
            return bool(cursor.rowcount)

        asked: bool = await self._write(op)
        return asked

    async def get_run(self, run_id: int) -> TrainingRun:
        rows = await self._read("SELECT * FROM training_runs WHERE id = ?", (run_id,))
        if not rows:
            raise NotFoundError(f"training run {run_id} does not exist")
        return _run(rows[0])

    async def last_consumed_run(self) -> TrainingRun | None:
        """The newest run whose data counts as used (it trained, whatever the gate said)."""
        rows = await self._read(
            "SELECT * FROM training_runs WHERE state = ? ORDER BY id DESC LIMIT 1", (RunState.SUCCEEDED,)
        )
        return _run(rows[0]) if rows else None

    async def list_runs(self, limit: int = 20) -> list[TrainingRun]:
        return [_run(r) for r in await self._read("SELECT * FROM training_runs ORDER BY id DESC LIMIT ?", (limit,))]

    async def audit_entries(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = await self._read("SELECT * FROM audit_log ORDER BY id DESC LIMIT ?", (limit,))
        return [dict(r) for r in rows]


# --- helpers ---------------------------------------------------------------------------


async def _migrate(conn: aiosqlite.Connection) -> None:
    cursor = await conn.execute("PRAGMA user_version")
    row = await cursor.fetchone()
    current = int(row[0]) if row else 0
    if current > SCHEMA_VERSION:
        raise StoreError(
            f"database schema version {current} is newer than this learnloop ({SCHEMA_VERSION}); upgrade learnloop"
        )
    for number in range(current, SCHEMA_VERSION):
        await conn.execute("BEGIN IMMEDIATE")
        try:
            step = MIGRATIONS[number]
            for statement in step.split(";") if isinstance(step, str) else step:
                if statement.strip():
                    await conn.execute(statement)
            await conn.execute(f"PRAGMA user_version = {number + 1}")
            await conn.execute("COMMIT")
        except Exception:
            await conn.execute("ROLLBACK")
            raise
        log.info("feedback store migrated to schema %d", number + 1)


async def _require_assistant_message(conn: aiosqlite.Connection, message_id: str) -> None:
    cursor = await conn.execute("SELECT role FROM messages WHERE id = ?", (message_id,))
    row = await cursor.fetchone()
    if row is None:
        raise NotFoundError(f"message {message_id!r} does not exist")
    if row["role"] != Role.ASSISTANT:
        raise InvalidError(f"message {message_id!r} is a {row['role']} message; only assistant replies take feedback")


def _record(cls: type[T], r: sqlite3.Row, **convert: Callable[[Any], Any]) -> T:
    """A record dataclass from a row whose columns carry the fields' names."""
    columns = set(r.keys())
    values = {
        f.name: convert.get(f.name, lambda v: v)(r[f.name])
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.name in columns
    }
    return cls(**values)


def _message(r: sqlite3.Row) -> Message:
    return _record(Message, r, role=Role, finish_reason=lambda v: None if v is None else FinishReason(v))


def _conversation(r: sqlite3.Row) -> Conversation:
    return _record(Conversation, r)


def _rating(r: sqlite3.Row) -> Rating:
    return _record(Rating, r)


def _correction(r: sqlite3.Row) -> Correction:
    return _record(Correction, r)


def _version(r: sqlite3.Row) -> ModelVersion:
    return ModelVersion(
        name=r["name"],
        seq=r["seq"],
        state=VersionState(r["state"]),
        adapter_path=r["adapter_path"],
        sha256=r["sha256"],
        parent=r["parent"],
        base_model=r["base_model"],
        eval_report=json.loads(r["eval_report"]) if r["eval_report"] else None,
        gate_reasons=tuple(json.loads(r["gate_reasons"])) if r["gate_reasons"] else (),
        feedback_ids=json.loads(r["feedback_ids"]) if r["feedback_ids"] else {},
        training_run_id=r["training_run_id"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        replaced=r["replaced"],
    )


def _run(r: sqlite3.Row) -> TrainingRun:
    return TrainingRun(
        id=r["id"],
        state=RunState(r["state"]),
        started_at=r["started_at"],
        finished_at=r["finished_at"],
        version=r["version"],
        progress=json.loads(r["progress"]) if r["progress"] else None,
        detail=r["detail"],
        max_rating_id=r["max_rating_id"],
        max_correction_id=r["max_correction_id"],
    )
