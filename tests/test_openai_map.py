"""The OpenAI request -> stored conversation rule (pure, milliseconds), and stop sequences."""

from __future__ import annotations

import pytest

from feedback.records import FinishReason, Message, Role
from server.channels.openai_map import ChatTurn, Plan, opening, parse_messages, plan
from server.errors import ApiError
from server.replies import scan_stop

S, U, A = Role.SYSTEM, Role.USER, Role.ASSISTANT


def turns(*pairs: tuple[Role, str]) -> tuple[ChatTurn, ...]:
    return tuple(ChatTurn(role, text) for role, text in pairs)


def stored(conv: str, *rows: tuple[str, Role, str, str | None], failed: tuple[str, ...] = ()) -> list[Message]:
    """Messages (id, role, text, parent) in order; assistant ones written by version v1."""
    return [
        Message(
            id=id,
            conversation_id=conv,
            seq=i + 1,
            role=role,
            text=text,
            parent_id=parent,
            model_version="v1" if role is A else None,
            finish_reason=FinishReason.ERROR if id in failed else None,
        )
        for i, (id, role, text, parent) in enumerate(rows)
    ]


CHAT = stored("c1", ("s", S, "Be brief.", None), ("u1", U, "hi", "s"), ("a1", A, "hello", "u1"))


def test_parse_messages_accepts_openais_shapes_and_refuses_the_rest() -> None:
    parsed = parse_messages(
        [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
        ],
        max_text_chars=100,
    )
    assert parsed == turns((S, "Be brief."), (U, "hi there"))
    bad = [
        ([], "at least one"),
        ([{"role": "tool", "content": "x"}], "messages.0.role"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}], "1"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "only text"),
        ([{"role": "user", "content": None}], "string or a list"),
    ]
    for messages, where in bad:
        with pytest.raises(ApiError, match=where) as caught:
            parse_messages(messages, max_text_chars=100)
        assert caught.value.code == "invalid"
    with pytest.raises(ApiError) as caught:
        parse_messages([{"role": "user", "content": "x" * 101}], max_text_chars=100)
    assert caught.value.code == "too_large"


def test_a_first_request_opens_a_new_conversation_with_every_turn() -> None:
    request = turns((S, "Be brief."), (U, "hi"))
    assert plan(request, []) == Plan(None, None, request)
    # the same system prompt alone is not a conversation to continue
    assert plan(turns((S, "Be brief."), (U, "other")), [("c1", CHAT)]) == Plan(
        None, None, turns((S, "Be brief."), (U, "other"))
    )


def test_a_request_that_extends_a_stored_chat_continues_it_after_its_reply() -> None:
    request = turns((S, "Be brief."), (U, "hi"), (A, "hello"), (U, "refund?"))
    assert plan(request, [("c1", CHAT)]) == Plan("c1", "a1", turns((U, "refund?")))


def test_the_longest_stored_prefix_wins_then_the_newest_conversation() -> None:
    longer = stored(
        "c2",
        ("u1", U, "hi", None),
        ("a1", A, "hello", "u1"),
        ("u2", U, "refund?", "a1"),
        ("a2", A, "30 days", "u2"),
    )
    short_new = stored("c3", ("x1", U, "hi", None), ("x2", A, "hello", "x1"))
    request = turns((U, "hi"), (A, "hello"), (U, "refund?"), (A, "30 days"), (U, "thanks"))
    assert plan(request, [("c3", short_new), ("c2", longer)]) == Plan("c2", "a2", turns((U, "thanks")))
    same_length = turns((U, "hi"), (A, "hello"), (U, "bye"))
    assert plan(same_length, [("c3", short_new), ("c2", longer)]).conversation_id == "c3"


def test_history_equal_up_to_the_last_user_turn_is_a_regeneration_of_the_latest_reply() -> None:
    regenerated = stored(
        "c1",
        ("u1", U, "hi", None),
        ("a1", A, "hello", "u1"),
        ("a1b", A, "hey", "u1"),
    )
    assert plan(turns((U, "hi")), [("c1", regenerated)]) == Plan("c1", "u1", (), answer="u1", regenerated_from="a1b")


def test_a_branch_other_than_the_latest_is_followed() -> None:
    branched = stored(
        "c1",
        ("u1", U, "hi", None),
        ("a1", A, "hello", "u1"),
        ("a1b", A, "hey", "u1"),
        ("u2", U, "more", "a1b"),
    )
    assert plan(turns((U, "hi"), (A, "hello"), (U, "again")), [("c1", branched)]) == Plan(
        "c1", "a1", turns((U, "again"))
    )


def test_a_user_turn_left_unanswered_is_answered_without_storing_it_twice() -> None:
    cut = stored("c1", ("u1", U, "hi", None), ("a1", A, "", "u1"), failed=("a1",))
    assert plan(turns((U, "hi")), [("c1", cut)]) == Plan("c1", "u1", (), answer="u1", regenerated_from=None)


def test_failed_replies_and_changed_assistant_turns_never_match() -> None:
    cut = stored("c1", ("u1", U, "hi", None), ("a1", A, "", "u1"), failed=("a1",))
    request = turns((U, "hi"), (A, ""), (U, "hello?"))
    assert plan(request, [("c1", cut)]) == Plan(None, None, request)
    edited = turns((U, "hi"), (A, "HELLO (edited by the client)"), (U, "refund?"))
    assert plan(edited, [("c1", CHAT)]) == Plan(None, None, edited)


def test_a_client_written_reply_is_never_regenerated_from() -> None:
    """Assistant turns the client sent are stored without a model version; a regeneration after
    one is a plain answer, so no training pair rejects a text the client wrote."""
    client = [
        Message(id="u1", conversation_id="c1", seq=1, role=U, text="hi", parent_id=None),
        Message(id="a1", conversation_id="c1", seq=2, role=A, text="typed by the client", parent_id="u1"),
    ]
    assert plan(turns((U, "hi")), [("c1", client)]).regenerated_from is None


def test_the_opening_separates_keys_and_users_and_ignores_later_turns() -> None:
    one = turns((S, "Be brief."), (U, "hi"))
    longer = (*one, ChatTurn(A, "hello"), ChatTurn(U, "refund?"))
    assert opening("shop", None, one) == opening("shop", None, longer)
    assert len({opening("shop", None, one), opening("bank", None, one), opening("shop", "openai:shop:u", one)}) == 3


def test_scan_stop_cuts_at_the_first_stop_and_holds_back_what_may_begin_one() -> None:
    assert scan_stop("Hello world", ["wor"]) == (6, True)
    assert scan_stop("Hello wo", ["wor"]) == (6, False)  # "wo" might begin "wor"
    assert scan_stop("Hello", ["wor"]) == (5, False)
    assert scan_stop("a\n\nb", ["\n\n", "b"]) == (1, True)
    assert scan_stop("abc", []) == (3, False)
