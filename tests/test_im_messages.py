"""The IM channels' pure cores: platform payloads in, platform calls out, outcomes, backoff. Milliseconds."""

from __future__ import annotations

import json

import httpx
import pytest

from server.channels import slack, telegram, webhooks
from server.channels.im import (
    Channel,
    Delivered,
    EventKind,
    Failed,
    Inbound,
    ReplyView,
    Retry,
    inbox_item,
    transport_outcome,
)
from server.channels.outbox import backoff_s, next_attempt_at
from server.errors import ApiError

REPLY_ID = "0123456789abcdef0123456789abcdef"
REPLY = ReplyView(REPLY_ID, "c1", "Refunds take 30 days.", "stop", "base")


# --- Telegram ------------------------------------------------------------------------------


def tg_message(text: str, *, update_id: int = 7, chat_type: str = "private", is_bot: bool = False) -> dict:
    return {
        "update_id": update_id,
        "message": {
            "message_id": 31,
            "from": {"id": 42, "is_bot": is_bot, "first_name": "Ann"},
            "chat": {"id": -100 if chat_type != "private" else 42, "type": chat_type},
            "date": 1700000000,
            "text": text,
        },
    }


def test_telegram_text_message() -> None:
    event = telegram.parse_update(tg_message(" Where is my order? "), command="/start")
    assert event == Inbound(
        kind=EventKind.MESSAGE,
        key="update:7",
        thread="42",
        user="telegram:42",
        text="Where is my order?",
        address={"chat_id": 42, "message_id": 31, "chat_type": "private"},
    )


@pytest.mark.parametrize(
    ("text", "new", "rest"),
    [("/start", True, ""), ("/start hello there", True, "hello there"), ("/start@shop_bot hi", True, "hi"),
     ("/started", False, "/started"), ("/help", False, "/help")],
)  # fmt: skip
def test_telegram_new_conversation_command(text: str, new: bool, rest: str) -> None:
    event = telegram.parse_update(tg_message(text), command="/start")
    assert event is not None and (event.new_conversation, event.text) == (new, rest)


def test_telegram_ignores_what_is_not_a_users_text() -> None:
    assert telegram.parse_update(tg_message("hi", is_bot=True), command="/start") is None
    assert (
        telegram.parse_update({"update_id": 8, "edited_message": tg_message("x")["message"]}, command="/start") is None
    )
    photo = tg_message("x")
    del photo["message"]["text"]
    assert telegram.parse_update(photo, command="/start") is None
    with pytest.raises(ApiError):
        telegram.parse_update({"message": {}}, command="/start")


def test_telegram_thumb_press() -> None:
    update = {
        "update_id": 9,
        "callback_query": {
            "id": "cq1",
            "from": {"id": 42, "is_bot": False, "first_name": "Ann"},
            "message": {"message_id": 77, "chat": {"id": 42, "type": "private"}},
            "chat_instance": "ci",
            "data": telegram.callback_data(-1, REPLY_ID),
        },
    }
    event = telegram.parse_update(update, command="/start")
    assert event is not None and event.kind is EventKind.RATING
    assert (event.key, event.thread, event.user, event.message_id, event.value) == (
        "update:9", "42", "telegram:42", REPLY_ID, -1,
    )  # fmt: skip
    assert event.address == {"chat_id": 42, "message_id": 77, "callback_id": "cq1"}
    update["callback_query"]["data"] = "something else"  # type: ignore[index]
    assert telegram.parse_update(update, command="/start") is None


def test_telegram_callback_data_fits_and_round_trips() -> None:
    for value in (1, -1):
        data = telegram.callback_data(value, REPLY_ID)
        assert len(data.encode()) <= 64 and telegram.parse_callback_data(data) == (value, REPLY_ID)
    assert telegram.parse_callback_data("ll:+2:x") is None and telegram.parse_callback_data("ll:+1:") is None


def test_telegram_keyboard_and_messages() -> None:
    keyboard = telegram.thumbs_keyboard(REPLY_ID, chosen=-1)
    assert [b["text"] for b in keyboard["inline_keyboard"][0]] == ["👍", "👎 ✓"]
    private = telegram.parse_update(tg_message("hi"), command="/start")
    group = telegram.parse_update(tg_message("hi", chat_type="supergroup"), command="/start")
    assert private is not None and group is not None
    assert telegram.send_message(private, "answer") == {"chat_id": 42, "text": "answer"}
    body = telegram.send_message(group, "x" * 5000, keyboard=keyboard)
    assert body["reply_parameters"] == {"message_id": 31, "allow_sending_without_reply": True}
    assert len(body["text"]) == 4096 and body["text"].endswith("…") and body["reply_markup"] == keyboard
    assert telegram.fit("  ") == "…"


def test_telegram_reply_is_an_edit_of_the_streamed_message_or_a_new_one() -> None:
    platform = telegram.TelegramPlatform("support", _telegram_config(), httpx.AsyncClient())
    event = telegram.parse_update(tg_message("hi"), command="/start")
    assert event is not None
    [sent] = platform.reply(event, REPLY, shown={})
    [edited] = platform.reply(event, REPLY, shown={"message_id": 99})
    assert (sent.method, edited.method) == ("sendMessage", "editMessageText")
    assert sent.key == edited.key == f"reply:{REPLY_ID}" and sent.lane == edited.lane == "telegram:support:42"
    assert edited.body["message_id"] == 99 and edited.body["reply_markup"] == telegram.thumbs_keyboard(REPLY_ID)


def _telegram_config():  # type: ignore[no-untyped-def]
    from server.channels.config import TelegramConfig
    from server.secret import Secret

    return TelegramConfig(token=Secret("1:abc"), secret_token=Secret("s"))


@pytest.mark.parametrize(
    ("status", "answer", "method", "outcome"),
    [
        (200, {"ok": True, "result": {"message_id": 5}}, "sendMessage", Delivered({"message_id": 5})),
        (200, {"ok": True, "result": True}, "answerCallbackQuery", Delivered({"result": True})),
        (429, {"ok": False, "error_code": 429, "description": "Too Many Requests: retry after 7", "parameters": {"retry_after": 7}},
         "sendMessage", Retry("429 Too Many Requests: retry after 7", retry_after=7.0)),
        (502, {}, "sendMessage", Retry("502 HTTP 502")),
        (400, {"ok": False, "description": "Bad Request: message is not modified: specified new message content and reply markup are exactly the same"},
         "editMessageText", Delivered({"not_modified": True})),
        (400, {"ok": False, "description": "Bad Request: message is not modified"}, "sendMessage",
         Failed("400 Bad Request: message is not modified")),
        (403, {"ok": False, "description": "Forbidden: bot was blocked by the user"}, "sendMessage",
         Failed("403 Forbidden: bot was blocked by the user")),
    ],
)  # fmt: skip
def test_telegram_outcomes(status: int, answer: dict, method: str, outcome: object) -> None:
    assert telegram.classify(status, answer, method=method) == outcome


# --- Slack ---------------------------------------------------------------------------------


def slack_event(event: dict, *, bot_user: str = "UBOT") -> dict:
    return {
        "token": "x",
        "team_id": "T1",
        "api_app_id": "A1",
        "type": "event_callback",
        "event_id": "Ev1",
        "event_time": 1700000000,
        "authorizations": [{"team_id": "T1", "user_id": bot_user, "is_bot": True}],
        "event": event,
    }


DM = {
    "type": "message",
    "channel": "D1",
    "channel_type": "im",
    "user": "U1",
    "text": "Where is my order?",
    "ts": "1700000000.000100",
}


def test_slack_direct_message_starts_a_thread() -> None:
    event = slack.parse_event(slack_event(DM))
    assert event == Inbound(
        kind=EventKind.MESSAGE,
        key="message:D1:1700000000.000100",
        thread="T1:D1:1700000000.000100",
        user="slack:T1:U1",
        text="Where is my order?",
        address={"channel": "D1", "thread_ts": "1700000000.000100", "team": "T1"},
    )
    in_thread = slack.parse_event(slack_event(DM | {"ts": "1700000001.000200", "thread_ts": "1700000000.000100"}))
    assert in_thread is not None and in_thread.thread == event.thread and in_thread.key != event.key


def test_slack_mention_and_its_message_event_share_one_key() -> None:
    channel = {"channel": "C1", "channel_type": "channel", "user": "U1", "ts": "1.2", "thread_ts": "1.0"}
    mention = slack.parse_event(slack_event({"type": "app_mention", "text": "<@UBOT> refunds?", **channel}))
    message = slack.parse_event(slack_event({"type": "message", "text": "<@UBOT> refunds?", **channel}))
    assert mention is not None and message is not None
    assert mention.key == message.key == "message:C1:1.2" and mention.text == "refunds?"
    assert (mention.known_thread_only, message.known_thread_only) == (False, True)


@pytest.mark.parametrize(
    "event",
    [
        DM | {"bot_id": "B1"},  # a bot, ourselves included
        DM | {"subtype": "bot_message"},
        DM | {"subtype": "message_changed"},
        DM | {"user": "UBOT"},  # our own bot user
        {"type": "message", "channel": "C1", "channel_type": "channel", "user": "U1", "text": "lunch?", "ts": "1.1"},
        {"type": "reaction_added", "user": "U1"},
        {k: v for k, v in DM.items() if k != "user"},
    ],
)
def test_slack_ignores_bots_edits_and_chatter(event: dict) -> None:
    assert slack.parse_event(slack_event(event)) is None


def block_actions(action_id: str = "learnloop_down", value: str = REPLY_ID) -> dict:
    return {
        "type": "block_actions",
        "user": {"id": "U1", "team_id": "T1"},
        "team": {"id": "T1"},
        "container": {"type": "message", "message_ts": "1.5", "channel_id": "D1"},
        "channel": {"id": "D1"},
        "message": {"ts": "1.5", "thread_ts": "1.0", "text": "Refunds take 30 days."},
        "actions": [{"action_id": action_id, "block_id": "learnloop_rating", "value": value, "action_ts": "1.6"}],
    }


def test_slack_thumb_press() -> None:
    [event] = slack.parse_actions(block_actions())
    assert (event.kind, event.key, event.thread, event.user, event.message_id, event.value) == (
        EventKind.RATING, "action:D1:1.5:U1:1.6", "T1:D1:1.0", "slack:T1:U1", REPLY_ID, -1,
    )  # fmt: skip
    assert slack.parse_actions(block_actions("someone_elses_button")) == []
    assert slack.parse_actions({"type": "view_submission"}) == []


def test_slack_reply_blocks_and_metadata() -> None:
    event = slack.parse_event(slack_event(DM))
    assert event is not None
    body = slack.post_message(event, REPLY, key="reply:x")
    assert body["thread_ts"] == "1700000000.000100" and body["text"] == REPLY.text
    assert body["metadata"] == {"event_type": "learnloop_reply", "event_payload": {"key": "reply:x"}}
    section, actions = body["blocks"]
    assert section["text"]["text"] == REPLY.text
    assert [(b["action_id"], b["value"], b["text"]["text"]) for b in actions["elements"]] == [
        ("learnloop_up", REPLY_ID, "👍"), ("learnloop_down", REPLY_ID, "👎"),
    ]  # fmt: skip
    long = slack.reply_blocks("x" * 7000, REPLY_ID, vote=(-1, "U1"))
    assert [b["type"] for b in long] == ["section", "section", "section", "actions", "context"]
    assert long[-1]["elements"][0]["text"] == "👎 from <@U1>"
    answer = {"ok": True, "messages": [{"ts": "1.0"}, {"ts": "1.9", "metadata": body["metadata"]}]}
    assert slack.posted_with_key(answer, "reply:x") == "1.9" and slack.posted_with_key(answer, "reply:y") is None


@pytest.mark.parametrize(
    ("status", "headers", "answer", "outcome"),
    [
        (200, {}, {"ok": True, "channel": "D1", "ts": "1.9", "message": {}}, Delivered({"channel": "D1", "ts": "1.9"})),
        (429, {"retry-after": "30"}, {}, Retry("HTTP 429", retry_after=30.0)),
        (503, {}, {}, Retry("HTTP 503")),
        (200, {}, {"ok": False, "error": "ratelimited"}, Retry("ratelimited")),
        (200, {}, {"ok": False, "error": "channel_not_found"}, Failed("channel_not_found")),
        (200, {}, {"ok": False, "error": "invalid_auth"}, Failed("invalid_auth")),
    ],
)
def test_slack_outcomes(status: int, headers: dict, answer: dict, outcome: object) -> None:
    assert slack.classify(status, headers, answer) == outcome


# --- Standard Webhooks --------------------------------------------------------------------


def test_webhook_events() -> None:
    body = {
        "type": "message.created",
        "timestamp": "2026-01-01T00:00:00Z",
        "data": {"thread": "t-1", "user": "u-7", "text": "hi"},
    }
    event = webhooks.parse_event("helpdesk", "msg_1", json.dumps(body).encode(), max_text_chars=100)
    assert (event.kind, event.key, event.thread, event.user, event.text) == (
        EventKind.MESSAGE, "msg_1", "t-1", "webhook:helpdesk:u-7", "hi",
    )  # fmt: skip
    rating = {
        "type": "rating.created",
        "data": {"message_id": REPLY_ID, "value": -1, "user": "u-7", "reason": "incorrect"},
    }
    event = webhooks.parse_event("helpdesk", "msg_2", json.dumps(rating).encode(), max_text_chars=100)
    assert (event.kind, event.message_id, event.value, event.reason, event.thread) == (
        EventKind.RATING, REPLY_ID, -1, "incorrect", None,
    )  # fmt: skip
    reply = webhooks.reply_event(webhooks.parse_event("h", "msg_1", json.dumps(body).encode(), max_text_chars=9), REPLY)
    assert reply["type"] == "reply.created" and reply["data"] | {} == {
        "thread": "t-1", "conversation_id": "c1", "message_id": REPLY_ID, "in_reply_to": "msg_1",
        "text": REPLY.text, "finish_reason": "stop", "model_version": "base",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"not json", "invalid"),
        (b'{"type": "user.created", "data": {}}', "invalid"),
        (b'{"type": "rating.created", "data": {"message_id": "m", "value": 2, "user": "u"}}', "invalid"),
        (
            b'{"type": "message.created", "data": {"thread": "t", "user": "u", "text": "' + b"x" * 101 + b'"}}',
            "too_large",
        ),
    ],
)
def test_webhook_bad_events(body: bytes, code: str) -> None:
    with pytest.raises(ApiError) as info:
        webhooks.parse_event("helpdesk", "msg_1", body, max_text_chars=100)
    assert info.value.code == code


@pytest.mark.parametrize(
    ("status", "headers", "outcome"),
    [
        (200, {}, Delivered({"status": 200})),
        (204, {}, Delivered({"status": 204})),
        (410, {}, Failed("410 Gone: the receiver wants no more webhooks")),
        (503, {"retry-after": "12"}, Retry("HTTP 503", retry_after=12.0)),
        (302, {}, Retry("HTTP 302")),  # redirects are failures: the URL should be updated instead
        (400, {}, Retry("HTTP 400")),
    ],
)
def test_webhook_outcomes(status: int, headers: dict, outcome: object) -> None:
    assert webhooks.classify(status, headers) == outcome


# --- shared --------------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap_within_the_upper_half() -> None:
    lows = [backoff_s(n, min_s=1, max_s=60, rand=0.0) for n in range(1, 10)]
    highs = [backoff_s(n, min_s=1, max_s=60, rand=0.999999) for n in range(1, 10)]
    assert lows == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert [round(h) for h in highs] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert next_attempt_at(100, 1, retry_after=None, min_s=1, max_s=60, rand=0.0) == 100.5
    assert next_attempt_at(100, 1, retry_after=7, min_s=1, max_s=60, rand=0.0) == 107  # the platform said 7 s


def test_messages_of_a_thread_share_a_lane_ratings_do_not() -> None:
    a = inbox_item(Channel.TELEGRAM, "support", Inbound(EventKind.MESSAGE, "update:1", "42", text="a"))
    b = inbox_item(Channel.TELEGRAM, "support", Inbound(EventKind.MESSAGE, "update:2", "42", text="b"))
    r = inbox_item(Channel.TELEGRAM, "support", Inbound(EventKind.RATING, "update:3", "42", message_id="m", value=1))
    assert a.lane == b.lane == "telegram:support:42" and r.lane == "telegram:support:rating:update:3"
    assert len({a.turn_id, a.reply_id, b.turn_id, b.reply_id}) == 4
    assert Inbound.from_payload(json.loads(json.dumps(a.payload))).text == "a"


def test_a_refused_connection_never_arrived_a_timeout_may_have() -> None:
    request = httpx.Request("POST", "http://127.0.0.1:9/")
    assert transport_outcome(httpx.ConnectError("refused", request=request)).uncertain is False
    assert transport_outcome(httpx.ReadTimeout("slow", request=request)).uncertain is True
    assert transport_outcome(httpx.RemoteProtocolError("closed", request=request)).uncertain is True
