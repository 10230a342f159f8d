"""The README's client example works as written (only the port differs: the server is on port 0)."""

from __future__ import annotations

import asyncio
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
