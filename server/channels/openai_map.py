"""Pure: an OpenAI chat request, which carries the whole history, mapped onto a stored conversation.

A request's ``messages`` become turns (``parse_messages``). Among the stored conversations of
the same key and ``user`` that open the same way (``opening``), ``plan`` picks where the reply
goes, by this rule:

1. **Regeneration.** The request's turns, its last user turn included, are a path from the
   start of a stored conversation (any branch): the reply answers that stored user turn again,
   as a sibling of the reply it had (``regenerated_from`` = its latest model reply), exactly as
   a websocket ``regenerate`` does. A user turn left without a reply (generation failed or was
   cut) is simply answered.
2. **Continuation.** Otherwise the longest path of stored turns, ending with a reply, that is a
   prefix of the request's turns: the turns after it are stored under that reply, then the reply.
3. **New conversation.** Otherwise every turn is stored in a new conversation.

Ties go to the newest conversation (candidates come newest first), then to the newest message.
Turns compare by role and exact text; failed replies (stored empty) never match.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from feedback.exceptions import ErrorCode
from feedback.records import FinishReason, Message, Role
from server.errors import ApiError

ROLES = {"system": Role.SYSTEM, "developer": Role.SYSTEM, "user": Role.USER, "assistant": Role.ASSISTANT}


@dataclass(frozen=True)
class ChatTurn:
    role: Role
    text: str


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(f"{where}: only text content parts are supported", code=ErrorCode.INVALID)
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(f"{where}: content must be a string or a list of text parts", code=ErrorCode.INVALID)


def parse_messages(messages: Sequence[Mapping[str, Any]], *, max_text_chars: int) -> tuple[ChatTurn, ...]:
    """The request's turns: system (or developer) turns first, then user and assistant turns, ending
    with a user turn; each text at most ``max_text_chars``. Anything else is ``invalid`` (or
    ``too_large``), with the index of the offending message."""
    if not messages:
        raise ApiError("messages: at least one message is needed", code=ErrorCode.INVALID)
    turns: list[ChatTurn] = []
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        role = ROLES.get(str(message.get("role")))
        if role is None:
            raise ApiError(
                f"{where}.role: {message.get('role')!r} is not supported (system, developer, user, assistant)",
                code=ErrorCode.INVALID,
            )
        if role is Role.SYSTEM and turns and turns[-1].role is not Role.SYSTEM:
            raise ApiError(f"{where}: system turns only come before the conversation", code=ErrorCode.INVALID)
        text = _text(message.get("content"), f"{where}.content")
        if len(text) > max_text_chars:
            raise ApiError(
                f"{where}.content: {len(text)} characters, over server.max_text_chars ({max_text_chars})",
                code=ErrorCode.TOO_LARGE,
            )
        turns.append(ChatTurn(role, text))
    if turns[-1].role is not Role.USER:
        raise ApiError("messages: the last message must be the user's", code=ErrorCode.INVALID)
    return tuple(turns)


def opening(site: str, user_id: str | None, turns: Sequence[ChatTurn]) -> str:
    """Hash of the key's name, the user and the turns up to the first user turn: every conversation
    that ``plan`` could continue for this request has the same opening."""
    first_user = next(i for i, t in enumerate(turns) if t.role is Role.USER)
    head = [[str(t.role), t.text] for t in turns[: first_user + 1]]
    return hashlib.sha256(json.dumps([site, user_id, head], ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True)
class Plan:
    """Where a request's reply goes.

    ``conversation_id`` None: a new conversation. ``new_turns`` are stored in order, the first
    under ``parent_id``; the reply then answers the last of them, or ``answer`` (a stored user
    turn) when there are none, as a sibling of ``regenerated_from`` if that is set.
    """

    conversation_id: str | None
    parent_id: str | None
    new_turns: tuple[ChatTurn, ...]
    answer: str | None = None
    regenerated_from: str | None = None


def _usable(m: Message) -> bool:
    return m.finish_reason is not FinishReason.ERROR


def plan(turns: Sequence[ChatTurn], candidates: Sequence[tuple[str, Sequence[Message]]]) -> Plan:
    """Apply the mapping rule (module docstring) to ``turns`` and the candidate conversations
    (``(id, messages)``, newest conversation first)."""
    n = len(turns)
    best: tuple[int, int, int] | None = None  # (score, -candidate rank, message seq)
    best_plan: Plan | None = None
    for rank, (conversation_id, messages) in enumerate(candidates):
        children: dict[str | None, list[Message]] = {}
        for m in messages:
            if _usable(m):
                children.setdefault(m.parent_id, []).append(m)
        stack: list[tuple[str | None, int]] = [(None, 0)]  # (node id, turns matched down to it)
        by_id = {m.id: m for m in messages}
        while stack:
            node_id, depth = stack.pop()
            if depth > 0:
                node = by_id[node_id or ""]
                found: Plan | None = None
                if depth == n:  # the whole request is stored: its last user turn is answered again
                    found = _regeneration(conversation_id, node, children.get(node.id, []))
                    score = n + 1
                elif node.role is Role.ASSISTANT:
                    found = Plan(conversation_id, node.id, tuple(turns[depth:]))
                    score = depth
                if found is not None:
                    key = (score, -rank, node.seq)
                    if best is None or key > best:
                        best, best_plan = key, found
            if depth < n:
                want = turns[depth]
                matching = children.get(node_id, [])
                stack.extend((c.id, depth + 1) for c in matching if c.role is want.role and c.text == want.text)
    return best_plan or Plan(None, None, tuple(turns))


def _regeneration(conversation_id: str, user_turn: Message, replies: Sequence[Message]) -> Plan:
    models = [m for m in replies if m.role is Role.ASSISTANT and m.model_version is not None]
    latest = max(models, key=lambda m: m.seq) if models else None
    return Plan(conversation_id, user_turn.id, (), answer=user_turn.id, regenerated_from=latest.id if latest else None)
