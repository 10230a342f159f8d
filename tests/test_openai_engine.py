"""The ``openai`` engine end to end against a real OpenAI-compatible server on loopback.

The server is llama-cpp-python's (``python -m llama_cpp.server``) serving the default
model's GGUF: the same wire format vLLM and SGLang speak. The whole path runs for real:
websocket client -> gateway -> OpenAIEngine -> HTTP/SSE -> llama.cpp -> tokens back.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.app import App
from server.engines import EngineError, OpenAIEngine, trim_messages
from server.settings import load_settings


def test_trim_keeps_system_and_last_turn() -> None:
    msgs = [
        {"role": "system", "content": "s" * 10},
        {"role": "user", "content": "a" * 50},
        {"role": "assistant", "content": "b" * 50},
        {"role": "user", "content": "c" * 30},
    ]
    assert trim_messages(msgs, 1000) == msgs
    assert [m["content"][0] for m in trim_messages(msgs, 100)] == ["s", "b", "c"]
    assert [m["content"][0] for m in trim_messages(msgs, 10)] == ["s", "c"]  # never below the last turn


def test_trim_adds_the_system_prompt_as_the_local_engines_do() -> None:
    chat = [
        {"role": "user", "content": "a" * 50},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    assert trim_messages(chat, 1000, "Be brief.") == [{"role": "system", "content": "Be brief."}, *chat]
    assert [m["content"] for m in trim_messages(chat, 20, "Be brief.")] == ["Be brief.", "b", "c"]
    own = [{"role": "system", "content": "Mine."}, *chat]
    assert trim_messages(own, 1000, "Be brief.") == own  # a chat that has a system prompt keeps its own


try:
    import llama_cpp  # noqa: F401

    HAVE_LLAMA = True
except ImportError:
    HAVE_LLAMA = False

needs_llama = pytest.mark.skipif(
    not HAVE_LLAMA and not os.environ.get("CI"),
    reason="llama-cpp-python[server] is not installed (make install-llamacpp)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from training.models import default_gguf

    assert HAVE_LLAMA, "CI installs llama-cpp-python[server] (make install-llamacpp)"
    port = free_port()
    # llama_cpp.server as is, except that llama.cpp's extra buffer types (AMX tiles) stay off:
    # some VMs advertise AMX but fault on it (see server/engines/gguf.py), and the server
    # has no switch for it
    launcher = (
        "import sys, llama_cpp.llama_cpp as L\n"
        "_defaults = L.llama_model_default_params\n"
        "def _params():\n"
        "    p = _defaults()\n"
        "    p.use_extra_bufts = False\n"
        "    return p\n"
        "L.llama_model_default_params = _params\n"
        "from llama_cpp.server.__main__ import main\n"
        "sys.argv[0] = 'llama_cpp.server'\n"
        "main()\n"
    )
    cmd = [
        sys.executable, "-c", launcher, "--model", str(default_gguf()), "--model_alias", "smollm2",
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "2",
    ]  # fmt: skip
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    log_file = open(log, "wb")  # noqa: SIM115 - a pipe would fill up and stall the server
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"llama_cpp.server did not start: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log_file.close()


@pytest.fixture
async def app(llama_server: str, tmp_path: Path) -> AsyncIterator[App]:
    settings = load_settings(
        env={},
        data_dir=tmp_path / "data",
        overrides={
            "console": {"enabled": False},
            "channels": {"enabled": False},
            "server": {"port": 0},
            "model": {
                "engine": "openai",
                "openai_url": llama_server,
                "openai_model": "smollm2",
                "max_new_tokens": 24,
                "temperature": 0.0,
            },
            "schedule": {"enabled": False},
        },
    )
    a = App(settings)
    async with a.lifespan():
        yield a


@needs_llama
async def test_chat_rate_and_stop_through_an_openai_compatible_server(app: App, open_client: Any) -> None:
    client = await open_client(app.port)
    ready = await client.hello(user="u1")
    assert ready["model_version"] == "base"
    done, text = await client.chat("What is the capital of France?", "m1")
    assert done["model_version"] == "base" and done["finish_reason"] in ("stop", "length")
    assert text.strip() and done["usage"]["completion_tokens"] > 0
    await client.send(type="rating", message_id=done["message_id"], value=1, id="r1")
    ack, _ = await client.until("ack")
    assert ack["id"] == "r1"
    assert app.store is not None
    stored = await app.store.conversations.get_message(done["message_id"])
    assert stored.text == text and stored.model_version == "base"
    # stop: the reply ends as cancelled at the next chunk, and the connection keeps working
    await client.send(type="message", text="Write a very long story about a dragon.", client_id="m2")
    await client.until("token")
    await client.send(type="stop")
    stopped, _ = await client.until("done")
    assert stopped["finish_reason"] == "cancelled"
    again, _ = await client.chat("Thanks!", "m3")
    assert again["finish_reason"] in ("stop", "length")


@needs_llama
async def test_a_server_without_runtime_lora_says_so(app: App, tmp_path: Path) -> None:
    assert isinstance(app.engine, OpenAIEngine)
    with pytest.raises(EngineError, match="runtime LoRA"):
        await app.engine.load_adapter("v1", str(tmp_path))
    assert app.engine.versions == {"base"}
    await asyncio.sleep(0)
