"""Faults and abuse through the real gateway on loopback (docs/reliability.md lists the scenarios)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import os
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from feedback import FeedbackStore, StoreError
from feedback import sqlite as sqlite_backend
from feedback.db import Connection
from server.admission import bearer_subprotocol
from server.app import App
from server.settings import SiteConfig, load_settings
from tests.store_backends import StoreTarget
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


@pytest.mark.sqlite_only("fills the SQLite file with PRAGMA max_page_count (no per-test full disk on PostgreSQL)")
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


@pytest.mark.sqlite_only("SQLite's WAL file")
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


@pytest.mark.sqlite_only("SQLite's journal_mode pragma (PostgreSQL's start-up check: synchronous_commit, below)")
async def test_a_store_whose_wal_did_not_take_effect_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # as on a filesystem without shared memory: the WAL pragma is not honoured (here: not issued)
    pragmas = tuple(p for p in sqlite_backend._PRAGMAS if "journal_mode" not in p)
    monkeypatch.setattr(sqlite_backend, "_PRAGMAS", pragmas)
    with pytest.raises(StoreError) as refused:
        await FeedbackStore.open(tmp_path / "x.db")
    assert "journal_mode is delete, not wal" in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.sqlite_only("SQLite's synchronous pragma (PostgreSQL's start-up check: synchronous_commit, below)")
async def test_a_store_whose_synchronous_level_did_not_take_effect_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pragmas = tuple(p.replace("synchronous=FULL", "synchronous=NORMAL") for p in sqlite_backend._PRAGMAS)
    monkeypatch.setattr(sqlite_backend, "_PRAGMAS", pragmas)
    with pytest.raises(StoreError, match="synchronous is 1, not 2"):
        await FeedbackStore.open(tmp_path / "x.db")


async def test_a_postgresql_store_whose_commits_are_not_flushed_is_refused(postgres_target: StoreTarget) -> None:
    """``synchronous_commit=off`` (here set for the connection, as a server's configuration could):
    COMMIT would return before the commit is on disk, so an ack could be lost; the store refuses."""
    url = str(postgres_target.target) + "%20-csynchronous_commit%3Doff"
    with pytest.raises(StoreError, match="synchronous_commit is off") as refused:
        await FeedbackStore.open(url, tombstone_path=postgres_target.tombstones)
    assert "\n" not in str(refused.value) and "postgres@" not in str(refused.value)


async def test_a_postgresql_server_that_does_not_answer_is_refused_in_one_line(tmp_path: Path) -> None:
    url = "postgresql://learnloop:hunter2@127.0.0.1:1/nowhere?connect_timeout=3"
    with pytest.raises(
        StoreError, match=re.escape("cannot connect to postgresql://learnloop@127.0.0.1:1/nowhere")
    ) as refused:
        await FeedbackStore.open(url, tombstone_path=tmp_path / "erasures")
    assert "hunter2" not in str(refused.value) and "\n" not in str(refused.value)  # one line, no password


@pytest.mark.sqlite_only("the folder of the SQLite file (serve's check of data_dir on both: the next test)")
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

        for origin, code in (("https://evil.example", 1008), ("null", 1008), ("https://shop.example", 1000)):
            # what a widget asks after a failed handshake (a page cannot see the 403): the close code answers
            async with connect(f"ws://127.0.0.1:{a.port}/origin", origin=origin) as probe:  # type: ignore[arg-type]
                with pytest.raises(ConnectionClosed):
                    await probe.recv()
                assert probe.close_code == code, origin
        assert await a.store.db.read("SELECT * FROM conversations") == []  # type: ignore[union-attr]

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


def test_the_llama_cpp_settings_come_from_model_settings_not_stray_variables() -> None:
    """The llama.cpp engine's knobs are ``model.llama_*`` settings; no module reads its own variables."""
    env = {
        "LEARNLOOP_MODEL_LLAMA_CPP_SRC": "/src/llama.cpp",
        "LEARNLOOP_MODEL_LLAMA_CPP_SDIST": "/dl/llama_cpp_python-0.3.36.tar.gz",
        "LEARNLOOP_MODEL_LLAMA_EXTRA_BUFTS": "false",
    }
    m = load_settings(env=env).model
    assert (m.llama_cpp_src, m.llama_cpp_sdist, m.llama_extra_bufts) == (
        "/src/llama.cpp",
        "/dl/llama_cpp_python-0.3.36.tar.gz",
        False,
    )
    engine_source = (ROOT / "server" / "engines" / "llamacpp.py").read_text()
    assert "environ" not in engine_source and "getenv" not in engine_source


# --- scenario 1: websocket frames a conforming client never sends -------------------------


async def raw_socket(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A websocket handshake by hand, so that the frames after it can break the rules."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


def ws_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True, rsv: int = 0) -> bytes:
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    n = len(payload)
    size = (
        bytes([n])
        if n < 126
        else bytes([126]) + struct.pack("!H", n)
        if n < 65536
        else bytes([127]) + struct.pack("!Q", n)
    )
    if not mask:
        return head + size + payload
    key = os.urandom(4)
    size = bytes([size[0] | 0x80]) + size[1:]
    return head + size + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def close_code_after(port: int, *frames: bytes) -> int | None:
    """Send ``frames``; the code of the close frame the server answers with (None: it just hung up)."""
    reader, writer = await raw_socket(port)
    for f in frames:
        writer.write(f)
    await writer.drain()
    try:
        while True:
            b0, b1 = await asyncio.wait_for(reader.readexactly(2), 10)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", await reader.readexactly(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", await reader.readexactly(8))[0]
            payload = await reader.readexactly(n)
            if b0 & 0x0F == 0x8:
                return int(struct.unpack("!H", payload[:2])[0]) if len(payload) >= 2 else None
    except asyncio.IncompleteReadError:
        return None
    finally:
        writer.close()


async def test_frames_that_break_rfc_6455_close_with_the_right_code_and_others_carry_on(
    tiny_model: Path, tmp_path: Path, open_client: Any
) -> None:
    a = App(settings(tiny_model, tmp_path))
    async with a.lifespan():
        assert a.port is not None
        bystander = await open_client(a.port)
        await bystander.hello()
        text = ws_frame(0x1, b'{"type":"stop"}')
        cases = {
            "unmasked": (ws_frame(0x1, b'{"type":"stop"}', mask=False), 1002),
            "rsv bits without an extension": (ws_frame(0x1, b"{}", rsv=0b100), 1002),
            "unknown opcode": (ws_frame(0x3, b"x"), 1002),
            "fragmented ping": (ws_frame(0x9, b"x", fin=False), 1002),
            "ping over 125 bytes": (ws_frame(0x9, b"x" * 200), 1002),
            "close code 999": (ws_frame(0x8, struct.pack("!H", 999)), 1002),
            "close code 1005 on the wire": (ws_frame(0x8, struct.pack("!H", 1005)), 1002),
            "invalid UTF-8": (ws_frame(0x1, b'{"t":"\xff\xfe"}'), 1007),
            "over max_frame_bytes": (ws_frame(0x1, b"x" * 70_000), 1009),
        }
        for name, (bad, expected) in cases.items():
            assert await close_code_after(a.port, text, bad) == expected, name
        done, _ = await bystander.chat("still serving?", "m1")  # the other session carried on
        assert done["type"] == "done"


# --- scenarios 4 and 6: ratings while the engine is full; retries after a reconnect -------------


async def test_rating_acks_are_unaffected_by_an_overloaded_engine(
    tiny_model: Path, tmp_path: Path, open_client: Any
) -> None:
    s = settings(tiny_model, tmp_path, ratings_per_minute=1000.0, rate_burst=100)
    s = dataclasses.replace(s, model=dataclasses.replace(s.model, max_new_tokens=100_000))
    a = App(s)
    async with a.lifespan():
        rater = await open_client(a.port)
        await rater.hello()
        await rater.send(type="message", text="a reply to rate", client_id="m0")
        await rater.until("token")
        await rater.send(type="stop")
        reply, _ = await rater.until("done")
        busy = []
        for i in range(2):  # model.max_pending = 2: the engine is full of endless replies
            c = await open_client(a.port)
            await c.hello()
            await c.send(type="message", text="talk forever", client_id=f"b{i}")
            await c.until("token")
            busy.append(c)
        late = await open_client(a.port)
        await late.hello()
        await late.send(type="message", text="me too", client_id="late")
        await late.until("ack")
        assert (await late.recv())["code"] == "overloaded"
        for k in range(20):
            await rater.send(type="rating", message_id=reply["message_id"], value=1, id=f"r{k}")
        acks = [await rater.recv() for _ in range(20)]
        assert acks == [{"type": "ack", "id": f"r{k}"} for k in range(20)]
        for c in busy:
            await c.send(type="stop")
            await c.until("done")


async def test_ratings_resent_after_a_reconnect_with_the_same_id_are_stored_once(
    tiny_model: Path, tmp_path: Path, open_client: Any
) -> None:
    a = App(settings(tiny_model, tmp_path))
    async with a.lifespan():
        assert a.store is not None
        c = await open_client(a.port)
        ready = await c.hello()
        done, _ = await c.chat("rate me", "m1")
        for rid in ("r1", "r2"):
            await c.send(type="rating", message_id=done["message_id"], value=1, id=rid)
        await c.recv()  # r1's ack arrives; the connection drops before the client saw r2's
        await c.ws.close()
        again = await open_client(a.port)
        await again.hello(conversation_id=ready["conversation_id"])
        for rid in ("r1", "r2"):  # the client resends everything it has no ack for, and more
            await again.send(type="rating", message_id=done["message_id"], value=-1, id=rid)
            assert await again.recv() == {"type": "ack", "id": rid}
        ratings = (await a.store.conversations.export_feedback()).ratings
        assert sorted(r.client_id for r in ratings) == ["r1", "r2"]
        assert next(r.value for r in ratings if r.client_id == "r1") == 1  # the acknowledged write stands


async def test_the_token_and_message_text_never_reach_the_log(
    tiny_model: Path, tmp_path: Path, open_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario 10 (tokens never logged), at DEBUG level: wrong tokens in the header, in the browser's
    subprotocol and in an old client's hello, the right one both ways, and a refused Origin."""
    secret = "s3cret-token-do-not-log-4711"
    wrong = secret[:-1] + "X"
    caplog.set_level(logging.DEBUG)
    a = App(settings(tiny_model, tmp_path, token=secret))
    async with a.lifespan():
        assert a.port is not None
        for headers, protocols in (
            ({"Authorization": f"Bearer {wrong}"}, None),
            ({}, ["learnloop.v1", bearer_subprotocol(wrong)]),
            ({"Authorization": f"Basic {base64.b64encode(secret.encode()).decode()}"}, None),
        ):
            with pytest.raises(InvalidStatus):
                await open_client(a.port, additional_headers=headers, subprotocols=protocols)
        with pytest.raises(InvalidStatus):
            c = await open_client(a.port)  # an old client: the token only in its hello
        browser = await open_client(a.port, subprotocols=["learnloop.v1", bearer_subprotocol(secret)])
        await browser.hello(token=wrong)  # hello.token is not read
        c = await open_client(a.port, additional_headers={"Authorization": f"Bearer {secret}"})
        await c.hello()
        await c.chat("my card is private-text-0815", "m1")
        assert await handshake_status(a.port, "https://evil.example") == 403
    server_side = [r for r in caplog.records if not r.name.startswith("websockets.client")]  # not the test's client
    logged = "\n".join(f"{r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in server_side)
    assert "websocket handshake refused: the token is wrong" in logged  # the log was captured
    encoded = (bearer_subprotocol(secret), bearer_subprotocol(wrong), base64.b64encode(secret.encode()).decode())
    for planted in (secret, wrong, "private-text-0815", *encoded):
        assert planted not in logged
