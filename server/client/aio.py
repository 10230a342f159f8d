"""``AsyncChatClient``: one conversation over the chat websocket, kept alive across drops.

One background task owns the connection: it connects, says ``hello`` (with the conversation
id once it has one), reads frames and hands them to the request that waits for them, and on
a drop reconnects with exponential backoff and jitter. Requests wait in two tables (the reply
in flight, and ratings by idempotency id); whatever was not answered goes out again on the
next connection. Which frame goes out again follows the rules in the package docstring.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from server.client.frames import (
    RETRYABLE,
    Ack,
    ChatError,
    ClientError,
    ConnectionLost,
    Done,
    ErrorCode,
    ErrorFrame,
    Event,
    FinishReason,
    OperatorJoined,
    OperatorLeft,
    OperatorMessage,
    Ready,
    Reply,
    Token,
    parse_frame,
)
from server.client.pending import ReplyStream, _Rating, _Reply, _Request

log = logging.getLogger("learnloop.client")


class AsyncChatClient:
    """A bot's side of one conversation. ``async with connect(url) as client`` or ``await connect(url)``.

    Keywords (defaults in brackets): ``token`` (``server.token``, sent in the handshake as
    ``Authorization: Bearer``) [None]; ``user``, the rater
    identity [None]; ``conversation_id`` to resume a stored conversation [None: a new one];
    ``reconnect`` after a drop [True]; backoff from ``min_backoff_s`` [0.5] doubling to
    ``max_backoff_s`` [30], each wait drawn between half and all of it (jitter);
    ``give_up_after_s`` without a connection, then ConnectionLost [300; None: never];
    ``max_retries`` of a request refused with ``rate_limited``/``overloaded`` [5];
    ``open_timeout_s`` for connecting and ``ready`` [10]; ``on_event``, called with each Event
    on the client's loop (a coroutine function runs as a task) [None: events queue for ``events()``].
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        user: str | None = None,
        conversation_id: str | None = None,
        reconnect: bool = True,
        min_backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        give_up_after_s: float | None = 300.0,
        max_retries: int = 5,
        open_timeout_s: float = 10.0,
        on_event: Callable[[Event], object] | None = None,
    ) -> None:
        self.url, self.token, self.user = url, token, user
        self.conversation_id = conversation_id  # store it to resume the conversation later
        self.model_version: str | None = None  # the version that serves this conversation
        self.reconnect, self.min_backoff_s, self.max_backoff_s = reconnect, min_backoff_s, max_backoff_s
        self.give_up_after_s, self.max_retries, self.open_timeout_s = give_up_after_s, max_retries, open_timeout_s
        self.on_event = on_event
        self.connections = 0  # connections that reached ready: 2 and up means it reconnected
        self._ws: ClientConnection | None = None
        self._reply: _Reply | None = None
        self._ratings: dict[str, _Rating] = {}
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()
        self._ready = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._runner: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._failure: ClientError | None = None
        self._closed = False

    # --- life cycle ---------------------------------------------------------------------

    async def open(self) -> AsyncChatClient:
        """Connect and wait for ``ready``; raises ChatError (e.g. unauthorized) or ConnectionLost."""
        self._runner = asyncio.create_task(self._run(), name="learnloop-client")
        ready = asyncio.create_task(self._ready.wait())
        await asyncio.wait({ready, self._runner}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        self._raise_if_failed()
        return self

    def __await__(self) -> Generator[Any, None, AsyncChatClient]:
        return self.open().__await__()

    async def __aenter__(self) -> AsyncChatClient:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection; requests still waiting raise ConnectionLost."""
        self._closed = True
        self._fail(ConnectionLost("the client was closed"))
        if self._ws is not None:
            await self._ws.close()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        for task in list(self._tasks):
            task.cancel()

    # --- requests -----------------------------------------------------------------------

    def stream(self, text: str) -> ReplyStream:
        """Send a user message; iterate the result for the reply's text deltas."""
        return ReplyStream(self, text=text)

    async def send(self, text: str) -> Reply:
        """Send a user message and return the finished reply."""
        return await self.stream(text).result()

    async def regenerate(self, message_id: str) -> Reply:
        """A new reply in place of the latest one (``message_id``); both stay rateable."""
        return await ReplyStream(self, target=message_id).result()

    async def stop(self) -> None:
        """End the reply in flight (it finishes with ``cancelled``) and wait for it; else nothing."""
        request = self._reply
        if request is None:
            return
        request.stop_requested = True
        await self._flush()
        await request.ended.wait()

    async def rate(self, message_id: str, value: int, *, reason: str | None = None, comment: str | None = None) -> str:
        """Rate a reply +1 or -1; returns once the server has it on disk, with the idempotency id.

        While the connection is down the rating waits and goes out (with the same id, so the
        server stores it once) when it is back; cancelling the caller does not withdraw it.
        """
        if value not in (1, -1):
            raise ValueError("value is 1 (thumbs up) or -1 (thumbs down)")
        self._raise_if_failed()
        rating_id = uuid.uuid4().hex
        frame: dict[str, Any] = {"type": "rating", "message_id": message_id, "value": value, "id": rating_id}
        if reason is not None:
            frame["reason"] = reason
        if comment is not None:
            frame["comment"] = comment
        request = self._ratings[rating_id] = _Rating(frame)
        await self._flush()
        await request.ended.wait()
        if request.error is not None:
            raise request.error
        return rating_id

    async def events(self) -> AsyncIterator[Event]:
        """Ready (each connection) and operator events, in order; ends when the client is closed,
        raises ConnectionLost when reconnecting gave up."""
        if self.on_event is not None:
            raise RuntimeError("events go to on_event; events() is for a client without it")
        while (event := await self._events.get()) is not None:
            yield event
        self._events.put_nowait(None)
        if not self._closed:
            self._raise_if_failed()

    async def _begin(self, text: str | None, target: str | None) -> _Reply:
        self._raise_if_failed()
        while self._reply is not None:  # one reply at a time per connection: queue behind it
            await self._reply.ended.wait()
            self._raise_if_failed()
        request = self._reply = _Reply(text, target)
        await self._flush()
        return request

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise self._failure

    # --- the connection -----------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._connect_and_read()
        except Exception as exc:  # a bug or a server that breaks the protocol: fail loudly, never hang
            log.exception("the chat client stopped")
            self._fail(ConnectionLost(f"the client stopped: {exc!r}"))

    async def _connect_and_read(self) -> None:
        down_since, attempt, why = time.monotonic(), 0, "no connection yet"
        while True:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token is not None else None
            try:
                # the library's pings (every 20 s) keep an idle connection open past server.idle_timeout_s
                ws = await ws_connect(self.url, open_timeout=self.open_timeout_s, additional_headers=headers)
            except InvalidURI as exc:
                self._fail(ConnectionLost(str(exc)))
                return
            except InvalidStatus as exc:
                status = exc.response.status_code
                if status in (401, 403):  # a wrong token or Origin: asking again would be refused again
                    code = ErrorCode.UNAUTHORIZED if status == 401 else ErrorCode.FORBIDDEN
                    self._fail(ChatError(code, f"the server refused the handshake (HTTP {status})"))
                    return
                why = f"connecting failed: HTTP {status}"  # 429 (too many from this address), 503: later
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                why = f"connecting failed: {exc!r}"
            else:
                try:
                    if await self._session(ws):
                        down_since, attempt, why = time.monotonic(), 0, "the connection dropped"
                except ChatError as exc:  # hello refused: asking again would be refused again
                    await ws.close()
                    self._fail(exc)
                    return
            if self._failure is not None:  # closed
                return
            waited = time.monotonic() - down_since
            if not self.reconnect or (self.give_up_after_s is not None and waited > self.give_up_after_s):
                self._fail(ConnectionLost(f"{why}; gave up after {waited:.0f} s"))
                return
            delay = min(self.max_backoff_s, self.min_backoff_s * 2**attempt) * random.uniform(0.5, 1.0)
            attempt += 1
            log.warning("%s; reconnecting in %.1f s", why, delay)
            await asyncio.sleep(delay)

    async def _session(self, ws: ClientConnection) -> bool:
        """One connection: hello, ready, send what waits, read. True if it got as far as ready."""
        hello = {"type": "hello", "user": self.user, "conversation_id": self.conversation_id}
        try:
            await ws.send(json.dumps({k: v for k, v in hello.items() if v is not None}))
            while not isinstance(frame := parse_frame(await asyncio.wait_for(ws.recv(), self.open_timeout_s)), Ready):
                if isinstance(frame, ErrorFrame) and frame.code in RETRYABLE:
                    await ws.close()  # this user holds server.max_connections_per_user: try again later
                    return False
                if isinstance(frame, ErrorFrame):
                    raise frame.error()
        except (ConnectionClosed, TimeoutError, ValueError, KeyError, TypeError):
            await ws.close()  # (a malformed frame counts as a dropped connection)
            return False
        self.conversation_id, self.model_version = frame.conversation_id, frame.model_version
        self.connections += 1
        self._ws = ws
        self._ready.set()
        self._emit(frame)
        await self._flush()
        try:
            async for raw in ws:
                try:
                    frame = parse_frame(raw)
                except (ValueError, KeyError, TypeError):
                    log.warning("a malformed frame from the server: %.200r", raw)
                    continue
                self._dispatch(frame)
        except ConnectionClosed:
            pass
        finally:
            self._ws = None
        return True

    async def _flush(self) -> None:
        """Send every request that has not gone out on this connection (and is not held back)."""
        ws, connection, now = self._ws, self.connections, asyncio.get_running_loop().time()
        if ws is None:
            return
        frames: list[dict[str, Any]] = []
        request = self._reply
        if request is not None and not request.ended.is_set():
            if request.sent_on != connection and now >= request.not_before:
                frames.append(request.frame(connection))
                request.sent_on, request.sent_kind = connection, frames[-1]["type"]
                # what streamed of a reply that was cut off is void: the one asked for now starts over
                request.restarted = request.restarted or bool(request.parts)
                request.parts, request.message_id, request.started = [], None, False
            if request.stop_requested and request.sent_on == connection and request.stop_sent_on != connection:
                frames.append({"type": "stop"})
                request.stop_sent_on = connection
        for rating in self._ratings.values():
            if rating.sent_on != connection and now >= rating.not_before:
                frames.append(rating.frame)
                rating.sent_on = connection
        async with self._send_lock:
            for frame in frames:
                try:
                    await ws.send(json.dumps(frame))
                except ConnectionClosed:
                    return  # the next connection sends them again

    def _later(self, delay: float, request: _Request | None = None) -> None:
        """Flush again once a ``retry_after`` has passed, with ``request`` no longer held back."""

        async def flush() -> None:
            await asyncio.sleep(delay)
            if request is not None:
                request.not_before = 0.0  # (a timer may fire a hair early: do not compare clocks again)
            await self._flush()

        task = asyncio.create_task(flush())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- frames in ----------------------------------------------------------------------

    def _dispatch(self, frame: object) -> None:
        request = self._reply
        if isinstance(frame, Ack):
            if frame.id in self._ratings:
                self._ratings.pop(frame.id).end()
            elif request is not None and frame.id == request.client_id:
                request.user_message_id, request.dropped_on, request.started = frame.message_id, None, True
                if frame.operator:
                    self._finish(request, None)
        elif isinstance(frame, Token):
            if request is not None and request.message_id in (None, frame.message_id):
                request.message_id, request.started = frame.message_id, True
                request.parts.append(frame.delta)
                request.queue.put_nowait(frame.delta)
        elif isinstance(frame, Done):
            if request is not None and request.message_id in (None, frame.message_id):
                self._finish(request, frame)
        elif isinstance(frame, ErrorFrame):
            self._on_error(frame, request)
        elif isinstance(frame, OperatorJoined | OperatorMessage | OperatorLeft):
            self._emit(frame)

    def _finish(self, request: _Reply, done: Done | None) -> None:
        if done is None:  # an operator answers this message
            request.reply = Reply(None, "", None, FinishReason.OPERATOR, request.user_message_id)
        else:
            request.done = done
            request.reply = Reply(
                done.message_id,
                "".join(request.parts),
                done.model_version,
                done.finish_reason,
                request.user_message_id if request.text is not None else None,
                done.regenerated_from,
                done.completion_tokens,
            )
        self._reply = None
        request.end()

    def _on_error(self, frame: ErrorFrame, request: _Reply | None) -> None:
        connection, now = self.connections, asyncio.get_running_loop().time()
        delay = frame.retry_after if frame.retry_after is not None else 1.0
        if frame.id is not None and frame.id in self._ratings:
            rating = self._ratings[frame.id]
            if frame.code in RETRYABLE and rating.retries < self.max_retries:
                rating.retries, rating.sent_on, rating.not_before = rating.retries + 1, None, now + delay
                self._later(delay, rating)
            else:
                del self._ratings[frame.id]
                rating.end(frame.error())
            return
        # errors without an id answer the reply in flight: a regeneration has no client id, and a
        # reply that fails after its ack (overloaded, internal) is reported without one
        if request is None or request.sent_on != connection or frame.id not in (None, request.client_id):
            log.warning("an error frame no request waits for: %s", frame)
            return
        if (
            frame.id is None
            and frame.code is ErrorCode.RATE_LIMITED
            and (request.started or request.sent_kind == "message")
        ):
            # a refused message names its client id and a reply that started is past its frame: this
            # refuses a ``stop``
            if request.stop_requested:
                request.stop_sent_on = None
                self._later(delay)
            return
        if frame.code in RETRYABLE and request.retries < self.max_retries:
            if request.sent_kind == "message" and request.user_message_id is not None:
                request.dropped_on = connection  # the session dropped the stored turn: send it anew
            request.retries, request.sent_on, request.not_before = request.retries + 1, None, now + delay
            self._later(delay, request)
            return
        self._reply = None
        request.end(frame.error())

    def _emit(self, event: Event) -> None:
        if self.on_event is None:
            self._events.put_nowait(event)
            return
        try:
            result = self.on_event(event)
        except Exception:
            log.exception("on_event failed for %s", event)
            return
        if inspect.isawaitable(result):  # an async callback runs as a task of its own
            task = asyncio.ensure_future(result)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _fail(self, error: ClientError) -> None:
        """The end: every waiting request raises ``error``, and so does every new one."""
        if self._failure is not None:
            return
        self._failure = error
        for rating in self._ratings.values():
            rating.end(error)
        self._ratings.clear()
        if self._reply is not None:
            self._reply.end(error)
            self._reply = None
        self._events.put_nowait(None)


connect = AsyncChatClient
"""``async with connect(url, ...) as client``, or ``client = await connect(url, ...)``."""
