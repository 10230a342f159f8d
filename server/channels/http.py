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

import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from feedback.exceptions import ErrorCode
from server.errors import ApiError, error_response, install_error_handlers
from server.ratelimit import KeyedRateLimiter
from server.settings import ChannelsConfig

_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]


ErrorFields = Callable[[str], dict[str, Any]]
"""Fields added to the error envelope of some paths (the OpenAI-compatible API adds ``type``), by code."""


def _with_headers(send: Send) -> Send:
    async def headed(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), *_HEADERS]
        await send(message)

    return headed


def _with_error_fields(send: Send, fields: ErrorFields) -> Send:
    """Add ``fields(code)`` to every JSON error envelope sent (the whole body is held until it ends)."""
    start: Message | None = None
    body = b""

    async def extended(message: Message) -> None:
        nonlocal start, body
        if message["type"] == "http.response.start":
            headers = dict(message.get("headers", []))
            if message["status"] >= 400 and headers.get(b"content-type", b"").startswith(b"application/json"):
                start = message
                return
        elif message["type"] == "http.response.body" and start is not None:
            body += message.get("body", b"")
            if message.get("more_body", False):
                return
            envelope = json.loads(body)
            error = envelope.get("error") if isinstance(envelope, dict) else None
            if isinstance(error, dict) and "code" in error:
                error.update(fields(str(error["code"])))
                body = json.dumps(envelope, ensure_ascii=False).encode()
            kept = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
            await send({**start, "headers": [*kept, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await send(message)

    return extended


class _Guard:
    """ASGI middleware: requests per client address, then the body size (declared or streamed);
    a few headers on every answer. Plain ASGI, not BaseHTTPMiddleware, so that a body refused
    while a route reads it reaches the route's error handler unwrapped."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        requests_per_minute: float,
        error_fields: Mapping[str, ErrorFields],
    ) -> None:
        self.app = app
        self.error_fields = error_fields
        self.max_body_bytes = max_body_bytes
        per_minute = requests_per_minute or None  # 0: no limit
        self.limiter = KeyedRateLimiter(per_minute=per_minute, burst=max(1, int(requests_per_minute)))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = _with_headers(send)
        for prefix, fields in self.error_fields.items():
            if scope["path"].startswith(prefix):
                send = _with_error_fields(send, fields)
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


def create_channels_app(
    config: ChannelsConfig, *, routers: Sequence[APIRouter] = (), error_fields: Mapping[str, ErrorFields] | None = None
) -> FastAPI:
    """The listener's app with ``routers`` mounted, the limits of ``config`` and the error envelope
    (``error_fields``: more fields in the envelope of the paths under a prefix)."""
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
    app.add_middleware(
        _Guard,
        max_body_bytes=config.max_body_bytes,
        requests_per_minute=config.requests_per_minute,
        error_fields=dict(error_fields or {}),
    )
    return app
