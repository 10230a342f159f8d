"""The PostgreSQL pass's redirect (tests/store_backends.py, ``PGTEST_STORE=postgresql``): a store a
test opens by its SQLite file is, in that pass, a PostgreSQL schema of the test's own, the same
one on every reopen of the file and another for another file. In the SQLite pass the same test
checks that the files are SQLite's, untouched by the redirect."""

from __future__ import annotations

from pathlib import Path

import pytest

from feedback import FeedbackStore, NotFoundError
from tests.store_backends import PG_PASS, peek, sqlite_file, sqlite_files_under, store_env


def test_sqlite_file_names_the_file_a_target_opens(tmp_path: Path) -> None:
    assert sqlite_file(tmp_path / "a.db") == tmp_path / "a.db"
    assert sqlite_file(str(tmp_path / "a.db")) == tmp_path / "a.db"
    assert sqlite_file(f"sqlite://{tmp_path}/a.db") == tmp_path / "a.db"
    assert sqlite_file("postgresql://postgres@127.0.0.1:5432/db") is None
    assert sqlite_file("postgres://postgres@127.0.0.1:5432/db") is None


async def test_a_store_opened_by_its_file_is_where_the_pass_puts_it(tmp_path: Path) -> None:
    db_file = tmp_path / "data" / "learnloop.db"
    async with await FeedbackStore.open(db_file) as store:
        backend = type(store.db).__name__
        await store.conversations.create("c1", user_id="alice")
    async with await FeedbackStore.open(f"sqlite://{db_file}") as store:  # the same file again, as a URL
        assert (await store.conversations.get("c1")).user_id == "alice"
    async with await FeedbackStore.open(tmp_path / "other.db") as store:  # another file: another store
        with pytest.raises(NotFoundError):
            await store.conversations.get("c1")
    assert peek(db_file, "SELECT id FROM conversations WHERE user_id = ?", ("alice",)) == [("c1",)]
    if PG_PASS:
        assert backend == "PostgresDatabase" and not sqlite_files_under(tmp_path)
        assert store_env(tmp_path / "data")["LEARNLOOP_STORE_URL"].startswith("postgresql://")
    else:
        assert backend == "SqliteDatabase" and sorted(sqlite_files_under(tmp_path)) == [db_file, tmp_path / "other.db"]
        assert store_env(tmp_path / "data") == {}
