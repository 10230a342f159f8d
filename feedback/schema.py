"""Schema and migrations: one history for both backends.

SQLite keeps the number of applied steps in ``PRAGMA user_version``, PostgreSQL in the table
``learnloop_schema``. A step is one string of statements separated by ``;``, or a tuple whose
items are single statements (for statements such as triggers that hold ``;`` themselves) or
``Dialects``: statements that differ between the backends (the full-text index; the ``rowid``
that PostgreSQL lacks).

The statements are written in SQLite's dialect with the types spelled in upper case;
``postgres_ddl`` rewrites them for PostgreSQL with four rules, and nothing else: ``INTEGER
PRIMARY KEY AUTOINCREMENT`` becomes an identity column, ``INTEGER`` becomes ``BIGINT`` (SQLite's
integers are 64-bit), ``REAL`` becomes ``DOUBLE PRECISION`` (SQLite's reals are 8-byte floats,
PostgreSQL's ``REAL`` is 4 bytes), and ``TEXT`` gets ``COLLATE "C"`` (SQLite compares text
byte by byte, so ``ORDER BY`` and keyset paging order the same on both).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Dialects:
    """Statements of one step that differ between the backends (each a tuple of single statements)."""

    sqlite: tuple[str, ...] = ()
    postgresql: tuple[str, ...] = ()


def _each(text: str) -> tuple[str, ...]:
    return tuple(part for part in text.split(";") if part.strip())


Step = str | tuple[str | Dialects, ...]

MIGRATIONS: tuple[Step, ...] = (
    # 1: the initial schema
    """
    CREATE TABLE conversations (
        id          TEXT PRIMARY KEY,
        user_id     TEXT,
        channel     TEXT NOT NULL DEFAULT 'websocket',
        created_at  REAL NOT NULL
    );
    CREATE TABLE messages (
        id               TEXT PRIMARY KEY,
        conversation_id  TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        seq              INTEGER NOT NULL,
        role             TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
        text             TEXT NOT NULL,
        parent_id        TEXT REFERENCES messages(id),
        regenerated_from TEXT REFERENCES messages(id),
        model_version    TEXT,
        latency_ms       REAL,
        finish_reason    TEXT,
        n_tokens         INTEGER,
        created_at       REAL NOT NULL,
        UNIQUE (conversation_id, seq)
    );
    CREATE INDEX messages_parent ON messages(parent_id);
    CREATE INDEX messages_version ON messages(model_version);
    CREATE TABLE ratings (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        message_id  TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        value       INTEGER NOT NULL CHECK (value IN (-1, 1)),
        reason      TEXT,
        comment     TEXT,
        rater       TEXT NOT NULL,
        client_id   TEXT NOT NULL,
        created_at  REAL NOT NULL,
        UNIQUE (message_id, client_id)
    );
    CREATE INDEX ratings_message ON ratings(message_id);
    CREATE TABLE corrections (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        message_id  TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        text        TEXT NOT NULL,
        operator    TEXT NOT NULL,
        created_at  REAL NOT NULL
    );
    CREATE INDEX corrections_message ON corrections(message_id);
    CREATE TABLE model_versions (
        name             TEXT PRIMARY KEY,
        seq              INTEGER NOT NULL UNIQUE,
        state            TEXT NOT NULL,
        adapter_path     TEXT,
        sha256           TEXT,
        parent           TEXT,
        base_model       TEXT,
        eval_report      TEXT,
        gate_reasons     TEXT,
        feedback_ids     TEXT,
        training_run_id  INTEGER,
        created_at       REAL NOT NULL,
        updated_at       REAL NOT NULL
    );
    CREATE TABLE training_runs (
        id                 INTEGER PRIMARY KEY AUTOINCREMENT,
        state              TEXT NOT NULL,
        started_at         REAL NOT NULL,
        finished_at        REAL,
        version            TEXT,
        progress           TEXT,
        detail             TEXT,
        max_rating_id      INTEGER NOT NULL DEFAULT 0,
        max_correction_id  INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE audit_log (
        id       INTEGER PRIMARY KEY AUTOINCREMENT,
        at       REAL NOT NULL,
        actor    TEXT NOT NULL,
        action   TEXT NOT NULL,
        subject  TEXT,
        detail   TEXT
    );
    """,
    # 2: trust and privacy: tenants, operator-written replies, exclusions, rater reviews, erasures
    """
    ALTER TABLE conversations ADD COLUMN tenant TEXT;
    ALTER TABLE messages ADD COLUMN author TEXT;
    CREATE INDEX conversations_user ON conversations(user_id);
    CREATE INDEX ratings_rater ON ratings(rater);
    CREATE TABLE training_exclusions (
        message_id  TEXT PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
        reason      TEXT NOT NULL,
        operator    TEXT NOT NULL,
        created_at  REAL NOT NULL
    );
    CREATE TABLE rater_reviews (
        rater       TEXT PRIMARY KEY,
        state       TEXT NOT NULL CHECK (state IN ('pending', 'approved', 'rejected')),
        reasons     TEXT NOT NULL,
        reviewer    TEXT,
        updated_at  REAL NOT NULL
    );
    CREATE TABLE erasures (
        subject_hash  TEXT PRIMARY KEY,
        erased_at     REAL NOT NULL
    );
    """,
    # 3: release: conversations pinned to a version, rollback targets, the training lease
    """
    ALTER TABLE conversations ADD COLUMN model_version TEXT;
    ALTER TABLE model_versions ADD COLUMN replaced TEXT;
    CREATE INDEX conversations_version ON conversations(model_version);
    CREATE TABLE leases (
        name        TEXT PRIMARY KEY,
        holder      TEXT NOT NULL,
        expires_at  REAL NOT NULL
    );
    """,
    # 4: the operator console: accounts, API tokens, sessions; full-text search; browse indexes
    (
        """CREATE TABLE operators (
            name           TEXT PRIMARY KEY,
            password_hash  TEXT NOT NULL,
            role           TEXT NOT NULL CHECK (role IN ('viewer', 'reviewer', 'admin')),
            disabled       INTEGER NOT NULL DEFAULT 0,
            created_at     REAL NOT NULL
        )""",
        """CREATE TABLE api_tokens (
            token_hash  TEXT PRIMARY KEY,
            operator    TEXT NOT NULL REFERENCES operators(name) ON DELETE CASCADE,
            label       TEXT NOT NULL,
            created_at  REAL NOT NULL,
            last_used   REAL
        )""",
        """CREATE TABLE console_sessions (
            session_hash  TEXT PRIMARY KEY,
            operator      TEXT NOT NULL REFERENCES operators(name) ON DELETE CASCADE,
            csrf_token    TEXT NOT NULL,
            created_at    REAL NOT NULL,
            expires_at    REAL NOT NULL
        )""",
        "ALTER TABLE corrections ADD COLUMN reason TEXT",
        "CREATE INDEX conversations_created ON conversations(created_at, id)",
        "CREATE INDEX conversations_channel ON conversations(channel, created_at)",
        "CREATE INDEX messages_regenerated ON messages(regenerated_from)",
        "CREATE INDEX messages_created ON messages(created_at)",
        # covers the version filter's set (the conversations a version answered in) without the table
        "CREATE INDEX messages_version_conversation ON messages(model_version, conversation_id)",
        "CREATE INDEX audit_actor ON audit_log(actor)",
        Dialects(
            sqlite=(
                "CREATE VIRTUAL TABLE messages_fts USING fts5(text, content='messages', content_rowid='rowid')",
                """CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
                    INSERT INTO messages_fts(rowid, text) VALUES (new.rowid, new.text);
                END""",
                """CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
                    INSERT INTO messages_fts(messages_fts, rowid, text) VALUES ('delete', old.rowid, old.text);
                END""",
                """CREATE TRIGGER messages_fts_update AFTER UPDATE OF text ON messages BEGIN
                    INSERT INTO messages_fts(messages_fts, rowid, text) VALUES ('delete', old.rowid, old.text);
                    INSERT INTO messages_fts(rowid, text) VALUES (new.rowid, new.text);
                END""",
                "INSERT INTO messages_fts(messages_fts) VALUES ('rebuild')",
            ),
            # the console's search (feedback/browse.py): an expression index, so messages gets no
            # column that SELECT * would return; 'simple' (no stemming, no stop words) is FTS5's unicode61
            postgresql=("CREATE INDEX messages_search ON messages USING gin (to_tsvector('simple', text))",),
        ),
    ),
    # 5: channels: the widget site a conversation came from
    """
    ALTER TABLE conversations ADD COLUMN site TEXT;
    CREATE INDEX conversations_site ON conversations(site, created_at);
    """,
    # 6: IM channels (Telegram, Slack, signed webhooks): the conversation of each platform thread,
    # inbound events (each processed once, also after a restart) and the outbox of platform calls
    (
        *_each(
            """
    CREATE TABLE channel_threads (
        conversation_id  TEXT PRIMARY KEY REFERENCES conversations(id) ON DELETE CASCADE,
        channel          TEXT NOT NULL,
        site             TEXT NOT NULL,
        thread           TEXT NOT NULL,
        created_at       REAL NOT NULL
    );
    CREATE INDEX channel_threads_thread ON channel_threads(channel, site, thread, created_at);
    CREATE TABLE inbox (
        id               INTEGER PRIMARY KEY AUTOINCREMENT,
        channel          TEXT NOT NULL,
        site             TEXT NOT NULL,
        key              TEXT NOT NULL,
        lane             TEXT NOT NULL,
        kind             TEXT NOT NULL,
        payload          TEXT,
        user_id          TEXT,
        state            TEXT NOT NULL CHECK (state IN ('pending', 'done', 'failed')),
        attempts         INTEGER NOT NULL DEFAULT 0,
        next_attempt_at  REAL NOT NULL,
        received_at      REAL NOT NULL,
        conversation_id  TEXT,
        turn_id          TEXT NOT NULL,
        reply_id         TEXT NOT NULL,
        preview          TEXT,
        last_error       TEXT,
        finished_at      REAL,
        UNIQUE (channel, site, key)
    );
    CREATE INDEX inbox_lanes ON inbox(state, lane, id);
    CREATE INDEX inbox_user ON inbox(user_id);
    CREATE TABLE outbox (
        id               INTEGER PRIMARY KEY AUTOINCREMENT,
        key              TEXT NOT NULL UNIQUE,
        channel          TEXT NOT NULL,
        site             TEXT NOT NULL,
        lane             TEXT NOT NULL,
        conversation_id  TEXT REFERENCES conversations(id) ON DELETE CASCADE,
        method           TEXT NOT NULL,
        body             TEXT NOT NULL,
        state            TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
        attempts         INTEGER NOT NULL DEFAULT 0,
        uncertain        INTEGER NOT NULL DEFAULT 0,
        created_at       REAL NOT NULL,
        next_attempt_at  REAL NOT NULL,
        last_error       TEXT,
        delivered_at     REAL,
        response         TEXT
    );
    CREATE INDEX outbox_lanes ON outbox(state, lane, id);
    CREATE INDEX outbox_conversation ON outbox(conversation_id);
    """
        ),
        # the newest conversation of a thread breaks ties by insertion order (feedback/inbox.py)
        Dialects(postgresql=("ALTER TABLE channel_threads ADD COLUMN rowid BIGINT GENERATED ALWAYS AS IDENTITY",)),
    ),
    # 7: the OpenAI-compatible API: its keys (SHA-256 hashes only) and each conversation's opening
    (
        *_each(
            """
    CREATE TABLE api_keys (
        key_hash    TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        created_at  REAL NOT NULL
    );
    CREATE INDEX api_keys_name ON api_keys(name);
    CREATE TABLE api_openings (
        conversation_id  TEXT PRIMARY KEY REFERENCES conversations(id) ON DELETE CASCADE,
        opening          TEXT NOT NULL,
        created_at       REAL NOT NULL
    );
    CREATE INDEX api_openings_opening ON api_openings(opening, created_at);
    """
        ),
        # the newest conversations of an opening break ties by insertion order (feedback/apikeys.py)
        Dialects(postgresql=("ALTER TABLE api_openings ADD COLUMN rowid BIGINT GENERATED ALWAYS AS IDENTITY",)),
    ),
    # 8: erasure reaches the model: when a version was found trained on an erased user's data, and
    # when its adapter files were deleted
    """
    ALTER TABLE model_versions ADD COLUMN trained_on_erased REAL;
    ALTER TABLE model_versions ADD COLUMN adapter_deleted REAL;
    """,
    # 9: implicit feedback: what the customer's next message says about the reply before it (one
    # reading per reply, from the first user turn after it; the rules live in training/implicit.py)
    """
    CREATE TABLE reactions (
        reply_id    TEXT PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
        message_id  TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        signal      TEXT NOT NULL,
        confidence  REAL NOT NULL,
        cue         TEXT NOT NULL,
        value       INTEGER CHECK (value IN (-1, 1)),
        weight      REAL NOT NULL,
        created_at  REAL NOT NULL
    );
    CREATE INDEX reactions_message ON reactions(message_id);
    CREATE INDEX reactions_labelled ON reactions(created_at) WHERE value IS NOT NULL;
    """,
    # 10: several server processes on one store: the conversations an operator answers (a takeover
    # outlives the process that took it: feedback/takeovers.py), and, on PostgreSQL only, the token
    # buckets of the rate limits shared by the processes (feedback/limits.py; UNLOGGED: no WAL, and
    # emptied after a crash, which only refills every bucket)
    (
        *_each(
            """
    CREATE TABLE takeovers (
        conversation_id  TEXT PRIMARY KEY REFERENCES conversations(id) ON DELETE CASCADE,
        operator         TEXT NOT NULL,
        since            REAL NOT NULL
    );
    """
        ),
        Dialects(
            postgresql=(
                "CREATE UNLOGGED TABLE rate_buckets (scope TEXT NOT NULL, key TEXT NOT NULL,"
                " rate DOUBLE PRECISION NOT NULL, burst DOUBLE PRECISION NOT NULL,"
                " tokens DOUBLE PRECISION NOT NULL, updated DOUBLE PRECISION NOT NULL,"
                " full_at DOUBLE PRECISION NOT NULL, allowed BOOLEAN NOT NULL, PRIMARY KEY (scope, key))",
                "CREATE INDEX rate_buckets_full ON rate_buckets(full_at)",
            )
        ),
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)


_IDENTITY = re.compile(r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b")
_INTEGER = re.compile(r"\bINTEGER\b")
_REAL = re.compile(r"\bREAL\b")
_TEXT = re.compile(r"\bTEXT\b")


def postgres_ddl(statement: str) -> str:
    """A statement of the history in PostgreSQL's types (the four rules in this module's docstring)."""
    statement = _IDENTITY.sub("BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", statement)
    statement = _INTEGER.sub("BIGINT", statement)
    statement = _REAL.sub("DOUBLE PRECISION", statement)
    return _TEXT.sub('TEXT COLLATE "C"', statement)


def statements(number: int, dialect: str) -> list[str]:
    """The statements of step ``number`` (0-based) for ``dialect`` (``sqlite`` or ``postgresql``)."""
    step = MIGRATIONS[number]
    parts: tuple[str | Dialects, ...] = _each(step) if isinstance(step, str) else step
    out: list[str] = []
    for part in parts:
        if isinstance(part, Dialects):
            out += part.sqlite if dialect == "sqlite" else part.postgresql
        elif part.strip():
            out.append(part)
    return out if dialect == "sqlite" else [postgres_ddl(s) for s in out]
