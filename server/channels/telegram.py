"""Telegram: a bot's webhook (``POST /hooks/telegram/{bot}``) over the Bot API.

Telegram POSTs each ``Update`` as JSON with the ``secret_token`` given to ``setWebhook`` in
``X-Telegram-Bot-Api-Secret-Token`` (checked in constant time, else 401), and redelivers an
update until it gets a 2xx: the ``update_id`` is the inbox key, so a redelivery (also after a
restart) is processed once. One conversation per chat; a message starting with the bot's
``new_conversation_command`` (``/start``) begins a new one.

A reply streams into one message: ``sendMessage`` once some text exists, then
``editMessageText`` at most every ``edit_interval_ms`` (direct calls, best effort); its final
state goes through the outbox, as an ``editMessageText`` of that message when there is one
(repeating an edit is harmless: "message is not modified" counts as delivered) or a
``sendMessage``. Under every reply, an inline keyboard with 👍 and 👎 (``callback_data``
``ll:+1:<message id>``): a press arrives as a ``callback_query``, is stored as a rating by
``telegram:<user id>``, answered with ``answerCallbackQuery`` and shown by marking the
chosen thumb (``editMessageReplyMarkup``).

The Bot API has no idempotency key: a ``sendMessage`` whose answer was lost (a crash between
Telegram's answer and the outbox's commit, or a read timeout) is sent again, so the same
message can appear twice. That window is one HTTP answer plus one SQLite commit; edits
(every final state of a streamed reply) are idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httpx
from fastapi import APIRouter, Request, Response

from feedback.exceptions import ErrorCode
from feedback.outbox import OutboxItem, OutboxRow
from server.channels.config import TelegramConfig
from server.channels.im import (
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
    transport_outcome,
)
from server.channels.signing import check_telegram_secret
from server.errors import ApiError

log = logging.getLogger("learnloop.channels.telegram")

MAX_TEXT = 4096  # the Bot API's limit on a message's text
THUMBS = {1: "👍", -1: "👎"}
CALLBACK_PREFIX = "ll"
STREAMING_MARK = " …"  # on a streamed message until its final state


# --- pure: updates in, calls out -----------------------------------------------------------


def rater(user_id: int | str) -> str:
    return f"telegram:{user_id}"


def callback_data(value: int, message_id: str) -> str:
    """``ll:+1:<id>`` (at most 64 bytes, the Bot API's limit: a reply id is 32 hex digits)."""
    return f"{CALLBACK_PREFIX}:{value:+d}:{message_id}"


def parse_callback_data(data: str) -> tuple[int, str] | None:
    prefix, _, rest = data.partition(":")
    value, _, message_id = rest.partition(":")
    if prefix != CALLBACK_PREFIX or value not in ("+1", "-1") or not message_id:
        return None
    return int(value), message_id


def thumbs_keyboard(message_id: str, *, chosen: int | None = None) -> dict[str, Any]:
    """The inline keyboard under a reply; the chosen thumb, if any, is marked."""
    buttons = [
        {"text": THUMBS[v] + (" ✓" if v == chosen else ""), "callback_data": callback_data(v, message_id)}
        for v in (1, -1)
    ]
    return {"inline_keyboard": [buttons]}


def fit(text: str) -> str:
    """Text the Bot API accepts: not empty, at most 4096 characters."""
    text = text if text.strip() else "…"
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def parse_update(update: Mapping[str, Any], *, command: str) -> Inbound | None:
    """The event an Update asks for: a text message, a thumb pressed, or None (anything else)."""
    update_id = update.get("update_id")
    if not isinstance(update_id, int):
        raise ApiError("an Update has an integer update_id", code=ErrorCode.BAD_REQUEST)
    key = f"update:{update_id}"
    query = update.get("callback_query")
    if isinstance(query, dict):
        parsed = parse_callback_data(str(query.get("data") or ""))
        message = query.get("message") or {}
        chat = message.get("chat") or {}
        if parsed is None or "id" not in chat or "message_id" not in message:
            return None
        value, message_id = parsed
        return Inbound(
            kind=EventKind.RATING,
            key=key,
            thread=str(chat["id"]),
            user=rater(query["from"]["id"]),
            message_id=message_id,
            value=value,
            address={"chat_id": chat["id"], "message_id": message["message_id"], "callback_id": query["id"]},
        )
    message = update.get("message")
    if not isinstance(message, dict) or not isinstance(message.get("text"), str):
        return None  # edits, photos, joins: nothing to answer
    sender = message.get("from") or {}
    if sender.get("is_bot"):
        return None
    chat = message["chat"]
    text = message["text"].strip()
    first, _, rest = text.partition(" ")
    new = first.split("@", 1)[0] == command  # /start or /start@this_bot in a group
    return Inbound(
        kind=EventKind.MESSAGE,
        key=key,
        thread=str(chat["id"]),
        user=rater(sender["id"]) if "id" in sender else None,
        text=rest.strip() if new else text,
        new_conversation=new,
        address={"chat_id": chat["id"], "message_id": message["message_id"], "chat_type": chat.get("type")},
    )


def send_message(event: Inbound, text: str, *, keyboard: dict[str, Any] | None = None) -> dict[str, Any]:
    """``sendMessage`` parameters answering ``event`` (in a group, as a reply to the user's message)."""
    body: dict[str, Any] = {"chat_id": event.address["chat_id"], "text": fit(text)}
    if event.address.get("chat_type") not in (None, "private"):
        body["reply_parameters"] = {"message_id": event.address["message_id"], "allow_sending_without_reply": True}
    if keyboard is not None:
        body["reply_markup"] = keyboard
    return body


def edit_message(chat_id: int, message_id: int, text: str, *, keyboard: dict[str, Any] | None) -> dict[str, Any]:
    body: dict[str, Any] = {"chat_id": chat_id, "message_id": message_id, "text": fit(text)}
    if keyboard is not None:
        body["reply_markup"] = keyboard
    return body


def classify(status: int, answer: Mapping[str, Any], *, method: str) -> Outcome:
    """A Bot API answer as an outcome: ``{"ok": true, "result"}``, else ``error_code``/``description``."""
    if status == 200 and answer.get("ok"):
        result = answer.get("result")
        return Delivered(result if isinstance(result, dict) else {"result": result})
    description = str(answer.get("description") or f"HTTP {status}")
    if method.startswith("edit") and "message is not modified" in description:
        return Delivered({"not_modified": True})  # an edit repeated after a lost answer: already there
    parameters = answer.get("parameters") or {}
    if status == 429 or status >= 500:
        retry_after = parameters.get("retry_after")
        return Retry(f"{status} {description}", retry_after=float(retry_after) if retry_after is not None else None)
    return Failed(f"{status} {description}")  # 400 bad request, 403 blocked by the user, 404: not by retrying


# --- I/O: the Bot API ------------------------------------------------------------------------


class TelegramPlatform:
    """One bot: its Bot API calls, its answers as outbox rows, its streamed previews."""

    channel = Channel.TELEGRAM

    def __init__(self, site: str, config: TelegramConfig, client: httpx.AsyncClient) -> None:
        assert config.token is not None
        self.site = site
        self.config = config
        self.greeting = config.greeting
        self._client = client
        self._base = f"{config.api_base.rstrip('/')}/bot{config.token.reveal()}"

    async def call(self, method: str, body: Mapping[str, Any], *, http_timeout_s: float | None = None) -> Outcome:
        try:
            response = await self._client.post(
                f"{self._base}/{method}", json=body, timeout=http_timeout_s or httpx.USE_CLIENT_DEFAULT
            )
        except httpx.TransportError as exc:
            outcome = transport_outcome(exc)
            return dataclasses.replace(outcome, error=self._redact(outcome.error))  # the token is in the URL
        try:
            answer = response.json()
        except ValueError:
            answer = {}
        return classify(response.status_code, answer if isinstance(answer, dict) else {}, method=method)

    def _redact(self, text: str) -> str:
        assert self.config.token is not None
        return text.replace(self.config.token.reveal(), "<token>")

    async def deliver(self, row: OutboxRow) -> Outcome:
        outcome = await self.call(row.method, row.body)
        if (
            isinstance(outcome, Failed)
            and row.method == "editMessageText"
            and row.key.startswith("reply:")
            and "message to edit not found" in outcome.error
        ):
            # the streamed message was deleted meanwhile: the reply goes as a message of its own
            body = {k: v for k, v in row.body.items() if k != "message_id"}
            return await self.call("sendMessage", body)
        return outcome

    def _item(
        self, event: Inbound, key: str, method: str, body: dict[str, Any], conversation_id: str | None
    ) -> OutboxItem:
        return OutboxItem(
            key=key,
            channel=self.channel,
            site=self.site,
            lane=lane(self.channel, self.site, str(event.address["chat_id"])),
            method=method,
            body=body,
            conversation_id=conversation_id,
        )

    def reply(self, event: Inbound, reply: ReplyView, *, shown: Mapping[str, Any]) -> list[OutboxItem]:
        keyboard = thumbs_keyboard(reply.message_id)
        if "message_id" in shown:  # the streamed message takes its final state
            body = edit_message(event.address["chat_id"], shown["message_id"], reply.text, keyboard=keyboard)
            return [self._item(event, f"reply:{reply.message_id}", "editMessageText", body, reply.conversation_id)]
        body = send_message(event, reply.text, keyboard=keyboard)
        return [self._item(event, f"reply:{reply.message_id}", "sendMessage", body, reply.conversation_id)]

    def notice(self, event: Inbound, text: str, *, key: str) -> list[OutboxItem]:
        return [self._item(event, key, "sendMessage", send_message(event, text), None)]

    def vote(self, event: Inbound, reply: ReplyView) -> list[OutboxItem]:
        body = {
            "chat_id": event.address["chat_id"],
            "message_id": event.address["message_id"],
            "reply_markup": thumbs_keyboard(reply.message_id, chosen=event.value),
        }
        key = f"vote:{self.channel}:{self.site}:{event.key}"
        return [self._item(event, key, "editMessageReplyMarkup", body, reply.conversation_id)]

    async def acknowledge(self, event: Inbound, text: str) -> None:
        """``answerCallbackQuery`` at once: until it comes, the user's client shows a progress bar."""
        if "callback_id" in event.address:
            body = {"callback_query_id": event.address["callback_id"], "text": text}
            outcome = await self.call("answerCallbackQuery", body, http_timeout_s=5.0)
            if not isinstance(outcome, Delivered):
                log.info("answerCallbackQuery for %s/%s: %s", self.site, event.key, outcome)

    def preview(self, event: Inbound, *, shown: Mapping[str, Any], remember: Remember) -> Preview | None:
        return TelegramPreview(
            self.call,
            event,
            interval_s=self.config.edit_interval_ms / 1000,
            message_id=shown.get("message_id"),
            remember=remember,
        )


Call = Callable[..., Awaitable[Outcome]]


class TelegramPreview:
    """Streams a reply into one message: sent once text exists, then edited at most every ``interval_s``.

    Best effort: a call that fails is skipped (the final state goes through the outbox). The
    message's id is remembered with the event (``remember``) as soon as Telegram answers, so
    a restart edits it instead of sending another. A ``sendMessage`` whose answer was lost
    ends the preview: sending again could show the reply twice.
    """

    def __init__(
        self, call: Call, event: Inbound, *, interval_s: float, message_id: int | None, remember: Remember
    ) -> None:
        self._call = call
        self._event = event
        self._interval_s = interval_s
        self.message_id = message_id
        self._remember = remember
        self._text = ""
        self._shown = ""
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._calling = False

    async def add(self, delta: str) -> None:
        self._text += delta
        if self._text.strip():
            self._changed.set()
            if self._task is None and not self._stopped:
                self._task = asyncio.create_task(self._run(), name="telegram-preview")

    async def close(self) -> dict[str, Any]:
        """Stop streaming (a call in progress is finished first); what the chat shows now."""
        self._stopped = True
        self._changed.set()
        if self._task is not None:
            if not self._calling:
                self._task.cancel()  # waiting for the next interval: nothing to finish
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        return {"message_id": self.message_id} if self.message_id is not None else {}

    async def _run(self) -> None:
        last = 0.0
        while True:
            await self._changed.wait()
            if self._stopped:
                return
            await asyncio.sleep(max(0.0, last + self._interval_s - time.monotonic()))
            if self._stopped:
                return
            self._changed.clear()
            last = time.monotonic()
            if not await self._show(self._text):
                return

    async def _show(self, text: str) -> bool:
        """One send or edit; False ends the preview."""
        if text == self._shown:
            return True
        self._calling = True
        try:
            return await self._send_or_edit(text)
        finally:
            self._calling = False

    async def _send_or_edit(self, text: str) -> bool:
        shown = text + STREAMING_MARK
        chat_id = self._event.address["chat_id"]
        if self.message_id is None:
            outcome = await self._call("sendMessage", send_message(self._event, shown), http_timeout_s=5.0)
            if isinstance(outcome, Delivered) and "message_id" in outcome.response:
                self.message_id = int(outcome.response["message_id"])
                await self._remember({"message_id": self.message_id})
            else:
                # never arrived: try again at the next interval; maybe arrived: stop (no second message)
                return isinstance(outcome, Retry) and not outcome.uncertain
        else:
            await self._call(
                "editMessageText", edit_message(chat_id, self.message_id, shown, keyboard=None), http_timeout_s=5.0
            )
        self._shown = text
        return True


# --- the webhook --------------------------------------------------------------------------

Receive = Callable[[Channel, str, Inbound], Awaitable[bool]]


def telegram_router(bots: Mapping[str, TelegramConfig], *, receive: Receive) -> APIRouter:
    """``POST /hooks/telegram/{bot}``: checked, stored in the inbox (a redelivery is dropped), 200."""
    router = APIRouter()

    @router.post("/hooks/telegram/{bot}", include_in_schema=False)
    async def update(bot: str, request: Request) -> Response:
        config = bots.get(bot)
        if config is None:
            raise ApiError(f"no Telegram bot {bot!r} is configured", code=ErrorCode.NOT_FOUND)
        assert config.secret_token is not None
        check_telegram_secret(config.secret_token.reveal(), request.headers)
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise ApiError("the body is not JSON", code=ErrorCode.BAD_REQUEST) from None
        if not isinstance(body, dict):
            raise ApiError("an Update is a JSON object", code=ErrorCode.BAD_REQUEST)
        try:
            event = parse_update(body, command=config.new_conversation_command)
        except (KeyError, TypeError):
            raise ApiError("the Update is missing a field", code=ErrorCode.BAD_REQUEST) from None
        if event is not None:
            await receive(Channel.TELEGRAM, bot, event)
        return Response(content=b"{}", media_type="application/json")

    return router
