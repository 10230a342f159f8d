"""A rating burst on the store itself, SQLite against PostgreSQL in the same run.

    python bench/store_burst.py [--ratings 5000] [--rounds 3] [--store-url postgresql://...]

Each round opens a fresh store per backend (a SQLite file in a temporary folder; a fresh schema
``store_burst`` in ``--store-url``'s database, default the local server's ``postgres``), makes
200 replies, then asks for ``--ratings`` ratings at once (``asyncio.gather`` of
``store.conversations.add_rating``: the group commit takes what is queued) and times each call
from the burst's start to its acknowledgement (after COMMIT). Prints acks/s, the p50 and p99
ack latency, the number of commits, and PostgreSQL's figures as a ratio of SQLite's in the same
round. The backends alternate, SQLite first.
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

REPLIES = 200


async def burst(target: str | Path, tombstones: Path, n: int) -> dict[str, float]:
    store = await FeedbackStore.open(target, tombstone_path=tombstones)
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
            await store.conversations.add_rating(
                message_id=f"a{k % REPLIES}", value=1, rater=f"r{k}", client_id=f"k{k}"
            )
            latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(rate(k) for k in range(n)))
        wall = time.perf_counter() - started
        latencies.sort()
        return {
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
    results: dict[str, list[dict[str, float]]] = {"sqlite": [], "postgresql": []}
    try:
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory(prefix="store-burst-") as tmp:
                db = Path(tmp) / "learnloop.db"
                results["sqlite"].append(await burst(db, Path(tmp) / "erasures", args.ratings))
                url = fresh_schema(args.store_url)
                results["postgresql"].append(await burst(url, Path(tmp) / "erasures", args.ratings))
    finally:
        drop_schema(args.store_url)
    print(f"{args.ratings} ratings at once, {args.rounds} rounds (median; each round's figures in brackets)")
    for key in ("acks_per_s", "p50_ms", "p99_ms", "commits"):
        base = statistics.median(r[key] for r in results["sqlite"])
        for backend, runs in results.items():
            med = statistics.median(r[key] for r in runs)
            rounds = ", ".join(f"{r[key]:.0f}" for r in runs)
            print(f"{key:11} {backend:10} {med:9.0f}  x{med / base:.2f}  ({rounds})")


if __name__ == "__main__":
    asyncio.run(main())
