"""Read side for operators: filtered, paged conversation lists, transcripts, per-version series.

Built to stay fast at 100,000+ conversations: keyset paging on ``(created_at, id)`` (no
OFFSET, no total count), filters that drive from the selective table through an index,
full-text search through the ``messages_fts`` FTS5 index, and per-row aggregates computed
only for the rows of the page. The query builder (``conversation_filter``) and the cursor
and search-string rules are pure functions.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

PAGE_MAX = 200
PREVIEW_CHARS = 160


class BrowseError(ValueError):
    """A filter or cursor that cannot be understood."""


@dataclass(frozen=True)
class ConversationFilter:
    rating: str | None = None  # "up", "down", "none"
    version: str | None = None
    channel: str | None = None
    since: float | None = None
    until: float | None = None
    has_correction: bool | None = None
    flagged: bool | None = None
    q: str | None = None


def fts_query(text: str) -> str:
    """A user's search words as an FTS5 query: every word must appear (as a prefix for the last).

    Words are quoted, so FTS5 operators in the input (``AND``, ``NEAR``, ``*``, quotes,
    column filters) are searched for as text instead of being interpreted.
    """
    words = [w for w in text.split() if w.strip('"')]
    if not words:
        raise BrowseError("the search text has no words")
    quoted = ['"' + w.replace('"', '""') + '"' for w in words[:16]]
    quoted[-1] += "*"
    return " ".join(quoted)


def encode_cursor(created_at: float, conversation_id: str) -> str:
    return f"{created_at!r}~{conversation_id}"


def decode_cursor(cursor: str) -> tuple[float, str]:
    created, sep, conversation_id = cursor.partition("~")
    try:
        if not sep or not conversation_id:
            raise ValueError
        return float(created), conversation_id
    except ValueError:
        raise BrowseError(f"not a cursor from this API: {cursor!r}") from None


def conversation_filter(f: ConversationFilter) -> tuple[list[str], list[Any]]:
    """WHERE clauses (on conversations ``c``) and their parameters for a filter."""
    where: list[str] = []
    params: list[Any] = []
    rated = "SELECT m.conversation_id FROM ratings r JOIN messages m ON m.id = r.message_id"
    if f.rating == "up":
        where.append(f"c.id IN ({rated} WHERE r.value = 1)")
    elif f.rating == "down":
        where.append(f"c.id IN ({rated} WHERE r.value = -1)")
    elif f.rating == "none":
        where.append(f"c.id NOT IN ({rated})")
    elif f.rating is not None:
        raise BrowseError("rating must be up, down or none")
    if f.version:
        where.append("c.id IN (SELECT conversation_id FROM messages WHERE model_version = ?)")
        params.append(f.version)
    if f.channel:
        where.append("c.channel = ?")
        params.append(f.channel)
    if f.since is not None:
        where.append("c.created_at >= ?")
        params.append(f.since)
    if f.until is not None:
        where.append("c.created_at < ?")
        params.append(f.until)
    corrected = "SELECT m.conversation_id FROM corrections k JOIN messages m ON m.id = k.message_id"
    if f.has_correction is True:
        where.append(f"c.id IN ({corrected})")
    elif f.has_correction is False:
        where.append(f"c.id NOT IN ({corrected})")
    if f.flagged:
        where.append(f"c.id IN ({rated} WHERE r.rater IN (SELECT rater FROM rater_reviews WHERE state = 'pending'))")
    if f.q:
        where.append(
            "c.id IN (SELECT m.conversation_id FROM messages m WHERE m.rowid IN"
            " (SELECT rowid FROM messages_fts WHERE messages_fts MATCH ?))"
        )
        params.append(fts_query(f.q))
    return where, params


_ROW_AGGREGATES = """
SELECT c.id, c.user_id, c.channel, c.created_at, c.model_version AS pinned,
  (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) AS n_messages,
  (SELECT MAX(m.created_at) FROM messages m WHERE m.conversation_id = c.id) AS last_at,
  (SELECT GROUP_CONCAT(DISTINCT m.model_version) FROM messages m
     WHERE m.conversation_id = c.id AND m.model_version IS NOT NULL) AS versions,
  (SELECT COUNT(*) FROM ratings r JOIN messages m ON m.id = r.message_id
     WHERE m.conversation_id = c.id AND r.value = 1) AS ups,
  (SELECT COUNT(*) FROM ratings r JOIN messages m ON m.id = r.message_id
     WHERE m.conversation_id = c.id AND r.value = -1) AS downs,
  (SELECT COUNT(*) FROM corrections k JOIN messages m ON m.id = k.message_id
     WHERE m.conversation_id = c.id) AS corrections,
  (SELECT COUNT(*) FROM ratings r JOIN messages m ON m.id = r.message_id
     WHERE m.conversation_id = c.id
       AND r.rater IN (SELECT rater FROM rater_reviews WHERE state = 'pending')) AS flagged,
  (SELECT m.text FROM messages m WHERE m.conversation_id = c.id AND m.role = 'user'
     ORDER BY m.seq LIMIT 1) AS preview
FROM conversations c
"""


def _summary(r: sqlite3.Row) -> dict[str, Any]:
    preview = r["preview"] or ""
    return {
        "id": r["id"],
        "user_id": r["user_id"],
        "channel": r["channel"],
        "created_at": r["created_at"],
        "last_at": r["last_at"] or r["created_at"],
        "n_messages": r["n_messages"],
        "versions": sorted((r["versions"] or "").split(",")) if r["versions"] else [],
        "pinned_version": r["pinned"],
        "ups": r["ups"],
        "downs": r["downs"],
        "corrections": r["corrections"],
        "flagged": bool(r["flagged"]),
        "preview": preview if len(preview) <= PREVIEW_CHARS else preview[: PREVIEW_CHARS - 1] + "…",
    }


def _without(row: sqlite3.Row, *keys: str) -> dict[str, Any]:
    return {k: v for k, v in dict(row).items() if k not in keys}


class BrowseMixin:
    """Operator queries; ``FeedbackStore`` mixes this in."""

    async def _read(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        raise NotImplementedError

    async def list_conversations(
        self, f: ConversationFilter, *, limit: int = 50, cursor: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page, newest first, and the cursor of the next page (None on the last)."""
        if not 1 <= limit <= PAGE_MAX:
            raise BrowseError(f"limit must be 1-{PAGE_MAX}")
        where, params = conversation_filter(f)
        if cursor is not None:
            where.append("(c.created_at, c.id) < (?, ?)")
            params.extend(decode_cursor(cursor))
        sql = "SELECT c.id, c.created_at FROM conversations c"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY c.created_at DESC, c.id DESC LIMIT ?"
        page = await self._read(sql, (*params, limit + 1))
        more = len(page) > limit
        page = page[:limit]
        if not page:
            return [], None
        ids = [r["id"] for r in page]
        marks = ",".join("?" * len(ids))
        rows = await self._read(_ROW_AGGREGATES + f" WHERE c.id IN ({marks})", ids)
        by_id = {r["id"]: _summary(r) for r in rows}
        items = [by_id[i] for i in ids if i in by_id]
        last = page[-1]
        return items, encode_cursor(last["created_at"], last["id"]) if more else None

    async def transcript(self, conversation_id: str) -> dict[str, Any] | None:
        """A conversation with every message, its ratings, corrections, exclusion and siblings."""
        head = await self._read(_ROW_AGGREGATES + " WHERE c.id = ?", (conversation_id,))
        if not head:
            return None
        messages = [
            dict(r)
            for r in await self._read(
                "SELECT m.*, x.reason AS excluded_reason, x.operator AS excluded_by FROM messages m"
                " LEFT JOIN training_exclusions x ON x.message_id = m.id"
                " WHERE m.conversation_id = ? ORDER BY m.seq",
                (conversation_id,),
            )
        ]
        ratings = await self._read(
            "SELECT r.message_id, r.value, r.reason, r.comment, r.rater, r.created_at,"
            " COALESCE(v.state, 'trusted') AS rater_state FROM ratings r"
            " JOIN messages m ON m.id = r.message_id LEFT JOIN rater_reviews v ON v.rater = r.rater"
            " WHERE m.conversation_id = ? ORDER BY r.id",
            (conversation_id,),
        )
        corrections = await self._read(
            "SELECT k.id, k.message_id, k.text, k.reason, k.operator, k.created_at FROM corrections k"
            " JOIN messages m ON m.id = k.message_id WHERE m.conversation_id = ? ORDER BY k.id",
            (conversation_id,),
        )
        by_message: dict[str, dict[str, Any]] = {}
        turns: dict[tuple[str | None, str], list[str]] = {}
        for m in messages:
            excluded_reason, excluded_by = m.pop("excluded_reason"), m.pop("excluded_by")
            m["excluded"] = {"reason": excluded_reason, "operator": excluded_by} if excluded_by else None
            m["ratings"], m["corrections"] = [], []
            by_message[m["id"]] = m
            turns.setdefault((m["parent_id"], m["role"]), []).append(m["id"])
        for m in messages:
            same_turn = turns[(m["parent_id"], m["role"])] if m["role"] == "assistant" else [m["id"]]
            m["siblings"] = [i for i in same_turn if i != m["id"]]
        for r in ratings:
            by_message[r["message_id"]]["ratings"].append(_without(r, "message_id"))
        for k in corrections:
            by_message[k["message_id"]]["corrections"].append(_without(k, "message_id"))
        return {"conversation": _summary(head[0]), "messages": messages}

    async def version_series(self, *, bucket_s: float, since: float = 0.0) -> list[dict[str, Any]]:
        """Per version and time bucket: replies, thumbs, regenerations, mean latency and length."""
        rows = await self._read(
            "SELECT m.model_version AS version, CAST(m.created_at / ? AS INTEGER) * ? AS bucket_start,"
            " COUNT(*) AS replies,"
            " SUM((SELECT COUNT(*) FROM ratings r WHERE r.message_id = m.id AND r.value = 1)) AS ups,"
            " SUM((SELECT COUNT(*) FROM ratings r WHERE r.message_id = m.id AND r.value = -1)) AS downs,"
            " SUM(EXISTS (SELECT 1 FROM messages x WHERE x.regenerated_from = m.id)) AS regenerations,"
            " AVG(m.latency_ms) AS latency_ms, AVG(LENGTH(m.text)) AS reply_chars"
            " FROM messages m WHERE m.role = 'assistant' AND m.author IS NULL AND m.model_version IS NOT NULL"
            " AND m.finish_reason != 'error' AND m.created_at >= ?"
            " GROUP BY version, bucket_start ORDER BY bucket_start, version",
            (bucket_s, bucket_s, since),
        )
        out = []
        for r in rows:
            d = dict(r)
            rated = d["ups"] + d["downs"]
            d["up_rate"] = d["ups"] / rated if rated else None
            d["regen_rate"] = d["regenerations"] / d["replies"] if d["replies"] else None
            out.append(d)
        return out

    async def iter_conversations(self, *, batch: int = 500) -> AsyncIterator[dict[str, Any]]:
        """Every conversation with its transcript, oldest first, for exports (keyset batches)."""
        after: tuple[float, str] = (-1.0, "")
        while True:
            page = await self._read(
                "SELECT id, created_at FROM conversations WHERE (created_at, id) > (?, ?)"
                " ORDER BY created_at, id LIMIT ?",
                (*after, batch),
            )
            if not page:
                return
            for r in page:
                t = await self.transcript(r["id"])
                if t is not None:
                    yield t
            after = (page[-1]["created_at"], page[-1]["id"])

    async def audit_log(self, *, limit: int = 100, before_id: int | None = None) -> list[dict[str, Any]]:
        rows = await self._read(
            "SELECT * FROM audit_log WHERE id < ? ORDER BY id DESC LIMIT ?",
            (before_id if before_id is not None else 2**62, limit),
        )
        out = []
        for r in rows:
            d = dict(r)
            with contextlib.suppress(ValueError):
                d["detail"] = json.loads(d["detail"]) if d["detail"] else None
            out.append(d)
        return out
