"""Runs the channels listener: every channel's router in one app, under uvicorn in the app's loop.

The widget is the first channel; the OpenAI-compatible API and IM webhooks join as routers
in ``channel_routers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn
from fastapi import APIRouter, FastAPI

from server.channels.http import create_channels_app
from server.channels.widget import demo_enabled, widget_router
from server.settings import ChannelsConfig, Settings

log = logging.getLogger("learnloop.channels")


def channel_routers(settings: Settings, *, gateway_port: int) -> list[APIRouter]:
    return [widget_router(gateway_port=gateway_port, demo=demo_enabled(settings))]


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the app's event loop: the app owns the signals, not uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class RunningChannels:
    app: FastAPI
    server: _EmbeddedServer
    task: asyncio.Task[None]
    port: int

    async def stop(self) -> None:
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def start_channels(settings: Settings, *, gateway_port: int) -> RunningChannels:
    """Serve every channel on ``channels.host:channels.port`` until ``stop()``; a bind error raises here."""
    config = settings.channels
    app = create_channels_app(config, routers=channel_routers(settings, gateway_port=gateway_port))
    running = await serve_app(app, config)
    base = f"http://{config.host}:{running.port}"
    log.info("chat widget on %s/widget.js", base)
    if demo_enabled(settings):
        log.info("widget demo page on %s/", base)
    return running


async def serve_app(app: FastAPI, config: ChannelsConfig) -> RunningChannels:
    """Serve ``app`` on ``config.host:config.port`` in this event loop."""
    sock = socket.create_server((config.host, config.port), reuse_port=False)
    # asyncio sets TCP_NODELAY only on sockets it creates; without it small responses wait
    # for the client's delayed ACK (Nagle), about 40 ms
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    server = _EmbeddedServer(
        uvicorn.Config(app, host=config.host, port=config.port, log_level="warning", lifespan="off", access_log=False)
    )
    task = asyncio.create_task(server.serve(sockets=[sock]), name="channels")
    while not server.started:
        if task.done():
            sock.close()
            raise RuntimeError(f"the channels listener could not start on {config.host}:{config.port}")
        await asyncio.sleep(0.01)
    return RunningChannels(app, server, task, int(sock.getsockname()[1]))
