"""Erasure: a user's conversations and feedback deleted for good, and remembered as erased.

``store.erasure``. Deleted rows are overwritten (``secure_delete``), the full-text index
is merged and the WAL is checkpointed and truncated, so no byte of the user's text stays
in the database file or its WAL. Each erasure is also appended to a tombstone file beside
the database (hashes only); opening the store erases again anyone a restored older backup
brought back.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from feedback.accounts import write_audit
from feedback.db import Connection, Database
from feedback.inbox import forget_user
from feedback.records import subject_hash

log = logging.getLogger("learnloop.feedback")


class Erasure:
    """Erasing users from the feedback database (``store.erasure``)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @property
    def tombstone_path(self) -> Path:
        """Erasures are also kept beside the database, so a restored older backup forgets again."""
        return self._db.tombstone_path

    async def erase_user(self, user_id: str, *, actor: str) -> dict[str, Any]:
        """Delete a user's conversations and feedback for good, and remember that they were erased.

        Returns counts and the model versions whose training data included them.
        """
        digest = subject_hash(user_id)
        self._append_tombstone(digest)
        result = await self._erase(user_id, digest, actor=actor)
        await self._db.purge_search_index()
        await self._db.checkpoint()
        return result

    async def reapply_tombstones(self) -> None:
        """Erase again any tombstoned user that is back (say, from a restored older backup)."""
        if not self.tombstone_path.exists():
            return
        digests = set()
        for line in self.tombstone_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                digests.add(json.loads(line)["subject"])
        read = self._db.read
        known = {r[0] for r in await read("SELECT subject_hash FROM erasures")}
        subjects = {r[0] for r in await read("SELECT DISTINCT user_id FROM conversations WHERE user_id IS NOT NULL")}
        subjects |= {r[0] for r in await read("SELECT DISTINCT rater FROM ratings")}
        back = [s for s in subjects if subject_hash(s) in digests]
        for subject in back:
            log.warning("re-erasing a user erased earlier (their data came back, e.g. from a backup)")
            await self._erase(subject, subject_hash(subject), actor="tombstone")
        missing = digests - known - {subject_hash(s) for s in back}
        for digest in missing:

            async def op(conn: Connection, digest: str = digest) -> None:
                await _remember(conn, digest, time.time())

            await self._db.write(op)
        if back:
            await self._db.purge_search_index()
        await self._db.checkpoint()

    def _append_tombstone(self, digest: str) -> None:
        # data_dir may not exist yet: a PostgreSQL store (store.url) makes no file there
        self.tombstone_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.tombstone_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"subject": digest, "at": time.time()}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    async def _erase(self, user_id: str, digest: str, *, actor: str) -> dict[str, Any]:
        now = time.time()

        async def op(conn: Connection) -> dict[str, Any]:
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
            if touched:  # the registry remembers which versions learned from data that is gone now
                tmarks = ",".join("?" * len(touched))
                await conn.execute(
                    f"UPDATE model_versions SET trained_on_erased = ? WHERE name IN ({tmarks})"
                    " AND trained_on_erased IS NULL",
                    (now, *touched),
                )
            await forget_user(conn, user_id)  # IM events not yet answered would bring them back
            await _remember(conn, digest, now)
            counts = {
                "conversations": len(conversations),
                "messages": len(messages),
                "ratings": len(set(rating_ids)),
                "corrections": len(correction_ids),
            }
            await write_audit(conn, actor, "erase", digest, counts)
            return {**counts, "versions_trained_on_them": sorted(touched)}

        return await self._db.write(op)


async def _remember(conn: Connection, digest: str, at: float) -> None:
    await conn.execute(
        "INSERT INTO erasures (subject_hash, erased_at) VALUES (?, ?) ON CONFLICT DO NOTHING", (digest, at)
    )
