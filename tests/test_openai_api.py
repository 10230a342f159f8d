"""The OpenAI-compatible API through the official ``openai`` package against a real App (tiny random
Llama, real SQLite, the channels listener on loopback): completions streamed and whole, models,
the conversation mapping as stored, feedback into the store and into training pairs, and every
refusal typed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import httpx
import openai
import pytest
from openai import AsyncOpenAI

from feedback import FeedbackStore, Role
from server.app import App
from server.channels.openai_api import OpenAIChannel
from server.engines import Engine, SamplingConfig
from server.errors import ApiError
from server.limiters import LocalLimiter
from server.settings import load_settings
from tests.factories import register_candidate
from tests.store_backends import StoreTarget
from tests.test_engine import make_adapter
from training.signals import build_training_data

PER_KEY_PER_MINUTE = 20


@pytest.fixture
async def app(tiny_model: Path, tmp_path: Path, store_target: StoreTarget) -> AsyncIterator[App]:
    """The OpenAI-compatible API on each backend (store.url for PostgreSQL)."""
    settings = load_settings(
        env={},
        data_dir=tmp_path,
        overrides={
            "store": {"url": None if store_target.backend == "sqlite" else str(store_target.target)},
            "server": {"port": 0},
            "console": {"enabled": False},
            "channels": {
                "port": 0,
                "requests_per_minute": 0,
                "max_body_bytes": 4096,
                "openai_requests_per_minute": PER_KEY_PER_MINUTE,
            },
            "model": {"name": str(tiny_model), "max_new_tokens": 6, "dtype": "float32"},
            "schedule": {"enabled": False},
        },
    )
    app = App(settings)
    async with app.lifespan():
        yield app
        for client in OPEN.pop(id(app), []):
            await client.close()


OPEN: dict[int, list[AsyncOpenAI]] = {}  # the clients of each app, closed with it


async def client_for(app: App, name: str = "shop", *, key: str | None = None) -> AsyncOpenAI:
    """An ``openai`` client with a new key of ``name`` (or ``key``), without retries."""
    assert app.store is not None
    key = key or await app.store.api_keys.create(name, actor="test")
    client = AsyncOpenAI(api_key=key, base_url=f"http://127.0.0.1:{app.channels_port}/v1", max_retries=0)
    OPEN.setdefault(id(app), []).append(client)
    return client


def chat(*texts: str) -> list[dict[str, str]]:
    """Alternating user/assistant turns, starting with the user."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


async def test_whole_and_streamed_completions_are_stored_replies(app: App) -> None:
    assert app.store is not None and app.release is not None
    client = await client_for(app)
    live = app.release.live_version
    whole = await client.chat.completions.create(
        model=live, messages=chat("Where is my order?"), user="u-7", temperature=0, max_tokens=4
    )
    assert whole.object == "chat.completion" and whole.model == live
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage is not None and whole.usage.completion_tokens <= 4 and whole.usage.prompt_tokens > 0
    reply = await app.store.conversations.get_message(whole.id)  # the id is the stored reply's
    assert reply.role is Role.ASSISTANT and reply.text == whole.choices[0].message.content
    assert reply.model_version == live and reply.n_tokens == whole.usage.completion_tokens
    conversation = await app.store.conversations.get(reply.conversation_id)
    assert (conversation.channel, conversation.site, conversation.user_id) == ("openai", "shop", "openai:shop:u-7")

    stream = await client.chat.completions.create(
        model=live, messages=chat("Another question"), stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    streamed = await app.store.conversations.get_message(chunks[0].id)
    assert streamed.text == text and streamed.latency_ms is not None
    assert (await app.store.conversations.get(streamed.conversation_id)).user_id is None  # no user: anonymous


async def test_stop_sequences_and_max_tokens_are_honoured(app: App) -> None:
    assert app.store is not None and app.release is not None
    client = await client_for(app)
    first = await client.chat.completions.create(
        model=app.release.live_version, messages=chat("hi"), temperature=0, max_tokens=6
    )
    text = first.choices[0].message.content or ""
    assert text, "the tiny model said nothing: the stop check below needs text"
    cut = await client.chat.completions.create(
        model=app.release.live_version, messages=chat("hi"), temperature=0, max_tokens=6, stop=[text[1:3] or text]
    )
    assert cut.choices[0].finish_reason == "stop" and text.startswith(cut.choices[0].message.content or "")
    assert len(cut.choices[0].message.content or "") < len(text)
    assert (await app.store.conversations.get_message(cut.id)).text == cut.choices[0].message.content
    one = await client.chat.completions.create(model=app.release.live_version, messages=chat("x"), max_tokens=1)
    assert one.usage is not None and one.usage.completion_tokens <= 1


async def test_models_list_names_the_live_version(app: App) -> None:
    assert app.release is not None
    client = await client_for(app)
    models = await client.models.list()
    assert [m.id for m in models.data] == [app.release.live_version]
    assert (await client.models.retrieve(app.release.live_version)).owned_by == "learnloop"


async def test_history_continues_or_regenerates_the_stored_conversation(app: App) -> None:
    assert app.store is not None and app.release is not None
    client = await client_for(app)
    live = app.release.live_version
    system = {"role": "system", "content": "Be brief."}
    first = await client.chat.completions.create(model=live, messages=[system, *chat("hi")], user="u1")
    a1 = first.choices[0].message.content or ""
    follow = await client.chat.completions.create(model=live, messages=[system, *chat("hi", a1, "refund?")], user="u1")
    again = await client.chat.completions.create(model=live, messages=[system, *chat("hi")], user="u1")
    other_user = await client.chat.completions.create(model=live, messages=[system, *chat("hi")], user="u2")

    r1, r2, r3, r4 = [await app.store.conversations.get_message(c.id) for c in (first, follow, again, other_user)]
    assert r1.conversation_id == r2.conversation_id == r3.conversation_id != r4.conversation_id
    messages = await app.store.conversations.messages(r1.conversation_id)
    by_id = {m.id: m for m in messages}
    assert [m.role for m in messages].count(Role.USER) == 2 and [m.role for m in messages].count(Role.SYSTEM) == 1
    follow_turn = by_id[r2.parent_id or ""]
    assert (follow_turn.text, follow_turn.parent_id) == ("refund?", r1.id)  # continued after the first reply
    # the turn after the first reply is read as implicit feedback on it (a new question: no label)
    [reaction] = await app.store.conversations.reactions(r1.conversation_id)
    assert (reaction.reply_id, reaction.message_id, reaction.signal, reaction.value) == (
        r1.id,
        follow_turn.id,
        "none",
        None,
    )
    assert r3.parent_id == r1.parent_id and r3.regenerated_from == r1.id  # the same turn answered again: a sibling


async def test_feedback_reaches_the_store_and_training_pairs(app: App) -> None:
    assert app.store is not None and app.release is not None
    client = await client_for(app)
    live = app.release.live_version
    question = chat("Can I return shoes?")
    first = await client.chat.completions.create(model=live, messages=question, user="u9", temperature=1.0)
    second = await client.chat.completions.create(model=live, messages=question, user="u9", temperature=1.0)
    up = await client.post("/feedback", cast_to=object, body={"id": second.id, "value": 1})
    down = await client.post(
        "/feedback",
        cast_to=object,
        body={"id": first.id, "value": -1, "reason": "incorrect", "comment": "we take returns for 30 days"},
    )
    assert up == {"object": "feedback", "id": second.id, "value": 1, "created": True}
    assert isinstance(down, dict) and down["value"] == -1

    snapshot = await app.store.conversations.export_feedback()
    stored = {r.message_id: r for r in snapshot.ratings}
    assert stored[second.id].value == 1 and stored[second.id].rater == "openai:shop:u9"
    assert (stored[first.id].reason, stored[first.id].comment) == ("incorrect", "we take returns for 30 days")
    data = build_training_data(snapshot)
    texts = [first.choices[0].message.content, second.choices[0].message.content]
    assert texts[0] != texts[1], "sampling gave the same reply twice: no pair to check"
    pairs = [row.to_trl() for row in data.dpo]
    assert {
        "prompt": question,
        "chosen": [{"role": "assistant", "content": texts[1]}],
        "rejected": [{"role": "assistant", "content": texts[0]}],
    } in pairs
    assert {(row.completion, row.label) for row in data.kto} == {(texts[1], True), (texts[0], False)}

    # erasing the user takes their API conversations, thumbs and openings; the same question starts anew
    await app.store.erasure.erase_user("openai:shop:u9", actor="test")
    assert not (await app.store.conversations.export_feedback()).ratings
    assert not await app.store.db.read("SELECT * FROM api_openings")
    third = await client.chat.completions.create(model=live, messages=question, user="u9")
    assert (await app.store.conversations.get_message(third.id)).regenerated_from is None


async def test_feedback_only_for_this_keys_replies_with_the_websockets_limits(app: App) -> None:
    assert app.release is not None
    shop, bank = await client_for(app, "shop"), await client_for(app, "bank")
    reply = await shop.chat.completions.create(model=app.release.live_version, messages=chat("hi"))
    for client, message_id in ((shop, "no-such-id"), (bank, reply.id)):
        with pytest.raises(openai.NotFoundError) as missing:
            await client.post("/feedback", cast_to=object, body={"id": message_id, "value": 1})
        assert error_of(missing.value) == ("not_found", "not_found_error")
    with pytest.raises(openai.UnprocessableEntityError):
        await shop.post("/feedback", cast_to=object, body={"id": reply.id, "value": 2})
    once = {"headers": {"Idempotency-Key": "click-1"}}
    first = await shop.post("/feedback", cast_to=object, body={"id": reply.id, "value": 1}, options=once)  # type: ignore[arg-type]
    again = await shop.post("/feedback", cast_to=object, body={"id": reply.id, "value": 1}, options=once)  # type: ignore[arg-type]
    assert isinstance(first, dict) and isinstance(again, dict) and (first["created"], again["created"]) == (True, False)
    with pytest.raises(openai.APIStatusError) as long_reason:
        await shop.post("/feedback", cast_to=object, body={"id": reply.id, "value": -1, "reason": "x" * 201})
    assert long_reason.value.status_code == 413


def error_of(exc: openai.APIStatusError) -> tuple[str, str]:
    """(code, type) of an error, checking the envelope: learnloop's with OpenAI's type added."""
    body: Any = exc.body
    assert isinstance(body, dict) and {"code", "message", "type"} <= set(body), body
    return body["code"], body["type"]


async def test_refusals_are_typed(app: App) -> None:
    assert app.release is not None and app.store is not None
    base = f"http://127.0.0.1:{app.channels_port}/v1"
    live = app.release.live_version
    async with httpx.AsyncClient(base_url=base) as http:
        no_key = await http.post("/chat/completions", json={"model": live, "messages": chat("hi")})
        assert no_key.status_code == 401 and no_key.json()["error"]["type"] == "authentication_error"
        assert no_key.json()["error"]["code"] == "unauthorized"
    bad = await client_for(app, key="llk-not-a-key")
    with pytest.raises(openai.AuthenticationError) as refused:
        await bad.models.list()
    assert error_of(refused.value) == ("unauthorized", "authentication_error")

    client = await client_for(app)
    with pytest.raises(openai.NotFoundError) as unknown:
        await client.chat.completions.create(model="gpt-4o", messages=chat("hi"))
    assert error_of(unknown.value) == ("not_found", "not_found_error") and live in unknown.value.message
    with pytest.raises(openai.UnprocessableEntityError) as invalid:
        await client.chat.completions.create(model=live, messages=[{"role": "tool", "content": "x"}])  # type: ignore[list-item]
    assert error_of(invalid.value) == ("invalid", "invalid_request_error")
    with pytest.raises(openai.UnprocessableEntityError):
        await client.chat.completions.create(model=live, messages=chat("hi"), temperature=3)
    with pytest.raises(openai.APIStatusError) as too_large:
        await client.chat.completions.create(model=live, messages=chat("x" * 5000))
    assert too_large.value.status_code == 413 and error_of(too_large.value) == ("too_large", "invalid_request_error")
    with pytest.raises(openai.UnprocessableEntityError):
        await client.post("/chat/completions", cast_to=object, body={"model": live})  # no messages

    limited = await client_for(app, "tiny")
    for _ in range(PER_KEY_PER_MINUTE):
        await limited.models.list()
    with pytest.raises(openai.RateLimitError) as slow_down:
        await limited.models.list()
    assert error_of(slow_down.value) == ("rate_limited", "rate_limit_error")
    assert int(slow_down.value.response.headers["retry-after"]) >= 1
    await client.models.list()  # another key's budget is its own


async def test_model_names_the_live_version_or_the_canary(tmp_path: Path) -> None:
    """What ``model`` may name follows the release: live, and the canary while one runs (a new
    conversation opened for the canary is pinned to it, as the canary's share is)."""
    settings = load_settings(env={}, data_dir=tmp_path)
    async with await FeedbackStore.open(settings.db_path) as store:
        await store.versions.ensure_base("tiny")
        serving: list[str | None] = ["base", None]
        channel = OpenAIChannel(
            settings,
            store,
            cast(Engine, None),  # not asked for a reply here
            sampling=SamplingConfig(),
            versions=lambda: (serving[0] or "", serving[1]),
            rating_limiter=LocalLimiter(per_minute=None),
        )
        assert [m["id"] for m in await channel.models()] == ["base"]
        assert channel.version_for("base") == ("base", None)
        with pytest.raises(ApiError) as unknown:
            channel.version_for("v2")
        assert unknown.value.code == "not_found"
        serving[1] = "v2"  # a canary starts
        assert [m["id"] for m in await channel.models()] == ["base", "v2"]
        assert channel.version_for("v2") == ("v2", "v2")
        with pytest.raises(ApiError, match="'base' or the canary 'v2'"):
            channel.version_for("gpt-4o")


async def test_a_stream_the_client_closes_stops_its_reply(tiny_model: Path, tmp_path: Path) -> None:
    """Closing a stream cancels generation, as closing a websocket does: the reply is stored as
    cancelled, shorter than its token limit."""
    settings = load_settings(
        env={},
        data_dir=tmp_path,
        overrides={
            "server": {"port": 0},
            "console": {"enabled": False},
            "channels": {"port": 0},
            "model": {"name": str(tiny_model), "max_new_tokens": 400, "temperature": 0.0, "dtype": "float32"},
            "schedule": {"enabled": False},
        },
    )
    app = App(settings)
    async with app.lifespan():
        assert app.store is not None and app.release is not None
        key = await app.store.api_keys.create("shop", actor="test")
        body = {"model": app.release.live_version, "messages": chat("Tell me everything."), "stream": True}
        headers = {"Authorization": f"Bearer {key}"}
        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.channels_port}") as http,
            http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response,
        ):
            assert response.status_code == 200
            lines = response.aiter_lines()
            message_id = json.loads((await anext(lines))[6:])["id"]  # the role chunk; then hang up
        for _ in range(200):
            messages = await app.store.db.read(
                "SELECT finish_reason, n_tokens FROM messages WHERE id = ?", (message_id,)
            )
            if messages:
                break
            await asyncio.sleep(0.05)
        [(finish_reason, n_tokens)] = [tuple(r) for r in messages]
        assert finish_reason == "cancelled" and n_tokens < 400


async def test_a_reply_takes_the_version_live_when_the_engine_admits_it_not_when_its_request_arrived(
    app: App, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The websocket gateway's rule (docs/reliability.md, scenario 17) on this channel too. Two
    requests name the live version and then wait for the store (their read of the stored
    conversations is held, as a slow or busy store holds it) while two promotions make another
    version live and unload the one they named: both replies must come from the version live when
    the engine admits them, whole and streamed, and be stored with it; none may fail."""
    assert app.store is not None and app.release is not None and app.engine is not None
    names = [
        await register_candidate(app.store, make_adapter(tiny_model, tmp_path / f"a{i}", seed=40 + i), str(tiny_model))
        for i in range(3)
    ]
    await app.release.promote(names[0], actor="test")
    client = await client_for(app)
    read = app.store.api_keys.candidates
    waiting: list[str] = []
    gate = asyncio.Event()

    async def held(opening: str, **kwargs: Any) -> Any:
        waiting.append(opening)
        await gate.wait()
        return await read(opening, **kwargs)

    monkeypatch.setattr(app.store.api_keys, "candidates", held)
    whole = asyncio.create_task(
        client.chat.completions.create(model=names[0], messages=chat("Where is my order?"), user="ann")
    )

    async def streamed() -> tuple[str, list[str], str]:
        stream = await client.chat.completions.create(
            model=names[0], messages=chat("Where is my parcel?"), user="bob", stream=True
        )
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return chunks[0].id, sorted({c.model for c in chunks}), text

    stream = asyncio.create_task(streamed())
    while len(waiting) < 2:
        await asyncio.sleep(0.01)
    for name in names[1:]:
        await app.release.promote(name, actor="test")
    assert not app.engine.has_version(names[0])  # neither live nor kept for a rollback: unloaded
    gate.set()
    answer = await whole
    stream_id, stream_models, stream_text = await stream
    assert answer.model == names[2] and answer.choices[0].finish_reason in ("stop", "length")
    assert stream_models == [names[2]] and stream_text
    for reply_id in (answer.id, stream_id):
        assert (await app.store.conversations.get_message(reply_id)).model_version == names[2]
