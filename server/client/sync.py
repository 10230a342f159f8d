"""``ChatClient``: the async client run on an event loop in a background thread.

For plain scripts and bot frameworks without asyncio: every method blocks until its answer
and raises what the async one raises. ``on_event`` runs on the client's thread.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from server.client.aio import AsyncChatClient
from server.client.frames import Done, Event, Reply
from server.client.pending import ReplyStream

T = TypeVar("T")


class SyncReplyStream:
    """``for delta in stream``: the reply's text as it arrives; ``reply`` and ``done`` after."""

    def __init__(self, client: ChatClient, stream: ReplyStream) -> None:
        self._client, self._stream = client, stream

    def __iter__(self) -> Iterator[str]:
        while True:
            try:
                yield self._client._call(self._stream.__anext__())
            except StopAsyncIteration:
                return

    def result(self) -> Reply:
        return self._client._call(self._stream.result())

    @property
    def reply(self) -> Reply:
        return self._stream.reply

    @property
    def done(self) -> Done | None:
        return self._stream.done

    @property
    def restarted(self) -> bool:
        return self._stream.restarted


class ChatClient:
    """``with ChatClient(url, ...) as client``: connected when constructed (same keywords as
    ``AsyncChatClient``); ``close()`` or leaving the block stops the thread."""

    def __init__(self, url: str, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="learnloop-client", daemon=True)
        self._thread.start()
        self._events: queue.Queue[Event | None] = queue.Queue()
        self._has_callback = options.get("on_event") is not None
        if not self._has_callback:
            options["on_event"] = self._events.put

        async def open_client() -> AsyncChatClient:
            return await AsyncChatClient(url, **options)

        try:
            self._client = self._call(open_client())
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    @property
    def conversation_id(self) -> str | None:
        return self._client.conversation_id

    @property
    def model_version(self) -> str | None:
        return self._client.model_version

    @property
    def connections(self) -> int:
        return self._client.connections

    def send(self, text: str) -> Reply:
        return self._call(self._client.send(text))

    def stream(self, text: str) -> SyncReplyStream:
        return SyncReplyStream(self, self._client.stream(text))

    def regenerate(self, message_id: str) -> Reply:
        return self._call(self._client.regenerate(message_id))

    def stop(self) -> None:
        """End the reply in flight and wait for its ``done`` (also fine inside a ``for`` over its stream)."""
        self._call(self._client.stop())

    def rate(self, message_id: str, value: int, *, reason: str | None = None, comment: str | None = None) -> str:
        return self._call(self._client.rate(message_id, value, reason=reason, comment=comment))

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Ready and operator events as they come; ends after ``timeout`` s without one, or at close."""
        if self._has_callback:
            raise RuntimeError("events go to on_event; events() is for a client without it")
        while True:
            try:
                event = self._events.get(timeout=timeout)
            except queue.Empty:
                return
            if event is None:
                self._events.put(None)
                return
            yield event

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._call(self._client.close())
        finally:
            self._events.put(None)
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
