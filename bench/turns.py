"""TTFT of turns 1..N of one conversation with a long system prompt: KV reuse against full prefills.

    python bench/turns.py [--turns 6] [--rounds 2] [--max-new-tokens 32] [--think-s 1.0]
                          [--sides settle,reuse,full]

The llamacpp engine (the default model's GGUF, Q8_0), in process, no gateway. One conversation
of ``--turns`` turns with a system prompt of about 750 tokens, greedy: the time from the call
to the first token of each reply. One engine per side, loaded side by side: ``settle`` (the
default: KV reuse, and each finished reply prefilled again over its decoded cells while the
engine is idle), ``reuse`` (reuse without settling, ``kv_settle=False``: a turn prefills the
previous reply again) and ``full`` (``kv_reuse=False``: every prompt whole). Flash attention is
off on all of them, so they differ only in reuse. The sides run interleaved (A B C C B A,
``--rounds`` times), so the machine's drift hits all alike. Between a reply's last token and
the next question the customer reads for ``--think-s`` seconds (the same on every side; 0 sends
the next question at once, and settling then races it). Each run is a new conversation: with
reuse, only the system prompt's cells come from an earlier one (kept after the first run).
Prints each turn's TTFT (median over the runs) per side and the ratios, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.engines import LlamaCppEngine, SamplingConfig
from training.models import default_cache_dir, default_gguf, resolve_model

SYSTEM = (
    "You are the customer support agent of Parcel & Co, an online shop that sells packaging, "
    "parcels, boxes, tape and labels to small businesses across Europe. "
) + " ".join(
    f"Rule {i}: answer questions about orders, deliveries, refunds, returns and invoices politely and "
    f"briefly, never promise a delivery date you cannot check, and ask for the order number first."
    for i in range(1, 19)
)
QUESTIONS = [
    "Hi, where is my parcel?",
    "It is order 48213, placed last Monday.",
    "Can I change the delivery address?",
    "What if nobody is at home?",
    "How do I return a damaged box?",
    "Will I get a refund to my card?",
    "Thanks. Do you ship to Norway?",
    "Last question: do you sell tape in bulk?",
]


async def conversation(engine: LlamaCppEngine, turns: int, max_new: int, run: int, think_s: float) -> list[float]:
    """One new conversation (its first message names the run: only the system prompt is shared)."""
    chat: list[dict[str, str]] = []
    ttfts = []
    sampling = SamplingConfig(max_new_tokens=max_new, temperature=0.0)
    for i, q in enumerate(QUESTIONS[:turns]):
        if i:
            await asyncio.sleep(think_s)  # the customer reads the reply and writes the next question
        chat.append({"role": "user", "content": f"(chat {run}) {q}" if i == 0 else q})
        started = time.perf_counter()
        first = None
        parts = []
        async for chunk in engine.stream(chat, version="base", sampling=sampling):
            if first is None:
                first = time.perf_counter() - started
            parts.append(chunk.delta)
        assert first is not None
        ttfts.append(first)
        chat.append({"role": "assistant", "content": "".join(parts)})
    return ttfts


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--think-s", type=float, default=1.0)
    ap.add_argument("--sides", default="settle,reuse,full")
    args = ap.parse_args()
    sides = args.sides.split(",")
    known = {"settle": (True, True), "reuse": (True, False), "full": (False, False)}
    if not sides or any(side not in known for side in sides):
        ap.error(f"--sides: a comma-separated list of {', '.join(known)}")
    engines = {}
    for name in sides:
        reuse, settle = known[name]
        e = LlamaCppEngine(
            str(default_gguf()),
            quant="q8_0",
            base_model_dir=resolve_model("smollm2-135m-instruct"),
            cache_dir=default_cache_dir(),
            max_new_tokens=args.max_new_tokens,
            max_active=4,
            kv_reuse=reuse,
            kv_settle=settle,
            flash_attn=False,
            system_prompt=SYSTEM,
        )
        await asyncio.to_thread(e.load)
        engines[name] = e
    print(f"system prompt: {len(engines[sides[0]].prompt_ids([]))} tokens; think {args.think_s} s between turns")
    runs: dict[str, list[list[float]]] = {name: [] for name in sides}
    order = [*sides, *reversed(sides)]  # A B C C B A
    try:
        for k in range(args.rounds):
            for j, name in enumerate(order):
                run = len(order) * k + j
                runs[name].append(await conversation(engines[name], args.turns, args.max_new_tokens, run, args.think_s))
    finally:
        for e in engines.values():
            await asyncio.to_thread(e.close)
    med = {k: [statistics.median(r[t] for r in v) for t in range(args.turns)] for k, v in runs.items()}
    first = sides[0]
    print(
        f"{'turn':>4} "
        + " ".join(f"{name + ' s':>9}" for name in sides)
        + " "
        + " ".join(f"{name + '/' + first:>13}" for name in sides[1:])
    )
    for t in range(args.turns):
        cells = " ".join(f"{med[name][t]:>9.3f}" for name in sides)
        ratios = " ".join(f"{med[name][t] / med[first][t]:>13.2f}" for name in sides[1:])
        print(f"{t + 1:>4} {cells} {ratios}")
    settled = {name: e.kv.settled_tokens for name, e in engines.items()}
    print(
        json.dumps(
            {"think_s": args.think_s, "settled_tokens": settled}
            | {f"ttft_{name}_s": [round(x, 3) for x in med[name]] for name in sides}
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
