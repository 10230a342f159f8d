"""Settings of the channels: the public listener (``[channels]``), each widget site (``[sites.NAME]``),
one table per Telegram bot, Slack app and webhook sender, and the outbox.

``server.settings`` reads them (``[telegram.NAME]``, ``[slack.NAME]``, ``[webhooks.NAME]``,
``[outbox]``, and their ``LEARNLOOP_...`` forms) and turns a ``ValueError`` raised here into
a ``SettingsError`` naming the table. Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field

from server.channels.identity import normalize_origin
from server.secret import Secret


@dataclass(frozen=True)
class OutboxConfig:
    """Delivery to IM platforms (the outbox) and retries of their events (the inbox)."""

    max_age_s: float = field(
        default=86400.0,
        metadata={
            "help": "A platform call (or an inbound event) not done after this long is given up and marked "
            "failed: logged, and listed by learnloop outbox."
        },
    )
    min_backoff_s: float = field(
        default=1.0, metadata={"help": "First wait before a failed platform call is tried again (then doubling)."}
    )
    max_backoff_s: float = field(
        default=300.0, metadata={"help": "Longest wait between two tries (each wait is drawn from its upper half)."}
    )
    timeout_s: float = field(default=15.0, metadata={"help": "Time limit of one platform call."})
    concurrency: int = field(
        default=8,
        metadata={"help": "Platform calls, and inbound events, in progress at once (one per chat or thread)."},
    )
    dedupe_window_s: float = field(
        default=259200.0,
        metadata={
            "help": "How long the ids of processed platform events are kept to drop redeliveries (under a week: "
            "Telegram may restart update_id at random after a week without updates)."
        },
    )

    def __post_init__(self) -> None:
        if not 0 < self.min_backoff_s <= self.max_backoff_s:
            raise ValueError("outbox: use 0 < min_backoff_s <= max_backoff_s")
        if self.concurrency < 1 or self.timeout_s <= 0 or self.max_age_s <= 0:
            raise ValueError("outbox: concurrency, timeout_s and max_age_s must be positive")


TELEGRAM_SECRET_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")


def _require(value: object, where: str, how: str) -> None:
    if value is None:
        raise ValueError(f"{where} is required: {how}")


@dataclass(frozen=True)
class TelegramConfig:
    """One Telegram bot: ``[telegram.NAME]``; its webhook is ``POST /hooks/telegram/NAME``."""

    token: Secret | None = field(
        default=None, metadata={"help": "The bot's token from @BotFather (required). Never printed."}
    )
    secret_token: Secret | None = field(
        default=None,
        metadata={
            "help": "The secret_token given to setWebhook (required; 1-256 of A-Z a-z 0-9 _ -): Telegram sends it "
            "in X-Telegram-Bot-Api-Secret-Token, and any request without it gets 401."
        },
    )
    api_base: str = field(default="https://api.telegram.org", metadata={"help": "Base URL of the Bot API."})
    new_conversation_command: str = field(
        default="/start", metadata={"help": "A message starting with this command begins a new conversation."}
    )
    greeting: str = field(
        default="Hello! Ask me anything. Send /start to begin a new conversation.",
        metadata={"help": "The answer to the new-conversation command sent alone."},
    )
    edit_interval_ms: int = field(
        default=1000,
        metadata={
            "help": "A reply streams into one message, edited at most this often (Telegram allows about one "
            "message a second per chat)."
        },
    )

    def __post_init__(self) -> None:
        _require(self.token, "telegram.NAME.token", "the bot token from @BotFather")
        _require(self.secret_token, "telegram.NAME.secret_token", "the secret_token you give setWebhook")
        assert self.secret_token is not None
        if not TELEGRAM_SECRET_TOKEN.fullmatch(self.secret_token.reveal()):
            raise ValueError("telegram.NAME.secret_token: use 1-256 characters of A-Z, a-z, 0-9, _ and -")
        if not self.new_conversation_command.startswith("/"):
            raise ValueError("telegram.NAME.new_conversation_command: a command such as /start")
        if self.edit_interval_ms < 0:
            raise ValueError("telegram.NAME.edit_interval_ms: use 0 or more")


@dataclass(frozen=True)
class SlackConfig:
    """One Slack app: ``[slack.NAME]``; its URLs are ``/hooks/slack/NAME/events`` and ``.../interactivity``."""

    bot_token: Secret | None = field(
        default=None, metadata={"help": "The app's Bot User OAuth Token, xoxb-... (required). Never printed."}
    )
    signing_secret: Secret | None = field(
        default=None,
        metadata={"help": "The app's Signing Secret (required): every request is checked with it. Never printed."},
    )
    api_base: str = field(default="https://slack.com/api", metadata={"help": "Base URL of the Web API."})

    def __post_init__(self) -> None:
        _require(self.bot_token, "slack.NAME.bot_token", "the app's Bot User OAuth Token (xoxb-...)")
        _require(self.signing_secret, "slack.NAME.signing_secret", "the app's Signing Secret")


WEBHOOK_SECRET_PREFIX = "whsec_"


def webhook_key(secret: Secret) -> bytes:
    """The HMAC key of a Standard Webhooks secret: ``whsec_`` then base64 of 24 to 64 random bytes."""
    value = secret.reveal()
    if not value.startswith(WEBHOOK_SECRET_PREFIX):
        raise ValueError("webhooks.NAME.secret: a Standard Webhooks secret starts with whsec_")
    try:
        key = base64.b64decode(value[len(WEBHOOK_SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("webhooks.NAME.secret: after whsec_ comes base64") from None
    if not 24 <= len(key) <= 64:
        raise ValueError("webhooks.NAME.secret: the key is 24 to 64 bytes (32 recommended)")
    return key


@dataclass(frozen=True)
class WebhookConfig:
    """One sender of Standard Webhooks: ``[webhooks.NAME]``; it posts to ``/hooks/webhook/NAME``."""

    secret: Secret | None = field(
        default=None,
        metadata={
            "help": "The shared Standard Webhooks secret, whsec_ + base64 of 24-64 random bytes (required): it "
            "checks inbound webhook-signature and signs our replies. Never printed."
        },
    )
    outbound_url: str | None = field(
        default=None, metadata={"help": "Where replies are POSTed as reply.created events (required)."}
    )
    tolerance_s: float = field(
        default=300.0,
        metadata={"help": "An inbound webhook-timestamp further than this from our clock is refused (replays)."},
    )

    def __post_init__(self) -> None:
        _require(self.secret, "webhooks.NAME.secret", "whsec_ followed by base64 of 32 random bytes")
        assert self.secret is not None
        webhook_key(self.secret)
        _require(self.outbound_url, "webhooks.NAME.outbound_url", "the URL our replies are POSTed to")
        assert self.outbound_url is not None
        if not self.outbound_url.startswith(("https://", "http://")):
            raise ValueError("webhooks.NAME.outbound_url: an http(s) URL")
        if self.tolerance_s <= 0:
            raise ValueError("webhooks.NAME.tolerance_s: use a positive number of seconds")


@dataclass(frozen=True)
class ChannelsConfig:
    enabled: bool = field(
        default=True,
        metadata={"help": "Serve the public channels listener: widget.js and its demo page."},
    )
    host: str = field(default="127.0.0.1", metadata={"help": "Address of the channels listener (loopback by default)."})
    port: int = field(default=8767, metadata={"help": "Port of the channels listener (0 picks a free one)."})
    max_body_bytes: int = field(
        default=65536, metadata={"help": "Largest request body accepted; a larger one gets 413 too_large."}
    )
    requests_per_minute: float = field(
        default=300.0,
        metadata={
            "help": "Requests per minute per client address (a minute's worth may come at once; over it: 429 "
            "with Retry-After; 0 = no limit). Behind a proxy on loopback the address is X-Forwarded-For's."
        },
    )
    openai_requests_per_minute: float = field(
        default=60.0,
        metadata={
            "help": "Requests per minute per OpenAI-compatible API key name (a minute's worth may come at once; "
            "over it: 429 with Retry-After; 0 = no limit)."
        },
    )
    demo: bool = field(
        default=True,
        metadata={
            "help": "Serve the demo page at / and accept its built-in site 'demo' from this listener's own "
            "loopback origin (never while server.token is set)."
        },
    )

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1:
            raise ValueError(f"channels.max_body_bytes {self.max_body_bytes}: use a positive number of bytes")
        if self.requests_per_minute < 0:
            raise ValueError("channels.requests_per_minute: use 0 (no limit) or a positive rate")
        if self.openai_requests_per_minute < 0:
            raise ValueError("channels.openai_requests_per_minute: use 0 (no limit) or a positive rate")


SITE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


@dataclass(frozen=True)
class SiteConfig:
    """One shop that embeds the widget: ``[sites.NAME]`` in the file."""

    origins: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "Pages allowed to open the widget for this site: origins such as https://shop.example "
            "(comma-separated in env). A hello naming the site from another origin gets 'forbidden'."
        },
    )
    secret: Secret | None = field(
        default=None,
        metadata={
            "help": "Key of the identity check: a hello's user is trusted only with user_hash = hex "
            "HMAC-SHA256(secret, user). Without it the site's visitors are anonymous. Never printed."
        },
    )

    def __post_init__(self) -> None:
        normalized = []
        for origin in self.origins:
            n = normalize_origin(origin)
            if n is None:
                raise ValueError(f"origin {origin!r}: write scheme://host[:port], e.g. https://shop.example")
            normalized.append(n)
        object.__setattr__(self, "origins", tuple(normalized))
        if self.secret is not None and len(self.secret.reveal()) < 16:
            raise ValueError(
                "a site secret needs at least 16 characters; make one with "
                "python -c 'import secrets; print(secrets.token_hex(32))'"
            )
