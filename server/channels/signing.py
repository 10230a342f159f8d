"""Every check that an IM request really comes from its platform, as each platform documents it. Pure.

- **Telegram** signs nothing: ``setWebhook`` takes a ``secret_token`` that Telegram sends back
  in ``X-Telegram-Bot-Api-Secret-Token`` on every update (``check_telegram_secret``).
- **Slack** signs the raw body with the app's signing secret, scheme ``v0``:
  ``X-Slack-Signature: v0=<hex HMAC-SHA256(secret, "v0:{timestamp}:{body}")>`` with
  ``X-Slack-Request-Timestamp``; a timestamp more than five minutes from our clock is refused,
  so a captured request cannot be replayed later (``verify_slack``).
- **Standard Webhooks** (both ways): ``webhook-id``, ``webhook-timestamp`` (Unix seconds) and
  ``webhook-signature``, a space-separated list of ``v1,<base64 HMAC-SHA256(key,
  "{id}.{timestamp}.{body}")>`` (several during a key rotation; one match is enough), where
  the key is the base64 after ``whsec_`` (``sign_standard``, ``verify_standard``).

Every comparison is constant-time (``hmac.compare_digest``), and every refusal is a
``SignatureError``: 401 ``unauthorized`` in the channels' error envelope, whatever was wrong
(missing header, stale timestamp, wrong signature); the message says which, never the secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping

from feedback.exceptions import ErrorCode
from server.errors import ApiError

SLACK_TOLERANCE_S = 300.0  # Slack's documented replay window: five minutes


class SignatureError(ApiError):
    """A request is not proven to come from its platform: 401 ``unauthorized``."""

    code = ErrorCode.UNAUTHORIZED


def _equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name) or headers.get(name.lower())
    if not value:
        raise SignatureError(f"the {name} header is missing")
    return value


def _timestamp(value: str, *, now: float, tolerance_s: float, name: str) -> int:
    try:
        stamp = int(value)
    except ValueError:
        raise SignatureError(f"{name} is not a Unix time in seconds") from None
    if abs(now - stamp) > tolerance_s:
        raise SignatureError(f"{name} is more than {tolerance_s:g} s from the server's clock (a replay?)")
    return stamp


# --- Telegram ------------------------------------------------------------------------------

TELEGRAM_SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"


def check_telegram_secret(expected: str, headers: Mapping[str, str]) -> None:
    """The update carries the bot's ``secret_token``, or SignatureError."""
    if not _equal(expected, _header(headers, TELEGRAM_SECRET_HEADER)):
        raise SignatureError(f"the {TELEGRAM_SECRET_HEADER} header is wrong")


# --- Slack ---------------------------------------------------------------------------------


def slack_signature(secret: str, timestamp: str, body: bytes) -> str:
    """``v0=<hex>``: what Slack sends in ``X-Slack-Signature`` for ``body`` at ``timestamp``."""
    base = b"v0:" + timestamp.encode() + b":" + body
    return "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()


def verify_slack(
    secret: str, headers: Mapping[str, str], body: bytes, *, now: float, tolerance_s: float = SLACK_TOLERANCE_S
) -> None:
    """A request signed by the app's signing secret within the replay window, or SignatureError."""
    timestamp = _header(headers, "X-Slack-Request-Timestamp")
    signature = _header(headers, "X-Slack-Signature")
    _timestamp(timestamp, now=now, tolerance_s=tolerance_s, name="X-Slack-Request-Timestamp")
    if not _equal(slack_signature(secret, timestamp, body), signature.strip()):
        raise SignatureError("X-Slack-Signature does not match the body (check the app's signing secret)")


# --- Standard Webhooks ---------------------------------------------------------------------


def standard_signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64>``: the symmetric Standard Webhooks signature of ``body``."""
    signed = msg_id.encode() + b"." + str(timestamp).encode() + b"." + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def sign_standard(key: bytes, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three headers of a Standard Webhooks request."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": standard_signature(key, msg_id, timestamp, body),
    }


def verify_standard(key: bytes, headers: Mapping[str, str], body: bytes, *, now: float, tolerance_s: float) -> str:
    """The request's ``webhook-id`` when one of its ``v1`` signatures matches in time, else SignatureError."""
    msg_id = _header(headers, "webhook-id")
    timestamp = _header(headers, "webhook-timestamp")
    signatures = _header(headers, "webhook-signature")
    if "." in msg_id or "." in timestamp:  # the spec: ids and timestamps never hold the separator
        raise SignatureError("webhook-id and webhook-timestamp may not contain '.'")
    stamp = _timestamp(timestamp, now=now, tolerance_s=tolerance_s, name="webhook-timestamp")
    expected = standard_signature(key, msg_id, stamp, body)
    # one match is enough, but every listed v1 signature is compared (no early exit on a match)
    matched = False
    for candidate in signatures.split():
        version, _, _ = candidate.partition(",")
        if version == "v1" and _equal(expected, candidate):
            matched = True
    if not matched:
        raise SignatureError("no webhook-signature matches the body (check the shared whsec_ secret)")
    return msg_id
