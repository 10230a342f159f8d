"""Widget hellos over real websockets: sites, origins, verified users, and where conversations land."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from server.app import App
from server.channels.identity import user_hash
from server.settings import Secret, SiteConfig, load_settings
from tests.conftest import ChatClient
from tests.store_backends import peek

SECRET = "shop-secret-0123456789"
SHOP = "https://shop.example"


def widget_settings(tiny_model: Path, tmp_path: Path, **server: Any) -> Any:
    s = load_settings(
        env={},
        data_dir=tmp_path / "data",
        overrides={
            "console": {"enabled": False},
            "channels": {"port": 0},
            "server": {"port": 0, **server},
            "model": {"name": str(tiny_model), "max_new_tokens": 4, "dtype": "float32"},
            "schedule": {"enabled": False},
        },
    )
    sites = {
        "shop": SiteConfig(origins=(SHOP,), secret=Secret(SECRET)),
        "blog": SiteConfig(origins=("https://blog.example",)),
    }
    return dataclasses.replace(s, sites=sites)


@pytest.fixture
async def app(tiny_model: Path, tmp_path: Path) -> AsyncIterator[App]:
    a = App(widget_settings(tiny_model, tmp_path))
    async with a.lifespan():
        yield a


@pytest.fixture
async def client() -> AsyncIterator[Any]:
    opened: list[Any] = []

    async def _open(port: int, origin: str | None) -> ChatClient:
        ws = await connect(f"ws://127.0.0.1:{port}", origin=origin)  # type: ignore[arg-type]
        opened.append(ws)
        return ChatClient(ws)

    yield _open
    for ws in opened:
        await ws.close()


async def refused(c: ChatClient, **hello: Any) -> str:
    await c.send(type="hello", **hello)
    frame = await c.recv()
    assert frame["type"] == "error", frame
    return str(frame["code"])


async def conversation_count(app: App) -> int:
    """Every stored conversation, with messages or without (the export lists only those with)."""
    return int(peek(app.settings.db_path, "SELECT count(*) FROM conversations")[0][0])


async def test_a_site_hello_is_checked_before_anything_opens(app: App, client: Any) -> None:
    assert await refused(await client(app.port, SHOP), site="nowhere") == "not_found"
    with pytest.raises(InvalidStatus) as handshake:  # an Origin of no site: 403 before any session
        await client(app.port, "https://evil.example")
    assert handshake.value.response.status_code == 403
    assert await refused(await client(app.port, None), site="shop") == "forbidden"  # not from a browser page
    good = user_hash(SECRET, "u123")
    c = await client(app.port, SHOP)
    assert await refused(c, site="shop", user="u123", user_hash=user_hash(SECRET, "u124")) == "unauthorized"
    assert await refused(c, site="shop", user="u123") == "unauthorized"  # the same socket may try again
    blog = await client(app.port, "https://blog.example")
    assert await refused(blog, site="blog", user="u123", user_hash=good) == "unauthorized"  # blog has no secret
    assert await conversation_count(app) == 0  # nothing was opened by a refused hello
    assert (await c.hello(site="shop", user="u123", user_hash=good))["type"] == "ready"
    assert await conversation_count(app) == 1


async def test_widget_conversations_carry_channel_site_and_verified_user(app: App, client: Any) -> None:
    assert app.store is not None
    known = await client(app.port, SHOP)
    ready = await known.hello(site="shop", user="u123", user_hash=user_hash(SECRET, "u123").upper())
    done, _ = await known.chat("where is my order?", "m1")
    await known.send(type="rating", message_id=done["message_id"], value=-1, id="r1", reason="incorrect")
    assert (await known.until("ack"))[0]["id"] == "r1"
    conversation = await app.store.conversations.get(ready["conversation_id"])
    assert (conversation.channel, conversation.site, conversation.user_id) == ("widget", "shop", "u123")

    anonymous = await client(app.port, "https://blog.example")
    ready2 = await anonymous.hello(site="blog")
    done2, _ = await anonymous.chat("hello", "m1")
    await anonymous.send(type="rating", message_id=done2["message_id"], value=1, id="r1")
    await anonymous.until("ack")
    conversation = await app.store.conversations.get(ready2["conversation_id"])
    assert (conversation.channel, conversation.site, conversation.user_id) == ("widget", "blog", None)

    raw = await client(app.port, None)
    ready3 = await raw.hello(user="alice")
    conversation = await app.store.conversations.get(ready3["conversation_id"])
    assert (conversation.channel, conversation.site, conversation.user_id) == ("websocket", None, "alice")

    raters = {r.message_id: (r.rater, r.reason) for r in (await app.store.conversations.export_feedback()).ratings}
    assert raters[done["message_id"]] == ("u123", "incorrect")
    assert raters[done2["message_id"]] == (f"conversation:{ready2['conversation_id']}", None)


async def test_a_widget_conversation_resumes_only_on_its_site_for_its_user(app: App, client: Any) -> None:
    u123 = {"site": "shop", "user": "u123", "user_hash": user_hash(SECRET, "u123")}
    first = await client(app.port, SHOP)
    cid = (await first.hello(**u123))["conversation_id"]
    await first.chat("first", "m1")
    await first.ws.close()

    again = await client(app.port, SHOP)
    assert (await again.hello(conversation_id=cid, **u123))["conversation_id"] == cid
    other_user = {"site": "shop", "user": "u124", "user_hash": user_hash(SECRET, "u124")}
    assert await refused(await client(app.port, SHOP), conversation_id=cid, **other_user) == "not_found"
    assert await refused(await client(app.port, SHOP), conversation_id=cid, site="shop") == "not_found"
    blog = await client(app.port, "https://blog.example")
    assert await refused(blog, conversation_id=cid, site="blog") == "not_found"
    assert await refused(await client(app.port, None), conversation_id=cid) == "not_found"  # raw protocol

    raw = await client(app.port, None)
    raw_cid = (await raw.hello())["conversation_id"]
    assert await refused(await client(app.port, SHOP), conversation_id=raw_cid, site="shop") == "not_found"


async def test_sites_stand_in_for_the_token_and_the_demo_needs_none(
    tiny_model: Path, tmp_path: Path, client: Any
) -> None:
    a = App(widget_settings(tiny_model, tmp_path, token="t0ken-for-backends"))
    async with a.lifespan():
        with pytest.raises(InvalidStatus) as no_token:  # a backend without the token: 401 before the upgrade
            await client(a.port, None)
        assert no_token.value.response.status_code == 401
        # a page of the site may come without it, and opens only its site
        assert await refused(await client(a.port, SHOP), user="alice") == "unauthorized"
        assert (await (await client(a.port, SHOP)).hello(site="shop"))["type"] == "ready"
        demo_origin = f"http://127.0.0.1:{a.channels_port}"
        # the demo page cannot keep the token secret: with a token set there is no demo site, nor its origin
        with pytest.raises(InvalidStatus):
            await client(a.port, demo_origin)


async def test_the_demo_site_accepts_the_demo_page_only(app: App, client: Any) -> None:
    assert app.store is not None
    for origin in (f"http://127.0.0.1:{app.channels_port}", f"http://localhost:{app.channels_port}"):
        ready = await (await client(app.port, origin)).hello(site="demo")
        assert (await app.store.conversations.get(ready["conversation_id"])).site == "demo"
    assert await refused(await client(app.port, SHOP), site="demo") == "forbidden"
    with pytest.raises(InvalidStatus):  # the gateway's own address is no page of a site
        await client(app.port, f"http://127.0.0.1:{app.port}")
