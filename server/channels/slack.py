"""Slack: an app's Events API and interactivity endpoints over the Web API.

- ``POST /hooks/slack/{app}/events`` (Event Subscriptions' Request URL) and
  ``POST /hooks/slack/{app}/interactivity`` (Interactivity's Request URL): every request is
  checked against the app's signing secret over the raw body (``signing.verify_slack``: ``v0``,
  five-minute window, else 401); ``url_verification`` echoes its ``challenge``.
- A user's message (a DM to the app, a mention in a channel, or a message in a thread the app
  answers in) is stored in the inbox and acknowledged at once (Slack wants a 2xx within 3 s);
  the reply follows with ``chat.postMessage`` in the thread of the user's message. One
  conversation per Slack thread. Slack redelivers an event it got no 2xx for
  (``X-Slack-Retry-Num``, same ``event_id``); the inbox key is the message's channel and
  ``ts``, so a redelivery, and the ``message`` and ``app_mention`` events of the same mention,
  are answered once. Messages from bots (``bot_id``, ``bot_message``), our own included, and
  edits or other subtypes are ignored, so two bots never answer each other forever.
- Under every reply, 👍 and 👎 buttons (Block Kit, ``value`` = the reply's id). A press comes
  to the interactivity URL as a form field ``payload`` (``block_actions``), is stored as a
  rating by ``slack:<team>:<user>`` and shown with ``chat.update`` (the buttons stay: others
  may vote too).

``chat.postMessage`` has no idempotency key, so each one carries its outbox key in the
message's ``metadata``; an attempt whose outcome is unknown (a crash before the outbox's
commit, a timeout) is checked with ``conversations.replies`` before posting again.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import parse_qs

import httpx
from fastapi import APIRouter, Request, Response

from feedback.exceptions import ErrorCode
from feedback.outbox import OutboxItem, OutboxRow
from server.channels.config import SlackConfig
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
from server.channels.signing import verify_slack
from server.errors import ApiError

log = logging.getLogger("learnloop.channels.slack")

ACTIONS = {"learnloop_up": 1, "learnloop_down": -1}
THUMBS = {1: "👍", -1: "👎"}
METADATA_TYPE = "learnloop_reply"
SECTION_CHARS = 3000  # a section block's text limit
TEXT_CHARS = 39000  # a message's text is cut at 40,000 characters
RETRYABLE = {"ratelimited", "service_unavailable", "internal_error", "fatal_error", "request_timeout"}
USER_SUBTYPES = {"thread_broadcast", "file_share"}  # the only subtypes answered: other subtypes are not a user writing
_MENTION = re.compile(r"<@[A-Z0-9]+>")


# --- pure: events in, calls out ------------------------------------------------------------


def rater(team: str, user: str) -> str:
    return f"slack:{team}:{user}"


def thread_key(team: str, channel: str, thread_ts: str) -> str:
    return f"{team}:{channel}:{thread_ts}"


def our_bot_user(body: Mapping[str, Any]) -> str | None:
    """The app's bot user, from the event's ``authorizations`` (its own messages are never answered)."""
    for authorization in body.get("authorizations") or []:
        if authorization.get("is_bot"):
            return str(authorization.get("user_id"))
    return None


def parse_event(body: Mapping[str, Any]) -> Inbound | None:
    """The message an ``event_callback`` brings to answer, or None (bots, edits, unrelated chatter)."""
    event = body.get("event") or {}
    kind, subtype = event.get("type"), event.get("subtype")
    if kind not in ("message", "app_mention"):
        return None
    user, channel, ts = event.get("user"), event.get("channel"), event.get("ts")
    if event.get("bot_id") or (subtype is not None and subtype not in USER_SUBTYPES):
        return None  # bots (us included), edits, deletions, joins
    if not user or not channel or not ts or user == our_bot_user(body):
        return None
    text = _MENTION.sub("", str(event.get("text") or "")).strip()
    team = str(body.get("team_id") or event.get("team") or "")
    thread_ts = event.get("thread_ts") or ts
    in_dm = event.get("channel_type") == "im"
    if kind == "message" and not in_dm and not event.get("thread_ts"):
        return None  # channel chatter: the app answers mentions (app_mention) and its own threads
    return Inbound(
        kind=EventKind.MESSAGE,
        key=f"message:{channel}:{ts}",
        thread=thread_key(team, channel, thread_ts),
        user=rater(team, user),
        text=text,
        known_thread_only=kind == "message" and not in_dm,
        address={"channel": channel, "thread_ts": thread_ts, "team": team},
    )


def parse_actions(payload: Mapping[str, Any]) -> list[Inbound]:
    """The thumbs pressed in a ``block_actions`` payload (other actions are not ours)."""
    if payload.get("type") != "block_actions":
        return []
    user = payload.get("user") or {}
    team = str((payload.get("team") or {}).get("id") or user.get("team_id") or "")
    container = payload.get("container") or {}
    message = payload.get("message") or {}
    channel = (payload.get("channel") or {}).get("id") or container.get("channel_id")
    ts = container.get("message_ts") or message.get("ts")
    if not channel or not ts or not user.get("id"):
        return []
    thread_ts = message.get("thread_ts") or container.get("thread_ts") or ts
    events = []
    for action in payload.get("actions") or []:
        value = ACTIONS.get(str(action.get("action_id")))
        if value is None or not action.get("value"):
            continue
        events.append(
            Inbound(
                kind=EventKind.RATING,
                key=f"action:{channel}:{ts}:{user['id']}:{action.get('action_ts')}",
                thread=thread_key(team, channel, thread_ts),
                user=rater(team, user["id"]),
                message_id=str(action["value"]),
                value=value,
                address={"channel": channel, "ts": ts, "thread_ts": thread_ts, "user": user["id"]},
            )
        )
    return events


def reply_blocks(text: str, message_id: str, *, vote: tuple[int, str] | None = None) -> list[dict[str, Any]]:
    """The reply as sections, then 👍 and 👎 buttons, then (after a vote) who voted what."""
    text = text if text.strip() else "…"
    chunks = [text[i : i + SECTION_CHARS] for i in range(0, len(text), SECTION_CHARS)][:45]
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "plain_text", "text": chunk, "emoji": True}} for chunk in chunks
    ]
    buttons = [
        {
            "type": "button",
            "action_id": action_id,
            "text": {"type": "plain_text", "text": THUMBS[value], "emoji": True},
            "value": message_id,
        }
        for action_id, value in ACTIONS.items()
    ]
    blocks.append({"type": "actions", "block_id": "learnloop_rating", "elements": buttons})
    if vote is not None:
        value, user = vote
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": f"{THUMBS[value]} from <@{user}>"}]})
    return blocks


def post_message(event: Inbound, reply: ReplyView, *, key: str) -> dict[str, Any]:
    """``chat.postMessage`` in the thread of the user's message, carrying ``key`` in its metadata."""
    return {
        "channel": event.address["channel"],
        "thread_ts": event.address["thread_ts"],
        "text": (reply.text or "…")[:TEXT_CHARS],
        "blocks": reply_blocks(reply.text, reply.message_id),
        "metadata": {"event_type": METADATA_TYPE, "event_payload": {"key": key}},
    }


def classify(status: int, headers: Mapping[str, str], answer: Mapping[str, Any]) -> Outcome:
    """A Web API answer: HTTP 429 with Retry-After, else ``{"ok": true}`` or ``{"ok": false, "error"}``."""
    if status == 429 or status >= 500:
        return Retry(f"HTTP {status}", retry_after=retry_after_header(headers))
    if status == 200 and answer.get("ok"):
        return Delivered({k: answer[k] for k in ("channel", "ts") if k in answer})
    error = str(answer.get("error") or f"HTTP {status}")
    return Retry(error) if error in RETRYABLE else Failed(error)


def posted_with_key(answer: Mapping[str, Any], key: str) -> str | None:
    """The ``ts`` of a message in a ``conversations.replies`` answer that carries ``key``, if any."""
    for message in answer.get("messages") or []:
        metadata = message.get("metadata") or {}
        if metadata.get("event_type") == METADATA_TYPE and (metadata.get("event_payload") or {}).get("key") == key:
            return str(message.get("ts"))
    return None


# --- I/O: the Web API ------------------------------------------------------------------------


class SlackPlatform:
    """One Slack app: its Web API calls and its answers as outbox rows."""

    channel = Channel.SLACK

    def __init__(self, site: str, config: SlackConfig, client: httpx.AsyncClient) -> None:
        assert config.bot_token is not None
        self.site = site
        self.greeting = DEFAULT_GREETING
        self._base = config.api_base.rstrip("/")
        self._headers = {"Authorization": f"Bearer {config.bot_token.reveal()}"}
        self._client = client

    async def call(self, method: str, body: Mapping[str, Any]) -> Outcome:
        try:
            response = await self._client.post(f"{self._base}/{method}", json=body, headers=self._headers)
        except httpx.TransportError as exc:
            return transport_outcome(exc)
        return classify(response.status_code, response.headers, _json(response))

    async def deliver(self, row: OutboxRow) -> Outcome:
        if row.method == "chat.postMessage" and row.uncertain:
            # the last attempt may have posted it: look for its key before posting again
            try:
                response = await self._client.get(
                    f"{self._base}/conversations.replies",
                    params={
                        "channel": row.body["channel"],
                        "ts": row.body["thread_ts"],
                        "include_all_metadata": "true",
                        "limit": "200",
                    },
                    headers=self._headers,
                )
            except httpx.TransportError as exc:
                return transport_outcome(exc)
            answer = _json(response)
            if response.status_code != 200 or not answer.get("ok"):
                return Retry(f"conversations.replies: {answer.get('error') or response.status_code}", uncertain=True)
            ts = posted_with_key(answer, row.key)
            if ts is not None:
                return Delivered({"channel": row.body["channel"], "ts": ts, "found": True})
        return await self.call(row.method, row.body)

    def _item(
        self, event: Inbound, key: str, method: str, body: dict[str, Any], conversation_id: str | None
    ) -> OutboxItem:
        part = thread_key(event.address.get("team", ""), event.address["channel"], event.address["thread_ts"])
        return OutboxItem(
            key, self.channel, self.site, lane(self.channel, self.site, part), method, body, conversation_id
        )

    def reply(self, event: Inbound, reply: ReplyView, *, shown: Mapping[str, Any]) -> list[OutboxItem]:
        key = f"reply:{reply.message_id}"
        return [self._item(event, key, "chat.postMessage", post_message(event, reply, key=key), reply.conversation_id)]

    def notice(self, event: Inbound, text: str, *, key: str) -> list[OutboxItem]:
        body = {"channel": event.address["channel"], "thread_ts": event.address["thread_ts"], "text": text}
        body["metadata"] = {"event_type": METADATA_TYPE, "event_payload": {"key": key}}
        return [self._item(event, key, "chat.postMessage", body, None)]

    def vote(self, event: Inbound, reply: ReplyView) -> list[OutboxItem]:
        body = {
            "channel": event.address["channel"],
            "ts": event.address["ts"],
            "text": (reply.text or "…")[:TEXT_CHARS],
            "blocks": reply_blocks(reply.text, reply.message_id, vote=(event.value, event.address["user"])),
        }
        return [
            self._item(
                event, f"vote:{self.channel}:{self.site}:{event.key}", "chat.update", body, reply.conversation_id
            )
        ]

    async def acknowledge(self, event: Inbound, text: str) -> None:
        return None  # the interactivity request's 200 is the acknowledgement

    def preview(self, event: Inbound, *, shown: Mapping[str, Any], remember: Remember) -> Preview | None:
        return None


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        answer = response.json()
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


# --- the endpoints --------------------------------------------------------------------------

Receive = Callable[[Channel, str, Inbound], Awaitable[bool]]


def slack_router(apps: Mapping[str, SlackConfig], *, receive: Receive) -> APIRouter:
    """The Events API and interactivity URLs of each configured app."""
    router = APIRouter()

    async def verified(app: str, request: Request) -> bytes:
        config = apps.get(app)
        if config is None:
            raise ApiError(f"no Slack app {app!r} is configured", code=ErrorCode.NOT_FOUND)
        raw = await request.body()
        assert config.signing_secret is not None
        verify_slack(config.signing_secret.reveal(), request.headers, raw, now=time.time())
        return raw

    @router.post("/hooks/slack/{app}/events", include_in_schema=False)
    async def events(app: str, request: Request) -> Response:
        raw = await verified(app, request)
        try:
            body = json.loads(raw)
        except ValueError:
            raise ApiError("the body is not JSON", code=ErrorCode.BAD_REQUEST) from None
        if not isinstance(body, dict):
            raise ApiError("an event is a JSON object", code=ErrorCode.BAD_REQUEST)
        if body.get("type") == "url_verification":
            return Response(json.dumps({"challenge": body.get("challenge")}), media_type="application/json")
        retry = request.headers.get("x-slack-retry-num")
        if retry:
            log.info(
                "Slack redelivers %s (try %s: %s)",
                body.get("event_id"),
                retry,
                request.headers.get("x-slack-retry-reason"),
            )
        event = parse_event(body) if body.get("type") == "event_callback" else None
        if event is not None:
            await receive(Channel.SLACK, app, event)
        return Response(status_code=200)

    @router.post("/hooks/slack/{app}/interactivity", include_in_schema=False)
    async def interactivity(app: str, request: Request) -> Response:
        raw = await verified(app, request)
        try:
            payload = json.loads(parse_qs(raw.decode())["payload"][0])
        except (KeyError, IndexError, ValueError, UnicodeDecodeError):
            raise ApiError("the body is a form with a JSON 'payload' field", code=ErrorCode.BAD_REQUEST) from None
        for event in parse_actions(payload if isinstance(payload, dict) else {}):
            await receive(Channel.SLACK, app, event)
        return Response(status_code=200)

    return router
