"""Local stand-ins for the IM platforms, which tests cannot reach (api.telegram.org, slack.com).

Each is a small FastAPI app under uvicorn on a loopback port that answers the documented
request and response shapes, records every call, and can be stopped and started again on
the same port (an outage). They are test doubles of the *platforms*, not of learnloop: the
server under test talks to them over real HTTP exactly as it would to the real APIs.

- ``TelegramStandIn``: ``POST /bot<token>/<method>`` (JSON or form bodies): ``sendMessage``,
  ``editMessageText``, ``editMessageReplyMarkup``, ``answerCallbackQuery``, ``setWebhook``;
  ``{"ok": true, "result": ...}`` or ``{"ok": false, "error_code", "description"}`` as the Bot
  API answers ("message is not modified" for an edit that changes nothing).
- ``SlackStandIn``: ``chat.postMessage``, ``chat.update`` and ``conversations.replies`` (with
  message ``metadata`` when ``include_all_metadata``), Bearer token checked; ``post_delay_s``
  answers a post late (it is stored first, as on a slow Slack) to make a client time out.
- ``WebhookReceiver``: a Standard Webhooks receiver that checks ``webhook-signature`` with
  its own implementation of the specification and records what it received.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
import time
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from server.listener import RunningListener, serve_app


class StandIn:
    """A FastAPI app on a loopback port that can go down and come back on the same port."""

    def __init__(self) -> None:
        self.app = FastAPI()
        self.port = 0
        self._running: RunningListener | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._running = await serve_app(self.app, host="127.0.0.1", port=self.port, name=type(self).__name__)
        self.port = self._running.port

    async def stop(self) -> None:
        if self._running is not None:
            await self._running.stop()
            self._running = None


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if request.headers.get("content-type", "").startswith("application/json"):
        return dict(json.loads(raw))
    return {k: _maybe_json(v) for k, v in parse_qsl(raw.decode())}


def _maybe_json(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


class TelegramStandIn(StandIn):
    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.messages: dict[tuple[int, int], dict[str, Any]] = {}  # (chat_id, message_id) -> message
        self._ids = itertools.count(1000)

        @self.app.post("/bot{token}/{method}")
        async def method(token: str, method: str, request: Request) -> Response:
            if token != self.token:
                return self._error(401, "Unauthorized")
            body = await _body(request)
            self.calls.append((method, body))
            return self._answer(method, body)

    def calls_of(self, method: str) -> list[dict[str, Any]]:
        return [body for name, body in self.calls if name == method]

    @staticmethod
    def _error(code: int, description: str) -> JSONResponse:
        return JSONResponse({"ok": False, "error_code": code, "description": description}, status_code=code)

    def _answer(self, method: str, body: dict[str, Any]) -> Response:
        if method == "sendMessage":
            message = {
                "message_id": next(self._ids),
                "chat": {"id": int(body["chat_id"]), "type": "private"},
                "date": int(time.time()),
                "text": body["text"],
                **({"reply_markup": body["reply_markup"]} if "reply_markup" in body else {}),
            }
            self.messages[(int(body["chat_id"]), message["message_id"])] = message
            return JSONResponse({"ok": True, "result": message})
        if method in ("editMessageText", "editMessageReplyMarkup"):
            message = self.messages.get((int(body["chat_id"]), int(body["message_id"])))
            if message is None:
                return self._error(400, "Bad Request: message to edit not found")
            changed = {k: body[k] for k in ("text", "reply_markup") if k in body}
            if all(message.get(k) == v for k, v in changed.items()):
                return self._error(
                    400,
                    "Bad Request: message is not modified: specified new message content and reply markup are "
                    "exactly the same as a current content and reply markup of the message",
                )
            message.update(changed)
            return JSONResponse({"ok": True, "result": message})
        if method in ("answerCallbackQuery", "setWebhook"):
            return JSONResponse(
                {"ok": True, "result": True, **({"description": "Webhook was set"} if method == "setWebhook" else {})}
            )
        return self._error(404, "Not Found")


class SlackStandIn(StandIn):
    def __init__(self, bot_token: str) -> None:
        super().__init__()
        self.bot_token = bot_token
        self.posts: list[dict[str, Any]] = []  # every chat.postMessage accepted
        self.updates: list[dict[str, Any]] = []
        self.replies_checks = 0
        self.post_delay_s = 0.0
        self.messages: dict[str, list[dict[str, Any]]] = {}  # channel -> messages
        self._ts = itertools.count(1)

        def authorized(request: Request) -> bool:
            return request.headers.get("authorization") == f"Bearer {self.bot_token}"

        @self.app.post("/chat.postMessage")
        async def post_message(request: Request) -> Response:
            if not authorized(request):
                return JSONResponse({"ok": False, "error": "invalid_auth"})
            body = await _body(request)
            ts = f"{int(time.time())}.{next(self._ts):06d}"
            message = {"type": "message", "ts": ts, "text": body.get("text", ""), "bot_id": "BSTANDIN"}
            message |= {k: body[k] for k in ("thread_ts", "blocks", "metadata") if k in body}
            self.messages.setdefault(body["channel"], []).append(message)
            self.posts.append(body | {"ts": ts})
            if self.post_delay_s:
                await asyncio.sleep(self.post_delay_s)  # posted, but the answer comes late
            return JSONResponse({"ok": True, "channel": body["channel"], "ts": ts, "message": message})

        @self.app.post("/chat.update")
        async def update(request: Request) -> Response:
            if not authorized(request):
                return JSONResponse({"ok": False, "error": "invalid_auth"})
            body = await _body(request)
            found = [m for m in self.messages.get(body["channel"], []) if m["ts"] == body["ts"]]
            if not found:
                return JSONResponse({"ok": False, "error": "message_not_found"})
            found[0].update({k: body[k] for k in ("text", "blocks") if k in body})
            self.updates.append(body)
            return JSONResponse({"ok": True, "channel": body["channel"], "ts": body["ts"], "text": found[0]["text"]})

        @self.app.get("/conversations.replies")
        async def replies(request: Request, channel: str, ts: str, include_all_metadata: str = "false") -> Response:
            if not authorized(request):
                return JSONResponse({"ok": False, "error": "invalid_auth"})
            self.replies_checks += 1
            thread = [m for m in self.messages.get(channel, []) if m.get("thread_ts", m["ts"]) == ts]
            if include_all_metadata != "true":
                thread = [{k: v for k, v in m.items() if k != "metadata"} for m in thread]
            return JSONResponse({"ok": True, "messages": thread, "has_more": False})


class WebhookReceiver(StandIn):
    """Receives our signed ``reply.created`` events (a customer's endpoint)."""

    def __init__(self, secret: str, *, tolerance_s: float = 300) -> None:
        super().__init__()
        self.key = base64.b64decode(secret.removeprefix("whsec_"))
        self.received: list[tuple[str, dict[str, Any]]] = []  # (webhook-id, event), each valid delivery
        self.refused = 0
        self.status = 204

        @self.app.post("/")
        async def receive(request: Request) -> Response:
            body = await request.body()
            msg_id = request.headers.get("webhook-id", "")
            stamp = request.headers.get("webhook-timestamp", "0")
            signed = f"{msg_id}.{stamp}.".encode() + body
            expected = base64.b64encode(hmac.new(self.key, signed, hashlib.sha256).digest()).decode()
            listed = [
                s.split(",", 1)[1] for s in request.headers.get("webhook-signature", "").split() if s.startswith("v1,")
            ]
            fresh = abs(time.time() - int(stamp)) <= tolerance_s
            if not fresh or not any(hmac.compare_digest(expected, s) for s in listed):
                self.refused += 1
                return Response(status_code=401)
            self.received.append((msg_id, json.loads(body)))
            return Response(status_code=self.status)
