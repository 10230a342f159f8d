"""Shared by the IM channel tests: settings for an App with every IM channel, and requests signed as
each platform documents (written here from the platforms' documents, not with learnloop's signing code)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from server.channels.config import SlackConfig, TelegramConfig, WebhookConfig
from server.secret import Secret
from server.settings import Settings, load_settings

TG_TOKEN = "123456:test-token"
TG_SECRET = "tg-secret_0123"
SLACK_SECRET = "slack-signing-secret-0123"
SLACK_TOKEN = "xoxb-test-token"
WH_KEY = b"0123456789abcdef0123456789abcdef"
WH_SECRET = "whsec_" + base64.b64encode(WH_KEY).decode()

T = TypeVar("T")


def im_settings(
    tiny_model: Path,
    data_dir: Path,
    *,
    telegram: str | None = None,
    slack: str | None = None,
    webhook: str | None = None,
    store_url: str | None = None,
    **outbox: Any,
) -> Settings:
    """An App on ports 0 with the tiny model, talking to the stand-ins at these base URLs."""
    s = load_settings(
        env={},
        data_dir=data_dir,
        overrides={
            "store": {"url": store_url},
            "console": {"enabled": False},
            "channels": {"port": 0, "requests_per_minute": 0},
            "server": {"port": 0},
            "model": {"name": str(tiny_model), "max_new_tokens": 6, "dtype": "float32"},
            "schedule": {"enabled": False},
            "outbox": {"min_backoff_s": 0.1, "max_backoff_s": 0.5, "timeout_s": 3.0, **outbox},
        },
    )
    return dataclasses.replace(
        s,
        telegram={
            "support": TelegramConfig(
                token=Secret(TG_TOKEN), secret_token=Secret(TG_SECRET), api_base=telegram, edit_interval_ms=50
            )
        }
        if telegram
        else {},
        slack={"team": SlackConfig(bot_token=Secret(SLACK_TOKEN), signing_secret=Secret(SLACK_SECRET), api_base=slack)}
        if slack
        else {},
        webhooks={"helpdesk": WebhookConfig(secret=Secret(WH_SECRET), outbound_url=webhook + "/")} if webhook else {},
    )


async def eventually(check: Callable[[], T], *, timeout: float = 30.0, what: str = "") -> T:
    """Poll ``check`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.05)


# --- Telegram --------------------------------------------------------------------------------


def tg_message(update_id: int, text: str, *, user: int = 42, chat: int = 42) -> dict[str, Any]:
    return {
        "update_id": update_id,
        "message": {
            "message_id": update_id * 10,
            "from": {"id": user, "is_bot": False, "first_name": "Ann"},
            "chat": {"id": chat, "type": "private", "first_name": "Ann"},
            "date": int(time.time()),
            "text": text,
        },
    }


def tg_press(update_id: int, message: dict[str, Any], button: int, *, user: int = 42) -> dict[str, Any]:
    """A press on the ``button``-th inline button of a message the bot sent."""
    data = message["reply_markup"]["inline_keyboard"][0][button]["callback_data"]
    return {
        "update_id": update_id,
        "callback_query": {
            "id": f"cq{update_id}",
            "from": {"id": user, "is_bot": False, "first_name": "Ann"},
            "message": {"message_id": message["message_id"], "chat": message["chat"], "date": message["date"]},
            "chat_instance": "ci-1",
            "data": data,
        },
    }


def tg_headers(secret: str | None = TG_SECRET) -> dict[str, str]:
    return {"X-Telegram-Bot-Api-Secret-Token": secret} if secret is not None else {}


# --- Slack -----------------------------------------------------------------------------------


def slack_headers(body: bytes, *, secret: str = SLACK_SECRET, at: float | None = None, **extra: str) -> dict[str, str]:
    """Signed as Slack documents: v0=hex(HMAC-SHA256(signing secret, "v0:{timestamp}:{body}"))."""
    stamp = str(int(time.time() if at is None else at))
    signature = "v0=" + hmac.new(secret.encode(), f"v0:{stamp}:".encode() + body, hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": stamp, "X-Slack-Signature": signature, **extra}


def slack_event(event_id: str, event: dict[str, Any]) -> bytes:
    return json.dumps(
        {
            "token": "legacy",
            "team_id": "T1",
            "api_app_id": "A1",
            "event": event,
            "type": "event_callback",
            "event_id": event_id,
            "event_time": int(time.time()),
            "authorizations": [{"team_id": "T1", "user_id": "UBOT", "is_bot": True, "is_enterprise_install": False}],
        }
    ).encode()


def slack_dm(ts: str, text: str, *, thread_ts: str | None = None) -> dict[str, Any]:
    event = {
        "type": "message",
        "channel": "D1",
        "channel_type": "im",
        "user": "U1",
        "text": text,
        "ts": ts,
        "event_ts": ts,
    }
    return event | ({"thread_ts": thread_ts} if thread_ts else {})


def slack_press(post: dict[str, Any], action_id: str, *, user: str = "U1", username: str = "ann") -> bytes:
    """The interactivity request of a press on one of a posted message's buttons (a form with ``payload``)."""
    [button] = [
        b
        for block in post["blocks"]
        if block["type"] == "actions"
        for b in block["elements"]
        if b["action_id"] == action_id
    ]
    payload = {
        "type": "block_actions",
        "user": {"id": user, "username": username, "name": username, "team_id": "T1"},
        "api_app_id": "A1",
        "team": {"id": "T1", "domain": "example"},
        "container": {
            "type": "message",
            "message_ts": post["ts"],
            "channel_id": post["channel"],
            "is_ephemeral": False,
        },
        "trigger_id": "1.2.3",
        "channel": {"id": post["channel"], "name": "directmessage"},
        "message": {"type": "message", "ts": post["ts"], "thread_ts": post["thread_ts"], "text": post["text"]},
        "actions": [
            {
                "action_id": action_id,
                "block_id": "learnloop_rating",
                "value": button["value"],
                "type": "button",
                "action_ts": f"{time.time():.6f}",
            }
        ],
    }
    from urllib.parse import urlencode

    return urlencode({"payload": json.dumps(payload)}).encode()


# --- Standard Webhooks -----------------------------------------------------------------------


def wh_headers(msg_id: str, body: bytes, *, key: bytes = WH_KEY, at: float | None = None) -> dict[str, str]:
    """Signed as Standard Webhooks specifies: v1,base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}"))."""
    stamp = str(int(time.time() if at is None else at))
    signature = base64.b64encode(hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()).decode()
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": stamp,
        "webhook-signature": f"v1,{signature}",
        "content-type": "application/json",
    }


def wh_message(thread: str, text: str, *, user: str = "u-7") -> bytes:
    return json.dumps(
        {
            "type": "message.created",
            "timestamp": "2026-01-01T00:00:00Z",
            "data": {"thread": thread, "user": user, "text": text},
        }
    ).encode()
