"""Faults and abuse through the real gateway on loopback (docs/reliability.md lists the scenarios)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from feedback import FeedbackStore, StoreError, db
from feedback.db import Connection
from server.app import App
from server.settings import SiteConfig
from tests.test_gateway import settings

ROOT = Path(__file__).parent.parent


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


# --- scenario 7: start-up checks ----------------------------------------------------------


async def test_a_store_whose_wal_did_not_take_effect_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # as on a filesystem without shared memory: the WAL pragma is not honoured (here: not issued)
    monkeypatch.setattr(db, "_PRAGMAS", tuple(p for p in db._PRAGMAS if "journal_mode" not in p))
    with pytest.raises(StoreError) as refused:
        await FeedbackStore.open(tmp_path / "x.db")
    assert "journal_mode is delete, not wal" in str(refused.value) and "\n" not in str(refused.value)


async def test_a_store_whose_synchronous_level_did_not_take_effect_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pragmas = tuple(p.replace("synchronous=FULL", "synchronous=NORMAL") for p in db._PRAGMAS)
    monkeypatch.setattr(db, "_PRAGMAS", pragmas)
    with pytest.raises(StoreError, match="synchronous is 1, not 2"):
        await FeedbackStore.open(tmp_path / "x.db")


async def test_an_unwritable_data_folder_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(StoreError, match=r"the data folder .* is not writable") as refused:
        await FeedbackStore.open(tmp_path / "a-file" / "data" / "x.db")
    assert "\n" not in str(refused.value)
    if os.geteuid() != 0:  # root writes anywhere: the mode bits cannot refuse it
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(StoreError, match="not writable"):
            await FeedbackStore.open(ro / "x.db")


def test_serve_refuses_an_unwritable_data_folder_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "--data-dir", str(tmp_path / "a-file" / "data"), "serve"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "LEARNLOOP_SERVER_PORT": "0", "LEARNLOOP_MODEL_NAME": "/nonexistent-model"},
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("learnloop: error:")]
    assert len(errors) == 1 and "not writable" in errors[0], proc.stderr


# --- scenario 10: handshake security -------------------------------------------------------


async def handshake_status(port: int, origin: str | None) -> int:
    """101 if the websocket opens, else the HTTP status of the refusal."""
    try:
        ws = await connect(f"ws://127.0.0.1:{port}", origin=origin)  # type: ignore[arg-type]
    except InvalidStatus as exc:
        return exc.response.status_code
    await ws.close()
    return 101


async def test_handshakes_from_origins_not_allowed_get_403_and_no_session(tiny_model: Path, tmp_path: Path) -> None:
    s = settings(tiny_model, tmp_path, allowed_origins=("https://app.example",))
    s = dataclasses.replace(s, sites={"shop": SiteConfig(origins=("https://shop.example",))})
    a = App(s)
    async with a.lifespan():
        assert a.port is not None
        for origin in ("https://evil.example", "null", "https://app.example.evil.example", "http://app.example"):
            assert await handshake_status(a.port, origin) == 403, origin
        assert await a.store.db.read("SELECT * FROM conversations") == []  # type: ignore[union-attr]
        for origin in ("https://app.example", "https://APP.example:443", "https://shop.example", None):
            assert await handshake_status(a.port, origin) == 101, origin

    s = settings(tiny_model, tmp_path / "strict", require_origin=True)
    a = App(s)
    async with a.lifespan():
        assert a.port is not None
        assert await handshake_status(a.port, None) == 403  # only browsers, and those only from listed pages
        assert await handshake_status(a.port, "https://evil.example") == 403


async def test_a_stalled_handshake_is_dropped(tiny_model: Path, tmp_path: Path) -> None:
    a = App(settings(tiny_model, tmp_path, open_timeout_s=0.5))
    async with a.lifespan():
        reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # the server hung up
        writer.close()
