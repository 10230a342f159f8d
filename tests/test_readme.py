"""The README's client example works as written (only the port differs: the server is on port 0)."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

from server.app import App
from server.settings import load_settings

README = Path(__file__).resolve().parent.parent / "README.md"


async def test_readme_client_example_runs(tiny_model: Path, tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    example = next(b for b in blocks if "websockets.asyncio.client" in b)
    assert 'connect("ws://127.0.0.1:8765")' in example  # the default port of `make serve`
    settings = load_settings(
        env={},
        data_dir=tmp_path,
        overrides={
            "console": {"port": 0},
            "channels": {"port": 0},
            "server": {"port": 0},
            "model": {"name": str(tiny_model), "max_new_tokens": 8, "dtype": "float32"},
            "schedule": {"enabled": False},
        },
    )
    app = App(settings)
    async with app.lifespan():
        script = tmp_path / "client.py"
        script.write_text(example.replace("8765", str(app.port)))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(script), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    lines = out.decode()
    assert "'type': 'ready'" in lines and "'type': 'done'" in lines and "{'type': 'ack', 'id': 'r1'}" in lines


async def test_readme_bot_client_examples_run(tiny_model: Path, tmp_path: Path) -> None:
    """The console bridge chats and rates from stdin; the asyncio example regenerates and gets a typed error."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    bridge = next(b for b in blocks if "ChatClient(" in b)
    example = next(b for b in blocks if "server.client import ChatError, connect" in b)
    settings = load_settings(
        env={},
        data_dir=tmp_path,
        overrides={
            "console": {"enabled": False},
            "server": {"port": 0},
            "model": {"name": str(tiny_model), "max_new_tokens": 8, "dtype": "float32"},
            "schedule": {"enabled": False},
        },
    )
    app = App(settings)
    async with app.lifespan():
        assert app.store is not None
        outputs = []
        for name, code, stdin in (
            ("bridge.py", bridge, b"Where is my order?\n+\nthanks\n-\n"),
            ("bot.py", example, b""),
        ):
            assert 'ws://127.0.0.1:8765"' in code
            script = tmp_path / name
            script.write_text(code.replace("8765", str(app.port)))
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(script),
                cwd=README.parent,  # the client is imported from this checkout, as a bot beside it would
                env={**os.environ, "PYTHONPATH": str(README.parent)},
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
            assert proc.returncode == 0, err.decode()
            outputs.append(out.decode())
        ratings = (await app.store.conversations.export_feedback()).ratings
    bridge_out, example_out = outputs
    assert "conversation " in bridge_out and "rated +" in bridge_out and "rated -" in bridge_out
    assert bridge_out.count("[length, base]") + bridge_out.count("[stop, base]") == 2
    assert sorted((r.rater, r.value) for r in ratings) == [("alice", 1), ("console", -1), ("console", 1)]
    assert example_out.startswith("not_found ")
