"""Runs the channels listener: every channel's router in one app, under uvicorn in the app's loop.

The widget is the first channel; the IM channels (``ImChannels``: Telegram, Slack, signed
webhooks) add their routers and run their inbox and outbox workers beside it; the
OpenAI-compatible API (``OpenAIChannel``) is one more router, under ``/v1``, whose errors also
carry OpenAI's ``type``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
from fastapi import APIRouter

from feedback import FeedbackStore
from server.channels.http import create_channels_app
from server.channels.im import Channel, Inbound, Platform, inbox_item
from server.channels.inbox import InboxWorker
from server.channels.openai_api import OpenAIChannel, openai_error_type
from server.channels.outbox import OutboxWorker
from server.channels.slack import SlackPlatform, slack_router
from server.channels.telegram import TelegramPlatform, telegram_router
from server.channels.webhooks import WebhookPlatform, webhook_router
from server.channels.widget import demo_enabled, widget_router
from server.engines import Engine, SamplingConfig
from server.limiters import RateLimiter
from server.listener import RunningListener, serve_app
from server.settings import Settings

log = logging.getLogger("learnloop.channels")

HOUSEKEEPING_S = 3600.0


class ImChannels:
    """The configured IM bots, apps and senders: their routers, the inbox and outbox workers."""

    def __init__(
        self,
        settings: Settings,
        store: FeedbackStore,
        engine: Engine,
        *,
        sampling: SamplingConfig,
        assign_version: Callable[[str], str | None],
        serving_version: Callable[[str | None], str],
        rating_limiter: RateLimiter,
    ) -> None:
        self.settings = settings
        self.store = store
        self.client = httpx.AsyncClient(timeout=settings.outbox.timeout_s, follow_redirects=False)
        platforms: dict[tuple[str, str], Platform] = {}
        for name, telegram in settings.telegram.items():
            platforms[(Channel.TELEGRAM, name)] = TelegramPlatform(name, telegram, self.client)
        for name, slack in settings.slack.items():
            platforms[(Channel.SLACK, name)] = SlackPlatform(name, slack, self.client)
        for name, webhook in settings.webhooks.items():
            platforms[(Channel.WEBHOOK, name)] = WebhookPlatform(name, webhook, self.client)
        self.platforms = platforms
        self.outbox = OutboxWorker(store, platforms, settings.outbox)
        self.inbox = InboxWorker(
            store,
            engine,
            platforms,
            settings.outbox,
            sampling=sampling,
            assign_version=assign_version,
            serving_version=serving_version,
            rating_limiter=rating_limiter,
            max_text_chars=settings.server.max_text_chars,
            queued=self.outbox.wake,
            implicit=settings.implicit,
        )
        self._housekeeping: asyncio.Task[None] | None = None

    @staticmethod
    def configured(settings: Settings) -> bool:
        return bool(settings.telegram or settings.slack or settings.webhooks)

    async def receive(self, channel: Channel, site: str, event: Inbound) -> bool:
        """Store an event before its request is answered; False for a redelivery (nothing to do)."""
        new = await self.store.inbox.receive(inbox_item(channel, site, event))
        if new:
            self.inbox.wake()
        return new

    def routers(self) -> list[APIRouter]:
        s = self.settings
        routers = []
        if s.telegram:
            routers.append(telegram_router(s.telegram, receive=self.receive))
        if s.slack:
            routers.append(slack_router(s.slack, receive=self.receive))
        if s.webhooks:
            routers.append(webhook_router(s.webhooks, receive=self.receive, max_text_chars=s.server.max_text_chars))
        return routers

    def start(self) -> None:
        """Start answering: events and calls left pending by the last run are taken up first."""
        self.inbox.start()
        self.outbox.start()
        self._housekeeping = asyncio.create_task(self._housekeep(), name="im-housekeeping")

    async def stop(self) -> None:
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
        await self.inbox.stop()
        await self.outbox.stop()
        await self.client.aclose()

    async def _housekeep(self) -> None:
        """Forget processed event keys and delivered calls once redeliveries are over."""
        while True:
            before = time.time() - self.settings.outbox.dedupe_window_s
            try:
                await self.store.inbox.prune(finished_before=before)
                await self.store.outbox.prune(delivered_before=before)
            except Exception:
                log.exception("pruning the inbox and outbox failed")
            await asyncio.sleep(HOUSEKEEPING_S)


def channel_routers(
    settings: Settings, *, gateway_port: int, im: ImChannels | None = None, openai: OpenAIChannel | None = None
) -> list[APIRouter]:
    routers = [widget_router(gateway_port=gateway_port, demo=demo_enabled(settings))]
    if openai is not None:
        routers.append(openai.router())
    return routers + (im.routers() if im is not None else [])


def _openai_fields(code: str) -> dict[str, Any]:
    return {"type": openai_error_type(code), "param": None}


async def start_channels(
    settings: Settings, *, gateway_port: int, im: ImChannels | None = None, openai: OpenAIChannel | None = None
) -> RunningListener:
    """Serve every channel on ``channels.host:channels.port`` until ``stop()``; a bind error raises here."""
    config = settings.channels
    app = create_channels_app(
        config,
        routers=channel_routers(settings, gateway_port=gateway_port, im=im, openai=openai),
        error_fields={"/v1/": _openai_fields},
    )
    running = await serve_app(app, host=config.host, port=config.port, name="channels")
    base = f"http://{config.host}:{running.port}"
    log.info("chat widget on %s/widget.js", base)
    if demo_enabled(settings):
        log.info("widget demo page on %s/", base)
    if openai is not None:
        log.info("OpenAI-compatible API on %s/v1", base)
    for name in settings.telegram:
        log.info("Telegram bot %s: webhook %s/hooks/telegram/%s", name, base, name)
    for name in settings.slack:
        log.info("Slack app %s: %s/hooks/slack/%s/events and /interactivity", name, base, name)
    for name in settings.webhooks:
        log.info("webhook sender %s: %s/hooks/webhook/%s", name, base, name)
    return running
