"""``learnloop serve`` as a real process, sent SIGTERM and SIGKILL (scenarios 5 and 9 of docs/reliability.md)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.serve_process import ServeProcess, kill9_trials
from tests.store_backends import PG_PASS, peek


async def start_reply(port: int, n: int) -> tuple[ClientConnection, str]:
    ws = await connect(f"ws://127.0.0.1:{port}")
    await ws.send(json.dumps({"type": "hello"}))
    assert json.loads(await ws.recv())["type"] == "ready"
    for attempt in range(10):  # a sampled reply of the tiny random model may end at its first token: ask again
        await ws.send(
            json.dumps({"type": "message", "text": f"tell me a long story {n}", "client_id": f"m{n}-{attempt}"})
        )
        assert json.loads(await ws.recv())["type"] == "ack"
        first = json.loads(await ws.recv())
        if first["type"] == "token":
            return ws, first["delta"]
        assert first["type"] == "done", first
    raise AssertionError("ten replies in a row ended at their first token")


async def read_to_close(ws: ClientConnection, text: str) -> tuple[str, dict | None, int | None]:
    """Read until the server closes: (the reply's text, its done frame, the close code)."""
    done = None
    try:
        async for raw in ws:
            frame = json.loads(raw)
            if frame["type"] == "token":
                text += frame["delta"]
            elif frame["type"] == "done":
                done = frame
    except ConnectionClosed:
        pass
    return text, done, ws.close_code


def test_sigterm_drains_replies_in_flight_stores_them_and_exits_within_10_s(tiny_model: Path, tmp_path: Path) -> None:
    server = ServeProcess(
        tmp_path / "data",
        tiny_model,
        {
            "LEARNLOOP_MODEL_MAX_NEW_TOKENS": "100000",
            "LEARNLOOP_SERVER_DRAIN_S": "1",
            "LEARNLOOP_MODEL_DTYPE": "float32",
            # greedy: sampled, each of the eight endless replies may draw its end of turn before the
            # drain's second is up, and once all eight did (CI); greedy ones are the same every run
            "LEARNLOOP_MODEL_TEMPERATURE": "0",
        },
    )
    try:
        port = server.port()

        async def scenario() -> tuple[list[tuple[str, dict | None, int | None]], bool, float]:
            clients = await asyncio.gather(*(start_reply(port, n) for n in range(8)))
            signalled = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            try:  # the listener is closed at once: new clients are refused
                late = await asyncio.wait_for(connect(f"ws://127.0.0.1:{port}"), 5)
                await late.close()
                refused = False
            except (TimeoutError, OSError):
                refused = True
            results = await asyncio.gather(*(read_to_close(ws, text) for ws, text in clients))
            return list(results), refused, signalled

        results, refused, signalled = asyncio.run(scenario())
        server.proc.wait(timeout=15)
        exited_s = time.monotonic() - signalled
    finally:
        server.stop()
    assert refused, "a new connection was accepted after SIGTERM"
    assert exited_s < 10, exited_s
    assert server.proc.returncode == 0, server.log[-20:]
    stored = {}
    for message_id, text, reason in peek(
        server.db_path, "SELECT id, text, finish_reason FROM messages WHERE role = 'assistant'"
    ):
        stored[message_id] = (text, reason)
    for text, done, code in results:
        assert done is not None, "a reply in flight got no done"
        assert done["finish_reason"] in ("shutdown", "stop", "length"), done
        assert code == 1001
        if PG_PASS:  # PostgreSQL's text holds no NUL: U+FFFD in its place (docs/architecture.md, "The store")
            text = text.replace("\x00", "\ufffd")
        assert stored[done["message_id"]] == (text, done["finish_reason"])  # the partial reply, as streamed
    assert any(done["finish_reason"] == "shutdown" for _, done, _ in results if done)


@pytest.mark.slow
async def test_kill_9_through_the_server_loses_and_duplicates_no_acknowledged_rating(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Scenario 5, three kills here (bench/load.py runs twenty): 0 lost, 0 twice, integrity ok, serving again."""
    trials = await kill9_trials(tmp_path / "data", tiny_model, trials=3, sessions=8, seed=int(os.getpid()))
    assert all(t.acked > 0 for t in trials)
    integrity = "ok" if not PG_PASS else None  # PRAGMA integrity_check: SQLite's (tests/serve_process.py)
    assert [(t.lost, t.duplicated, t.integrity) for t in trials] == [(0, 0, integrity)] * 3
    assert max(t.restart_s for t in trials) < 60  # the tiny model loads in seconds; bench/load.py records it
