"""Why a concurrent greedy reply can differ from the same reply alone: batch composition, not KV reuse.

    python bench/kv_fork.py [--runs 6] [--reuse on|off]

The experiment behind the README's "KV reuse" (exactness). The llamacpp engine (the default
model's GGUF, Q8_0, flash attention off) and the random adapter v1 of the tests (nearly flat
logits: rounding flips its greedy choice easily). Each run sends two base and two v1 replies at
once, as ``tests/test_llamacpp_engine.py::test_versions_are_served_side_by_side`` does, and
compares each with the reply its version writes alone. For every run it prints whether they
match and the sequence ids each version decoded in: a v1 reply forks when the two v1 replies hold
consecutive sequence ids (llama.cpp then puts them in one micro-batch of two rows, which rounds
differently from the one row of a reply alone), with reuse on or off; the forked text is the
same with and without reuse.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.engines import LlamaCppEngine, SamplingConfig
from tests.test_engine import make_adapter
from training.models import default_cache_dir, default_gguf, resolve_model

GREEDY = SamplingConfig(max_new_tokens=16, temperature=0.0)
CHAT = [{"role": "user", "content": "What is your refund policy?"}]


class Logged(LlamaCppEngine):
    """Records each decode's version and sequence ids."""

    steps: list[tuple[str, list[int]]]

    def _step(self, group: list[Any], batch: Any) -> list[Any]:
        self.steps.append((group[0].version, sorted(r.seq for r in group)))
        return super()._step(group, batch)


async def collect(e: LlamaCppEngine, version: str) -> str:
    return "".join([c.delta async for c in e.stream(CHAT, version=version, sampling=GREEDY)])


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--reuse", choices=("on", "off"), default="off")
    args = ap.parse_args()
    model = resolve_model("smollm2-135m-instruct")
    adapter = make_adapter(Path(model), Path(tempfile.mkdtemp()) / "v1", seed=1)
    e = Logged(
        str(default_gguf()),
        quant="q8_0",
        base_model_dir=model,
        cache_dir=default_cache_dir(),
        max_prompt_tokens=256,
        max_new_tokens=64,
        max_active=4,
        kv_reuse=args.reuse == "on",
        flash_attn=False,
    )
    e.steps = []
    await asyncio.to_thread(e.load)
    try:
        alone = {"base": await collect(e, "base")}
        await e.load_adapter("v1", str(adapter))
        alone["v1"] = await collect(e, "v1")
        print(f"reuse {args.reuse}; alone: {alone}")
        for run in range(args.runs):
            e.steps.clear()
            versions = ["base", "v1", "base", "v1"]
            replies = await asyncio.gather(*(collect(e, v) for v in versions))
            seqs = sorted({s for v, ids in e.steps if v == "v1" for s in ids})
            forked = [r for v, r in zip(versions, replies, strict=True) if r != alone[v]]
            print(f"run {run}: v1 in sequences {seqs}: {'FORKED ' + repr(forked) if forked else 'same as alone'}")
    finally:
        await asyncio.to_thread(e.close)


if __name__ == "__main__":
    asyncio.run(main())
