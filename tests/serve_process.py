"""``learnloop serve`` as a real subprocess on free ports, for the signal tests and bench/load.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.store_backends import PG_PASS, peek, store_env

ROOT = Path(__file__).parent.parent
PORT0 = ("--port", "0")
_SERVING = re.compile(r"learnloop serving .* on ws://[^:]+:(\d+)")
_CONSOLE = re.compile(r"operator console on http://[^:]+:(\d+)")


class ServeProcess:
    """Start ``python -m server.cli --data-dir DIR serve --model MODEL --port 0``; learn the port from its log.

    ``model``: a folder or a name ``learnloop serve --model`` takes (``smollm2-135m-instruct``).
    """

    def __init__(
        self, data_dir: Path, model: Path | str, env: Mapping[str, str] | None = None, *, verbose: bool = False
    ) -> None:
        self.data_dir = data_dir
        self.log: list[str] = []
        full_env = {
            **os.environ,
            "LEARNLOOP_CONSOLE_PORT": "0",
            "LEARNLOOP_CHANNELS_PORT": "0",
            "LEARNLOOP_SCHEDULE_ENABLED": "false",
            **store_env(data_dir),  # the PostgreSQL pass: the test's schema for data_dir
            **(env or {}),
        }
        full_env.pop("LEARNLOOP_CONFIG", None)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server.cli",
                *(["-v"] if verbose else []),
                "--data-dir",
                str(data_dir),
                *("serve", "--model", str(model)),
                *PORT0,
            ],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
            env=full_env,
        )
        self._port: int | None = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.rstrip("\n"))
            match = _SERVING.search(line)
            if match and self._port is None:
                self._port = int(match.group(1))
                self._ready.set()
        self._ready.set()  # the process ended

    def port(self, timeout: float = 120) -> int:
        """The gateway's port once it serves (seconds since start in ``ready_s``)."""
        self._ready.wait(timeout)
        if self._port is None:
            raise AssertionError("learnloop serve did not start:\n" + "\n".join(self.log[-30:]))
        self.ready_s = time.monotonic() - self.started
        return self._port

    def console_port(self) -> int:
        """The console's port (it is logged before the gateway's, so it is known once ``port()`` is)."""
        self.port()
        found = [int(m.group(1)) for line in self.log if (m := _CONSOLE.search(line))]
        if not found:
            raise AssertionError("learnloop serve logged no console port:\n" + "\n".join(self.log[-30:]))
        return found[0]

    @property
    def db_path(self) -> Path:
        return self.data_dir / "learnloop.db"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(5)


BURST_ENV = {  # the per-connection and per-rater limits off: the burst measures the store and the gateway
    "LEARNLOOP_SERVER_RATE_PER_S": "1000000",
    "LEARNLOOP_SERVER_RATE_BURST": "1000000",
    "LEARNLOOP_SERVER_RATINGS_PER_MINUTE": "100000000",
    "LEARNLOOP_SERVER_MAX_CONNECTIONS_PER_ADDRESS": "0",  # every client comes from loopback
    "LEARNLOOP_MODEL_MAX_NEW_TOKENS": "4",
    "LEARNLOOP_MODEL_DTYPE": "float32",
}


@dataclass
class RatingSession:
    """One client: hello, one chat turn, then ``n`` ratings of that reply.

    ``window``: how many ratings may wait for their ack at once. 1 is a client that sends the next
    rating once the last is acknowledged, as ``learnloop``'s client's ``rate()`` does; None sends
    every rating without waiting (pipelined).
    """

    tag: str
    window: int | None = None
    acked: list[str] = field(default_factory=list)
    ack_ms: list[float] = field(default_factory=list)
    sent: int = 0
    connected: bool = False
    dropped: bool = False  # the connection ended before every rating was acknowledged
    errors: list[str] = field(default_factory=list)
    chatted: bool = False  # the chat turn was answered (after retries of ``overloaded``)
    last_ack: float = 0.0  # time.monotonic() of the last ack

    async def run(self, port: int, n: int, *, chat_timeout: float = 120, go: asyncio.Event | None = None) -> None:
        """``go``: wait for it between the chat turn and the ratings (a burst from every client at once)."""
        try:
            async with connect(f"ws://127.0.0.1:{port}", open_timeout=60, max_queue=None) as ws:
                await ws.send(json.dumps({"type": "hello"}))
                await _until(ws, "ready", chat_timeout)
                self.connected = True
                done = await _chat(ws, self.tag, chat_timeout)
                self.chatted = True
                if go is not None:
                    await go.wait()
                sent_at: dict[str, float] = {}
                room = asyncio.Semaphore(self.window or n)

                async def reader() -> None:
                    while len(self.acked) + len(self.errors) < n:
                        frame = json.loads(await ws.recv())
                        if frame["type"] == "ack" and frame["id"] in sent_at:
                            self.acked.append(frame["id"])
                            self.last_ack = time.monotonic()
                            self.ack_ms.append((self.last_ack - sent_at[frame["id"]]) * 1000)
                            room.release()
                        elif frame["type"] == "error":
                            self.errors.append(str(frame.get("code")))
                            room.release()

                reading = asyncio.create_task(reader())
                try:
                    for i in range(n):
                        await room.acquire()
                        rid = f"{self.tag}-{i}"
                        sent_at[rid] = time.monotonic()
                        frame = {"type": "rating", "message_id": done["message_id"], "value": 1, "id": rid}
                        await ws.send(json.dumps(frame))
                        self.sent += 1
                        if i % 16 == 15:
                            await asyncio.sleep(0)  # let the acks in
                    await reading
                finally:
                    reading.cancel()
                    with contextlib.suppress(Exception, asyncio.CancelledError):
                        await reading
        except (TimeoutError, ConnectionClosed, OSError):
            self.dropped = True


async def _chat(ws: Any, tag: str, timeout: float) -> dict[str, Any]:
    """One chat turn; ``overloaded`` is retried after its ``retry_after``, as a client should."""
    for attempt in range(100):
        await ws.send(json.dumps({"type": "message", "text": "hello there", "client_id": f"{tag}-m{attempt}"}))
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), timeout))
            if frame["type"] == "done":
                return dict(frame)
            if frame["type"] == "error" and frame["code"] == "overloaded":
                await asyncio.sleep(float(frame.get("retry_after") or 0.5))
                break
            if frame["type"] == "error":
                raise AssertionError(f"unexpected error frame: {frame}")
    raise AssertionError("overloaded 100 times")


async def _until(ws: Any, kind: str, timeout: float) -> dict[str, Any]:
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if frame["type"] == kind:
            return dict(frame)
        if frame["type"] == "error":
            raise AssertionError(f"unexpected error frame: {frame}")


def stored_ratings(db_path: Path) -> tuple[list[str], str | None]:
    """(every rating's client id, ``PRAGMA integrity_check``) read with plain sqlite3 after the server
    is gone; in the PostgreSQL pass the ids from the test's schema, and None: no file to check."""
    if PG_PASS:
        return [row[0] for row in peek(db_path, "SELECT client_id FROM ratings")], None
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        ids = [row[0] for row in db.execute("SELECT client_id FROM ratings")]
        integrity = str(db.execute("PRAGMA integrity_check").fetchone()[0])
    return ids, integrity


@dataclass
class KillTrial:
    acked: int
    lost: int
    duplicated: int
    integrity: str | None
    restart_s: float


async def kill9_trials(
    data_dir: Path, model: Path | str, *, trials: int, sessions: int, seed: int = 0, log: Any = None
) -> list[KillTrial]:
    """Rating bursts through ``learnloop serve``, each killed with SIGKILL at a random moment; then check the disk."""
    rng = random.Random(seed)
    results: list[KillTrial] = []
    acked_all: set[str] = set()
    server = ServeProcess(data_dir, model, BURST_ENV)
    for trial in range(trials):
        port = await asyncio.to_thread(server.port)
        clients = [RatingSession(f"t{trial}c{k}") for k in range(sessions)]
        tasks = [asyncio.create_task(c.run(port, 100_000)) for c in clients]
        while sum(len(c.acked) for c in clients) < 20 * sessions:  # the burst is under way
            await asyncio.sleep(0.05)
        await asyncio.sleep(rng.uniform(0.0, 1.0))
        server.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(server.proc.wait)
        await asyncio.gather(*tasks)
        for c in clients:
            acked_all.update(c.acked)
        server.stop()
        restarted = time.monotonic()
        server = ServeProcess(data_dir, model, BURST_ENV)
        await asyncio.to_thread(server.port)
        restart_s = time.monotonic() - restarted
        ids, integrity = stored_ratings(server.db_path)
        trial_acked = {a for c in clients for a in c.acked}
        result = KillTrial(
            acked=len(trial_acked),
            lost=len(acked_all - set(ids)),
            duplicated=len(ids) - len(set(ids)),
            integrity=integrity,
            restart_s=restart_s,
        )
        results.append(result)
        if log is not None:
            log(f"kill -9 trial {trial + 1}/{trials}: {result}")
    server.stop()
    return results
