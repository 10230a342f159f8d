"""Websocket gateway: carries out ``protocol.ChatSession`` effects over a real connection.

Each connection has one reader loop. Generation runs in its own task, so ``stop`` and
ratings are read and answered while a reply streams. Ratings are acknowledged only after
the store committed them; a user message is acknowledged after it is stored, before the
reply starts. Unexpected errors reach the client as ``internal`` without details; the
details go to the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from feedback import FeedbackStore, InvalidError, NotFoundError, Role
from server.engine import OverloadedError, SamplingConfig, TransformersEngine, UnknownVersionError
from server.protocol import (
    Cancel,
    ChatSession,
    Effect,
    ErrorCode,
    Generate,
    KeyedRateLimiter,
    Limits,
    OpenConversation,
    Send,
    StoreRating,
    Turn,
    error_frame,
)

log = logging.getLogger("learnloop.gateway")


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass
class GatewayContext:
    """What the gateway needs from the app (the composition root fills it)."""

    store: FeedbackStore
    engine: TransformersEngine
    sampling: SamplingConfig
    limits: Limits
    assign_version: Callable[[str], str | None]  # new conversation -> canary name, or None for live
    serving_version: Callable[[str | None], str]  # pinned version (or None) -> the version that replies
    rating_limiter: KeyedRateLimiter
    token: str | None = None


class _Connection:
    def __init__(self, ctx: GatewayContext, ws: ServerConnection) -> None:
        self.ctx = ctx
        self.ws = ws
        self.session = ChatSession(new_id=new_id, limits=ctx.limits)
        self.user: str | None = None
        self.pinned: str | None = None  # the canary this conversation is pinned to, if any
        self.generation: asyncio.Task[None] | None = None
        self.cancel: threading.Event | None = None

    async def send(self, frame: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(json.dumps(frame, ensure_ascii=False))

    async def run(self) -> None:
        try:
            async for raw in self.ws:
                await self.apply(self.session.receive(raw, time.monotonic()))
        except ConnectionClosed:
            pass
        finally:
            if self.cancel is not None:
                self.cancel.set()
            if self.generation is not None:
                self.generation.cancel()

    async def apply(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Send):
                await self.send(effect.frame)
            elif isinstance(effect, OpenConversation):
                await self.apply(await self.open(effect))
            elif isinstance(effect, Generate):
                self.cancel = threading.Event()
                self.generation = asyncio.create_task(self.generate(effect, self.cancel))
            elif isinstance(effect, StoreRating):
                await self.apply(await self.rate(effect))
            elif isinstance(effect, Cancel) and self.cancel is not None:
                self.cancel.set()

    async def open(self, effect: OpenConversation) -> list[Effect]:
        if self.ctx.token is not None and effect.token != self.ctx.token:
            return self.session.open_failed(ErrorCode.UNAUTHORIZED, "hello.token is missing or wrong")
        self.user = effect.user
        if effect.conversation_id is None:
            conversation_id = new_id()
            self.pinned = self.ctx.assign_version(conversation_id)
            await self.ctx.store.create_conversation(conversation_id, user_id=effect.user, model_version=self.pinned)
            return self.session.opened(conversation_id, [], set(), self.ctx.serving_version(self.pinned))
        try:
            conversation = await self.ctx.store.get_conversation(effect.conversation_id)
        except NotFoundError:
            return self.session.open_failed(ErrorCode.NOT_FOUND, f"no conversation {effect.conversation_id!r}")
        self.pinned = conversation.model_version
        version = self.ctx.serving_version(self.pinned)
        messages = [
            m for m in await self.ctx.store.conversation_messages(effect.conversation_id) if m.finish_reason != "error"
        ]
        by_id = {m.id: m for m in messages}
        branch: list[Turn] = []
        node = messages[-1] if messages else None
        while node is not None:
            branch.append(Turn(node.id, str(node.role), node.text))
            node = by_id.get(node.parent_id) if node.parent_id else None
        branch.reverse()
        replies = {m.id for m in messages if m.role is Role.ASSISTANT}
        return self.session.opened(effect.conversation_id, branch, replies, version)

    async def rate(self, effect: StoreRating) -> list[Effect]:
        rater = self.user or f"conversation:{self.session.conversation_id}"
        retry_after = self.ctx.rating_limiter.check(rater, time.monotonic())
        if retry_after is not None:
            return [
                Send(
                    error_frame(
                        ErrorCode.RATE_LIMITED,
                        "too many ratings from this rater",
                        retry_after=retry_after,
                        id=effect.client_id,
                    )
                )
            ]
        try:
            await self.ctx.store.add_rating(
                message_id=effect.message_id,
                value=effect.value,
                client_id=effect.client_id,
                rater=rater,
                reason=effect.reason,
                comment=effect.comment,
            )
        except (NotFoundError, InvalidError) as exc:
            return [Send({"type": "error", "code": ErrorCode.NOT_FOUND, "message": str(exc), "id": effect.client_id})]
        return self.session.rating_stored(effect.client_id)

    async def generate(self, g: Generate, cancel: threading.Event) -> None:
        store, conversation_id = self.ctx.store, self.session.conversation_id
        assert conversation_id is not None
        version = self.ctx.serving_version(self.pinned)
        try:
            if g.user_turn is not None:
                await store.add_message(
                    message_id=g.user_turn.id,
                    conversation_id=conversation_id,
                    role=Role.USER,
                    text=g.user_turn.text,
                    parent_id=g.context[-2].id if len(g.context) > 1 else None,
                )
                await self.apply(self.session.user_turn_stored(g))
            started = time.monotonic()
            first_token_s: float | None = None
            parts: list[str] = []
            finish_reason, n_tokens = "error", 0
            messages = [{"role": t.role, "content": t.text} for t in g.context]
            async for chunk in self.ctx.engine.stream(
                messages, version=version, sampling=self.ctx.sampling, cancel=cancel
            ):
                if chunk.delta:
                    if first_token_s is None:
                        first_token_s = time.monotonic() - started
                    parts.append(chunk.delta)
                    await self.send({"type": "token", "message_id": g.message_id, "delta": chunk.delta})
                if chunk.finish_reason is not None:
                    finish_reason, n_tokens = chunk.finish_reason, chunk.n_tokens
            if finish_reason == "error":
                # recorded (empty, never trained on) so that error rates per version can be compared
                await store.add_message(
                    message_id=g.message_id,
                    conversation_id=conversation_id,
                    role=Role.ASSISTANT,
                    text="",
                    parent_id=g.parent_id,
                    model_version=version,
                    finish_reason="error",
                )
                await self.apply(self.session.failed(g.message_id, ErrorCode.INTERNAL, "generation failed"))
                return
            text = "".join(parts)
            await store.add_message(
                message_id=g.message_id,
                conversation_id=conversation_id,
                role=Role.ASSISTANT,
                text=text,
                parent_id=g.parent_id,
                regenerated_from=g.regenerated_from,
                model_version=version,
                latency_ms=(first_token_s or 0.0) * 1000,
                finish_reason=finish_reason,
                n_tokens=n_tokens,
            )
            await self.apply(
                self.session.finished(g.message_id, text, version, finish_reason, completion_tokens=n_tokens)
            )
        except OverloadedError as exc:
            await self.apply(
                self.session.failed(g.message_id, ErrorCode.OVERLOADED, str(exc), retry_after=exc.retry_after)
            )
        except UnknownVersionError:
            log.exception("reply %s asked for a version that is not loaded", g.message_id)
            await self.apply(self.session.failed(g.message_id, ErrorCode.INTERNAL, "internal error"))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("reply %s failed", g.message_id)
            await self.apply(self.session.failed(g.message_id, ErrorCode.INTERNAL, "internal error"))


def _health(connection: ServerConnection, request: Request) -> Response | None:
    if request.path == "/healthz":
        return connection.respond(HTTPStatus.OK, "ok\n")
    return None


async def start_gateway(ctx: GatewayContext, *, host: str, port: int, max_frame_bytes: int) -> Server:
    """Listen for chat clients; ``/healthz`` answers plain HTTP for probes."""

    async def handler(ws: ServerConnection) -> None:
        await _Connection(ctx, ws).run()

    return await serve(handler, host, port, max_size=max_frame_bytes, process_request=_health)
