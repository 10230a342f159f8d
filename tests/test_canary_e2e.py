"""Candidate -> canary -> automatic promotion or rollback, decided by ratings from chatting sessions."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from feedback import VersionState
from server.app import App
from server.settings import load_settings
from training.cycle import CycleStatus

ANSWER = "Refunds are accepted within 30 days of delivery."


def settings(tiny_model: Path, tmp_path: Path) -> Any:
    return load_settings(
        env={},
        data_dir=tmp_path / "data",
        overrides={
            "console": {"port": 0},
            "channels": {"port": 0},
            "server": {"port": 0, "rate_per_s": 100.0},
            "model": {"name": str(tiny_model), "max_new_tokens": 6},
            "schedule": {"enabled": False, "min_new_feedback": 1, "heldout_fraction": 0.3, "version_poll_s": 3600},
            # replay rows off: on a random tiny model they only dilute the few seeded pairs
            "training": {"max_steps": 10, "epochs": 0.0, "learning_rate": 1e-3, "replay_pairs": 0},
            # thumbs decide here; the latency rule is tested on its own (tests/test_canary.py), and a
            # tiny model's TTFT on a loaded 2-core machine swings by more than the default 100 ms slack
            "canary": {
                "share": 0.5,
                "min_ratings": 10,
                "min_replies": 10,
                "check_interval_s": 0.3,
                "latency_slack_ms": 5000.0,
            },
        },
    )


async def train_a_canary(app: App, open_client: Any) -> None:
    for i in range(6):  # corrected conversations: what the candidate learns from
        c = await open_client(app.port)
        await c.hello(user=f"teacher{i}")
        done, _ = await c.chat(f"What is your refund policy? ({i})", f"t{i}")
        await app.store.conversations.add_correction(message_id=done["message_id"], text=ANSWER, operator="op")  # type: ignore[union-attr]
    result = await app.trainer.run()
    assert result.status is CycleStatus.CANARY, result
    assert app.release.canary_version == "v1" and app.release.live_version == "base"


async def chat_and_rate(app: App, open_client: Any, *, canary_vote: int, n: int = 50) -> dict[str, int]:
    """New conversations land on either arm; customers rate what they got."""
    arms: dict[str, int] = {}
    for i in range(n):
        c = await open_client(app.port)
        ready = await c.hello(user=f"customer{i}")
        done, _ = await c.chat("Can I return my order?", f"m{i}")
        if done["model_version"] != ready["model_version"]:
            # the server's canary check (every 0.3 s) decided between this hello and this reply:
            # from then on every conversation, pinned or not, follows live
            assert app.release.canary_version is None, (ready, done)
            assert done["model_version"] == app.release.live_version
        arms[done["model_version"]] = arms.get(done["model_version"], 0) + 1
        vote = canary_vote if done["model_version"] == "v1" else -canary_vote
        await c.send(type="rating", message_id=done["message_id"], value=vote, id=f"r{i}")
        await c.until("ack")
        await c.ws.close()
    return arms


async def wait_for(predicate: Any, timeout: float = 20) -> None:
    for _ in range(int(timeout / 0.1)):
        if predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not reached")


@pytest.mark.parametrize(("canary_vote", "expected"), [(1, "promote"), (-1, "rollback")])
async def test_canary_is_promoted_or_rolled_back_by_customers(
    tiny_model: Path, tmp_path: Path, open_client: Any, canary_vote: int, expected: str
) -> None:
    app = App(settings(tiny_model, tmp_path))
    async with app.lifespan():
        assert app.store is not None
        await train_a_canary(app, open_client)
        pinned = await open_client(app.port)  # a conversation that lands on the canary arm
        while True:
            ready = await pinned.hello()
            if ready["model_version"] == "v1":
                break
            pinned = await open_client(app.port)
        arms = await chat_and_rate(app, open_client, canary_vote=canary_vote)
        assert arms.get("v1", 0) >= 10 and arms.get("base", 0) >= 10

        # the server's own canary check acts (every 0.3 s here)
        await wait_for(lambda: app.release.canary_version is None)
        v1 = await app.store.versions.get("v1")
        if expected == "promote":
            assert v1.state is VersionState.LIVE and app.release.live_version == "v1", v1.gate_reasons
            assert any(r.startswith("better: thumbs-up") for r in v1.gate_reasons)
        else:
            assert v1.state is VersionState.ROLLED_BACK and app.release.live_version == "base"
            assert any(r.startswith("worse: thumbs-up") for r in v1.gate_reasons)
        # the conversation pinned to the canary now gets whatever is live
        done, _ = await pinned.chat("and now?", "after")
        assert done["model_version"] == app.release.live_version
        audit = [e["action"] for e in await app.store.browse.audit_log(limit=50)]
        assert "state:canary" in audit and ("state:live" in audit or "state:rolled_back" in audit)
        assert (await app.release.check_canary()) is None  # nothing left to judge
        fresh = await open_client(app.port)
        assert (await fresh.hello())["model_version"] == app.release.live_version
