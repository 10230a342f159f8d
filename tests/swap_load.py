"""Hot swap under load (issue 15, scenario 17), shared by ``tests/test_swap.py`` and ``bench/swap.py``.

A real ``App`` (gateway, console, release, transformers engine on the tiny random Llama, greedy)
and ``sessions`` websocket clients on loopback in this process. Every session asks one question,
then regenerates its latest reply again and again until the swaps are over, so every reply's
context is that one question: what a version writes for it is known (greedy), and a reply that
mixed two versions, or was cut short, reads differently. Meanwhile real PEFT LoRA adapters
``v1``..``vN`` are promoted one after another through the console's API (``Release.promote``),
a new one each time ``sessions // 3`` more replies have ended (the load sets the pace, not a
clock), so replies queued on a version are still waiting when it leaves the loaded set. Last,
the live version is rolled back through the console's API while the sessions still stream.

``model.max_pending`` is raised above ``sessions``: every reply is queued, none refused, so the
promise is checked on every reply (a refusal would be counted in ``overloaded``).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect

from server.app import App
from server.engines import SamplingConfig, TransformersEngine
from server.settings import load_settings
from tests.factories import register_candidate
from tests.test_engine import make_adapter

QUESTIONS = (
    "Where is my order?",
    "What is your refund policy?",
    "How long does shipping take?",
    "How do I reset my password?",
)


@dataclass
class ReplySeen:
    """One reply as its client saw it."""

    session: int
    question: str
    message_id: str = ""
    text: str = ""
    version: str = ""
    finish_reason: str = ""
    completion_tokens: int = -1
    sent_at: float = 0.0
    first_token_at: float | None = None
    done_at: float | None = None
    error: str | None = None  # the error frame's code, when the reply got one
    foreign_tokens: int = 0  # token frames naming another message


@dataclass
class SwapRun:
    """What happened: the replies, the swaps, the rollback and the engine's record of unloads."""

    sessions: int
    swaps: list[tuple[str, float, float]] = field(default_factory=list)  # (version, called, returned)
    replies: list[ReplySeen] = field(default_factory=list)
    connection_errors: list[str] = field(default_factory=list)
    rollback_from: str = ""
    rollback_to: str = ""
    rollback_called: float = 0.0
    rollback_returned: float = 0.0
    rollback_first_token: float | None = None  # the first token on rollback_to after the call (any reply)
    rollback_first_asked: float | None = None  # the first token of a reply on rollback_to asked after the call
    rollback_first_done: float | None = None
    stored: dict[str, tuple[str, str, int | None, str]] = field(default_factory=dict)  # id -> text, version, n, reason
    stored_nul: str = "\x00"  # what the store keeps for a NUL in a reply: PostgreSQL's text keeps U+FFFD
    expected: dict[tuple[str, str], str] = field(default_factory=dict)  # (version, question) -> greedy reply
    unloaded: dict[str, int] = field(default_factory=dict)  # version -> replies it had ended when freed
    ended: dict[str, int] = field(default_factory=dict)  # version -> replies ended on it (engine)
    still_loaded: set[str] = field(default_factory=set)
    took_s: float = 0.0

    @property
    def accepted(self) -> list[ReplySeen]:
        return [r for r in self.replies if r.error != "overloaded"]

    @property
    def overloaded(self) -> int:
        return sum(1 for r in self.replies if r.error == "overloaded")

    def failed(self) -> list[ReplySeen]:
        """Accepted replies that did not end with a normal ``done`` (stop or length)."""
        return [r for r in self.accepted if r.error is not None or r.finish_reason not in ("stop", "length")]

    def wrong_text(self) -> list[ReplySeen]:
        """Replies whose text is not what their version writes for their question (mixed or truncated)."""
        return [r for r in self.accepted if r.error is None and self.expected.get((r.version, r.question)) != r.text]

    def not_as_stored(self) -> list[ReplySeen]:
        """Replies whose streamed text, version, token count or finish reason differ from the store's row."""
        return [
            r
            for r in self.accepted
            if r.error is None
            and self.stored.get(r.message_id)
            != (r.text.replace("\x00", self.stored_nul), r.version, r.completion_tokens, r.finish_reason)
        ]

    def late_unloads(self) -> dict[str, tuple[int, int]]:
        """Versions freed before all their replies had ended: version -> (ended when freed, replies on it)."""
        on = {v: sum(1 for r in self.replies if r.version == v) for v in self.unloaded}
        return {v: (n, on[v]) for v, n in self.unloaded.items() if n != on[v] or self.ended.get(v, 0) != on[v]}

    def old_after_rollback(self) -> list[ReplySeen]:
        """Replies asked for once the rollback call had returned that still came from the version rolled back."""
        return [r for r in self.replies if r.version == self.rollback_from and r.sent_at >= self.rollback_returned]

    def in_flight_at_rollback(self) -> int:
        """Replies on the version rolled back, asked before the call and ended after it: those already
        decoding then finish on it (at most ``model.max_active``); the queued ones start on the
        version rolled back to."""
        return sum(
            1
            for r in self.replies
            if r.version == self.rollback_from
            and r.sent_at < self.rollback_called
            and (r.done_at or 0.0) > self.rollback_called
        )

    def started_on_old_after_rollback(self) -> list[ReplySeen]:
        """Replies on the version rolled back whose first text came after the call returned: only
        those the engine had already taken up (decoding, at most ``model.max_active``), since the
        queued ones start on the version rolled back to. (Replies that started while the call
        ran, before the store had the rollback, rightly began on the version then live.)"""
        return [
            r
            for r in self.replies
            if r.version == self.rollback_from and (r.first_token_at or r.done_at or 0.0) >= self.rollback_returned
        ]

    def figures(self) -> dict[str, Any]:
        pauses = [returned - called for _, called, returned in self.swaps]
        waits = sorted(r.first_token_at - r.sent_at for r in self.accepted if r.first_token_at is not None)
        return {
            "sessions": self.sessions,
            "swaps": len(self.swaps),
            "replies": len(self.replies),
            "accepted": len(self.accepted),
            "overloaded": self.overloaded,
            "failed": len(self.failed()),
            "wrong_text": len(self.wrong_text()),
            "not_as_stored": len(self.not_as_stored()),
            "versions_per_reply_max": 1 if not self.wrong_text() else 2,
            "unloaded": len(self.unloaded),
            "late_unloads": len(self.late_unloads()),
            "promote_call_max_s": round(max(pauses, default=0.0), 3),
            "rollback_call_s": round(self.rollback_returned - self.rollback_called, 3),
            "in_flight_at_rollback": self.in_flight_at_rollback(),
            "started_on_old_after_rollback": len(self.started_on_old_after_rollback()),
            "old_after_rollback": len(self.old_after_rollback()),
            "rollback_first_token_s": None
            if self.rollback_first_token is None
            else round(self.rollback_first_token - self.rollback_called, 3),
            "rollback_first_asked_s": None
            if self.rollback_first_asked is None
            else round(self.rollback_first_asked - self.rollback_called, 3),
            "rollback_first_done_s": None
            if self.rollback_first_done is None
            else round(self.rollback_first_done - self.rollback_called, 3),
            "first_token_p50_s": round(waits[len(waits) // 2], 3) if waits else None,  # any reply: the queue's wait
            "first_token_p99_s": round(waits[min(len(waits) - 1, int(0.99 * len(waits)))], 3) if waits else None,
            "took_s": round(self.took_s, 1),
        }


def swap_settings(model_dir: Path, data_dir: Path, *, sessions: int, max_new_tokens: int, max_active: int) -> Any:
    return load_settings(
        env={},
        data_dir=data_dir,
        overrides={
            "console": {"port": 0},
            "channels": {"port": 0, "enabled": False},
            # every session connects from 127.0.0.1: no per-address cap (100 by default refused 400 of 500)
            "server": {"port": 0, "rate_per_s": 1000.0, "rate_burst": 1000, "max_connections_per_address": 0},
            "model": {
                "name": str(model_dir),
                "engine": "transformers",
                "dtype": "float32",
                "temperature": 0.0,
                "max_new_tokens": max_new_tokens,
                "max_pending": sessions + max_active,  # every reply queues: none is refused
                "max_active": max_active,
            },
            "schedule": {"enabled": False, "version_poll_s": 0.5},
            "canary": {"share": 0.0},
        },
    )


class _Session:
    """One client: one question, then regenerations of its latest reply until told to stop."""

    def __init__(self, k: int, run: SwapRun, stop: asyncio.Event) -> None:
        self.k = k
        self.run = run
        self.stop = stop
        self.question = QUESTIONS[k % len(QUESTIONS)]

    async def go(self, port: int) -> None:
        """Converse until told to stop; after a failed reply, start a new conversation (the load goes on)."""
        try:
            while not self.stop.is_set():
                await self._conversation(port)
        except Exception as exc:  # a dropped connection is a failure the test reports
            self.run.connection_errors.append(f"session {self.k}: {type(exc).__name__}: {exc}")

    async def _conversation(self, port: int) -> None:
        async with connect(f"ws://127.0.0.1:{port}", max_queue=None) as ws:
            await ws.send(json.dumps({"type": "hello", "user": f"s{self.k}"}))
            while json.loads(await ws.recv())["type"] != "ready":
                pass
            frame: dict[str, Any] = {"type": "message", "text": self.question, "client_id": f"c{self.k}"}
            while True:
                reply = await self._one(ws, frame)
                if reply.error == "overloaded":
                    await asyncio.sleep(0.5)
                    continue
                if reply.error is not None or self.stop.is_set():
                    return
                frame = {"type": "regenerate", "message_id": reply.message_id}

    async def _one(self, ws: Any, frame: dict[str, Any]) -> ReplySeen:
        seen = ReplySeen(self.k, self.question, sent_at=time.monotonic())
        self.run.replies.append(seen)
        await ws.send(json.dumps(frame))
        deltas: list[str] = []
        while True:
            got = json.loads(await ws.recv())
            if got["type"] == "token":
                if seen.first_token_at is None:
                    seen.first_token_at = time.monotonic()
                    seen.message_id = got["message_id"]
                if got["message_id"] != seen.message_id:
                    seen.foreign_tokens += 1
                deltas.append(got["delta"])
            elif got["type"] == "done":
                seen.done_at = time.monotonic()
                seen.text = "".join(deltas)
                seen.version = got["model_version"]
                seen.finish_reason = got["finish_reason"]
                seen.completion_tokens = got["usage"]["completion_tokens"]
                if seen.message_id and got["message_id"] != seen.message_id:
                    seen.foreign_tokens += 1
                seen.message_id = got["message_id"]
                return seen
            elif got["type"] == "error":
                seen.error = got["code"]
                return seen


async def run_swap(
    model_dir: Path,
    work: Path,
    *,
    sessions: int,
    swaps: int,
    max_new_tokens: int = 12,
    max_active: int = 16,
) -> SwapRun:
    """Run the scenario on a fresh data folder under ``work``; returns what it saw."""
    adapters = [make_adapter(model_dir, work / "adapters" / f"a{i}", seed=100 + i) for i in range(1, swaps + 1)]
    app = App(
        swap_settings(model_dir, work / "data", sessions=sessions, max_new_tokens=max_new_tokens, max_active=max_active)
    )
    run = SwapRun(sessions)
    started = time.monotonic()
    async with app.lifespan():
        assert app.store is not None and app.release is not None and app.engine is not None
        assert app.port is not None and app.console_port is not None
        await app.store.accounts.add_operator("ops", "correct-horse-9", "admin", actor="bench")
        token = await app.store.accounts.create_token("ops", label="swap", actor="bench")
        names = [await register_candidate(app.store, a, str(model_dir)) for a in adapters]
        stop = asyncio.Event()
        clients = [_Session(k, run, stop) for k in range(sessions)]
        tasks = [asyncio.create_task(c.go(app.port)) for c in clients]
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{app.console_port}", headers={"Authorization": f"Bearer {token}"}, timeout=120
        ) as console:
            await _until(lambda: len(run.replies) >= sessions)  # every session has asked
            for name in names:
                called = time.monotonic()
                response = await console.post(f"/api/v1/versions/{name}/promote")
                assert response.status_code == 200, response.text
                run.swaps.append((name, called, time.monotonic()))
                ended = _ended(run)  # counted from here: every version serves replies before the next comes
                await _until(lambda ended=ended: _ended(run) >= ended + max(1, sessions // 3))
            run.rollback_from, run.rollback_to = names[-1], names[-2] if len(names) > 1 else "base"
            run.rollback_called = time.monotonic()
            response = await console.post(f"/api/v1/versions/{run.rollback_from}/rollback")
            run.rollback_returned = time.monotonic()
            assert response.status_code == 200, response.text
            await _until(lambda: _first_on(run, run.rollback_to, run.rollback_called, asked_after=True) is not None)
            stop.set()
        await asyncio.gather(*tasks)
        first = _first_on(run, run.rollback_to, run.rollback_called)
        asked = _first_on(run, run.rollback_to, run.rollback_called, asked_after=True)
        assert first is not None and asked is not None
        run.rollback_first_token, run.rollback_first_done = first.first_token_at, first.done_at
        run.rollback_first_asked = asked.first_token_at
        run.took_s = time.monotonic() - started
        stats = app.engine.stats
        run.unloaded, run.ended = dict(stats.unloaded), dict(stats.replies_ended)
        run.still_loaded = set(app.engine.versions)
        if type(app.store.db).__name__ == "PostgresDatabase":
            run.stored_nul = "\ufffd"
        for r in run.accepted:
            if r.message_id:
                m = await app.store.conversations.get_message(r.message_id)
                run.stored[r.message_id] = (m.text, m.model_version or "", m.n_tokens, str(m.finish_reason))
    run.expected = await _expected(model_dir, adapters, names, app.sampling)
    return run


def _ended(run: SwapRun) -> int:
    return sum(1 for r in run.replies if r.done_at is not None or r.error is not None)


def _first_on(run: SwapRun, version: str, after: float, *, asked_after: bool = False) -> ReplySeen | None:
    """The reply on ``version`` with the earliest first token after ``after``: any reply (queued ones
    included), or with ``asked_after`` one asked after it."""
    on = [
        r
        for r in run.replies
        if r.version == version
        and r.done_at is not None
        and (r.sent_at >= after if asked_after else (r.first_token_at or r.done_at) >= after)
    ]
    return min(on, key=lambda r: r.first_token_at or r.done_at or 0.0, default=None)


async def _until(condition: Any, timeout: float = 900.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the load stalled")
        await asyncio.sleep(0.02)


async def _expected(
    model_dir: Path, adapters: list[Path], names: list[str], sampling: SamplingConfig
) -> dict[tuple[str, str], str]:
    """What each version writes for each question (greedy), one reply at a time from an engine of its own."""
    engine = TransformersEngine(str(model_dir), dtype="float32")
    await asyncio.to_thread(engine.load)
    out: dict[tuple[str, str], str] = {}

    async def reply(question: str, version: str) -> str:
        history = [{"role": "user", "content": question}]
        return "".join([c.delta async for c in engine.stream(history, version=version, sampling=sampling)])

    try:
        for question in QUESTIONS:
            out[("base", question)] = await reply(question, "base")
        for adapter, name in zip(adapters, names, strict=True):
            await engine.load_adapter(name, str(adapter))
            for question in QUESTIONS:
                out[(name, question)] = await reply(question, name)
    finally:
        await asyncio.to_thread(engine.close)
    return out
