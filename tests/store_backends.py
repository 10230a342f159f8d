"""The store's two backends for tests: a SQLite file in the test's tmp folder, or a fresh schema in
a real PostgreSQL.

PostgreSQL is found at ``$PGTEST_ADMIN_URL`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``, trust auth as on this machine kind); each test
gets its own schema in the database ``$PGTEST_DATABASE`` (default ``learnloop_test``, made
here when missing; ``.ci/run`` makes a fresh ``learnloop_ci``), reached through ``search_path`` in the URL, and the schema is dropped after the
test. When no server answers, the PostgreSQL cases are skipped with that reason, except in CI
(``CI=true``), where they fail: CI starts PostgreSQL and must run them.

The PostgreSQL pass of the whole suite (``PGTEST_STORE=postgresql``; tests/conftest.py wires it):
every SQLite file a test would open as its store is redirected, at the test side, to a fresh
schema of its own (``Redirect``), the same schema each time the test reopens that file, dropped
after the test. In the test process, ``FeedbackStore.open`` is wrapped (``install``): a SQLite
target (a path or ``sqlite:///``) becomes the schema's URL, its erasures file stays where the
SQLite store would keep it. A ``learnloop`` subprocess a test starts gets the URL as
``LEARNLOOP_STORE_URL`` through ``store_env(data_dir)`` (tests/serve_process.py and the other
helpers call it). A SQLite file found under the test's ``tmp_path`` afterwards is a store that
escaped the redirect, and fails the test. ``peek(db_path, sql)`` reads a store from outside on
either backend.
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

PG_PASS = os.environ.get("PGTEST_STORE", "sqlite") == "postgresql"
if os.environ.get("PGTEST_STORE", "sqlite") not in ("sqlite", "postgresql"):
    raise RuntimeError(f"PGTEST_STORE={os.environ['PGTEST_STORE']!r}: use sqlite (the default) or postgresql")
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
    if os.environ.get("CI") == "true" or PG_PASS:
        pytest.fail(f"PostgreSQL is required in CI and in the PostgreSQL pass: {reason}", pytrace=False)
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
        conn.execute("SET lock_timeout = '30s'")  # a connection left open fails the drop, not hangs it
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


def make_target(backend: str, tmp_path: Path) -> StoreTarget:
    if backend == "sqlite":
        return StoreTarget("sqlite", tmp_path / "data" / "learnloop.db", tmp_path / "data" / "learnloop.db.erasures")
    url, schema = postgres_schema()
    (tmp_path / "data").mkdir(parents=True, exist_ok=True)
    return StoreTarget("postgresql", url, tmp_path / "data" / "learnloop.db.erasures", schema)


# ---- the PostgreSQL pass of the whole suite (PGTEST_STORE=postgresql) ----


def sqlite_file(target: str | Path) -> Path | None:
    """The SQLite file ``FeedbackStore.open(target)`` would open; None for a PostgreSQL URL."""
    if isinstance(target, str) and target.startswith(("postgresql://", "postgres://")):
        return None
    text = str(target)
    return Path(text.removeprefix("sqlite://") if text.startswith("sqlite:///") else text)


class Redirect:
    """One test's PostgreSQL schemas: one per SQLite file the test opens as a store (by its
    absolute path), made on first use, dropped by ``close``."""

    def __init__(self) -> None:
        self.schemas: dict[Path, tuple[str, str]] = {}
        self.opened = False  # the test opened a store (in this process, on either backend)

    def url_for(self, db_file: Path) -> str:
        key = Path(os.path.abspath(db_file))
        if key not in self.schemas:
            self.schemas[key] = postgres_schema()
        return self.schemas[key][0]

    def close(self) -> None:
        schemas, self.schemas = self.schemas, {}
        for _, schema in schemas.values():
            drop_schema(schema)


_session_redirect = Redirect()  # stores opened outside a test (a fixture wider than one test)
_current: Redirect | None = None


def current_redirect() -> Redirect:
    return _current if _current is not None else _session_redirect


def begin_test() -> Redirect:
    global _current
    _current = Redirect()
    return _current


def end_test() -> None:
    global _current
    redirect, _current = _current, None
    if redirect is not None:
        redirect.close()


def end_session() -> None:
    _session_redirect.close()


def install() -> None:
    """Wrap ``FeedbackStore.open`` in this test process: note that a store was opened, and in the
    PostgreSQL pass open the test's schema in place of a SQLite file."""
    real_open = FeedbackStore.open.__func__  # type: ignore[attr-defined]

    async def redirected_open(
        cls: type[FeedbackStore], target: str | Path, *, tombstone_path: Path | None = None
    ) -> FeedbackStore:
        redirect = current_redirect()
        redirect.opened = True
        db_file = sqlite_file(target)
        if PG_PASS and db_file is not None:
            tombstone_path = tombstone_path or db_file.with_name(db_file.name + ".erasures")
            target = redirect.url_for(db_file)
        store: FeedbackStore = await real_open(cls, target, tombstone_path=tombstone_path)
        return store

    FeedbackStore.open = classmethod(redirected_open)  # type: ignore[method-assign,assignment]


def store_env(data_dir: Path) -> dict[str, str]:
    """What a ``learnloop`` subprocess with ``data_dir`` needs beside its other settings: nothing
    on SQLite; in the PostgreSQL pass, ``LEARNLOOP_STORE_URL`` of the schema standing for
    ``data_dir/learnloop.db`` (the one this test process opens for that file, too)."""
    redirect = current_redirect()
    redirect.opened = True
    if not PG_PASS:
        return {}
    return {"LEARNLOOP_STORE_URL": redirect.url_for(Path(data_dir) / "learnloop.db")}


def store_url(data_dir: Path) -> str | None:
    """``store.url`` for settings with ``data_dir``: None on SQLite (the file in ``data_dir``), the
    test's schema in the PostgreSQL pass."""
    return store_env(data_dir).get("LEARNLOOP_STORE_URL")


def peek(db_file: Path, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run ``query`` (``?`` placeholders) on the store at ``db_file`` from outside it, as a second
    client: the SQLite file itself, or in the PostgreSQL pass the schema standing for it."""
    if not PG_PASS:
        import sqlite3

        with contextlib.closing(sqlite3.connect(db_file)) as conn, conn:
            return list(conn.execute(query, params).fetchall())
    import psycopg

    from feedback.postgres import translate

    with psycopg.connect(current_redirect().url_for(db_file), autocommit=True) as conn:
        cursor = conn.execute(translate(query), params)  # type: ignore[arg-type]
        return list(cursor.fetchall()) if cursor.description else []


def stored_bytes(db_file: Path) -> bytes:
    """What the store at ``db_file`` holds, to check a secret is not in it: the SQLite file's bytes,
    or in the PostgreSQL pass every row of every table of the test's schema, as text."""
    if not PG_PASS:
        return Path(db_file).read_bytes()
    import psycopg

    with psycopg.connect(current_redirect().url_for(db_file), autocommit=True) as conn:
        tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")]
        rows = [r[0] for t in tables for r in conn.execute(f'SELECT t::text FROM "{t}" AS t')]
    return "\n".join(rows).encode()


def sqlite_files_under(folder: Path) -> list[Path]:
    """SQLite database files under ``folder`` (by their header), for the escape check."""
    found = []
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink():
                with path.open("rb") as f:
                    if f.read(16) == b"SQLite format 3\x00":
                        found.append(path)
    return found
