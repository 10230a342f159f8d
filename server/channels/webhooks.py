"""Signed webhooks for other IM clouds, following Standard Webhooks both ways.

Inbound, ``POST /hooks/webhook/{name}`` with ``webhook-id``, ``webhook-timestamp`` and
``webhook-signature`` (``signing.verify_standard``, the ``[webhooks.NAME]`` secret and
``tolerance_s``; else 401) and a JSON event::

    {"type": "message.created", "timestamp": "...",
     "data": {"thread": "t-42", "user": "u-7", "text": "Where is my order?", "new_conversation": false}}
    {"type": "rating.created", "timestamp": "...",
     "data": {"message_id": "<a reply's message_id>", "value": -1, "user": "u-7",
              "reason": "incorrect", "comment": "..."}}

``webhook-id`` is the inbox key: a redelivery is acknowledged (``"duplicate"``) and not
processed again. One conversation per ``thread``; ratings count under ``webhook:<name>:<user>``.

Outbound, each reply is POSTed to ``outbound_url`` as a ``reply.created`` event, signed the
same way with a fresh ``webhook-timestamp`` per attempt and a ``webhook-id`` that stays
``msg_<message_id>`` on every retry, so the receiver can drop repeats (which is why a retry
after an unknown outcome is safe here)::

    {"type": "reply.created", "timestamp": "...",
     "data": {"thread": "t-42", "conversation_id": "...", "message_id": "...", "in_reply_to": "<webhook-id>",
              "text": "...", "finish_reason": "stop", "model_version": "base"}}

A 2xx delivers it; ``410 Gone`` gives it up; any other answer (``Retry-After`` honoured) or
none is tried again with backoff, as the specification asks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal

import httpx
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field, ValidationError

from feedback.exceptions import ErrorCode
from feedback.outbox import OutboxItem, OutboxRow
from server.channels.config import WebhookConfig, webhook_key
from server.channels.im import (
    DEFAULT_GREETING,
    Channel,
    Delivered,
    EventKind,
    Failed,
    Inbound,
    Outcome,
    Preview,
    Remember,
    ReplyView,
    Retry,
    lane,
    retry_after_header,
    transport_outcome,
)
from server.channels.signing import sign_standard, verify_standard
from server.errors import ApiError


class MessageData(BaseModel):
    thread: str = Field(min_length=1, max_length=200)
    user: str = Field(min_length=1, max_length=200)
    text: str = Field(min_length=1)
    new_conversation: bool = False


class RatingData(BaseModel):
    message_id: str = Field(min_length=1, max_length=200)
    value: Literal[1, -1]
    user: str = Field(min_length=1, max_length=200)
    reason: str | None = Field(default=None, max_length=200)
    comment: str | None = Field(default=None, max_length=2000)


class MessageCreated(BaseModel):
    type: Literal["message.created"]
    timestamp: str | None = None
    data: MessageData


class RatingCreated(BaseModel):
    type: Literal["rating.created"]
    timestamp: str | None = None
    data: RatingData


class _Event(BaseModel):
    event: MessageCreated | RatingCreated = Field(discriminator="type")


def rater(name: str, user: str) -> str:
    return f"webhook:{name}:{user}"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_event(name: str, msg_id: str, body: bytes, *, max_text_chars: int) -> Inbound:
    """The event of a verified request; ApiError ``invalid`` (422) when it is not one of ours."""
    try:
        event = _Event.model_validate({"event": json.loads(body)}).event
    except (ValueError, ValidationError) as exc:
        detail = (
            "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in exc.errors())
            if isinstance(exc, ValidationError)
            else "not JSON"
        )
        raise ApiError(f"not a message.created or rating.created event: {detail}", code=ErrorCode.INVALID) from None
    if isinstance(event, RatingCreated):
        r = event.data
        return Inbound(
            kind=EventKind.RATING,
            key=msg_id,
            thread=None,
            user=rater(name, r.user),
            message_id=r.message_id,
            value=r.value,
            reason=r.reason,
            comment=r.comment,
        )
    m = event.data
    if len(m.text) > max_text_chars:
        raise ApiError(f"text has {len(m.text)} characters; at most {max_text_chars}", code=ErrorCode.TOO_LARGE)
    return Inbound(
        kind=EventKind.MESSAGE,
        key=msg_id,
        thread=m.thread,
        user=rater(name, m.user),
        text=m.text,
        new_conversation=m.new_conversation,
        address={"thread": m.thread, "webhook_id": msg_id},
    )


def reply_event(event: Inbound, reply: ReplyView) -> dict[str, Any]:
    return {
        "type": "reply.created",
        "timestamp": now_iso(),
        "data": {
            "thread": event.address["thread"],
            "conversation_id": reply.conversation_id,
            "message_id": reply.message_id,
            "in_reply_to": event.address["webhook_id"],
            "text": reply.text,
            "finish_reason": reply.finish_reason,
            "model_version": reply.version,
        },
    }


def classify(status: int, headers: Mapping[str, str]) -> Outcome:
    if 200 <= status < 300:
        return Delivered({"status": status})
    if status == 410:
        return Failed("410 Gone: the receiver wants no more webhooks")
    return Retry(f"HTTP {status}", retry_after=retry_after_header(headers))


class WebhookPlatform:
    """One sender of Standard Webhooks: our replies go back to its ``outbound_url``."""

    channel = Channel.WEBHOOK

    def __init__(self, site: str, config: WebhookConfig, client: httpx.AsyncClient) -> None:
        assert config.secret is not None and config.outbound_url is not None
        self.site = site
        self.greeting = DEFAULT_GREETING
        self._key = webhook_key(config.secret)
        self._url = config.outbound_url
        self._client = client

    async def deliver(self, row: OutboxRow) -> Outcome:
        body = json.dumps(row.body, ensure_ascii=False, separators=(",", ":")).encode()
        headers = sign_standard(self._key, row.key, int(time.time()), body)  # the attempt's own timestamp
        headers["content-type"] = "application/json"
        try:
            response = await self._client.post(self._url, content=body, headers=headers)
        except httpx.TransportError as exc:
            return transport_outcome(exc)
        return classify(response.status_code, response.headers)

    def _item(
        self, event: Inbound, key: str, method: str, body: dict[str, Any], conversation_id: str | None
    ) -> OutboxItem:
        part = event.address.get("thread") or event.key
        return OutboxItem(
            key, self.channel, self.site, lane(self.channel, self.site, part), method, body, conversation_id
        )

    def reply(self, event: Inbound, reply: ReplyView, *, shown: Mapping[str, Any]) -> list[OutboxItem]:
        key = f"msg_{reply.message_id}"  # the webhook-id of every attempt
        return [self._item(event, key, "reply.created", reply_event(event, reply), reply.conversation_id)]

    def notice(self, event: Inbound, text: str, *, key: str) -> list[OutboxItem]:
        body = {
            "type": "notice.created",
            "timestamp": now_iso(),
            "data": {"thread": event.address.get("thread"), "in_reply_to": event.key, "text": text},
        }
        return [self._item(event, f"msg_notice_{key.replace(':', '_')}", "notice.created", body, None)]

    def vote(self, event: Inbound, reply: ReplyView) -> list[OutboxItem]:
        return []  # the sender shows its own ratings

    async def acknowledge(self, event: Inbound, text: str) -> None:
        return None

    def preview(self, event: Inbound, *, shown: Mapping[str, Any], remember: Remember) -> Preview | None:
        return None


Receive = Callable[[Channel, str, Inbound], Awaitable[bool]]


def webhook_router(senders: Mapping[str, WebhookConfig], *, receive: Receive, max_text_chars: int) -> APIRouter:
    """``POST /hooks/webhook/{name}``: verified, stored once per ``webhook-id``, answered 200."""
    router = APIRouter()
    keys = {name: webhook_key(config.secret) for name, config in senders.items() if config.secret is not None}

    @router.post("/hooks/webhook/{name}", include_in_schema=False)
    async def inbound(name: str, request: Request) -> Response:
        config = senders.get(name)
        if config is None:
            raise ApiError(f"no webhook sender {name!r} is configured", code=ErrorCode.NOT_FOUND)
        raw = await request.body()
        msg_id = verify_standard(keys[name], request.headers, raw, now=time.time(), tolerance_s=config.tolerance_s)
        event = parse_event(name, msg_id, raw, max_text_chars=max_text_chars)
        new = await receive(Channel.WEBHOOK, name, event)
        return Response(json.dumps({"status": "accepted" if new else "duplicate"}), media_type="application/json")

    return router
