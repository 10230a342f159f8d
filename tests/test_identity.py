"""Which widget hellos are admitted: site origins and HMAC-verified user ids (pure, no sockets)."""

from __future__ import annotations

import pytest

from feedback.exceptions import ErrorCode
from server.channels.identity import (
    IdentityError,
    admit,
    normalize_origin,
    origin_allowed,
    user_hash,
    verify_user_hash,
)
from server.settings import Secret, SiteConfig

SECRET = "shop-secret-0123456789"
# printf 'u123' | openssl dgst -sha256 -hmac 'shop-secret-0123456789'
U123 = "a8c0ee4c5ccc7ba0dabf7a5df0baa07fd4413b8fb9b53994338b1b6fc1f4eab1"
SHOP = SiteConfig(origins=("https://shop.example",), secret=Secret(SECRET))


def test_user_hash_is_hex_hmac_sha256_as_openssl_computes_it() -> None:
    assert user_hash(SECRET, "u123") == U123


def test_verify_accepts_the_hash_and_only_the_hash() -> None:
    assert verify_user_hash(SECRET, "u123", U123)
    assert verify_user_hash(SECRET, "u123", U123.upper())  # hex digits in either case
    assert not verify_user_hash(SECRET, "u124", U123)  # another user
    assert not verify_user_hash("another-secret-0123456789", "u123", U123)
    assert not verify_user_hash(SECRET, "u123", U123[:-1])  # truncated
    assert not verify_user_hash(SECRET, "u123", "")
    assert not verify_user_hash(SECRET, "u123", "é" * 64)  # not hex, not even ASCII: no exception


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("https://Shop.Example", "https://shop.example"),
        ("https://shop.example:443/", "https://shop.example"),
        ("http://localhost:3000", "http://localhost:3000"),
        ("http://[::1]:8767", "http://[::1]:8767"),
        ("https://shop.example/path", None),
        ("ftp://shop.example", None),
        ("shop.example", None),
        ("https://user:pw@shop.example", None),
        ("https://shop.example:99999", None),
        ("null", None),
    ],
)
def test_origins_are_normalized(raw: str, normalized: str | None) -> None:
    assert normalize_origin(raw) == normalized


def test_origin_must_be_listed() -> None:
    origins = ("https://shop.example",)
    assert origin_allowed(origins, "https://SHOP.example:443")
    assert not origin_allowed(origins, "https://shop.example.evil.test")
    assert not origin_allowed(origins, "http://shop.example")  # scheme matters
    assert not origin_allowed(origins, None)
    assert not origin_allowed(origins, "null")  # sandboxed frames and file: pages


def _code(**kwargs: object) -> ErrorCode:
    with pytest.raises(IdentityError) as err:
        admit(**kwargs)  # type: ignore[arg-type]
    return err.value.code


def test_admit_anonymous_and_verified_visitors() -> None:
    anonymous = admit(SHOP, name="shop", origin="https://shop.example", user=None, claimed_hash=None)
    assert (anonymous.site, anonymous.user) == ("shop", None)
    known = admit(SHOP, name="shop", origin="https://shop.example", user="u123", claimed_hash=U123)
    assert known.user == "u123"


def test_admit_refuses_with_the_code_the_client_gets() -> None:
    base = {"name": "shop", "origin": "https://shop.example", "user": None, "claimed_hash": None}
    assert _code(site=None, **base) is ErrorCode.NOT_FOUND
    assert _code(site=SHOP, **(base | {"origin": "https://evil.test"})) is ErrorCode.FORBIDDEN
    assert _code(site=SHOP, **(base | {"origin": None})) is ErrorCode.FORBIDDEN
    assert _code(site=SHOP, **(base | {"user": "u123", "claimed_hash": "00" * 32})) is ErrorCode.UNAUTHORIZED
    assert _code(site=SHOP, **(base | {"user": "u123"})) is ErrorCode.UNAUTHORIZED  # a user without a hash
    assert _code(site=SHOP, **(base | {"claimed_hash": U123})) is ErrorCode.BAD_REQUEST
    no_secret = SiteConfig(origins=("https://shop.example",))
    assert _code(site=no_secret, **(base | {"user": "u123", "claimed_hash": U123})) is ErrorCode.UNAUTHORIZED


def test_the_origin_is_checked_before_the_user() -> None:
    """A page on another origin learns nothing about which user hashes are right."""
    bad = {"name": "shop", "origin": "https://evil.test", "user": "u123", "claimed_hash": U123}
    assert _code(site=SHOP, **bad) is ErrorCode.FORBIDDEN
