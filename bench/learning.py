"""Does the loop learn? A simulated customer-service deployment and its satisfaction curve.

    python bench/learning.py [--cycles 3] [--out bench/out]

A fictional online shop (``bench/shop/policy.md``; 12 intents with training and held-out
paraphrases in ``bench/shop/intents.json``) runs on the real server (default model,
websockets on loopback). Each cycle:

1. simulated customers ask every training paraphrase on the live version and rate each
   reply by the published rubric (``bench/rater.py``);
2. a simulated operator writes the policy answer for ``--correct-share`` of the
   thumbs-down replies, as in the console, except for two intents they never correct
   (``gift_card``, ``stores``), which measure leakage;
3. the training job the scheduler runs (``Trainer.scheduled``) trains, gates and
   promotes a version;
4. the new live version answers every held-out paraphrase and a set of generic chat
   prompts; satisfaction is the share of thumbs up.

Prints, per version: held-out and training satisfaction, leaks, generic-chat perplexity,
cycle wall time; writes a PNG plot; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from websockets.asyncio.client import connect

from bench.rater import Intent, leaks, load_intents, rate
from server.app import App
from server.settings import load_settings
from training.evaluate import load_generic_chat

SYSTEM_PROMPT = "You are the customer-service assistant of Northwind Goods, an online shop. Answer briefly."
UNCORRECTED = ("gift_card", "stores")


async def converse(ws: Any, question: str, user: str) -> tuple[str, dict[str, Any]]:
    """Say hello, ask one question, collect the streamed reply: (reply text, done frame)."""
    await ws.send(json.dumps({"type": "hello", "user": user}))
    json.loads(await ws.recv())
    await ws.send(json.dumps({"type": "message", "text": question, "client_id": "q"}))
    parts: list[str] = []
    while True:
        frame = json.loads(await ws.recv())
        if frame["type"] == "token":
            parts.append(frame["delta"])
        elif frame["type"] == "done":
            return "".join(parts), frame
        elif frame["type"] == "error":
            raise RuntimeError(frame)


async def ask(port: int, question: str, user: str) -> tuple[str, str, str]:
    """One customer, one question, over a real websocket: (reply text, message id, version)."""
    async with connect(f"ws://127.0.0.1:{port}") as ws:
        reply, done = await converse(ws, question, user)
        return reply, done["message_id"], done["model_version"]


async def ask_and_rate(
    port: int, question: str, user: str, intent: Intent, intents: list[Intent], max_words: int, *, send_rating: bool
) -> tuple[bool, str, str, str]:
    async with connect(f"ws://127.0.0.1:{port}") as ws:
        reply, frame = await converse(ws, question, user)
        verdict = rate(intent, reply, intents, max_words)
        if send_rating:
            reason = None if verdict.up else verdict.reasons[0][:200]
            await ws.send(
                json.dumps(
                    {
                        "type": "rating",
                        "message_id": frame["message_id"],
                        "value": 1 if verdict.up else -1,
                        "id": "r",
                        "reason": reason,
                    }
                )
            )
            ack = json.loads(await ws.recv())
            assert ack["type"] == "ack", ack
        return verdict.up, reply, frame["message_id"], frame["model_version"]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    intents, max_words = load_intents()
    rng = random.Random(args.seed)
    generic = [g["prompt"][-1]["content"] for g in load_generic_chat()][: args.generic]
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(
            env={},
            data_dir=Path(tmp),
            overrides={
                "console": {"port": 0},
                "channels": {"port": 0},
                "server": {"port": 0, "rate_per_s": 1000.0, "ratings_per_minute": 100_000.0},
                "model": {
                    "name": args.model,
                    "max_new_tokens": args.max_new_tokens,
                    "temperature": 0.0,
                    "system_prompt": SYSTEM_PROMPT,
                },
                "schedule": {"enabled": False, "min_new_feedback": 1, "heldout_fraction": 0.2},
                "training": {
                    "max_steps": args.steps,
                    "learning_rate": args.lr,
                    "sft_weight": args.sft_weight,
                    "init_from": args.init_from,
                    "kto_steps": args.kto_steps,
                    "contrast_pairs": args.contrast,
                    "contrast_pick": args.contrast_pick,
                    "replay_pairs": args.replay,
                    "transplant_pairs": args.transplants,
                    "number_pairs": args.numbers,
                },
                "canary": {"share": 0.0},
            },
        )
        app = App(settings)
        async with app.lifespan():
            assert app.port is not None and app.store is not None
            port = app.port
            sem = asyncio.Semaphore(args.concurrency)

            async def limited(coro: Any) -> Any:
                async with sem:
                    return await coro

            async def evaluate(version: str) -> dict[str, Any]:
                jobs = [
                    limited(
                        ask_and_rate(port, q, f"eval-{version}-{i.id}-{k}", i, intents, max_words, send_rating=False)
                    )
                    for i in intents
                    for k, q in enumerate(i.heldout)
                ]
                results = await asyncio.gather(*jobs)
                pairs = [(i, q) for i in intents for q in i.heldout]
                ups = sum(r[0] for r in results)
                generic_replies = await asyncio.gather(
                    *(limited(ask(port, g, f"generic-{version}-{n}")) for n, g in enumerate(generic))
                )
                uncorrected_leaks = [
                    f"{q} -> {r[1]!r} ({', '.join(found)})"
                    for (i, q), r in zip(pairs, results, strict=True)
                    if i.id in UNCORRECTED and (found := leaks(r[1], intents, own=i.id))
                ]
                generic_leaks = [
                    f"{g} -> {text!r} ({', '.join(found)})"
                    for g, (text, _, _) in zip(generic, generic_replies, strict=True)
                    if (found := leaks(text, intents))
                ]
                uncorrected_ups = sum(r[0] for (i, _), r in zip(pairs, results, strict=True) if i.id in UNCORRECTED)
                served = {r[3] for r in results}
                assert served == {version}, served
                return {
                    "heldout": ups / len(results),
                    "heldout_uncorrected": uncorrected_ups / sum(1 for i, _ in pairs if i.id in UNCORRECTED),
                    "leaks_uncorrected": len(uncorrected_leaks),
                    "leaks_generic": len(generic_leaks),
                    "leak_examples": uncorrected_leaks + generic_leaks,
                    "samples": {f"{i.id}: {q}": r[1] for (i, q), r in list(zip(pairs, results, strict=True))[::6]},
                }

            by_version: dict[str, dict[str, Any]] = {"base": await evaluate("base")}
            print(f"base: held-out satisfaction {by_version['base']['heldout']:.0%}", flush=True)
            for cycle in range(1, args.cycles + 1):
                t0 = time.monotonic()
                live = app.release.live_version
                jobs = []
                for i in intents:
                    for k, q in enumerate(i.train):
                        jobs.append(
                            limited(
                                ask_and_rate(port, q, f"c{cycle}-{i.id}-{k}", i, intents, max_words, send_rating=True)
                            )
                        )
                results = await asyncio.gather(*jobs)
                asked = [(i, q) for i in intents for q in i.train]
                train_sat = sum(r[0] for r in results) / len(results)
                by_version[live]["train"] = train_sat
                corrected = 0
                for (intent, _q), (up, _reply, message_id, _v) in zip(asked, results, strict=True):
                    if not up and intent.id not in UNCORRECTED and rng.random() < args.correct_share:
                        await app.store.conversations.add_correction(
                            message_id=message_id, text=intent.answer, operator="sim-op"
                        )
                        corrected += 1
                result = await app.trainer.run(force=True)
                train_s = time.monotonic() - t0
                print(
                    f"cycle {cycle}: {live} training satisfaction {train_sat:.0%}, {corrected} corrections; "
                    f"training -> {result.status} {result.version} ({result.reason[:160]})",
                    flush=True,
                )
                version = app.release.live_version
                report = result.report or {}
                if report.get("base_generic_ppl"):
                    by_version["base"].setdefault("generic_ppl", report["base_generic_ppl"])
                if version not in by_version:
                    by_version[version] = await evaluate(version)
                    by_version[version]["generic_ppl"] = report.get("candidate", {}).get("generic_ppl")
                by_version[f"cycle{cycle}"] = {
                    "version": version,
                    "status": str(result.status),
                    "seconds": round(time.monotonic() - t0, 1),
                    "training_seconds": round(result.seconds, 1),
                    "feedback_seconds": round(train_s - result.seconds, 1),
                }
                print(
                    f"cycle {cycle}: live {version}, held-out satisfaction "
                    f"{by_version[version]['heldout']:.0%}, {time.monotonic() - t0:.0f} s",
                    flush=True,
                )
    versions = {k: v for k, v in by_version.items() if not k.startswith("cycle")}
    base = versions["base"]["heldout"]
    best = max(v["heldout"] for v in versions.values())
    ppls = {k: v.get("generic_ppl") for k, v in versions.items() if v.get("generic_ppl")}
    best_name = max(versions, key=lambda k: versions[k]["heldout"])
    summary = {
        "base": round(base, 3),
        "by_version": {k: round(v["heldout"], 3) for k, v in versions.items()},
        "train_by_version": {k: round(v["train"], 3) for k, v in versions.items() if "train" in v},
        "uncorrected_by_version": {k: round(v["heldout_uncorrected"], 3) for k, v in versions.items()},
        "leaks": {
            k: {"uncorrected": v["leaks_uncorrected"], "generic": v["leaks_generic"]} for k, v in versions.items()
        },
        "generic_ppl": {k: round(v, 3) for k, v in ppls.items()},
        "ppl_rise_best": round(ppls[best_name] / ppls["base"] - 1, 4) if best_name in ppls and "base" in ppls else None,
        "cycles": [by_version[f"cycle{c}"] for c in range(1, args.cycles + 1)],
        "best_gain_pp": round((best - base) * 100, 1),
        "minutes": round((time.monotonic() - started) / 60, 1),
        "samples": {k: v["samples"] for k, v in versions.items()},
        "leak_examples": {k: v["leak_examples"] for k, v in versions.items() if v["leak_examples"]},
    }
    return summary


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["by_version"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(names, [summary["by_version"][n] * 100 for n in names], marker="o", label="held-out paraphrases")
    train = summary["train_by_version"]
    ax.plot(
        [n for n in names if n in train],
        [train[n] * 100 for n in names if n in train],
        marker="s",
        linestyle="--",
        label="training paraphrases",
    )
    ax.plot(
        names,
        [summary["uncorrected_by_version"][n] * 100 for n in names],
        marker="^",
        linestyle=":",
        label="never-corrected intents",
    )
    ax.set_ylim(0, 100)
    ax.set_ylabel("satisfaction (% thumbs up)")
    ax.set_xlabel("model version")
    ax.set_title("Satisfaction by version (SmolLM2-135M-Instruct, 2 CPU cores)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--sft-weight", type=float, default=1.0)
    parser.add_argument("--init-from", choices=["base", "live"], default="base")
    parser.add_argument("--kto-steps", type=int, default=0)
    parser.add_argument("--contrast", type=int, default=3, help="training.contrast_pairs")
    parser.add_argument("--contrast-pick", choices=["hash", "live"], default="live", help="training.contrast_pick")
    parser.add_argument("--replay", type=int, default=20, help="training.replay_pairs")
    parser.add_argument(
        "--transplants", action=argparse.BooleanOptionalAction, default=True, help="training.transplant_pairs"
    )
    parser.add_argument("--numbers", type=int, default=0, help="training.number_pairs")
    parser.add_argument("--correct-share", type=float, default=0.5)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--generic", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/out")
    args = parser.parse_args()
    summary = asyncio.run(run(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "learning.json").write_text(json.dumps(summary, indent=2))
    try:
        plot(summary, out / "learning.png")
        print(f"plot: {out / 'learning.png'}")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
    samples = summary.pop("samples")
    for version, examples in summary.pop("leak_examples").items():
        for example in examples:
            print(f"  leak [{version}] {example}")
    for version, replies in samples.items():
        for question, reply in list(replies.items())[:3]:
            print(f"  [{version}] {question} -> {reply[:140]!r}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
