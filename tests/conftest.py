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

from tests import store_backends
from tests.factories import build_tiny_model
from tests.store_backends import BACKENDS, PG_PASS, StoreTarget, drop_schema, make_target

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The PostgreSQL pass of the whole suite (README, "Tests"; tests/store_backends.py says how a store
# is redirected). PGTEST_RECORD=FILE (the SQLite pass in CI): append the id of each test that opened
# a store to FILE. PGTEST_SELECT=FILE (the PostgreSQL pass in CI): run only the tests FILE names.
RECORD = os.environ.get("PGTEST_RECORD")
SELECT = os.environ.get("PGTEST_SELECT")
ON_POSTGRES_ALREADY = ("store_target", "postgres_target")  # their PostgreSQL cases run in every pass
_deselected: dict[str, int] = {}


def pytest_configure(config: pytest.Config) -> None:
    if PG_PASS or RECORD:
        store_backends.install()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        marker = item.get_closest_marker("sqlite_only")
        if marker is not None:
            if not (marker.args and isinstance(marker.args[0], str) and marker.args[0]):
                raise pytest.UsageError(f"{item.nodeid}: write why, @pytest.mark.sqlite_only('...')")
            if PG_PASS:
                item.add_marker(pytest.mark.skip(reason=f"SQLite only: {marker.args[0]}"))
    if not PG_PASS:
        return
    selected = None
    if SELECT:
        path = Path(SELECT)
        if not path.exists():
            raise pytest.UsageError(
                f"PGTEST_SELECT={SELECT}: no such file (the SQLite pass with PGTEST_RECORD writes it)"
            )
        selected = set(path.read_text().split())
    keep, drop = [], []
    for item in items:
        if any(name in item.fixturenames for name in ON_POSTGRES_ALREADY):
            reason = "run on PostgreSQL in every pass (store_target, postgres_target)"
        elif selected is not None and item.nodeid not in selected:
            reason = f"opened no store in the SQLite pass ({SELECT})"
        else:
            keep.append(item)
            continue
        drop.append(item)
        _deselected[reason] = _deselected.get(reason, 0) + 1
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if PG_PASS:
        terminalreporter.write_line(
            "PostgreSQL pass (PGTEST_STORE=postgresql): every store a test opens is a PostgreSQL schema"
        )
        for reason, count in _deselected.items():
            terminalreporter.write_line(f"  deselected {count}: {reason}")


def pytest_sessionfinish(session: pytest.Session) -> None:
    if PG_PASS or RECORD:
        store_backends.end_session()


@pytest.fixture(autouse=True)
def store_redirect(request: pytest.FixtureRequest) -> Iterator[None]:
    """The PostgreSQL pass's redirect for this test, and the record of tests that open a store
    (tests/store_backends.py); nothing in a plain SQLite run."""
    if not (PG_PASS or RECORD):
        yield
        return
    redirect = store_backends.begin_test()
    try:
        yield
    finally:
        tmp = request.node.funcargs.get("tmp_path") if hasattr(request.node, "funcargs") else None
        files = store_backends.sqlite_files_under(tmp) if isinstance(tmp, Path) else []
        opened = redirect.opened or bool(files)
        store_backends.end_test()
        if RECORD and opened:
            with open(RECORD, "a") as f:
                f.write(request.node.nodeid + "\n")
        if PG_PASS and files:
            names = ", ".join(str(p.relative_to(tmp)) for p in files)
            pytest.fail(f"a SQLite store escaped the PostgreSQL pass's redirect: {names} (tests/store_backends.py)")


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
