"""Hot swap under load (scenario 17 of docs/reliability.md) at the issue's size: 500 sessions, 10 swaps.

The scenario is ``tests/swap_load.py`` (the slow test ``tests/test_swap.py`` runs it with 100
sessions): a real ``App`` in this process with the tiny random Llama (greedy), ``--sessions``
websocket clients on loopback, each asking one question and then regenerating its reply until
the swaps end, while ``--swaps`` real PEFT LoRA adapters are promoted one after another through
the console's API, then the last one is rolled back the same way. It prints the figures and ends
with one JSON line: replies, failed (no ``done`` with stop or length), wrong_text (not what the
reply's version writes: mixed or cut short), not_as_stored, late_unloads (an adapter freed before
its last reply ended), rollback_call_s and rollback_first_token_s (from the rollback call to the
first token of a reply on the version rolled back to, every session still streaming).

    python bench/swap.py                          # 500 sessions, 10 swaps
    python bench/swap.py --sessions 100           # the slow test's size
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.factories import build_tiny_model
from tests.swap_load import run_swap


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--swaps", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=12, help="tokens per reply (greedy)")
    parser.add_argument("--max-active", type=int, default=16, help="replies decoding at once (model.max_active)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="learnloop-swap-") as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "tiny")
        run = await run_swap(
            model,
            root / "run",
            sessions=args.sessions,
            swaps=args.swaps,
            max_new_tokens=args.max_new_tokens,
            max_active=args.max_active,
        )
    figures = run.figures()
    figures["connection_errors"] = len(run.connection_errors)
    figures["versions_seen"] = len({r.version for r in run.accepted})
    figures["rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    for version, n in sorted(run.unloaded.items(), key=lambda kv: int(kv[0].lstrip("v") or 0)):
        print(f"{version}: freed after its {n} replies had ended ({run.ended.get(version, 0)} ended on it in all)")
    for version, (freed_after, on_it) in run.late_unloads().items():
        print(f"{version}: freed after {freed_after} replies ended, {on_it} seen on it by the clients")
    for r in (run.failed() + run.wrong_text())[:5]:
        print("bad reply:", r)
    for error in run.connection_errors[:5]:
        print("connection error:", error)
    print(
        f"{args.sessions} sessions x {args.swaps} swaps: {figures['accepted']} replies, {figures['failed']} failed, "
        f"{figures['wrong_text']} not their version's text, {figures['late_unloads']} adapters freed early, "
        f"{figures['connection_errors']} connection errors; "
        f"rollback: call {figures['rollback_call_s']} s, first token on {run.rollback_to} "
        f"{figures['rollback_first_token_s']} s after the call (of a reply asked after it: "
        f"{figures['rollback_first_asked_s']} s), {figures['in_flight_at_rollback']} replies ended on {run.rollback_from} "
        "after the call",
        flush=True,
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    asyncio.run(main())
