"""``learnloop serve`` as a real subprocess on free ports, for the signal tests and bench/load.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).parent.parent
_SERVING = re.compile(r"learnloop serving .* on ws://[^:]+:(\d+)")


class ServeProcess:
    """Start ``python -m server.cli --data-dir DIR serve --model MODEL --port 0``; learn the port from its log."""

    def __init__(self, data_dir: Path, model: Path, env: Mapping[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.log: list[str] = []
        full_env = {
            **os.environ,
            "LEARNLOOP_CONSOLE_PORT": "0",
            "LEARNLOOP_CHANNELS_PORT": "0",
            "LEARNLOOP_SCHEDULE_ENABLED": "false",
            **(env or {}),
        }
        full_env.pop("LEARNLOOP_CONFIG", None)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "--data-dir", str(data_dir), "serve", "--model", str(model)]
            + ["--port", "0"],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
            env=full_env,
        )
        self._port: int | None = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.rstrip("\n"))
            match = _SERVING.search(line)
            if match and self._port is None:
                self._port = int(match.group(1))
                self._ready.set()
        self._ready.set()  # the process ended

    def port(self, timeout: float = 120) -> int:
        """The gateway's port once it serves (seconds since start in ``ready_s``)."""
        self._ready.wait(timeout)
        if self._port is None:
            raise AssertionError("learnloop serve did not start:\n" + "\n".join(self.log[-30:]))
        self.ready_s = time.monotonic() - self.started
        return self._port

    @property
    def db_path(self) -> Path:
        return self.data_dir / "learnloop.db"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(5)
