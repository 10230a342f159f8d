"""The console's routes for the loop itself: the training dataset's preview, training runs (list,
start, cancel), model versions (list, promote, roll back), erasure, the canary, the charts' series,
the audit log and the exports. ``server.console.api`` builds the app and adds these;
auth, roles and errors are the app's (``server.console.auth``, ``server.errors``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import FastAPI, Query
from fastapi import Path as FastApiPath
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from feedback import ErrorCode, FeedbackStore
from feedback.accounts import OperatorRole
from server.console.auth import AsAdmin, role
from server.errors import ApiError
from server.release import rollback_target

if TYPE_CHECKING:
    from server.console.api import Releases, Training

# a row id as SQLite stores it (64-bit): a larger number is a 422 at the door, not an overflow inside
SQLITE_MAX = 2**63 - 1
RowId = Annotated[int, FastApiPath(ge=0, le=SQLITE_MAX)]


class TrainBody(BaseModel):
    force: bool = False


class ErasureBody(BaseModel):
    user: str = Field(min_length=1, max_length=256)


def add_loop_routes(
    app: FastAPI,
    store: FeedbackStore,
    *,
    releases: Callable[[], Releases],
    training: Callable[[], Training],
    trainer: Training | None,
) -> None:
    """Add the routes to ``app`` itself, not through an included router, so that the route walk of
    ``tests/test_console.py`` finds every one in ``app.routes``. ``releases()`` and ``training()``
    answer ``unavailable`` on a console over a store alone; ``trainer`` is None there (an erasure
    then starts no run)."""
    viewer, admin = OperatorRole.VIEWER, OperatorRole.ADMIN

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


def _plain(record: Any) -> dict[str, Any]:
    """A run or version record as JSON-ready fields (its state as a plain string)."""
    d = asdict(record)
    d["state"] = str(record.state)
    return d
