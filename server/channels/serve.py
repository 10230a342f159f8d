"""Runs the channels listener: every channel's router in one app, under uvicorn in the app's loop.

The widget is the first channel; the OpenAI-compatible API and IM webhooks join as routers
in ``channel_routers``.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter

from server.channels.http import create_channels_app
from server.channels.widget import demo_enabled, widget_router
from server.listener import RunningListener, serve_app
from server.settings import Settings

log = logging.getLogger("learnloop.channels")


def channel_routers(settings: Settings, *, gateway_port: int) -> list[APIRouter]:
    return [widget_router(gateway_port=gateway_port, demo=demo_enabled(settings))]


async def start_channels(settings: Settings, *, gateway_port: int) -> RunningListener:
    """Serve every channel on ``channels.host:channels.port`` until ``stop()``; a bind error raises here."""
    config = settings.channels
    app = create_channels_app(config, routers=channel_routers(settings, gateway_port=gateway_port))
    running = await serve_app(app, host=config.host, port=config.port, name="channels")
    base = f"http://{config.host}:{running.port}"
    log.info("chat widget on %s/widget.js", base)
    if demo_enabled(settings):
        log.info("widget demo page on %s/", base)
    return running
