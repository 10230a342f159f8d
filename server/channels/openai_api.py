"""The OpenAI-compatible API: ``/v1/chat/completions``, ``/v1/models`` and ``/v1/feedback``.

A router of the channels listener (its body and address limits apply). Every request carries
``Authorization: Bearer <key>`` (keys from ``learnloop apikey create NAME``, stored as SHA-256
hashes) and counts against its key name's limit (``channels.openai_requests_per_minute``).

A request carries the whole chat; ``server.channels.openai_map`` maps it onto a stored
conversation (continued, regenerated or new) of the key's name (``site``) and the request's
``user``, with ``channel = "openai"``. The reply goes through ``server.replies`` like every
channel's, so these conversations and their ratings train exactly like websocket ones. The
response's ``id`` is the stored reply's id, which ``POST /v1/feedback`` rates.

Errors are learnloop's envelope with OpenAI's ``type`` added (``openai_error_type``), so the
``openai`` package raises its typed exceptions: ``{"error": {"code", "message", "type"}}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Header
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from feedback import FeedbackStore, FinishReason, NotFoundError, Role
from feedback.exceptions import ErrorCode
from server.channels.openai_map import ChatTurn, opening, parse_messages, plan
from server.engines import Engine, SamplingConfig
from server.errors import ApiError, public_view
from server.limiters import RateLimiter
from server.protocol import Limits, Turn
from server.ratelimit import KeyedRateLimiter
from server.replies import Reply, new_id, open_conversation, reaction_after, stream_reply
from server.settings import Settings

log = logging.getLogger("learnloop.channels.openai")

CHANNEL = "openai"
CANDIDATES = 20  # stored conversations with the request's opening that the mapping looks at
MAX_REASON_CHARS = 200  # as the websocket's rating frame
MAX_IDEMPOTENCY_KEY_CHARS = 128

_TYPES = {
    ErrorCode.UNAUTHORIZED: "authentication_error",
    ErrorCode.FORBIDDEN: "permission_error",
    ErrorCode.NOT_FOUND: "not_found_error",
    ErrorCode.RATE_LIMITED: "rate_limit_error",
    ErrorCode.OVERLOADED: "server_error",
    ErrorCode.UNAVAILABLE: "server_error",
    ErrorCode.STORAGE_FULL: "server_error",
    ErrorCode.INTERNAL: "server_error",
}


def openai_error_type(code: str) -> str:
    """OpenAI's ``error.type`` for a learnloop code (``invalid_request_error`` for every bad request)."""
    try:
        return _TYPES.get(ErrorCode(code), "invalid_request_error")
    except ValueError:
        return "invalid_request_error"


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat completion request that learnloop honours; others are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    user: str | None = Field(default=None, min_length=1, max_length=256)
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)
    stream_options: dict[str, Any] | None = None

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError("stop: up to 4 non-empty sequences", code=ErrorCode.INVALID)
        return tuple(stops)


class FeedbackRequest(BaseModel):
    """``POST /v1/feedback``: a thumb on a reply this key's API gave."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=64)
    value: int
    reason: str | None = None
    comment: str | None = None


@dataclass(frozen=True)
class Caller:
    name: str  # the key's name: the conversations' site


class OpenAIChannel:
    """The API's state: the store, the engine, which versions serve, the key and rater limits."""

    def __init__(
        self,
        settings: Settings,
        store: FeedbackStore,
        engine: Engine,
        *,
        sampling: SamplingConfig,
        versions: Callable[[], tuple[str, str | None]],  # (live, canary or None)
        rating_limiter: RateLimiter,
    ) -> None:
        self.store = store
        self.engine = engine
        self.sampling = sampling
        self.versions = versions
        self.rating_limiter = rating_limiter
        self.max_text_chars = settings.server.max_text_chars
        self.implicit = settings.implicit  # how a turn after a reply is read
        per_minute = settings.channels.openai_requests_per_minute
        self.key_limiter = KeyedRateLimiter(per_minute=per_minute or None, burst=max(1, int(per_minute)))
        self._tasks: set[asyncio.Task[Any]] = set()  # held until done: the loop keeps only weak references

    def spawn(self, work: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        """Run ``work`` to its end even if the request that started it is gone (a client hung up)."""
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- the caller ------------------------------------------------------------------------

    async def caller(self, authorization: str | None = Header(default=None)) -> Caller:
        """The key's name from ``Authorization: Bearer``, counted against its limit."""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError("missing API key: send Authorization: Bearer <key>", code=ErrorCode.UNAUTHORIZED)
        name = await self.store.api_keys.name_for(key.strip())
        if name is None:
            raise ApiError("unknown or revoked API key", code=ErrorCode.UNAUTHORIZED)
        retry_after = self.key_limiter.check(name, time.monotonic())
        if retry_after is not None:
            raise ApiError(
                f"more than {self.key_limiter.per_minute:g} requests a minute for API key {name!r}",
                code=ErrorCode.RATE_LIMITED,
                retry_after=retry_after,
            )
        return Caller(name)

    # --- models ----------------------------------------------------------------------------

    async def models(self) -> list[dict[str, Any]]:
        """The versions that serve now (live, then the canary if one runs): what ``model`` may name."""
        live, canary = self.versions()
        listed = []
        for name in (live, canary):
            if name is None:
                continue
            try:
                created = int((await self.store.versions.get(name)).created_at)
            except NotFoundError:
                created = 0
            listed.append({"id": name, "object": "model", "created": created, "owned_by": "learnloop"})
        return listed

    def version_for(self, model: str) -> tuple[str, str | None]:
        """(the version that answers now, the canary a new conversation is pinned to or None).

        Checked when the request arrives; the version that writes the reply is picked again by
        ``serving_version`` when the engine admits it."""
        live, canary = self.versions()
        if model == live:
            return live, None
        if canary is not None and model == canary:
            return canary, canary
        names = f"{live!r}" + (f" or the canary {canary!r}" if canary else "")
        raise ApiError(f"the model {model!r} does not exist; use {names} (GET /v1/models)", code=ErrorCode.NOT_FOUND)

    def serving_version(self, pin: str | None) -> str:
        """The version a reply is written by, read right before the engine admits it (the gateway's
        rule): the canary the request named while it still runs, else whatever is live by then. A
        version picked when the request arrived may have been unloaded meanwhile (two promotions
        while the request waited for the store)."""
        live, canary = self.versions()
        return pin if pin is not None and pin == canary else live

    # --- a completion ----------------------------------------------------------------------

    async def prepare(self, caller: Caller, body: ChatRequest) -> Completion:
        """Check the request, map it onto a stored conversation and start storing its new turns."""
        turns = parse_messages(body.messages, max_text_chars=self.max_text_chars)
        stops = body.stops()
        _, pin = self.version_for(body.model)
        user_id = f"{CHANNEL}:{caller.name}:{body.user}" if body.user is not None else None
        opened = opening(caller.name, user_id, turns)
        found = await self.store.api_keys.candidates(opened, site=caller.name, user_id=user_id, limit=CANDIDATES)
        where = plan(turns, [(c.id, messages) for c, messages in found])
        new = where.conversation_id is None
        conversation_id = where.conversation_id or new_id()
        ids = [new_id() for _ in where.new_turns]
        parent = ids[-1] if ids else where.answer
        assert parent is not None
        reaction = None
        if ids and where.parent_id is not None and where.new_turns[0].role is Role.USER:
            stored = {m.id: m for c, messages in found if c.id == where.conversation_id for m in messages}
            reply = stored.get(where.parent_id)
            before = stored.get(reply.parent_id or "") if reply is not None else None
            branch = [Turn(m.id, str(m.role), m.text) for m in (before, reply) if m is not None]
            reaction = reaction_after(branch, message_id=ids[0], text=where.new_turns[0].text, config=self.implicit)

        async def store_turns() -> None:
            if new:
                await open_conversation(
                    self.store,
                    assign_version=lambda _: pin,
                    user=user_id,
                    channel=CHANNEL,
                    site=caller.name,
                    conversation_id=conversation_id,
                )
            await self.store.api_keys.add_turns(
                conversation_id,
                [(i, t.role, t.text) for i, t in zip(ids, where.new_turns, strict=True)],
                parent_id=where.parent_id,
                opening=opened if new else None,
                reaction=reaction,
            )

        # written while the engine prefills (off the time to first token); the reply is stored after them
        turns_stored = self.spawn(store_turns(), name=f"openai-turns-{conversation_id}")
        turns_stored.add_done_callback(_log_failure)
        limit = min(
            body.max_completion_tokens or body.max_tokens or self.sampling.max_new_tokens, self.sampling.max_new_tokens
        )
        sampling = SamplingConfig(
            max_new_tokens=limit,
            temperature=self.sampling.temperature if body.temperature is None else body.temperature,
            top_p=self.sampling.top_p if body.top_p is None else body.top_p,
            seed=body.seed,
        )
        return Completion(
            self, conversation_id, turns, parent, where.regenerated_from, pin, sampling, stops, turns_stored
        )

    # --- feedback --------------------------------------------------------------------------

    async def rate(self, caller: Caller, body: FeedbackRequest, idempotency_key: str | None) -> dict[str, Any]:
        if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_CHARS:
            raise ApiError(f"Idempotency-Key: 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters", code=ErrorCode.INVALID)
        if body.value not in (1, -1):
            raise ApiError("value must be 1 (thumbs up) or -1 (thumbs down)", code=ErrorCode.INVALID)
        if body.reason is not None and len(body.reason) > MAX_REASON_CHARS:
            raise ApiError(f"reason: at most {MAX_REASON_CHARS} characters", code=ErrorCode.TOO_LARGE)
        max_comment = Limits().max_comment_chars
        if body.comment is not None and max_comment is not None and len(body.comment) > max_comment:
            raise ApiError(f"comment: at most {max_comment} characters", code=ErrorCode.TOO_LARGE)
        unknown = ApiError(f"no reply {body.id!r} for this API key", code=ErrorCode.NOT_FOUND)
        try:
            message = await self.store.conversations.get_message(body.id)
            conversation = await self.store.conversations.get(message.conversation_id)
        except NotFoundError:
            raise unknown from None
        if (
            message.role is not Role.ASSISTANT
            or message.model_version is None  # a turn the client wrote
            or message.finish_reason is FinishReason.ERROR
            or (conversation.channel, conversation.site) != (CHANNEL, caller.name)
        ):
            raise unknown  # another key's reply reads as unknown: ids do not leak across keys
        rater = conversation.user_id or f"conversation:{conversation.id}"
        retry_after = await self.rating_limiter.check(rater)
        if retry_after is not None:
            raise ApiError("too many ratings from this rater", code=ErrorCode.RATE_LIMITED, retry_after=retry_after)
        rating, created = await self.store.conversations.add_rating(
            message_id=message.id,
            value=body.value,
            rater=rater,
            client_id=idempotency_key or new_id(),
            reason=body.reason,
            comment=body.comment,
        )
        return {"object": "feedback", "id": message.id, "value": rating.value, "created": created}

    def router(self) -> APIRouter:
        router = APIRouter(prefix="/v1")
        caller = Depends(self.caller)

        @router.get("/models")
        async def models(who: Caller = caller) -> dict[str, Any]:
            return {"object": "list", "data": await self.models()}

        @router.get("/models/{model}")
        async def model(model: str, who: Caller = caller) -> dict[str, Any]:
            for m in await self.models():
                if m["id"] == model:
                    return m
            raise ApiError(f"the model {model!r} does not exist", code=ErrorCode.NOT_FOUND)

        @router.post("/chat/completions", response_model=None)
        async def completions(body: ChatRequest, who: Caller = caller) -> JSONResponse | StreamingResponse:
            completion = await self.prepare(who, body)
            if body.stream:
                include_usage = bool((body.stream_options or {}).get("include_usage"))
                return await completion.streaming(include_usage=include_usage)
            return JSONResponse(await completion.whole())

        @router.post("/feedback")
        async def feedback(
            body: FeedbackRequest, who: Caller = caller, idempotency_key: str | None = Header(default=None)
        ) -> dict[str, Any]:
            return await self.rate(who, body, idempotency_key)

        return router


@dataclass
class Completion:
    """One reply to a prepared request: whole (``chat.completion``) or streamed (SSE chunks)."""

    channel: OpenAIChannel
    conversation_id: str
    turns: tuple[ChatTurn, ...]
    parent_id: str  # the user turn it answers
    regenerated_from: str | None
    pin: str | None  # the canary the request named, or None: it follows live
    sampling: SamplingConfig
    stops: tuple[str, ...]
    turns_stored: asyncio.Task[Any]  # the request's new turns; the reply is stored after them

    def __post_init__(self) -> None:
        self.message_id = new_id()
        self.created = int(time.time())
        self.cancel = threading.Event()
        self.version = ""  # set when the engine admits the reply

    async def _reply(self, on_delta: Callable[[str], Any]) -> Reply:
        # picked now, with no await before the engine admits the reply (``stream_reply`` awaits
        # nothing before it): as the websocket gateway does
        self.version = self.channel.serving_version(self.pin)
        return await stream_reply(
            self.channel.store,
            self.channel.engine,
            conversation_id=self.conversation_id,
            context=[Turn("", str(t.role), t.text) for t in self.turns],
            message_id=self.message_id,
            parent_id=self.parent_id,
            version=self.version,
            sampling=self.sampling,
            on_delta=on_delta,
            cancel=self.cancel,
            regenerated_from=self.regenerated_from,
            stop=self.stops,
            before_store=self.turns_stored,
            on_version=self._started_on,
        )

    def _started_on(self, version: str) -> None:
        """The engine started the reply on another version (``version`` was demoted while it
        waited): the chunks still to come name it."""
        self.version = version

    def _usage(self, reply: Reply) -> dict[str, int]:
        prompt = _prompt_tokens(self.channel.engine, self.turns)
        return {"prompt_tokens": prompt, "completion_tokens": reply.n_tokens, "total_tokens": prompt + reply.n_tokens}

    async def whole(self) -> dict[str, Any]:
        async def ignore(delta: str) -> None:
            return None

        reply = await self._reply(ignore)
        if reply.failed:
            raise ApiError("generation failed; details are in the server log", code=ErrorCode.INTERNAL)
        return {
            "id": reply.message_id,
            "object": "chat.completion",
            "created": self.created,
            "model": reply.version,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply.text},
                    "finish_reason": _finish(reply),
                    "logprobs": None,
                }
            ],
            "usage": await asyncio.to_thread(self._usage, reply),
        }

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> str:
        chunk = {
            "id": self.message_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.version,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
        }
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    async def streaming(self, *, include_usage: bool) -> StreamingResponse:
        """Start generating; an error before the first piece of text is an HTTP error, after it an
        SSE ``error`` event. A client that goes away cancels the reply (stored as cancelled)."""
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        async def on_delta(delta: str) -> None:
            events.put_nowait(("delta", delta))

        async def run() -> None:
            try:
                events.put_nowait(("done", await self._reply(on_delta)))
            except Exception as exc:
                events.put_nowait(("error", exc))

        self.channel.spawn(run(), name=f"openai-reply-{self.message_id}")
        first = await events.get()
        if first[0] == "error":
            raise first[1]
        if first[0] == "done" and first[1].failed:
            raise ApiError("generation failed; details are in the server log", code=ErrorCode.INTERNAL)

        async def sse() -> AsyncIterator[str]:
            event = first
            try:
                yield self._chunk({"role": "assistant", "content": ""})
                while True:
                    kind, value = event
                    if kind == "delta":
                        yield self._chunk({"content": value})
                    elif kind == "error":
                        code, message, _ = public_view(value, where=f"reply {self.message_id}")
                        yield _sse_error(code, message)
                        break
                    else:
                        reply: Reply = value
                        if reply.failed:
                            yield _sse_error(ErrorCode.INTERNAL, "generation failed; details are in the server log")
                            break
                        yield self._chunk({}, _finish(reply))
                        if include_usage:
                            usage = await asyncio.to_thread(self._usage, reply)
                            chunk = {**json.loads(self._chunk({})[6:]), "choices": [], "usage": usage}
                            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
                        break
                    event = await events.get()
                yield "data: [DONE]\n\n"
            finally:
                # a no-op after the end; when the client went away, the engine stops at its next step
                # and the task (held by the channel, never awaited here: awaiting a task from a
                # cancelled one cancels it) stores the reply as cancelled
                self.cancel.set()

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _log_failure(task: asyncio.Task[Any]) -> None:
    """A failed write of a request's turns fails its reply (``before_store``); logged here in case
    no reply awaited it (the engine refused the request first)."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("storing the turns of an API request failed: %s", exc)


def _finish(reply: Reply) -> str:
    return "length" if str(reply.finish_reason) == "length" else "stop"


def _sse_error(code: ErrorCode | str, message: str) -> str:
    error = {"code": str(code), "message": message, "type": openai_error_type(str(code))}
    return f"data: {json.dumps({'error': error}, ensure_ascii=False)}\n\n"


def _prompt_tokens(engine: Engine, turns: tuple[ChatTurn, ...]) -> int:
    """Tokens of the prompt as the engine renders it (0 for an engine that does not tokenise here)."""
    render = getattr(engine, "prompt_ids", None)
    if render is None:
        return 0
    return len(render([{"role": str(t.role), "content": t.text} for t in turns]))
