"""The chat protocol as a pure state machine: client frames in, effects out.

No sockets, no awaits, no clock reads (``now`` is passed in), no randomness (ids come from
an injected factory). ``server.gateway`` carries the effects out and feeds results back.

Protocol version 1, JSON text frames (see docs/protocol.md)::

    client -> server                              server -> client
    hello {token?, conversation_id?, user?,       ready {conversation_id, model_version, protocol}
           site?, user_hash?}
    message {text, client_id}                     ack {id, message_id}        (user message stored)
    regenerate {message_id}                       token {message_id, delta}
    rating {message_id, value, reason?,           done {message_id, model_version, finish_reason,
            comment?, id}                               usage, regenerated_from?}
    stop {}                                       ack {id}                    (rating stored)
                                                  error {code, message, retry_after?, id?}

Session phases::

    AWAITING_HELLO --hello--> OPENING --opened()--> IDLE --message/regenerate--> GENERATING
                                                      ^                               |
                                                      +-------- finished() -----------+
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from feedback.exceptions import ErrorCode, LearnloopError
from server.ratelimit import TokenBucket

PROTOCOL_VERSION = 1


class ProtocolError(LearnloopError):
    """A client frame was rejected; becomes an ``error`` frame."""

    public = True

    def __init__(self, code: ErrorCode, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message, code=code, retry_after=retry_after)


class Phase(Enum):
    AWAITING_HELLO = "awaiting_hello"
    OPENING = "opening"
    IDLE = "idle"
    GENERATING = "generating"


@dataclass(frozen=True)
class Limits:
    """Per-connection limits; all on by default. ``None`` disables one."""

    max_text_chars: int | None = 4000
    max_comment_chars: int | None = 2000
    rate_per_s: float | None = 5.0  # sustained client frames per second
    rate_burst: int = 20


@dataclass(frozen=True)
class Turn:
    id: str
    role: str  # "user" | "assistant"
    text: str


# --- effects ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    frame: dict[str, Any]


@dataclass(frozen=True)
class OpenConversation:
    conversation_id: str | None  # None: start a new one
    user: str | None
    token: str | None
    site: str | None = None  # a widget site: the gateway checks the origin and the user's hash
    user_hash: str | None = None


@dataclass(frozen=True)
class Generate:
    """Store the user turn (if any), ack it, then stream a reply into ``message_id``."""

    message_id: str
    parent_id: str  # the user message the reply answers
    context: tuple[Turn, ...]  # the conversation up to and including the parent
    user_turn: Turn | None = None  # a new user message to store first
    client_id: str | None = None
    regenerated_from: str | None = None


@dataclass(frozen=True)
class StoreTurn:
    """An operator is answering: store the user turn and ack it; no model reply."""

    turn: Turn
    parent_id: str | None
    client_id: str


@dataclass(frozen=True)
class StoreRating:
    message_id: str
    value: int
    client_id: str
    reason: str | None
    comment: str | None


@dataclass(frozen=True)
class Cancel:
    message_id: str


Effect = Send | OpenConversation | Generate | StoreTurn | StoreRating | Cancel


def error_frame(
    code: ErrorCode, message: str, *, retry_after: float | None = None, id: str | None = None
) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error", "code": str(code), "message": message}
    if retry_after is not None:
        frame["retry_after"] = round(retry_after, 3)
    if id is not None:
        frame["id"] = id
    return frame


def _field(frame: dict[str, Any], name: str, kind: type | tuple[type, ...], *, required: bool = True) -> Any:
    value = frame.get(name)
    if value is None:
        if required:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"'{frame.get('type')}' needs the field '{name}'")
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"field '{name}' must be a {names}")
    return value


@dataclass
class ChatSession:
    """State of one client connection. Feed it frames; carry out what it returns."""

    new_id: Callable[[], str]
    limits: Limits = field(default_factory=Limits)
    phase: Phase = Phase.AWAITING_HELLO
    conversation_id: str | None = None
    history: list[Turn] = field(default_factory=list)  # the active branch, oldest first
    streaming_id: str | None = None
    _pending: Generate | None = None
    _replaced: Turn | None = None  # the reply a regeneration replaces, restored if it fails
    _replies: set[str] = field(default_factory=set)  # assistant ids of this conversation
    _bucket: TokenBucket | None = None  # frames of this connection (limits.rate_per_s)
    operator: str | None = None  # an operator took this conversation over: no model replies

    # --- input: client frames -------------------------------------------------------------

    def receive(self, raw: str | bytes, now: float) -> list[Effect]:
        """One client frame in; effects out. Never raises: errors become ``error`` frames."""
        frame: dict[str, Any] = {}
        try:
            over_limit = self._rate_limit(now)  # counted before parsing: garbage counts too
            frame = self._parse(raw)
            if over_limit is not None:
                raise over_limit  # after parsing, so that the error names the frame it refuses
            return self._dispatch(frame)
        except ProtocolError as exc:
            # echo the client's id (rating id or message client_id) so it knows which frame failed
            frame_id = frame.get("id", frame.get("client_id"))
            frame_id = frame_id if isinstance(frame_id, str) else None
            return [Send(error_frame(exc.code, exc.message, retry_after=exc.retry_after, id=frame_id))]

    def _rate_limit(self, now: float) -> ProtocolError | None:
        rate = self.limits.rate_per_s
        if rate is None:
            return None
        if self._bucket is None:
            self._bucket = TokenBucket(rate, float(self.limits.rate_burst))
        retry_after = self._bucket.take(now)
        if retry_after is not None:
            return ProtocolError(ErrorCode.RATE_LIMITED, f"more than {rate:g} frames/s", retry_after=retry_after)
        return None

    def _parse(self, raw: str | bytes) -> dict[str, Any]:
        if isinstance(raw, bytes):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "binary frames are not part of the protocol; send JSON text")
        try:
            frame = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"frame is not valid JSON: {exc.msg}") from None
        except RecursionError:  # JSON nested thousands deep: the parser's recursion runs out
            raise ProtocolError(ErrorCode.BAD_REQUEST, "frame is nested too deeply") from None
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "a frame is a JSON object with a string 'type'")
        return frame

    def _dispatch(self, frame: dict[str, Any]) -> list[Effect]:
        kind = frame["type"]
        handler = {
            "hello": self._on_hello,
            "message": self._on_message,
            "regenerate": self._on_regenerate,
            "rating": self._on_rating,
            "stop": self._on_stop,
        }.get(kind)
        if handler is None:
            raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {kind!r}")
        if kind != "hello" and self.phase in (Phase.AWAITING_HELLO, Phase.OPENING):
            raise ProtocolError(ErrorCode.HELLO_REQUIRED, "send 'hello' and wait for 'ready' first")
        return handler(frame)

    def _on_hello(self, frame: dict[str, Any]) -> list[Effect]:
        if self.phase is not Phase.AWAITING_HELLO:
            raise ProtocolError(ErrorCode.CONFLICT, "hello was already received on this connection")
        conversation_id = _field(frame, "conversation_id", str, required=False)
        user = _field(frame, "user", str, required=False)
        token = _field(frame, "token", str, required=False)
        site = _field(frame, "site", str, required=False)
        user_hash = _field(frame, "user_hash", str, required=False)
        for name, value in (("user", user), ("site", site), ("user_hash", user_hash)):
            if value is not None and len(value) > 200:
                raise ProtocolError(ErrorCode.TOO_LARGE, f"{name} is longer than 200 characters")
        if user_hash is not None and site is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "user_hash is checked against a site's secret: name the site")
        self.phase = Phase.OPENING
        return [OpenConversation(conversation_id, user, token, site, user_hash)]

    def _check_text(self, text: str, name: str, limit: int | None) -> None:
        if limit is not None and len(text) > limit:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"{name} has {len(text)} characters; the limit is {limit}")
        if "\x00" in text:  # no chat text holds one, and PostgreSQL's text cannot store it
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{name} holds a NUL character (U+0000)")

    def _on_message(self, frame: dict[str, Any]) -> list[Effect]:
        text = _field(frame, "text", str)
        client_id = _field(frame, "client_id", str)
        self._check_text(text, "text", self.limits.max_text_chars)
        if not text.strip():
            raise ProtocolError(ErrorCode.BAD_REQUEST, "text is empty")
        self._require_idle()
        user_turn = Turn(self.new_id(), "user", text)
        if self.operator is not None:
            parent_id = self.history[-1].id if self.history else None
            self.history.append(user_turn)
            return [StoreTurn(user_turn, parent_id, client_id)]
        generate = Generate(
            message_id=self.new_id(),
            parent_id=user_turn.id,
            context=(*self.history, user_turn),
            user_turn=user_turn,
            client_id=client_id,
        )
        self.history.append(user_turn)
        return self._start(generate)

    def _on_regenerate(self, frame: dict[str, Any]) -> list[Effect]:
        message_id = _field(frame, "message_id", str)
        self._require_idle()
        if self.operator is not None:
            raise ProtocolError(ErrorCode.CONFLICT, "an operator is answering this conversation")
        if self.history and self.history[-1].id == message_id and self.history[-1].role == "user":
            # the branch ends with a user turn whose reply was cut off (a restart or a dropped
            # connection discards a reply in flight): answer that turn instead of storing it twice
            return self._start(Generate(message_id=self.new_id(), parent_id=message_id, context=tuple(self.history)))
        if message_id not in self._replies:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"no reply {message_id!r} in this conversation")
        if not self.history or self.history[-1].id != message_id:
            raise ProtocolError(ErrorCode.CONFLICT, "only the latest reply can be regenerated")
        self._replaced = self.history.pop()
        parent = self.history[-1]
        generate = Generate(
            message_id=self.new_id(), parent_id=parent.id, context=tuple(self.history), regenerated_from=message_id
        )
        return self._start(generate)

    def _on_rating(self, frame: dict[str, Any]) -> list[Effect]:
        message_id = _field(frame, "message_id", str)
        value = _field(frame, "value", int)
        client_id = _field(frame, "id", str)
        reason = _field(frame, "reason", str, required=False)
        comment = _field(frame, "comment", str, required=False)
        if value not in (1, -1):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "value must be 1 (thumbs up) or -1 (thumbs down)")
        if reason is not None:
            self._check_text(reason, "reason", 200)
        if comment is not None:
            self._check_text(comment, "comment", self.limits.max_comment_chars)
        if message_id not in self._replies:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"no finished reply {message_id!r} in this conversation")
        return [StoreRating(message_id, value, client_id, reason, comment)]

    def _on_stop(self, frame: dict[str, Any]) -> list[Effect]:
        if self.phase is Phase.GENERATING and self.streaming_id is not None:
            return [Cancel(self.streaming_id)]
        return []  # nothing streaming: stop is idempotent

    def _require_idle(self) -> None:
        if self.phase is Phase.GENERATING:
            raise ProtocolError(ErrorCode.BUSY, "a reply is still streaming; send 'stop' or wait for 'done'")

    def _start(self, generate: Generate) -> list[Effect]:
        self.phase = Phase.GENERATING
        self.streaming_id = generate.message_id
        self._pending = generate
        return [generate]

    # --- input: results of effects --------------------------------------------------------

    def opened(
        self, conversation_id: str, history: list[Turn], reply_ids: set[str], model_version: str
    ) -> list[Effect]:
        """The gateway opened (or resumed) the conversation."""
        self.phase = Phase.IDLE
        self.conversation_id = conversation_id
        self.history = list(history)
        self._replies = set(reply_ids)
        return [
            Send(
                {
                    "type": "ready",
                    "conversation_id": conversation_id,
                    "model_version": model_version,
                    "protocol": PROTOCOL_VERSION,
                }
            )
        ]

    def open_failed(self, code: ErrorCode, message: str) -> list[Effect]:
        self.phase = Phase.AWAITING_HELLO
        return [Send(error_frame(code, message))]

    def finished(
        self, message_id: str, text: str, model_version: str, finish_reason: str, *, completion_tokens: int = 0
    ) -> list[Effect]:
        """The reply ``message_id`` is complete and stored."""
        pending = self._pending
        if pending is None or pending.message_id != message_id:
            return []
        self._replies.add(message_id)
        self.history.append(Turn(message_id, "assistant", text))
        self.phase, self.streaming_id, self._pending, self._replaced = Phase.IDLE, None, None, None
        done: dict[str, Any] = {
            "type": "done",
            "message_id": message_id,
            "model_version": model_version,
            "finish_reason": finish_reason,
            "usage": {"completion_tokens": completion_tokens},
        }
        if pending.regenerated_from:
            done["regenerated_from"] = pending.regenerated_from
        return [Send(done)]

    def failed(
        self, message_id: str, code: ErrorCode, message: str, *, retry_after: float | None = None
    ) -> list[Effect]:
        """The reply could not be produced; roll the branch back to before the request."""
        pending = self._pending
        if pending is None or pending.message_id != message_id:
            return []
        if pending.user_turn is not None and self.history and self.history[-1].id == pending.user_turn.id:
            self.history.pop()
        if pending.regenerated_from is not None and self._replaced is not None:
            self.history.append(self._replaced)
        self._replaced = None
        self.phase, self.streaming_id, self._pending = Phase.IDLE, None, None
        return [Send(error_frame(code, message, retry_after=retry_after))]

    def user_turn_stored(self, generate: Generate) -> list[Effect]:
        assert generate.user_turn is not None
        return [Send({"type": "ack", "id": generate.client_id, "message_id": generate.user_turn.id})]

    def turn_stored(self, effect: StoreTurn) -> list[Effect]:
        # ``operator``: no model reply follows, so a client waiting for ``done`` stops waiting
        return [Send({"type": "ack", "id": effect.client_id, "message_id": effect.turn.id, "operator": True})]

    def turn_failed(self, effect: StoreTurn, code: ErrorCode, message: str) -> list[Effect]:
        if self.history and self.history[-1].id == effect.turn.id:
            self.history.pop()
        return [Send(error_frame(code, message, id=effect.client_id))]

    # --- input: operator takeover ---------------------------------------------------------

    def operator_joined(self, operator: str) -> list[Effect]:
        """An operator takes the conversation over; a reply still streaming is stopped."""
        already = self.operator is not None
        self.operator = operator
        effects: list[Effect] = []
        if self.phase is Phase.GENERATING and self.streaming_id is not None:
            effects.append(Cancel(self.streaming_id))
        if not already:
            effects.append(Send({"type": "operator_joined"}))
        return effects

    def operator_reply(self, message_id: str, text: str) -> list[Effect]:
        """The operator's reply (already stored) joins the branch; the customer may rate it."""
        self.history.append(Turn(message_id, "assistant", text))
        self._replies.add(message_id)
        return [Send({"type": "operator_message", "message_id": message_id, "text": text})]

    def operator_left(self) -> list[Effect]:
        if self.operator is None:
            return []
        self.operator = None
        return [Send({"type": "operator_left"})]

    @staticmethod
    def rating_stored(client_id: str) -> list[Effect]:
        return [Send({"type": "ack", "id": client_id})]
