"""Rate limits shared by the server processes on one PostgreSQL store (``store.limits``).

A token bucket per (scope, key) in the table ``rate_buckets``, with the rule of
``server/ratelimit.py``'s ``TokenBucket`` (``burst`` tokens at most, ``rate`` a second, one per
request, starts full) written as one ``INSERT ... ON CONFLICT DO UPDATE``: PostgreSQL locks the
key's row for the statement, so two processes taking at once take two tokens, never the same
one. The clock is the database's (``clock_timestamp()``), one for every process.

The statement runs on a connection of its own (``Database.counter``), in autocommit with
``synchronous_commit = off`` on an ``UNLOGGED`` table: a check waits for no group commit and no
disk flush; a crash of the database forgets the buckets (they start full again), which a rate
limit can afford. Only PostgreSQL has it: one process on SQLite keeps its buckets in memory.
"""

from __future__ import annotations

from feedback.db import Database

# the bucket after ``now``: refilled (never past burst, never backwards), less one token if one is there
_TAKE = """
INSERT INTO rate_buckets AS b (scope, key, tokens, updated, full_at, allowed)
SELECT s.scope, s.key, s.burst - 1, s.now, s.now + 1 / s.rate, TRUE
FROM (SELECT %(scope)s::text AS scope, %(key)s::text AS key, %(burst)s::float8 AS burst, %(rate)s::float8 AS rate,
             COALESCE(%(now)s::float8, EXTRACT(EPOCH FROM clock_timestamp())::float8) AS now) AS s
ON CONFLICT (scope, key) DO UPDATE SET
    tokens = LEAST(%(burst)s, b.tokens + GREATEST(0, excluded.updated - b.updated) * %(rate)s)
             - CASE WHEN LEAST(%(burst)s, b.tokens + GREATEST(0, excluded.updated - b.updated) * %(rate)s) >= 1
                    THEN 1 ELSE 0 END,
    allowed = LEAST(%(burst)s, b.tokens + GREATEST(0, excluded.updated - b.updated) * %(rate)s) >= 1,
    updated = GREATEST(b.updated, excluded.updated),
    full_at = GREATEST(b.updated, excluded.updated) + (%(burst)s - LEAST(%(burst)s,
              b.tokens + GREATEST(0, excluded.updated - b.updated) * %(rate)s)
              + CASE WHEN LEAST(%(burst)s, b.tokens + GREATEST(0, excluded.updated - b.updated) * %(rate)s) >= 1
                     THEN 1 ELSE 0 END) / %(rate)s
RETURNING tokens, allowed
"""


class Limits:
    """Token buckets in the database, shared by every process on it (``store.limits``; PostgreSQL only)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @property
    def shared(self) -> bool:
        """True when the database can hold them (PostgreSQL); SQLite's one process keeps its own."""
        return self._db.backend == "postgresql"

    async def take(self, scope: str, key: str, *, rate: float, burst: float, now: float | None = None) -> float | None:
        """Take a token from (scope, key): None when allowed, else the seconds until a token is there.

        ``rate``: tokens a second (> 0); ``burst``: the most a bucket holds (>= 1); ``now``: unix
        seconds, the database's clock when None (tests pass their own).
        """
        found = await self._db.counter(
            _TAKE, {"scope": scope, "key": key, "rate": rate, "burst": float(burst), "now": now}
        )
        tokens, allowed = float(found[0][0]), bool(found[0][1])
        return None if allowed else (1.0 - tokens) / rate

    async def prune(self, now: float | None = None) -> int:
        """Forget the buckets that have refilled (they would start full anyway); returns how many."""
        found = await self._db.counter(
            "WITH gone AS (DELETE FROM rate_buckets"
            " WHERE full_at <= COALESCE(%(now)s::float8, EXTRACT(EPOCH FROM clock_timestamp())::float8)"
            " RETURNING 1) SELECT count(*) FROM gone",
            {"now": now},
        )
        return int(found[0][0])
