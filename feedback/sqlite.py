"""The SQLite backend of the feedback store: one file, the embedded default.

What is SQLite's own stays in this module: the pragmas (WAL, ``synchronous=FULL``,
``secure_delete``), WAL checkpoints, ``BEGIN IMMEDIATE``, the FTS5 merge after an erasure,
aiosqlite's writer thread, and the mapping of SQLite's errors (``SQLITE_FULL`` to
``StorageFullError``; ``IntegrityError`` through ``feedback.db.constraint_errors``). The writer
and its group commit are ``feedback.db.Database``'s; acknowledgements are durable because every
commit is (``synchronous=FULL`` in WAL mode). Reads use a second connection and never wait for
the writer (WAL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from feedback import db
from feedback.db import Database, Results, Row, fetch_one
from feedback.exceptions import StorageFullError, StoreError
from feedback.schema import SCHEMA_VERSION, statements

log = logging.getLogger("learnloop.feedback")
# aiosqlite logs every statement with its parameters at DEBUG: customers' messages, ratings, PII.
# It stays at INFO even under ``learnloop -v`` (docs/reliability.md, scenario 20).
logging.getLogger("aiosqlite").setLevel(logging.INFO)

T = TypeVar("T")
Connection = aiosqlite.Connection


_BUSY_TIMEOUT_MS = 10_000
_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA secure_delete=ON",  # erased rows are overwritten, not just unlinked
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
    f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}",
)


async def _connect(path: Path) -> Connection:
    conn = await aiosqlite.connect(path, isolation_level=None)
    conn.row_factory = sqlite3.Row
    try:
        for pragma in _PRAGMAS:
            await conn.execute(pragma)
        await _check_durability(conn, path)
    except BaseException:
        await conn.close()
        raise
    return conn


async def _check_durability(conn: Connection, path: Path) -> None:
    """Refuse a store where WAL or ``synchronous=FULL`` did not take effect: acks would not be durable.

    SQLite answers a pragma it cannot honour by keeping the old mode (WAL needs shared memory,
    which some network filesystems lack), so the mode is read back, not assumed.
    """
    mode = await fetch_one(conn, "PRAGMA journal_mode")
    if mode is None or str(mode[0]).lower() != "wal":
        found = mode[0] if mode else "unknown"
        raise StoreError(f"{path}: journal_mode is {found}, not wal (does this filesystem support it?); not serving")
    sync = await fetch_one(conn, "PRAGMA synchronous")
    if sync is None or int(sync[0]) != 2:
        found = sync[0] if sync else "unknown"
        raise StoreError(f"{path}: synchronous is {found}, not 2 (FULL): acknowledged writes could be lost")


def _check_writable(folder: Path) -> None:
    """The data folder exists (made if need be) and takes a new file, or a one-line ``StoreError``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise StoreError(f"the data folder {folder} is not writable: {exc.strerror or exc}") from None


async def _fetch(conn: Connection, sql: str, params: Iterable[Any]) -> list[Row]:
    # one trip to the connection's thread (execute, fetch and close as three awaits were three)
    return list(await conn.execute_fetchall(sql, tuple(params)))


def _storage_full(exc: BaseException) -> StorageFullError | None:
    """``SQLITE_FULL`` (a full disk, or the database at ``max_page_count``) anywhere in ``exc``'s chain.

    SQLite may roll the whole transaction back on it, so the ``ROLLBACK TO`` that follows
    fails too: the full error is then that failure's context.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, sqlite3.OperationalError) and seen.sqlite_errorcode == sqlite3.SQLITE_FULL:
            full = StorageFullError("the disk or the database is full: nothing was stored")
            full.__cause__ = seen  # for the server log
            return full
        seen = seen.__cause__ or seen.__context__
    return None


class Snapshot:
    """Reads inside one read transaction: they all see the same committed state."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    async def read(self, sql: str, params: Iterable[Any] = ()) -> list[Row]:
        return await _fetch(self._conn, sql, params)


class SqliteDatabase(Database):
    """One SQLite file. Open with ``await SqliteDatabase.open(path)`` (or ``feedback.db.open_database``)."""

    backend = "sqlite"
    _begin = "BEGIN IMMEDIATE"

    def __init__(
        self,
        path: Path,
        writer: Connection,
        reader: Connection,
        *,
        tombstone_path: Path | None = None,
        max_batch: int = 512,
    ) -> None:
        super().__init__(tombstone_path=tombstone_path or path.with_name(path.name + ".erasures"), max_batch=max_batch)
        self.path = path
        self._writer = writer
        self._sqlite_writer = writer
        self._reader = reader
        self._read_lock = asyncio.Lock()
        self._next_truncate = 0.0  # loop time before which a WAL truncation is not tried again

    @classmethod
    async def open(
        cls, path: str | Path, *, tombstone_path: Path | None = None, max_batch: int = 512
    ) -> SqliteDatabase:
        """Open (or create) the file and bring its schema up to date.

        ``max_batch``: the most operations one group commit takes (default 512).
        """
        path = Path(path)
        _check_writable(path.parent)
        writer = await _connect(path)
        try:
            await _migrate(writer)
            reader = await _connect(path)
        except BaseException:
            await writer.close()  # its thread would otherwise keep the process alive
            raise
        return cls(path, writer, reader, tombstone_path=tombstone_path, max_batch=max_batch)

    async def _close_connections(self) -> None:
        await self._reader.close()
        await self._sqlite_writer.close()

    async def _on_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(sqlite3_connection, *args)`` on the writer connection's own thread, in one trip.

        aiosqlite has no public call for this; ``_execute`` and ``_conn`` are what its own
        ``execute`` uses (aiosqlite 0.20 to 0.22, the range pyproject.toml allows;
        ``tests/test_store.py`` covers this path).
        """
        conn = self._sqlite_writer
        result: T = await conn._execute(lambda: fn(conn._conn, *args))  # type: ignore[no-untyped-call]
        return result

    def _error(self, exc: BaseException) -> BaseException:
        return _storage_full(exc) or exc

    async def _after_batch(self, results: Results, failed: BaseException | None) -> None:
        # before the callers hear of it: a retry finds the WAL's bytes freed
        if isinstance(failed, StorageFullError) or any(isinstance(e, StorageFullError) for _, _, e in results):
            await self._checkpoint_after_full()

    async def _after_acks(self) -> None:
        if self._wal_outgrows_disk():  # after the callers heard: their acks do not wait for it
            await self._checkpoint_truncate()

    def _wal_outgrows_disk(self) -> bool:
        """Does the WAL hold more than half of the room left on its disk?

        Then it is checkpointed and truncated now, not at ``wal_autocheckpoint`` (about 4 MB): on
        a nearly full disk the WAL would otherwise grow into every free byte, and a checkpoint
        needs room in the database file for the pages it copies, so the store would stay full
        even after space returned (found on a real 2 MiB filesystem). Two system calls a commit.
        """
        try:
            wal = os.stat(f"{self.path}-wal").st_size
            disk = os.statvfs(self.path.parent)
        except OSError:
            return False
        return wal > 0 and 2 * wal > disk.f_bavail * disk.f_frsize

    async def _checkpoint_truncate(self) -> None:
        """Checkpoint and truncate the WAL now, without waiting for readers.

        A TRUNCATE checkpoint waits for readers (another process, a ``snapshot``) through the busy
        handler, up to ``busy_timeout`` (10 s) of the writer's time per commit; here it does not
        wait (``busy_timeout`` 0 for the call). When a reader holds it up, the next try is a second
        later rather than after the next commit.
        """
        loop = asyncio.get_running_loop()
        if loop.time() < self._next_truncate:
            return
        conn = self._sqlite_writer
        try:
            await conn.execute("PRAGMA busy_timeout=0")
            try:
                row = await fetch_one(conn, "PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                await conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        except Exception as exc:
            log.warning("checkpoint of a WAL outgrowing its disk failed: %s", exc)
            row = None
        if row is None or row[0]:  # failed, or busy: a reader holds frames the checkpoint needs
            self._next_truncate = loop.time() + 1.0

    async def _checkpoint_after_full(self) -> None:
        """The disk is full: copy the WAL into the database file and truncate it, now.

        The automatic checkpoint runs only once the WAL holds ``wal_autocheckpoint`` pages
        (about 4 MB); on a disk with less room than that the WAL would never shrink, and once
        space returned every write would fill the disk again. A TRUNCATE checkpoint needs no
        new space in the database file for pages the WAL already holds, and gives the WAL's
        bytes back to the disk.
        """
        try:
            cursor = await self._sqlite_writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            row = await cursor.fetchone()
            await cursor.close()
        except Exception as exc:
            log.warning("checkpoint after a full disk failed: %s", exc)
            return
        busy, frames = (row[0], row[1]) if row else (None, None)
        log.warning("storage full: WAL checkpointed and truncated (busy=%s, frames=%s)", busy, frames)

    # --- reads ------------------------------------------------------------------------

    async def read(self, sql: str, params: Iterable[Any] = ()) -> list[Row]:
        async with self._read_lock:
            return await _fetch(self._reader, sql, params)

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[Snapshot]:
        """Several reads that see one consistent state (other reads wait meanwhile)."""
        async with self._read_lock:
            await self._reader.execute("BEGIN")
            try:
                yield Snapshot(self._reader)
            finally:
                await self._reader.execute("COMMIT")

    # --- forgetting deleted bytes (erasure) -------------------------------------------

    async def purge_search_index(self) -> None:
        """Merge the full-text index: FTS5 keeps deleted terms in old segments until a merge."""

        async def op(conn: db.Connection) -> None:
            await conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('optimize')")

        await self.write(op)

    async def checkpoint(self) -> None:
        """Copy the WAL into the database file and truncate the WAL to zero bytes."""

        async def op(conn: db.Connection) -> tuple[int, int, int]:
            row = await fetch_one(conn, "PRAGMA wal_checkpoint(TRUNCATE)")
            return (row[0], row[1], row[2]) if row else (0, 0, 0)

        async with self._read_lock:  # no read snapshot may pin old WAL frames meanwhile
            busy, _, _ = await self.write(op, outside_transaction=True)
        if busy:
            log.warning("WAL checkpoint was blocked by another connection; it completes at the next checkpoint")


async def _migrate(conn: Connection) -> None:
    row = await fetch_one(conn, "PRAGMA user_version")
    current = int(row[0]) if row else 0
    if current > SCHEMA_VERSION:
        raise StoreError(
            f"database schema version {current} is newer than this learnloop ({SCHEMA_VERSION}); upgrade learnloop"
        )
    for number in range(current, SCHEMA_VERSION):
        await conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in statements(number, "sqlite"):
                await conn.execute(statement)
            await conn.execute(f"PRAGMA user_version = {number + 1}")
            await conn.execute("COMMIT")
        except Exception:
            await conn.execute("ROLLBACK")
            raise
        log.info("feedback store migrated to schema %d", number + 1)
