"""Scenario 20: everything ``learnloop -v serve`` logs (JSON lines, DEBUG) after customers and
operators sent planted personal data, tokens and credentials, through chat, ratings, errors,
overload, the OpenAI-compatible API, a Telegram bot, a Slack app and a Standard Webhooks sender
(Telegram's Bot API, Slack's Web API and the webhook receiver are local stand-ins speaking their
documented wire formats, ``tests/im_standins.py``), the console and, as root, a full disk: none
of it is in the log."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.im_standins import SlackStandIn, TelegramStandIn, WebhookReceiver
from tests.im_support import (
    SLACK_SECRET,
    SLACK_TOKEN,
    TG_SECRET,
    TG_TOKEN,
    WH_KEY,
    WH_SECRET,
    eventually,
    slack_event,
    slack_headers,
    slack_press,
    tg_headers,
    tg_message,
    tg_press,
    wh_headers,
)
from tests.serve_process import ROOT, ServeProcess
from tests.store_backends import PG_PASS, store_env

TOKEN = "tok-3b9f1c7e-never-log"
WRONG_TOKEN = "tok-3b9f1c7e-never-lOG"
PASSWORD = "pw-horse-battery-8812"
PII = {
    "email": "jane.doe@example.com",
    "phone": "+49 170 1234567",
    "card": "4111 1111 1111 1111",
    "iban": "DE89370400440532013000",
    "name": "Jane Roebuck",
    "street": "12 Baker Street",
}
WORDS = "private-words-5521"  # a customer's own words, no PII shape
SAID = f"{WORDS}: my name is {PII['name']}, mail {PII['email']}, call {PII['phone']}, card {PII['card']}, "
SAID += f"IBAN {PII['iban']}, I live at {PII['street']}."
ADD_ALICE = ("operator", "add", "alice", "--role", "admin", "--password-stdin")
SLACK_USER = "U0PLANTED5521"  # a Slack user id, planted like any identifier of a customer
WH_WRONG_KEY = b"fedcba9876543210fedcba9876543210"
CONSOLE = re.compile(r"operator console on http://[^:]+:(\d+)")
CHANNELS = re.compile(r"OpenAI-compatible API on http://[^:]+:(\d+)/v1")


async def recv(ws: Any, timeout: float = 60) -> dict[str, Any]:
    return dict(json.loads(await asyncio.wait_for(ws.recv(), timeout)))


async def until(ws: Any, kind: str) -> dict[str, Any]:
    while (frame := await recv(ws))["type"] != kind:
        pass
    return frame


def open_ws(url: str, **options: Any) -> Any:
    """A websocket with ``server.token`` in its handshake (``Authorization: Bearer``)."""
    return connect(url, additional_headers={"Authorization": f"Bearer {TOKEN}"}, **options)


async def hello(ws: Any) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "hello", "token": TOKEN, "user": PII["email"]}))
    return await until(ws, "ready")


async def drive_chat(port: int) -> tuple[list[str], str]:
    """Chat, ratings and every kind of refused frame, each carrying the planted text; returns the
    conversation ids and the id of a reply."""
    url = f"ws://127.0.0.1:{port}"
    ids: list[str] = []
    with pytest.raises(InvalidStatus) as refused_handshake:  # a wrong token: 401 before any session
        async with connect(url, additional_headers={"Authorization": f"Bearer {WRONG_TOKEN}"}):
            pass
    assert refused_handshake.value.response.status_code == 401
    async with open_ws(url, max_size=None) as ws:
        ids.append((await hello(ws))["conversation_id"])
        await ws.send(json.dumps({"type": "message", "text": SAID, "client_id": "m1"}))
        reply = (await until(ws, "done"))["message_id"]
        rating = {"type": "rating", "message_id": reply, "value": -1, "id": "r1", "comment": SAID}
        await ws.send(json.dumps(rating))
        assert (await recv(ws))["type"] == "ack"
        refused = [
            "{not json " + SAID,
            json.dumps({"type": SAID, "text": SAID}),
            json.dumps({"type": "rating", "message_id": SAID, "value": 1, "id": "r2", "comment": SAID}),
            json.dumps({"type": "rating", "message_id": reply, "value": SAID, "id": "r3"}),
            json.dumps({"type": "message", "text": SAID * 200, "client_id": "m2"}),  # over max_text_chars
            json.dumps({"type": "hello", "token": TOKEN}),  # a second hello
            "[" * 5000 + json.dumps(SAID) + "]" * 5000,
        ]
        for frame in refused:
            await ws.send(frame)
            assert (await recv(ws))["type"] == "error", frame[:80]
        await ws.send(SAID.encode())  # binary
        assert (await recv(ws))["type"] == "error"
    # over the overload limit (model.max_pending = 1): replies refused with overloaded
    async with contextlib.AsyncExitStack() as stack:
        sockets = [await stack.enter_async_context(open_ws(url)) for _ in range(6)]
        for ws in sockets:
            ids.append((await hello(ws))["conversation_id"])
        for n, ws in enumerate(sockets):
            await ws.send(json.dumps({"type": "message", "text": SAID, "client_id": f"o{n}"}))
        ends = [await until_end(ws) for ws in sockets]
        assert "overloaded" in ends and "done" in ends, ends
    # a frame over server.max_frame_bytes closes its connection (1009)
    async with open_ws(url, max_size=None) as ws:
        await hello(ws)
        with contextlib.suppress(ConnectionClosed):
            await ws.send(json.dumps({"type": "message", "text": SAID * 3000, "client_id": "big"}))
            await recv(ws)
    return ids, reply


async def until_end(ws: Any) -> str:
    while True:
        frame = await recv(ws)
        if frame["type"] == "done":
            return "done"
        if frame["type"] == "error":
            return str(frame["code"])


async def drive_channels(
    port: int, key: str, telegram: TelegramStandIn, slack: SlackStandIn, receiver: WebhookReceiver, seen: list[str]
) -> list[str]:
    """The OpenAI-compatible API (a wrong key, a chat, a thumb with a comment, a refused request), a
    Telegram bot (a wrong secret, a message from a user whose name is planted, a thumb pressed), a
    Slack app and a Standard Webhooks sender (each: a forged signature, a message, the reply out, a
    thumb), each carrying the planted text; returns the ids of the replies the API gave, and adds
    the signatures sent to ``seen``."""
    auth = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
        body = {"model": "base", "messages": [{"role": "user", "content": SAID}], "user": PII["email"]}
        wrong = await c.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key[::-1]}"})
        assert wrong.status_code == 401, wrong.text
        answered = await c.post("/v1/chat/completions", json=body, headers=auth)
        assert answered.status_code == 200, answered.text
        reply = answered.json()["id"]
        thumb = await c.post("/v1/feedback", json={"id": reply, "value": -1, "comment": SAID}, headers=auth)
        assert thumb.status_code == 200, thumb.text
        unknown = await c.post("/v1/feedback", json={"id": SAID[:60], "value": 1, "comment": SAID}, headers=auth)
        assert unknown.status_code == 404, unknown.text
        no_user = {"model": "base", "messages": [{"role": "assistant", "content": SAID}]}
        assert (await c.post("/v1/chat/completions", json=no_user, headers=auth)).status_code == 422

        hook = "/hooks/telegram/support"
        update = tg_message(1, SAID, user=4242, chat=4242)
        update["message"]["from"].update(first_name=PII["name"], username=WORDS)
        assert (await c.post(hook, json=update, headers=tg_headers(TG_SECRET[::-1]))).status_code == 401
        assert (await c.post(hook, json=update, headers=tg_headers())).status_code == 200
        [final] = await eventually(
            lambda: [m for (chat, _), m in telegram.messages.items() if chat == 4242 and "reply_markup" in m],
            what="the bot's reply with its thumbs",
        )
        press = tg_press(2, final, button=1, user=4242)
        assert (await c.post(hook, json=press, headers=tg_headers())).status_code == 200
        await eventually(lambda: telegram.calls_of("answerCallbackQuery"), what="the thumb answered")

        # Slack: a DM from a planted user, the reply posted in its thread, a thumb pressed by that user
        events, interactivity = "/hooks/slack/support/events", "/hooks/slack/support/interactivity"
        dm = {"type": "message", "channel": "D9", "channel_type": "im", "user": SLACK_USER, "text": SAID,
              "ts": "1700000000.000100", "event_ts": "1700000000.000100"}  # fmt: skip
        body = slack_event("EvPlanted1", dm)
        forged = slack_headers(body, secret=SLACK_SECRET[::-1])
        assert (await c.post(events, content=body, headers=forged)).status_code == 401
        signed = slack_headers(body)
        seen += [forged["X-Slack-Signature"], signed["X-Slack-Signature"]]
        assert (await c.post(events, content=body, headers=signed)).status_code == 200
        [post] = await eventually(lambda: [p for p in slack.posts if p["channel"] == "D9"], what="the Slack reply")
        press = slack_press(post, "learnloop_down", user=SLACK_USER, username=PII["name"])
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        signed = slack_headers(press)
        seen.append(signed["X-Slack-Signature"])
        assert (await c.post(interactivity, content=press, headers=signed | form)).status_code == 200
        await eventually(lambda: slack.updates, what="the Slack thumb shown")

        # Standard Webhooks: a message from a planted user (forged first), the signed reply.created
        # out to the receiver, then a thumb down with a planted comment
        hook = "/hooks/webhook/helpdesk"
        message = {"type": "message.created", "data": {"thread": WORDS, "user": PII["email"], "text": SAID}}
        body = json.dumps(message).encode()
        forged = wh_headers("msg_planted1", body, key=WH_WRONG_KEY)
        assert (await c.post(hook, content=body, headers=forged)).status_code == 401
        signed = wh_headers("msg_planted1", body)
        seen += [forged["webhook-signature"], signed["webhook-signature"]]
        assert (await c.post(hook, content=body, headers=signed)).json() == {"status": "accepted"}
        [(_, event)] = await eventually(lambda: receiver.received, what="the signed reply.created")
        rating = {
            "type": "rating.created",
            "data": {"message_id": event["data"]["message_id"], "value": -1, "user": PII["email"], "comment": SAID},
        }
        body = json.dumps(rating).encode()
        signed = wh_headers("msg_planted2", body)
        seen.append(signed["webhook-signature"])
        assert (await c.post(hook, content=body, headers=signed)).json() == {"status": "accepted"}
        assert receiver.refused == 0
    return [reply]


async def drive_console(port: int, conversation: str, reply: str) -> list[str]:
    """Log in (after a wrong password), search for PII, read, correct; returns the credentials seen."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
        bad = await c.post("/api/v1/session", json={"name": "alice", "password": PASSWORD[::-1]})
        assert bad.status_code == 401
        r = await c.post("/api/v1/session", json={"name": "alice", "password": PASSWORD})
        assert r.status_code == 200, r.text
        csrf = r.json()["csrf_token"]
        c.headers["X-CSRF-Token"] = csrf
        session = c.cookies.get("learnloop_session")
        assert session
        assert (await c.get("/api/v1/conversations", params={"q": PII["email"]})).status_code == 200
        assert (await c.get(f"/api/v1/conversations/{conversation}/raw")).status_code == 200
        assert (await c.get(f"/api/v1/conversations/{SAID}")).status_code == 404
        fixed = await c.post(f"/api/v1/messages/{reply}/correction", json={"text": SAID, "reason": SAID[:150]})
        assert fixed.status_code == 201, fixed.text
        assert (await c.post("/api/v1/erasures", json={"user": SAID[:200]})).status_code == 200
        return [session, csrf]


async def drive_full_disk(port: int, data: Path, conversation: str, reply: str) -> None:
    """As root: the data folder's tmpfs filled up; a rating and a turn get storage_full."""
    from tests.test_disk_full import fill

    filler = fill(data, leave=0)
    try:
        async with open_ws(f"ws://127.0.0.1:{port}") as ws:
            await ws.send(json.dumps({"type": "hello", "token": TOKEN, "user": PII["email"]}))
            assert (await recv(ws))["code"] == "storage_full"  # a new conversation cannot be stored
            await ws.send(json.dumps({"type": "hello", "token": TOKEN, "conversation_id": conversation}))
            await until(ws, "ready")  # an old one resumes
            await ws.send(json.dumps({"type": "rating", "message_id": reply, "value": 1, "id": "f1", "comment": SAID}))
            assert (await recv(ws))["code"] == "storage_full"
            await ws.send(json.dumps({"type": "message", "text": SAID, "client_id": "f2"}))
            assert (await recv(ws))["code"] == "storage_full"
    finally:
        filler.unlink()


def test_nothing_sent_by_customers_or_operators_reaches_the_log(tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    root = os.geteuid() == 0
    # the full disk's log lines need the store on the tmpfs: not in the PostgreSQL pass (tests/store_backends.py)
    mounted = (
        root
        and not PG_PASS
        and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(data)]).returncode == 0
    )
    cli_env = {**{k: v for k, v in os.environ.items() if k != "LEARNLOOP_CONFIG"}, **store_env(data)}
    try:
        subprocess.run(
            [*(sys.executable, "-m", "server.cli", "--data-dir", str(data)), *ADD_ALICE],
            input=PASSWORD,
            text=True,
            check=True,
            cwd=ROOT,
            env=cli_env,
        )
        key = subprocess.run(
            [*(sys.executable, "-m", "server.cli", "--data-dir", str(data)), "apikey", "create", "shop"],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
            env=cli_env,
        ).stdout.split()[-1]
        assert key.startswith("llk-"), key
        telegram = TelegramStandIn(TG_TOKEN)
        slack = SlackStandIn(SLACK_TOKEN)
        receiver = WebhookReceiver(WH_SECRET)
        signatures: list[str] = []
        env = {
            "LEARNLOOP_SERVER_LOG_FORMAT": "json",
            "LEARNLOOP_SERVER_TOKEN": TOKEN,
            "LEARNLOOP_SERVER_RATE_PER_S": "1000",
            "LEARNLOOP_SERVER_RATE_BURST": "1000",
            "LEARNLOOP_SERVER_MAX_FRAME_BYTES": "200000",
            "LEARNLOOP_MODEL_MAX_PENDING": "1",
            "LEARNLOOP_MODEL_MAX_NEW_TOKENS": "24",
            "LEARNLOOP_MODEL_DTYPE": "float32",
            "LEARNLOOP_TELEGRAM__SUPPORT__TOKEN": TG_TOKEN,
            "LEARNLOOP_TELEGRAM__SUPPORT__SECRET_TOKEN": TG_SECRET,
            "LEARNLOOP_SLACK__SUPPORT__BOT_TOKEN": SLACK_TOKEN,
            "LEARNLOOP_SLACK__SUPPORT__SIGNING_SECRET": SLACK_SECRET,
            "LEARNLOOP_WEBHOOKS__HELPDESK__SECRET": WH_SECRET,
        }

        async def drive(server: ServeProcess) -> tuple[list[str], str, list[str], list[str]]:
            port = await asyncio.to_thread(server.port)
            console = next(int(m.group(1)) for line in server.log if (m := CONSOLE.search(line)))
            channels = next(int(m.group(1)) for line in server.log if (m := CHANNELS.search(line)))
            ids, reply = await drive_chat(port)
            api_replies = await drive_channels(channels, key, telegram, slack, receiver, signatures)
            credentials = await drive_console(console, ids[0], reply)
            if mounted:
                await drive_full_disk(port, data, ids[0], reply)
            return ids, reply, api_replies, credentials

        # the platforms' stand-ins serve from their own loop for the whole test: their ports go into env
        standins = (telegram, slack, receiver)
        standin_loop = asyncio.new_event_loop()
        standin_thread = threading.Thread(target=standin_loop.run_forever, daemon=True)
        standin_thread.start()
        for standin in standins:
            asyncio.run_coroutine_threadsafe(standin.start(), standin_loop).result(30)
        env["LEARNLOOP_TELEGRAM__SUPPORT__API_BASE"] = telegram.url
        env["LEARNLOOP_SLACK__SUPPORT__API_BASE"] = slack.url
        env["LEARNLOOP_WEBHOOKS__HELPDESK__OUTBOUND_URL"] = receiver.url + "/"
        server = ServeProcess(data, tiny_model, env, verbose=True)
        try:
            ids, _, _, credentials = asyncio.run(drive(server))
            server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(30) == 0
        finally:
            server.stop()
            for standin in standins:
                asyncio.run_coroutine_threadsafe(standin.stop(), standin_loop).result(30)
            standin_loop.call_soon_threadsafe(standin_loop.stop)
            standin_thread.join(30)
            standin_loop.close()
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(data)], check=False)

    records = [json.loads(line) for line in server.log if line.startswith("{")]
    levels = {r["level"] for r in records}
    assert "DEBUG" in levels, levels  # -v took effect
    assert "ERROR" in levels or not mounted, levels  # the full disk's errors were logged
    if mounted:
        assert any("storage full" in r["msg"] for r in records)
    logged = "\n".join(server.log)
    planted = {
        "token": TOKEN,
        "wrong token": WRONG_TOKEN,
        "password": PASSWORD,
        "wrong password": PASSWORD[::-1],
        "words": WORDS,
        **PII,
        "api key": key,
        "wrong api key": key[::-1],
        "telegram bot token": TG_TOKEN,
        "telegram secret": TG_SECRET,
        "wrong telegram secret": TG_SECRET[::-1],
        "slack bot token": SLACK_TOKEN,
        "slack signing secret": SLACK_SECRET,
        "wrong slack signing secret": SLACK_SECRET[::-1],
        "slack user id": SLACK_USER,
        "webhooks secret": WH_SECRET,
        "webhooks key": WH_KEY.decode(),
        "wrong webhooks key": WH_WRONG_KEY.decode(),
        **{f"signature {n}": sig for n, sig in enumerate(signatures)},
        "console session": credentials[0],
        "csrf token": credentials[1],
        **{f"conversation {n}": cid for n, cid in enumerate(ids)},
    }
    found = {what: value for what, value in planted.items() if value in logged}

    assert not found, found
