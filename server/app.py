"""Composition root: opens the store and the engine, starts the gateway and the scheduler.

Everything with a life cycle is opened and closed in ``App.lifespan``. The app is also
where a promoted version reaches the engine (``sync_live_version``): after a cycle in this
process, and by polling the store for one promoted elsewhere (``learnloop train``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from feedback import BASE_VERSION, FeedbackStore, ModelVersion
from server.engine import SamplingConfig, TransformersEngine
from server.gateway import GatewayContext, start_gateway
from server.protocol import KeyedRateLimiter, Limits
from server.settings import Settings
from training.config import CycleConfig
from training.cycle import ADAPTER_FILE, CycleResult, CycleStatus, TrainingCycle, sha256_file
from training.models import resolve_model
from training.schedule import start_scheduler

log = logging.getLogger("learnloop.app")


class AdapterRejectedError(Exception):
    """An adapter file failed validation; the old version keeps serving."""


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
    )


class App:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store: FeedbackStore | None = None
        self.engine: TransformersEngine | None = None
        self.cycle: TrainingCycle | None = None
        self.live_version: str = BASE_VERSION
        self.port: int | None = None
        self._previous_live: str | None = None
        self._swap_lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[App]:
        s = self.settings
        base_model = await asyncio.to_thread(resolve_model, s.model.name)
        self.store = await FeedbackStore.open(s.db_path)
        scheduler = None
        poller: asyncio.Task[None] | None = None
        server = None
        try:
            self.engine = TransformersEngine(
                base_model,
                dtype=s.model.dtype,
                max_prompt_tokens=s.model.max_prompt_tokens,
                max_pending=s.model.max_pending,
                system_prompt=s.model.system_prompt,
            )
            await asyncio.to_thread(self.engine.load)
            await self.store.ensure_base_version(base_model)
            await self.sync_live_version()
            self.cycle = TrainingCycle(self.store, cycle_config(s, base_model))
            ctx = GatewayContext(
                store=self.store,
                engine=self.engine,
                current_version=lambda: self.live_version,
                sampling=SamplingConfig(
                    max_new_tokens=s.model.max_new_tokens, temperature=s.model.temperature, top_p=s.model.top_p
                ),
                limits=Limits(
                    max_text_chars=s.server.max_text_chars,
                    rate_per_s=s.server.rate_per_s,
                    rate_burst=s.server.rate_burst,
                ),
                token=s.server.token,
                rating_limiter=KeyedRateLimiter(
                    per_minute=s.server.ratings_per_minute, burst=max(1, int(s.server.ratings_per_minute))
                ),
            )
            server = await start_gateway(
                ctx, host=s.server.host, port=s.server.port, max_frame_bytes=s.server.max_frame_bytes
            )
            self.port = next(iter(server.sockets)).getsockname()[1]
            if s.schedule.enabled:
                scheduler = start_scheduler(self.scheduled_cycle, interval_s=s.schedule.interval_s)
            poller = asyncio.create_task(self._poll_versions(), name="version-poller")
            log.info(
                "learnloop serving %s (version %s) on ws://%s:%d",
                s.model.name,
                self.live_version,
                s.server.host,
                self.port,
            )
            yield self
        finally:
            if poller is not None:
                poller.cancel()
            if scheduler is not None:
                scheduler.shutdown(wait=False)
            if server is not None:
                server.close()
                await server.wait_closed()
            if self.engine is not None:
                await asyncio.to_thread(self.engine.close)
            await self.store.close()

    # --- training and versions -----------------------------------------------------------

    async def run_training(self, *, force: bool = False) -> CycleResult:
        """Run one cycle now; a promoted version starts serving new replies at once."""
        assert self.cycle is not None
        result = await self.cycle.run(force=force)
        if result.status is CycleStatus.PROMOTED:
            await self.sync_live_version()
        return result

    async def scheduled_cycle(self) -> None:
        try:
            result = await self.run_training()
            log.info("scheduled training: %s (%s)", result.status, result.reason)
        except Exception:
            log.exception("scheduled training cycle failed")

    async def _poll_versions(self) -> None:
        while True:
            await asyncio.sleep(self.settings.schedule.version_poll_s)
            try:
                await self.sync_live_version()
            except Exception:
                log.exception("checking for a new live version failed")

    async def sync_live_version(self) -> str:
        """Make the store's live version the one that new replies use (loading it if needed)."""
        assert self.store is not None and self.engine is not None
        async with self._swap_lock:
            live = await self.store.live_version()
            if live.name == self.live_version and self.engine.has_version(live.name):
                return self.live_version
            if live.name != BASE_VERSION and not self.engine.has_version(live.name):
                await self._load(live)
            old = self.live_version
            self.live_version = live.name
            log.info("new replies now use version %s (was %s)", live.name, old)
            # keep the previous live loaded for an instant rollback; unload the one before it
            if self._previous_live not in (None, BASE_VERSION, live.name, old):
                await self.engine.unload_adapter(self._previous_live)  # type: ignore[arg-type]
            self._previous_live = old
            return live.name

    async def _load(self, version: ModelVersion) -> None:
        assert self.engine is not None
        if not version.adapter_path:
            raise AdapterRejectedError(f"version {version.name} has no adapter path")
        adapter_file = Path(version.adapter_path) / ADAPTER_FILE
        if not adapter_file.is_file():
            raise AdapterRejectedError(f"version {version.name}: {adapter_file} is missing")
        digest = await asyncio.to_thread(sha256_file, adapter_file)
        if digest != version.sha256:
            raise AdapterRejectedError(f"version {version.name}: sha256 {digest} does not match the registry")
        pause = await self.engine.load_adapter(version.name, version.adapter_path)
        log.info("version %s loaded; decoding paused %.0f ms", version.name, pause * 1000)


async def serve_forever(settings: Settings) -> None:
    app = App(settings)
    async with app.lifespan():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down")


def describe(result: CycleResult) -> dict[str, Any]:
    return {
        "status": str(result.status),
        "reason": result.reason,
        "version": result.version,
        "run_id": result.run_id,
        "seconds": round(result.seconds, 1),
        "counts": result.counts,
        "report": result.report,
    }
