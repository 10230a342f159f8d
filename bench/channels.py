"""Channels benchmark: time to first token through each channel against the raw websocket protocol.

    python bench/channels.py [--rounds 40] [--warmup 5] [--model PATH_OR_NAME] [--max-new-tokens 8]
                             [--torch-threads 1]

One App (ports 0), one conversation turn per request, one request in flight at a time. Each round
sends the same new question through three channels, in a rotating order (so the machine's drift
and any order effect hit every channel alike):

  * ``raw``: the websocket protocol (``hello`` without a site, then ``message``): from sending
    the ``message`` frame to the first ``token`` frame;
  * ``widget``: the gateway as the widget uses it: ``hello {site: "demo"}`` from the demo page's
    origin (the listener's loopback origin), then ``message``; timed the same way;
  * ``openai``: ``POST /v1/chat/completions`` with ``stream: true`` and a Bearer key over a
    kept-alive HTTP connection: from sending the request to the first SSE chunk with text
    (read with httpx, so that no client library's parsing is counted).

Every request is read to the end of its reply, so the next one finds the engine idle. Each
websocket request uses a fresh connection and conversation, opened (and admitted) before
the clock starts, as a page opens its widget before the customer types; the OpenAI request opens
its conversation itself, inside the timed span (that lookup and those writes are the API's cost).

Without ``--model`` the model is the tiny random Llama of the tests (built into a temporary
folder): its first token comes in a few ms, so the channels' own costs are not lost in the
model's. ``--model smollm2-135m-instruct`` uses the default model (``training.models.resolve_model``,
as ``bench/serve.py``). Prints medians and p95 per channel, the overhead of each channel against
raw in ms (the median and p95 of the per-round differences, and the difference of medians) and
the ratio of medians; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
from websockets.asyncio.client import connect

from server.app import App
from server.settings import load_settings

QUESTIONS = [
    "Where is my order?",
    "What is your refund policy?",
    "How long does shipping take?",
    "How do I reset my password?",
    "What are your support hours?",
    "Can I change my delivery address?",
    "Do you ship to Canada?",
    "Is there a warranty?",
]
CHANNELS = ("raw", "widget", "openai")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def ws_ttft(port: int, text: str, *, site: str | None, origin: str | None) -> float | None:
    """Seconds from sending ``message`` to its first token (None: the reply had no text)."""
    async with connect(f"ws://127.0.0.1:{port}", origin=origin) as ws:  # type: ignore[arg-type]
        await ws.send(json.dumps({"type": "hello", **({"site": site} if site else {})}))
        while json.loads(await ws.recv())["type"] != "ready":
            pass
        started = time.perf_counter()
        first: float | None = None
        await ws.send(json.dumps({"type": "message", "text": text, "client_id": "c1"}))
        while True:  # to the end of the reply, as the OpenAI request: the next request finds the engine idle
            frame = json.loads(await ws.recv())
            if frame["type"] == "token" and frame["delta"] and first is None:
                first = time.perf_counter() - started
            if frame["type"] == "done":
                return first
            if frame["type"] == "error":
                raise RuntimeError(f"the gateway refused: {frame}")


async def openai_ttft(http: httpx.AsyncClient, model: str, text: str, user: str) -> float | None:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "stream": True, "user": user}
    started = time.perf_counter()
    elapsed = None
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"the API refused: {response.status_code} {await response.aread()!r}")
        async for line in response.aiter_lines():  # read to the end: the next request reuses the connection
            if elapsed is not None or not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                elapsed = time.perf_counter() - started
    return elapsed


async def run(args: argparse.Namespace, data_dir: Path, model: str) -> dict[str, Any]:
    settings = load_settings(
        env={},
        data_dir=data_dir,
        overrides={
            "server": {"port": 0},
            "console": {"enabled": False},
            "channels": {"port": 0, "requests_per_minute": 0, "openai_requests_per_minute": 0},
            "model": {"name": model, "max_new_tokens": args.max_new_tokens, "temperature": 0.0, "dtype": "float32"},
            "schedule": {"enabled": False},
        },
    )
    app = App(settings)
    async with app.lifespan():
        assert app.store is not None and app.release is not None and app.port is not None
        key = await app.store.api_keys.create("bench", actor="bench")
        origin = f"http://127.0.0.1:{app.channels_port}"  # the demo page's own origin: site "demo" admits it
        live = app.release.live_version
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=origin, headers=headers, timeout=120) as http:

            async def one(channel: str, text: str, i: int) -> float | None:
                if channel == "raw":
                    return await ws_ttft(app.port or 0, text, site=None, origin=None)
                if channel == "widget":
                    return await ws_ttft(app.port or 0, text, site="demo", origin=origin)
                return await openai_ttft(http, live, text, user=f"u{i}")

            ttft: dict[str, list[float]] = {c: [] for c in CHANNELS}
            paired: dict[str, list[float]] = {c: [] for c in CHANNELS if c != "raw"}
            empty = 0
            for i in range(args.warmup + args.rounds):
                text = f"{QUESTIONS[i % len(QUESTIONS)]} (#{i})"
                order = CHANNELS[i % 3 :] + CHANNELS[: i % 3]
                got = {c: await one(c, text, i) for c in order}
                if i < args.warmup:
                    continue
                if any(v is None for v in got.values()):
                    empty += 1  # a reply without text has no first token: the round is left out
                    continue
                for c in CHANNELS:
                    ttft[c].append(got[c] or 0.0)
                for c in paired:
                    paired[c].append((got[c] or 0.0) - (got["raw"] or 0.0))
    ms = 1000.0
    result: dict[str, Any] = {
        "model": model,
        "rounds": len(ttft["raw"]),
        "rounds_without_text": empty,
        "torch_threads": args.torch_threads,
    }
    for c in CHANNELS:
        result[f"{c}_ttft_p50_ms"] = round(statistics.median(ttft[c]) * ms, 2)
        result[f"{c}_ttft_p95_ms"] = round(pct(ttft[c], 0.95) * ms, 2)
    for c in paired:
        result[f"{c}_overhead_ms"] = round(statistics.median(paired[c]) * ms, 2)  # median of per-round differences
        result[f"{c}_overhead_p95_ms"] = round(pct(paired[c], 0.95) * ms, 2)  # p95 of per-round differences
        result[f"{c}_overhead_of_medians_ms"] = round((result[f"{c}_ttft_p50_ms"] - result["raw_ttft_p50_ms"]), 2)
        result[f"{c}_ratio_to_raw"] = round(result[f"{c}_ttft_p50_ms"] / result["raw_ttft_p50_ms"], 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--model", default=None, help="a model name or folder (default: the tests' tiny random Llama)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch's intra-op threads (0: torch's default). On a shared machine a pool of spinning threads "
        "stalls for a scheduler quantum now and then (first tokens of 3 ms or 300 ms at random); one thread "
        "keeps the model's time steady, and every channel shares the engine",
    )
    args = parser.parse_args()
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from tests.factories import build_tiny_model

            model = str(build_tiny_model(Path(tmp) / "tiny-llama"))
        result = asyncio.run(run(args, Path(tmp) / "data", model))
    print(f"model {result['model']}, {result['rounds']} rounds ({result['rounds_without_text']} without text left out)")
    print(f"{'channel':<8}{'TTFT p50 ms':>14}{'p95 ms':>10}{'overhead p50 ms':>17}{'p95 ms':>10}{'ratio':>8}")
    for c in CHANNELS:
        over = "" if c == "raw" else f"{result[f'{c}_overhead_ms']:+.2f}"
        over95 = "" if c == "raw" else f"{result[f'{c}_overhead_p95_ms']:+.2f}"
        ratio = "1.000" if c == "raw" else f"{result[f'{c}_ratio_to_raw']:.3f}"
        p50, p95 = result[f"{c}_ttft_p50_ms"], result[f"{c}_ttft_p95_ms"]
        print(f"{c:<8}{p50:>14.2f}{p95:>10.2f}{over:>17}{over95:>10}{ratio:>8}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
