"""The bot client (server.client) against a real App: chat, stream, rate, regenerate, stop,
operator takeover, typed errors, retries, and resuming a conversation across server restarts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import feedback
from feedback import FeedbackStore, Role
from server.app import App
from server.client import (
    AsyncChatClient,
    ChatClient,
    ChatError,
    ConnectionLost,
    ErrorCode,
    FinishReason,
    OperatorJoined,
    OperatorLeft,
    OperatorMessage,
    Ready,
    connect,
)
from server.settings import load_settings

FAST = {"min_backoff_s": 0.05, "max_backoff_s": 0.5}  # reconnect quickly in tests
# replies that go on until stop(): greedy, so that a random end-of-turn token cannot end one
# early by chance (the tiny model's greedy replies to these prompts do not end on their own)
ENDLESS = {"max_new_tokens": 100_000, "temperature": 0.0}


class Server:
    """A real App on one data dir; ``restart`` stops it and starts a new one on the same port."""

    def __init__(self, tiny_model: Path, data_dir: Path) -> None:
        self.tiny_model, self.data_dir = tiny_model, data_dir
        self.port = 0  # the first start picks one; later starts bind the same
        self.app: App | None = None
        self._lifespan: Any = None

    async def start(self, *, server: dict[str, Any] | None = None, **model: Any) -> App:
        settings = load_settings(
            env={},
            data_dir=self.data_dir,
            overrides={
                "console": {"enabled": False},
                "channels": {"enabled": False},
                "server": {"port": self.port, **(server or {})},
                "model": {"name": str(self.tiny_model), "max_new_tokens": 8, "dtype": "float32", **model},
                "schedule": {"enabled": False},
            },
        )
        self.app = App(settings)
        self._lifespan = self.app.lifespan()
        await self._lifespan.__aenter__()
        assert self.app.port is not None
        self.port = self.app.port
        return self.app

    async def stop(self) -> None:
        if self._lifespan is not None:
            lifespan, self._lifespan = self._lifespan, None
            await lifespan.__aexit__(None, None, None)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def store(self) -> FeedbackStore:
        assert self.app is not None and self.app.store is not None
        return self.app.store


@pytest.fixture
async def server(tiny_model: Path, tmp_path: Path) -> AsyncIterator[Server]:
    s = Server(tiny_model, tmp_path / "data")
    try:
        yield s
    finally:
        await s.stop()


async def ratings_of(store: FeedbackStore, rating_id: str) -> list[feedback.Rating]:
    return [r for r in (await store.conversations.export_feedback()).ratings if r.client_id == rating_id]


def test_error_codes_mirror_the_server() -> None:
    assert {c.value for c in ErrorCode} == {c.value for c in feedback.ErrorCode}
    assert {f.value for f in FinishReason} <= {f.value for f in feedback.FinishReason}


async def test_async_client_chats_streams_rates_regenerates_and_stops(server: Server) -> None:
    await server.start(**ENDLESS)
    async with connect(server.url, user="alice") as client:
        assert client.conversation_id and client.model_version == "base"
        stream = client.stream("Where is my order?")
        deltas = []
        async for delta in stream:
            deltas.append(delta)
            if len(deltas) == 3:
                await client.stop()  # the reply ends within a decode step, and keeps what streamed
        reply = stream.reply
        assert reply.finish_reason is FinishReason.CANCELLED and reply.text == "".join(deltas)
        assert stream.done is not None and stream.done.message_id == reply.message_id and not stream.restarted
        assert reply.message_id is not None and reply.user_message_id is not None
        stored = await server.store.conversations.get_message(reply.message_id)
        assert stored.text == reply.text and stored.parent_id == reply.user_message_id
        assert (await server.store.conversations.get_message(reply.user_message_id)).text == "Where is my order?"

        rating_id = await client.rate(reply.message_id, -1, reason="wrong", comment="not my order")
        [rating] = await ratings_of(server.store, rating_id)
        assert (rating.message_id, rating.value, rating.rater) == (reply.message_id, -1, "alice")
        assert (rating.reason, rating.comment) == ("wrong", "not my order")

        again = client.stream("and now?")
        assert await again.__anext__()
        # a second request waits for the reply in flight instead of being refused as busy
        regenerating = asyncio.create_task(client.regenerate(reply.message_id))
        await asyncio.sleep(0.2)
        assert not regenerating.done()
        await client.stop()
        assert (await again.result()).finish_reason is FinishReason.CANCELLED
        with pytest.raises(ChatError) as refused:  # by now it is not the latest reply any more
            await regenerating
        assert refused.value.code is ErrorCode.CONFLICT
        await client.stop()  # nothing streams: nothing happens


async def test_send_and_regenerate_return_finished_replies(server: Server) -> None:
    await server.start()
    client = await connect(server.url)
    try:
        reply = await client.send("hi")
        assert reply.finish_reason in (FinishReason.STOP, FinishReason.LENGTH) and reply.model_version == "base"
        assert reply.text and reply.message_id
        new = await client.regenerate(reply.message_id)
        assert new.regenerated_from == reply.message_id and new.message_id != reply.message_id
        stored = await server.store.conversations.get_message(new.message_id)  # type: ignore[arg-type]
        assert stored.regenerated_from == reply.message_id and stored.text == new.text
        next_turn = await client.send("and then?")
        user_turn = await server.store.conversations.get_message(next_turn.user_message_id)  # type: ignore[arg-type]
        assert user_turn.parent_id == new.message_id  # the conversation goes on from the new sibling
    finally:
        await client.close()
    with pytest.raises(ConnectionLost):
        await client.send("after close")


async def test_sync_client_for_plain_scripts(server: Server) -> None:
    await server.start()

    def script() -> tuple[str | None, str, list[str], str]:
        with ChatClient(server.url, user="bob") as chat:
            reply = chat.send("hello")
            assert reply.message_id is not None
            stream = chat.stream("more please")
            deltas = list(stream)
            assert stream.reply.text == "".join(deltas) and stream.done is not None
            rating_id = chat.rate(reply.message_id, 1)
            again = chat.regenerate(stream.reply.message_id)  # type: ignore[arg-type]
            assert again.regenerated_from == stream.reply.message_id
            chat.stop()
            with pytest.raises(ChatError) as err:
                chat.rate("no-such-reply", 1)
            assert err.value.code is ErrorCode.NOT_FOUND
            return chat.conversation_id, reply.message_id, deltas, rating_id

    conversation_id, message_id, deltas, rating_id = await asyncio.to_thread(script)
    assert deltas and (await server.store.conversations.get_message(message_id)).conversation_id == conversation_id
    [rating] = await ratings_of(server.store, rating_id)
    assert rating.value == 1 and rating.rater == "bob"


async def test_typed_errors_raise_from_the_call_that_caused_them(server: Server) -> None:
    await server.start(server={"token": "s3cret"})
    started = time.monotonic()
    with pytest.raises(ChatError) as err:
        await connect(server.url, token="wrong", **FAST)
    assert err.value.code is ErrorCode.UNAUTHORIZED and time.monotonic() - started < 5  # no reconnect loop
    with pytest.raises(ChatError) as err:
        await connect(server.url, token="s3cret", conversation_id="no-such-conversation")
    assert err.value.code is ErrorCode.NOT_FOUND
    async with connect(server.url, token="s3cret") as client:
        with pytest.raises(ChatError) as err:
            await client.rate("no-such-reply", 1)
        assert err.value.code is ErrorCode.NOT_FOUND
        with pytest.raises(ChatError) as err:
            await client.send("x" * 5000)
        assert err.value.code is ErrorCode.TOO_LARGE
        with pytest.raises(ChatError) as err:
            await client.regenerate("no-such-reply")
        assert err.value.code is ErrorCode.NOT_FOUND
        with pytest.raises(ValueError):
            await client.rate("any", 2)
        assert (await client.send("still fine")).message_id  # a refusal leaves the connection usable


async def test_rate_limited_ratings_are_retried_after_retry_after(server: Server) -> None:
    await server.start(server={"rate_per_s": 20.0, "rate_burst": 2})
    # six ratings share 2 tokens refilled at 20/s: on a loaded machine one of them can lose the race
    # more than the default 5 times, so this client may retry more often
    async with connect(server.url, user="carol", max_retries=30) as client:
        reply = await client.send("hi")
        assert reply.message_id is not None
        ids = await asyncio.gather(*(client.rate(reply.message_id, 1) for _ in range(6)))
        for rating_id in ids:  # each refused one went again after retry_after, and is stored once
            assert len(await ratings_of(server.store, rating_id)) == 1
    async with connect(server.url, max_retries=0) as impatient:
        reply = await impatient.send("hi")
        results = await asyncio.gather(
            *(impatient.rate(reply.message_id, -1) for _ in range(6)),  # type: ignore[arg-type]
            return_exceptions=True,
        )
        refused = [r for r in results if isinstance(r, ChatError)]
        assert refused and all(r.code is ErrorCode.RATE_LIMITED and r.retry_after for r in refused)


async def test_overloaded_message_is_sent_again_after_retry_after(server: Server) -> None:
    await server.start(**ENDLESS, max_pending=1)
    async with connect(server.url) as hog, connect(server.url) as client:
        endless = hog.stream("talk forever")
        await endless.__anext__()  # the engine's only slot is taken
        stream = client.stream("my turn")
        first_delta = asyncio.create_task(stream.__anext__())
        await asyncio.sleep(1.5)  # refused (overloaded, retry_after 1 s) and sent again at least once
        assert not first_delta.done()
        await hog.stop()
        assert await asyncio.wait_for(first_delta, 30)  # its next try got the slot
        await client.stop()
        reply = await stream.result()
    assert reply.message_id is not None and reply.user_message_id is not None
    asked = [
        m
        for m in await server.store.conversations.messages(client.conversation_id)  # type: ignore[arg-type]
        if m.role is Role.USER
    ]
    # each refusal left its stored turn behind (the server drops it from the branch); the last is answered
    assert len(asked) >= 2 and asked[-1].id == reply.user_message_id
    assert (await server.store.conversations.get_message(reply.message_id)).parent_id == reply.user_message_id


async def test_operator_takeover_reaches_events_and_send_returns_at_ack(server: Server) -> None:
    app = await server.start()
    async with connect(server.url) as client:
        events = client.events()
        assert isinstance(await events.__anext__(), Ready)
        first = await client.send("I need a human")
        assert app.presence is not None and client.conversation_id is not None
        seen: list[object] = []

        async def watch(event: object) -> None:  # an async callback, on a second connection to it
            seen.append(event)

        watcher = await connect(server.url, conversation_id=client.conversation_id, on_event=watch)
        await app.presence.join(client.conversation_id, "rita")
        assert isinstance(await asyncio.wait_for(events.__anext__(), 10), OperatorJoined)
        waiting = await client.send("Hello? Anyone?")  # stored and acknowledged; no model reply
        assert waiting.finish_reason is FinishReason.OPERATOR and waiting.message_id is None
        assert (await server.store.conversations.get_message(waiting.user_message_id)).parent_id == first.message_id  # type: ignore[arg-type]
        await app.presence.reply(client.conversation_id, "rita", "Rita here, it ships today.")
        pushed = await asyncio.wait_for(events.__anext__(), 10)
        assert isinstance(pushed, OperatorMessage) and pushed.text == "Rita here, it ships today."
        rating_id = await client.rate(pushed.message_id, 1)  # an operator's reply is rated like any
        assert len(await ratings_of(server.store, rating_id)) == 1
        await app.presence.leave(client.conversation_id)
        assert isinstance(await asyncio.wait_for(events.__anext__(), 10), OperatorLeft)
        back = await client.send("thanks")
        assert back.model_version == "base" and back.message_id
        for _ in range(100):
            if len(seen) >= 4:
                break
            await asyncio.sleep(0.05)
        await watcher.close()
        kinds = [type(e) for e in seen]
        assert kinds == [Ready, OperatorJoined, OperatorMessage, OperatorLeft], kinds


async def test_resume_after_server_restarts_answers_the_cut_off_turn_once(server: Server) -> None:
    """The server restarts mid-reply: the client reconnects to the same conversation by itself, the
    stored user turn is answered (not stored twice), and a rating made while the server was down
    is stored exactly once when it is back."""
    await server.start(**ENDLESS)
    client = AsyncChatClient(server.url, user="dora", **FAST)
    await client.open()
    try:
        conversation_id = client.conversation_id
        stream = client.stream("first question")
        await stream.__anext__()
        await client.stop()
        first = await stream.result()
        assert first.message_id is not None

        cut = client.stream("second question")
        assert await cut.__anext__()  # acked and streaming
        # the server crashes: the connection drops with no drain (a SIGTERM would end the reply with
        # done finish_reason=shutdown, tests/test_signals.py), and the reply in flight is discarded
        assert server.app is not None and server.app.gateway is not None
        for connection in list(server.app.gateway.connections):
            connection.ws.transport.abort()
        await server.stop()
        rating = asyncio.create_task(client.rate(first.message_id, -1, reason="wrong"))
        await asyncio.sleep(0.5)
        assert not rating.done()  # it waits for the server

        await server.start()  # same data dir, same port, 8-token replies
        reply = await asyncio.wait_for(cut.result(), 60)
        rating_id = await asyncio.wait_for(rating, 30)
        assert client.connections == 2 and client.conversation_id == conversation_id
        assert cut.restarted and reply.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
        assert reply.text == (await server.store.conversations.get_message(reply.message_id)).text  # type: ignore[arg-type]

        messages = await server.store.conversations.messages(conversation_id)  # type: ignore[arg-type]
        asked = [m for m in messages if m.role is Role.USER and m.text == "second question"]
        assert [m.id for m in asked] == [reply.user_message_id]  # stored once, answered once
        assert (await server.store.conversations.get_message(reply.message_id)).parent_id == reply.user_message_id  # type: ignore[arg-type]
        [stored] = await ratings_of(server.store, rating_id)
        assert (stored.message_id, stored.value, stored.rater) == (first.message_id, -1, "dora")

        # a message sent while the server is down goes out when it is back, in the same conversation
        await server.stop()
        later = asyncio.create_task(client.send("third question"))
        await asyncio.sleep(0.3)
        await server.start()
        third = await asyncio.wait_for(later, 60)
        assert client.connections == 3
        assert (await server.store.conversations.get_message(third.user_message_id)).parent_id == reply.message_id  # type: ignore[arg-type]
    finally:
        await client.close()


async def test_connection_lost_when_reconnecting_gives_up(server: Server) -> None:
    await server.start()
    client = await connect(server.url, give_up_after_s=0.5, **FAST)
    events = client.events()
    reply = await client.send("hi")
    await server.stop()
    with pytest.raises(ConnectionLost):
        await asyncio.wait_for(client.rate(reply.message_id, 1), 30)  # type: ignore[arg-type]
    with pytest.raises(ConnectionLost):
        await client.send("anyone?")
    assert isinstance(await events.__anext__(), Ready)
    with pytest.raises(ConnectionLost):
        await events.__anext__()
    await client.close()
    no_reconnect = await connect_later(server)
    with pytest.raises(ConnectionLost):
        await asyncio.wait_for(no_reconnect.send("x"), 30)
    await no_reconnect.close()


async def connect_later(server: Server) -> AsyncChatClient:
    """A client with reconnect off, whose server then goes away."""
    await server.start()
    client = await connect(server.url, reconnect=False)
    await server.stop()
    return client
