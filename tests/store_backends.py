"""The store's two backends for tests: a SQLite file in the test's tmp folder, or a fresh schema in
a real PostgreSQL.

PostgreSQL is found at ``$PGTEST_ADMIN_URL`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``, trust auth as on this machine kind); each test
gets its own schema in the database ``$PGTEST_DATABASE`` (default ``learnloop_test``, made
here when missing; ``.ci/run`` makes a fresh ``learnloop_ci``), reached through ``search_path`` in the URL, and the schema is dropped after the
test. When no server answers, the PostgreSQL cases are skipped with that reason, except in CI
(``CI=true``), where they fail: CI starts PostgreSQL and must run them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from feedback import FeedbackStore

BACKENDS = ("sqlite", "postgresql")
ADMIN_URL = os.environ.get("PGTEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
TEST_DATABASE = os.environ.get("PGTEST_DATABASE", "learnloop_test")  # .ci/run makes learnloop_ci


@dataclass(frozen=True)
class StoreTarget:
    """Where a test's store lives: ``target`` for ``FeedbackStore.open``, and the erasures file."""

    backend: str
    target: str | Path
    tombstones: Path
    schema: str | None = None  # PostgreSQL: the test's own schema

    @property
    def url(self) -> str | None:
        """What ``store.url`` is set to for this backend (None: the default SQLite file in ``data_dir``)."""
        return str(self.target) if self.backend == "postgresql" else None

    async def open(self) -> FeedbackStore:
        """Open (or reopen) the test's store."""
        return await FeedbackStore.open(self.target, tombstone_path=self.tombstones)

    def sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run ``query`` on the store's database from outside the store (a second client), with
        the backend's own driver and placeholders; returns the rows."""
        if self.backend == "sqlite":
            import sqlite3

            with contextlib.closing(sqlite3.connect(self.target)) as conn, conn:
                return list(conn.execute(query, params).fetchall())
        import psycopg

        with psycopg.connect(str(self.target), autocommit=True) as conn:
            cursor = conn.execute(query, params)
            return list(cursor.fetchall()) if cursor.description else []


def _admin_url(database: str) -> str:
    parts = urllib.parse.urlsplit(ADMIN_URL)
    return urllib.parse.urlunsplit(parts._replace(path="/" + database))


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"PostgreSQL is required in CI: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL store tests skipped: {reason} (in CI, CI=true, this fails)")


def postgres_schema() -> tuple[str, str]:
    """A fresh schema in ``learnloop_test``: (store URL, schema name). Skips or fails without a server."""
    try:
        import psycopg
    except ImportError:
        _unavailable("psycopg is not installed (pip install -e '.[dev]')")
        raise
    try:
        with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3) as admin:
            if admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (TEST_DATABASE,)).fetchone() is None:
                with contextlib.suppress(psycopg.errors.DuplicateDatabase):  # another test process made it
                    admin.execute(f"CREATE DATABASE {TEST_DATABASE}")
    except psycopg.OperationalError as exc:
        _unavailable(f"no server answers at {ADMIN_URL} ({str(exc).strip().splitlines()[0]})")
    schema = f"t_{secrets.token_hex(6)}"
    url = _admin_url(TEST_DATABASE)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    options = urllib.parse.quote(f"-csearch_path={schema}")
    return f"{url}?options={options}", schema


def drop_schema(schema: str) -> None:
    import psycopg

    with psycopg.connect(_admin_url(TEST_DATABASE), autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


def make_target(backend: str, tmp_path: Path) -> StoreTarget:
    if backend == "sqlite":
        return StoreTarget("sqlite", tmp_path / "data" / "learnloop.db", tmp_path / "data" / "learnloop.db.erasures")
    url, schema = postgres_schema()
    (tmp_path / "data").mkdir(parents=True, exist_ok=True)
    return StoreTarget("postgresql", url, tmp_path / "data" / "learnloop.db.erasures", schema)
