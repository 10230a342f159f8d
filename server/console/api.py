"""The operator console: a JSON REST API (FastAPI) and the static pages that use it.

Runs in the server process beside the websocket gateway (``start_console``), so a
takeover reaches the customer's open socket and a promote reaches the engine at once.

Auth: a console session cookie (HttpOnly, SameSite=Strict) plus an ``X-CSRF-Token`` header
on every unsafe request, or ``Authorization: Bearer <api token>``. Each route states the
lowest role it allows (``_ROLE`` in its OpenAPI extra, read by the route-walk test).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from fastapi import FastAPI, Query, Request, Response
from fastapi import Path as FastApiPath
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from feedback import ErrorCode, FeedbackStore, Message, RaterState, Role
from feedback.accounts import OperatorRole
from feedback.browse import ConversationFilter
from server.console import redact as redacted
from server.console.auth import COOKIE, ROLE_KEY, AsAdmin, AsReviewer, AsViewer, authenticate, role
from server.errors import ApiError, install_error_handlers
from server.limiters import rate_limiter
from server.listener import RunningListener, serve_app
from server.metrics import CONTENT_TYPE, Metrics
from server.presence import Presence
from server.release import rollback_target
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


# a row id as SQLite stores it (64-bit): a larger number is a 422 at the door, not an overflow inside
SQLITE_MAX = 2**63 - 1
RowId = Annotated[int, FastApiPath(ge=0, le=SQLITE_MAX)]

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


class TrainBody(BaseModel):
    force: bool = False


class ErasureBody(BaseModel):
    user: str = Field(min_length=1, max_length=256)


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

    viewer, reviewer, admin = OperatorRole.VIEWER, OperatorRole.REVIEWER, OperatorRole.ADMIN

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

    # --- the loop -----------------------------------------------------------------------

    @app.get("/api/v1/dataset/preview", **role(viewer))
    async def dataset_preview(rows: bool = False) -> dict[str, Any]:
        snapshot = await store.conversations.export_feedback()
        return await asyncio.to_thread(training().preview, snapshot, rows=rows)

    @app.get("/api/v1/runs", **role(viewer))
    async def runs(limit: int = Query(default=50, ge=1, le=500)) -> dict[str, Any]:
        return {"items": [_plain(r) for r in await store.runs.recent(limit)]}

    @app.get("/api/v1/runs/{run_id}", **role(viewer))
    async def run(run_id: RowId) -> dict[str, Any]:
        return _plain(await store.runs.get(run_id))

    @app.post("/api/v1/runs", status_code=202, **role(admin))
    async def start_run(body: TrainBody, p: AsAdmin) -> dict[str, Any]:
        if not training().start(force=body.force, actor=p.operator.name):
            raise ApiError("a training run is already in progress", code=ErrorCode.CONFLICT)
        await store.accounts.audit(p.operator.name, "train", None, {"force": body.force})
        return {"started": True}

    @app.post("/api/v1/runs/{run_id}/cancel", **role(admin))
    async def cancel_run(run_id: RowId, p: AsAdmin) -> dict[str, Any]:
        await store.runs.get(run_id)
        if not await store.runs.request_cancel(run_id, actor=p.operator.name):
            raise ApiError(f"run {run_id} is not running", code=ErrorCode.CONFLICT)
        return {"run_id": run_id, "cancel_requested": True}

    @app.get("/api/v1/versions", **role(viewer))
    async def versions() -> dict[str, Any]:
        every = await store.versions.all()
        by_name = {v.name: v for v in every}
        stats = await store.versions.all_stats()  # one pass over the replies, not one per version
        items = []
        for v in every:
            back = rollback_target(v, by_name)  # the console offers Roll back only where it leads somewhere
            items.append(
                {**_plain(v), "stats": asdict(stats[v.name]), "can_roll_back": back is not None, "rollback_to": back}
            )
        return {"items": items}

    @app.get("/api/v1/versions/{name}", **role(viewer))
    async def version(name: str) -> dict[str, Any]:
        v = await store.versions.get(name)
        return {**_plain(v), "stats": asdict(await store.versions.stats(v.name))}

    @app.post("/api/v1/versions/{name}/promote", **role(admin))
    async def promote(name: str, p: AsAdmin) -> dict[str, Any]:
        await store.versions.get(name)
        await releases().promote(name, actor=p.operator.name)
        return _plain(await store.versions.get(name))

    @app.post("/api/v1/versions/{name}/rollback", **role(admin))
    async def rollback(name: str, p: AsAdmin) -> dict[str, Any]:
        await store.versions.get(name)
        await releases().rollback(name, actor=p.operator.name)
        return {"rolled_back": name, "live": (await store.versions.live()).name}

    @app.post("/api/v1/erasures", **role(admin))
    async def erase(body: ErasureBody, p: AsAdmin) -> dict[str, Any]:
        """Erase a user for good (audit-logged); versions trained on their data are marked, and if one
        of them serves, a run without their data starts (runs train on all accepted feedback)."""
        result = await store.erasure.erase_user(body.user, actor=p.operator.name)
        serving = {(await store.versions.live()).name} | {v.name for v in [await store.versions.canary()] if v}
        retrain = bool(serving & set(result["versions_trained_on_them"]))
        result["retrain_started"] = retrain and trainer is not None and trainer.start(force=True, actor="erasure")
        return result

    @app.get("/api/v1/canary", **role(viewer))
    async def canary() -> dict[str, Any]:
        return {"canary": await releases().canary_report()}

    @app.get("/api/v1/stats/versions", **role(viewer))
    async def stats(
        bucket_s: float = Query(default=3600.0, ge=60.0, le=30 * 86400.0), since: float = 0.0
    ) -> dict[str, Any]:
        return {"bucket_s": bucket_s, "series": await store.browse.version_series(bucket_s=bucket_s, since=since)}

    @app.get("/api/v1/stats/channels", **role(viewer))
    async def channel_stats(since: float = 0.0) -> dict[str, Any]:
        """Thumbs per channel and version (the Charts page's table)."""
        return {"items": await store.browse.channel_stats(since=since)}

    @app.get("/api/v1/audit", **role(admin))
    async def audit(
        limit: int = Query(default=100, ge=1, le=1000),
        before_id: Annotated[int | None, Query(ge=0, le=SQLITE_MAX)] = None,
    ) -> dict[str, Any]:
        return {"items": await store.browse.audit_log(limit=limit, before_id=before_id)}

    # --- exports ------------------------------------------------------------------------

    @app.get("/api/v1/export/conversations.jsonl", **role(admin))
    async def export_conversations(p: AsAdmin) -> StreamingResponse:
        await store.accounts.audit(p.operator.name, "export.conversations", None, {})

        async def lines() -> AsyncIterator[bytes]:
            async for t in store.browse.iter_conversations():
                yield (json.dumps(t, ensure_ascii=False) + "\n").encode()

        return StreamingResponse(
            lines(),
            media_type="application/x-ndjson",
            headers={"Content-Disposition": 'attachment; filename="conversations.jsonl"'},
        )

    @app.get("/api/v1/export/training.jsonl", **role(admin))
    async def export_training(kind: Literal["dpo", "kto", "sft"], p: AsAdmin) -> StreamingResponse:
        snapshot = await store.conversations.export_feedback()
        rows = await asyncio.to_thread(training().rows, snapshot, kind)
        await store.accounts.audit(p.operator.name, "export.training", kind, {"rows": len(rows)})

        def lines() -> Iterator[bytes]:
            for row in rows:
                yield (json.dumps(row, ensure_ascii=False) + "\n").encode()

        return StreamingResponse(
            lines(),
            media_type="application/x-ndjson",
            headers={"Content-Disposition": f'attachment; filename="training-{kind}.jsonl"'},
        )

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


def _plain(record: Any) -> dict[str, Any]:
    """A run or version record as JSON-ready fields (its state as a plain string)."""
    d = asdict(record)
    d["state"] = str(record.state)
    return d


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
