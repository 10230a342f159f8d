"""The channels listener over real HTTP on loopback: widget.js, the demo page, one error envelope."""

from __future__ import annotations

import gzip
import logging
import re
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Request
from pydantic import BaseModel

from server.channels.http import create_channels_app
from server.channels.identity import user_hash
from server.channels.serve import start_channels
from server.channels.widget import STATIC, widget_router
from server.listener import RunningListener, serve_app
from server.settings import ChannelsConfig, load_settings

README = Path(__file__).resolve().parent.parent / "README.md"
GATEWAY_PORT = 8765  # what the demo page names; nothing listens there in these tests


class Order(BaseModel):
    item: str
    count: int


def probe_router() -> APIRouter:
    """A channel as later ones will be: a router with a JSON body, a streamed body and a bug."""
    router = APIRouter()

    @router.post("/probe/order")
    async def order(body: Order) -> dict[str, Any]:
        return {"ok": body.count}

    @router.post("/probe/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    @router.get("/probe/bug")
    async def bug() -> None:
        raise RuntimeError("secret detail that must stay in the log")

    return router


@pytest.fixture
async def listener() -> AsyncIterator[tuple[RunningListener, httpx.AsyncClient]]:
    config = ChannelsConfig(port=0, max_body_bytes=1000, requests_per_minute=0)
    app = create_channels_app(config, routers=[widget_router(gateway_port=GATEWAY_PORT, demo=True), probe_router()])
    running = await serve_app(app, host=config.host, port=config.port, name="channels")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.port}") as client:
        yield running, client
    await running.stop()


def envelope(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    return str(body["error"]["message"])


async def test_widget_js_has_a_strong_etag_and_revalidates(listener: Any) -> None:
    _, client = listener
    source = (STATIC / "widget.js").read_bytes()
    plain = await client.get("/widget.js", headers={"Accept-Encoding": "identity"})
    assert plain.status_code == 200 and plain.content == source
    assert plain.headers["content-type"].startswith("text/javascript")
    assert plain.headers["cache-control"] == "public, max-age=600"
    assert plain.headers["cross-origin-resource-policy"] == "cross-origin"
    etag = plain.headers["etag"]
    assert re.fullmatch(r'"[0-9a-f]{20}"', etag)
    again = await client.get("/widget.js", headers={"Accept-Encoding": "identity", "If-None-Match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag

    zipped = await client.get("/widget.js", headers={"Accept-Encoding": "gzip"})
    assert zipped.headers["content-encoding"] == "gzip" and zipped.content == source  # httpx unzips
    assert zipped.headers["etag"] != etag and "Accept-Encoding" in zipped.headers["vary"]
    assert int(zipped.headers["content-length"]) == len(gzip.compress(source, 9, mtime=0))

    version = etag.strip('"')
    pinned = await client.get(f"/widget.js?v={version}")
    assert pinned.headers["cache-control"] == "public, max-age=31536000, immutable"
    stale = await client.get("/widget.js?v=0123456789abcdef0123")  # an old version's URL: never cached long
    assert stale.headers["cache-control"] == "public, max-age=600"


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            self.scripts.append(dict(attrs))


def script_tags(html: str) -> list[dict[str, str | None]]:
    parser = _Tags()
    parser.feed(html)
    return parser.scripts


def readme_tags() -> list[str]:
    section = README.read_text().split("## Chat widget", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"<script [^>]*></script>", section)


async def test_demo_page_embeds_the_one_tag_under_a_strict_csp(listener: Any) -> None:
    _running, client = listener
    page = await client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self' ws: wss:" in csp and "unsafe" not in csp
    [tag] = script_tags(page.text)
    assert tag["src"] == "/widget.js" and tag["data-site"] == "demo" and "async" in tag
    assert tag["data-server"] == f"ws://127.0.0.1:{GATEWAY_PORT}"
    assert "<style" not in page.text and " style=" not in page.text  # the CSP would refuse them
    assert (await client.get("/demo.css")).status_code == 200

    zh = await client.get("/demo?lang=zh&theme=dark")
    [tag] = script_tags(zh.text)
    assert (tag["data-lang"], tag["data-theme"]) == ("zh", "dark") and '<html lang="zh">' in zh.text
    envelope(await client.get("/?lang=fr"), 400, "bad_request")
    envelope(await client.get("/?theme=%22%3E%3Cscript%3E"), 400, "bad_request")


async def test_readme_tag_is_the_tag_the_demo_page_serves(listener: Any) -> None:
    """The README's one tag (as written) carries the attributes the demo page uses, no others."""
    _, client = listener
    [readme] = [t for t in readme_tags() if "data-user" not in t]
    [parsed] = script_tags(readme)
    assert parsed["src"] == "https://HOST/widget.js" and parsed["data-server"] == "wss://HOST"
    [demo] = script_tags((await client.get("/")).text)
    assert set(parsed) == set(demo)
    [identified] = [script_tags(t)[0] for t in readme_tags() if "data-user" in t]
    assert set(identified) == set(parsed) | {"data-user", "data-user-hash"}


async def test_every_refusal_is_the_error_envelope(listener: Any) -> None:
    _, client = listener
    assert "/nope" in envelope(await client.get("/nope"), 404, "not_found")
    refused = await client.post("/widget.js")
    envelope(refused, 405, "method_not_allowed")
    assert refused.headers["allow"] == "GET"
    envelope(await client.post("/probe/echo", content=b"x" * 1001), 413, "too_large")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
        for _ in range(5):
            yield b"y" * 400

    envelope(await client.post("/probe/echo", content=chunks()), 413, "too_large")
    ok = await client.post("/probe/echo", content=b"z" * 1000)
    assert ok.json() == {"bytes": 1000}
    message = envelope(await client.post("/probe/order", json={"item": "mug"}), 422, "invalid")
    assert "count" in message
    assert (await client.post("/probe/order", json={"item": "mug", "count": 2})).json() == {"ok": 2}
    message = envelope(await client.get("/probe/bug"), 500, "internal")
    assert "secret" not in message
    assert (await client.get("/widget.js")).headers["x-content-type-options"] == "nosniff"


async def test_requests_per_minute_per_address_get_429_with_retry_after() -> None:
    config = ChannelsConfig(port=0, requests_per_minute=3)
    app = create_channels_app(config, routers=[widget_router(gateway_port=1, demo=True)])
    running = await serve_app(app, host=config.host, port=config.port, name="channels")
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.port}") as client:
            for _ in range(3):
                assert (await client.get("/widget.js")).status_code == 200
            limited = await client.get("/widget.js")
            envelope(limited, 429, "rate_limited")
            assert int(limited.headers["retry-after"]) >= 1
            envelope(await client.get("/nope"), 429, "rate_limited")  # unknown paths count too
    finally:
        await running.stop()


async def test_the_startup_log_names_the_widget_and_demo_urls(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="learnloop.channels")
    running = await start_channels(load_settings(env={}, overrides={"channels": {"port": 0}}), gateway_port=1)
    await running.stop()
    base = f"http://127.0.0.1:{running.port}"
    assert f"chat widget on {base}/widget.js" in caplog.text and f"widget demo page on {base}/" in caplog.text


async def test_no_demo_while_the_gateway_needs_a_token(caplog: pytest.LogCaptureFixture) -> None:
    """The demo page could not keep server.token secret, so it is not served then."""
    caplog.set_level(logging.INFO, logger="learnloop.channels")
    settings = load_settings(env={}, overrides={"channels": {"port": 0}, "server": {"token": "t0ken"}})
    running = await start_channels(settings, gateway_port=GATEWAY_PORT)
    assert "demo page" not in caplog.text
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.port}") as client:
            envelope(await client.get("/"), 404, "not_found")
            assert (await client.get("/widget.js")).status_code == 200
    finally:
        await running.stop()


def test_readme_states_the_widget_size_and_it_is_small() -> None:
    source = (STATIC / "widget.js").read_bytes()
    raw, zipped = len(source) / 1000, len(gzip.compress(source, 9, mtime=0)) / 1000
    assert zipped < 15, f"widget.js is {zipped:.1f} KB gzipped; the budget is 15"
    stated = re.search(r"`widget.js` is ([\d.]+) KB, ([\d.]+) KB gzipped", README.read_text())
    assert stated, "the README's Chat widget section states the widget's size"
    assert abs(float(stated[1]) - raw) < 0.5 and abs(float(stated[2]) - zipped) < 0.2, (raw, zipped)


def test_readme_user_hash_snippet_is_what_the_gateway_checks() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    namespace: dict[str, Any] = {}
    exec(next(b for b in blocks if "def widget_user_hash" in b), namespace)
    secret = "shop-secret-0123456789"
    assert namespace["widget_user_hash"](secret, "u123") == user_hash(secret, "u123")
