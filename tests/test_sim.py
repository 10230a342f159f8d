"""The learning benchmark's simulated customers on the real gateway (tiny model, real websockets)."""

from __future__ import annotations

import random
from pathlib import Path

from bench.rater import Deployment, Intent, Script, load_deployment
from bench.reactions import react
from bench.sim import ask, ask_and_rate
from feedback.records import Role
from server.app import App
from server.settings import Settings, load_settings
from training.implicit import ImplicitSignal


def _settings(tiny_model: Path, tmp_path: Path) -> Settings:
    return load_settings(
        env={},
        data_dir=tmp_path,
        overrides={
            "console": {"port": 0},
            "channels": {"port": 0},
            "server": {"port": 0, "rate_per_s": 1000.0},
            "model": {"name": str(tiny_model), "max_new_tokens": 4, "dtype": "float32", "temperature": 0.0},
            "schedule": {"enabled": False},
        },
    )


def _seed_with(signal: ImplicitSignal, dep: Deployment, intent: Intent, script: Script, *, up: bool) -> int:
    """A seed whose simulated customer reacts with ``signal``."""
    return next(n for n in range(1000) if react(random.Random(n), dep, intent, script, up=up).signal is signal)


async def test_a_multi_turn_script_is_one_conversation_and_the_last_reply_is_rated(
    tiny_model: Path, tmp_path: Path
) -> None:
    dep = load_deployment("airline")
    intent = dep.intent("carry_on")
    script = intent.train[2]
    assert len(script) == 3
    app = App(_settings(tiny_model, tmp_path))
    async with app.lifespan():
        assert app.port is not None and app.store is not None
        # a random tiny model never states the fact: the rubric says down, so REPEAT is a possible reaction
        seed = _seed_with(ImplicitSignal.REPEAT, dep, intent, script, up=False)
        answer = await ask_and_rate(
            app.port, script, "cust-1", intent, dep, send_rating=True, react_rng=random.Random(seed)
        )
        assert not answer.up and answer.rated and answer.reaction is not None
        assert 0 < answer.seconds < 60  # from the question to its done frame
        assert answer.reaction.signal is ImplicitSignal.REPEAT and answer.reaction.text
        messages = await app.store.conversations.messages(answer.conversation_id)
        users = [m.text for m in messages if m.role is Role.USER]
        assert users == [*script, answer.reaction.text]  # the turns in order, then the reaction
        assert [m.role for m in messages] == [Role.USER, Role.ASSISTANT] * 4
        rated = messages[5]
        assert rated.id == answer.message_id  # the reply to the question, not to a context turn
        assert messages[6].parent_id == rated.id  # the reaction is the next user turn after it
        snapshot = await app.store.conversations.export_feedback()
        assert [(r.message_id, r.value) for r in snapshot.ratings] == [(answer.message_id, -1)]


async def test_no_thumb_and_leaving_send_nothing_more(tiny_model: Path, tmp_path: Path) -> None:
    dep = load_deployment("zh_shop")
    intent = dep.intent("return")
    script = intent.train[0]
    app = App(_settings(tiny_model, tmp_path))
    async with app.lifespan():
        assert app.port is not None and app.store is not None
        seed = _seed_with(ImplicitSignal.ABANDON, dep, intent, script, up=False)
        answer = await ask_and_rate(
            app.port, script, "cust-2", intent, dep, send_rating=False, react_rng=random.Random(seed)
        )
        assert answer.reaction is not None and answer.reaction.text is None and not answer.rated
        messages = await app.store.conversations.messages(answer.conversation_id)
        assert [m.role for m in messages] == [Role.USER, Role.ASSISTANT]
        assert (await app.store.conversations.export_feedback()).ratings == ()
        _reply, message_id, version = await ask(app.port, ("你好！",), "generic-1")
        assert message_id and version == "base"
