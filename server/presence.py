"""Who is connected to which conversation, and which conversations an operator answers.

The console and the gateway of a process share one ``Presence``: the console's takeover calls
reach the customer's open connections through it. A takeover lives in the store
(``store.takeovers``), so it holds on every process on that store and outlives a restart; the
connections live in the process that holds them.

One process (SQLite, or PostgreSQL with one server) tells its own connections directly. Several
processes on one PostgreSQL store also tell each other: each change goes out as a ``NOTIFY`` in
the transaction that stores it, and every process listens on a connection of its own and tells
the connections it holds (the rules: ``server/takeover.py``). When that connection is lost, the
process listens again (``retry_s`` apart, doubling to 30 s) and then reloads every takeover from the
store: joins and leaves it missed reach its connections then; an operator's reply sent meanwhile
is not pushed to them (it is stored; the customer sees it on resuming the conversation), and
until it is back a customer on it may still get a model reply in a conversation taken over
elsewhere. docs/architecture.md, "Several server processes on one store", has the whole design.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any, Protocol

from feedback import FeedbackStore, InvalidError, StoreError, Takeover
from server.protocol import ChatSession, Effect
from server.takeover import Kind, Notice, apply, changes, decode, encode, reply_refusal

log = logging.getLogger("learnloop.presence")

__all__ = ["Attached", "Presence", "Takeover"]


class Attached(Protocol):
    """A connection as presence sees it: its session state and a way to carry out effects."""

    session: ChatSession

    async def apply(self, effects: list[Effect]) -> None: ...


class Presence:
    """Who is connected to which conversation (here), and which conversations an operator answers (everywhere).

    ``start()`` loads the takeovers and, on PostgreSQL, listens to the other processes;
    ``close()`` stops listening. Without ``start()`` (tests of one process) it knows only the
    takeovers made through it.
    """

    def __init__(self, store: FeedbackStore, *, retry_s: float = 1.0) -> None:
        self.store = store
        self.origin = uuid.uuid4().hex  # this process, in its notices
        self.retry_s = retry_s
        self._connections: dict[str, set[Attached]] = {}
        self.takeovers: dict[str, Takeover] = {}  # this process's view of store.takeovers
        self.reconnects = 0  # how often the notifications' connection was lost and listened to again
        self._lock = asyncio.Lock()  # a change made here and a reload from the store do not interleave
        self._listener: asyncio.Task[None] | None = None

    # --- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Load the takeovers from the store; on PostgreSQL, listen to the other processes first."""
        if self.store.db.notify_channel is None:
            async with self._lock:
                self.takeovers = {t.conversation_id: t for t in await self.store.takeovers.all()}
            return
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._listener = asyncio.create_task(self._listen(ready), name="presence-listener")
        await ready

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None

    # --- connections ----------------------------------------------------------------------

    def connected(self, conversation_id: str) -> int:
        """Connections to the conversation held by this process."""
        return len(self._connections.get(conversation_id, ()))

    def attach(self, conversation_id: str, connection: Attached) -> None:
        self._connections.setdefault(conversation_id, set()).add(connection)

    def detach(self, conversation_id: str, connection: Attached) -> None:
        conns = self._connections.get(conversation_id)
        if conns is not None:
            conns.discard(connection)
            if not conns:
                del self._connections[conversation_id]

    # --- the console's calls --------------------------------------------------------------

    async def join(self, conversation_id: str, operator: str) -> Takeover:
        """``operator`` answers the conversation (``InvalidError`` when another one does, anywhere)."""

        def notice(t: Takeover) -> str:
            return encode(Notice(self.origin, Kind.JOINED, conversation_id, t.operator, t.since))

        async with self._lock:
            takeover = await self.store.takeovers.join(conversation_id, operator, notice=notice)
            await self._take_in(Notice(self.origin, Kind.JOINED, conversation_id, takeover.operator, takeover.since))
        return takeover

    async def reply(self, conversation_id: str, operator: str, text: str) -> Any:
        """Store the operator's reply and send it to the customer's connections, on every process."""
        refusal = reply_refusal(await self.store.takeovers.get(conversation_id), operator)
        if refusal is not None:
            raise InvalidError(refusal)
        message = await self.store.conversations.add_operator_reply(
            conversation_id=conversation_id, text=text, operator=operator, message_id=uuid.uuid4().hex, live=True
        )
        notice = Notice(self.origin, Kind.REPLY, conversation_id, operator, message_id=message.id)
        for conn in list(self._connections.get(conversation_id, ())):
            await self._tell(conn, conn.session.operator_reply(message.id, message.text))
        try:
            await self.store.takeovers.announce(encode(notice))
        except Exception as exc:  # the reply is stored: the console's call succeeded
            log.error("an operator's reply was stored but not announced to the other processes: %s", exc)
        return message

    async def leave(self, conversation_id: str) -> None:
        """Hand the conversation back to the model, on every process."""
        notice = Notice(self.origin, Kind.LEFT, conversation_id)
        async with self._lock:
            await self.store.takeovers.leave(conversation_id, notice=encode(notice))
            await self._take_in(notice)

    # --- the other processes --------------------------------------------------------------

    async def _listen(self, ready: asyncio.Future[None]) -> None:
        delay = self.retry_s
        while True:
            try:
                async with self.store.db.listen() as payloads:
                    await self._reload()  # after LISTEN: a change made meanwhile is in the reload or notified
                    if not ready.done():
                        ready.set_result(None)
                    delay = self.retry_s
                    async for payload in payloads:
                        notice = decode(payload)
                        if notice is None:
                            log.warning("ignoring a notification that is not a takeover notice")
                        elif notice.origin != self.origin:  # its own: its connections were told at once
                            await self._take_in(notice)
            except Exception as exc:  # StoreError: the connection was lost; anything else is logged too
                if not ready.done():  # at start: the app does not start without its store
                    ready.set_exception(exc)
                    return
                self.reconnects += 1
                log.warning(
                    "takeover notifications lost (%s); listening again in %.1f s",
                    exc,
                    delay,
                    exc_info=not isinstance(exc, StoreError),
                )
            await asyncio.sleep(delay)
            delay = min(30.0, delay * 2)

    async def _reload(self) -> None:
        async with self._lock:
            after = {t.conversation_id: t for t in await self.store.takeovers.all()}
            for notice in changes(self.takeovers, after, origin=self.origin):
                await self._take_in(notice)

    async def _take_in(self, notice: Notice) -> None:
        """Take a notice in: this process's view, then the connections it holds to the conversation."""
        conns = list(self._connections.get(notice.conversation_id, ()))
        if notice.kind is Kind.REPLY:
            if not conns:
                return
            assert notice.message_id is not None
            try:
                message = await self.store.conversations.get_message(notice.message_id)
            except Exception as exc:  # erased meanwhile, or the store failed: the reply stays in the store
                log.warning("an operator's reply could not be read to push it: %s", exc)
                return
            for conn in conns:
                await self._tell(conn, conn.session.operator_reply(message.id, message.text))
            return
        self.takeovers = apply(self.takeovers, notice)
        for conn in conns:
            if notice.kind is Kind.JOINED:
                assert notice.operator is not None
                await self._tell(conn, conn.session.operator_joined(notice.operator))
            else:
                await self._tell(conn, conn.session.operator_left())

    @staticmethod
    async def _tell(conn: Attached, effects: list[Effect]) -> None:
        try:
            await conn.apply(effects)
        except Exception:  # one connection's failure stops neither the others nor the listener
            log.exception("telling a connection of a takeover failed")
