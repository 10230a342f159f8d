"""The database under the feedback store: the one writer with group commit, reads, and what the
concept modules may call, whichever database is underneath.

Writes go through one writer task that groups whatever is queued into a single transaction
(group commit) and resolves each caller's future only after ``COMMIT`` returned; so an
acknowledgement sent after ``await store.conversations.add_rating(...)`` is never for a row
that a crash could lose. Each operation runs inside its own ``SAVEPOINT``: one failing
operation does not roll back the others that share its commit (on PostgreSQL a group commit of
``write_sync`` operations runs first without them, and again with them only when one failed:
``Database._optimistic``). A backend may replace a lost connection (``_reconnect``): the
batch in flight fails with ``StoreError`` and is not acknowledged; a batch whose ``BEGIN``
failed (nothing of it reached the database) runs once more on the new connection. Reads use a
second connection and never wait for the writer.

Two backends implement ``Database``, chosen by the store's target (``open_database``): a
SQLite file (``feedback/sqlite.py``, the embedded default) and PostgreSQL
(``feedback/postgres.py``, a ``postgresql://`` URL). Both keep the writer's connection on a
thread of its own, so an operation comes in two shapes, and a concept module writes both
against the protocols below, never against a driver:

- ``write(op)``: ``async def op(conn: Connection)``; each ``await conn.execute(...)`` is a trip
  to the writer's thread;
- ``write_sync(op)``: ``def op(conn: RawConnection)``, run on the writer's thread itself; a
  group commit made only of these takes one trip in all, BEGIN to COMMIT (the hot path:
  ratings, messages).

The SQL is SQLite's dialect with ``?`` parameters, which PostgreSQL's backend translates
(``feedback/postgres.py`` says how); what differs beyond that lives in the backend modules and,
for the console's full-text search, in ``feedback/browse.py`` (marked there). docs/architecture.md,
"The store", gives the design.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeAlias, TypeVar

from feedback.exceptions import ConstraintError, LearnloopError, StoreError

log = logging.getLogger("learnloop.feedback")

T = TypeVar("T")


class Row(Protocol):
    """A result row: by column name (``row["id"]``) or position (``row[0]``); ``dict(row)`` works."""

    def __getitem__(self, key: int | str, /) -> Any: ...

    def keys(self) -> list[str]: ...


class Cursor(Protocol):
    """What ``await conn.execute(...)`` gives a ``write`` operation."""

    @property
    def rowcount(self) -> int: ...

    async def fetchone(self) -> Any: ...

    async def fetchall(self) -> Iterable[Any]: ...


class Connection(Protocol):
    """What a ``write`` operation gets: the writer connection, inside the operation's savepoint."""

    def execute(self, sql: str, parameters: Iterable[Any] | None = None, /) -> Awaitable[Cursor]: ...

    def execute_fetchall(self, sql: str, parameters: Iterable[Any] | None = None, /) -> Awaitable[Iterable[Any]]: ...


class RawCursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class RawConnection(Protocol):
    """What a ``write_sync`` operation gets: the writer's plain connection, on its own thread."""

    def execute(self, sql: str, parameters: Any = ..., /) -> RawCursor: ...


WriteOp: TypeAlias = Callable[[Connection], Awaitable[Any]]
SyncWriteOp: TypeAlias = Callable[[RawConnection], Any]


async def fetch_one(conn: Connection, sql: str, params: Iterable[Any] = ()) -> Row | None:
    """Inside a write operation: the first row of a query, or None."""
    found = list(await conn.execute_fetchall(sql, tuple(params)))
    return found[0] if found else None


@contextlib.contextmanager
def constraint_errors(error: Callable[[str], LearnloopError]) -> Iterator[None]:
    """Inside a write operation: a broken unique or foreign key raises ``error(detail)``."""
    try:
        yield
    except (sqlite3.IntegrityError, ConstraintError) as exc:
        raise error(str(exc)) from exc


class Snapshot(Protocol):
    """Reads inside one read transaction: they all see the same committed state."""

    async def read(self, sql: str, params: Iterable[Any] = ()) -> list[Row]: ...


@dataclass
class _Pending:
    op: WriteOp | None
    future: asyncio.Future[Any]
    outside_transaction: bool = False  # e.g. a WAL checkpoint: runs alone, between batches
    sync: SyncWriteOp | None = None  # set instead of ``op`` by ``write_sync``


Results: TypeAlias = list[tuple[_Pending, Any, BaseException | None]]


class Database(abc.ABC):
    """The writer (group commit), shared by both backends; each backend adds its connections.

    A backend gives: ``_writer`` (a ``Connection``), ``_on_thread(fn, *args)`` (run
    ``fn(raw_connection, *args)`` on the writer's thread), ``_error`` (its errors as the store's),
    the reads, the erasure helpers and ``_close_connections``.
    """

    backend: ClassVar[str]
    _begin: ClassVar[str] = "BEGIN"
    # a group commit of ``write_sync`` operations runs first without a savepoint per operation
    # (two statements fewer each: two round trips on PostgreSQL); when one fails, the whole
    # transaction is rolled back and run again with savepoints, so the failure is that
    # operation's alone. Such operations must therefore touch nothing but the connection.
    _optimistic: ClassVar[bool] = False
    _writer: Connection

    def __init__(self, *, tombstone_path: Path, max_batch: int = 512) -> None:
        self.tombstone_path = tombstone_path  # erasures, kept outside the database (feedback/erasure.py)
        self._max_batch = max_batch
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._task = asyncio.create_task(self._write_loop(), name="feedback-writer")
        self.commits = 0  # number of transactions committed (group commit makes it < writes)
        self._closing = False

    async def close(self) -> None:
        """Finish what is queued, then close. A write asked for once closing began gets ``StoreError``."""
        self._closing = True
        await self._queue.put(None)
        await self._task
        while not self._queue.empty():  # queued behind the end: answered, never left waiting
            item = self._queue.get_nowait()
            if item is not None and not item.future.done():
                item.future.set_exception(StoreError("the store is closed"))
        await self._close_connections()

    @abc.abstractmethod
    async def _close_connections(self) -> None: ...

    @abc.abstractmethod
    async def _on_thread(self, fn: Callable[..., T], *args: Any) -> T: ...

    def _error(self, exc: BaseException) -> BaseException:
        """An operation's error as the caller gets it (a full disk: ``StorageFullError``)."""
        return exc

    async def _after_batch(self, results: Results, failed: BaseException | None) -> None:
        """After a group commit (``failed``: why it was rolled back), before its callers hear."""
        return None

    async def _after_acks(self) -> None:
        """After the callers of a group commit heard."""
        return None

    async def _reconnect(self) -> bool:
        """After a failure: open a new writer connection if the old one is lost; True if it did."""
        return False

    # --- the writer -------------------------------------------------------------------

    async def write(self, op: Callable[[Connection], Awaitable[T]], *, outside_transaction: bool = False) -> T:
        """Run ``op`` on the writer; return its result once its transaction has committed.

        ``outside_transaction``: run it alone, between two group commits, without a
        transaction (for statements such as a WAL checkpoint or ``VACUUM``).
        """
        if self._closing or self._task.done():
            raise StoreError("the store is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(op, future, outside_transaction))
        return await future

    async def write_sync(self, op: Callable[[RawConnection], T]) -> T:
        """Like ``write``, for an operation written against the writer's plain connection.

        It runs on the writer connection's own thread. Each ``await`` of a ``Connection`` call is
        a trip to that thread and back through the event loop (about 50-100 µs on a busy loop); a
        group commit made only of these operations takes one trip in all, BEGIN to COMMIT. The
        hot path (ratings: ``bench/load.py``) uses it; ``op`` must not block on anything but the
        database. On PostgreSQL (``_optimistic``) ``op`` may run twice, the first run rolled back
        when another operation of its group commit failed: it must change nothing but the database.
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
            await self._reconnect()
            item.future.set_exception(self._error(exc))

    async def _run_batch(self, batch: list[_Pending]) -> None:
        results: Results = []
        try:
            try:
                results = await self._commit_batch(batch)
            except _BeginFailed as exc:
                # nothing of the batch reached the database: on a new connection it is run once more
                if not await self._reconnect():
                    raise exc.cause from None
                results = await self._commit_batch(batch)
            self.commits += 1
        except Exception as exc:
            cause = exc.cause if isinstance(exc, _BeginFailed) else exc
            log.error("group commit of %d operations failed: %s", len(batch), cause, exc_info=cause)
            with contextlib.suppress(Exception):
                await self._writer.execute("ROLLBACK")
            await self._reconnect()  # the next batch gets a connection; this one is not acknowledged
            error = self._error(cause)
            await self._after_batch([], error)  # before the callers hear of it
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error if error is not cause else StoreError(f"commit failed: {cause}"))
            return
        await self._after_batch(results, None)
        for item, result, failure in results:
            if item.future.done():
                continue
            if failure is not None:
                item.future.set_exception(failure)
            else:
                item.future.set_result(result)
        await self._after_acks()

    async def _commit_batch(self, batch: list[_Pending]) -> Results:
        """BEGIN, each operation, COMMIT; ``_BeginFailed`` when BEGIN itself failed."""
        if all(item.sync is not None for item in batch):
            # BEGIN, every operation and COMMIT in one trip to the thread
            if self._optimistic:
                try:
                    return await self._on_thread(_sync_batch, batch, self._begin, self._error, False)
                except _OpFailed:  # rolled back: again, each operation in its savepoint
                    pass
            return await self._on_thread(_sync_batch, batch, self._begin, self._error, True)
        conn = self._writer
        results: Results = []
        try:
            await conn.execute(self._begin)
        except Exception as exc:
            raise _BeginFailed(exc) from exc
        for item in batch:
            if item.sync is not None:
                results += await self._on_thread(_sync_batch, [item], None, self._error, True)
                continue
            assert item.op is not None
            await conn.execute("SAVEPOINT op")
            try:
                result = await item.op(conn)
            except Exception as exc:  # the caller gets it; the batch goes on
                await conn.execute("ROLLBACK TO op")
                await conn.execute("RELEASE op")
                results.append((item, None, self._error(exc)))
            else:
                await conn.execute("RELEASE op")
                results.append((item, result, None))
        await conn.execute("COMMIT")
        return results

    # --- reads ------------------------------------------------------------------------

    @abc.abstractmethod
    async def read(self, sql: str, params: Iterable[Any] = ()) -> list[Row]: ...

    # --- what several processes share (PostgreSQL only) ---------------------------------

    # the channel of this store's notifications (``pg_notify``), one per schema; None: no process to tell
    notify_channel: str | None = None

    async def counter(self, sql: str, params: dict[str, Any]) -> list[Row]:
        """One small, non-durable statement outside the group commit (``feedback/limits.py``);
        the SQL is the backend's own. Only PostgreSQL has it."""
        raise StoreError(f"a {self.backend} store shares nothing between processes")

    def listen(self) -> contextlib.AbstractAsyncContextManager[AsyncIterator[str]]:
        """The notifications of ``notify_channel`` (their payloads), from the moment the context is
        entered; the iterator raises ``StoreError`` when the connection is lost. PostgreSQL only."""
        raise StoreError(f"a {self.backend} store sends no notifications")

    @abc.abstractmethod
    def snapshot(self) -> contextlib.AbstractAsyncContextManager[Snapshot]:
        """Several reads that see one consistent state."""

    # --- forgetting deleted bytes (erasure) -------------------------------------------

    @abc.abstractmethod
    async def purge_search_index(self) -> None:
        """Make the full-text index forget deleted text."""

    @abc.abstractmethod
    async def checkpoint(self) -> None:
        """Give deleted rows' bytes back: the WAL truncated (SQLite), dead tuples vacuumed (PostgreSQL)."""


class _BeginFailed(StoreError):
    """BEGIN failed: no operation of the batch reached the database (``cause``: why)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _OpFailed(StoreError):
    """An operation failed in a group commit run without savepoints; the transaction was rolled back."""


def _sync_batch(
    raw: Any,
    batch: Sequence[_Pending],
    begin: str | None,
    error: Callable[[BaseException], BaseException],
    savepoints: bool = True,
) -> Results:
    """On the writer's thread: the operations of a batch; ``begin``: BEGIN and COMMIT around them too.

    ``savepoints``: each operation in its own, so that one failing leaves the others; without them
    (``begin`` given), a failing operation rolls the transaction back and raises ``_OpFailed``
    (the connection's own failure, a ROLLBACK that fails too, is raised as it is).
    """
    results: Results = []
    if begin is not None:
        try:
            raw.execute(begin)
        except Exception as exc:
            raise _BeginFailed(exc) from exc
    try:
        for item in batch:
            assert item.sync is not None
            if not savepoints:
                try:
                    result = item.sync(raw)
                except Exception as exc:
                    raw.execute("ROLLBACK")  # raises if the connection is lost: the batch fails
                    raise _OpFailed(str(exc)) from exc
                results.append((item, result, None))
                continue
            raw.execute("SAVEPOINT op")
            try:
                result = item.sync(raw)
            except Exception as exc:  # the caller gets it; the batch goes on
                raw.execute("ROLLBACK TO op")
                raw.execute("RELEASE op")
                results.append((item, None, error(exc)))
            else:
                raw.execute("RELEASE op")
                results.append((item, result, None))
        if begin is not None:
            raw.execute("COMMIT")
    except _OpFailed:
        raise
    except BaseException:
        if begin is not None:
            with contextlib.suppress(Exception):
                if raw.in_transaction:
                    raw.execute("ROLLBACK")
        raise
    return results


def is_postgres_url(target: str | Path) -> bool:
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


async def open_database(target: str | Path, *, tombstone_path: Path | None = None, max_batch: int = 512) -> Database:
    """Open (or create) the database at ``target`` and bring its schema up to date.

    ``target``: a SQLite file (a path, or ``sqlite:///absolute/path``) or a ``postgresql://`` URL.
    ``tombstone_path``: where erasures are also written; beside a SQLite file by default,
    required for PostgreSQL. ``max_batch``: the most operations one group commit takes.
    """
    if is_postgres_url(target):
        if tombstone_path is None:
            raise StoreError("a PostgreSQL store needs a tombstone file for erasures (tombstone_path)")
        try:
            from feedback.postgres import PostgresDatabase  # psycopg is needed only for PostgreSQL
        except ImportError as exc:
            raise StoreError(f"a PostgreSQL store needs psycopg: pip install 'learnloop[postgres]' ({exc})") from None

        return await PostgresDatabase.open(str(target), tombstone_path=tombstone_path, max_batch=max_batch)
    from feedback.sqlite import SqliteDatabase

    text = str(target)
    path = Path(text.removeprefix("sqlite://") if text.startswith("sqlite:///") else text)
    return await SqliteDatabase.open(path, tombstone_path=tombstone_path, max_batch=max_batch)
