"""The public channels listener: one FastAPI app under an embedded uvicorn server.

It runs beside the websocket gateway and apart from the operator console, which keeps its
own operator-only listener. A channel is an ``APIRouter``; ``create_channels_app(config,
routers=[...])`` mounts them, so a new channel (the OpenAI-compatible API, an IM webhook)
is one more router and inherits the limits and the error envelope below.

Every answer that is not a success is one envelope, ``{"error": {"code", "message"}}``, with
the HTTP status of its code (``feedback.exceptions.HTTP_STATUS``): an unknown path (404), a
wrong method (405, with ``Allow``), a body over ``channels.max_body_bytes`` (413), more than
``channels.requests_per_minute`` from one client address (429 with ``Retry-After``), a body
that does not match a route's schema (422) and unexpected errors (500; details only in the
log).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from fastapi import APIRouter, FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from feedback.exceptions import ErrorCode
from server.errors import ApiError, error_response, install_error_handlers
from server.ratelimit import KeyedRateLimiter
from server.settings import ChannelsConfig

_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]


def _with_headers(send: Send) -> Send:
    async def headed(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), *_HEADERS]
        await send(message)

    return headed


class _Guard:
    """ASGI middleware: requests per client address, then the body size (declared or streamed);
    a few headers on every answer. Plain ASGI, not BaseHTTPMiddleware, so that a body refused
    while a route reads it reaches the route's error handler unwrapped."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, requests_per_minute: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        per_minute = requests_per_minute or None  # 0: no limit
        self.limiter = KeyedRateLimiter(per_minute=per_minute, burst=max(1, int(requests_per_minute)))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = _with_headers(send)
        client = scope.get("client")
        retry = self.limiter.check(client[0] if client else "?", time.monotonic())
        if retry is not None:
            response = error_response(
                ErrorCode.RATE_LIMITED,
                f"more than {self.limiter.per_minute:g} requests a minute from this address",
                retry_after=retry,
            )
            await response(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await error_response(ErrorCode.TOO_LARGE, self._too_large_message())(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            # a chunked body has no length up front: count it as the route reads it
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise ApiError(self._too_large_message(), code=ErrorCode.TOO_LARGE)
            return message

        await self.app(scope, counted, send)

    def _too_large_message(self) -> str:
        return f"the request body is over {self.max_body_bytes} bytes (channels.max_body_bytes)"


def create_channels_app(config: ChannelsConfig, *, routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The listener's app with ``routers`` mounted, the limits of ``config`` and the error envelope."""
    app = FastAPI(
        title="learnloop channels",
        version="1",
        description="Public ways in: the chat widget (see docs/channels.md).",
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    for router in routers:
        app.include_router(router)

    install_error_handlers(app)
    app.add_middleware(_Guard, max_body_bytes=config.max_body_bytes, requests_per_minute=config.requests_per_minute)
    return app
