"""Pure rules of the console: roles, password hashing, search strings, cursors (milliseconds)."""

from __future__ import annotations

import pytest

from feedback.accounts import (
    AccountError,
    OperatorRole,
    check_new_account,
    hash_password,
    token_hash,
    verify_password,
)
from feedback.browse import (
    BrowseError,
    ConversationFilter,
    conversation_filter,
    decode_cursor,
    encode_cursor,
    fts_query,
)


def test_roles_are_ordered() -> None:
    admin, reviewer, viewer = OperatorRole.ADMIN, OperatorRole.REVIEWER, OperatorRole.VIEWER
    assert admin.allows(reviewer) and admin.allows(viewer) and reviewer.allows(viewer)
    assert not viewer.allows(reviewer) and not reviewer.allows(admin)
    assert all(r.allows(r) for r in OperatorRole)


def test_passwords_are_salted_scrypt_and_verify() -> None:
    a, b = hash_password("correct-horse-9"), hash_password("correct-horse-9")
    assert a != b and a.startswith("scrypt$")  # a fresh salt each time
    assert "correct-horse" not in a
    assert verify_password("correct-horse-9", a) and verify_password("correct-horse-9", b)
    assert not verify_password("correct-horse-8", a)
    assert not verify_password("x", "garbage") and not verify_password("x", "md5$1$2$3$4$5")
    assert token_hash("t") == token_hash("t") != token_hash("u")


@pytest.mark.parametrize(
    ("name", "password", "role", "message"),
    [
        ("bad name!", "long-enough", "viewer", "names"),
        ("ok", "short", "viewer", "at least"),
        ("ok", "long-enough", "root", "role must be"),
    ],
)
def test_new_accounts_are_checked(name: str, password: str, role: str, message: str) -> None:
    with pytest.raises(AccountError, match=message):
        check_new_account(name, password, role)


def test_search_text_is_quoted_not_interpreted() -> None:
    assert fts_query("refund blender") == '"refund" "blender"*'
    assert fts_query('NEAR("x" AND') == '"NEAR(""x""" "AND"*'
    with pytest.raises(BrowseError):
        fts_query('  "" ')


def test_cursor_round_trip_and_bad_cursors() -> None:
    assert decode_cursor(encode_cursor(1795950000.123456, "abc~def")) == (1795950000.123456, "abc~def")
    for bad in ("", "x", "1.5~", "abc~id"):
        with pytest.raises(BrowseError):
            decode_cursor(bad)


def test_filters_become_parameterised_clauses() -> None:
    where, params = conversation_filter(
        ConversationFilter(rating="down", version="v2", channel="slack", since=1.0, until=2.0, q="x'; DROP")
    )
    assert len(where) >= 6 and {"v2", "slack", 1.0, 2.0, fts_query("x'; DROP")} <= set(params)
    assert all("DROP" not in w for w in where)  # user text only ever travels as a parameter
    with pytest.raises(BrowseError):
        conversation_filter(ConversationFilter(rating="sideways"))
    assert conversation_filter(ConversationFilter()) == ([], [])
