"""The IM channels end to end: a real App (tiny random Llama, ports 0) against local stand-ins of the platforms.

Telegram's Bot API and Slack's Web API cannot be reached from tests, so ``tests/im_standins.py``
serves their documented request and response shapes on loopback (and a Standard Webhooks
receiver); the App's ``api_base`` points there. Requests to the App are signed as each
platform documents (``tests/im_support.py``). A message goes in, a reply comes out, a thumb
is pressed and stored as a rating; redeliveries are processed once; refusals are 401 in the
channels' error envelope.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.app import App
from server.channels.telegram import fit
from tests.im_standins import SlackStandIn, TelegramStandIn, WebhookReceiver
from tests.im_support import (
    SLACK_TOKEN,
    TG_TOKEN,
    WH_SECRET,
    eventually,
    im_settings,
    slack_dm,
    slack_event,
    slack_headers,
    slack_press,
    tg_headers,
    tg_message,
    tg_press,
    wh_headers,
    wh_message,
)
from tests.store_backends import StoreTarget


@pytest.fixture
async def telegram() -> AsyncIterator[TelegramStandIn]:
    standin = TelegramStandIn(TG_TOKEN)
    await standin.start()
    yield standin
    await standin.stop()


@pytest.fixture
async def slack() -> AsyncIterator[SlackStandIn]:
    standin = SlackStandIn(SLACK_TOKEN)
    await standin.start()
    yield standin
    await standin.stop()


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    standin = WebhookReceiver(WH_SECRET)
    await standin.start()
    yield standin
    await standin.stop()


def envelope(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code
    return str(body["error"]["message"])


def listener(app: App) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.channels_port}", timeout=10)


def thumbed(standin: TelegramStandIn, chat: int = 42) -> list[dict[str, Any]]:
    """The bot's messages in a chat that carry the thumbs keyboard (finished replies)."""
    return [m for (c, _), m in standin.messages.items() if c == chat and "reply_markup" in m]


async def conversations(app: App, channel: str) -> list[str]:
    assert app.store is not None
    rows = await app.store.db.read("SELECT id FROM conversations WHERE channel = ? ORDER BY created_at", (channel,))
    return [r[0] for r in rows]


async def test_telegram_message_reply_thumbs_and_redeliveries(
    tiny_model: Path, tmp_path: Path, telegram: TelegramStandIn, store_target: StoreTarget
) -> None:
    app = App(im_settings(tiny_model, tmp_path, telegram=telegram.url, store_url=store_target.url))
    async with app.lifespan(), listener(app) as http:
        assert app.store is not None
        hook = "/hooks/telegram/support"
        assert "missing" in envelope(
            await http.post(hook, json=tg_message(1, "hi"), headers=tg_headers(None)), 401, "unauthorized"
        )
        assert "wrong" in envelope(
            await http.post(hook, json=tg_message(1, "hi"), headers=tg_headers("nope")), 401, "unauthorized"
        )
        envelope(
            await http.post("/hooks/telegram/other", json=tg_message(1, "hi"), headers=tg_headers()), 404, "not_found"
        )
        assert await app.store.inbox.rows() == []  # nothing refused was stored

        response = await http.post(hook, json=tg_message(1, "Where is my order?"), headers=tg_headers())
        assert response.status_code == 200 and response.json() == {}
        [final] = await eventually(lambda: thumbed(telegram), what="the reply with its keyboard")
        [cid] = await conversations(app, "telegram")
        conversation = await app.store.conversations.get(cid)
        assert (conversation.site, conversation.user_id) == ("support", "telegram:42")
        user, reply = await app.store.conversations.messages(cid)
        assert (user.role, user.text, reply.role, reply.parent_id) == (
            "user",
            "Where is my order?",
            "assistant",
            user.id,
        )
        assert final["text"] == fit(reply.text)  # the chat shows exactly the stored reply
        assert len([m for (c, _), m in telegram.messages.items() if c == 42]) == 1  # streamed into one message

        # Telegram redelivers an update it got no 2xx for: the same update_id is processed once
        assert (
            await http.post(hook, json=tg_message(1, "Where is my order?"), headers=tg_headers())
        ).status_code == 200
        await asyncio.sleep(0.5)
        assert len(await app.store.conversations.messages(cid)) == 2 and len(telegram.messages) == 1

        # 👎 under the reply: a callback_query, answered, shown, stored as the user's rating
        press = tg_press(2, final, button=1)
        assert (await http.post(hook, json=press, headers=tg_headers())).status_code == 200
        await eventually(lambda: telegram.calls_of("answerCallbackQuery"), what="answerCallbackQuery")
        await eventually(lambda: "👎 ✓" in json.dumps(final["reply_markup"], ensure_ascii=False), what="the vote shown")
        assert (await http.post(hook, json=press, headers=tg_headers())).status_code == 200  # redelivered
        await asyncio.sleep(0.3)
        ratings = (await app.store.conversations.export_feedback()).ratings
        assert [(r.message_id, r.value, r.rater) for r in ratings] == [(reply.id, -1, "telegram:42")]
        assert len(telegram.calls_of("answerCallbackQuery")) == 1

        # a thumb under another chat's reply is not counted (callback_data can be forged)
        forged = tg_press(3, final, button=0, user=7)
        forged["callback_query"]["message"]["chat"] = {"id": 7, "type": "private"}
        await http.post(hook, json=forged, headers=tg_headers())
        await eventually(lambda: len(telegram.calls_of("answerCallbackQuery")) == 2, what="the refusal answered")
        assert telegram.calls_of("answerCallbackQuery")[1]["text"] == "This reply cannot be rated here."
        assert len((await app.store.conversations.export_feedback()).ratings) == 1

        # /start begins a new conversation in the same chat
        await http.post(hook, json=tg_message(4, "/start"), headers=tg_headers())
        await eventually(
            lambda: any(m["text"].startswith("Hello!") for m in telegram.messages.values()), what="greeting"
        )
        await http.post(hook, json=tg_message(5, "Do you ship abroad?"), headers=tg_headers())
        await eventually(lambda: len(thumbed(telegram)) == 2, what="the second reply")
        first, second = await conversations(app, "telegram")
        assert (
            first == cid
            and next(m.text for m in await app.store.conversations.messages(second)) == "Do you ship abroad?"
        )

        # what the customer writes next is read as implicit feedback on the reply before it
        await http.post(hook, json=tg_message(6, "no, that's wrong"), headers=tg_headers())
        await eventually(lambda: len(thumbed(telegram)) == 3, what="the third reply")
        _, shipping_reply, complaint, _ = await app.store.conversations.messages(second)
        [reaction] = await app.store.conversations.reactions(second)
        assert (reaction.reply_id, reaction.message_id, reaction.signal, reaction.value) == (
            shipping_reply.id,
            complaint.id,
            "complaint",
            -1,
        )


async def test_telegram_streams_a_reply_into_one_message(telegram: TelegramStandIn) -> None:
    """The first piece of text is sent at once; later pieces edit that message at most every interval."""
    from server.channels.config import TelegramConfig
    from server.channels.telegram import TelegramPlatform, parse_update
    from server.secret import Secret

    remembered: list[dict[str, Any]] = []

    async def remember(shown: dict[str, Any]) -> None:
        remembered.append(shown)

    config = TelegramConfig(
        token=Secret(TG_TOKEN), secret_token=Secret("s"), api_base=telegram.url, edit_interval_ms=300
    )
    async with httpx.AsyncClient() as client:
        platform = TelegramPlatform("support", config, client)
        event = parse_update(tg_message(1, "hi"), command="/start")
        assert event is not None
        preview = platform.preview(event, shown={}, remember=remember)
        assert preview is not None
        started = time.monotonic()
        for piece in ["Refunds ", "take ", "30 ", "days", "."]:
            await preview.add(piece)
            await asyncio.sleep(0.1)
        shown = await preview.close()
        took = time.monotonic() - started
    sends, edits = telegram.calls_of("sendMessage"), telegram.calls_of("editMessageText")
    assert len(sends) == 1 and sends[0]["text"] == "Refunds  …"
    assert shown == {"message_id": 1000} and remembered == [shown]  # kept for the final edit, also after a restart
    assert 1 <= len(edits) <= 2 and len(edits) <= took / 0.3 + 1  # at most one edit per interval
    assert all(e["message_id"] == 1000 and e["text"].endswith(" …") for e in edits)


async def test_slack_events_reply_in_thread_and_thumbs(
    tiny_model: Path, tmp_path: Path, slack: SlackStandIn, store_target: StoreTarget
) -> None:
    app = App(im_settings(tiny_model, tmp_path, slack=slack.url, store_url=store_target.url))
    async with app.lifespan(), listener(app) as http:
        assert app.store is not None
        events, interactivity = "/hooks/slack/team/events", "/hooks/slack/team/interactivity"
        challenge = json.dumps({"token": "legacy", "challenge": "3eZbrw1aBm", "type": "url_verification"}).encode()
        response = await http.post(events, content=challenge, headers=slack_headers(challenge))
        assert response.status_code == 200 and response.json() == {"challenge": "3eZbrw1aBm"}
        envelope(await http.post(events, content=challenge), 401, "unauthorized")
        stale = slack_headers(challenge, at=time.time() - 301)
        assert "300 s" in envelope(await http.post(events, content=challenge, headers=stale), 401, "unauthorized")
        forged = slack_headers(challenge, secret="not-the-secret")
        assert "does not match" in envelope(
            await http.post(events, content=challenge, headers=forged), 401, "unauthorized"
        )

        body = slack_event("Ev1", slack_dm("1700000000.000100", "Where is my order?"))
        started = time.monotonic()
        response = await http.post(events, content=body, headers=slack_headers(body))
        assert response.status_code == 200 and time.monotonic() - started < 3  # acknowledged before the reply exists
        [post] = await eventually(lambda: slack.posts, what="chat.postMessage")
        assert (post["channel"], post["thread_ts"]) == ("D1", "1700000000.000100")
        [cid] = await conversations(app, "slack")
        assert (await app.store.conversations.get(cid)).site == "team"  # the Slack app, as the console filters it
        user, reply = await app.store.conversations.messages(cid)
        assert user.text == "Where is my order?" and post["text"] == (reply.text or "…")
        assert post["metadata"]["event_payload"]["key"] == f"reply:{reply.id}"

        # a retry (Slack saw no 2xx in time) and our own reply's message event: nothing new
        retry = slack_headers(body, **{"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"})
        assert (await http.post(events, content=body, headers=retry)).status_code == 200
        own = slack_event("Ev2", {"type": "message", "channel": "D1", "channel_type": "im", "user": "UBOT", "bot_id": "B1",
                                  "text": post["text"], "ts": post["ts"], "thread_ts": post["thread_ts"]})  # fmt: skip
        assert (await http.post(events, content=own, headers=slack_headers(own))).status_code == 200
        await asyncio.sleep(0.5)
        assert len(slack.posts) == 1 and len(await app.store.conversations.messages(cid)) == 2

        # a mention in a channel arrives as app_mention and as message: one reply, in its thread
        mention = {
            "channel": "C1",
            "channel_type": "channel",
            "user": "U2",
            "text": "<@UBOT> refunds?",
            "ts": "1700000001.000200",
        }
        for event_id, kind in (("Ev3", "app_mention"), ("Ev4", "message")):
            event = slack_event(event_id, {"type": kind, **mention})
            assert (await http.post(events, content=event, headers=slack_headers(event))).status_code == 200
        await eventually(lambda: len(slack.posts) == 2, what="the reply to the mention")
        await asyncio.sleep(0.5)
        assert len(slack.posts) == 2 and slack.posts[1]["thread_ts"] == "1700000001.000200"

        # the user answers in the DM thread: the same conversation goes on
        follow = slack_event("Ev5", slack_dm("1700000002.000300", "And shipping?", thread_ts="1700000000.000100"))
        await http.post(events, content=follow, headers=slack_headers(follow))
        await eventually(lambda: len(slack.posts) == 3, what="the follow-up reply")
        assert (
            slack.posts[2]["thread_ts"] == "1700000000.000100" and len(await app.store.conversations.messages(cid)) == 4
        )

        # 👎 on the first reply: stored as the user's rating, the message shows the vote
        press = slack_press(post, "learnloop_down")
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        assert "does not match" in envelope(
            await http.post(interactivity, content=press, headers=slack_headers(press, secret="x") | form),
            401,
            "unauthorized",
        )
        assert (await http.post(interactivity, content=press, headers=slack_headers(press) | form)).status_code == 200
        [update] = await eventually(lambda: slack.updates, what="chat.update")
        assert update["ts"] == post["ts"] and update["blocks"][-1]["elements"][0]["text"] == "👎 from <@U1>"
        ratings = (await app.store.conversations.export_feedback()).ratings
        assert [(r.message_id, r.value, r.rater) for r in ratings] == [(reply.id, -1, "slack:T1:U1")]


async def test_slack_post_whose_answer_timed_out_is_found_not_posted_again(
    tiny_model: Path, tmp_path: Path, slack: SlackStandIn
) -> None:
    """chat.postMessage has no idempotency key: the row's key in the message metadata is looked up first."""
    slack.post_delay_s = 2.0  # Slack posts it, but answers after our time limit
    app = App(im_settings(tiny_model, tmp_path, slack=slack.url, timeout_s=0.5))
    async with app.lifespan(), listener(app) as http:
        assert app.store is not None
        body = slack_event("Ev1", slack_dm("1700000000.000100", "hello"))
        await http.post("/hooks/slack/team/events", content=body, headers=slack_headers(body))
        delivered = await _wait_delivered(app)
        assert delivered.response is not None and delivered.response.get("found") is True
        assert len(slack.posts) == 1 and slack.replies_checks >= 1 and delivered.attempts >= 2


async def _wait_delivered(app: App) -> Any:
    assert app.store is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = await app.store.outbox.rows(state=None)
        if rows and all(r.state == "delivered" for r in rows):
            return rows[0]
        await asyncio.sleep(0.1)
    raise AssertionError(f"not delivered: {await app.store.outbox.rows()}")


async def test_signed_webhooks_both_ways(
    tiny_model: Path, tmp_path: Path, receiver: WebhookReceiver, store_target: StoreTarget
) -> None:
    app = App(im_settings(tiny_model, tmp_path, webhook=receiver.url, store_url=store_target.url))
    async with app.lifespan(), listener(app) as http:
        assert app.store is not None
        hook = "/hooks/webhook/helpdesk"
        body = wh_message("t-42", "Where is my order?")
        envelope(await http.post(hook, content=body, headers={"content-type": "application/json"}), 401, "unauthorized")
        envelope(
            await http.post(hook, content=body, headers=wh_headers("msg_a", body, key=b"x" * 32)), 401, "unauthorized"
        )
        envelope(
            await http.post(hook, content=body, headers=wh_headers("msg_a", body, at=time.time() - 400)),
            401,
            "unauthorized",
        )
        envelope(await http.post(hook, content=body + b" ", headers=wh_headers("msg_a", body)), 401, "unauthorized")
        bad = b'{"type": "user.created", "data": {}}'
        envelope(await http.post(hook, content=bad, headers=wh_headers("msg_x", bad)), 422, "invalid")

        response = await http.post(hook, content=body, headers=wh_headers("msg_a", body))
        assert response.json() == {"status": "accepted"}
        [(webhook_id, event)] = await eventually(lambda: receiver.received, what="reply.created")
        [cid] = await conversations(app, "webhook")
        assert (await app.store.conversations.get(cid)).site == "helpdesk"  # the sender, as the console filters it
        user, reply = await app.store.conversations.messages(cid)
        assert webhook_id == f"msg_{reply.id}" and event["type"] == "reply.created"
        assert (event["data"]["thread"], event["data"]["in_reply_to"]) == ("t-42", "msg_a")
        assert (event["data"]["message_id"], event["data"]["text"], event["data"]["conversation_id"]) == (
            reply.id,
            reply.text,
            cid,
        )
        assert receiver.refused == 0

        again = await http.post(hook, content=body, headers=wh_headers("msg_a", body))  # the sender retries
        assert again.json() == {"status": "duplicate"}

        rating = json.dumps(
            {
                "type": "rating.created",
                "data": {"message_id": reply.id, "value": -1, "user": "u-7", "reason": "incorrect"},
            }
        ).encode()
        assert (await http.post(hook, content=rating, headers=wh_headers("msg_b", rating))).json() == {
            "status": "accepted"
        }
        assert (await http.post(hook, content=rating, headers=wh_headers("msg_b", rating))).json() == {
            "status": "duplicate"
        }
        unknown = json.dumps(
            {"type": "rating.created", "data": {"message_id": "nope", "value": 1, "user": "u-7"}}
        ).encode()
        await http.post(hook, content=unknown, headers=wh_headers("msg_c", unknown))

        async def rated() -> list[Any]:
            assert app.store is not None
            return [r for r in await app.store.inbox.rows() if r.state != "done"]

        deadline = time.monotonic() + 10
        while await rated() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        ratings = (await app.store.conversations.export_feedback()).ratings
        assert [(r.message_id, r.value, r.rater, r.reason) for r in ratings] == [
            (reply.id, -1, "webhook:helpdesk:u-7", "incorrect")
        ]
        await asyncio.sleep(0.3)
        assert len(receiver.received) == 1 and user.text == "Where is my order?"


async def test_telegram_outbox_rows_repeat_safely(tmp_path: Path, telegram: TelegramStandIn) -> None:
    """An edit repeated after a lost answer is delivered ("not modified"); the final edit of a streamed
    message the user deleted goes out as a new message."""
    from feedback import FeedbackStore
    from feedback.outbox import OutboxItem
    from server.channels.config import OutboxConfig, TelegramConfig
    from server.channels.outbox import OutboxWorker
    from server.channels.telegram import TelegramPlatform, thumbs_keyboard
    from server.secret import Secret

    config = TelegramConfig(token=Secret(TG_TOKEN), secret_token=Secret("s"), api_base=telegram.url)
    async with await FeedbackStore.open(tmp_path / "db") as store, httpx.AsyncClient() as client:
        platform = TelegramPlatform("support", config, client)
        worker = OutboxWorker(
            store, {("telegram", "support"): platform}, OutboxConfig(min_backoff_s=0.05, max_backoff_s=0.1)
        )
        await platform.call("sendMessage", {"chat_id": 42, "text": "Refunds …"})  # the streamed message
        [(_chat, message_id)] = telegram.messages
        final = {
            "chat_id": 42,
            "message_id": message_id,
            "text": "Refunds take 30 days.",
            "reply_markup": thumbs_keyboard(REPLY),
        }
        await store.outbox.enqueue(
            [
                OutboxItem("reply:a", "telegram", "support", "telegram:support:42", "editMessageText", final),
                OutboxItem("reply:a-again", "telegram", "support", "telegram:support:42", "editMessageText", final),
                OutboxItem(
                    "reply:b",
                    "telegram",
                    "support",
                    "telegram:support:42",
                    "editMessageText",
                    final | {"message_id": 999},
                ),
            ]
        )
        worker.start()
        try:
            await eventually(lambda: len(telegram.calls_of("sendMessage")) == 2, what="the fallback message")
            rows = await _settled(store, 3)
        finally:
            await worker.stop()
        assert [r.state for r in rows] == ["delivered"] * 3
        assert rows[1].response == {"not_modified": True}  # rows: newest first
        assert telegram.messages[(42, message_id)]["text"] == "Refunds take 30 days."
        assert (
            telegram.calls_of("sendMessage")[1]["text"] == "Refunds take 30 days."
            and "message_id" not in telegram.calls_of("sendMessage")[1]
        )


REPLY = "0123456789abcdef0123456789abcdef"


async def _settled(store: Any, count: int) -> list[Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = await store.outbox.rows()
        if len(rows) == count and all(r.state != "pending" for r in rows):
            return list(rows)
        await asyncio.sleep(0.05)
    raise AssertionError(await store.outbox.rows())
