"""What the client waits for: requests in flight and the stream of one reply.

``AsyncChatClient`` keeps a ``_Reply`` for the reply in flight and a ``_Rating`` per rating
not acknowledged yet; on a new connection it sends what is still waiting again (the rules
are in the package docstring). ``ReplyStream`` is what ``client.stream(text)`` returns.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING, Any

from server.client.frames import ClientError, Done, Reply

if TYPE_CHECKING:
    from server.client.aio import AsyncChatClient


class _Request:
    """A frame waiting for its answer; ``sent_on`` is the connection it last went out on."""

    def __init__(self) -> None:
        self.sent_on: int | None = None
        self.not_before = 0.0  # loop time: held back by retry_after
        self.retries = 0
        self.ended = asyncio.Event()
        self.error: ClientError | None = None

    def end(self, error: ClientError | None = None) -> None:
        self.error = error
        self.ended.set()


class _Rating(_Request):
    def __init__(self, frame: dict[str, Any]) -> None:
        super().__init__()
        self.frame = frame


class _Reply(_Request):
    """A message (``text``) or a regeneration (``target``) and the reply streaming for it."""

    def __init__(self, text: str | None, target: str | None) -> None:
        super().__init__()
        self.text, self.target = text, target
        self.client_id = uuid.uuid4().hex if text is not None else None
        self.user_message_id: str | None = None  # the stored user turn, once acked
        self.dropped_on: int | None = None  # the connection whose session dropped that turn (a failed reply)
        self.sent_kind = ""
        self.message_id: str | None = None
        self.parts: list[str] = []
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()  # deltas, then None
        self.started = False  # acked, or a token came
        self.restarted = False
        self.stop_requested = False
        self.stop_sent_on: int | None = None
        self.done: Done | None = None
        self.reply: Reply | None = None

    def frame(self, connection: int) -> dict[str, Any]:
        if self.text is None:
            return {"type": "regenerate", "message_id": self.target}
        if self.user_message_id is not None and self.dropped_on != connection:
            # stored but unanswered: the branch this connection resumed ends with it
            return {"type": "regenerate", "message_id": self.user_message_id}
        return {"type": "message", "text": self.text, "client_id": self.client_id}

    def end(self, error: ClientError | None = None) -> None:
        super().end(error)
        self.queue.put_nowait(None)


class ReplyStream:
    """``async for delta in stream``: the reply's text as it arrives; ``reply`` and ``done`` after.

    If a dropped connection cut the reply off, the client asks again on the next connection
    and the stream goes on with the new reply from its start: ``restarted`` turns true, and
    ``reply.text`` holds only the reply that finished.
    """

    def __init__(self, client: AsyncChatClient, *, text: str | None = None, target: str | None = None) -> None:
        self._client, self._text, self._target = client, text, target
        self._request: _Reply | None = None

    def __aiter__(self) -> ReplyStream:
        return self

    async def __anext__(self) -> str:
        if self._request is None:
            self._request = await self._client._begin(self._text, self._target)
        item = await self._request.queue.get()
        if item is None:
            self._request.queue.put_nowait(None)  # ended stays ended
            if self._request.error is not None:
                raise self._request.error
            raise StopAsyncIteration
        return item

    async def result(self) -> Reply:
        """Wait for the end (skipping deltas not read yet) and return the reply."""
        async for _ in self:
            pass
        return self.reply

    @property
    def reply(self) -> Reply:
        if self._request is None or self._request.reply is None:
            raise RuntimeError("the reply has not finished")
        return self._request.reply

    @property
    def done(self) -> Done | None:
        """The server's ``done`` frame (None while streaming, and for a turn an operator answers)."""
        return self._request.done if self._request is not None else None

    @property
    def restarted(self) -> bool:
        return self._request is not None and self._request.restarted
