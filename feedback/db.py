"""The database under the feedback store: connections, migrations, the one writer, reads.

Writes go through one writer task that groups whatever is queued into a single
``BEGIN IMMEDIATE`` transaction (group commit) and resolves each caller's future only
after ``COMMIT`` returned; so an acknowledgement sent after
``await store.conversations.add_rating(...)`` is never for a row that a crash could lose
(``synchronous=FULL`` in WAL mode). Each operation runs inside its own ``SAVEPOINT``: one
failing operation does not roll back the others that share its commit. Reads use a
second connection and never wait for the writer (WAL).

This is the SQLite database. What is SQLite's own stays in this module: the pragmas, WAL
checkpoints, ``BEGIN IMMEDIATE``, the FTS5 merge after an erasure, and the mapping of
SQLite's errors (``IntegrityError`` through ``constraint_errors``, ``SQLITE_FULL`` to
``StorageFullError``). Outside it, the SQL the concept modules write is plain SQL with
``?`` parameters, except the console's full-text search (``feedback/browse.py``, marked
there). A second backend would be a class beside ``Database`` with the same methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

import aiosqlite

from feedback.exceptions import LearnloopError, StorageFullError, StoreError
from feedback.schema import MIGRATIONS, SCHEMA_VERSION

log = logging.getLogger("learnloop.feedback")
# aiosqlite logs every statement with its parameters at DEBUG: customers' messages, ratings, PII.
# It stays at INFO even under ``learnloop -v`` (docs/reliability.md, scenario 20).
logging.getLogger("aiosqlite").setLevel(logging.INFO)

T = TypeVar("T")
Connection: TypeAlias = aiosqlite.Connection
"""What a write operation gets: the writer connection, inside the operation's savepoint."""
Row: TypeAlias = sqlite3.Row
"""A result row: by column name (``row["id"]``) or position."""
WriteOp: TypeAlias = Callable[[Connection], Awaitable[Any]]
RawConnection: TypeAlias = sqlite3.Connection
"""What a ``write_sync`` operation gets: the writer's plain connection, on its own thread."""
SyncWriteOp: TypeAlias = Callable[[RawConnection], Any]


@dataclass
class _Pending:
    op: WriteOp | None
    future: asyncio.Future[Any]
    outside_transaction: bool = False  # e.g. a WAL checkpoint: runs alone, between batches
    sync: SyncWriteOp | None = None  # set instead of ``op`` by ``write_sync``


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


async def fetch_one(conn: Connection, sql: str, params: Iterable[Any] = ()) -> Row | None:
    """Inside a write operation: the first row of a query, or None."""
    found = await _fetch(conn, sql, params)
    return found[0] if found else None


@contextlib.contextmanager
def constraint_errors(error: Callable[[str], LearnloopError]) -> Iterator[None]:
    """Inside a write operation: a broken unique or foreign key raises ``error(detail)``."""
    try:
        yield
    except sqlite3.IntegrityError as exc:
        raise error(str(exc)) from exc


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


class Database:
    """One SQLite file. Open with ``await Database.open(path)``; close with ``close()``."""

    def __init__(self, path: Path, writer: Connection, reader: Connection, *, max_batch: int = 512) -> None:
        self.path = path
        self._writer = writer
        self._reader = reader
        self._max_batch = max_batch
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._task = asyncio.create_task(self._write_loop(), name="feedback-writer")
        self._read_lock = asyncio.Lock()
        self.commits = 0  # number of transactions committed (group commit makes it < writes)
        self._closing = False
        self._next_truncate = 0.0  # loop time before which a WAL truncation is not tried again

    @classmethod
    async def open(cls, path: str | Path, *, max_batch: int = 512) -> Database:
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
        return cls(path, writer, reader, max_batch=max_batch)

    async def close(self) -> None:
        """Finish what is queued, then close. A write asked for once closing began gets ``StoreError``."""
        self._closing = True
        await self._queue.put(None)
        await self._task
        while not self._queue.empty():  # queued behind the end: answered, never left waiting
            item = self._queue.get_nowait()
            if item is not None and not item.future.done():
                item.future.set_exception(StoreError("the store is closed"))
        await self._reader.close()
        await self._writer.close()

    # --- the writer -------------------------------------------------------------------

    async def write(self, op: Callable[[Connection], Awaitable[T]], *, outside_transaction: bool = False) -> T:
        """Run ``op`` on the writer; return its result once its transaction has committed.

        ``outside_transaction``: run it alone, between two group commits, without a
        transaction (for statements such as a WAL checkpoint).
        """
        if self._closing or self._task.done():
            raise StoreError("the store is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(op, future, outside_transaction))
        return await future

    async def write_sync(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Like ``write``, for an operation written against the plain ``sqlite3`` connection.

        It runs on the writer connection's own thread. Each ``await`` of an aiosqlite call is a
        trip to that thread and back through the event loop (about 50-100 µs on a busy loop); a
        group commit made only of these operations takes one trip in all, BEGIN to COMMIT. The
        hot path (ratings: ``bench/load.py``) uses it; ``op`` must not block on anything but SQLite.
        """
        if self._closing or self._task.done():
            raise StoreError("the store is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(None, future, sync=op))
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
        assert item.op is not None
        try:
            item.future.set_result(await item.op(self._writer))
        except Exception as exc:
            item.future.set_exception(_storage_full(exc) or exc)

    async def _run_batch(self, batch: list[_Pending]) -> None:
        conn = self._writer
        results: list[tuple[_Pending, Any, BaseException | None]] = []
        try:
            if all(item.sync is not None for item in batch):
                # BEGIN, every operation in its savepoint and COMMIT in one trip to the thread
                results = await _on_thread(conn, _sync_batch, batch, True)
            else:
                await conn.execute("BEGIN IMMEDIATE")
                for item in batch:
                    if item.sync is not None:
                        results += await _on_thread(conn, _sync_batch, [item], False)
                        continue
                    assert item.op is not None
                    await conn.execute("SAVEPOINT op")
                    try:
                        result = await item.op(conn)
                    except Exception as exc:  # the caller gets it; the batch goes on
                        await conn.execute("ROLLBACK TO op")
                        await conn.execute("RELEASE op")
                        results.append((item, None, _storage_full(exc) or exc))
                    else:
                        await conn.execute("RELEASE op")
                        results.append((item, result, None))
                await conn.execute("COMMIT")
            self.commits += 1
        except Exception as exc:
            log.exception("group commit of %d operations failed", len(batch))
            with contextlib.suppress(Exception):
                await conn.execute("ROLLBACK")
            full = _storage_full(exc)
            if full is not None:  # before the callers hear of it: a retry finds the WAL's bytes freed
                await self._checkpoint_after_full()
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(full or StoreError(f"commit failed: {exc}"))
            return
        if any(isinstance(error, StorageFullError) for _, _, error in results):
            await self._checkpoint_after_full()
        for item, result, error in results:
            if item.future.done():
                continue
            if error is not None:
                item.future.set_exception(error)
            else:
                item.future.set_result(result)
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
        conn = self._writer
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
            cursor = await self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
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

        async def op(conn: Connection) -> None:
            await conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('optimize')")

        await self.write(op)

    async def checkpoint(self) -> None:
        """Copy the WAL into the database file and truncate the WAL to zero bytes."""

        async def op(conn: Connection) -> tuple[int, int, int]:
            row = await fetch_one(conn, "PRAGMA wal_checkpoint(TRUNCATE)")
            return (row[0], row[1], row[2]) if row else (0, 0, 0)

        async with self._read_lock:  # no read snapshot may pin old WAL frames meanwhile
            busy, _, _ = await self.write(op, outside_transaction=True)
        if busy:
            log.warning("WAL checkpoint was blocked by another connection; it completes at the next checkpoint")


async def _on_thread(conn: Connection, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(sqlite3_connection, *args)`` on ``conn``'s own thread, in one trip.

    aiosqlite has no public call for this; ``_execute`` and ``_conn`` are what its own
    ``execute`` uses (aiosqlite 0.20 to 0.22, the range pyproject.toml allows; ``tests/test_store.py``
    covers this path).
    """
    result: T = await conn._execute(lambda: fn(conn._conn, *args))  # type: ignore[no-untyped-call]
    return result


def _sync_batch(
    raw: sqlite3.Connection, batch: list[_Pending], whole: bool
) -> list[tuple[_Pending, Any, BaseException | None]]:
    """On the writer's thread: each operation in its own savepoint; ``whole``: BEGIN and COMMIT too."""
    results: list[tuple[_Pending, Any, BaseException | None]] = []
    if whole:
        raw.execute("BEGIN IMMEDIATE")
    try:
        for item in batch:
            assert item.sync is not None
            raw.execute("SAVEPOINT op")
            try:
                result = item.sync(raw)
            except Exception as exc:  # the caller gets it; the batch goes on
                raw.execute("ROLLBACK TO op")
                raw.execute("RELEASE op")
                results.append((item, None, _storage_full(exc) or exc))
            else:
                raw.execute("RELEASE op")
                results.append((item, result, None))
        if whole:
            raw.execute("COMMIT")
    except BaseException:
        if whole and raw.in_transaction:
            raw.execute("ROLLBACK")
        raise
    return results


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
