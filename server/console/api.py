"""The operator console: a JSON REST API (FastAPI) and the static pages that use it.

Runs in the server process beside the websocket gateway (``start_console``), so a
takeover reaches the customer's open socket and a promote reaches the engine at once.

Auth: a console session cookie (HttpOnly, SameSite=Strict) plus an ``X-CSRF-Token`` header
on every unsafe request, or ``Authorization: Bearer <api token>``. Each route states the
lowest role it allows (``_ROLE`` in its OpenAPI extra, read by the route-walk test).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, Protocol

from fastapi import FastAPI, Query, Request, Response
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from feedback import ErrorCode, FeedbackStore, Message, RaterState, Role
from feedback.accounts import OperatorRole
from feedback.browse import ConversationFilter
from server.console import redact as redacted
from server.console.auth import COOKIE, ROLE_KEY, AsReviewer, AsViewer, authenticate, role
from server.console.loop import add_loop_routes
from server.errors import ApiError, install_error_handlers
from server.limiters import rate_limiter
from server.listener import RunningListener, serve_app
from server.metrics import CONTENT_TYPE, Metrics
from server.presence import Presence
from server.settings import ConsoleConfig
from training.implicit import ImplicitConfig, silent_replies

log = logging.getLogger("learnloop.console")

STATIC = Path(__file__).parent / "static"
PAGES = (
    ("/conversations", OperatorRole.VIEWER),
    ("/conversations/{conversation_id}", OperatorRole.VIEWER),
    ("/review", OperatorRole.VIEWER),
    ("/dataset", OperatorRole.VIEWER),
    ("/runs", OperatorRole.VIEWER),
    ("/runs/{run_id}", OperatorRole.VIEWER),
    ("/versions", OperatorRole.VIEWER),
    ("/charts", OperatorRole.VIEWER),
    ("/audit", OperatorRole.ADMIN),
)


class Releases(Protocol):
    """Version moves the console asks for (``server.release.Release``)."""

    async def promote(self, name: str, *, actor: str) -> None: ...
    async def rollback(self, name: str, *, actor: str) -> None: ...
    async def canary_report(self) -> dict[str, Any] | None: ...


class Training(Protocol):
    """Training the console starts and previews (``server.trainer.Trainer``)."""

    def start(self, *, force: bool, actor: str) -> bool: ...
    def preview(self, snapshot: Any, *, rows: bool) -> dict[str, Any]: ...
    def rows(self, snapshot: Any, kind: str) -> list[dict[str, Any]]: ...


# --- request bodies ---------------------------------------------------------------------


class LoginBody(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class CorrectionBody(BaseModel):
    text: str = Field(min_length=1, max_length=8000)
    reason: str | None = Field(default=None, max_length=200)


class ExclusionBody(BaseModel):
    reason: str = Field(min_length=1, max_length=200)


class ReviewBody(BaseModel):
    state: Literal["approved", "rejected"]


class ReplyBody(BaseModel):
    text: str = Field(min_length=1, max_length=8000)


# --- the app ----------------------------------------------------------------------------


def create_console(
    config: ConsoleConfig,
    *,
    store: FeedbackStore,
    presence: Presence,
    release: Releases | None,
    trainer: Training | None,
    metrics: Metrics | None = None,
    implicit: ImplicitConfig | None = None,
) -> FastAPI:
    """The console's app. Without ``release``/``trainer`` (a console over a store alone), the routes
    that move versions or start training answer ``unavailable``. ``implicit``: when a reply counts as
    abandoned (``implicit.abandon_after_s``)."""
    implicit = implicit or ImplicitConfig()

    def releases() -> Releases:
        if release is None:
            raise ApiError("this console does not manage releases", code=ErrorCode.UNAVAILABLE)
        return release

    def training() -> Training:
        if trainer is None:
            raise ApiError("this console does not run training", code=ErrorCode.UNAVAILABLE)
        return trainer

    login_limiter = rate_limiter(store, "login", config.login_attempts_per_minute)
    app = FastAPI(
        title="learnloop console API",
        version="1",
        description="Review feedback, correct answers, steer training and releases. See docs/console.md.",
        openapi_url=None,  # served below, behind the login
        docs_url=None,
        redoc_url=None,
    )
    app.state.store = store

    install_error_handlers(app)

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault(
            "Content-Security-Policy", "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"
        )
        return response

    viewer, reviewer = OperatorRole.VIEWER, OperatorRole.REVIEWER

    @app.get("/api/openapi.json", include_in_schema=False, **role(viewer))
    async def openapi() -> dict[str, Any]:
        return app.openapi()

    if metrics is not None:

        @app.get("/metrics", response_class=Response, **role(viewer))
        async def prometheus() -> Response:
            """Prometheus metrics (server.metrics): scrape with a viewer's API token."""
            return Response(await metrics.render(store), media_type=CONTENT_TYPE)

    # --- session ------------------------------------------------------------------------

    @app.post("/api/v1/session", openapi_extra={ROLE_KEY: "public"})
    async def login(body: LoginBody, request: Request, response: Response) -> dict[str, Any]:
        client = request.client.host if request.client else "?"
        for key in (f"name:{body.name}", f"addr:{client}"):
            retry = await login_limiter.check(key)
            if retry is not None:
                raise ApiError("too many login attempts", code=ErrorCode.RATE_LIMITED, retry_after=retry)
        operator = await store.accounts.check_login(body.name, body.password)
        if operator is None:
            log.warning("failed console login for %r from %s", body.name, client)
            raise ApiError("wrong name or password", code=ErrorCode.UNAUTHORIZED)
        session_id, session = await store.accounts.create_session(operator, ttl_s=config.session_ttl_s)
        response.set_cookie(
            COOKIE,
            session_id,
            max_age=int(config.session_ttl_s),
            httponly=True,
            samesite="strict",
            secure=config.secure_cookie,
            path="/",
        )
        return {"operator": operator.name, "role": str(operator.role), "csrf_token": session.csrf_token}

    @app.delete("/api/v1/session", **role(viewer))
    async def logout(response: Response, p: AsViewer) -> dict[str, Any]:
        if p.session_id is not None:
            await store.accounts.end_session(p.session_id, actor=p.operator.name)
        response.delete_cookie(COOKIE, path="/")
        return {"ok": True}

    @app.get("/api/v1/me", **role(viewer))
    async def me(p: AsViewer) -> dict[str, Any]:
        return {"operator": p.operator.name, "role": str(p.operator.role), "csrf_token": p.csrf_token}

    # --- conversations ------------------------------------------------------------------

    @app.get("/api/v1/conversations", **role(viewer))
    async def conversations(
        rating: Literal["up", "down", "none"] | None = None,
        reaction: Literal["up", "down"] | None = None,
        version: str | None = None,
        channel: str | None = Query(default=None, max_length=100),
        site: str | None = Query(default=None, max_length=100),
        since: float | None = None,
        until: float | None = None,
        has_correction: bool | None = None,
        flagged: bool | None = None,
        q: str | None = Query(default=None, max_length=200),
        limit: int = Query(default=50, ge=1, le=200),
        cursor: str | None = None,
        *,
        p: AsViewer,
    ) -> dict[str, Any]:
        """``q`` searches the raw text (personal data included): reviewers and admins only, or a viewer
        could find a phone number digit by digit (the last word matches as a prefix)."""
        if q and not p.operator.role.allows(reviewer):
            raise ApiError("searching message text needs the reviewer role", code=ErrorCode.FORBIDDEN)
        f = ConversationFilter(
            rating,
            version or None,
            channel or None,
            since,
            until,
            has_correction,
            flagged,
            q or None,
            site or None,
            reaction=reaction,
        )
        items, next_cursor = await store.browse.list_conversations(f, limit=limit, cursor=cursor)
        return {"items": [redacted.summary(i) for i in items], "next_cursor": next_cursor}

    raw_views = redacted.RawViews()

    async def conversation_view(conversation_id: str, *, raw: bool) -> dict[str, Any]:
        t = await store.browse.transcript(conversation_id)
        if t is None:
            raise ApiError(f"no conversation {conversation_id!r}", code=ErrorCode.NOT_FOUND)
        with_silence(t["messages"], now=time.time(), config=implicit)
        takeover = presence.takeovers.get(conversation_id)
        shown = {**t, "conversation": redacted.summary(t["conversation"], raw=True), "redacted": False}
        return {
            **(shown if raw else redacted.transcript(t)),
            "takeover": {"operator": takeover.operator, "since": takeover.since} if takeover else None,
            "connected": presence.connected(conversation_id),
        }

    @app.get("/api/v1/conversations/{conversation_id}", **role(viewer))
    async def transcript(conversation_id: str) -> dict[str, Any]:
        """The transcript with personal data redacted (``server/console/redact.py``)."""
        return await conversation_view(conversation_id, raw=False)

    @app.get("/api/v1/conversations/{conversation_id}/raw", **role(reviewer))
    async def raw_transcript(conversation_id: str, p: AsReviewer) -> dict[str, Any]:
        """The transcript as the customer wrote it: each look is audited (the entry written first; a look
        whose entry fails is not shown, and the next one tries again)."""
        view = await conversation_view(conversation_id, raw=True)
        now = time.monotonic()
        if raw_views.due(p.operator.name, conversation_id, now):
            await store.accounts.audit(p.operator.name, "transcript.raw", conversation_id, {})
            raw_views.seen(p.operator.name, conversation_id, now)
        return view

    @app.post("/api/v1/messages/{message_id}/correction", status_code=201, **role(reviewer))
    async def correct(message_id: str, body: CorrectionBody, p: AsReviewer) -> dict[str, Any]:
        c = await store.conversations.add_correction(
            message_id=message_id, text=body.text, operator=p.operator.name, reason=body.reason
        )
        return {"id": c.id, "message_id": c.message_id, "reason": c.reason}

    @app.post("/api/v1/messages/{message_id}/exclusion", **role(reviewer))
    async def exclude(message_id: str, body: ExclusionBody, p: AsReviewer) -> dict[str, Any]:
        await store.conversations.exclude_message(message_id, reason=body.reason, operator=p.operator.name)
        return {"message_id": message_id, "excluded": True}

    @app.delete("/api/v1/messages/{message_id}/exclusion", **role(reviewer))
    async def include(message_id: str, p: AsReviewer) -> dict[str, Any]:
        await store.conversations.get_message(message_id)
        await store.conversations.include_message(message_id, operator=p.operator.name)
        return {"message_id": message_id, "excluded": False}

    @app.get("/api/v1/raters", **role(viewer))
    async def raters(p: AsViewer) -> dict[str, Any]:
        items = await store.raters.reviews()  # a reviewer acts on a rater by its id; a viewer sees it redacted
        return {"items": items if p.operator.role.allows(reviewer) else redacted.raters(items)}

    @app.post("/api/v1/raters/{rater}/review", **role(reviewer))
    async def review(rater: str, body: ReviewBody, p: AsReviewer) -> dict[str, Any]:
        await store.raters.review(rater, RaterState(body.state), reviewer=p.operator.name)
        return {"rater": rater, "state": body.state}

    # --- takeover -----------------------------------------------------------------------

    @app.post("/api/v1/conversations/{conversation_id}/takeover", **role(reviewer))
    async def take_over(conversation_id: str, p: AsReviewer) -> dict[str, Any]:
        t = await presence.join(conversation_id, p.operator.name)
        await store.accounts.audit(p.operator.name, "takeover.join", conversation_id, {})
        return {
            "conversation_id": conversation_id,
            "operator": t.operator,
            "since": t.since,
            "connected": presence.connected(conversation_id),
        }

    @app.post("/api/v1/conversations/{conversation_id}/replies", status_code=201, **role(reviewer))
    async def operator_reply(conversation_id: str, body: ReplyBody, p: AsReviewer) -> dict[str, Any]:
        m = await presence.reply(conversation_id, p.operator.name, body.text)
        await store.accounts.audit(p.operator.name, "takeover.reply", conversation_id, {"message_id": m.id})
        return {"id": m.id, "conversation_id": conversation_id, "text": m.text, "author": m.author}

    @app.delete("/api/v1/conversations/{conversation_id}/takeover", **role(reviewer))
    async def hand_back(conversation_id: str, p: AsReviewer) -> dict[str, Any]:
        await presence.leave(conversation_id)
        await store.accounts.audit(p.operator.name, "takeover.leave", conversation_id, {})
        return {"conversation_id": conversation_id, "takeover": None}

    # --- the loop: training runs, versions, erasure, charts, audit, exports (server/console/loop.py) ---

    add_loop_routes(app, store, releases=releases, training=training, trainer=trainer)

    # --- pages --------------------------------------------------------------------------

    index = STATIC / "index.html"

    def page(required: OperatorRole) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            principal = await authenticate(request, store)
            if principal is None:
                return FileResponse(index, status_code=401, media_type="text/html")
            if not principal.operator.role.allows(required):
                return FileResponse(index, status_code=403, media_type="text/html")
            return FileResponse(index, media_type="text/html")

        return handler

    for path, required in PAGES:
        app.add_api_route(
            path,
            page(required),
            methods=["GET"],
            include_in_schema=False,
            openapi_extra={ROLE_KEY: str(required)},
        )

    @app.get("/login", include_in_schema=False, openapi_extra={ROLE_KEY: "public"})
    async def login_page() -> FileResponse:
        return FileResponse(index, media_type="text/html")

    @app.get("/", include_in_schema=False, openapi_extra={ROLE_KEY: "public"})
    async def root() -> RedirectResponse:
        return RedirectResponse("/conversations", status_code=303)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def with_silence(messages: list[dict[str, Any]], *, now: float, config: ImplicitConfig) -> None:
    """Give the transcript's abandoned reply (nothing came after it for ``abandon_after_s``) its
    reaction: silence is read from the messages' times when shown, never stored."""
    records = [
        Message(
            m["id"],
            m["conversation_id"],
            m["seq"],
            Role(m["role"]),
            m["text"],
            m["parent_id"],
            created_at=m["created_at"],
        )
        for m in messages
    ]
    silent = silent_replies(records, now=now, config=config)
    for m in messages:
        reading = silent.get(m["id"])
        if reading is not None and m.get("reaction") is None:
            m["reaction"] = {
                "message_id": None,
                "signal": reading.signal.value,
                "confidence": reading.confidence,
                "cue": reading.cue,
                "value": None,
                "weight": 0.0,
                "created_at": None,
            }


# --- serving ----------------------------------------------------------------------------


async def start_console(
    config: ConsoleConfig,
    *,
    store: FeedbackStore,
    presence: Presence,
    release: Releases | None = None,
    trainer: Training | None = None,
    metrics: Metrics | None = None,
    implicit: ImplicitConfig | None = None,
) -> RunningListener:
    app = create_console(
        config, store=store, presence=presence, release=release, trainer=trainer, metrics=metrics, implicit=implicit
    )
    return await serve_app(app, host=config.host, port=config.port, name="console")
