"""Composition root: opens the store and the engine, starts the gateway and the scheduler.

Everything with a life cycle is opened and closed in ``App.lifespan``. The app is also
where a promoted version reaches the engine (``sync_live_version``): after a cycle in this
process, and by polling the store for one promoted elsewhere (``learnloop train``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from typing import Any

from feedback import BASE_VERSION, FeedbackStore, LearnloopError, ModelVersion, VersionState
from server.channels.serve import RunningChannels, start_channels
from server.channels.widget import find_site
from server.console.api import RunningConsole, start_console
from server.engine import Engine, SamplingConfig, TransformersEngine
from server.gateway import GatewayContext, Presence, start_gateway
from server.openai_engine import OpenAIEngine
from server.protocol import KeyedRateLimiter, Limits
from server.settings import Settings, SiteConfig
from training.canary import CanaryAction, CanaryDecision, assign
from training.canary import decide as decide_canary
from training.config import CycleConfig
from training.cycle import CycleResult, CycleStatus, TrainingCycle, prepare
from training.models import default_gguf, resolve_model
from training.schedule import start_scheduler
from training.validate import AdapterInvalidError

log = logging.getLogger("learnloop.app")


class AdapterRejectedError(LearnloopError):
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
        canary_share=settings.canary.share,
    )


def make_engine(s: Settings, base_model: str) -> Engine:
    m = s.model
    if m.engine == "openai":
        return OpenAIEngine(
            m.openai_url,
            m.openai_model or m.name,
            api_key=m.openai_api_key,
            max_prompt_tokens=m.max_prompt_tokens,
            max_pending=m.max_pending,
            system_prompt=m.system_prompt,
        )
    if m.engine == "llamacpp":
        from server.llamacpp_engine import LlamaCppEngine

        return LlamaCppEngine(
            m.gguf or str(default_gguf()),
            quant=m.gguf_quant or None,
            base_model_dir=base_model,
            max_prompt_tokens=m.max_prompt_tokens,
            max_new_tokens=m.max_new_tokens,
            max_pending=m.max_pending,
            max_active=m.max_active,
            system_prompt=m.system_prompt,
        )
    return TransformersEngine(
        base_model,
        dtype=m.dtype,
        max_prompt_tokens=m.max_prompt_tokens,
        max_pending=m.max_pending,
        max_active=m.max_active,
        system_prompt=m.system_prompt,
    )


class App:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store: FeedbackStore | None = None
        self.engine: Engine | None = None
        self.cycle: TrainingCycle | None = None
        self.live_version: str = BASE_VERSION
        self.canary_version: str | None = None
        self.port: int | None = None
        self.console_port: int | None = None
        self.channels_port: int | None = None
        self.console: Any = None  # the console's FastAPI app while it serves
        self.presence: Presence | None = None
        self._training: asyncio.Task[CycleResult] | None = None
        self._previous_live: str | None = None
        self._swap_lock = asyncio.Lock()
        m = settings.model
        self.sampling = SamplingConfig(max_new_tokens=m.max_new_tokens, temperature=m.temperature, top_p=m.top_p)

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[App]:
        s = self.settings
        base_model = await asyncio.to_thread(resolve_model, s.model.name)
        self.store = await FeedbackStore.open(s.db_path)
        scheduler = None
        tasks: list[asyncio.Task[None]] = []
        server = None
        console: RunningConsole | None = None
        channels: RunningChannels | None = None
        try:
            self.engine = make_engine(s, base_model)
            await asyncio.to_thread(self.engine.load)
            await self.store.ensure_base_version(base_model)
            try:
                await self.sync_versions()
            except AdapterRejectedError:
                log.exception("the live adapter failed validation; serving the base model")
            self.cycle = TrainingCycle(self.store, cycle_config(s, base_model))
            self.presence = Presence(self.store)
            ctx = GatewayContext(
                store=self.store,
                engine=self.engine,
                assign_version=self.assign_version,
                serving_version=self.serving_version,
                sampling=self.sampling,
                limits=Limits(
                    max_text_chars=s.server.max_text_chars,
                    rate_per_s=s.server.rate_per_s,
                    rate_burst=s.server.rate_burst,
                ),
                token=s.server.token,
                rating_limiter=KeyedRateLimiter(
                    per_minute=s.server.ratings_per_minute, burst=max(1, int(s.server.ratings_per_minute))
                ),
                presence=self.presence,
                sites=self.site,
            )
            server = await start_gateway(
                ctx, host=s.server.host, port=s.server.port, max_frame_bytes=s.server.max_frame_bytes
            )
            self.port = next(iter(server.sockets)).getsockname()[1]
            if s.console.enabled:
                console = await start_console(self, s.console)
                self.console_port = console.port
                self.console = console.app
                log.info("operator console on http://%s:%d", s.console.host, console.port)
            if s.channels.enabled:
                channels = await start_channels(s, gateway_port=self.port)
                self.channels_port = channels.port
            if s.schedule.enabled:
                scheduler = start_scheduler(self.scheduled_cycle, interval_s=s.schedule.interval_s)
            tasks.append(
                asyncio.create_task(self._every(s.schedule.version_poll_s, self.sync_versions), name="versions")
            )
            tasks.append(asyncio.create_task(self._every(s.canary.check_interval_s, self.check_canary), name="canary"))
            log.info(
                "learnloop serving %s (version %s) on ws://%s:%d",
                s.model.name,
                self.live_version,
                s.server.host,
                self.port,
            )
            yield self
        finally:
            for task in tasks:
                task.cancel()
            if console is not None:
                await console.stop()
            if channels is not None:
                await channels.stop()
            if self._training is not None and not self._training.done():
                self._training.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._training
            if scheduler is not None:
                scheduler.shutdown(wait=False)
            if server is not None:
                server.close()
                await server.wait_closed()
            if self.engine is not None:
                await asyncio.to_thread(self.engine.close)
                if isinstance(self.engine, OpenAIEngine):
                    await self.engine.aclose()
            await self.store.close()

    def site(self, name: str) -> SiteConfig | None:
        """The widget site a hello names: ``[sites.NAME]``, or the demo page's while it is served."""
        return find_site(self.settings, name, channels_port=self.channels_port)

    # --- routing: which version writes a reply ------------------------------------------

    def assign_version(self, conversation_id: str) -> str | None:
        """For a new conversation: the canary's name if it falls in the canary's share, else None (live)."""
        if self.canary_version and assign(conversation_id, self.settings.canary.share):
            return self.canary_version
        return None

    def serving_version(self, pinned: str | None) -> str:
        """A conversation pinned to the running canary stays on it; every other follows live."""
        if pinned is not None and pinned == self.canary_version:
            return pinned
        return self.live_version

    # --- training and versions -----------------------------------------------------------

    async def run_training(self, *, force: bool = False) -> CycleResult:
        """Run one cycle now; a version that passes starts serving (as canary or live) at once."""
        assert self.cycle is not None
        result = await self.cycle.run(force=force)
        if result.status in (CycleStatus.PROMOTED, CycleStatus.CANARY):
            await self.sync_versions()
        return result

    def start_training(self, *, force: bool, actor: str) -> bool:
        """Start a cycle in the background (console's "train now"); False while one runs here."""
        if self._training is not None and not self._training.done():
            return False
        log.info("training cycle started by %s", actor)
        self._training = asyncio.create_task(self._logged_cycle(force=force), name="training")
        return True

    async def _logged_cycle(self, *, force: bool) -> CycleResult:
        result = await self.run_training(force=force)
        log.info("training: %s (%s)", result.status, result.reason)
        return result

    def preview(self, snapshot: Any, *, rows: bool) -> dict[str, Any]:
        assert self.cycle is not None
        return prepare(snapshot, self.cycle.config).summary(rows=rows)

    def training_rows(self, snapshot: Any, kind: str) -> list[dict[str, Any]]:
        assert self.cycle is not None
        return [r.to_trl() for r in prepare(snapshot, self.cycle.config).train_rows(kind, heldout_too=True)]

    async def canary_report(self) -> dict[str, Any] | None:
        """The running canary against live since it started, and what the canary rule says now."""
        assert self.store is not None
        canary = await self.store.canary_version()
        if canary is None:
            return None
        live = await self.store.live_version()
        live_stats = await self.store.version_stats(live.name, since=canary.updated_at)
        canary_stats = await self.store.version_stats(canary.name, since=canary.updated_at)
        decision = decide_canary(live_stats, canary_stats, self.settings.canary)
        return {
            "version": canary.name,
            "live": live.name,
            "share": self.settings.canary.share,
            "since": canary.updated_at,
            "live_stats": asdict(live_stats),
            "canary_stats": asdict(canary_stats),
            "decision": {"action": str(decision.action), "reasons": list(decision.reasons)},
        }

    async def scheduled_cycle(self) -> None:
        try:
            result = await self.run_training()
            log.info("scheduled training: %s (%s)", result.status, result.reason)
        except Exception:
            log.exception("scheduled training cycle failed")

    async def _every(self, seconds: float, job: Callable[[], Awaitable[object]]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except Exception:
                log.exception("%s failed", getattr(job, "__name__", "background job"))

    async def check_canary(self) -> CanaryDecision | None:
        """Compare the canary with live on what customers did since it started; act on the verdict."""
        assert self.store is not None
        canary = await self.store.canary_version()
        if canary is None:
            return None
        live = await self.store.live_version()
        since = canary.updated_at
        decision = decide_canary(
            await self.store.version_stats(live.name, since=since),
            await self.store.version_stats(canary.name, since=since),
            self.settings.canary,
        )
        if decision.action is CanaryAction.PROMOTE:
            await self.store.set_version_state(canary.name, VersionState.LIVE, actor="canary", reasons=decision.reasons)
        elif decision.action is CanaryAction.ROLLBACK:
            await self.store.rollback(canary.name, actor="canary", reasons=decision.reasons)
        if decision.action is not CanaryAction.WAIT:
            log.info("canary %s: %s (%s)", canary.name, decision.action, "; ".join(decision.reasons))
            await self.sync_versions()
        return decision

    async def promote(self, name: str, *, actor: str) -> None:
        assert self.store is not None
        await self.store.set_version_state(name, VersionState.LIVE, actor=actor, reasons=[f"promoted by {actor}"])
        await self.sync_versions()

    async def rollback(self, name: str, *, actor: str) -> None:
        assert self.store is not None
        await self.store.rollback(name, actor=actor, reasons=[f"rolled back by {actor}"])
        await self.sync_versions()

    async def sync_live_version(self) -> str:
        await self.sync_versions()
        return self.live_version

    async def sync_versions(self) -> None:
        """Serve what the store says: load the live and canary adapters (validated), route to them.

        A canary whose adapter fails validation is rolled back; a live one raises
        AdapterRejectedError and the version that was serving keeps serving.
        """
        assert self.store is not None and self.engine is not None
        async with self._swap_lock:
            live = await self.store.live_version()
            canary = await self.store.canary_version()
            if canary is not None and not self.engine.has_version(canary.name):
                try:
                    await self._load(canary)
                except AdapterRejectedError as exc:
                    log.error("canary %s refused: %s", canary.name, exc)
                    await self.store.rollback(canary.name, actor="validation", reasons=[f"adapter refused: {exc}"])
                    canary = None
            if live.name != BASE_VERSION and not self.engine.has_version(live.name):
                await self._load(live)  # raises: the old version keeps serving
            old = self.live_version
            self.live_version = live.name
            self.canary_version = canary.name if canary else None
            if old != live.name:
                log.info("new replies now use version %s (was %s)", live.name, old)
                self._previous_live = old
            keep = {BASE_VERSION, live.name, self._previous_live, self.canary_version}
            for name in sorted(self.engine.versions - keep):  # type: ignore[operator]
                await self.engine.unload_adapter(name)

    async def _load(self, version: ModelVersion) -> None:
        assert self.engine is not None
        if not version.adapter_path:
            raise AdapterRejectedError(f"version {version.name} has no adapter path")
        try:
            await asyncio.to_thread(self.engine.validate_adapter, version.adapter_path, version.sha256)
        except AdapterInvalidError as exc:
            raise AdapterRejectedError(f"version {version.name}: {exc}") from exc
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
