"""Training inside the server: scheduled or on demand, one cycle at a time in this process.

A cycle (``training.cycle.TrainingCycle``) exports feedback, trains a candidate in a
subprocess, evaluates and gates it, and registers it; a version that passes starts serving
at once through ``Release.sync``. The store's lease keeps it to one run across processes
(``learnloop train`` in another shell included).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from feedback import FeedbackSnapshot, FeedbackStore
from server.release import Release
from server.settings import Settings
from training.config import CycleConfig
from training.cycle import CycleResult, CycleStatus, TrainingCycle, prepare

log = logging.getLogger("learnloop.trainer")


def cycle_config(settings: Settings, base_model: str) -> CycleConfig:
    s = settings.schedule
    return CycleConfig(
        base_model=base_model,
        data_dir=settings.data_dir,
        system_prompt=settings.model.system_prompt,
        min_new_feedback=s.min_new_feedback,
        heldout_fraction=s.heldout_fraction,
        timeout_s=s.timeout_s,
        train=settings.training,
        gate=settings.gate,
        trust=settings.trust,
        implicit=settings.implicit,
        canary_share=settings.canary.share,
    )


def describe(result: CycleResult) -> dict[str, Any]:
    """A cycle's outcome as JSON (the CLI prints it)."""
    return {
        "status": str(result.status),
        "reason": result.reason,
        "version": result.version,
        "run_id": result.run_id,
        "seconds": round(result.seconds, 1),
        "counts": result.counts,
        "report": result.report,
    }


class Trainer:
    """Runs training cycles for the server and serves what passes."""

    def __init__(self, store: FeedbackStore, config: CycleConfig, release: Release) -> None:
        self.cycle = TrainingCycle(store, config)
        self.release = release
        self._task: asyncio.Task[CycleResult] | None = None

    async def run(self, *, force: bool = False) -> CycleResult:
        """Run one cycle now; a version that passes starts serving (as canary or live) at once."""
        result = await self.cycle.run(force=force)
        if result.status in (CycleStatus.PROMOTED, CycleStatus.CANARY):
            await self.release.sync()
        return result

    def start(self, *, force: bool, actor: str) -> bool:
        """Start a cycle in the background (console's "train now"); False while one runs here."""
        if self._task is not None and not self._task.done():
            return False
        log.info("training cycle started by %s", actor)
        self._task = asyncio.create_task(self._logged(force=force, label="training"), name="training")
        return True

    async def scheduled(self) -> None:
        """The scheduler's job: a failure is logged, never raised into the scheduler."""
        try:
            await self._logged(force=False, label="scheduled training")
        except Exception:
            log.exception("scheduled training cycle failed")

    async def _logged(self, *, force: bool, label: str) -> CycleResult:
        result = await self.run(force=force)
        log.info("%s: %s (%s)", label, result.status, result.reason)
        return result

    def preview(self, snapshot: FeedbackSnapshot, *, rows: bool) -> dict[str, Any]:
        """What the next run would train on, and what was dropped or held, and why."""
        return prepare(snapshot, self.cycle.config).summary(rows=rows)

    def rows(self, snapshot: FeedbackSnapshot, kind: str) -> list[dict[str, Any]]:
        """The next run's rows of one kind (dpo, kto, sft) in TRL's columns, held-out rows included."""
        return [r.to_trl() for r in prepare(snapshot, self.cycle.config).train_rows(kind, heldout_too=True)]

    async def aclose(self) -> None:
        """Cancel a cycle running in the background (its subprocess is killed; nothing is published)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
