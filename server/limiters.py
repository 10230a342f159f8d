"""Rate limits as the gateway, the channels and the console ask them: ``await limiter.check(key)``.

Two kinds, one rule (``server/ratelimit.py``'s token bucket: ``per_minute`` a minute, ``burst``
at once; ``per_minute`` None disables the limit):

- ``LocalLimiter``: the buckets in this process's memory (a SQLite store: one process);
- ``SharedLimiter``: the buckets in PostgreSQL (``store.limits``), so that a rater or a login
  name has one budget across every server process on the store. A check is one statement on a
  connection of its own, outside the group commit, on an unlogged table (measured per rating in
  bench/RESULTS.md, "Several processes: the shared limits"). When the store cannot answer,
  the check lets the request through: the request's own write then meets the same store.

``rate_limiter(store, scope, ...)`` picks the kind for the store.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from feedback import FeedbackStore, StoreError
from server.ratelimit import KeyedRateLimiter

log = logging.getLogger("learnloop.ratelimit")

PRUNE_EVERY_S = 60.0  # the app deletes the refilled buckets of every scope this often (store.limits.prune)


class RateLimiter(Protocol):
    async def check(self, key: str) -> float | None:
        """None if allowed (and counted), else the seconds until it would be."""
        ...


class LocalLimiter:
    """Token buckets in this process's memory."""

    def __init__(self, per_minute: float | None, burst: int = 30) -> None:
        self.buckets = KeyedRateLimiter(per_minute=per_minute, burst=burst)

    async def check(self, key: str) -> float | None:
        return self.buckets.check(key, time.monotonic())


class SharedLimiter:
    """Token buckets in PostgreSQL, one per (``scope``, key), shared by every process on the store."""

    def __init__(self, store: FeedbackStore, scope: str, per_minute: float | None, burst: int = 30) -> None:
        self.store = store
        self.scope = scope
        self.per_minute = per_minute
        self.burst = max(1, burst)

    async def check(self, key: str) -> float | None:
        if self.per_minute is None:
            return None
        try:
            retry_after = await self.store.limits.take(self.scope, key, rate=self.per_minute / 60.0, burst=self.burst)
        except StoreError as exc:  # fail open: the request's own write meets the same store
            log.warning("the shared rate limit %r could not be checked: %s", self.scope, exc)
            return None
        return retry_after


def rate_limiter(store: FeedbackStore, scope: str, per_minute: float | None) -> RateLimiter:
    """The limiter for ``store``: shared on PostgreSQL, in memory on SQLite; ``burst`` is a minute's worth."""
    per_minute = per_minute or None  # 0 disables, as None
    burst = max(1, int(per_minute or 1))
    if store.limits.shared:
        return SharedLimiter(store, scope, per_minute, burst)
    return LocalLimiter(per_minute, burst)
