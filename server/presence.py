"""Who is connected to which conversation, and which conversations an operator answers.

The console and the gateway share one ``Presence``: the console's takeover calls reach the
customer's open connections through it. Takeovers live in this process only (a restart
hands every conversation back to the model).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from feedback import FeedbackStore, InvalidError
from server.protocol import ChatSession, Effect


class Attached(Protocol):
    """A connection as presence sees it: its session state and a way to carry out effects."""

    session: ChatSession

    async def apply(self, effects: list[Effect]) -> None: ...


@dataclass(frozen=True)
class Takeover:
    operator: str
    since: float


class Presence:
    """Who is connected to which conversation, and which conversations an operator answers.

    Takeovers live in this process only (a restart hands every conversation back to the
    model); the console and the gateway share one ``Presence``.
    """

    def __init__(self, store: FeedbackStore) -> None:
        self.store = store
        self._connections: dict[str, set[Attached]] = {}
        self.takeovers: dict[str, Takeover] = {}

    def connected(self, conversation_id: str) -> int:
        return len(self._connections.get(conversation_id, ()))

    def attach(self, conversation_id: str, connection: Attached) -> None:
        self._connections.setdefault(conversation_id, set()).add(connection)

    def detach(self, conversation_id: str, connection: Attached) -> None:
        conns = self._connections.get(conversation_id)
        if conns is not None:
            conns.discard(connection)
            if not conns:
                del self._connections[conversation_id]

    async def join(self, conversation_id: str, operator: str) -> Takeover:
        await self.store.conversations.get(conversation_id)  # NotFoundError for an unknown one
        takeover = self.takeovers.get(conversation_id)
        if takeover is not None and takeover.operator != operator:
            raise InvalidError(f"operator {takeover.operator} is already answering this conversation")
        if takeover is None:
            takeover = self.takeovers[conversation_id] = Takeover(operator, time.time())
        for conn in list(self._connections.get(conversation_id, ())):
            await conn.apply(conn.session.operator_joined(operator))
        return takeover

    async def reply(self, conversation_id: str, operator: str, text: str) -> Any:
        takeover = self.takeovers.get(conversation_id)
        if takeover is None or takeover.operator != operator:
            raise InvalidError("take the conversation over before answering in it")
        message = await self.store.conversations.add_operator_reply(
            conversation_id=conversation_id, text=text, operator=operator, message_id=uuid.uuid4().hex, live=True
        )
        for conn in list(self._connections.get(conversation_id, ())):
            await conn.apply(conn.session.operator_reply(message.id, message.text))
        return message

    async def leave(self, conversation_id: str) -> None:
        if self.takeovers.pop(conversation_id, None) is None:
            return
        for conn in list(self._connections.get(conversation_id, ())):
            await conn.apply(conn.session.operator_left())
