"""The README's OpenAI-compatible API section works as written: its `learnloop apikey create` command
makes the key, and its `openai` snippet runs unchanged (only the port: the listener is on port 0)
against a real App, storing a reply, a regeneration and a thumb."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import shlex
import sys
from pathlib import Path

from feedback import FeedbackStore
from server.app import App
from server.cli import main as cli_main
from server.settings import load_settings

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = README.read_text().split("## OpenAI-compatible API", 1)[1].split("\n## ", 1)[0]


def block(language: str) -> str:
    [found] = re.findall(rf"```{language}\n(.*?)```", SECTION, re.S)
    return str(found)


async def test_readme_openai_snippet_runs_as_written(tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    [command] = block("sh").strip().splitlines()
    argv = shlex.split(command)
    assert argv[0] == "learnloop"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert await asyncio.to_thread(cli_main, ["--data-dir", str(data), *argv[1:]]) == 0
    key = out.getvalue().strip()

    snippet = block("python")
    assert 'base_url="http://127.0.0.1:8767/v1"' in snippet  # the listener's default port
    settings = load_settings(
        env={},
        data_dir=data,
        overrides={
            "console": {"enabled": False},
            "channels": {"port": 0},
            "server": {"port": 0},
            "model": {"name": str(tiny_model), "max_new_tokens": 8, "dtype": "float32"},
            "schedule": {"enabled": False},
        },
    )
    app = App(settings)
    async with app.lifespan():
        script = tmp_path / "snippet.py"
        script.write_text(snippet.replace("8767", str(app.channels_port)))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            env={**os.environ, "LEARNLOOP_API_KEY": key},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, stderr.decode()
    assert "'object': 'feedback'" in stdout.decode() and "'value': -1" in stdout.decode()

    async with await FeedbackStore.open(settings.db_path) as store:
        snapshot = await store.conversations.export_feedback()
    [rating] = snapshot.ratings
    assert (rating.value, rating.reason, rating.rater) == (-1, "incorrect", "openai:shop:customer-42")
    replies = [m for m in snapshot.messages if m.role == "assistant"]
    assert len(replies) == 2 and replies[1].regenerated_from == replies[0].id == rating.message_id
    assert {c.site for c in snapshot.conversations} == {"shop"}
