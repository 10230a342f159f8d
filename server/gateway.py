"""Websocket gateway: carries out ``protocol.ChatSession`` effects over a real connection.

Each connection has one reader loop. Generation runs in its own task, so ``stop`` and
ratings are read and answered while a reply streams. Ratings are acknowledged only after
the store committed them; a user message is acknowledged after it is stored, before the
reply starts. Unexpected errors reach the client as ``internal`` without details; the
details go to the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from feedback import ErrorCode, FeedbackStore, FinishReason, NotFoundError, Role
from server.admission import IDLE_CLOSE, RETRY_AFTER_S, Admission, ChatSocket
from server.channels.identity import IdentityError, admit
from server.engines import Engine, SamplingConfig
from server.errors import error_frame_for, public_view
from server.limiters import RateLimiter
from server.metrics import Metrics
from server.presence import Presence
from server.protocol import (
    Cancel,
    ChatSession,
    Effect,
    Generate,
    Limits,
    OpenConversation,
    Send,
    StoreRating,
    StoreTurn,
    Turn,
    error_frame,
)
from server.replies import StopSignal, latest_branch, new_id, open_conversation, reaction_after, stream_reply
from server.settings import SiteConfig
from training.implicit import ImplicitConfig

log = logging.getLogger("learnloop.gateway")
MAX_RATINGS_IN_FLIGHT = 64  # per connection; the reader waits past this
# the websockets library logs every frame at DEBUG, and frames carry tokens and customers' text:
# its server logs through this logger, which stays at INFO even under ``learnloop -v``
_library_log = logging.getLogger("learnloop.gateway.websockets")
_library_log.setLevel(logging.INFO)


@dataclass
class GatewayContext:
    """What the gateway needs from the app (the composition root fills it)."""

    store: FeedbackStore
    engine: Engine
    sampling: SamplingConfig
    limits: Limits
    assign_version: Callable[[str], str | None]  # new conversation -> canary name, or None for live
    serving_version: Callable[[str | None], str]  # pinned version (or None) -> the version that replies
    rating_limiter: RateLimiter
    token: str | None = None
    presence: Presence | None = field(default=None)
    sites: Callable[[str], SiteConfig | None] = field(default=lambda name: None)  # widget site by name
    metrics: Metrics | None = None
    origin_allowed: Callable[[str | None], bool] = field(default=lambda origin: origin is None)
    site_origin: Callable[[str | None], bool] = field(default=lambda origin: False)  # a widget site's page
    max_connections_per_user: int = 0  # 0: no cap
    idle_timeout_s: float = 0.0  # 0: never
    send_timeout_s: float | None = None  # None: a send waits as long as the client takes
    connections: set[_Connection] = field(default_factory=set)  # open ones, for the drain at shutdown
    # ratings being stored, of every connection (one may outlive its connection): the drain waits for them
    ratings: set[asyncio.Task[None]] = field(default_factory=set)
    draining: bool = False  # shutting down: no new replies start
    implicit: ImplicitConfig = field(default_factory=ImplicitConfig)  # how a turn after a reply is read

    def __post_init__(self) -> None:
        if self.presence is None:
            self.presence = Presence(self.store)


class _Connection:
    def __init__(self, ctx: GatewayContext, ws: ChatSocket) -> None:
        self.ctx = ctx
        self.ws = ws
        self.user_slot: tuple[str | None, str, str | None] | None = None  # what this connection counts for
        self.over_user_cap = False
        self.idle_closing = False
        self.session = ChatSession(new_id=new_id, limits=ctx.limits)
        self.user: str | None = None
        self.site: str | None = None  # the widget site this connection was admitted for
        self.pinned: str | None = None  # the canary this conversation is pinned to, if any
        self.generation: asyncio.Task[None] | None = None
        self.cancel: StopSignal | None = None
        # ratings being stored: each waits for its group commit in its own task, so the frames after
        # it are read meanwhile and a client's pipelined ratings share one commit (bench/load.py)
        self.ratings: set[asyncio.Task[None]] = set()
        assert ctx.presence is not None
        self.presence: Presence = ctx.presence

    async def send(self, frame: dict[str, Any]) -> None:
        if frame.get("type") == "error" and self.ctx.metrics is not None:
            self.ctx.metrics.wire_errors.labels(code=str(frame.get("code"))).inc()
        try:
            async with asyncio.timeout(self.ctx.send_timeout_s):
                await self.ws.send(json.dumps(frame, ensure_ascii=False))
        except ConnectionClosed:
            pass
        except TimeoutError:
            # the client does not read: its frames would pile up here. Its buffer stays at the write limit;
            # the connection is dropped (no close frame could reach a client that does not read)
            log.warning("dropping a websocket whose client does not read (%.0f s)", self.ctx.send_timeout_s)
            self.ws.transport.abort()

    async def run(self) -> None:
        self.ctx.connections.add(self)
        try:
            async for raw in self.ws:
                await self.apply(self.session.receive(raw, time.monotonic()))
        except ConnectionClosed:
            pass
        finally:
            self.ctx.connections.discard(self)
            if self.session.conversation_id is not None:
                self.presence.detach(self.session.conversation_id, self)
            if self.cancel is not None:
                self.cancel.set()
            if self.generation is not None:
                self.generation.cancel()

    async def apply(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Send):
                await self.send(effect.frame)
            elif isinstance(effect, OpenConversation):
                await self.apply(await self.open(effect))
                if self.over_user_cap:
                    await self.ws.close(CloseCode.TRY_AGAIN_LATER, "too many connections for this user")
            elif isinstance(effect, Generate) and self.ctx.draining:
                await self.apply(
                    self.session.failed(
                        effect.message_id, ErrorCode.UNAVAILABLE, "the server is shutting down; retry", retry_after=5
                    )
                )
            elif isinstance(effect, Generate):
                self.cancel = StopSignal()
                self.generation = asyncio.create_task(self.generate(effect, self.cancel))
            elif isinstance(effect, StoreTurn):
                await self.apply(await self.store_turn(effect))
            elif isinstance(effect, StoreRating):
                await self.start_rating(effect)
            elif isinstance(effect, Cancel) and self.cancel is not None:
                self.cancel.set()

    async def open(self, effect: OpenConversation) -> list[Effect]:
        try:
            effects = await self._open(effect)
        except Exception as exc:  # a full disk, a failing store: a typed error, the socket stays
            code, message, _ = public_view(exc, where="opening a conversation")
            return self.session.open_failed(code, message)
        conversation_id = self.session.conversation_id
        if conversation_id is not None:
            self.presence.attach(conversation_id, self)
            takeover = self.presence.takeovers.get(conversation_id)
            if takeover is not None:
                effects += self.session.operator_joined(takeover.operator)
        return effects

    async def store_turn(self, effect: StoreTurn) -> list[Effect]:
        try:
            history = self.session.history
            before = history[: history.index(effect.turn)] if effect.turn in history else []
            await self._store_user_turn(effect.turn, effect.parent_id, before)
        except Exception as exc:
            code, message, _ = public_view(exc, where="storing a user turn")
            return self.session.turn_failed(effect, code, message)
        return self.session.turn_stored(effect)

    async def _store_user_turn(self, turn: Turn, parent_id: str | None, branch: Sequence[Turn] = ()) -> None:
        """Store a user turn; ``branch``: the conversation before it, whose last reply it reacts to."""
        assert self.session.conversation_id is not None
        reaction = reaction_after(branch, message_id=turn.id, text=turn.text, config=self.ctx.implicit)
        await self.ctx.store.conversations.add_message(
            message_id=turn.id,
            conversation_id=self.session.conversation_id,
            role=Role.USER,
            text=turn.text,
            parent_id=parent_id,
            reaction=reaction if reaction is not None and reaction.reply_id == parent_id else None,
        )

    async def _open(self, effect: OpenConversation) -> list[Effect]:
        if effect.site is not None:
            # a widget in a shop's page: the site's origins and user hashes stand in for server.token,
            # which a public page could not keep secret
            origin = self.ws.request.headers.get("Origin") if self.ws.request is not None else None
            try:
                admission = admit(
                    self.ctx.sites(effect.site),
                    name=effect.site,
                    origin=origin,
                    user=effect.user,
                    claimed_hash=effect.user_hash,
                )
            except IdentityError as exc:
                return self.session.open_failed(exc.code, exc.message)
            self.user, self.site = admission.user, admission.site
        elif not self.ws.authenticated:
            # only a widget site's page comes without server.token (the handshake let it in for that)
            return self.session.open_failed(ErrorCode.UNAUTHORIZED, "send server.token in the handshake")
        else:
            self.user = effect.user  # hello.token is not read: the handshake carried the token
        if not self._take_user_slot():
            self.over_user_cap = True  # the error goes out, then close 1013
            refused = self.session.open_failed(ErrorCode.RATE_LIMITED, "too many connections for this user")
            for sent in refused:
                if isinstance(sent, Send):
                    sent.frame["retry_after"] = RETRY_AFTER_S
            return refused
        if effect.conversation_id is None:
            conversation_id, self.pinned = await open_conversation(
                self.ctx.store,
                assign_version=self.ctx.assign_version,
                user=self.user,
                channel="widget" if self.site is not None else "websocket",
                site=self.site,
            )
            return self.session.opened(conversation_id, [], set(), self.ctx.serving_version(self.pinned))
        try:
            conversation = await self.ctx.store.conversations.get(effect.conversation_id)
        except NotFoundError:
            conversation = None
        # a widget conversation resumes only on its own site and for the same verified user (or
        # anonymously if it was anonymous); the answer does not tell which check failed
        if (
            conversation is None
            or conversation.site != self.site
            or (self.site is not None and conversation.user_id != self.user)
        ):
            return self.session.open_failed(ErrorCode.NOT_FOUND, f"no conversation {effect.conversation_id!r}")
        self.pinned = conversation.model_version
        version = self.ctx.serving_version(self.pinned)
        messages = await self.ctx.store.conversations.messages(effect.conversation_id)
        branch = latest_branch(messages)
        replies = {m.id for m in messages if m.role is Role.ASSISTANT and m.finish_reason is not FinishReason.ERROR}
        return self.session.opened(effect.conversation_id, branch, replies, version)

    def _take_user_slot(self) -> bool:
        """Count this connection for its user, unless the user already holds ``max_connections_per_user``."""
        cap = self.ctx.max_connections_per_user
        if not cap or self.user is None:
            return True  # an anonymous visitor counts only against its address
        key = user_slot(self.site, self.user, self.ws.address)
        held = sum(1 for c in self.ctx.connections if c is not self and c.user_slot == key)
        if held >= cap:
            log.warning("websocket hello refused: one user holds %d connections", cap)
            return False
        self.user_slot = key
        return True

    async def start_rating(self, effect: StoreRating) -> None:
        """Store a rating in its own task; its ``ack`` (or error) is sent once it committed.

        At most ``MAX_RATINGS_IN_FLIGHT`` per connection: past that the reader waits for one to
        finish, so a client that floods ratings is slowed by its own backlog, not the server's memory.
        """
        while len(self.ratings) >= MAX_RATINGS_IN_FLIGHT:
            await asyncio.wait(self.ratings, return_when=asyncio.FIRST_COMPLETED)

        async def store_and_answer() -> None:
            try:
                await self.apply(await self.rate(effect))
            except Exception:
                log.exception("answering rating %s failed", effect.client_id)

        task = asyncio.create_task(store_and_answer())
        for tracked in (self.ratings, self.ctx.ratings):
            tracked.add(task)
            task.add_done_callback(tracked.discard)

    async def rate(self, effect: StoreRating) -> list[Effect]:
        started = time.monotonic()
        effects = await self._rate(effect)
        metrics = self.ctx.metrics
        if metrics is not None:
            refused = [e.frame["code"] for e in effects if isinstance(e, Send) and e.frame.get("type") == "error"]
            if refused:
                metrics.rating_refused(str(refused[0]))
            else:
                metrics.rating_acked(effect.value, started)
        return effects

    async def _rate(self, effect: StoreRating) -> list[Effect]:
        rater = self.user or f"conversation:{self.session.conversation_id}"
        # keyed as the connection cap: a claimed hello.user spends its budget per client address
        budget = rater if self.user is None else "\x1f".join(map(str, user_slot(self.site, self.user, self.ws.address)))
        retry_after = await self.ctx.rating_limiter.check(budget)
        if retry_after is not None:
            return [
                Send(
                    error_frame(
                        ErrorCode.RATE_LIMITED,
                        "too many ratings from this rater",
                        retry_after=retry_after,
                        id=effect.client_id,
                    )
                )
            ]
        try:
            await self.ctx.store.conversations.add_rating(
                message_id=effect.message_id,
                value=effect.value,
                client_id=effect.client_id,
                rater=rater,
                reason=effect.reason,
                comment=effect.comment,
            )
        except Exception as exc:  # never an ack for a rating that is not on disk
            return [Send(error_frame_for(exc, id=effect.client_id, where="storing a rating"))]
        return self.session.rating_stored(effect.client_id)

    async def generate(self, g: Generate, cancel: StopSignal) -> None:
        """Store the user turn (ack), stream the reply, store it (done); a failure rolls the session back."""
        assert self.session.conversation_id is not None
        try:
            if g.user_turn is not None:
                await self._store_user_turn(
                    g.user_turn, g.context[-2].id if len(g.context) > 1 else None, g.context[:-1]
                )
                await self.apply(self.session.user_turn_stored(g))

            async def send_token(delta: str) -> None:
                await self.send({"type": "token", "message_id": g.message_id, "delta": delta})

            # chosen now, with no await before the engine admits the reply: a version picked before
            # the user turn was stored could have been unloaded by then (two swaps in that time)
            version = self.ctx.serving_version(self.pinned)
            reply = await stream_reply(
                self.ctx.store,
                self.ctx.engine,
                conversation_id=self.session.conversation_id,
                context=g.context,
                message_id=g.message_id,
                parent_id=g.parent_id,
                version=version,
                sampling=self.ctx.sampling,
                on_delta=send_token,
                cancel=cancel,
                regenerated_from=g.regenerated_from,
            )
            if reply.failed:
                effects = self.session.failed(g.message_id, ErrorCode.INTERNAL, "generation failed")
            else:
                effects = self.session.finished(
                    g.message_id, reply.text, reply.version, reply.finish_reason, completion_tokens=reply.n_tokens
                )
            await self.apply(effects)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            code, message, retry_after = public_view(exc, where=f"reply {g.message_id}")
            await self.apply(self.session.failed(g.message_id, code, message, retry_after=retry_after))


def user_slot(site: str | None, user: str, address: str | None) -> tuple[str | None, str, str | None]:
    """What a connection of ``user`` counts against under ``server.max_connections_per_user``.

    A site's user is verified (its page signed ``user_hash``): the cap is per user, wherever they
    connect from. A plain websocket's ``hello.user`` is only a claim: it is capped per user AND
    client address, so nobody can fill another user's slots by claiming their name from elsewhere
    (a backend relaying its users from one address still caps each of them).
    """
    return (site, user, None) if site is not None else (None, user, address)


@dataclass(frozen=True)
class SocketLimits:
    """The websocket's transport limits (``server.*`` settings; docs/reliability.md, scenario 11)."""

    max_frame_bytes: int = 65536
    open_timeout_s: float = 10.0
    max_connections_per_address: int = 0  # 0: no cap
    trusted_proxies: tuple[str, ...] = ("127.0.0.0/8", "::1")  # whose X-Forwarded-For is believed
    write_limit_bytes: int = 32768
    compression: bool = False
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0


async def start_gateway(ctx: GatewayContext, *, host: str, port: int, limits: SocketLimits | None = None) -> Server:
    """Listen for chat clients; ``/healthz`` answers plain HTTP for probes.

    Before the upgrade ``server.admission.Admission`` refuses a handshake from an Origin that is
    not allowed (403), without ``server.token`` (401) or over the per-address cap (429); one not
    completed within ``open_timeout_s`` is dropped. After it, a connection that sends nothing for
    ``ctx.idle_timeout_s`` is closed with 4408, and one whose client does not read is dropped
    after ``ctx.send_timeout_s``.
    """
    limits = limits or SocketLimits()
    admission = Admission(
        token=ctx.token,
        origin_allowed=ctx.origin_allowed,
        site_origin=ctx.site_origin,
        max_per_address=limits.max_connections_per_address,
        trusted_proxies=limits.trusted_proxies,
    )

    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        if request.path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        if request.path == "/origin":
            return None  # the probe (see handler): any page may ask whether its origin may chat
        return admission.check(connection, request)

    async def handler(ws: ServerConnection) -> None:
        assert isinstance(ws, ChatSocket)
        if ws.request is not None and ws.request.path == "/origin":
            # a widget whose handshake failed asks why: a page never sees an HTTP status, but it sees a
            # close code. No session: 1000 if its Origin may chat (the server was down), else 1008.
            if ctx.origin_allowed(ws.request.headers.get("Origin")):
                await ws.close(CloseCode.NORMAL_CLOSURE, "allowed")
            else:
                await ws.close(CloseCode.POLICY_VIOLATION, "forbidden")
            return
        conn = _Connection(ctx, ws)
        idle = asyncio.create_task(_close_when_idle(conn, ctx.idle_timeout_s)) if ctx.idle_timeout_s else None
        if ctx.metrics is not None:
            ctx.metrics.connections_opened.inc()
            ctx.metrics.connections.inc()
        try:
            await conn.run()
        finally:
            if ctx.metrics is not None:
                ctx.metrics.connections.dec()
            if idle is not None and not conn.idle_closing:
                idle.cancel()

    return await serve(
        handler,
        host,
        port,
        max_size=limits.max_frame_bytes,  # with compression on, it bounds a message after decompression
        process_request=process_request,
        select_subprotocol=admission.select_subprotocol,
        open_timeout=limits.open_timeout_s,
        compression="deflate" if limits.compression else None,
        write_limit=limits.write_limit_bytes,
        ping_interval=limits.ping_interval_s,
        ping_timeout=limits.ping_timeout_s,
        create_connection=ChatSocket,
        logger=_library_log,
    )


async def _close_when_idle(conn: _Connection, idle_s: float) -> None:
    """Close ``conn`` with 4408 once its client sent no frame for ``idle_s`` and no reply streams."""
    ws = conn.ws
    while True:
        left = ws.heard + idle_s - time.monotonic()
        if left > 0:
            await asyncio.sleep(left)
        elif conn.generation is not None and not conn.generation.done():
            ws.heard = time.monotonic()  # a reply is streaming: the connection is in use
        else:
            conn.idle_closing = True
            await ws.close(IDLE_CLOSE, "idle timeout")
            return


async def drain(ctx: GatewayContext, server: Server, *, drain_s: float) -> None:
    """Shut the gateway down without dropping a reply.

    New connections are refused at once and no new reply starts; replies in flight stream on for
    up to ``drain_s`` seconds, then are stopped: each ends with ``done`` (``finish_reason``
    ``shutdown``) and is stored with the text it had. Ratings being stored get their ``ack``.
    Then every client gets close 1001; a rating read during the closing handshake is committed
    before the store closes, unacknowledged (its client resends it, stored once by its ``id``).
    """
    ctx.draining = True
    server.server.close()  # the listening socket: new connections are refused
    running = [c.generation for c in ctx.connections if c.generation is not None and not c.generation.done()]
    if running:
        log.info("draining %d replies in flight (up to %.1f s)", len(running), drain_s)
        _, late = await asyncio.wait(running, timeout=drain_s)
        for conn in list(ctx.connections):
            if conn.generation in late and conn.cancel is not None:
                conn.cancel.reason = FinishReason.SHUTDOWN
                conn.cancel.set()
        if late:
            await asyncio.wait(late, timeout=5)  # the engine stops at its next step; the reply is stored
    if ctx.ratings:  # each is committed and acknowledged while its connection is still open
        await asyncio.wait(set(ctx.ratings), timeout=5)
    server.close()  # close 1001 (going away) to every client
    await server.wait_closed()
    if ctx.ratings:  # read during the close handshake: committed before the store closes (no ack can go out;
        await asyncio.wait(set(ctx.ratings), timeout=5)  # the client resends it with the same id)
