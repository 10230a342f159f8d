"""Composition root: opens the store and the engine, starts the listeners and the background jobs.

Everything with a life cycle is opened and closed in ``App.lifespan``; the behaviour lives
in the parts it wires: ``server.release`` (which versions serve), ``server.trainer``
(training cycles), ``server.gateway`` (chat clients), ``server.presence`` (takeovers),
``server.console`` (operators), ``server.channels`` (the widget and IM channels).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI

from feedback import FeedbackStore
from server.channels.identity import origin_allowed
from server.channels.openai_api import OpenAIChannel
from server.channels.serve import ImChannels, start_channels
from server.channels.widget import demo_enabled, demo_site, find_site
from server.console.api import start_console
from server.engines import Engine, SamplingConfig, create_engine
from server.gateway import GatewayContext, SocketLimits, drain, start_gateway
from server.limiters import PRUNE_EVERY_S, rate_limiter
from server.listener import RunningListener
from server.metrics import MeteredEngine, Metrics, freeze_startup_heap
from server.presence import Presence
from server.protocol import Limits
from server.release import AdapterRejectedError, Release
from server.settings import Settings, SiteConfig
from server.trainer import Trainer, cycle_config
from training.models import resolve_model
from training.schedule import start_scheduler

__all__ = ["AdapterRejectedError", "App", "serve_forever"]

log = logging.getLogger("learnloop.app")


class App:
    """The running server's parts; they exist between entering and leaving ``lifespan``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store: FeedbackStore | None = None
        self.engine: Engine | None = None
        self.release: Release | None = None
        self.trainer: Trainer | None = None
        self.presence: Presence | None = None
        self.port: int | None = None
        self.console_port: int | None = None
        self.channels_port: int | None = None
        self.metrics = Metrics()  # this process's Prometheus metrics (the console serves /metrics)
        self.im: ImChannels | None = None  # the IM channels (Telegram, Slack, webhooks) while they run
        self.console: FastAPI | None = None  # the console's app while it serves
        self.gateway: GatewayContext | None = None  # the websocket gateway's state while it serves
        m = settings.model
        self.sampling = SamplingConfig(max_new_tokens=m.max_new_tokens, temperature=m.temperature, top_p=m.top_p)

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[App]:
        s = self.settings
        # the store first: an unwritable data folder or a store without WAL refuses before the model loads
        self.store = store = await FeedbackStore.open(s.store_target, tombstone_path=s.tombstone_path)
        scheduler = None
        tasks: list[asyncio.Task[None]] = []
        server = None
        console: RunningListener | None = None
        channels: RunningListener | None = None
        im: ImChannels | None = None
        try:
            base_model = await asyncio.to_thread(resolve_model, s.model.name)
            self.engine = engine = create_engine(s.model, base_model)
            await asyncio.to_thread(engine.load)
            await store.versions.ensure_base(base_model)
            self.release = release = Release(store, engine, s.canary, on_refused=self.metrics.adapter_refused)
            try:
                await release.sync()
            except AdapterRejectedError:  # the alert (one error line, the metric) is out: say what serves
                log.warning("the live version was refused; serving %s until a valid one is live", release.live_version)
            self.trainer = trainer = Trainer(store, cycle_config(s, base_model), release)
            self.presence = presence = Presence(store)
            await presence.start()  # the takeovers in force; on PostgreSQL, the other processes' notices
            # per rater over every channel, and on PostgreSQL over every process (server/limiters.py)
            rating_limiter = rate_limiter(store, "ratings", s.server.ratings_per_minute)
            served = MeteredEngine(engine, self.metrics)  # what the channels stream from: measured
            ctx = GatewayContext(
                store=store,
                engine=served,
                assign_version=release.assign_version,
                serving_version=release.serving_version,
                sampling=self.sampling,
                limits=Limits(
                    max_text_chars=s.server.max_text_chars,
                    rate_per_s=s.server.rate_per_s,
                    rate_burst=s.server.rate_burst,
                ),
                token=s.server.token,
                rating_limiter=rating_limiter,
                presence=presence,
                sites=self.site,
                metrics=self.metrics,
                origin_allowed=self.origin_allowed,
                site_origin=self.site_origin,
                max_connections_per_user=s.server.max_connections_per_user,
                idle_timeout_s=s.server.idle_timeout_s,
                send_timeout_s=s.server.send_timeout_s,
                implicit=s.implicit,
            )
            self.gateway = ctx
            server = await start_gateway(
                ctx,
                host=s.server.host,
                port=s.server.port,
                limits=SocketLimits(
                    max_frame_bytes=s.server.max_frame_bytes,
                    open_timeout_s=s.server.open_timeout_s,
                    max_connections_per_address=s.server.max_connections_per_address,
                    trusted_proxies=s.server.trusted_proxies,
                    write_limit_bytes=s.server.write_limit_bytes,
                    compression=s.server.compression,
                    ping_interval_s=s.server.ping_interval_s,
                    ping_timeout_s=s.server.ping_timeout_s,
                ),
            )
            self.port = next(iter(server.sockets)).getsockname()[1]
            if s.console.enabled:
                console = await start_console(
                    s.console,
                    store=store,
                    presence=presence,
                    release=release,
                    trainer=trainer,
                    metrics=self.metrics,
                    implicit=s.implicit,
                )
                self.console_port = console.port
                self.console = console.app
                log.info("operator console on http://%s:%d", s.console.host, console.port)
            if not s.channels.enabled and ImChannels.configured(s):
                log.warning("IM channels are configured but channels.enabled is false: their webhooks are not served")
            if s.channels.enabled:
                if ImChannels.configured(s):
                    self.im = im = ImChannels(
                        s,
                        store,
                        served,
                        sampling=self.sampling,
                        assign_version=release.assign_version,
                        serving_version=release.serving_version,
                        rating_limiter=rating_limiter,  # thumbs from every channel share the per-rater limit
                    )
                    im.start()
                openai = OpenAIChannel(
                    s,
                    store,
                    served,
                    sampling=self.sampling,
                    versions=lambda: (release.live_version, release.canary_version),
                    rating_limiter=rating_limiter,
                )
                channels = await start_channels(s, gateway_port=self.port, im=im, openai=openai)
                self.channels_port = channels.port
            if s.schedule.enabled:
                scheduler = start_scheduler(trainer.scheduled, interval_s=s.schedule.interval_s)
            tasks.append(asyncio.create_task(self.metrics.watch_event_loop(), name="event-loop-lag"))
            tasks.append(asyncio.create_task(_every(s.schedule.version_poll_s, release.sync), name="versions"))
            tasks.append(asyncio.create_task(_every(s.canary.check_interval_s, release.check_canary), name="canary"))
            if store.limits.shared:  # a bucket names its rater: deleted once refilled (at most PRUNE_EVERY_S later)
                tasks.append(asyncio.create_task(_every(PRUNE_EVERY_S, store.limits.prune), name="rate-buckets"))
            log.info(
                "learnloop serving %s (version %s) on ws://%s:%d",
                s.model.name,
                release.live_version,
                s.server.host,
                self.port,
            )
            yield self
        finally:
            if server is not None:  # first, while the engine and the store still work
                await drain(ctx, server, drain_s=s.server.drain_s)
            for task in tasks:
                task.cancel()
            if channels is not None:
                await channels.stop()
            if im is not None:
                await im.stop()  # events and calls still pending are taken up at the next start
            if console is not None:
                await console.stop()
            if self.trainer is not None:
                await self.trainer.aclose()
            if scheduler is not None:
                scheduler.shutdown(wait=False)
            if self.presence is not None:
                await self.presence.close()
            if self.engine is not None:
                await asyncio.to_thread(self.engine.close)
                await self.engine.aclose()
            await store.close()

    def origin_allowed(self, origin: str | None) -> bool:
        """May a websocket handshake with this ``Origin`` header go on (else HTTP 403)?

        One list for the whole gateway: ``server.allowed_origins``, every ``[sites.NAME]``'s
        origins and the demo page's while it is served. ``Origin: null`` (sandboxed frames, files)
        never is. No header at all is a non-browser client: allowed unless ``server.require_origin``.
        """
        s = self.settings
        if origin is None:
            return not s.server.require_origin
        allowed = set(s.server.allowed_origins)
        for site in s.sites.values():
            allowed.update(site.origins)
        if self.channels_port is not None and demo_enabled(s):
            allowed.update(demo_site(self.channels_port).origins)
        return origin_allowed(allowed, origin)

    def site_origin(self, origin: str | None) -> bool:
        """Is ``origin`` a page of a configured widget site? Only such a page may open the websocket
        without ``server.token`` (a public page cannot keep it secret); its hello must name the site."""
        return origin_allowed({o for site in self.settings.sites.values() for o in site.origins}, origin)

    def site(self, name: str) -> SiteConfig | None:
        """The widget site a hello names: ``[sites.NAME]``, or the demo page's while it is served."""
        return find_site(self.settings, name, channels_port=self.channels_port)


async def _every(seconds: float, job: Callable[[], Awaitable[object]]) -> None:
    """Run ``job`` every ``seconds``; a failure is logged and the next round comes anyway."""
    while True:
        await asyncio.sleep(seconds)
        try:
            await job()
        except Exception:
            log.exception("%s failed", getattr(job, "__name__", "background job"))


async def serve_forever(settings: Settings) -> None:
    app = App(settings)
    async with app.lifespan():
        # the process serves until it exits: its start-up heap need never be scanned again
        log.info("%d start-up objects moved out of the garbage collector's scans", freeze_startup_heap())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        with app.metrics.watch_gc():
            await stop.wait()
        log.info("shutting down")
