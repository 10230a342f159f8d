"""The pure chat-session state machine: no sockets, no clock, milliseconds."""

from __future__ import annotations

import itertools
import json
from typing import Any

from server.protocol import (
    Cancel,
    ChatSession,
    ErrorCode,
    Generate,
    Limits,
    OpenConversation,
    Phase,
    Send,
    StoreRating,
    Turn,
)


def session(**limits: Any) -> ChatSession:
    counter = itertools.count(1)
    return ChatSession(new_id=lambda: f"id{next(counter)}", limits=Limits(**limits))


def frame(**f: Any) -> str:
    return json.dumps(f)


def ready(s: ChatSession) -> ChatSession:
    assert s.receive(frame(type="hello", user="u"), 0.0) == [OpenConversation(None, "u", None)]
    effects = s.opened("conv", [], set(), "base")
    assert effects == [Send({"type": "ready", "conversation_id": "conv", "model_version": "base", "protocol": 1})]
    return s


def error_code(effects: list[Any]) -> str:
    assert len(effects) == 1 and isinstance(effects[0], Send), effects
    assert effects[0].frame["type"] == "error"
    return str(effects[0].frame["code"])


def test_message_before_hello_is_rejected() -> None:
    s = session()
    assert error_code(s.receive(frame(type="message", text="hi", client_id="c"), 0.0)) == ErrorCode.HELLO_REQUIRED


def test_bad_frames_get_typed_errors() -> None:
    s = ready(session())
    assert error_code(s.receive("not json", 0.0)) == ErrorCode.BAD_REQUEST
    assert error_code(s.receive(b"\x00", 0.0)) == ErrorCode.BAD_REQUEST
    assert error_code(s.receive("[1, 2]", 0.0)) == ErrorCode.BAD_REQUEST
    assert error_code(s.receive(frame(type="dance"), 0.0)) == ErrorCode.UNKNOWN_TYPE
    assert error_code(s.receive(frame(type="message", text=3, client_id="c"), 0.0)) == ErrorCode.BAD_REQUEST
    assert error_code(s.receive(frame(type="message", text="  ", client_id="c"), 0.0)) == ErrorCode.BAD_REQUEST
    assert error_code(s.receive(frame(type="message", text="hi"), 0.0)) == ErrorCode.BAD_REQUEST
    assert error_code(s.receive(frame(type="hello"), 0.0)) == ErrorCode.CONFLICT
    assert error_code(s.receive(frame(type="message", text="a\u0000b", client_id="c"), 0.0)) == ErrorCode.BAD_REQUEST
    assert s.phase is Phase.IDLE


def test_error_echoes_client_id() -> None:
    s = ready(session())
    effects = s.receive(frame(type="rating", message_id="nope", value=1, id="r1"), 0.0)
    assert effects[0].frame["id"] == "r1" and effects[0].frame["code"] == ErrorCode.NOT_FOUND  # type: ignore[union-attr]


def test_message_streams_and_finishes() -> None:
    s = ready(session())
    (g,) = s.receive(frame(type="message", text="hi", client_id="c1"), 0.0)
    assert isinstance(g, Generate)
    assert g.user_turn == Turn("id1", "user", "hi") and g.message_id == "id2" and g.parent_id == "id1"
    assert g.context == (Turn("id1", "user", "hi"),)
    assert s.phase is Phase.GENERATING
    assert s.user_turn_stored(g) == [Send({"type": "ack", "id": "c1", "message_id": "id1"})]
    # a second message while streaming is refused, not queued
    assert error_code(s.receive(frame(type="message", text="again", client_id="c2"), 0.0)) == ErrorCode.BUSY
    assert s.receive(frame(type="stop"), 0.0) == [Cancel("id2")]
    (done,) = s.finished("id2", "hello!", "v3", "cancelled", completion_tokens=2)
    assert done == Send(
        {
            "type": "done",
            "message_id": "id2",
            "model_version": "v3",
            "finish_reason": "cancelled",
            "usage": {"completion_tokens": 2},
        }
    )
    assert s.phase is Phase.IDLE
    assert [t.role for t in s.history] == ["user", "assistant"]
    assert s.receive(frame(type="stop"), 0.0) == []  # stop when idle is a no-op


def test_second_turn_carries_context() -> None:
    s = ready(session())
    (g1,) = s.receive(frame(type="message", text="one", client_id="a"), 0.0)
    s.finished(g1.message_id, "reply one", "base", "stop")  # type: ignore[union-attr]
    (g2,) = s.receive(frame(type="message", text="two", client_id="b"), 0.0)
    assert [t.text for t in g2.context] == ["one", "reply one", "two"]  # type: ignore[union-attr]


def test_regenerate_replaces_latest_reply() -> None:
    s = ready(session())
    (g1,) = s.receive(frame(type="message", text="q", client_id="a"), 0.0)
    s.finished(g1.message_id, "first", "base", "stop")  # type: ignore[union-attr]
    (g2,) = s.receive(frame(type="regenerate", message_id=g1.message_id), 0.0)  # type: ignore[union-attr]
    assert isinstance(g2, Generate)
    assert g2.regenerated_from == g1.message_id and g2.parent_id == g1.parent_id  # type: ignore[union-attr]
    assert g2.user_turn is None and [t.text for t in g2.context] == ["q"]
    (done,) = s.finished(g2.message_id, "second", "base", "stop")
    assert done.frame["regenerated_from"] == g1.message_id  # type: ignore[union-attr]
    assert [t.text for t in s.history] == ["q", "second"]
    # both siblings can be rated; only the latest can be regenerated
    assert isinstance(s.receive(frame(type="rating", message_id=g1.message_id, value=-1, id="r"), 0.0)[0], StoreRating)  # type: ignore[union-attr]
    assert error_code(s.receive(frame(type="regenerate", message_id=g1.message_id), 0.0)) == ErrorCode.CONFLICT  # type: ignore[union-attr]


def test_failed_regeneration_restores_the_reply() -> None:
    s = ready(session())
    (g1,) = s.receive(frame(type="message", text="q", client_id="a"), 0.0)
    s.finished(g1.message_id, "first", "base", "stop")  # type: ignore[union-attr]
    (g2,) = s.receive(frame(type="regenerate", message_id=g1.message_id), 0.0)  # type: ignore[union-attr]
    (err,) = s.failed(g2.message_id, ErrorCode.OVERLOADED, "full", retry_after=1.0)  # type: ignore[union-attr]
    assert err.frame["code"] == ErrorCode.OVERLOADED and err.frame["retry_after"] == 1.0  # type: ignore[union-attr]
    assert [t.text for t in s.history] == ["q", "first"] and s.phase is Phase.IDLE


def test_failed_message_rolls_back_user_turn() -> None:
    s = ready(session())
    (g,) = s.receive(frame(type="message", text="q", client_id="a"), 0.0)
    s.failed(g.message_id, ErrorCode.INTERNAL, "boom")  # type: ignore[union-attr]
    assert s.history == [] and s.phase is Phase.IDLE


def test_rating_validation() -> None:
    s = ready(session())
    (g,) = s.receive(frame(type="message", text="q", client_id="a"), 0.0)
    s.finished(g.message_id, "r", "base", "stop")  # type: ignore[union-attr]
    mid = g.message_id  # type: ignore[union-attr]
    assert error_code(s.receive(frame(type="rating", message_id=mid, value=2, id="x"), 0.0)) == ErrorCode.BAD_REQUEST
    assert error_code(s.receive(frame(type="rating", message_id=mid, value=True, id="x"), 0.0)) == ErrorCode.BAD_REQUEST
    assert error_code(s.receive(frame(type="rating", message_id=mid, value=1), 0.0)) == ErrorCode.BAD_REQUEST
    ok = s.receive(frame(type="rating", message_id=mid, value=1, id="x", reason="helpful", comment="thanks"), 0.0)
    assert ok == [StoreRating(mid, 1, "x", "helpful", "thanks")]
    assert s.rating_stored("x") == [Send({"type": "ack", "id": "x"})]


def test_limits_are_on_by_default() -> None:
    s = ready(session())
    too_long = "x" * (Limits().max_text_chars + 1)  # type: ignore[operator]
    assert error_code(s.receive(frame(type="message", text=too_long, client_id="c"), 0.0)) == ErrorCode.TOO_LARGE


def test_rate_limit_refills() -> None:
    s = ready(session(rate_per_s=2.0, rate_burst=3))
    for _ in range(3):
        assert s.receive(frame(type="stop"), 10.0) == []
    effects = s.receive(frame(type="stop"), 10.0)
    assert error_code(effects) == ErrorCode.RATE_LIMITED
    assert effects[0].frame["retry_after"] == 0.5  # type: ignore[union-attr]
    assert s.receive(frame(type="stop"), 10.6) == []  # refilled


def test_a_rate_limited_frame_is_named_in_its_error() -> None:
    """A client retries the refused frame after retry_after, so it has to know which one it was."""
    s = ready(session(rate_per_s=1.0, rate_burst=1))
    assert s.receive(frame(type="stop"), 5.0) == []
    (err,) = s.receive(frame(type="rating", message_id="m", value=1, id="r7"), 5.0)
    assert err.frame["code"] == ErrorCode.RATE_LIMITED and err.frame["id"] == "r7"  # type: ignore[union-attr]
    (err,) = s.receive(frame(type="message", text="hi", client_id="c7"), 5.0)
    assert err.frame["code"] == ErrorCode.RATE_LIMITED and err.frame["id"] == "c7"  # type: ignore[union-attr]
    assert error_code(s.receive("{not json", 7.0)) == ErrorCode.BAD_REQUEST
    assert error_code(s.receive(frame(type="stop"), 7.0)) == ErrorCode.RATE_LIMITED  # the garbage was counted


def test_resume_restores_history() -> None:
    s = session()
    s.receive(frame(type="hello", conversation_id="c9"), 0.0)
    s.opened("c9", [Turn("u1", "user", "q"), Turn("a1", "assistant", "r")], {"a1"}, "v2")
    (g,) = s.receive(frame(type="regenerate", message_id="a1"), 0.0)
    assert isinstance(g, Generate) and g.parent_id == "u1"


def test_a_resumed_branch_ending_with_a_user_turn_gets_that_turn_answered() -> None:
    """A reply cut off by a restart was never stored: regenerating the user turn answers it once."""
    s = session()
    s.receive(frame(type="hello", conversation_id="c9"), 0.0)
    s.opened("c9", [Turn("u1", "user", "q"), Turn("a1", "assistant", "r"), Turn("u2", "user", "again")], {"a1"}, "v2")
    assert error_code(s.receive(frame(type="regenerate", message_id="u1"), 0.0)) == ErrorCode.NOT_FOUND
    (g,) = s.receive(frame(type="regenerate", message_id="u2"), 0.0)
    assert isinstance(g, Generate) and g.parent_id == "u2" and g.user_turn is None and g.regenerated_from is None
    assert [t.id for t in g.context] == ["u1", "a1", "u2"]
    (_err,) = s.failed(g.message_id, ErrorCode.OVERLOADED, "full", retry_after=1.0)
    assert [t.id for t in s.history] == ["u1", "a1", "u2"]  # still unanswered: the client may ask again
    (g2,) = s.receive(frame(type="regenerate", message_id="u2"), 0.0)
    (done,) = s.finished(g2.message_id, "answer", "v2", "stop")  # type: ignore[union-attr]
    assert "regenerated_from" not in done.frame  # type: ignore[union-attr]
    assert [t.id for t in s.history] == ["u1", "a1", "u2", g2.message_id]  # type: ignore[union-attr]


def test_open_failed_allows_a_new_hello() -> None:
    s = session()
    s.receive(frame(type="hello", conversation_id="gone"), 0.0)
    (err,) = s.open_failed(ErrorCode.NOT_FOUND, "no such conversation")
    assert err.frame["code"] == ErrorCode.NOT_FOUND  # type: ignore[union-attr]
    assert isinstance(s.receive(frame(type="hello"), 0.0)[0], OpenConversation)


def test_takeover_stores_turns_without_model_replies_and_hands_back() -> None:
    from server.protocol import StoreTurn

    s = ready(session())
    [g] = s.receive(frame(type="message", text="hi", client_id="c1"), 0.0)
    assert isinstance(g, Generate)
    # an operator joins while the model streams: the reply is stopped, the customer told
    assert s.operator_joined("rita") == [Cancel(g.message_id), Send({"type": "operator_joined"})]
    s.finished(g.message_id, "partial", "base", "cancelled")
    assert s.operator_joined("rita") == []  # joining twice says nothing new
    [turn] = s.receive(frame(type="message", text="hello?", client_id="c2"), 0.0)
    assert isinstance(turn, StoreTurn) and turn.parent_id == g.message_id and turn.client_id == "c2"
    assert s.turn_stored(turn) == [Send({"type": "ack", "id": "c2", "message_id": turn.turn.id, "operator": True})]
    assert error_code(s.receive(frame(type="regenerate", message_id=g.message_id), 0.0)) == ErrorCode.CONFLICT
    pushed = s.operator_reply("op1", "Rita here.")
    assert pushed == [Send({"type": "operator_message", "message_id": "op1", "text": "Rita here."})]
    assert [t.id for t in s.history][-2:] == [turn.turn.id, "op1"]
    assert s.receive(frame(type="rating", message_id="op1", value=1, id="r"), 0.0) == [
        StoreRating("op1", 1, "r", None, None)
    ]
    assert s.operator_left() == [Send({"type": "operator_left"})]
    assert s.operator_left() == []
    [g2] = s.receive(frame(type="message", text="thanks", client_id="c3"), 0.0)
    assert isinstance(g2, Generate) and g2.context[-2].id == "op1"


def test_a_turn_that_fails_to_store_leaves_the_branch_as_it_was() -> None:
    s = ready(session())
    s.operator_joined("rita")
    [turn] = s.receive(frame(type="message", text="hello?", client_id="c2"), 0.0)
    effects = s.turn_failed(turn, ErrorCode.INTERNAL, "internal error")  # type: ignore[arg-type]
    assert error_code(effects) == ErrorCode.INTERNAL and s.history == []


def test_a_widget_hello_names_its_site_and_the_users_hash() -> None:
    s = session()
    [effect] = s.receive(frame(type="hello", site="shop", user="u1", user_hash="ab" * 32), 0.0)
    assert effect == OpenConversation(None, "u1", None, "shop", "ab" * 32)
    s = session()
    assert error_code(s.receive(frame(type="hello", user="u1", user_hash="ab" * 32), 0.0)) == ErrorCode.BAD_REQUEST
    assert error_code(s.receive(frame(type="hello", site=7), 0.0)) == ErrorCode.BAD_REQUEST
    assert error_code(s.receive(frame(type="hello", site="x" * 201), 0.0)) == ErrorCode.TOO_LARGE
    assert isinstance(s.receive(frame(type="hello", site="shop"), 0.0)[0], OpenConversation)  # still open
