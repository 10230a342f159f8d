"""The outbox end to end: platforms down for 30 s, a server restart, rows given up and retried by an operator.

A real App (tiny random Llama, ports 0) against the local stand-ins of Telegram's Bot API,
Slack's Web API and a Standard Webhooks receiver (``tests/im_standins.py``: the hosted
platforms cannot be reached from tests). A stand-in "goes down" by closing its listener and
"comes back" on the same port. Each reply must arrive exactly once: the stand-ins record
every call they accept.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from feedback.outbox import OutboxState
from server.app import App
from server.cli import main
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
    tg_headers,
    tg_message,
    wh_headers,
    wh_message,
)

OUTAGE_S = 30.0


def listener(app: App) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.channels_port}", timeout=10)


async def outbox(app: App, state: OutboxState | None = None) -> list[Any]:
    assert app.store is not None
    return await app.store.outbox.rows(state=state)


async def wait_for(app: App, check: Any, *, timeout: float = 30.0, what: str = "") -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        rows = await outbox(app)
        if check(rows):
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {rows}")
        await asyncio.sleep(0.1)


async def stopped_standins() -> tuple[TelegramStandIn, SlackStandIn, WebhookReceiver]:
    """The three stand-ins, each given a port and then stopped: the platforms are down."""
    standins = (TelegramStandIn(TG_TOKEN), SlackStandIn(SLACK_TOKEN), WebhookReceiver(WH_SECRET))
    for standin in standins:
        await standin.start()
        await standin.stop()
    return standins


async def test_replies_wait_out_a_30_s_outage_and_arrive_exactly_once(tiny_model: Path, tmp_path: Path) -> None:
    telegram, slack, receiver = await stopped_standins()
    settings = im_settings(
        tiny_model, tmp_path, telegram=telegram.url, slack=slack.url, webhook=receiver.url, max_backoff_s=2.0
    )
    app = App(settings)
    try:
        async with app.lifespan(), listener(app) as http:
            await http.post("/hooks/telegram/support", json=tg_message(1, "Where is my order?"), headers=tg_headers())
            body = slack_event("Ev1", slack_dm("1700000000.000100", "Where is my order?"))
            await http.post("/hooks/slack/team/events", content=body, headers=slack_headers(body))
            body = wh_message("t-1", "Where is my order?")
            await http.post("/hooks/webhook/helpdesk", content=body, headers=wh_headers("msg_in", body))
            rows = await wait_for(app, lambda rows: len(rows) == 3, what="three replies queued")
            await asyncio.sleep(OUTAGE_S)  # every platform is down meanwhile
            rows = await outbox(app)
            assert [r.state for r in rows] == ["pending"] * 3
            assert all(r.attempts >= 5 and not r.uncertain for r in rows)  # refused connections: certainly not sent
            for standin in (telegram, slack, receiver):
                await standin.start()  # back, on the same port
            await wait_for(
                app, lambda rows: all(r.state == "delivered" for r in rows), what="delivery after the outage"
            )
            await asyncio.sleep(1.0)  # anything sent twice would have arrived by now
        assert len(telegram.calls_of("sendMessage")) == 1 and len(telegram.messages) == 1
        assert len(slack.posts) == 1
        assert len(receiver.received) == 1 and receiver.refused == 0
    finally:
        for standin in (telegram, slack, receiver):
            await standin.stop()


async def test_a_restart_delivers_pending_rows_and_still_knows_its_events(tiny_model: Path, tmp_path: Path) -> None:
    telegram = TelegramStandIn(TG_TOKEN)
    await telegram.start()
    await telegram.stop()
    settings = im_settings(tiny_model, tmp_path, telegram=telegram.url)
    first = App(settings)
    async with first.lifespan(), listener(first) as http:
        await http.post("/hooks/telegram/support", json=tg_message(1, "Where is my order?"), headers=tg_headers())
        [row] = await wait_for(first, lambda rows: rows and rows[0].attempts >= 1, what="a failed first try")
    assert row.state == "pending"
    await telegram.start()
    try:
        second = App(settings)
        async with second.lifespan(), listener(second) as http:
            await wait_for(
                second, lambda rows: rows and rows[0].state == "delivered", what="delivery after the restart"
            )
            # Telegram redelivers the update to the new process: it is known, nothing happens twice
            response = await http.post(
                "/hooks/telegram/support", json=tg_message(1, "Where is my order?"), headers=tg_headers()
            )
            assert response.status_code == 200
            await asyncio.sleep(0.5)
            assert second.store is not None
            [cid] = [r[0] for r in await second.store.db.read("SELECT id FROM conversations")]
            assert len(await second.store.conversations.messages(cid)) == 2
            assert len(await outbox(second)) == 1
        assert len(telegram.calls_of("sendMessage")) == 1
    finally:
        await telegram.stop()


async def test_given_up_rows_fail_visibly_and_an_operator_retries_them(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    telegram = TelegramStandIn(TG_TOKEN)
    await telegram.start()
    await telegram.stop()
    settings = im_settings(tiny_model, tmp_path, telegram=telegram.url, max_age_s=1.5)
    app = App(settings)
    async with app.lifespan(), listener(app) as http:
        await http.post("/hooks/telegram/support", json=tg_message(1, "Where is my order?"), headers=tg_headers())
        [row] = await wait_for(app, lambda rows: rows and rows[0].state == "failed", what="the row given up")
    assert "gave up after" in (row.last_error or "") and "ConnectError" in (row.last_error or "")
    assert f"outbox row {row.id} (telegram support/sendMessage" in caplog.text

    assert await asyncio.to_thread(main, ["--data-dir", str(tmp_path), "outbox"]) == 0  # the CLI runs its own loop
    listing = capsys.readouterr().out
    assert "1 failed" in listing and f"{row.id:<7}failed" in listing and "telegram/support" in listing

    await telegram.start()
    try:
        assert await asyncio.to_thread(main, ["--data-dir", str(tmp_path), "outbox", "retry", str(row.id)]) == 0
        again = App(im_settings(tiny_model, tmp_path, telegram=telegram.url))
        async with again.lifespan():
            await wait_for(again, lambda rows: rows[0].state == "delivered", what="the retried row delivered")
        await eventually(lambda: telegram.calls_of("sendMessage"), what="the reply")
        assert len(telegram.calls_of("sendMessage")) == 1
    finally:
        await telegram.stop()


async def test_events_left_pending_by_a_crash_are_answered_after_the_restart(tiny_model: Path, tmp_path: Path) -> None:
    """Two crashes, written into the store as they leave it: an event received and not yet
    processed, and an event whose reply was stored but whose delivery was not yet queued."""
    from feedback import FeedbackStore, FinishReason, Role
    from server.channels.im import Channel, inbox_item
    from server.channels.telegram import parse_update

    telegram = TelegramStandIn(TG_TOKEN)
    await telegram.start()
    settings = im_settings(tiny_model, tmp_path, telegram=telegram.url)
    async with await FeedbackStore.open(settings.db_path) as store:
        for update_id, chat in ((1, 42), (2, 43)):
            event = parse_update(tg_message(update_id, "Where is my order?", user=chat, chat=chat), command="/start")
            assert event is not None
            await store.inbox.receive(inbox_item(Channel.TELEGRAM, "support", event))
        [answered] = [r for r in await store.inbox.rows() if r.key == "update:2"]  # chat 43's
        await store.conversations.create("c43", user_id="telegram:43", channel="telegram", site="support")
        await store.inbox.set_conversation(answered.id, "c43")
        await store.conversations.add_message(
            message_id=answered.turn_id,
            conversation_id="c43",
            role=Role.USER,
            text="Where is my order?",
            parent_id=None,
        )
        await store.conversations.add_message(
            message_id=answered.reply_id, conversation_id="c43", role=Role.ASSISTANT, text="It ships today.",
            parent_id=answered.turn_id, model_version="base", finish_reason=FinishReason.STOP,
        )  # fmt: skip
    try:
        app = App(settings)
        async with app.lifespan():
            await wait_for(app, lambda rows: len(rows) == 2 and all(r.state == "delivered" for r in rows), what="both")
            assert app.store is not None
            assert len(await app.store.conversations.messages("c43")) == 2  # nothing generated or stored twice
        texts = {m["chat"]["id"]: m["text"] for m in telegram.messages.values()}
        assert texts[43] == "It ships today." and 42 in texts and len(telegram.messages) == 2
    finally:
        await telegram.stop()
