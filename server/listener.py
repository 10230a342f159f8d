"""An HTTP listener inside the app's event loop: uvicorn serving one FastAPI app on a socket we bind.

The console and the channels listener both run this way. The app owns the signals (not
uvicorn), the socket is bound before serving starts (a bind error raises at once, port 0
picks a free port), and TCP_NODELAY is set (asyncio sets it only on sockets it creates;
without it every small response waits for the client's delayed ACK, about 40 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class RunningListener:
    app: FastAPI
    server: uvicorn.Server
    task: asyncio.Task[None]
    port: int

    async def stop(self) -> None:
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def serve_app(app: FastAPI, *, host: str, port: int, name: str) -> RunningListener:
    """Serve ``app`` on ``host:port`` in this event loop until ``stop()``."""
    sock = socket.create_server((host, port), reuse_port=False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    server = _EmbeddedServer(
        uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off", access_log=False)
    )
    task = asyncio.create_task(server.serve(sockets=[sock]), name=name)
    while not server.started:
        if task.done():
            sock.close()
            raise RuntimeError(f"the {name} listener could not start on {host}:{port}")
        await asyncio.sleep(0.01)
    return RunningListener(app, server, task, int(sock.getsockname()[1]))
