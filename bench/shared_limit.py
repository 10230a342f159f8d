"""The shared rating limit's cost through the gateway: one ``learnloop serve`` on PostgreSQL, a burst.

    python bench/shared_limit.py [--rounds 3] [--clients 200] [--ratings 2000] [--store-url postgresql://...]

``bench/load.py``'s burst phase (``--clients`` websocket clients, each with its conversation,
release ``--ratings`` ratings at once, every rating sent without waiting for the last ack) run
against a fresh schema in ``--store-url`` twice per round, alternating: ``off`` with
``server.ratings_per_minute = 0`` (no check) and ``shared`` with the limit on but too high to
refuse (each rating checked in ``store.limits``, as on a PostgreSQL store with several
processes). Prints each run's durable acks/s, p99 ack latency and the server's CPU per ack.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import load
from bench.store_burst import drop_schema, fresh_schema
from tests.factories import build_tiny_model


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--ratings", type=int, default=2000)
    parser.add_argument("--store-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    plain_env = load.env_for
    results: dict[str, list[dict[str, float]]] = {"off": [], "shared": []}
    with tempfile.TemporaryDirectory(prefix="shared-limit-") as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "tiny")
        try:
            for r in range(args.rounds):
                for mode in ("off", "shared"):
                    os.environ["LEARNLOOP_STORE_URL"] = fresh_schema(args.store_url)
                    per_minute = "0" if mode == "off" else "100000000"
                    load.env_for = lambda n, pm=per_minute: {  # type: ignore[assignment]
                        **plain_env(n),
                        "LEARNLOOP_SERVER_RATINGS_PER_MINUTE": pm,
                    }
                    found = await load.burst_phase(root / f"{mode}{r}", model, args.clients, args.ratings, None)
                    results[mode].append(found)
                    print(
                        f"round {r + 1} {mode:6}: {found['acks_per_s']:.0f} acks/s, p99 {found['burst_ack_p99_ms']:.0f} ms,"
                        f" server {found['server_cpu_us_per_ack']:.0f} us CPU/ack, {found['burst_acked']:.0f} acked",
                        flush=True,
                    )
        finally:
            os.environ.pop("LEARNLOOP_STORE_URL", None)
            drop_schema(args.store_url)
    for key in ("acks_per_s", "burst_ack_p99_ms", "server_cpu_us_per_ack"):
        print(key, {mode: round(statistics.median(r[key] for r in runs)) for mode, runs in results.items()})


if __name__ == "__main__":
    asyncio.run(main())
