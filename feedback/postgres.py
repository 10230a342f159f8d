"""The PostgreSQL backend of the feedback store: a ``postgresql://`` URL instead of a file.

It keeps SQLite's shape (``feedback/sqlite.py``) so that the concept modules run unchanged on
both: one writer connection on a thread of its own (psycopg 3's sync ``Connection``, autocommit
off in the driver and ``BEGIN``/``SAVEPOINT``/``COMMIT`` sent by ``feedback.db.Database``'s
group commit), and one reader connection (psycopg's ``AsyncConnection``) on the event loop. A
``write_sync`` operation runs on the writer's thread as on SQLite; a ``write`` operation's
``await conn.execute(...)`` is one trip to that thread. An acknowledgement is sent after
``COMMIT`` returned, which PostgreSQL answers once the commit record is flushed
(``synchronous_commit=on``, checked at open, with ``fsync``).

What is PostgreSQL's own stays here:

- the SQL: the concept modules write SQLite's dialect with ``?`` parameters; ``translate``
  turns each ``?`` outside a quoted string into ``%s`` and doubles every ``%`` (psycopg's
  placeholder syntax), once per distinct statement (cached);
- rows that read like ``sqlite3.Row`` (``row["id"]``, ``row[0]``, ``dict(row)``), and
  ``numeric`` results (``AVG`` of integers, ``SUM`` of counts) loaded as ``float``;
- errors: a unique, foreign key, not-null or check violation becomes ``ConstraintError``
  (``feedback.db.constraint_errors`` names it), a full disk (SQLSTATE 53100)
  ``StorageFullError``, a lost connection ``StoreError``; a lost writer or reader connection is
  replaced (``_reconnect``, ``_reader_connection``), a failed read asked once more;
- the schema's history in PostgreSQL's types (``feedback.schema.postgres_ddl``), applied under
  an advisory lock (two processes starting at once migrate once), its step count in
  ``learnloop_schema``;
- what several server processes share beyond tables: ``counter``, a connection of its own in
  autocommit with ``synchronous_commit = off`` for the shared rate limits (``feedback/limits.py``),
  and ``listen``, a connection that ``LISTEN``s on the store's channel (``notify_channel``, one
  per schema) for the takeover notices (``feedback/takeovers.py``, ``server/presence.py``);
- erasure: the search index rebuilt (``purge_search_index``) and ``VACUUM`` of the tables an
  erasure deletes from (``checkpoint``); what that does and does not promise about old bytes is
  in docs/architecture.md, "The store".
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import psycopg.errors
from psycopg.types.numeric import FloatLoader
from psycopg.types.string import StrDumperUnknown

from feedback.db import Database, Row
from feedback.exceptions import ConstraintError, StorageFullError, StoreError
from feedback.schema import SCHEMA_VERSION, statements

log = logging.getLogger("learnloop.feedback")
T = TypeVar("T")

_MIGRATION_LOCK = 0x6C6C5F736368  # pg_advisory_xact_lock key of the migrations ("ll_sch")
# what an erasure deletes from (feedback/erasure.py): VACUUM frees their dead tuples and index entries
ERASED_TABLES = (
    "ratings",
    "rater_reviews",
    "corrections",
    "training_exclusions",
    "messages",
    "conversations",
    "inbox",
    "outbox",
    "channel_threads",
    "api_openings",
)


@functools.lru_cache(maxsize=1024)
def translate(sql: str) -> str:
    """SQLite's ``?`` parameters as psycopg's ``%s`` (not inside '...' or "..."), every ``%`` doubled."""
    out: list[str] = []
    quote: str | None = None
    for ch in sql:
        if quote is not None:
            if ch == quote:
                quote = None
        elif ch in ("'", '"'):
            quote = ch
        elif ch == "?":
            out.append("%s")
            continue
        out.append("%%" if ch == "%" else ch)
    return "".join(out)


class PgRow:
    """A result row read like ``sqlite3.Row``: by position, by column name, and ``dict(row)``."""

    __slots__ = ("_index", "_names", "_values")

    def __init__(self, names: tuple[str, ...], index: dict[str, int], values: tuple[Any, ...]) -> None:
        self._names = names
        self._index = index
        self._values = values

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            return self._values[self._index[key]]
        return self._values[key]

    def keys(self) -> list[str]:
        return list(self._names)

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PgRow) and (self._names, self._values) == (other._names, other._values)

    def __hash__(self) -> int:
        return hash(self._values)

    def __repr__(self) -> str:
        return f"PgRow({dict(zip(self._names, self._values, strict=True))!r})"


def _rows(description: Sequence[Any] | None, records: Iterable[Sequence[Any]]) -> list[Row]:
    if description is None:
        return []
    names = tuple(c.name for c in description)
    index: dict[str, int] = {}
    for i, name in enumerate(names):
        index.setdefault(name, i)  # the first of two same-named columns, as sqlite3.Row
    return [PgRow(names, index, tuple(r)) for r in records]


def _store_error(exc: BaseException) -> BaseException:
    """A driver error as the store's (the driver's error chained as the cause)."""
    mapped: BaseException
    if isinstance(exc, psycopg.errors.IntegrityError):
        mapped = ConstraintError(str(exc).strip())
    elif isinstance(exc, psycopg.errors.DiskFull):
        mapped = StorageFullError("the disk or the database is full: nothing was stored")
    elif isinstance(exc, psycopg.OperationalError):
        mapped = StoreError(f"PostgreSQL: {str(exc).strip()}")
    else:
        return exc
    mapped.__cause__ = exc
    return mapped


class RawCursor:
    """A statement's result, read on the writer's thread: ``rowcount``, ``fetchone``, ``fetchall``."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list[Row], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def fetchone(self) -> Row | None:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[Row]:
        return self._rows


class RawConnection:
    """The writer's psycopg connection as a ``feedback.db.RawConnection`` (SQLite's dialect in, rows out)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def execute(self, sql: str, parameters: Any = ()) -> RawCursor:
        try:
            cursor = self.conn.execute(translate(sql), tuple(parameters or ()))
            return RawCursor(
                _rows(cursor.description, cursor.fetchall() if cursor.description else ()), cursor.rowcount
            )
        except psycopg.Error as exc:
            mapped = _store_error(exc)
            if mapped is exc:
                raise
            raise mapped from exc

    @property
    def in_transaction(self) -> bool:
        return self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE


class Cursor:
    """``RawCursor`` for a ``write`` operation (the rows were read on the writer's thread)."""

    __slots__ = ("_raw",)

    def __init__(self, raw: RawCursor) -> None:
        self._raw = raw

    @property
    def rowcount(self) -> int:
        return self._raw.rowcount

    async def fetchone(self) -> Row | None:
        return self._raw.fetchone()

    async def fetchall(self) -> list[Row]:
        return self._raw.fetchall()

    async def close(self) -> None:
        return None


class Connection:
    """The writer connection as a ``write`` operation sees it: each ``execute`` is a trip to its thread."""

    def __init__(self, raw: RawConnection, executor: ThreadPoolExecutor) -> None:
        self._raw = raw
        self._executor = executor

    async def execute(self, sql: str, parameters: Iterable[Any] | None = None) -> Cursor:
        loop = asyncio.get_running_loop()
        return Cursor(await loop.run_in_executor(self._executor, self._raw.execute, sql, parameters or ()))

    async def execute_fetchall(self, sql: str, parameters: Iterable[Any] | None = None) -> list[Row]:
        loop = asyncio.get_running_loop()
        return (await loop.run_in_executor(self._executor, self._raw.execute, sql, parameters or ())).fetchall()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(raw_connection, *args)`` on the writer's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, self._raw, *args)


class Snapshot:
    """Reads inside one ``REPEATABLE READ`` read-only transaction: they all see one committed state."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._conn = conn

    async def read(self, sql: str, params: Iterable[Any] = ()) -> list[Row]:
        return await _read(self._conn, sql, params)


async def _read(conn: psycopg.AsyncConnection[Any], sql: str, params: Iterable[Any]) -> list[Row]:
    try:
        cursor = await conn.execute(translate(sql), tuple(params))
        return _rows(cursor.description, await cursor.fetchall() if cursor.description else ())
    except psycopg.Error as exc:
        mapped = _store_error(exc)
        if mapped is exc:
            raise
        raise mapped from exc


class _TextDumper(StrDumperUnknown):
    """A ``str`` parameter as psycopg sends it, with U+FFFD for each NUL character: PostgreSQL's
    text cannot hold NUL (SQLite's can), and a reply of a small model or a user's text may."""

    def dump(self, obj: str) -> Any:
        return super().dump(obj.replace("\x00", "\ufffd") if "\x00" in obj else obj)


def _configure(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> None:
    conn.adapters.register_loader("numeric", FloatLoader)  # AVG(integer), SUM(bigint): floats, as SQLite's
    conn.adapters.register_dumper(str, _TextDumper)  # NUL: U+FFFD (the one text PostgreSQL refuses)


def _connect_writer(url: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(url, autocommit=True)  # the writer sends BEGIN and COMMIT itself
    _configure(conn)
    return conn


def _check_durability(raw: RawConnection) -> None:
    """Refuse a server where a commit may return before it is on disk: acks would not be durable."""
    for name in ("fsync", "synchronous_commit"):
        row = raw.execute(f"SHOW {name}").fetchone()
        if row is None or row[0] not in ("on", "local", "remote_write", "remote_apply"):
            found = row[0] if row else "unknown"
            raise StoreError(f"PostgreSQL's {name} is {found}: acknowledged writes could be lost; not serving")


def _migrate(raw: RawConnection) -> None:
    raw.execute("BEGIN")
    try:
        raw.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))  # another process may migrate too
        raw.execute("CREATE TABLE IF NOT EXISTS learnloop_schema (version INTEGER NOT NULL)")
        row = raw.execute("SELECT version FROM learnloop_schema").fetchone()
        if row is None:
            raw.execute("INSERT INTO learnloop_schema (version) VALUES (0)")
        current = int(row[0]) if row else 0
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"database schema version {current} is newer than this learnloop ({SCHEMA_VERSION}); upgrade learnloop"
            )
        for number in range(current, SCHEMA_VERSION):
            for statement in statements(number, "postgresql"):
                raw.execute(statement)
            raw.execute("UPDATE learnloop_schema SET version = ?", (number + 1,))
            log.info("feedback store migrated to schema %d", number + 1)
        raw.execute("COMMIT")
    except BaseException:
        raw.execute("ROLLBACK")
        raise


def redact(url: str) -> str:
    """``url`` without its password (for messages and logs)."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error:
        return "postgresql://…"
    return (
        f"postgresql://{info.get('user', '')}@{info.get('host', '')}:{info.get('port', 5432)}/{info.get('dbname', '')}"
    )


class PostgresDatabase(Database):
    """One PostgreSQL database. Open with ``await PostgresDatabase.open(url, tombstone_path=...)``."""

    backend = "postgresql"
    _begin = "BEGIN"
    _optimistic = True  # a savepoint and its release are two round trips per operation

    def __init__(
        self,
        url: str,
        writer: Connection,
        reader: psycopg.AsyncConnection[Any],
        executor: ThreadPoolExecutor,
        *,
        tombstone_path: Path,
        max_batch: int = 512,
        schema: str = "public",
    ) -> None:
        super().__init__(tombstone_path=tombstone_path, max_batch=max_batch)
        self.url = url
        self._writer = writer
        self._pg_writer = writer
        self._reader = reader
        self._executor = executor
        self._read_lock = asyncio.Lock()
        self._counter: psycopg.AsyncConnection[Any] | None = None  # feedback/limits.py's, opened when first used
        self._counter_lock = asyncio.Lock()
        self.notify_channel = f"learnloop:{schema}"[:63]  # an identifier's limit; one channel per schema

    @classmethod
    async def open(cls, url: str, *, tombstone_path: Path, max_batch: int = 512) -> PostgresDatabase:
        """Connect, check durability and bring the schema up to date."""
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(1, thread_name_prefix="feedback-pg-writer")
        raw: RawConnection | None = None
        reader: psycopg.AsyncConnection[Any] | None = None
        try:
            try:
                raw = RawConnection(await loop.run_in_executor(executor, _connect_writer, url))
                reader = await psycopg.AsyncConnection.connect(url, autocommit=True)
            except psycopg.OperationalError as exc:
                raise StoreError(f"cannot connect to {redact(url)}: {' '.join(str(exc).split())}") from None
            _configure(reader)
            await loop.run_in_executor(executor, _check_durability, raw)
            await loop.run_in_executor(executor, _migrate, raw)
            schema = str((await _read(reader, "SELECT current_schema()", ()))[0][0])
        except BaseException:
            if reader is not None:
                await reader.close()
            if raw is not None:
                await loop.run_in_executor(executor, raw.conn.close)
            executor.shutdown()
            raise
        return cls(
            url,
            Connection(raw, executor),
            reader,
            executor,
            tombstone_path=tombstone_path,
            max_batch=max_batch,
            schema=schema,
        )

    async def _close_connections(self) -> None:
        await self._reader.close()
        if self._counter is not None:
            await self._counter.close()
        await self._pg_writer.call(lambda raw: raw.conn.close())
        self._executor.shutdown()

    async def _on_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._pg_writer.call(fn, *args)

    def _error(self, exc: BaseException) -> BaseException:
        return _store_error(exc)

    async def _reconnect(self) -> bool:
        """A lost writer connection (the server restarted, the backend was terminated) is replaced,
        checked for durability as at open; the write that was in flight was not acknowledged."""
        raw = self._pg_writer._raw
        if not (raw.conn.broken or raw.conn.closed):
            return False

        def reopen(raw: RawConnection) -> None:
            with contextlib.suppress(Exception):
                raw.conn.close()
            raw.conn = _connect_writer(self.url)
            _check_durability(raw)

        try:
            await self._on_thread(reopen)
        except Exception as exc:  # the next failing batch tries again
            log.error("the store's writer lost %s and cannot reconnect: %s", redact(self.url), _store_error(exc))
            return False
        log.warning("the store's writer lost its connection to %s and reconnected", redact(self.url))
        return True

    # --- reads ------------------------------------------------------------------------

    async def _reader_connection(self) -> psycopg.AsyncConnection[Any]:
        """The reader, a new one if it was lost (a read that failed with it got ``StoreError``)."""
        if self._reader.broken or self._reader.closed:
            with contextlib.suppress(Exception):
                await self._reader.close()
            try:
                self._reader = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
            except psycopg.OperationalError as exc:
                raise StoreError(f"cannot connect to {redact(self.url)}: {' '.join(str(exc).split())}") from None
            _configure(self._reader)
            log.warning("the store's reader lost its connection to %s and reconnected", redact(self.url))
        return self._reader

    async def read(self, sql: str, params: Iterable[Any] = ()) -> list[Row]:
        """One query; on a lost connection it is asked once more, on a new one (a read changes nothing)."""
        async with self._read_lock:
            try:
                return await _read(await self._reader_connection(), sql, params)
            except StoreError:
                if not (self._reader.broken or self._reader.closed):
                    raise
            return await _read(await self._reader_connection(), sql, params)

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[Snapshot]:
        """Several reads that see one consistent state (other reads wait meanwhile)."""
        async with self._read_lock:
            await self._reader_connection()
            await self._reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            try:
                yield Snapshot(self._reader)
            finally:
                await self._reader.execute("COMMIT")

    # --- what several processes share ---------------------------------------------------

    async def counter(self, sql: str, params: dict[str, Any]) -> list[Row]:
        """One statement on the counters' own connection (autocommit, ``synchronous_commit = off``:
        no flush is waited for); on a lost connection it is asked once more, on a new one."""
        async with self._counter_lock:
            for attempt in (1, 2):
                conn = self._counter
                if conn is None or conn.broken or conn.closed:
                    try:
                        conn = self._counter = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
                        await conn.execute("SET synchronous_commit = off")
                    except psycopg.OperationalError as exc:
                        raise StoreError(
                            f"cannot connect to {redact(self.url)}: {' '.join(str(exc).split())}"
                        ) from None
                try:
                    cursor = await conn.execute(sql, params, prepare=True)
                    return _rows(cursor.description, await cursor.fetchall())
                except psycopg.OperationalError as exc:
                    if attempt == 2 or not (conn.broken or conn.closed):
                        raise _store_error(exc) from exc
        raise AssertionError("unreachable")

    @contextlib.asynccontextmanager
    async def listen(self) -> AsyncIterator[AsyncIterator[str]]:
        """``LISTEN`` on a connection of its own; the payloads arrive once the context is entered.

        A lost connection ends the iterator with ``StoreError``: what was notified until the
        caller listens again is not delivered (``server/presence.py`` reloads the state then)."""
        try:
            conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
        except psycopg.OperationalError as exc:
            raise StoreError(f"cannot connect to {redact(self.url)}: {' '.join(str(exc).split())}") from None
        try:
            channel = str(self.notify_channel).replace('"', '""')
            await conn.execute(f'LISTEN "{channel}"')

            async def payloads() -> AsyncIterator[str]:
                try:
                    async for notify in conn.notifies():
                        yield notify.payload
                except psycopg.OperationalError as exc:
                    raise _store_error(exc) from exc
                raise StoreError("the notifications' connection was closed")

            yield payloads()
        finally:
            with contextlib.suppress(Exception):
                await conn.close()

    # --- forgetting deleted bytes (erasure) -------------------------------------------

    async def purge_search_index(self) -> None:
        """Rebuild the search index: a GIN index keeps a deleted word as a key (with no rows) even after
        ``VACUUM``, so the word's bytes would stay in the index's pages. ``REINDEX CONCURRENTLY``
        builds a new index beside the old one and drops it, without blocking writes."""

        async def op(conn: Any) -> None:
            await conn.execute("REINDEX INDEX CONCURRENTLY messages_search")

        await self.write(op, outside_transaction=True)

    async def checkpoint(self) -> None:
        """``VACUUM`` the tables an erasure deletes from: their dead tuples and index entries are removed
        and the space is reused (it runs outside a transaction, between two group commits)."""

        async def op(conn: Any) -> None:
            await conn.execute(f"VACUUM {', '.join(ERASED_TABLES)}")

        await self.write(op, outside_transaction=True)
