"""Faults and abuse through the real gateway on loopback (docs/reliability.md lists the scenarios)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from feedback import FeedbackStore
from feedback.db import Connection
from server.app import App
from tests.test_gateway import settings


async def test_a_frame_nested_thirty_thousand_deep_gets_bad_request_and_the_connection_stays(
    tiny_model: Path, tmp_path: Path, open_client: Any
) -> None:
    a = App(settings(tiny_model, tmp_path))
    async with a.lifespan():
        c = await open_client(a.port)
        await c.hello()
        await c.ws.send("[" * 30_000 + "]" * 30_000)  # 60 kB: under max_frame_bytes
        assert (await c.recv())["code"] == "bad_request"
        done, _ = await c.chat("still here?", "m1")
        assert done["type"] == "done"


async def fill_the_database(store: FeedbackStore) -> None:
    """Cap the file at the pages it has (``PRAGMA max_page_count``) and fill every free byte."""

    async def create(conn: Connection) -> None:
        await conn.execute("CREATE TABLE IF NOT EXISTS filler (x BLOB)")

    async def cap(conn: Connection) -> None:
        cursor = await conn.execute("PRAGMA page_count")
        row = await cursor.fetchone()
        assert row is not None
        await conn.execute(f"PRAGMA max_page_count = {int(row[0])}")

    async def fill(size: int) -> None:
        async def op(conn: Connection) -> None:
            await conn.execute("INSERT INTO filler VALUES (randomblob(?))", (size,))

        await store.db.write(op)

    await store.db.write(create)
    await store.db.write(cap, outside_transaction=True)
    for size in (2000, 500, 100, 20, 1):
        for _ in range(10_000):
            try:
                await fill(size)
            except Exception as exc:
                assert getattr(exc, "code", None) == "storage_full", exc
                break


async def set_page_limit(store: FeedbackStore, pages: int) -> None:
    async def op(conn: Connection) -> None:
        await conn.execute(f"PRAGMA max_page_count = {pages}")

    await store.db.write(op, outside_transaction=True)


async def test_a_full_disk_gives_ratings_storage_full_never_a_false_ack_and_writes_resume(
    tiny_model: Path, tmp_path: Path, open_client: Any
) -> None:
    """Scenario 8 with ``PRAGMA max_page_count`` (a tiny filesystem needs root to mount)."""
    a = App(settings(tiny_model, tmp_path))
    async with a.lifespan():
        assert a.store is not None
        c = await open_client(a.port)
        await c.hello()
        done, _ = await c.chat("rate me", "m1")
        await fill_the_database(a.store)

        comment = "€" * 1900  # 5,700 bytes: more than a page, and no page is free
        await c.send(type="rating", message_id=done["message_id"], value=1, id="r1", comment=comment)
        err = await c.recv()
        assert (err["type"], err["code"], err["id"]) == ("error", "storage_full", "r1")  # no ack
        await c.send(type="message", text="€" * 3000, client_id="m2")
        err = await c.recv()
        assert (err["type"], err["code"]) == ("error", "storage_full")  # the turn is refused, typed, no ack
        assert not (await a.store.conversations.export_feedback()).ratings

        await set_page_limit(a.store, 1_000_000_000)  # space returns: the same server takes writes
        await c.send(type="rating", message_id=done["message_id"], value=1, id="r1", comment=comment)  # a retry
        assert await c.recv() == {"type": "ack", "id": "r1"}
        await c.send(type="rating", message_id=done["message_id"], value=1, id="r1")  # a retry of an acked one
        assert await c.recv() == {"type": "ack", "id": "r1"}
        done2, _ = await c.chat("are you there?", "m3")
        assert done2["type"] == "done"
        assert [r.client_id for r in (await a.store.conversations.export_feedback()).ratings] == ["r1"]


async def test_the_wal_is_truncated_when_the_disk_fills(tmp_path: Path) -> None:
    """A full disk checkpoints the WAL at once: its bytes go back to the disk (scenario 8)."""
    async with await FeedbackStore.open(tmp_path / "x.db") as store:
        await fill_the_database(store)
        wal = tmp_path / "x.db-wal"
        assert wal.stat().st_size == 0  # without the checkpoint: every page written since the last one

        await set_page_limit(store, 1_000_000_000)
        await asyncio.wait_for(store.conversations.create("c-after"), 10)
        assert (await store.conversations.get("c-after")).id == "c-after"
