"""Rate limits shared by the server processes on one PostgreSQL store (``store.limits``).

A token bucket per (scope, key) in the table ``rate_buckets``, with the rule of
``server/ratelimit.py``'s ``TokenBucket`` (``burst`` tokens at most, ``rate`` a second, one per
request, starts full) written as one ``INSERT ... ON CONFLICT DO UPDATE``: PostgreSQL locks a
key's row for the statement, so two processes taking at once take two tokens, never the same
one. The clock is the database's (``clock_timestamp()``), one for every process.

The statement runs on a connection of its own (``Database.counter``), in autocommit with
``synchronous_commit = off`` on an ``UNLOGGED`` table: a check waits for no group commit and no
disk flush; a crash of the database forgets the buckets (they start full again), which a rate
limit can afford. The checks asked while one statement runs go together in the next (one
statement, one round trip, for up to ``max_batch`` distinct keys; a key asked twice waits for
the statement after), as the writer's group commit does for writes: a burst of ratings costs a
few statements, not one round trip each. Only PostgreSQL has it: one process on SQLite keeps its
buckets in memory (``server/limiters.py``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from feedback.db import Database

# each bucket after ``now``: refilled (never past burst, never backwards), less one token if one is there
_REFILLED = "LEAST(excluded.burst, b.tokens + GREATEST(0, excluded.updated - b.updated) * excluded.rate)"
_TAKEN = f"CASE WHEN {_REFILLED} >= 1 THEN 1 ELSE 0 END"
_TAKE = f"""
INSERT INTO rate_buckets AS b (scope, key, rate, burst, tokens, updated, full_at, allowed)
SELECT u.scope, u.key, u.rate, u.burst, u.burst - 1, u.now, u.now + 1 / u.rate, TRUE
FROM (SELECT scope, key, rate, burst, COALESCE(at, EXTRACT(EPOCH FROM clock_timestamp())::float8) AS now
      FROM unnest(%(scopes)s::text[], %(keys)s::text[], %(rates)s::float8[], %(bursts)s::float8[], %(ats)s::float8[])
           AS r(scope, key, rate, burst, at)) AS u
ON CONFLICT (scope, key) DO UPDATE SET
    rate = excluded.rate,
    burst = excluded.burst,
    tokens = {_REFILLED} - {_TAKEN},
    allowed = {_REFILLED} >= 1,
    updated = GREATEST(b.updated, excluded.updated),
    full_at = GREATEST(b.updated, excluded.updated) + (excluded.burst - {_REFILLED} + {_TAKEN}) / excluded.rate
RETURNING scope, key, tokens, allowed
"""


@dataclass
class _Ask:
    scope: str
    key: str
    rate: float
    burst: float
    now: float | None
    answer: asyncio.Future[float | None]


class Limits:
    """Token buckets in the database, shared by every process on it (``store.limits``; PostgreSQL only)."""

    def __init__(self, db: Database, *, max_batch: int = 1000) -> None:
        self._db = db
        self._max_batch = max_batch
        self._asked: list[_Ask] = []
        self._taking: asyncio.Task[None] | None = None
        self.statements = 0  # how many statements the checks took (fewer than checks in a burst)

    @property
    def shared(self) -> bool:
        """True when the database can hold them (PostgreSQL); SQLite's one process keeps its own."""
        return self._db.backend == "postgresql"

    async def take(self, scope: str, key: str, *, rate: float, burst: float, now: float | None = None) -> float | None:
        """Take a token from (scope, key): None when allowed, else the seconds until a token is there.

        ``rate``: tokens a second (> 0); ``burst``: the most a bucket holds (>= 1); ``now``: unix
        seconds, the database's clock when None (tests pass their own).
        """
        answer: asyncio.Future[float | None] = asyncio.get_running_loop().create_future()
        self._asked.append(_Ask(scope, key, rate, float(burst), now, answer))
        if self._taking is None or self._taking.done():
            self._taking = asyncio.create_task(self._take_asked(), name="rate-limits")
        return await answer

    async def _take_asked(self) -> None:
        while self._asked:
            batch: list[_Ask] = []
            later: list[_Ask] = []
            keys: set[tuple[str, str]] = set()
            for ask in self._asked:  # a statement may change a row once: a key asked again waits
                if (ask.scope, ask.key) in keys or len(batch) >= self._max_batch:
                    later.append(ask)
                else:
                    keys.add((ask.scope, ask.key))
                    batch.append(ask)
            self._asked = later
            try:
                found = await self._db.counter(
                    _TAKE,
                    {
                        "scopes": [a.scope for a in batch],
                        "keys": [a.key for a in batch],
                        "rates": [a.rate for a in batch],
                        "bursts": [a.burst for a in batch],
                        "ats": [a.now for a in batch],
                    },
                )
            except Exception as exc:
                for ask in batch:
                    if not ask.answer.done():
                        ask.answer.set_exception(exc)
                continue
            self.statements += 1
            by_key = {(str(r[0]), str(r[1])): (float(r[2]), bool(r[3])) for r in found}
            for ask in batch:
                tokens, allowed = by_key[(ask.scope, ask.key)]
                if not ask.answer.done():
                    ask.answer.set_result(None if allowed else (1.0 - tokens) / ask.rate)

    async def prune(self, now: float | None = None) -> int:
        """Forget the buckets that have refilled (they would start full anyway); returns how many."""
        found = await self._db.counter(
            "WITH gone AS (DELETE FROM rate_buckets"
            " WHERE full_at <= COALESCE(%(now)s::float8, EXTRACT(EPOCH FROM clock_timestamp())::float8)"
            " RETURNING 1) SELECT count(*) FROM gone",
            {"now": now},
        )
        return int(found[0][0])
