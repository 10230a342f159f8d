"""TTFT of turns 1..N of one conversation with a long system prompt: KV reuse against full prefills.

    python bench/turns.py [--turns 6] [--rounds 2] [--max-new-tokens 32]

The llamacpp engine (the default model's GGUF, Q8_0), in process, no gateway. One conversation
of ``--turns`` turns with a system prompt of about 600 tokens, greedy: the time from the call
to the first token of each reply. Two engines are loaded side by side, one with KV reuse (the
default) and one without (``kv_reuse=False``, flash attention off too, so the two differ only
in reuse); they run interleaved A B B A (``--rounds`` times), so the machine's drift hits both
alike. Each run is a new conversation: with reuse, only the system prompt's cells come from an
earlier one (kept after the first run). Prints each turn's TTFT (median over the runs) per side and the ratio, then one JSON line.
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


async def conversation(engine: LlamaCppEngine, turns: int, max_new: int, run: int) -> list[float]:
    """One new conversation (its first message names the run: only the system prompt is shared)."""
    chat: list[dict[str, str]] = []
    ttfts = []
    sampling = SamplingConfig(max_new_tokens=max_new, temperature=0.0)
    for i, q in enumerate(QUESTIONS[:turns]):
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
    args = ap.parse_args()
    engines = {}
    for name, reuse in (("reuse", True), ("full", False)):
        e = LlamaCppEngine(
            str(default_gguf()),
            quant="q8_0",
            base_model_dir=resolve_model("smollm2-135m-instruct"),
            cache_dir=default_cache_dir(),
            max_new_tokens=args.max_new_tokens,
            max_active=4,
            kv_reuse=reuse,
            flash_attn=False,
            system_prompt=SYSTEM,
        )
        await asyncio.to_thread(e.load)
        engines[name] = e
    print(f"system prompt: {len(engines['reuse'].prompt_ids([]))} tokens")
    runs: dict[str, list[list[float]]] = {"reuse": [], "full": []}
    try:
        for k in range(args.rounds):
            for j, name in enumerate(("reuse", "full", "full", "reuse")):  # A B B A
                runs[name].append(await conversation(engines[name], args.turns, args.max_new_tokens, 4 * k + j))
    finally:
        for e in engines.values():
            await asyncio.to_thread(e.close)
    med = {k: [statistics.median(r[t] for r in v) for t in range(args.turns)] for k, v in runs.items()}
    print(f"{'turn':>4} {'reuse s':>8} {'full s':>8} {'full/reuse':>10}")
    for t in range(args.turns):
        print(f"{t + 1:>4} {med['reuse'][t]:>8.3f} {med['full'][t]:>8.3f} {med['full'][t] / med['reuse'][t]:>10.2f}")
    print(
        json.dumps(
            {"ttft_reuse_s": [round(x, 3) for x in med["reuse"]], "ttft_full_s": [round(x, 3) for x in med["full"]]}
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
