"""One training cycle on CPU with the default model and the default training config.

    python bench/cycle.py [--conversations 16] [--max-steps 40]

Seeds a fresh store with customer-service conversations, each reply corrected by an
operator and rated down (so: DPO pairs, SFT demos, KTO rows), then runs one real
cycle (export -> TRL subprocess -> evaluation -> gate) and prints its wall time, the
training steps per second and the gate's figures. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from feedback import FeedbackStore, Role
from training.config import CycleConfig, TrainConfig
from training.cycle import TrainingCycle
from training.models import resolve_model

QA = [
    (
        "What is your refund policy?",
        "I'm not sure, maybe contact someone.",
        "You can return any item within 30 days of delivery for a full refund.",
    ),
    (
        "How long does shipping take?",
        "Shipping times vary a lot.",
        "Standard shipping takes 3 to 5 business days; express takes 1 to 2.",
    ),
    (
        "When is support open?",
        "We are always available.",
        "Support is open Monday to Friday, 9am to 6pm Central European Time.",
    ),
    (
        "How do I reset my password?",
        "Try to remember it.",
        "Click 'Forgot password' on the sign-in page and follow the link we email you.",
    ),
]


async def seed(store: FeedbackStore, model: str, conversations: int, prefix: str = "") -> None:
    """``conversations`` conversations, each reply corrected by an operator and rated down."""
    await store.versions.ensure_base(model)
    for i in range(conversations):
        question, bad, good = QA[i % len(QA)]
        cid = f"{prefix}c{i}"
        await store.conversations.create(cid, user_id=f"user{i}")
        u = await store.conversations.add_message(
            message_id=f"{prefix}u{i}",
            conversation_id=cid,
            role=Role.USER,
            text=f"{question} (order #{1000 + i})",
            parent_id=None,
        )
        a = await store.conversations.add_message(
            message_id=f"{prefix}a{i}",
            conversation_id=cid,
            role=Role.ASSISTANT,
            text=bad,
            parent_id=u.id,
            model_version="base",
        )
        await store.conversations.add_correction(message_id=a.id, text=good, operator="op")
        await store.conversations.add_rating(message_id=a.id, value=-1, rater=f"user{i}", client_id="r")


async def main(args: argparse.Namespace) -> None:
    model = resolve_model("smollm2-135m-instruct")
    with tempfile.TemporaryDirectory() as tmp:
        store = await FeedbackStore.open(Path(tmp) / "db.sqlite")
        try:
            await seed(store, model, args.conversations)
            train = dataclasses.replace(TrainConfig(), max_steps=args.max_steps)
            cycle = TrainingCycle(
                store, CycleConfig(base_model=model, data_dir=Path(tmp), min_new_feedback=1, train=train)
            )
            started = time.monotonic()
            result = await cycle.run()
            seconds = time.monotonic() - started
        finally:
            await store.close()
    print(f"cycle: {result.status} {result.version} in {seconds:.0f} s; rows {result.counts}")
    print(f"training steps/s {args.max_steps / seconds:.3f} (whole cycle, model load and evaluation included)")
    print(f"gate: {result.reason}")
    print(
        json.dumps(
            {
                "status": str(result.status),
                "seconds": round(seconds, 1),
                "max_steps": args.max_steps,
                "counts": result.counts,
                "report": result.report,
            }
        )
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--max-steps", type=int, default=40)
    asyncio.run(main(parser.parse_args()))
