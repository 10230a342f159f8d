"""Serving benchmark: single-stream and concurrent decode through the real websocket gateway.

    python bench/serve.py [--model smollm2-135m-instruct] [--dtype float32] [--max-new-tokens 128]
                          [--levels 1,4,8,16]

Measured in one run, on the same prompts:
  * baseline: ``model.generate`` called directly (no server), greedy, same dtype;
  * gateway: one websocket client, reply by reply (decode tokens/s after the first token, TTFT);
  * concurrency: N websocket sessions at once (each its own connection, one reply each),
    for each N in ``--levels``: aggregate tokens/s (all tokens over the wall time from the
    first send to the last ``done``), TTFT p50/p95, inter-token p95, and the ratio of the
    aggregate to the single-session aggregate of the same sweep;
  * swap: a LoRA adapter (r=16, all projections) loaded while a reply streams; the longest
    gap between two tokens of that reply against the p95 gap of steady decoding.
The last line is one JSON object with the figures.
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

from websockets.asyncio.client import connect  # noqa: E402

from server.app import App  # noqa: E402
from server.settings import load_settings  # noqa: E402
from training.models import resolve_model  # noqa: E402

# open-ended prompts: greedy replies run to the token limit, so every session decodes as long
LONG_PROMPTS = [
    "Write a detailed, friendly guide for a new customer on how to place an order, pay, track it and return it.",
    "Describe, step by step, everything a support agent should check when a parcel is reported missing.",
    "Write a long, warm apology letter to a customer whose order arrived late and damaged, with next steps.",
    "Explain in detail how our loyalty points work, how to earn them, spend them and what happens when they expire.",
]

PROMPTS = [
    "What is your refund policy?",
    "How long does shipping take to Canada?",
    "Explain in a few sentences how to reset a password.",
    "Write a short apology to a customer whose order arrived late.",
    "What are your support hours?",
]


def baseline_tps(model_path: str, dtype: str, max_new_tokens: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).eval()
    rates = []
    for prompt in PROMPTS:
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            model.generate(**ids, max_new_tokens=1, do_sample=False)  # prefill + first token
            started = time.perf_counter()
            out = model.generate(**ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
            elapsed = time.perf_counter() - started
        rates.append((out.shape[1] - ids["input_ids"].shape[1]) / elapsed)
    return statistics.median(rates)


def make_adapter(model_path: str, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets)).save_pretrained(out)
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))] if ordered else float("nan")


async def concurrent_level(port: int, sessions: int) -> dict[str, float]:
    """``sessions`` clients, each on its own connection, send one prompt at the same moment."""
    conns = [await connect(f"ws://127.0.0.1:{port}") for _ in range(sessions)]
    try:
        for ws in conns:
            await ws.send(json.dumps({"type": "hello"}))
            json.loads(await ws.recv())
        ttfts: list[float] = []
        gaps: list[float] = []
        tokens = 0

        async def one(ws: Any, i: int) -> None:
            nonlocal tokens
            await ws.send(
                json.dumps({"type": "message", "text": LONG_PROMPTS[i % len(LONG_PROMPTS)], "client_id": "c"})
            )
            sent, last = time.perf_counter(), None
            while True:
                frame = json.loads(await ws.recv())
                now = time.perf_counter()
                if frame["type"] == "token":
                    if last is None:
                        ttfts.append(now - sent)
                    else:
                        gaps.append(now - last)
                    last = now
                elif frame["type"] == "done":
                    tokens += frame["usage"]["completion_tokens"]
                    return
                elif frame["type"] == "error":
                    raise RuntimeError(frame)

        started = time.perf_counter()
        await asyncio.gather(*(one(ws, i) for i, ws in enumerate(conns)))
        wall = time.perf_counter() - started
    finally:
        for ws in conns:
            await ws.close()
    return {
        "sessions": sessions,
        "agg_tps": tokens / wall,
        "tokens": tokens,
        "wall_s": wall,
        "ttft_p50_s": pct(ttfts, 0.5),
        "ttft_p95_s": pct(ttfts, 0.95),
        "inter_token_p95_s": pct(gaps, 0.95),
    }


async def gateway_run(args: argparse.Namespace, data_dir: Path) -> dict[str, float]:
    settings = load_settings(
        env={},
        data_dir=data_dir,
        overrides={
            "console": {"port": 0},
            "server": {"port": 0, "rate_per_s": 1000.0},
            "model": {
                "name": args.model,
                "dtype": args.dtype,
                "max_new_tokens": args.max_new_tokens,
                "temperature": 0.0,
                "max_pending": max(64, 2 * max(args.levels)),
            },
            "schedule": {"enabled": False},
        },
    )
    app = App(settings)
    async with app.lifespan(), connect(f"ws://127.0.0.1:{app.port}") as ws:
        await ws.send(json.dumps({"type": "hello"}))
        json.loads(await ws.recv())
        rates, ttfts, gaps = [], [], []

        async def one(prompt: str, i: int) -> list[float]:
            await ws.send(json.dumps({"type": "message", "text": prompt, "client_id": str(i)}))
            sent = time.perf_counter()
            times: list[float] = []
            while True:
                frame = json.loads(await ws.recv())
                if frame["type"] == "token":
                    times.append(time.perf_counter())
                elif frame["type"] == "done":
                    n = frame["usage"]["completion_tokens"]
                    end = time.perf_counter()
                    if times and n > 1:
                        rates.append((n - 1) / (end - times[0]))
                        ttfts.append(times[0] - sent)
                    return times
                elif frame["type"] == "error":
                    raise RuntimeError(frame)

        for i, prompt in enumerate(PROMPTS):
            times = await one(prompt, i)
            gaps += [b - a for a, b in zip(times, times[1:], strict=False)]
        levels = {n: await concurrent_level(app.port, n) for n in args.levels}

        adapter = await asyncio.to_thread(make_adapter, resolve_model(args.model), data_dir / "bench-adapter")
        assert app.engine is not None
        task = asyncio.create_task(one(PROMPTS[3], 99))
        await asyncio.sleep(1.0)  # let it stream steadily first
        pause = await app.engine.load_adapter("bench", str(adapter))
        times = await task
        swap_gap = max(b - a for a, b in zip(times, times[1:], strict=False))
    gaps.sort()
    return {
        "levels": levels,  # type: ignore[dict-item]
        "gateway_single_tps": statistics.median(rates),
        "ttft_p50_s": statistics.median(ttfts),
        "inter_token_p95_s": gaps[int(0.95 * (len(gaps) - 1))],
        "swap_load_s": pause,
        "swap_max_gap_s": swap_gap,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--levels", default="1,4,8,16", help="concurrent sessions to measure, comma-separated")
    args = parser.parse_args()
    args.levels = [int(x) for x in args.levels.split(",")]
    model_path = resolve_model(args.model)
    base = baseline_tps(model_path, args.dtype, args.max_new_tokens)
    print(f"baseline model.generate single stream: {base:.1f} tok/s ({args.dtype})")
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(gateway_run(args, Path(tmp)))
    print(
        f"gateway single stream: {result['gateway_single_tps']:.1f} tok/s, "
        f"ratio to baseline {result['gateway_single_tps'] / base:.2f}"
    )
    print(f"TTFT p50 {result['ttft_p50_s'] * 1000:.0f} ms, inter-token p95 {result['inter_token_p95_s'] * 1000:.0f} ms")
    print(
        f"adapter hot-swap: load {result['swap_load_s'] * 1000:.0f} ms; longest gap in a reply streaming "
        f"through it {result['swap_max_gap_s'] * 1000:.0f} ms"
    )
    levels: dict[int, dict[str, float]] = result.pop("levels")  # type: ignore[assignment]
    single = levels[1]["agg_tps"] if 1 in levels else result["gateway_single_tps"]
    print(f"{'sessions':>8} {'agg tok/s':>10} {'ratio':>6} {'TTFT p50':>9} {'TTFT p95':>9} {'gap p95':>8}")
    for n, lv in levels.items():
        print(
            f"{n:>8} {lv['agg_tps']:>10.1f} {lv['agg_tps'] / single:>6.2f} {lv['ttft_p50_s'] * 1000:>7.0f}ms"
            f" {lv['ttft_p95_s'] * 1000:>7.0f}ms {lv['inter_token_p95_s'] * 1000:>6.0f}ms"
        )
    eight = levels.get(8)
    summary = {
        "engine": "transformers",
        "dtype": args.dtype,
        "baseline_single_tps": round(base, 2),
        **{k: round(v, 4) for k, v in result.items()},
        "ratio_to_baseline": round(result["gateway_single_tps"] / base, 3),
        "single_tps": round(single, 2),
        "agg_tps_8": round(eight["agg_tps"], 2) if eight else None,
        "ratio_8": round(eight["agg_tps"] / single, 2) if eight else None,
        "ttft_p95_8_s": round(eight["ttft_p95_s"], 3) if eight else None,
        "levels": {str(n): {k: round(v, 4) for k, v in lv.items()} for n, lv in levels.items()},
        "llamacpp_single_tps": None,  # the llama.cpp reference: not installed in this run
        "llamacpp_agg_tps_8": None,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
