"""Schema and migrations. ``PRAGMA user_version`` holds the number of applied steps."""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
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
)

SCHEMA_VERSION = len(MIGRATIONS)
