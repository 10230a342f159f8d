"""Signature and secret checks of the IM channels, against the platforms' published examples. Pure, milliseconds."""

from __future__ import annotations

import base64

import pytest

from server.channels.signing import (
    SignatureError,
    check_telegram_secret,
    sign_standard,
    slack_signature,
    standard_signature,
    verify_slack,
    verify_standard,
)
from server.errors import http_error

# Slack's worked example in "Verifying requests from Slack" (a slash command's form body)
SLACK_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
SLACK_TS = "1531420618"
SLACK_BODY = (
    b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V"
    b"&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text="
    b"&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN"
    b"&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c"
)
SLACK_SIGNATURE = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"

# the Standard Webhooks reference libraries' test vector
WH_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
WH_KEY = base64.b64decode(WH_SECRET.removeprefix("whsec_"))
WH_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
WH_TS = 1614265330
WH_BODY = b'{"test": 2432232314}'
WH_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def refused(check: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(SignatureError) as info:
        check(*args, **kwargs)  # type: ignore[operator]
    response = http_error(info.value)
    assert response.status_code == 401 and b'"code":"unauthorized"' in bytes(response.body)
    return info.value.message


def test_slack_signature_matches_slacks_example() -> None:
    assert slack_signature(SLACK_SECRET, SLACK_TS, SLACK_BODY) == SLACK_SIGNATURE
    headers = {"X-Slack-Request-Timestamp": SLACK_TS, "X-Slack-Signature": SLACK_SIGNATURE}
    verify_slack(SLACK_SECRET, headers, SLACK_BODY, now=int(SLACK_TS) + 299)


@pytest.mark.parametrize(
    ("headers", "body", "now", "message"),
    [
        ({"X-Slack-Signature": SLACK_SIGNATURE}, SLACK_BODY, 1531420618, "X-Slack-Request-Timestamp header is missing"),
        ({"X-Slack-Request-Timestamp": SLACK_TS}, SLACK_BODY, 1531420618, "X-Slack-Signature header is missing"),
        ({"X-Slack-Request-Timestamp": SLACK_TS, "X-Slack-Signature": SLACK_SIGNATURE}, SLACK_BODY, 1531420919, "300 s"),
        ({"X-Slack-Request-Timestamp": SLACK_TS, "X-Slack-Signature": SLACK_SIGNATURE}, SLACK_BODY, 1531420317, "300 s"),
        ({"X-Slack-Request-Timestamp": "soon", "X-Slack-Signature": SLACK_SIGNATURE}, SLACK_BODY, 1, "Unix time"),
        ({"X-Slack-Request-Timestamp": SLACK_TS, "X-Slack-Signature": SLACK_SIGNATURE}, SLACK_BODY + b"x", 1531420618, "does not match"),
        ({"X-Slack-Request-Timestamp": "1531420619", "X-Slack-Signature": SLACK_SIGNATURE}, SLACK_BODY, 1531420618, "does not match"),
        ({"X-Slack-Request-Timestamp": SLACK_TS, "X-Slack-Signature": "v0=" + "0" * 64}, SLACK_BODY, 1531420618, "does not match"),
    ],
)  # fmt: skip
def test_slack_refusals(headers: dict[str, str], body: bytes, now: float, message: str) -> None:
    assert message in refused(verify_slack, SLACK_SECRET, headers, body, now=now)


def test_slack_wrong_secret_is_refused() -> None:
    headers = {"X-Slack-Request-Timestamp": SLACK_TS, "X-Slack-Signature": SLACK_SIGNATURE}
    assert "does not match" in refused(verify_slack, SLACK_SECRET[:-1] + "6", headers, SLACK_BODY, now=1531420618)


def test_standard_webhooks_signature_matches_the_reference_vector() -> None:
    assert standard_signature(WH_KEY, WH_ID, WH_TS, WH_BODY) == WH_SIGNATURE
    headers = sign_standard(WH_KEY, WH_ID, WH_TS, WH_BODY)
    assert headers == {"webhook-id": WH_ID, "webhook-timestamp": str(WH_TS), "webhook-signature": WH_SIGNATURE}
    assert verify_standard(WH_KEY, headers, WH_BODY, now=WH_TS + 10, tolerance_s=300) == WH_ID


def test_standard_webhooks_accepts_any_listed_v1_signature() -> None:
    """Several signatures, space-separated, during a key rotation; unknown versions are skipped."""
    other = standard_signature(b"k" * 32, WH_ID, WH_TS, WH_BODY)
    listed = f"v1a,c29tZXRoaW5n {other} {WH_SIGNATURE}"
    headers = {"webhook-id": WH_ID, "webhook-timestamp": str(WH_TS), "webhook-signature": listed}
    assert verify_standard(WH_KEY, headers, WH_BODY, now=WH_TS, tolerance_s=300) == WH_ID


@pytest.mark.parametrize(
    ("change", "now", "message"),
    [
        ({"webhook-id": None}, WH_TS, "webhook-id header is missing"),
        ({"webhook-timestamp": None}, WH_TS, "webhook-timestamp header is missing"),
        ({"webhook-signature": None}, WH_TS, "webhook-signature header is missing"),
        ({}, WH_TS + 301, "300 s"),
        ({}, WH_TS - 301, "300 s"),
        ({"webhook-id": "msg_other"}, WH_TS, "no webhook-signature matches"),
        ({"webhook-id": "msg.1"}, WH_TS, "may not contain"),
        ({"webhook-signature": WH_SIGNATURE.replace("v1,", "v2,")}, WH_TS, "no webhook-signature matches"),
        ({"webhook-signature": "v1," + base64.b64encode(b"\0" * 32).decode()}, WH_TS, "no webhook-signature matches"),
    ],
)
def test_standard_webhooks_refusals(change: dict[str, str | None], now: float, message: str) -> None:
    headers = {"webhook-id": WH_ID, "webhook-timestamp": str(WH_TS), "webhook-signature": WH_SIGNATURE} | change
    present = {k: v for k, v in headers.items() if v is not None}
    assert message in refused(verify_standard, WH_KEY, present, WH_BODY, now=now, tolerance_s=300)


def test_standard_webhooks_tampered_body_is_refused() -> None:
    headers = {"webhook-id": WH_ID, "webhook-timestamp": str(WH_TS), "webhook-signature": WH_SIGNATURE}
    assert "no webhook-signature" in refused(
        verify_standard, WH_KEY, headers, WH_BODY[:-1] + b"5}", now=WH_TS, tolerance_s=300
    )


def test_telegram_secret_token() -> None:
    check_telegram_secret("s3cret_TOKEN-1", {"X-Telegram-Bot-Api-Secret-Token": "s3cret_TOKEN-1"})
    assert "missing" in refused(check_telegram_secret, "s3cret_TOKEN-1", {})
    assert "wrong" in refused(
        check_telegram_secret, "s3cret_TOKEN-1", {"X-Telegram-Bot-Api-Secret-Token": "s3cret_TOKEN-2"}
    )
    assert "wrong" in refused(check_telegram_secret, "s3cret_TOKEN-1", {"X-Telegram-Bot-Api-Secret-Token": "s3cret"})
