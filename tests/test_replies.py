"""``server.replies.stream_reply`` on both store backends: what the client sees is what is stored."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from typing import Any

from feedback import Role
from server.engines import Chunk, SamplingConfig
from server.protocol import Turn
from server.replies import stream_reply
from tests.store_backends import StoreTarget


class ScriptedEngine:
    """An engine that streams fixed chunks: the model's text is not the point here. (A tiny random
    Llama once wrote U+0000, which PostgreSQL's text refused, and the reply failed with
    ``internal``; no model can be made to write it on demand.)"""

    def __init__(self, chunks: list[Chunk]) -> None:
        self.chunks = chunks

    async def stream(
        self, messages: Any, *, version: str, sampling: SamplingConfig, cancel: threading.Event | None = None
    ) -> AsyncIterator[Chunk]:
        for chunk in self.chunks:
            yield chunk


async def test_a_nul_written_by_the_model_is_dropped_before_the_client_and_the_store_see_it(
    store_target: StoreTarget,
) -> None:
    async with await store_target.open() as store:
        await store.conversations.create("c1", user_id="u", model_version=None, channel="websocket")
        await store.conversations.add_message(
            message_id="m1", conversation_id="c1", role=Role.USER, text="hi", parent_id=None
        )
        seen: list[str] = []

        async def on_delta(delta: str) -> None:
            seen.append(delta)

        engine = ScriptedEngine([Chunk("Hel\x00lo"), Chunk("\x00"), Chunk(" there", "stop", 3)])
        reply = await stream_reply(
            store,
            engine,  # type: ignore[arg-type]
            conversation_id="c1",
            context=[Turn("m1", "user", "hi")],
            message_id="m2",
            parent_id="m1",
            version="base",
            sampling=SamplingConfig(),
            on_delta=on_delta,
        )
        stored = await store.conversations.get_message("m2")
        assert not reply.failed and "".join(seen) == reply.text == stored.text == "Hello there"


async def test_a_reply_the_engine_started_on_another_version_is_told_and_stored_as_that_one(
    store_target: StoreTarget,
) -> None:
    """The engine redirected the queued reply (its version was demoted meanwhile): the caller
    hears the new version before any text (the OpenAI API's chunks name it), and the store and
    the reply record it."""
    async with await store_target.open() as store:
        await store.conversations.create("c1", user_id="u", model_version=None, channel="openai")
        await store.conversations.add_message(
            message_id="m1", conversation_id="c1", role=Role.USER, text="hi", parent_id=None
        )
        heard: list[str] = []

        async def on_delta(delta: str) -> None:
            heard.append(f"text {delta}")

        engine = ScriptedEngine([Chunk("", version="v2"), Chunk("Hi", "stop", 1)])
        reply = await stream_reply(
            store,
            engine,  # type: ignore[arg-type]
            conversation_id="c1",
            context=[Turn("m1", "user", "hi")],
            message_id="m2",
            parent_id="m1",
            version="v1",
            sampling=SamplingConfig(),
            on_delta=on_delta,
            on_version=lambda v: heard.append(f"version {v}"),
        )
        assert heard == ["version v2", "text Hi"]
        assert reply.version == "v2" and (await store.conversations.get_message("m2")).model_version == "v2"
