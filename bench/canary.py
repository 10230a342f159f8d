"""What a canary beside live costs: 8 sessions on one version against 4 live + 4 canary at once.

    python bench/canary.py [--rounds 2] [--max-new-tokens 128] [--rules runs,lowest]

The llamacpp engine (the default model's GGUF, Q8_0, every other setting at the engine's
default), in process, no gateway. A random LoRA adapter (r=16 on every projection, as
``bench/serve.py`` makes it) is converted and loaded as the canary version. Each block sends 8
replies at once (bench/serve.py's long prompts, tagged so that no cached prefix serves them,
greedy) and measures the aggregate decode rate (every token over the wall time of the block):

  * ``same``: 8 replies on ``base``;
  * ``mixed``: 4 on ``base`` and 4 on the canary, arriving in turn (base, canary, base, ...),
    as a canary's share of live traffic does.

``--rules`` names how a new reply's KV slot (its llama.cpp sequence id) is chosen:
``runs`` is the engine's rule (``server/engines/kvreuse.py::choose_slot``: each version keeps a
run of consecutive ids), ``lowest`` the rule before it (the lowest free slot: arrivals in turn
interleave the two versions' ids, and llama.cpp puts only consecutive ids in one micro-batch),
swapped in for this bench to measure against (``KvBook.choose_slot``). Blocks run A B B A over the rules, ``--rounds``
times, each rule doing ``same`` then ``mixed``. Prints the aggregates, mixed/same per rule
(issue 19: at least 0.8), and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serve import LONG_PROMPTS, make_adapter
from server.engines import LlamaCppEngine, SamplingConfig, choose_slot
from training.models import default_cache_dir, default_gguf, resolve_model

RUNS = choose_slot


def lowest(active: dict[int, str], n_active: int, version: str, preferred: Any = ()) -> int:
    """The rule before ``choose_slot``: the lowest free slot, whatever the version."""
    return min(s for s in range(n_active) if s not in active)


RULES = {"runs": RUNS, "lowest": lowest}


async def block(engine: LlamaCppEngine, versions: list[str], tag: str, max_new: int) -> float:
    """``len(versions)`` replies at once, the i-th on ``versions[i]``: aggregate tokens/s."""
    sampling = SamplingConfig(max_new_tokens=max_new, temperature=0.0)

    async def one(i: int, version: str) -> int:
        n = 0
        chat = [{"role": "user", "content": f"({tag} #{i}) {LONG_PROMPTS[i % len(LONG_PROMPTS)]}"}]
        async for chunk in engine.stream(chat, version=version, sampling=sampling):
            n = chunk.n_tokens
        return n

    started = time.perf_counter()
    tokens = await asyncio.gather(*(one(i, v) for i, v in enumerate(versions)))
    return sum(tokens) / (time.perf_counter() - started)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--rules", default="runs,lowest")
    args = ap.parse_args()
    rules = args.rules.split(",")
    if not rules or any(r not in RULES for r in rules):
        ap.error(f"--rules: a comma-separated list of {', '.join(RULES)}")
    model_dir = resolve_model("smollm2-135m-instruct")
    engine = LlamaCppEngine(
        str(default_gguf()),
        quant="q8_0",
        base_model_dir=model_dir,
        cache_dir=default_cache_dir(),
        max_new_tokens=args.max_new_tokens,
    )
    await asyncio.to_thread(engine.load)
    results: dict[str, dict[str, list[float]]] = {r: {"same": [], "mixed": []} for r in rules}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            adapter = await asyncio.to_thread(make_adapter, model_dir, Path(tmp) / "canary")
            await engine.load_adapter("canary", str(adapter))
            await block(engine, ["base", "canary"] * 4, "warm-up", args.max_new_tokens)
            order = [*rules, *reversed(rules)]
            for k in range(args.rounds):
                for j, rule in enumerate(order):
                    engine.kv.choose_slot = RULES[rule]
                    tag = f"round {k} block {j}"
                    results[rule]["same"].append(await block(engine, ["base"] * 8, tag, args.max_new_tokens))
                    results[rule]["mixed"].append(
                        await block(engine, ["base", "canary"] * 4, tag + " mixed", args.max_new_tokens)
                    )
                    print(
                        f"round {k + 1} {rule:>6}: same {results[rule]['same'][-1]:6.1f} tok/s, "
                        f"mixed {results[rule]['mixed'][-1]:6.1f} tok/s",
                        flush=True,
                    )
    finally:
        await asyncio.to_thread(engine.close)
    med = {r: {k: statistics.median(v) for k, v in results[r].items()} for r in rules}
    print(f"{'rule':>6} {'same tok/s':>11} {'mixed tok/s':>12} {'mixed/same':>11}")
    for r in rules:
        print(f"{r:>6} {med[r]['same']:>11.1f} {med[r]['mixed']:>12.1f} {med[r]['mixed'] / med[r]['same']:>11.2f}")
    print(
        json.dumps(
            {
                r: {
                    "same_agg_tps_8": round(med[r]["same"], 2),
                    "mixed_agg_tps_8": round(med[r]["mixed"], 2),
                    "ratio": round(med[r]["mixed"] / med[r]["same"], 3),
                }
                for r in rules
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
