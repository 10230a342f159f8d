"""Shared by the console's API and browser tests: a running server with operators and history."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from feedback import FeedbackStore, Role
from server.app import App
from server.settings import Settings, load_settings
from tests.factories import register_candidate

PASSWORD = "correct-horse-9"
OPERATORS = {"alice": "admin", "rita": "reviewer", "vic": "viewer"}


@contextlib.asynccontextmanager
async def running_app(tiny_model: Path, tmp_path: Path, *, store_url: str | None = None) -> AsyncIterator[App]:
    """A running server (gateway + console) on the tiny model with the three operators; ``store_url``:
    the store's ``store.url`` (None: the SQLite file in ``tmp_path/data``)."""
    a = App(console_settings(tiny_model, tmp_path, store_url=store_url))
    async with a.lifespan():
        assert a.store is not None
        await add_operators(a.store)
        yield a


def console_settings(tiny_model: Path, tmp_path: Path, *, store_url: str | None = None) -> Settings:
    return load_settings(
        env={},
        data_dir=tmp_path / "data",
        overrides={
            "store": {"url": store_url},
            "console": {"port": 0},
            "channels": {"port": 0},
            "server": {"port": 0},
            "model": {"name": str(tiny_model), "max_new_tokens": 6, "dtype": "float32"},
            "schedule": {"enabled": False, "version_poll_s": 0.2},
            "canary": {"share": 0.0},
        },
    )


async def add_operators(store: FeedbackStore) -> None:
    for name, role in OPERATORS.items():
        await store.accounts.add_operator(name, PASSWORD, role, actor="test")


@dataclass(frozen=True)
class Seeded:
    refund: str  # conversation ids
    shipping: str
    telegram: str
    refund_reply: str  # the assistant message in the refund conversation


async def stored_conversation(
    store: FeedbackStore,
    turns: list[tuple[str, str]],
    *,
    user: str,
    channel: str = "websocket",
    site: str | None = None,
) -> tuple[str, list[str]]:
    cid = uuid.uuid4().hex
    await store.conversations.create(cid, user_id=user, channel=channel, site=site)
    ids: list[str] = []
    for role, text in turns:
        mid = uuid.uuid4().hex
        await store.conversations.add_message(
            message_id=mid,
            conversation_id=cid,
            role=Role(role),
            text=text,
            parent_id=ids[-1] if ids else None,
            model_version="base" if role == "assistant" else None,
            latency_ms=120.0 if role == "assistant" else None,
            finish_reason="stop" if role == "assistant" else None,
        )
        ids.append(mid)
    return cid, ids


async def seed(store: FeedbackStore) -> Seeded:
    refund, r_ids = await stored_conversation(
        store,
        [("user", "How do I get a refund for my blender?"), ("assistant", "Refunds are not possible, sorry.")],
        user="cust-1",
    )
    await store.conversations.add_rating(message_id=r_ids[1], value=-1, rater="cust-1", client_id="r1", reason="wrong")
    shipping, s_ids = await stored_conversation(
        store,
        [("user", "How long does shipping take?"), ("assistant", "Standard shipping takes 3-5 business days.")],
        user="cust-2",
    )
    await store.conversations.add_rating(message_id=s_ids[1], value=1, rater="cust-2", client_id="r2")
    telegram, _ = await stored_conversation(
        store,
        [("user", "Are you open on Sunday?"), ("assistant", "Yes.")],
        user="cust-3",
        channel="telegram",
        site="support",
    )  # through the Telegram bot "support"
    return Seeded(refund, shipping, telegram, r_ids[1])


# a budget report as training/steps.py writes it (the run page shows it)
BUDGET = {
    "max_minutes": 30.0,
    "epochs": 1.0,
    "train_seconds": 42.0,
    "stopped_by_budget": False,
    "steps": 12,
    "share_seen": 1.0,
    "stages": [
        {
            "trainer": "dpo",
            "rows": 20,
            "batch_size": 2,
            "planned_steps": 10,
            "steps": 10,
            "epochs": 1.0,
            "share_seen": 1.0,
        },
        {
            "trainer": "sft",
            "rows": 4,
            "batch_size": 2,
            "planned_steps": 2,
            "steps": 2,
            "epochs": 1.0,
            "share_seen": 1.0,
        },
    ],
}


REPLIES = {
    "n": 6,
    "candidate": 0.41,
    "live": 0.16,
    "wins": 5,
    "losses": 1,
    "candidate_leaks": 0,
    "live_leaks": 1,
    "examples": [],
}
"""A gate's reading of the replies (``training.gate.ReplyReport`` as the version's eval report keeps it)."""


async def register_adapter(app: App, tiny_model: Path, out: Path, seed_value: int = 3) -> str:
    """A real (random) LoRA adapter registered as a candidate version; returns its name."""
    from tests.test_engine import make_adapter

    assert app.store is not None
    adapter = make_adapter(tiny_model, out, seed=seed_value)
    return await register_candidate(
        app.store,
        adapter,
        str(tiny_model),
        eval_report={"reward_accuracy": 0.9, "heldout_pairs": 4, "budget": BUDGET, "replies": REPLIES},
    )


def bearer(token: str) -> dict[str, Any]:
    return {"Authorization": f"Bearer {token}"}
