"""A rating burst on the store itself, SQLite against PostgreSQL in the same run.

    python bench/store_burst.py [--ratings 5000] [--rounds 3] [--store-url postgresql://...]

Each round opens a fresh store per backend (a SQLite file in a temporary folder; a fresh schema
``store_burst`` in ``--store-url``'s database, default the local server's ``postgres``), makes
200 replies, then asks for ``--ratings`` ratings at once (``asyncio.gather`` of
``store.conversations.add_rating``: the group commit takes what is queued) and times each call
from the burst's start to its acknowledgement (after COMMIT). Prints acks/s, the p50 and p99
ack latency, the number of commits, and PostgreSQL's figures as a ratio of SQLite's in the same
round. The backends alternate, SQLite first. ``postgresql+limit`` is PostgreSQL again with the
rating limit shared by the server processes checked before each rating, as the gateway does
(``server.limiters.SharedLimiter``: one statement on ``store.limits``' own connection; the limit
high enough that all pass). ``serial_ms`` is the median of 200 ratings asked one after the other
(check and rating), after the burst.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from feedback import FeedbackStore, Role
from server.limiters import SharedLimiter

REPLIES = 200


async def burst(target: str | Path, tombstones: Path, n: int, *, limit: bool = False) -> dict[str, float]:
    store = await FeedbackStore.open(target, tombstone_path=tombstones)
    limiter = SharedLimiter(store, "ratings", per_minute=60.0 * 10 * n, burst=10 * n) if limit else None
    try:
        for i in range(REPLIES):
            await store.conversations.create(f"c{i}")
            await store.conversations.add_message(
                message_id=f"u{i}", conversation_id=f"c{i}", role=Role.USER, text="q", parent_id=None
            )
            await store.conversations.add_message(
                message_id=f"a{i}", conversation_id=f"c{i}", role=Role.ASSISTANT, text="a", parent_id=f"u{i}"
            )
        commits = store.db.commits
        started = time.perf_counter()
        latencies: list[float] = []

        async def rate(k: int) -> None:
            if limiter is not None:
                assert await limiter.check(f"r{k}") is None
            await store.conversations.add_rating(
                message_id=f"a{k % REPLIES}", value=1, rater=f"r{k}", client_id=f"k{k}"
            )
            latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(rate(k) for k in range(n)))
        wall = time.perf_counter() - started
        latencies.sort()
        serial: list[float] = []
        for k in range(n, n + 200):
            one = time.perf_counter()
            await rate(k)
            serial.append(time.perf_counter() - one)
        return {
            "serial_ms": 1000 * statistics.median(serial),
            "acks_per_s": n / wall,
            "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[int(len(latencies) * 0.99) - 1],
            "commits": store.db.commits - commits,
        }
    finally:
        await store.close()


def fresh_schema(url: str) -> str:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS store_burst CASCADE")
        conn.execute("CREATE SCHEMA store_burst")
    return url + ("&" if "?" in url else "?") + "options=" + urllib.parse.quote("-csearch_path=store_burst")


def drop_schema(url: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS store_burst CASCADE")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratings", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--store-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {"sqlite": [], "postgresql": [], "postgresql+limit": []}
    try:
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory(prefix="store-burst-") as tmp:
                db = Path(tmp) / "learnloop.db"
                results["sqlite"].append(await burst(db, Path(tmp) / "erasures", args.ratings))
                url = fresh_schema(args.store_url)
                results["postgresql"].append(await burst(url, Path(tmp) / "erasures", args.ratings))
                url = fresh_schema(args.store_url)
                results["postgresql+limit"].append(await burst(url, Path(tmp) / "erasures", args.ratings, limit=True))
    finally:
        drop_schema(args.store_url)
    print(f"{args.ratings} ratings at once, {args.rounds} rounds (median; each round's figures in brackets)")
    for key in ("acks_per_s", "p50_ms", "p99_ms", "commits", "serial_ms"):
        base = statistics.median(r[key] for r in results["sqlite"])
        for backend, runs in results.items():
            med = statistics.median(r[key] for r in runs)
            digits = 2 if key == "serial_ms" else 0
            rounds = ", ".join(f"{r[key]:.{digits}f}" for r in runs)
            print(f"{key:11} {backend:16} {med:9.{digits}f}  x{med / base:.2f}  ({rounds})")


if __name__ == "__main__":
    asyncio.run(main())
