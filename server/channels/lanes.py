"""A worker over stored rows in lanes: the inbox's events and the outbox's calls both run this way.

Rows of one lane (one chat, one thread) are handled one at a time, oldest first; different
lanes run side by side, up to ``concurrency``. The rows are in the store, so the worker keeps
no state that a restart could lose: each round asks the store which lane heads are due.
Rows pending longer than ``max_age_s`` are given up first. ``wake()`` starts a round at once
(new rows were written); otherwise the worker sleeps until the next row is due (at most
``poll_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Generic, Protocol, TypeVar

log = logging.getLogger("learnloop.channels")


class LaneRow(Protocol):
    @property
    def id(self) -> int: ...

    @property
    def lane(self) -> str: ...


R = TypeVar("R", bound=LaneRow)


class LaneWorker(ABC, Generic[R]):
    def __init__(self, *, name: str, concurrency: int, max_age_s: float, poll_s: float = 5.0) -> None:
        self.name = name
        self.concurrency = concurrency
        self.max_age_s = max_age_s
        self.poll_s = poll_s
        self._wake = asyncio.Event()
        self._running: dict[str, asyncio.Task[None]] = {}  # lane -> its row in progress
        self._task: asyncio.Task[None] | None = None

    # --- what a subclass provides ----------------------------------------------------------

    @abstractmethod
    async def due(self, now: float, *, skip_lanes: Iterable[str], limit: int) -> list[R]: ...

    @abstractmethod
    async def next_due_at(self) -> float | None: ...

    @abstractmethod
    async def give_up(self, *, older_than: float) -> None: ...

    @abstractmethod
    async def handle(self, row: R) -> None:
        """Work on one row; record the result in the store (done, failed, or when to try again)."""

    # --- the loop ----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    def wake(self) -> None:
        self._wake.set()

    async def stop(self, *, grace_s: float = 2.0) -> None:
        """Take no more rows; rows in progress get ``grace_s`` to finish, then are cancelled (they
        stay pending in the store and are taken again at the next start)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        running = list(self._running.values())
        if running:
            _, pending = await asyncio.wait(running, timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                wait = await self._round()
            except Exception:
                log.exception("%s: a round failed; trying again", self.name)
                wait = self.poll_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def _round(self) -> float:
        """Start the rows that are due; how long to sleep unless woken."""
        now = time.time()
        await self.give_up(older_than=now - self.max_age_s)
        free = self.concurrency - len(self._running)
        if free > 0:
            for row in await self.due(now, skip_lanes=list(self._running), limit=free):
                self._running[row.lane] = asyncio.create_task(self._work(row), name=f"{self.name}-{row.id}")
        next_due = await self.next_due_at()
        return self.poll_s if next_due is None else min(self.poll_s, max(0.01, next_due - time.time()))

    async def _work(self, row: R) -> None:
        try:
            await self.handle(row)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: row %d failed; it stays pending", self.name, row.id)
            await asyncio.sleep(self.poll_s)  # its lane waits: the store may be failing, do not spin
        finally:
            self._running.pop(row.lane, None)
            self._wake.set()
