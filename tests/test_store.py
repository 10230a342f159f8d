"""The feedback store on a real SQLite file and on a real PostgreSQL (``store_target``: each test
that takes it runs once per backend; tests/store_backends.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from feedback import (
    BASE_VERSION,
    FeedbackStore,
    InvalidError,
    NotFoundError,
    Role,
    StorageFullError,
    StoreError,
    VersionState,
)
from feedback.db import Connection, RawConnection, constraint_errors
from feedback.schema import SCHEMA_VERSION
from tests.store_backends import StoreTarget


async def seed(store: FeedbackStore, conv: str = "c1") -> tuple[str, str]:
    await store.conversations.create(conv, user_id="alice")
    user = await store.conversations.add_message(
        message_id=f"{conv}-u", conversation_id=conv, role=Role.USER, text="q", parent_id=None
    )
    reply = await store.conversations.add_message(
        message_id=f"{conv}-a",
        conversation_id=conv,
        role=Role.ASSISTANT,
        text="a",
        parent_id=user.id,
        model_version="base",
        latency_ms=12.5,
        n_tokens=3,
    )
    return user.id, reply.id


async def test_schema_is_created_and_survives_reopen(store_target: StoreTarget) -> None:
    async with await store_target.open() as store:
        await seed(store)
    if store_target.backend == "sqlite":
        assert store_target.sql("PRAGMA journal_mode") == [("wal",)]
        assert store_target.sql("PRAGMA user_version") == [(SCHEMA_VERSION,)]
    else:
        assert store_target.sql("SELECT version FROM learnloop_schema") == [(SCHEMA_VERSION,)]
    async with await store_target.open() as store:
        messages = await store.conversations.messages("c1")
        assert [(m.seq, m.role, m.model_version) for m in messages] == [
            (1, Role.USER, None),
            (2, Role.ASSISTANT, "base"),
        ]


async def test_newer_schema_is_refused(store_target: StoreTarget) -> None:
    async with await store_target.open():
        pass
    if store_target.backend == "sqlite":
        store_target.sql(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    else:
        store_target.sql("UPDATE learnloop_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="newer than this learnloop"):
        await store_target.open()


async def test_text_with_a_nul_character_is_stored(store_target: StoreTarget) -> None:
    """A reply of a small model may hold a NUL character (a byte token), as may a user's text:
    SQLite keeps it; PostgreSQL's text holds none, and stores U+FFFD in its place instead of
    failing the write (the PostgreSQL pass of the suite found replies lost this way)."""
    kept = "\ufffd" if store_target.backend == "postgresql" else "\x00"
    async with await store_target.open() as store:
        await store.conversations.create("c1", user_id="al\x00ice")
        user = await store.conversations.add_message(
            message_id="u", conversation_id="c1", role=Role.USER, text="q\x00q", parent_id=None
        )
        await store.conversations.add_message(
            message_id="a", conversation_id="c1", role=Role.ASSISTANT, text="a\x00", parent_id=user.id
        )
        await store.conversations.add_correction(message_id="a", text="b\x00", operator="op")
        for _ in range(2):  # the second is the same rating again (its client id holds the NUL too)
            await store.conversations.add_rating(message_id="a", value=1, rater="al\x00ice", client_id="r\x00")
        snap = await store.conversations.export_feedback()
    assert [m.text for m in snap.messages] == [f"q{kept}q", f"a{kept}"]
    assert [c.text for c in snap.corrections] == [f"b{kept}"]
    assert [(r.rater, r.client_id) for r in snap.ratings] == [(f"al{kept}ice", f"r{kept}")]


async def test_an_erasure_makes_the_folder_of_its_tombstone_file(store_target: StoreTarget, tmp_path: Path) -> None:
    """With ``store.url`` set nothing else makes ``data_dir``: the first erasure's tombstone file
    makes its folder instead of failing the erasure (the PostgreSQL pass of the suite found a
    console erasure answered 500 with FileNotFoundError, and nothing erased)."""
    tombstones = tmp_path / "fresh-data-dir" / "learnloop.db.erasures"
    async with await FeedbackStore.open(store_target.target, tombstone_path=tombstones) as store:
        await seed(store)
        assert (await store.erasure.erase_user("alice", actor="t"))["conversations"] == 1
        assert not (await store.conversations.export_feedback()).messages
    assert tombstones.exists() and b"alice" not in tombstones.read_bytes()


async def test_ratings_are_idempotent_by_client_id(store_target: StoreTarget) -> None:
    async with await store_target.open() as store:
        user_id, reply_id = await seed(store)
        first, created = await store.conversations.add_rating(
            message_id=reply_id, value=1, rater="alice", client_id="r1"
        )
        again, created_again = await store.conversations.add_rating(
            message_id=reply_id, value=-1, rater="alice", client_id="r1"
        )
        assert created and not created_again and again == first and again.value == 1
        with pytest.raises(NotFoundError):
            await store.conversations.add_rating(message_id="nope", value=1, rater="alice", client_id="r2")
        with pytest.raises(InvalidError):
            await store.conversations.add_rating(message_id=user_id, value=1, rater="alice", client_id="r3")
        with pytest.raises(InvalidError):
            await store.conversations.add_rating(message_id=reply_id, value=5, rater="alice", client_id="r4")
        snap = await store.conversations.export_feedback()
        assert [r.client_id for r in snap.ratings] == ["r1"]


async def test_group_commit_batches_concurrent_writes_and_isolates_failures(store_target: StoreTarget) -> None:
    async with await store_target.open() as store:
        _, reply_id = await seed(store)
        before = store.db.commits
        results = await asyncio.gather(
            *(
                store.conversations.add_rating(message_id=reply_id, value=1, rater=f"u{i}", client_id=f"r{i}")
                for i in range(300)
            ),
            store.conversations.add_rating(message_id="missing", value=1, rater="x", client_id="bad"),
            return_exceptions=True,
        )
        assert isinstance(results[-1], NotFoundError)
        assert all(created for _, created in results[:-1])  # type: ignore[misc]
        assert store.db.commits - before < 30  # 301 writes shared a few commits
        assert len((await store.conversations.export_feedback()).ratings) == 300


async def test_a_group_commit_mixes_sync_and_async_operations_in_order_and_isolates_failures(
    store_target: StoreTarget,
) -> None:
    """Ratings and messages run on the writer's thread (``write_sync``); the other writes are
    coroutines. One group commit may hold both: each still runs in its own savepoint,
    in the order queued, and a failing one of either kind rolls back only itself."""
    async with await store_target.open() as store:
        await seed(store)
        order: list[str] = []

        def sync_op(tag: str, fail: bool) -> Any:
            def op(conn: RawConnection) -> str:
                order.append(tag)
                conn.execute("INSERT INTO audit_log (at, actor, action) VALUES (0, ?, 'x')", (tag,))
                if fail:
                    raise InvalidError(f"{tag} fails")
                return tag

            return op

        def async_op(tag: str, fail: bool) -> Any:
            async def op(conn: Connection) -> str:
                order.append(tag)
                await conn.execute("INSERT INTO audit_log (at, actor, action) VALUES (0, ?, 'x')", (tag,))
                if fail:
                    raise InvalidError(f"{tag} fails")
                return tag

            return op

        plan = [("s1", False), ("a1", False), ("s2", True), ("a2", True), ("s3", False), ("a3", False)]
        before = store.db.commits
        results = await asyncio.gather(
            *(store.db.write_sync(sync_op(t, f)) if t[0] == "s" else store.db.write(async_op(t, f)) for t, f in plan),
            return_exceptions=True,
        )
        assert order == [t for t, _ in plan]
        assert results[0] == "s1" and results[1] == "a1" and results[4] == "s3" and results[5] == "a3"
        assert isinstance(results[2], InvalidError) and isinstance(results[3], InvalidError)
        assert store.db.commits - before == 1
        actors = await store.db.read("SELECT actor FROM audit_log WHERE action = 'x' ORDER BY id")
        assert [r["actor"] for r in actors] == ["s1", "a1", "s3", "a3"]


async def test_a_group_commit_of_sync_operations_isolates_a_failing_one(store_target: StoreTarget) -> None:
    """On PostgreSQL a group commit of ``write_sync`` operations runs first without savepoints; an
    operation that fails (a broken unique key: the database's error; or its own, after it wrote)
    rolls it back, and it runs again with a savepoint per operation: the others still commit, once."""
    async with await store_target.open() as store:
        await seed(store)

        def op(tag: str, fail: str | None) -> Any:
            def run(conn: RawConnection) -> str:
                conn.execute("INSERT INTO audit_log (at, actor, action) VALUES (0, ?, 'y')", (tag,))
                if fail == "database":
                    with constraint_errors(InvalidError):
                        conn.execute("INSERT INTO conversations (id, channel, created_at) VALUES ('c1', 'x', 0)")
                if fail == "own":
                    raise InvalidError(f"{tag} fails")
                return tag

            return run

        plan = [("s1", None), ("s2", "database"), ("s3", None), ("s4", "own"), ("s5", None)]
        before = store.db.commits
        results = await asyncio.gather(*(store.db.write_sync(op(t, f)) for t, f in plan), return_exceptions=True)
        assert [r if isinstance(r, str) else type(r) for r in results] == ["s1", InvalidError, "s3", InvalidError, "s5"]
        assert store.db.commits - before == 1
        actors = await store.db.read("SELECT actor FROM audit_log WHERE action = 'y' ORDER BY id")
        assert [r["actor"] for r in actors] == ["s1", "s3", "s5"]


async def test_the_postgresql_writer_and_reader_reconnect_after_their_connection_is_lost(
    postgres_target: StoreTarget,
) -> None:
    """A write in flight when the writer's backend is terminated (``pg_terminate_backend``, as a
    server restart would) gets ``StoreError`` and is not stored; the next write succeeds on a new
    connection, and so does a write after an idle writer's and a read after the reader's termination."""
    import psycopg

    async with await postgres_target.open() as store:
        _, reply_id = await seed(store)
        with psycopg.connect(str(postgres_target.target), autocommit=True) as other:
            other.execute("BEGIN")
            other.execute("LOCK TABLE ratings IN ACCESS EXCLUSIVE MODE")  # the rating's INSERT waits for it
            in_flight = asyncio.create_task(
                store.conversations.add_rating(message_id=reply_id, value=1, rater="alice", client_id="lost")
            )
            waiting: list[int] = []
            for _ in range(200):
                waiting = [
                    row[0]
                    for row in other.execute(
                        "SELECT pid FROM pg_stat_activity WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid))"
                    ).fetchall()
                ]
                if waiting:
                    break
                await asyncio.sleep(0.05)
            assert len(waiting) == 1 and not in_flight.done()
            other.execute("SELECT pg_terminate_backend(%s)", (waiting[0],))
            with pytest.raises(StoreError):
                await asyncio.wait_for(in_flight, 10)
            other.execute("ROLLBACK")
        _, created = await store.conversations.add_rating(message_id=reply_id, value=1, rater="alice", client_id="next")
        assert created
        assert postgres_target.sql("SELECT client_id FROM ratings") == [("next",)]

        def backend_pid(conn: RawConnection) -> int:
            return int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])

        writer = await store.db.write_sync(backend_pid)
        assert writer != waiting[0]
        reader = (await store.db.read("SELECT pg_backend_pid()"))[0][0]
        postgres_target.sql("SELECT pg_terminate_backend(%s), pg_terminate_backend(%s)", (writer, reader))
        _, created = await store.conversations.add_rating(message_id=reply_id, value=1, rater="bob", client_id="idle")
        assert created and await store.db.write_sync(backend_pid) != writer
        assert (await store.db.read("SELECT pg_backend_pid()"))[0][0] != reader
        assert [r.client_id for r in (await store.conversations.export_feedback()).ratings] == ["next", "idle"]


async def test_corrections_and_versions(store_target: StoreTarget) -> None:
    async with await store_target.open() as store:
        _, reply_id = await seed(store)
        with pytest.raises(InvalidError):
            await store.conversations.add_correction(message_id=reply_id, text="   ", operator="op")
        correction = await store.conversations.add_correction(message_id=reply_id, text="better", operator="op")
        assert correction.id == 1
        live = await store.versions.ensure_base("model")
        assert live.name == BASE_VERSION and live.state is VersionState.LIVE
        v = await store.versions.register(
            adapter_path="/a",
            sha256="00",
            parent="base",
            base_model="model",
            eval_report={"n": 1},
            feedback_ids={"corrections": [1]},
            training_run_id=None,
        )
        assert (v.name, v.state) == ("v1", VersionState.CANDIDATE)
        await store.versions.set_state("v1", VersionState.LIVE, actor="gate", reasons=["passed: x"])
        assert (await store.versions.live()).name == "v1"
        assert (await store.versions.get(BASE_VERSION)).state is VersionState.RETIRED
        assert (await store.versions.get("v1")).gate_reasons == ("passed: x",)
        assert (await store.versions.ensure_base("model")).name == "v1"  # a restart keeps v1 live
        actions = [e["action"] for e in await store.browse.audit_log(limit=50)]
        assert "state:live" in actions and "correct" in actions and "register" in actions
        with pytest.raises(NotFoundError):
            await store.versions.set_state("v9", VersionState.LIVE, actor="x")


async def test_new_feedback_counts_and_run_watermarks(store_target: StoreTarget) -> None:
    async with await store_target.open() as store:
        _, reply_id = await seed(store)
        await store.conversations.add_rating(message_id=reply_id, value=1, rater="a", client_id="1")
        await store.conversations.add_correction(message_id=reply_id, text="b", operator="op")
        assert await store.conversations.count_new_feedback(after_rating_id=0, after_correction_id=0, after_time=0) == 2
        run = await store.runs.start(max_rating_id=1, max_correction_id=1)
        from feedback import RunState

        await store.runs.finish(run, state=RunState.SUCCEEDED, version="v1")
        last = await store.runs.last_consumed()
        assert last is not None and last.max_rating_id == 1
        assert (
            await store.conversations.count_new_feedback(
                after_rating_id=1, after_correction_id=1, after_time=time.time()
            )
            == 0
        )


async def limit_pages(store: FeedbackStore, pages: int | None) -> None:
    """``PRAGMA max_page_count`` on the writer connection; None: the pages it has now (it is full)."""

    async def op(conn: Connection) -> None:
        limit = pages
        if limit is None:
            cursor = await conn.execute("PRAGMA page_count")
            row = await cursor.fetchone()
            assert row is not None
            limit = int(row[0])
        cursor = await conn.execute(f"PRAGMA max_page_count = {limit}")
        row = await cursor.fetchone()
        assert row is not None and row[0] == limit

    await store.db.write(op, outside_transaction=True)


@pytest.mark.sqlite_only("fills the SQLite file with PRAGMA max_page_count")
async def test_a_full_database_refuses_writes_and_takes_them_again_once_there_is_room(tmp_path: Path) -> None:
    """SQLite only: ``max_page_count`` fills a database on purpose. PostgreSQL's full disk (SQLSTATE
    53100) maps to the same ``StorageFullError`` (feedback/postgres.py) but is not provoked here."""
    big = "a long question " * 20_000  # hundreds of pages
    async with await FeedbackStore.open(tmp_path / "x.db") as store:
        user_id, reply_id = await seed(store)
        run_id = await store.runs.start(max_rating_id=0, max_correction_id=0)

        def ask(message_id: str) -> Any:
            return store.conversations.add_message(
                message_id=message_id, conversation_id="c1", role=Role.USER, text=big, parent_id=reply_id
            )

        await limit_pages(store, None)
        with pytest.raises(StorageFullError) as raised:  # SQLite undoes the statement
            await ask("big")
        assert raised.value.code == "storage_full" and raised.value.public
        # here SQLite rolls the whole group commit back: the rating that shared it is refused too
        results = await asyncio.gather(
            store.runs.update(run_id, progress={"log": big}),
            store.conversations.add_rating(message_id=reply_id, value=1, rater="alice", client_id="r1"),
            return_exceptions=True,
        )
        assert isinstance(results[0], StorageFullError)
        ratings = [r.client_id for r in (await store.conversations.export_feedback()).ratings]
        if isinstance(results[1], BaseException):
            assert isinstance(results[1], StorageFullError) and ratings == []
        else:  # a SQLite that undid only the statement: then it is stored, as acknowledged
            assert ratings == ["r1"]
        assert [m.id for m in await store.conversations.messages("c1")] == [user_id, reply_id]
        with pytest.raises(NotFoundError):
            await store.conversations.get_message("big")
        assert (await store.runs.get(run_id)).progress is None

        await limit_pages(store, 1_000_000)  # room again: the same open store takes the writes
        stored = await ask("big")
        await store.runs.update(run_id, progress={"log": big})
        assert (await store.conversations.get_message("big")) == stored
        assert [m.id for m in await store.conversations.messages("c1")] == [user_id, reply_id, "big"]
        assert (await store.runs.get(run_id)).progress == {"log": big}


WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from feedback import FeedbackStore, Role

    async def main():
        store = await FeedbackStore.open(sys.argv[1], tombstone_path=Path(sys.argv[2]))
        await store.conversations.create("c")
        await store.conversations.add_message(message_id="u", conversation_id="c", role=Role.USER, text="q", parent_id=None)
        await store.conversations.add_message(message_id="a", conversation_id="c", role=Role.ASSISTANT, text="r", parent_id="u")
        i = 0
        while True:
            batch = [store.conversations.add_rating(message_id="a", value=1, rater="x", client_id=f"r{i + k}") for k in range(8)]
            for rating, _ in await asyncio.gather(*batch):
                print(rating.client_id, flush=True)  # the acknowledgement
            i += 8

    asyncio.run(main())
    """
)


def test_kill_9_loses_no_acknowledged_rating(store_target: StoreTarget) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(store_target.target), str(store_target.tombstones)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    assert proc.stdout is not None
    acked: list[str] = []
    deadline = time.monotonic() + 60
    while len(acked) < 400 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acked.append(line.strip())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(acked) >= 400
    stored = {row[0] for row in store_target.sql("SELECT client_id FROM ratings")}
    assert set(acked) <= stored


async def test_a_write_asked_for_while_the_store_closes_is_refused_not_left_waiting(
    store_target: StoreTarget,
) -> None:
    """A rating task can outlive its connection and reach the store as it closes: it gets
    ``StoreError`` at once (its client never saw an ack and resends it), never a future that no
    writer will answer."""
    store = await store_target.open()
    _, reply_id = await seed(store)
    held, release = asyncio.Event(), asyncio.Event()

    async def hold(conn: Connection) -> None:  # the writer is busy with an earlier batch
        held.set()
        await release.wait()

    holding = asyncio.create_task(store.db.write(hold))
    await held.wait()
    closing = asyncio.create_task(store.close())
    await asyncio.sleep(0)  # close() has queued its end marker behind the held batch
    late = asyncio.create_task(store.conversations.add_rating(message_id=reply_id, value=1, rater="u", client_id="x"))
    await asyncio.sleep(0)
    release.set()
    await holding
    with pytest.raises(StoreError):
        await asyncio.wait_for(late, 5)
    await closing


@pytest.mark.sqlite_only("SQLite's WAL checkpoint against a reader holding a snapshot")
async def test_the_wal_truncation_does_not_wait_for_a_reader(tmp_path: Path) -> None:
    """SQLite only. On a nearly full disk the writer truncates the WAL after a commit; a reader in another
    process holding a snapshot would make that checkpoint wait ``busy_timeout`` (10 s) of the
    writer's time per commit. It does not wait: busy, it gives up and tries again later."""
    async with await FeedbackStore.open(tmp_path / "x.db") as store:
        await seed(store)
        reader = sqlite3.connect(tmp_path / "x.db")
        try:
            reader.execute("BEGIN")
            reader.execute("SELECT COUNT(*) FROM messages").fetchone()  # holds a read snapshot
            await seed(store, "c2")  # frames the reader's snapshot does not hold
            await asyncio.wait_for(store.db._checkpoint_truncate(), 5)
            await seed(store, "c3")  # the writer goes on
        finally:
            reader.close()


def test_postgresql_placeholders_are_translated_outside_quoted_strings() -> None:
    from feedback.postgres import translate

    assert translate("SELECT * FROM t WHERE a = ? AND b IN (?, ?)") == "SELECT * FROM t WHERE a = %s AND b IN (%s, %s)"
    assert translate("SELECT '?', \"a?\" FROM t WHERE c LIKE 'op:%' AND d = ?") == (
        "SELECT '?', \"a?\" FROM t WHERE c LIKE 'op:%%' AND d = %s"
    )
    assert translate("SELECT 'it''s ?' || ?") == "SELECT 'it''s ?' || %s"


async def test_two_processes_opening_a_new_postgresql_store_at_once_migrate_it_once(
    postgres_target: StoreTarget,
) -> None:
    """The migrations run under an advisory lock: the second opener waits, then finds them applied."""
    first, second = await asyncio.gather(postgres_target.open(), postgres_target.open())
    try:
        assert postgres_target.sql("SELECT version FROM learnloop_schema") == [(SCHEMA_VERSION,)]
        await first.conversations.create("c1")
        assert (await second.conversations.get("c1")).id == "c1"
    finally:
        await first.close()
        await second.close()


@pytest.mark.sqlite_only("what a sqlite:/// URL opens")
async def test_a_sqlite_url_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "elsewhere" / "store.db"
    async with await FeedbackStore.open(f"sqlite://{path}") as store:
        await seed(store)
    assert path.exists() and path.with_name("store.db.erasures") == store.db.tombstone_path


async def test_one_training_lease_holder_when_two_stores_ask_at_once(store_target: StoreTarget) -> None:
    """The training lease (``training/cycle.py``: one run at a time across processes) on two stores
    opened on one database. On PostgreSQL a second client holds a lock on ``leases`` until both
    asks are waiting at their write, so both have read the lease as free first (what let both
    take it when the check was a SELECT before the upsert): still exactly one holder, each time."""
    first, second = await store_target.open(), await store_target.open()
    try:
        for round_ in range(3):
            name = f"training-{round_}"
            if store_target.backend == "postgresql":
                import psycopg

                with psycopg.connect(str(store_target.target), autocommit=True) as other:
                    other.execute("BEGIN")
                    other.execute("LOCK TABLE leases IN SHARE ROW EXCLUSIVE MODE")  # reads pass, writes wait
                    asks = asyncio.gather(
                        first.runs.acquire_lease(name, "a", 60), second.runs.acquire_lease(name, "b", 60)
                    )
                    for _ in range(200):
                        waiting = other.execute(
                            "SELECT count(*) FROM pg_stat_activity WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid))"
                        ).fetchone()
                        if waiting is not None and waiting[0] == 2:
                            break
                        await asyncio.sleep(0.05)
                    assert waiting is not None and waiting[0] == 2
                    other.execute("COMMIT")
                    taken = await asks
            else:
                taken = await asyncio.gather(
                    first.runs.acquire_lease(name, "a", 60), second.runs.acquire_lease(name, "b", 60)
                )
            assert sorted(taken) == [False, True]
            holder, loser = ("a", "b") if taken[0] else ("b", "a")
            store = first if holder == "a" else second
            assert await store.runs.acquire_lease(name, holder, 60)  # the holder renews it
            assert not await store.runs.acquire_lease(name, loser, 60)
            await store.runs.release_lease(name, holder)
            assert await store.runs.acquire_lease(name, loser, 60)  # released: free for the other
        assert await first.runs.acquire_lease("short", "a", -1)  # expired at once: anyone may take it
        assert await second.runs.acquire_lease("short", "b", 60)
    finally:
        await first.close()
        await second.close()


async def test_two_servers_starting_at_once_both_find_the_base_version(store_target: StoreTarget) -> None:
    """Two processes started together on one store both run ``ensure_base``: neither fails. (On
    PostgreSQL an INSERT that named only ``name`` as its conflict target raised a unique violation
    on ``seq`` when the other process inserted the same row first.)"""
    async with await store_target.open() as a, await store_target.open() as b:
        for _ in range(100):  # 300 rounds reproduced it in the first few
            store_target.sql("DELETE FROM model_versions")
            first, second = await asyncio.gather(a.versions.ensure_base("m"), b.versions.ensure_base("m"))
            assert first.name == second.name == BASE_VERSION
            assert first.state is second.state is VersionState.LIVE
        assert store_target.sql("SELECT COUNT(*) FROM model_versions") == [(1,)]
