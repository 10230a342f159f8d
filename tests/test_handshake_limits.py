"""Scenarios 10 (token auth) and 11 (caps, idle sockets, compression, slow readers) through the real
App and gateway on loopback (docs/reliability.md)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import os
import socket
import struct
import time
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from server.admission import bearer_subprotocol
from server.app import App
from server.gateway import user_slot
from server.settings import SiteConfig
from tests.test_gateway import settings
from tests.test_reliability import ws_frame


async def status_of(port: int, **options: Any) -> int:
    """101 if the websocket opens (it is closed again at once), else the HTTP status of the refusal."""
    try:
        ws = await connect(f"ws://127.0.0.1:{port}", ping_interval=None, **options)
    except InvalidStatus as exc:
        return exc.response.status_code
    await ws.close()
    return 101


async def conversations(a: App) -> int:
    assert a.store is not None
    return len(await a.store.db.read("SELECT id FROM conversations"))


# --- scenario 10: the token before the upgrade ----------------------------------------------


async def test_a_handshake_without_the_token_gets_401_before_any_session(
    tiny_model: Path, tmp_path: Path, open_client: Any
) -> None:
    secret = "t0ken-for-the-handshake"
    s = settings(tiny_model, tmp_path, token=secret)
    s = dataclasses.replace(s, sites={"shop": SiteConfig(origins=("https://shop.example",))})
    a = App(s)
    async with a.lifespan():
        assert a.port is not None
        refused: list[dict[str, Any]] = [
            {},  # an old client that sends the token only in its hello
            {"additional_headers": {"Authorization": "Bearer wrong"}},
            {"additional_headers": {"Authorization": f"Basic {base64.b64encode(secret.encode()).decode()}"}},
            {"additional_headers": {"Authorization": "Bearer"}},
            {"subprotocols": ["learnloop.v1", bearer_subprotocol("wrong")]},
            {"subprotocols": ["learnloop.v1", "learnloop.bearer.!!not-base64!!"]},
            {"origin": "https://shop.example", "additional_headers": {"Authorization": "Bearer wrong"}},
        ]
        for options in refused:
            try:
                await connect(f"ws://127.0.0.1:{a.port}", ping_interval=None, **options)
            except InvalidStatus as exc:
                assert exc.response.status_code == 401, options
                assert exc.response.headers["WWW-Authenticate"].startswith("Bearer"), options
            else:
                raise AssertionError(f"admitted without the token: {options}")
        assert await conversations(a) == 0  # nothing was opened, nothing stored

        c = await open_client(a.port, additional_headers={"Authorization": f"Bearer {secret}"})
        assert (await c.hello(user="ann"))["type"] == "ready"  # hello.token is not needed, nor read
        browser = await open_client(a.port, subprotocols=["learnloop.v1", bearer_subprotocol(secret)])
        assert browser.ws.subprotocol == "learnloop.v1"  # the token is never echoed
        assert (await browser.hello())["type"] == "ready"

        # a widget site's page cannot keep a secret: it may come without the token, for its site only
        widget = await open_client(a.port, origin="https://shop.example")
        await widget.send(type="hello")
        assert (await widget.recv())["code"] == "unauthorized"
        assert (await widget.hello(site="shop"))["type"] == "ready"
        assert await conversations(a) == 3


async def test_the_python_client_sends_the_token_in_the_handshake(tiny_model: Path, tmp_path: Path) -> None:
    from server.client import ChatError, ErrorCode
    from server.client import connect as chat_connect

    a = App(settings(tiny_model, tmp_path, token="s3cret"))
    async with a.lifespan():
        url = f"ws://127.0.0.1:{a.port}"
        async with chat_connect(url, token="s3cret", user="bot") as client:
            assert (await client.send("hi")).message_id
        with pytest.raises(ChatError) as err:
            await chat_connect(url, token="wrong", reconnect=False)
        assert err.value.code is ErrorCode.UNAUTHORIZED


# --- scenario 11: connection caps -----------------------------------------------------------


async def test_connections_are_capped_per_address_with_429_and_per_user_with_close_1013(
    tiny_model: Path, tmp_path: Path, open_client: Any
) -> None:
    a = App(settings(tiny_model, tmp_path, max_connections_per_address=3, max_connections_per_user=2))
    async with a.lifespan():
        assert a.port is not None
        held = [await open_client(a.port) for _ in range(3)]
        try:
            await connect(f"ws://127.0.0.1:{a.port}")
        except InvalidStatus as exc:
            assert exc.response.status_code == 429 and exc.response.headers["Retry-After"] == "5"
        else:
            raise AssertionError("a fourth connection from one address was admitted")
        assert await status_of(a.port, local_addr=("127.0.0.2", 0)) == 101  # another address is not affected
        # behind a proxy on loopback, each forwarded address has its own cap
        assert await status_of(a.port, additional_headers={"X-Forwarded-For": "198.51.100.7"}) == 101
        await held.pop().ws.close()
        held.append(await open_client(a.port))  # a closed connection frees its slot

        ann = [await open_client(a.port, local_addr=("127.0.0.3", 0)) for _ in range(3)]
        for c in ann[:2]:
            assert (await c.hello(user="ann"))["type"] == "ready"
        await ann[2].send(type="hello", user="ann")
        refusal = await ann[2].recv()
        assert (refusal["code"], refusal["retry_after"]) == ("rate_limited", 5)
        with pytest.raises(ConnectionClosed):
            await ann[2].recv()
        assert ann[2].ws.close_code == 1013  # try again later
        assert (await held[0].hello(user="bob"))["type"] == "ready"  # another user is not affected
        # hello.user is only a claim: "ann" from another address has slots of its own, so nobody
        # can lock a user out by claiming their name (a site's verified user is capped wherever)
        elsewhere = await open_client(a.port, local_addr=("127.0.0.4", 0))
        assert (await elsewhere.hello(user="ann"))["type"] == "ready"
        await elsewhere.ws.close()
        await ann[0].ws.close()
        again = await open_client(a.port, local_addr=("127.0.0.3", 0))
        assert (await again.hello(user="ann"))["type"] == "ready"
        assert await conversations(a) == 5  # ann twice, bob, ann elsewhere, ann again: the refused hello opened nothing


# --- scenario 11: idle sockets ----------------------------------------------------------------


async def test_an_idle_socket_is_closed_with_4408_and_client_pings_keep_one_open(
    tiny_model: Path, tmp_path: Path, open_client: Any
) -> None:
    a = App(settings(tiny_model, tmp_path, idle_timeout_s=0.5, ping_interval_s=0.1))
    async with a.lifespan():
        silent = await open_client(a.port, ping_interval=None)  # it answers the server's pings, nothing else
        await silent.hello()
        never_said_hello = await open_client(a.port, ping_interval=None)
        pinging = await open_client(a.port, ping_interval=0.1)  # the library's keepalive, as the Python client's
        await pinging.hello()
        for c in (silent, never_said_hello):
            with pytest.raises(ConnectionClosed):
                await c.recv(timeout=30)
            assert (c.ws.close_code, c.ws.close_reason) == (4408, "idle timeout")
        done, _ = await pinging.chat("still here?", "m1")  # open well past the timeout, and it chats
        assert done["type"] == "done"


# --- scenario 11: compression -----------------------------------------------------------------


BOMB_BYTES = 48 * 2**20  # 48 MiB of spaces deflate to about 48 kB: under server.max_frame_bytes


def deflate_bomb() -> bytes:
    """A permessage-deflate payload (RFC 7692: raw deflate, sync flush, tail removed) of 48 MiB."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -9)
    data = compressor.compress(b" " * BOMB_BYTES) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert data.endswith(b"\x00\x00\xff\xff") and len(data) < 65536
    return data[:-4]


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    """One frame from the server: its first byte (FIN, opcode), then its payload."""
    b0, b1 = await asyncio.wait_for(reader.readexactly(2), 30)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", await reader.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", await reader.readexactly(8))[0]
    return bytes([b0]) + await reader.readexactly(n)


async def close_code_of(reader: asyncio.StreamReader) -> int | None:
    """Read frames until the server's close frame; its code (None: the server just hung up)."""
    try:
        while True:
            frame = await read_frame(reader)
            if frame[0] & 0x0F == 0x8:
                return int(struct.unpack("!H", frame[1:3])[0]) if len(frame) >= 3 else None
    except asyncio.IncompleteReadError:
        return None


async def handshake(
    port: int, *headers: str, sock: socket.socket | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A websocket handshake by hand (with extra header lines), so what follows can be anything."""
    if sock is None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    else:
        reader, writer = await asyncio.open_connection(sock=sock)
    key = base64.b64encode(os.urandom(16)).decode()
    extra = "".join(f"{h}\r\n" for h in headers)
    writer.write(
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer, head


@pytest.mark.parametrize("compression", [False, True], ids=["off (the default)", "on"])
async def test_a_deflate_bomb_has_no_effect(
    tiny_model: Path, tmp_path: Path, open_client: Any, compression: bool
) -> None:
    """Off: the compressed frame is a protocol error (1002) and is never inflated. On: it is inflated
    only up to server.max_frame_bytes, then closed with 1009. Either way the server's Python heap
    grows by far less than the bomb, and another session chats on."""
    a = App(settings(tiny_model, tmp_path, compression=compression))
    async with a.lifespan():
        assert a.port is not None
        bystander = await open_client(a.port)
        await bystander.hello()
        bomb = ws_frame(0x1, deflate_bomb(), rsv=0b100)  # RSV1: "this message is compressed"
        reader, writer, head = await handshake(
            a.port, "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"
        )
        assert (b"permessage-deflate" in head.lower()) is compression
        tracemalloc.start()
        try:
            writer.write(bomb)
            await writer.drain()
            code = await close_code_of(reader)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            writer.close()
        assert code == (1009 if compression else 1002)
        assert peak < 4 * 2**20, f"the bomb grew the heap by {peak / 2**20:.1f} MiB"
        done, _ = await bystander.chat("still serving?", "m1")
        assert done["type"] == "done"


# --- scenario 11: 500 idle sockets from one source ------------------------------------------------


async def open_idle(port: int, n: int) -> tuple[list[ClientConnection], list[int]]:
    """``n`` websockets from 127.0.0.1 that never say hello (in batches: the listen backlog is 100)."""
    opened: list[ClientConnection] = []
    statuses: list[int] = []

    async def one() -> None:
        try:
            opened.append(await connect(f"ws://127.0.0.1:{port}", ping_interval=None, open_timeout=60))
            statuses.append(101)
        except InvalidStatus as exc:
            statuses.append(exc.response.status_code)

    for start in range(0, n, 50):
        await asyncio.gather(*(one() for _ in range(min(50, n - start))))
    return opened, statuses


@pytest.mark.parametrize("cap", [100, 0], ids=["default cap", "no cap"])
async def test_five_hundred_idle_sockets_from_one_source_do_not_stop_others(
    tiny_model: Path, tmp_path: Path, open_client: Any, cap: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the default cap (100 a address) the flood gets 429 past it, which is itself the protection:
    its own address is refused, others are not. Without a cap all 500 stay open; a client still chats."""
    a = App(settings(tiny_model, tmp_path, max_connections_per_address=cap))
    async with a.lifespan():
        assert a.port is not None
        idle, statuses = await open_idle(a.port, 500)
        try:
            if cap:
                assert (statuses.count(101), statuses.count(429)) == (100, 400)
                assert await status_of(a.port) == 429  # the flooding address gets no more
            else:
                assert statuses.count(101) == 500
            started = time.monotonic()
            c = await open_client(a.port, local_addr=("127.0.0.2", 0))  # a customer elsewhere
            await c.hello()
            done, tokens = await c.chat("hello?", "m1")
            assert done["type"] == "done" and tokens
            with capsys.disabled():
                print(
                    f"\n{len(idle)} idle sockets open: a new client's hello and reply took "
                    f"{time.monotonic() - started:.2f} s"
                )
        finally:
            await asyncio.gather(*(ws.close() for ws in idle))


# --- scenario 11: a client that never reads ---------------------------------------------------------


async def test_a_client_that_never_reads_holds_at_most_the_write_limit_and_is_dropped(
    tiny_model: Path, tmp_path: Path, open_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The client asks and asks (a reply streams, or it gets ``busy``) and never reads. The server's
    buffer for it fills to server.write_limit_bytes and no further; after server.send_timeout_s
    the connection is dropped, its reply stops, and the engine serves others."""
    write_limit = 4096
    s = settings(
        tiny_model, tmp_path, write_limit_bytes=write_limit, send_timeout_s=1.0, rate_per_s=1e6, rate_burst=10**6
    )
    s = dataclasses.replace(s, model=dataclasses.replace(s.model, max_new_tokens=2000))
    a = App(s)
    caplog.set_level(logging.WARNING, logger="learnloop.gateway")
    async with a.lifespan():
        assert a.port is not None and a.gateway is not None
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # small kernel buffers: the point is ours
        sock.connect(("127.0.0.1", a.port))
        sock.setblocking(False)
        reader, writer, _ = await handshake(a.port, sock=sock)
        writer.write(ws_frame(0x1, b'{"type":"hello"}'))
        assert b'"ready"' in await read_frame(reader)  # the last frame it reads
        [conn] = list(a.gateway.connections)
        conn.ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
        buffered = [0]
        deadline = time.monotonic() + 60
        k = 0
        while conn in a.gateway.connections and time.monotonic() < deadline:
            with contextlib.suppress(ConnectionError):  # a reply starts, or it gets busy
                writer.write(ws_frame(0x1, b'{"type":"message","text":"talk on","client_id":"m%d"}' % k))
            k += 1
            buffered.append(conn.ws.transport.get_write_buffer_size())
            await asyncio.sleep(0.005)
        assert conn not in a.gateway.connections, "the connection was not dropped"
        assert write_limit <= max(buffered) <= write_limit + 1024, max(buffered)  # it filled, and no further
        assert "dropping a websocket whose client does not read" in caplog.text
        writer.close()

        c = await open_client(a.port)  # the engine is free: the dropped reply stopped
        await c.hello()
        await c.send(type="message", text="hi", client_id="m2")
        await c.until("token")
        await c.send(type="stop")
        done, _ = await c.until("done")
        assert done["finish_reason"] == "cancelled"


def test_a_claimed_user_is_capped_per_address_and_a_verified_one_everywhere() -> None:
    assert user_slot(None, "ann", "127.0.0.3") != user_slot(None, "ann", "127.0.0.4")
    assert user_slot(None, "ann", "127.0.0.3") == user_slot(None, "ann", "127.0.0.3")
    assert user_slot("shop", "ann", "127.0.0.3") == user_slot("shop", "ann", "127.0.0.4")
    assert user_slot("shop", "ann", "127.0.0.3") != user_slot("blog", "ann", "127.0.0.3")
