"""Serving while the loop trains: 1 and 4 sessions through the real gateway, idle and during a real run.

    python bench/train_serve.py [--variants off,nice] [--max-steps 12] [--singles 4] [--rounds 3]
                                [--max-new-tokens 128] [--conversations 16]

The server runs as ``make serve`` runs it (the llamacpp engine, SmolLM2-135M-Instruct requantized to
Q8_0, every core to llama.cpp), greedy, on a store seeded with bench/cycle.py's conversations (each
reply corrected by an operator and rated down). The serving measurement: ``--singles`` replies one
after another, each in a new session, then ``--rounds`` rounds of 4 sessions at once (LONG_PROMPTS
of bench/serve.py, so every reply runs to ``--max-new-tokens``): aggregate tokens/s (tokens over
the wall time from the send to the last ``done``) and TTFT p50/p95 per level.

For each variant, a setting of the training job:

    off            training.nice 0, training.threads 0 (the job at the server's priority, torch's threads)
    nice           training.nice 19 (the default)
    threads1       training.threads 1
    nice+threads1  both

the serving measurement runs idle first, then a real training run starts on the server's store (the
cycle the scheduler runs: ``python -m training.train`` in a subprocess, ``--max-steps`` DPO steps,
evaluation, the gate; the gate is set to reject so that every run starts from the same live
version), the same measurement runs once its first step is logged, the run goes on to its end,
and the idle measurement runs again. Each variant's ratios are against its idle figures before
and after the run (the mean throughput, the worse TTFT p95), so that drift in the machine's speed
hits both sides alike. A run's seconds are the whole cycle's, under the same serving work in
every variant, so their difference is what the variant costs the training time.
The load average (1 minute) is printed beside each phase: other processes on the machine count.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from bench.cycle import seed
from bench.serve import pct, sessions_at_once
from server.app import App
from server.settings import load_settings

VARIANTS: dict[str, dict[str, int]] = {
    "off": {"nice": 0, "threads": 0},
    "nice": {"nice": 19, "threads": 0},
    "threads1": {"nice": 0, "threads": 1},
    "nice+threads1": {"nice": 19, "threads": 1},
}


def load1() -> float:
    return os.getloadavg()[0]


async def measure(port: int, singles: int, rounds: int) -> dict[str, dict[str, float]]:
    """Aggregate tokens/s and TTFT p50/p95 at 1 session (``singles`` replies) and 4 (``rounds`` rounds)."""
    out: dict[str, dict[str, float]] = {}
    for n, repeats in ((1, singles), (4, rounds)):
        tokens, wall, ttfts = 0, 0.0, []
        for _ in range(repeats):
            t, w, f, _ = await sessions_at_once(port, n)
            print(f"  {n} session(s): {t} tokens in {w:.1f} s, TTFT {' '.join(f'{x:.2f}' for x in f)} s", flush=True)
            tokens, wall, ttfts = tokens + t, wall + w, ttfts + f
        out[str(n)] = {
            "agg_tps": tokens / wall,
            "ttft_p50_s": pct(ttfts, 0.5),
            "ttft_p95_s": pct(ttfts, 0.95),
            "replies": len(ttfts),
        }
    return out


async def training_run(app: App, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """A real cycle with ``variant``'s job settings; the serving measurement once its first step is logged."""
    assert app.trainer is not None and app.port is not None
    cycle = app.trainer.cycle
    train = dataclasses.replace(cycle.config.train, **VARIANTS[variant])
    cycle.config = dataclasses.replace(cycle.config, train=train)
    stepping = asyncio.Event()
    steps: list[int] = []

    def on_progress(event: dict[str, Any]) -> None:
        steps.append(int(event.get("step") or 0))
        stepping.set()

    cycle.on_progress = on_progress
    started = time.monotonic()
    run = asyncio.create_task(cycle.run(force=True))
    waiter = asyncio.create_task(stepping.wait())
    await asyncio.wait({run, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if run.done():
        raise RuntimeError(f"the training run ended before its first step: {run.result()}")
    first_step_s = time.monotonic() - started
    load_before, steps_before = load1(), steps[-1]
    serving = await measure(app.port, args.singles, args.rounds)
    overlapped = cycle.job_pid is not None  # the job still ran when the measurement ended
    steps_during = steps[-1] - steps_before
    result = await run
    seconds = time.monotonic() - started
    version = await app.store.versions.get(result.version) if result.version and app.store else None
    budget = ((version.eval_report if version else None) or {}).get("budget") or {}
    return {
        "serving": serving,
        "load1": round((load_before + load1()) / 2, 2),
        "run_seconds": round(seconds, 1),
        "train_seconds": budget.get("train_seconds"),
        "first_step_s": round(first_step_s, 1),
        "steps": budget.get("steps"),
        "steps_during_measurement": steps_during,
        "overlapped": overlapped,
        "status": str(result.status),
        "job": {"nice": budget.get("nice"), "threads": budget.get("threads")},
    }


async def bench(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    settings = load_settings(
        env={},
        data_dir=data_dir,
        overrides={
            "console": {"port": 0},
            "channels": {"port": 0},
            "server": {"port": 0, "rate_per_s": 1000.0},
            "model": {"engine": "llamacpp", "max_new_tokens": args.max_new_tokens, "temperature": 0.0},
            "schedule": {"enabled": False, "version_poll_s": 3600.0, "min_new_feedback": 1, "heldout_fraction": 0.2},
            "training": {"max_steps": args.max_steps},
            "gate": {"min_reward_margin": 1e9},  # every run rejected: each variant trains from the same live
        },
    )
    app = App(settings)
    results: dict[str, Any] = {}
    async with app.lifespan():
        assert app.store is not None and app.port is not None and app.trainer is not None
        await seed(app.store, app.trainer.cycle.config.base_model, args.conversations)
        await measure(app.port, 1, 1)  # warm-up
        for variant in args.variants:
            load = load1()
            idle = await measure(app.port, args.singles, args.rounds)
            print(f"[{variant}] idle: {fmt(idle)} (load {load:.2f})", flush=True)
            during = await training_run(app, variant, args)
            print(f"[{variant}] training: {fmt(during['serving'])} (load {during['load1']:.2f})", flush=True)
            after_load = load1()
            after = await measure(app.port, args.singles, args.rounds)
            print(f"[{variant}] idle after: {fmt(after)} (load {after_load:.2f})", flush=True)
            results[variant] = {
                "idle": {n: mean_of(idle[n], after[n]) for n in idle},
                "idle_load1": round((load + after_load) / 2, 2),
                **during,
            }
    return results


def mean_of(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Idle before and after a run, together: drift in the machine's speed (other processes) over
    the run hits the idle side as it hits the training side. Throughput is the mean of the two;
    TTFT p95 the worse."""
    return {
        "agg_tps": (before["agg_tps"] + after["agg_tps"]) / 2,
        "ttft_p50_s": (before["ttft_p50_s"] + after["ttft_p50_s"]) / 2,
        "ttft_p95_s": max(before["ttft_p95_s"], after["ttft_p95_s"]),
        "replies": before["replies"] + after["replies"],
    }


def fmt(m: dict[str, dict[str, float]]) -> str:
    return "; ".join(f"{n}: {v['agg_tps']:.1f} tok/s, TTFT p95 {v['ttft_p95_s'] * 1000:.0f} ms" for n, v in m.items())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="off,nice", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--max-steps", type=int, default=12, help="training.max_steps of each run")
    parser.add_argument("--singles", type=int, default=4, help="replies at 1 session per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of 4 sessions per measurement")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--conversations", type=int, default=16, help="seeded corrected conversations")
    args = parser.parse_args()
    args.variants = args.variants.split(",")
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}: use {', '.join(VARIANTS)}")
    print(f"cores {os.cpu_count()}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        results = asyncio.run(bench(args, Path(tmp)))
    header = (
        f"{'variant':>14} {'sessions':>8} {'idle tok/s':>10} {'train tok/s':>11} {'ratio':>6} "
        f"{'TTFT p95 idle':>13} {'TTFT p95 train':>14} {'run s':>6} {'load':>5}"
    )
    print(header)
    summary: dict[str, Any] = {"variants": {}}
    for variant, r in results.items():
        row: dict[str, Any] = {
            "run_seconds": r["run_seconds"],
            "train_seconds": r["train_seconds"],
            "steps": r["steps"],
            "overlapped": r["overlapped"],
            "job": r["job"],
            "load1_idle": r["idle_load1"],
            "load1_training": r["load1"],
        }
        for n in ("1", "4"):
            idle, busy = r["idle"][n], r["serving"][n]
            ratio = busy["agg_tps"] / idle["agg_tps"]
            print(
                f"{variant:>14} {n:>8} {idle['agg_tps']:>10.1f} {busy['agg_tps']:>11.1f} {ratio:>6.2f} "
                f"{idle['ttft_p95_s'] * 1000:>11.0f}ms {busy['ttft_p95_s'] * 1000:>12.0f}ms "
                f"{r['run_seconds']:>6.0f} {r['load1']:>5.2f}"
            )
            row[f"idle_tps_{n}"] = round(idle["agg_tps"], 2)
            row[f"train_tps_{n}"] = round(busy["agg_tps"], 2)
            row[f"ratio_{n}"] = round(ratio, 3)
            row[f"ttft_p95_idle_{n}_s"] = round(idle["ttft_p95_s"], 3)
            row[f"ttft_p95_train_{n}_s"] = round(busy["ttft_p95_s"], 3)
        summary["variants"][variant] = row
    summary["bench_seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
