"""Read side for operators: filtered, paged conversation lists, transcripts, per-version series.

Built to stay fast at 100,000+ conversations: keyset paging on ``(created_at, id)`` (no
OFFSET, no total count); filters on what a conversation holds (ratings, versions,
corrections, text) checked one conversation at a time over the newest ``PROBE_WINDOW``
candidates, where a common filter fills its page, and queried as one indexed set only
beyond them; full-text search through the ``messages_fts`` FTS5 index, bounded by rowid
to the window's messages; and per-row aggregates computed only for the rows of the page.
The query builder (``conversation_filter``) and the cursor and search-string rules are
pure functions; ``Browse`` (``store.browse``) runs the queries. ``bench/console.py``
measures it.

Each backend's own SQL here (``Browse`` picks by ``Database.backend``): the full-text search
(SQLite: ``messages_fts MATCH``, bounded by ``rowid``; PostgreSQL: ``to_tsvector('simple', text)
@@ to_tsquery(...)`` through the GIN index ``messages_search``, probed per conversation), the
list of versions (``GROUP_CONCAT`` / ``string_agg``), time buckets, and SQLite's query-planner
hints (a unary ``+`` that keeps SQLite off an index), which PostgreSQL's planner needs not.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from feedback.db import Database, Row
from feedback.exceptions import BrowseError as BrowseError  # callers catch it from here too

PAGE_MAX = 200
PROBE_WINDOW = 2000  # newest candidates a filter checks one by one before it queries whole sets
COMMON_MATCHES = 10000  # a search matching this many messages builds a set slower than the other filters
PREVIEW_CHARS = 160


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
    site: str | None = None  # the widget site, IM bot or API key a conversation came through
    reaction: str | None = None  # "up", "down": a reply whose customer's next message gave that weak label


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


_WORD = re.compile(r"\w+")


def tsquery(text: str) -> str:
    """A user's search words as a PostgreSQL ``to_tsquery('simple', ...)`` text: every word must appear
    (as a prefix for the last), as ``fts_query`` asks of FTS5.

    Words are cut at what is not a letter or digit, as FTS5's tokenizer cuts them, and each is
    quoted, so tsquery operators in the input (``&``, ``|``, ``!``, ``<->``, ``:*``) are never read.
    """
    words = _WORD.findall(text.lower())
    if not words:
        raise BrowseError("the search text has no words")
    quoted = [f"'{w}'" for w in words[:16]]
    quoted[-1] += ":*"
    return " & ".join(quoted)


@dataclass(frozen=True)
class _Dialect:
    """The SQL of one backend where the two differ."""

    postgres: bool

    @property
    def plus(self) -> str:
        """SQLite's unary ``+``: the planner leaves an index alone (PostgreSQL plans without it)."""
        return "" if self.postgres else "+"

    def search(self, q: str) -> str:
        return tsquery(q) if self.postgres else fts_query(q)


_MATCHED = (  # left open: the probe adds a rowid range
    "SELECT m.conversation_id FROM messages m"
    " WHERE m.rowid IN (SELECT rowid FROM messages_fts WHERE messages_fts MATCH ?"
)
_TS_MATCH = "to_tsvector('simple', m.text) @@ to_tsquery('simple', ?)"  # the GIN index messages_search


SQLITE = _Dialect(postgres=False)
POSTGRES = _Dialect(postgres=True)


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


def _column_filter(f: ConversationFilter) -> tuple[list[str], list[Any]]:
    """Clauses on the conversation's own columns (answered through its indexes)."""
    where: list[str] = []
    params: list[Any] = []
    if f.channel:
        where.append("c.channel = ?")
        params.append(f.channel)
    if f.site:
        where.append("c.site = ?")
        params.append(f.site)
    if f.since is not None:
        where.append("c.created_at >= ?")
        params.append(f.since)
    if f.until is not None:
        where.append("c.created_at < ?")
        params.append(f.until)
    return where, params


_RATED = "SELECT m.conversation_id FROM ratings r JOIN messages m ON m.id = r.message_id"
_CORRECTED = "SELECT m.conversation_id FROM corrections k JOIN messages m ON m.id = k.message_id"
_CORRECTED_PROBE = (
    "EXISTS (SELECT 1 FROM messages m JOIN corrections k ON k.message_id = m.id WHERE m.conversation_id = c.id)"
)


_REACTED = "SELECT m.conversation_id FROM reactions x JOIN messages m ON m.id = x.reply_id"


def _reacted_probe(condition: str) -> str:
    return (
        "EXISTS (SELECT 1 FROM messages m JOIN reactions x ON x.reply_id = m.id"
        f" WHERE m.conversation_id = c.id{condition})"
    )


def _rated_probe(condition: str) -> str:
    return (
        "EXISTS (SELECT 1 FROM messages m JOIN ratings r ON r.message_id = m.id"
        f" WHERE m.conversation_id = c.id{condition})"
    )


@dataclass(frozen=True)
class _Clause:
    """One condition on what a conversation holds (ratings, replies, corrections, text), in two forms.

    ``as_set`` (``c.id [NOT] IN (...)``) builds the whole set once: right when the set is
    small, or when the matches lie far back. ``as_probe`` checks one conversation at a time
    (``EXISTS`` through ``messages(conversation_id, seq)``): right for the newest
    conversations, where a common filter fills a page after a few checks.
    """

    as_set: str
    as_probe: str
    params: tuple[Any, ...]
    # rank among the sets that may drive the query over older conversations, smallest set
    # first; None for a negation, which never narrows
    drive: int | None
    # when it drives: True to walk conversations_created in page order and only look the set
    # up (the walk stops when the page is full); False to let SQLite walk the set (small
    # whenever it gets to drive); None: in page order only when other conditions are probed
    in_page_order: bool | None = True
    # the search's set holds every match, so when it does not drive it is still matched as a set
    set_only: bool = False
    probe_params: tuple[Any, ...] | None = None  # when the probe has parameters of its own

    def probe(self) -> tuple[str, tuple[Any, ...]]:
        return self.as_probe, self.params if self.probe_params is None else self.probe_params


_COMMON_SEARCH_RANK = 6


def _clauses(
    f: ConversationFilter,
    *,
    rowids: tuple[int | None, int | None] = (None, None),
    since: float = 0.0,
    dialect: _Dialect = SQLITE,
) -> list[_Clause]:
    """The membership conditions of a filter. The search's probe matches only the messages of the
    conversations it checks: on SQLite those with a rowid in ``rowids`` (first, last; FTS5 seeks to
    them), on PostgreSQL those written at ``since`` or later (the GIN index and ``messages_created``
    combined in one bitmap; a probe per conversation would compute ``to_tsvector`` for every message)."""
    out: list[_Clause] = []
    if f.rating == "up":
        out.append(_Clause(f"c.id IN ({_RATED} WHERE r.value = 1)", _rated_probe(" AND r.value = 1"), (), 5))
    elif f.rating == "down":
        out.append(_Clause(f"c.id IN ({_RATED} WHERE r.value = -1)", _rated_probe(" AND r.value = -1"), (), 4))
    elif f.rating == "none":
        out.append(_Clause(f"c.id NOT IN ({_RATED})", "NOT " + _rated_probe(""), (), None))
    elif f.rating is not None:
        raise BrowseError("rating must be up, down or none")
    if f.reaction in ("up", "down"):
        value = 1 if f.reaction == "up" else -1
        out.append(
            _Clause(
                f"c.id IN ({_REACTED} WHERE x.value = {value})",
                _reacted_probe(f" AND x.value = {value}"),
                (),
                4,
            )
        )
    elif f.reaction is not None:
        raise BrowseError("reaction must be up or down")
    if f.version:
        out.append(
            _Clause(
                "c.id IN (SELECT conversation_id FROM messages WHERE model_version = ?)",
                # unary +: the probe goes through messages(conversation_id, seq), not the version index
                f"EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = c.id AND {dialect.plus}m.model_version = ?)",
                (f.version,),
                3,
            )
        )
    if f.has_correction is True:
        out.append(_Clause(f"c.id IN ({_CORRECTED})", _CORRECTED_PROBE, (), 1))
    elif f.has_correction is False:
        out.append(_Clause(f"c.id NOT IN ({_CORRECTED})", "NOT " + _CORRECTED_PROBE, (), None))
    if f.flagged:  # few raters are held for review: the set is small, so it is also the probe
        flagged = f"c.id IN ({_RATED} WHERE r.rater IN (SELECT rater FROM rater_reviews WHERE state = 'pending'))"
        out.append(_Clause(flagged, flagged, (), 0, in_page_order=False))
    if f.q:
        match = dialect.search(f.q)
        if dialect.postgres:
            as_set = f"c.id IN (SELECT m.conversation_id FROM messages m WHERE {_TS_MATCH})"
            probe = f"c.id IN (SELECT m.conversation_id FROM messages m WHERE {_TS_MATCH} AND m.created_at >= ?)"
        else:
            as_set = f"c.id IN ({_MATCHED}))"
            probe = f"c.id IN ({_MATCHED} AND rowid BETWEEN ? AND ?))"
        out.append(
            _Clause(
                as_set,
                probe,
                (match,),
                2,
                in_page_order=None,  # a common word fills the page among the newest conversations
                set_only=True,
                probe_params=(match, since) if dialect.postgres else (match, *rowids),
            )
        )
    return out


def conversation_filter(f: ConversationFilter, *, dialect: _Dialect = SQLITE) -> tuple[list[str], list[Any]]:
    """WHERE clauses (on conversations ``c``) and their parameters for a filter (set forms)."""
    where, params = _column_filter(f)
    for clause in _clauses(f, dialect=dialect):
        where.append(clause.as_set)
        params.extend(clause.params)
    return where, params


def _older_filter(
    f: ConversationFilter, *, common_search: bool = False, dialect: _Dialect = SQLITE
) -> tuple[list[str], list[Any]]:
    """The membership clauses for the conversations older than the probe window: the smallest
    set drives, the other conditions are probed on its members (negations alone: their sets).
    A search matching at least ``COMMON_MATCHES`` messages drives last."""
    clauses = _clauses(f, dialect=dialect)
    ranked = [c for c in clauses if c.drive is not None]

    def rank(c: _Clause) -> int:
        return _COMMON_SEARCH_RANK if c.set_only and common_search else (c.drive or 0)

    driver = min(ranked, key=rank) if ranked else None
    where: list[str] = []
    params: list[Any] = []
    for clause in sorted(clauses, key=lambda c: c is not driver):  # the driver first
        if driver is None:
            where.append(clause.as_set)
        elif clause is driver:
            in_page_order = len(clauses) > 1 if clause.in_page_order is None else clause.in_page_order
            # unary +: SQLite only looks the set up, the scan follows the page order and stops early
            where.append((dialect.plus if in_page_order else "") + clause.as_set)
        elif clause.set_only:
            where.append(dialect.plus + clause.as_set)
        else:
            where.append(clause.as_probe)
        params.extend(clause.params)
    return where, params


def _has_probes(f: ConversationFilter) -> bool:
    """Whether the filter has a condition whose probe differs from its set."""
    return (
        f.rating is not None or f.reaction is not None or bool(f.version) or f.has_correction is not None or bool(f.q)
    )


_ROW_AGGREGATES_TEMPLATE = """
SELECT c.id, c.user_id, c.channel, c.site, c.created_at, c.model_version AS pinned,
  (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) AS n_messages,
  (SELECT MAX(m.created_at) FROM messages m WHERE m.conversation_id = c.id) AS last_at,
  (SELECT {versions} FROM messages m
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
# PostgreSQL runs a correlated subquery once per row: over the whole history the per-message thumbs
# are joined from one grouped pass over ratings instead (SQLite plans the subqueries well)
THUMBS = (
    "thumbs AS (SELECT message_id, COUNT(*) FILTER (WHERE value = 1) AS ups,"
    " COUNT(*) FILTER (WHERE value = -1) AS downs FROM ratings GROUP BY message_id)"
)

_ROW_AGGREGATES = {
    SQLITE: _ROW_AGGREGATES_TEMPLATE.format(versions="GROUP_CONCAT(DISTINCT m.model_version)"),
    POSTGRES: _ROW_AGGREGATES_TEMPLATE.format(versions="string_agg(DISTINCT m.model_version, ',')"),
}


def _summary(r: Row) -> dict[str, Any]:
    preview = r["preview"] or ""
    return {
        "id": r["id"],
        "user_id": r["user_id"],
        "channel": r["channel"],
        "site": r["site"],
        "created_at": r["created_at"],
        "last_at": r["last_at"] or r["created_at"],
        "n_messages": r["n_messages"],
        "versions": sorted((r["versions"] or "").split(",")) if r["versions"] else [],
        "pinned_version": r["pinned"],
        "ups": r["ups"],
        "downs": r["downs"],
        "corrections": r["corrections"],
        "flagged": bool(r["flagged"]),
        "preview": preview,  # the whole first message: the console redacts it, then cuts it to PREVIEW_CHARS
    }


def _without(row: Row, *keys: str) -> dict[str, Any]:
    return {k: v for k, v in dict(row).items() if k not in keys}


class Browse:
    """Operator queries over the feedback database (``store.browse``)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._sql = POSTGRES if db.backend == "postgresql" else SQLITE

    async def list_conversations(
        self, f: ConversationFilter, *, limit: int = 50, cursor: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page, newest first, and the cursor of the next page (None on the last)."""
        if not 1 <= limit <= PAGE_MAX:
            raise BrowseError(f"limit must be 1-{PAGE_MAX}")
        where, params = conversation_filter(f, dialect=self._sql)  # BrowseError for a filter it cannot understand
        if _has_probes(f):
            page = await self._probed_page(f, cursor, limit + 1)
        else:
            if cursor is not None:
                where.append("(c.created_at, c.id) < (?, ?)")
                params.extend(decode_cursor(cursor))
            page = await self._page(where, params, limit + 1)
        more = len(page) > limit
        page = page[:limit]
        if not page:
            return [], None
        ids = [r["id"] for r in page]
        marks = ",".join("?" * len(ids))
        rows = await self._db.read(_ROW_AGGREGATES[self._sql] + f" WHERE c.id IN ({marks})", ids)
        by_id = {r["id"]: _summary(r) for r in rows}
        items = [by_id[i] for i in ids if i in by_id]
        last = page[-1]
        return items, encode_cursor(last["created_at"], last["id"]) if more else None

    async def _page(self, where: list[str], params: list[Any], n: int) -> list[Row]:
        sql = "SELECT c.id, c.created_at FROM conversations c"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY c.created_at DESC, c.id DESC LIMIT ?"
        return await self._db.read(sql, (*params, n))

    async def _probed_page(self, f: ConversationFilter, cursor: str | None, n: int) -> list[Row]:
        """The first ``n`` matches in two steps, each exact for its own range of conversations.

        1. The newest ``PROBE_WINDOW`` candidates (those the column filters and the cursor
           let through) are checked one by one with the probes; a common filter stops here.
        2. When the page is not full yet, the older candidates are queried once, driven by
           the smallest set of the filter, the other conditions probed on its members.

        So a common filter never builds a big set, and a rare one never probes every
        conversation.
        """
        columns, column_params = _column_filter(f)
        if cursor is not None:
            columns.append("(c.created_at, c.id) < (?, ?)")
            column_params.extend(decode_cursor(cursor))
        head = "SELECT c.created_at, c.id FROM conversations c"
        if columns:
            head += " WHERE " + " AND ".join(columns)
        edge = await self._db.read(
            head + " ORDER BY c.created_at DESC, c.id DESC LIMIT 1 OFFSET ?", (*column_params, PROBE_WINDOW - 1)
        )
        window, window_params = list(columns), list(column_params)
        if edge:  # the oldest candidate of the window
            window += ["c.created_at >= ?", "(c.created_at, c.id) >= (?, ?)"]
            window_params += [edge[0]["created_at"], edge[0]["created_at"], edge[0]["id"]]
        rowids: tuple[int | None, int | None] = (None, None)
        if (
            f.q and not self._sql.postgres
        ):  # the rowids of every message of the window's conversations lie between these two
            rows = await self._db.read(
                "SELECT MIN(m.rowid) AS first, MAX(m.rowid) AS last FROM conversations c"
                " CROSS JOIN messages m ON m.conversation_id = c.id"  # CROSS: from the window's conversations
                + (" WHERE " + " AND ".join(window) if window else ""),
                window_params,
            )
            rowids = (rows[0]["first"], rows[0]["last"])
        where, params = list(window), list(window_params)
        since = edge[0]["created_at"] if edge else 0.0  # a window's messages come after its oldest conversation
        for clause in _clauses(f, rowids=rowids, since=since, dialect=self._sql):
            sql, clause_params = clause.probe()
            where.append(sql)
            params.extend(clause_params)
        page = await self._page(where, params, n)
        if not edge or len(page) >= n:
            return page
        common_search = False
        if f.q:
            hits = (
                "SELECT 1 FROM messages WHERE to_tsvector('simple', text) @@ to_tsquery('simple', ?) LIMIT ?"
                if self._sql.postgres
                else "SELECT 1 FROM messages_fts WHERE messages_fts MATCH ? LIMIT ?"
            )
            rows = await self._db.read(
                f"SELECT COUNT(*) AS n FROM ({hits}) AS hits", (self._sql.search(f.q), COMMON_MATCHES)
            )
            common_search = rows[0]["n"] >= COMMON_MATCHES
        older, older_params = _older_filter(f, common_search=common_search, dialect=self._sql)
        where = [*columns, "c.created_at <= ?", "(c.created_at, c.id) < (?, ?)", *older]
        params = [*column_params, edge[0]["created_at"], edge[0]["created_at"], edge[0]["id"], *older_params]
        return page + await self._page(where, params, n - len(page))

    async def transcript(self, conversation_id: str) -> dict[str, Any] | None:
        """A conversation with every message, its ratings, corrections, exclusion, siblings and (a reply)
        what the customer's next message said about it (``reaction``: implicit feedback, or None)."""
        head = await self._db.read(_ROW_AGGREGATES[self._sql] + " WHERE c.id = ?", (conversation_id,))
        if not head:
            return None
        messages = [
            dict(r)
            for r in await self._db.read(
                "SELECT m.*, x.reason AS excluded_reason, x.operator AS excluded_by FROM messages m"
                " LEFT JOIN training_exclusions x ON x.message_id = m.id"
                " WHERE m.conversation_id = ? ORDER BY m.seq",
                (conversation_id,),
            )
        ]
        ratings = await self._db.read(
            "SELECT r.message_id, r.value, r.reason, r.comment, r.rater, r.created_at,"
            " COALESCE(v.state, 'trusted') AS rater_state FROM ratings r"
            " JOIN messages m ON m.id = r.message_id LEFT JOIN rater_reviews v ON v.rater = r.rater"
            " WHERE m.conversation_id = ? ORDER BY r.id",
            (conversation_id,),
        )
        corrections = await self._db.read(
            "SELECT k.id, k.message_id, k.text, k.reason, k.operator, k.created_at FROM corrections k"
            " JOIN messages m ON m.id = k.message_id WHERE m.conversation_id = ? ORDER BY k.id",
            (conversation_id,),
        )
        reactions = await self._db.read(
            "SELECT r.reply_id, r.message_id, r.signal, r.confidence, r.cue, r.value, r.weight, r.created_at"
            " FROM reactions r JOIN messages m ON m.id = r.reply_id WHERE m.conversation_id = ?",
            (conversation_id,),
        )
        by_message: dict[str, dict[str, Any]] = {}
        turns: dict[tuple[str | None, str], list[str]] = {}
        for m in messages:
            excluded_reason, excluded_by = m.pop("excluded_reason"), m.pop("excluded_by")
            m["excluded"] = {"reason": excluded_reason, "operator": excluded_by} if excluded_by else None
            m["ratings"], m["corrections"], m["reaction"] = [], [], None
            by_message[m["id"]] = m
            turns.setdefault((m["parent_id"], m["role"]), []).append(m["id"])
        for m in messages:
            same_turn = turns[(m["parent_id"], m["role"])] if m["role"] == "assistant" else [m["id"]]
            m["siblings"] = [i for i in same_turn if i != m["id"]]
        for r in ratings:
            by_message[r["message_id"]]["ratings"].append(_without(r, "message_id"))
        for k in corrections:
            by_message[k["message_id"]]["corrections"].append(_without(k, "message_id"))
        for x in reactions:
            by_message[x["reply_id"]]["reaction"] = _without(x, "reply_id")
        return {"conversation": _summary(head[0]), "messages": messages}

    async def version_series(self, *, bucket_s: float, since: float = 0.0) -> list[dict[str, Any]]:
        """Per version and time bucket: replies, thumbs, regenerations, mean latency and length."""
        # whole buckets since 1970 (PostgreSQL's CAST rounds, SQLite's truncates)
        bucket = (
            "CAST(FLOOR(m.created_at / ?) AS BIGINT)" if self._sql.postgres else "CAST(m.created_at / ? AS INTEGER)"
        )
        if self._sql.postgres:
            return _rates(
                await self._db.read(
                    f"WITH {THUMBS}, regens AS (SELECT DISTINCT regenerated_from AS id FROM messages"
                    " WHERE regenerated_from IS NOT NULL)"
                    f" SELECT m.model_version AS version, {bucket} * ? AS bucket_start, COUNT(*) AS replies,"
                    " CAST(COALESCE(SUM(t.ups), 0) AS INTEGER) AS ups,"
                    " CAST(COALESCE(SUM(t.downs), 0) AS INTEGER) AS downs, COUNT(g.id) AS regenerations,"
                    " AVG(m.latency_ms) AS latency_ms, AVG(LENGTH(m.text)) AS reply_chars"
                    " FROM messages m LEFT JOIN thumbs t ON t.message_id = m.id LEFT JOIN regens g ON g.id = m.id"
                    " WHERE m.role = 'assistant' AND m.author IS NULL AND m.model_version IS NOT NULL"
                    " AND m.finish_reason != 'error' AND m.created_at >= ?"
                    " GROUP BY version, bucket_start ORDER BY bucket_start, version",
                    (bucket_s, bucket_s, since),
                ),
                regen=True,
            )
        rows = await self._db.read(
            f"SELECT m.model_version AS version, {bucket} * ? AS bucket_start,"
            " COUNT(*) AS replies,"
            " CAST(SUM((SELECT COUNT(*) FROM ratings r WHERE r.message_id = m.id AND r.value = 1)) AS INTEGER) AS ups,"
            " CAST(SUM((SELECT COUNT(*) FROM ratings r WHERE r.message_id = m.id AND r.value = -1)) AS INTEGER) AS downs,"
            " COUNT(*) FILTER (WHERE EXISTS (SELECT 1 FROM messages x WHERE x.regenerated_from = m.id)) AS regenerations,"
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

    async def channel_stats(self, *, since: float = 0.0) -> list[dict[str, Any]]:
        """Per channel and version: replies, thumbs up and down and the up rate (model-written replies)."""
        # the whole history scans messages in table order: the created_at index would look each one up
        when = "m.created_at >= ?" if since > 0 else f"{self._sql.plus}m.created_at >= ?"
        if self._sql.postgres:
            return _rates(
                await self._db.read(
                    f"WITH {THUMBS} SELECT c.channel AS channel, m.model_version AS version, COUNT(*) AS replies,"
                    " CAST(COALESCE(SUM(t.ups), 0) AS INTEGER) AS ups,"
                    " CAST(COALESCE(SUM(t.downs), 0) AS INTEGER) AS downs"
                    " FROM messages m JOIN conversations c ON c.id = m.conversation_id"
                    " LEFT JOIN thumbs t ON t.message_id = m.id"
                    " WHERE m.role = 'assistant' AND m.author IS NULL AND m.model_version IS NOT NULL"
                    f" AND m.finish_reason != 'error' AND {when}"
                    " GROUP BY c.channel, m.model_version ORDER BY c.channel, m.model_version",
                    (since,),
                ),
                regen=False,
            )
        rows = await self._db.read(
            "SELECT c.channel AS channel, m.model_version AS version, COUNT(*) AS replies,"
            " CAST(SUM((SELECT COUNT(*) FROM ratings r WHERE r.message_id = m.id AND r.value = 1)) AS INTEGER) AS ups,"
            " CAST(SUM((SELECT COUNT(*) FROM ratings r WHERE r.message_id = m.id AND r.value = -1)) AS INTEGER) AS downs"
            " FROM messages m JOIN conversations c ON c.id = m.conversation_id"
            " WHERE m.role = 'assistant' AND m.author IS NULL AND m.model_version IS NOT NULL"
            f" AND m.finish_reason != 'error' AND {when}"
            " GROUP BY c.channel, m.model_version ORDER BY c.channel, m.model_version",
            (since,),
        )
        out = []
        for r in rows:
            d = dict(r)
            rated = d["ups"] + d["downs"]
            d["up_rate"] = d["ups"] / rated if rated else None
            out.append(d)
        return out

    async def iter_conversations(self, *, batch: int = 500) -> AsyncIterator[dict[str, Any]]:
        """Every conversation with its transcript, oldest first, for exports (keyset batches)."""
        after: tuple[float, str] = (-1.0, "")
        while True:
            page = await self._db.read(
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
        rows = await self._db.read(
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


def _rates(rows: list[Row], *, regen: bool) -> list[dict[str, Any]]:
    """Rows of per-version counts with ``up_rate`` (and ``regen_rate``) added."""
    out = []
    for r in rows:
        d = dict(r)
        rated = d["ups"] + d["downs"]
        d["up_rate"] = d["ups"] / rated if rated else None
        if regen:
            d["regen_rate"] = d["regenerations"] / d["replies"] if d["replies"] else None
        out.append(d)
    return out
