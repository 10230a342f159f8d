from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.factories import build_tiny_model
from tests.store_backends import BACKENDS, StoreTarget, drop_schema, make_target

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def no_leaked_database_threads() -> Iterator[None]:
    """A store left open keeps an aiosqlite thread (or the PostgreSQL writer's) alive, and the test
    process never exits."""
    before = {t.ident for t in threading.enumerate()}
    yield
    deadline = time.monotonic() + 5
    while True:
        leaked = [
            t.name
            for t in threading.enumerate()
            if t.ident not in before and ("_connection_worker" in t.name or "feedback-pg-writer" in t.name)
        ]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"database connections left open: {leaked}"


@pytest.fixture(params=BACKENDS)
def store_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreTarget]:
    """Where the test's store lives, once per backend: a SQLite file in ``tmp_path``, or a fresh
    PostgreSQL schema, dropped afterwards (tests/store_backends.py; skipped without a server,
    except in CI). Open it with ``await store_target.open()``, as often as the test reopens."""
    target = make_target(request.param, tmp_path)
    yield target
    if target.schema is not None:
        drop_schema(target.schema)


@pytest.fixture
def postgres_target(tmp_path: Path) -> Iterator[StoreTarget]:
    """A fresh PostgreSQL schema for a test about PostgreSQL alone (as ``store_target``'s second case)."""
    target = make_target("postgresql", tmp_path)
    yield target
    assert target.schema is not None
    drop_schema(target.schema)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


class ChatClient:
    """A thin test client over a real websocket connection."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []

    async def send(self, **frame: Any) -> None:
        await self.ws.send(json.dumps(frame))

    async def recv(self, timeout: float = 60) -> dict[str, Any]:
        import asyncio

        frame = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        self.frames.append(frame)
        return frame

    async def until(self, kind: str, timeout: float = 120) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Frames up to and including the first of type ``kind``; an error frame fails unless asked for."""
        seen: list[dict[str, Any]] = []
        while True:
            frame = await self.recv(timeout)
            seen.append(frame)
            if frame["type"] == kind:
                return frame, seen
            if frame["type"] == "error":
                raise AssertionError(f"unexpected error frame: {frame}")

    async def hello(self, **fields: Any) -> dict[str, Any]:
        await self.send(type="hello", **fields)
        ready, _ = await self.until("ready")
        return ready

    async def chat(self, text: str, client_id: str) -> tuple[dict[str, Any], str]:
        """Send a message; return the done frame and the streamed text."""
        await self.send(type="message", text=text, client_id=client_id)
        ack, _ = await self.until("ack")
        assert ack["id"] == client_id
        done, frames = await self.until("done")
        text_out = "".join(f["delta"] for f in frames if f["type"] == "token")
        assert all(f["message_id"] == done["message_id"] for f in frames if f["type"] == "token")
        return done, text_out


@pytest.fixture
async def open_client() -> AsyncIterator[Any]:
    opened: list[ClientConnection] = []

    async def _open(port: int, **options: Any) -> ChatClient:
        ws = await connect(f"ws://127.0.0.1:{port}", **options)
        opened.append(ws)
        return ChatClient(ws)

    yield _open
    for ws in opened:
        await ws.close()
