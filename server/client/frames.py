"""What the chat server sends, as typed values, and the client's errors (protocol version 1).

Standard library only: a bot process that imports the client never loads the model stack.

The client's error tree::

    ClientError
    ├── ChatError            the server refused a request (``code``, ``message``, ``retry_after``)
    └── ConnectionLost       the connection dropped and reconnecting gave up (or was off)

These do not derive from ``feedback.LearnloopError`` on purpose: importing ``feedback`` loads
its store and SQLite driver, which a bot has no use for. ``ErrorCode`` mirrors the server's
codes value for value (tests/test_client.py checks that).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

PROTOCOL_VERSION = 1


class ErrorCode(StrEnum):
    """``error.code`` on the wire (docs/protocol.md has what each one asks of the client)."""

    BAD_REQUEST = "bad_request"
    UNKNOWN_TYPE = "unknown_type"
    HELLO_REQUIRED = "hello_required"
    TOO_LARGE = "too_large"
    BUSY = "busy"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    RATE_LIMITED = "rate_limited"  # the client waits ``retry_after`` and sends again (bounded)
    OVERLOADED = "overloaded"  # likewise
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    CSRF = "csrf"
    INVALID = "invalid"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    UNAVAILABLE = "unavailable"
    STORAGE_FULL = "storage_full"
    INTERNAL = "internal"  # also what an unknown code from a newer server reads as


RETRYABLE = frozenset({ErrorCode.RATE_LIMITED, ErrorCode.OVERLOADED})


class FinishReason(StrEnum):
    """How a reply ended (``done.finish_reason``), plus ``OPERATOR`` for a turn an operator answers."""

    STOP = "stop"  # the model ended its turn
    LENGTH = "length"  # the server's max_new_tokens or the context was reached
    CANCELLED = "cancelled"  # stop() (or an operator took the conversation over)
    SHUTDOWN = "shutdown"  # the server shut down mid-reply (after its drain); the text is what it had
    OPERATOR = "operator"  # no model reply: an operator answers; theirs arrives as OperatorMessage


class ClientError(Exception):
    """The root of the client's errors."""


class ChatError(ClientError):
    """The server refused a request; raised from the call that sent it."""

    def __init__(self, code: ErrorCode, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after = retry_after


class ConnectionLost(ClientError):
    """The connection dropped and was not restored (reconnect off, or it gave up)."""


@dataclass(frozen=True)
class Ready:
    conversation_id: str
    model_version: str
    protocol: int


@dataclass(frozen=True)
class Ack:
    id: str
    message_id: str | None = None  # the stored user turn (absent for a rating)
    operator: bool = False  # an operator answers: no model reply follows


@dataclass(frozen=True)
class Token:
    message_id: str
    delta: str


@dataclass(frozen=True)
class Done:
    message_id: str
    model_version: str
    finish_reason: FinishReason
    completion_tokens: int = 0
    regenerated_from: str | None = None


@dataclass(frozen=True)
class OperatorJoined:
    """A person took the conversation over: messages are stored, the model does not reply."""


@dataclass(frozen=True)
class OperatorMessage:
    message_id: str  # rate it like any reply
    text: str


@dataclass(frozen=True)
class OperatorLeft:
    """The operator handed the conversation back to the model."""


@dataclass(frozen=True)
class ErrorFrame:
    code: ErrorCode
    message: str
    retry_after: float | None = None
    id: str | None = None  # the client id of the frame that failed, when it had one

    def error(self) -> ChatError:
        return ChatError(self.code, self.message, retry_after=self.retry_after)


Frame = Ready | Ack | Token | Done | OperatorJoined | OperatorMessage | OperatorLeft | ErrorFrame
Event = Ready | OperatorJoined | OperatorMessage | OperatorLeft  # what client.events() yields


@dataclass(frozen=True)
class Reply:
    """A finished reply, or (``finish_reason`` OPERATOR) a message an operator will answer."""

    message_id: str | None  # rate or regenerate by this id; None when an operator answers
    text: str
    model_version: str | None
    finish_reason: FinishReason
    user_message_id: str | None = None  # the stored user turn (None for a regeneration)
    regenerated_from: str | None = None
    completion_tokens: int = 0


def _code(value: Any) -> ErrorCode:
    try:
        return ErrorCode(value)
    except ValueError:
        return ErrorCode.INTERNAL


def _finish(value: Any) -> FinishReason:
    try:
        return FinishReason(value)
    except ValueError:
        return FinishReason.STOP  # a reason a newer server added: the reply did end


def parse_frame(raw: str | bytes) -> Frame | None:
    """One server frame, typed; None for a frame type this client does not know (a newer server)."""
    f: dict[str, Any] = json.loads(raw)
    kind = f.get("type")
    if kind == "ready":
        return Ready(f["conversation_id"], f["model_version"], int(f.get("protocol", PROTOCOL_VERSION)))
    if kind == "ack":
        return Ack(f["id"], f.get("message_id"), bool(f.get("operator", False)))
    if kind == "token":
        return Token(f["message_id"], f["delta"])
    if kind == "done":
        usage = f.get("usage") or {}
        return Done(
            f["message_id"],
            f["model_version"],
            _finish(f.get("finish_reason")),
            int(usage.get("completion_tokens", 0)),
            f.get("regenerated_from"),
        )
    if kind == "operator_joined":
        return OperatorJoined()
    if kind == "operator_message":
        return OperatorMessage(f["message_id"], f["text"])
    if kind == "operator_left":
        return OperatorLeft()
    if kind == "error":
        retry_after = f.get("retry_after")
        return ErrorFrame(
            _code(f.get("code")),
            str(f.get("message", "")),
            float(retry_after) if retry_after is not None else None,
            f.get("id"),
        )
    return None
