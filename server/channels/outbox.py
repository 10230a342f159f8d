"""Delivers the outbox: every call to an IM platform, tried until it is done or given up.

The rows live in the store (``feedback.outbox``), so nothing waiting is lost when the
platform is down or the server restarts: the worker starts with whatever is pending. It
takes the oldest pending row of each lane (a chat, a thread: replies arrive in order; other
lanes go on meanwhile), up to ``outbox.concurrency`` at once, and for each:

1. ``begin_attempt`` is committed (the row is *uncertain* from here);
2. the platform's call (``Platform.deliver``);
3. on success ``delivered`` is committed at once, nothing in between; on a failure the next
   try is scheduled with exponential backoff and jitter (``backoff_s``; a platform's
   ``Retry-After`` or ``retry_after`` is honoured), or the row fails for good when the
   platform refuses it (a bad request, a blocked bot, 410 Gone).

A row pending longer than ``outbox.max_age_s`` is given up: marked failed and logged, and
``learnloop outbox`` lists it (``learnloop outbox retry ID`` queues it again).

Exactly once. A row is delivered at least once: it stays pending until a success is
committed. It is delivered at most once when its platform can tell a repeat, which only
matters for an attempt interrupted between 1 and 3 (the row is still uncertain):

- a Standard Webhooks receiver gets the same ``webhook-id`` again and drops it;
- Slack: the message carries its row's key in ``metadata``; ``conversations.replies`` is
  asked for it before posting again (``chat.update`` is idempotent anyway);
- Telegram edits are idempotent ("message is not modified" counts as delivered); a
  ``sendMessage`` cannot be checked (the Bot API has no idempotency key and no history), so
  one interrupted in that window (Telegram answered, our commit did not happen, or the answer
  timed out) is sent again: the reply can then appear twice. The window is one HTTP answer
  plus one SQLite commit; streamed replies end with an edit and are outside it.

A refused connection is certainly not delivered (the row is no longer uncertain), so an
outage, however long, never causes a repeat.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping

from feedback import FeedbackStore
from feedback.outbox import OutboxRow
from server.channels.config import OutboxConfig
from server.channels.im import Delivered, Failed, Outcome, Platform, Retry
from server.channels.lanes import LaneWorker

log = logging.getLogger("learnloop.channels.outbox")


def backoff_s(failures: int, *, min_s: float, max_s: float, rand: float) -> float:
    """Wait after ``failures`` failed tries: ``min_s`` doubling up to ``max_s``, drawn from the upper
    half of that window (``rand`` in [0, 1)) so that many rows failing together spread out."""
    window = min(max_s, min_s * 2.0 ** max(0, failures - 1))
    return window / 2 + rand * window / 2


def next_attempt_at(
    now: float, failures: int, *, retry_after: float | None, min_s: float, max_s: float, rand: float
) -> float:
    """When to try again: the backoff, or later when the platform said so."""
    wait = backoff_s(failures, min_s=min_s, max_s=max_s, rand=rand)
    return now + max(wait, retry_after or 0.0)


class OutboxWorker(LaneWorker[OutboxRow]):
    """Delivers pending outbox rows until stopped; ``wake()`` when new rows were queued."""

    def __init__(
        self,
        store: FeedbackStore,
        platforms: Mapping[tuple[str, str], Platform],
        config: OutboxConfig,
        *,
        rand: Callable[[], float] = random.random,
    ) -> None:
        super().__init__(name="outbox", concurrency=config.concurrency, max_age_s=config.max_age_s)
        self.store = store
        self.platforms = platforms
        self.config = config
        self._rand = rand

    async def due(self, now: float, *, skip_lanes: Iterable[str], limit: int) -> list[OutboxRow]:
        return await self.store.outbox.due(now, skip_lanes=skip_lanes, limit=limit)

    async def next_due_at(self) -> float | None:
        return await self.store.outbox.next_due_at()

    async def give_up(self, *, older_than: float) -> None:
        for row in await self.store.outbox.give_up(created_before=older_than):
            log.error(
                "outbox row %d (%s %s/%s %s) given up after %d attempts: %s",
                row.id, row.channel, row.site, row.method, row.key, row.attempts, row.last_error,
            )  # fmt: skip

    async def handle(self, row: OutboxRow) -> None:
        platform = self.platforms.get((row.channel, row.site))
        if platform is None:
            await self.store.outbox.fail(row.id, error=f"no [{_table(row.channel)}.{row.site}] is configured")
            log.error("outbox row %d: no [%s.%s] is configured; marked failed", row.id, _table(row.channel), row.site)
            return
        await self.store.outbox.begin_attempt(row.id)
        outcome: Outcome
        try:
            outcome = await platform.deliver(row)
        except Exception as exc:  # a bug: keep the row, try again later
            log.exception("outbox row %d: delivery raised", row.id)
            outcome = Retry(f"{type(exc).__name__}: {exc}", uncertain=True)
        if isinstance(outcome, Delivered):
            await self.store.outbox.delivered(row.id, outcome.response)
        elif isinstance(outcome, Retry):
            failures = row.attempts + 1
            at = next_attempt_at(
                time.time(),
                failures,
                retry_after=outcome.retry_after,
                min_s=self.config.min_backoff_s,
                max_s=self.config.max_backoff_s,
                rand=self._rand(),
            )
            await self.store.outbox.retry_later(row.id, error=outcome.error, at=at, uncertain=outcome.uncertain)
            log.warning(
                "outbox row %d (%s %s): %s; next try in %.1f s",
                row.id, row.channel, row.method, outcome.error, at - time.time(),
            )  # fmt: skip
        else:
            assert isinstance(outcome, Failed)
            await self.store.outbox.fail(row.id, error=outcome.error)
            log.error("outbox row %d (%s %s/%s) refused: %s", row.id, row.channel, row.site, row.method, outcome.error)


def _table(channel: str) -> str:
    return "webhooks" if channel == "webhook" else channel
