"""The chat widget in a real browser: Debian's chromium driven by Playwright, against a real server.

The demo page (strict CSP enforced, not bypassed): a reply streams in, is rated down with a
reason, regenerated; the server restarts on the same data and ports while a message waits in
the widget, which reconnects, sends it in the same conversation, and stops the long reply that
follows; then the store holds the rating and both siblings. The README's tag on a shop's page
(a verified customer, a forged hash, a foreign origin). A message the server never
acknowledged is sent again after a drop, and stored once. An operator takeover shows a human
agent. A tab closed for idleness (4408) stays closed until its visitor focuses the chat. axe-core finds no serious or critical violation in the open panel. Screenshots go to
``test-artifacts/widget/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from feedback import FinishReason, Role
from server.app import App
from server.channels.identity import user_hash
from server.settings import Secret, Settings, SiteConfig, load_settings

CHROMIUM = os.environ.get("LEARNLOOP_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("LEARNLOOP_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
NPM_CACHE = Path(os.environ.get("LEARNLOOP_NPM_CACHE", Path.home() / ".cache" / "learnloop" / "npm"))
AXE = NPM_CACHE / "node_modules" / "axe-core" / "axe.min.js"
README = Path(__file__).resolve().parents[1] / "README.md"

if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        raise RuntimeError(f"chromium not found at {CHROMIUM}: .ci/run installs Debian's chromium package")
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)

playwright_api = pytest.importorskip("playwright.async_api")

SECRET = "shop-secret-0123456789"
SHOP = "http://shop.test"  # the browser maps it to a loopback server that serves the README's tag
QUESTION = "Where is my order?"
WAITING = "Are you still there?"
WHY = "That is not my order number"


def widget_settings(
    tiny_model: Path,
    data_dir: Path,
    *,
    ports: tuple[int, int] = (0, 0),
    tokens: int = 12,
    temperature: float | None = None,  # None: the setting's default
) -> Settings:
    model: dict[str, Any] = {"name": str(tiny_model), "max_new_tokens": tokens, "dtype": "float32"}
    if temperature is not None:
        model["temperature"] = temperature
    s = load_settings(
        env={},
        data_dir=data_dir,
        overrides={
            "console": {"enabled": False},
            "server": {"port": ports[0]},
            "channels": {"port": ports[1]},
            "model": model,
            "schedule": {"enabled": False},
        },
    )
    return dataclasses.replace(s, sites={"shop": SiteConfig(origins=(SHOP,), secret=Secret(SECRET))})


@pytest.fixture(scope="session")
def axe_source() -> str:
    """axe-core from npm, installed once into a cache folder."""
    if not AXE.exists():
        npm = shutil.which("npm")
        if npm is None:
            if os.environ.get("CI"):
                raise RuntimeError("npm not found: the widget's accessibility check installs axe-core with it")
            pytest.skip("npm is not installed: the accessibility check needs axe-core from npm")
        subprocess.run(
            [npm, "install", "--prefix", str(NPM_CACHE), "--no-audit", "--no-fund", "axe-core@4"],
            check=True,
            timeout=300,
            capture_output=True,
        )
    return AXE.read_text()


@contextlib.asynccontextmanager
async def browser_page(*args: str) -> AsyncIterator[tuple[Any, list[str]]]:
    """A page whose CSP is enforced; uncaught errors and CSP or Trusted Types refusals are collected."""
    async with playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", *args])
        context = await browser.new_context(viewport={"width": 1100, "height": 760})
        page = await context.new_page()
        page.set_default_timeout(30_000)
        problems: list[str] = []
        page.on("pageerror", lambda exc: problems.append(f"uncaught: {exc}"))

        def console(message: Any) -> None:
            text = message.text
            if "Content Security Policy" in text or "Trusted Type" in text or "learnloop widget" in text:
                problems.append(text)

        page.on("console", console)
        try:
            yield page, problems
        finally:
            await browser.close()


def w(page: Any, selector: str) -> Any:
    """A locator inside the widget (Playwright's CSS selectors pierce open shadow roots)."""
    return page.locator(f"learnloop-chat {selector}")


async def focused(page: Any) -> str:
    """What has the keyboard focus inside the widget: its accessible name, id or reason code."""
    return str(
        await page.evaluate(
            """() => {
                const host = document.querySelector('learnloop-chat');
                const el = document.activeElement === host ? host.shadowRoot.activeElement : null;
                return el ? el.getAttribute('aria-label') || el.id || el.dataset.reason || el.tagName : 'outside';
            }"""
        )
    )


async def shot(page: Any, name: str) -> None:
    folder = ARTIFACTS / "widget"
    folder.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(folder / f"{name}.png"))


async def serious_violations(page: Any, axe_source: str) -> list[Any]:
    await page.evaluate(axe_source)
    result = await page.evaluate(
        """async () => (await axe.run(document, {resultTypes: ['violations']})).violations
            .filter(v => v.impact === 'serious' || v.impact === 'critical')
            .map(v => ({id: v.id, impact: v.impact, nodes: v.nodes.map(n => n.target)}))"""
    )
    return list(result)


async def online(page: Any) -> None:
    await page.locator("learnloop-chat .status", has_text="Online").wait_for()


@contextlib.asynccontextmanager
async def pages_server(pages: dict[str, str]) -> AsyncIterator[int]:
    """A plain HTTP server on loopback answering each path with its page (a shop's own server)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = (await reader.readuntil(b"\r\n\r\n")).decode()
        path = request.split(" ", 2)[1]
        body = pages.get(path)
        status = "200 OK" if body is not None else "404 Not Found"
        data = (body or "").encode()
        head = f"HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {len(data)}\r\n"
        writer.write(head.encode() + b"Connection: close\r\n\r\n" + data)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


def readme_tag(*, identified: bool) -> str:
    section = README.read_text().split("## Chat widget", 1)[1].split("\n## ", 1)[0]
    tags = re.findall(r"<script [^>]*></script>", section)
    return next(t for t in tags if ("data-user" in t) == identified)


async def test_chat_rate_regenerate_restart_and_stop(tiny_model: Path, tmp_path: Path, axe_source: str) -> None:
    data_dir = tmp_path / "data"
    async with contextlib.AsyncExitStack() as running:
        # 48 tokens, not 12: a reader that lags gets the pending tokens as one delta (base.py), and on a
        # busy CI machine a 12-token reply of the tiny model once came as one frame
        app = App(widget_settings(tiny_model, data_dir, tokens=48))
        await running.enter_async_context(app.lifespan())
        async with browser_page() as (page, problems):
            received: list[dict[str, Any]] = []
            page.on("websocket", lambda ws: ws.on("framereceived", lambda data: received.append(json.loads(data))))
            demo = f"http://127.0.0.1:{app.channels_port}/"
            response = await page.goto(demo)
            assert "default-src 'self'" in response.headers["content-security-policy"]

            # open with the keyboard: focus lands in the message box
            await w(page, ".bubble").focus()
            await page.keyboard.press("Enter")
            await w(page, ".panel").wait_for()
            assert await focused(page) == "ll-input"
            await online(page)
            await page.evaluate(
                """() => {
                    const root = document.querySelector('learnloop-chat').shadowRoot;
                    const list = root.querySelector('.msgs');
                    window.seen = []; window.announced = [];
                    new MutationObserver(() => {
                        for (const li of list.querySelectorAll('li.bot'))
                            window.seen.push([li.dataset.state, li.querySelector('.text').textContent.length]);
                    }).observe(list, {subtree: true, childList: true, characterData: true, attributes: true});
                    new MutationObserver(rs => rs.forEach(r => r.addedNodes.forEach(n => window.announced.push(n.textContent))))
                        .observe(root.querySelector('[role=log]'), {childList: true});
                }"""
            )

            # a message sent with Enter; the reply streams in token by token and is announced once
            await page.keyboard.type(QUESTION)
            await page.keyboard.press("Enter")
            reply = w(page, "li.bot[data-state=done]")
            await reply.wait_for()
            text = await reply.locator(".text").text_content()
            first_id = await reply.get_attribute("data-id")
            deltas = [f["delta"] for f in received if f["type"] == "token" and f["message_id"] == first_id]
            assert len(deltas) >= 2 and "".join(deltas) == text
            seen = await page.evaluate("window.seen")
            assert any(state == "streaming" and 0 < n < len(text) for state, n in seen), seen  # shown while streaming
            assert await page.evaluate("window.announced") == [f"Assistant: {text}"]

            # thumbs down, then a reason and a comment; thanks once the server has stored it
            await reply.locator("button[aria-label='Bad reply']").click()
            why = reply.locator(".why")
            await why.wait_for()
            assert await focused(page) == "incorrect"  # focus moved into the reason picker
            await why.locator("button[data-reason=incorrect]").click()
            await why.locator("input").fill(WHY)
            await why.locator("button", has_text="Send feedback").click()
            await reply.locator(".meta", has_text="Thanks for your feedback").wait_for()
            assert await reply.locator("button[aria-label='Bad reply']").get_attribute("aria-pressed") == "true"
            await shot(page, "01-default")

            # regenerate: a sibling replaces the reply
            await reply.locator("button[aria-label='Regenerate the reply']").click()
            sibling = w(page, f"li.bot[data-state=done]:not([data-id='{first_id}'])")
            await sibling.wait_for()
            sibling_id = await sibling.get_attribute("data-id")
            assert await w(page, "li.bot").count() == 1
            assert any(f["type"] == "done" and f.get("regenerated_from") == first_id for f in received)

            # accessibility of the open panel, with the reason picker showing
            await sibling.locator("button[aria-label='Bad reply']").click()
            await sibling.locator(".why").wait_for()
            assert await serious_violations(page, axe_source) == []
            await sibling.locator(".why button", has_text="Skip").click()
            await sibling.locator(".why").wait_for(state="detached")

            # the keyboard stays in the open panel; Escape closes it and focus returns to the bubble
            await w(page, "textarea").focus()
            for _ in range(12):
                await page.keyboard.press("Tab")
                assert await focused(page) not in ("outside", "BODY")
            await w(page, "button[aria-label='Close chat']").focus()
            await page.keyboard.press("Shift+Tab")
            assert await focused(page) == "Send"
            await page.keyboard.press("Escape")
            await w(page, ".panel").wait_for(state="hidden")
            assert await focused(page) == "Open chat"
            await page.keyboard.press("Enter")
            await w(page, ".panel").wait_for()

            # the server goes away; a message typed meanwhile waits in the widget
            ports = (app.port, app.channels_port)
            assert ports[0] is not None and ports[1] is not None
            await running.aclose()
            await w(page, ".panel[data-offline]").wait_for()
            await w(page, "textarea").fill(WAITING)
            await w(page, "textarea").press("Enter")
            queued = w(page, "li.user[data-state=queued]")
            await queued.wait_for()
            assert "Waiting to send" in await queued.inner_text()
            await page.locator("learnloop-chat .banner", has_text="Reconnecting").wait_for()
            await shot(page, "04-offline")

            # back on the same data and ports, with replies long enough to stop one: greedy, as a sampled
            # reply of the tiny random model can draw its end of turn before the click (seen once in CI)
            app = App(widget_settings(tiny_model, data_dir, ports=ports, tokens=100_000, temperature=0.0))
            await running.enter_async_context(app.lifespan())
            streaming = w(page, "li.bot[data-state=streaming]")
            await streaming.wait_for(timeout=90_000)  # the widget's backoff reaches 20 s at most
            assert await w(page, "li.user[data-state=queued]").count() == 0
            await w(page, "button[aria-label='Stop the reply']").click()
            stopped = w(page, "li.bot[data-state=stopped]")
            await stopped.wait_for()
            stopped_id = await stopped.get_attribute("data-id")
            await w(page, "button[aria-label='Stop the reply']").wait_for(state="hidden")

            assert app.store is not None
            snapshot = await app.store.conversations.export_feedback()
            [conversation] = snapshot.conversations
            assert (conversation.channel, conversation.site, conversation.user_id) == ("widget", "demo", None)
            messages = await app.store.conversations.messages(conversation.id)
            assert [m.text for m in messages if m.role is Role.USER] == [QUESTION, WAITING]  # each stored once
            replies = {m.id: m for m in messages if m.role is Role.ASSISTANT}
            assert replies[sibling_id].regenerated_from == first_id and first_id in replies
            assert replies[stopped_id].finish_reason is FinishReason.CANCELLED
            assert replies[stopped_id].parent_id == next(m.id for m in messages if m.text == WAITING)
            rated = [r for r in snapshot.ratings if r.message_id == first_id]
            assert any((r.value, r.reason, r.comment) == (-1, "incorrect", WHY) for r in rated)
            assert {r.rater for r in snapshot.ratings} == {f"conversation:{conversation.id}"}

            # another page load keeps the conversation; the dark theme and Chinese
            await page.goto(demo + "?theme=dark")
            await online(page)  # the panel was open: it opens again and resumes
            assert await w(page, f"li.bot[data-id='{stopped_id}']").count() == 1
            background = await page.evaluate(
                "getComputedStyle(document.querySelector('learnloop-chat').shadowRoot.querySelector('.panel'))"
                ".backgroundColor"
            )
            assert background == "rgb(24, 27, 34)"
            assert await serious_violations(page, axe_source) == []
            await shot(page, "02-dark")
            await page.goto(demo + "?lang=zh")
            await page.locator("learnloop-chat .status", has_text="在线").wait_for()
            assert await w(page, "h2").inner_text() == "在线咨询"
            assert await w(page, "textarea").get_attribute("placeholder") == "输入消息…"
            await shot(page, "03-chinese")
            assert not problems, problems


async def test_readme_tag_on_a_shop_page_verified_forged_and_foreign(tiny_model: Path, tmp_path: Path) -> None:
    app = App(widget_settings(tiny_model, tmp_path / "data"))
    async with app.lifespan():
        tag = readme_tag(identified=True)
        tag = tag.replace("https://HOST", f"http://127.0.0.1:{app.channels_port}")
        tag = tag.replace("wss://HOST", f"ws://127.0.0.1:{app.port}")
        pages = {
            path: f"<!doctype html><html lang='en'><title>Shop</title><h1>Shop</h1>{tag.replace('USER_HASH', h)}</html>"
            for path, h in (("/", user_hash(SECRET, "u123")), ("/forged", user_hash(SECRET, "u999")))
        }
        async with pages_server(pages) as port:
            # shop.test and evil.test name this loopback server: the browser sends their origins,
            # and treats the pages as local ones (a public page may not load from loopback)
            hosts = f"--host-resolver-rules=MAP shop.test 127.0.0.1:{port}, MAP evil.test 127.0.0.1:{port}"
            async with browser_page(hosts) as (page, problems):
                await page.goto(f"{SHOP}/")
                await w(page, ".bubble").click()
                await online(page)
                await w(page, "textarea").fill("Where is my parcel?")
                await w(page, "textarea").press("Enter")
                await w(page, "li.bot[data-state=done]").wait_for()
                assert app.store is not None
                cid = await page.evaluate("JSON.parse(localStorage.getItem('learnloop:shop:u123')).cid")
                conversation = await app.store.conversations.get(cid)
                assert (conversation.channel, conversation.site, conversation.user_id) == ("widget", "shop", "u123")

                refused = page.locator("learnloop-chat .banner", has_text="Chat is not available on this page")
                # another page of the same shop: the panel stays open, but this page's hash is forged
                await page.goto(f"{SHOP}/forged")
                await refused.wait_for()
                assert "(unauthorized)" in await refused.inner_text()
                # the same tag on a page of another origin
                await page.goto("http://evil.test/")
                await w(page, ".bubble").click()
                await refused.wait_for()
                assert "(forbidden)" in await refused.inner_text()
                assert not problems, problems


async def test_a_message_never_acknowledged_is_sent_again_and_stored_once(tiny_model: Path, tmp_path: Path) -> None:
    app = App(widget_settings(tiny_model, tmp_path / "data"))
    async with app.lifespan(), browser_page() as (page, problems):
        sent: list[dict[str, Any]] = []
        lost: list[dict[str, Any]] = []

        async def cut_after_first_message(ws: Any) -> None:
            server = ws.connect_to_server()

            async def from_page(data: str | bytes) -> None:
                frame = json.loads(data)
                sent.append(frame)
                if frame["type"] == "message" and not lost:
                    lost.append(frame)  # never reaches the server, so no ack comes back
                    await ws.close()
                    return
                server.send(data)

            ws.on_message(from_page)

        await page.route_web_socket(re.compile(r"^ws://"), cut_after_first_message)
        await page.goto(f"http://127.0.0.1:{app.channels_port}/")
        await w(page, ".bubble").click()
        await online(page)
        await w(page, "textarea").fill("Lost in transit?")
        await w(page, "textarea").press("Enter")
        await w(page, "li.bot[data-state=done]").wait_for()
        hellos = [f for f in sent if f["type"] == "hello"]
        assert len(hellos) == 2 and "conversation_id" not in hellos[0]
        resent = [f for f in sent if f["type"] == "message"]
        assert [f["client_id"] for f in resent] == [lost[0]["client_id"]] * 2  # the same id, sent again
        assert app.store is not None
        cid = await page.evaluate("JSON.parse(localStorage.getItem('learnloop:demo:')).cid")
        assert hellos[1]["conversation_id"] == cid  # the second connection resumed the first's conversation
        messages = await app.store.conversations.messages(cid)
        assert [m.text for m in messages if m.role is Role.USER] == ["Lost in transit?"]

        # a stored conversation that is gone (erased, say): the widget starts a new one and
        # still sends what waited in its outbox
        waiting = {"kind": "message", "id": "c-waiting", "text": "Still queued"}
        stored = {"cid": "gone", "log": [], "outbox": [waiting], "open": True}
        await page.evaluate("s => localStorage.setItem('learnloop:demo:', JSON.stringify(s))", stored)
        await page.reload()
        await online(page)
        await w(page, "li.bot[data-state=done]").wait_for()
        fresh = await page.evaluate("JSON.parse(localStorage.getItem('learnloop:demo:')).cid")
        assert fresh not in ("gone", cid)
        messages = await app.store.conversations.messages(fresh)
        assert [m.text for m in messages if m.role is Role.USER] == ["Still queued"]
        assert not problems, problems


async def test_an_operator_takeover_shows_a_human_agent(tiny_model: Path, tmp_path: Path) -> None:
    app = App(widget_settings(tiny_model, tmp_path / "data"))
    async with app.lifespan(), browser_page() as (page, problems):
        await page.goto(f"http://127.0.0.1:{app.channels_port}/")
        await w(page, ".bubble").click()
        await online(page)
        await w(page, "textarea").fill("I want a human")
        await w(page, "textarea").press("Enter")
        await w(page, "li.bot[data-state=done]").wait_for()
        cid = await page.evaluate("JSON.parse(localStorage.getItem('learnloop:demo:')).cid")
        assert app.presence is not None

        await app.presence.join(cid, "alice")  # what the console's "take over" does
        await page.locator("learnloop-chat li.note", has_text="A human agent joined").wait_for()
        await w(page, "textarea").fill("Thank you")
        await w(page, "textarea").press("Enter")
        await w(page, "li.user[data-state=done]").nth(1).wait_for()  # stored and acknowledged...
        assert await w(page, "li.bot").count() == 1  # ...and the model stays silent
        assert await w(page, "button[aria-label='Regenerate the reply']").is_hidden()
        await app.presence.reply(cid, "alice", "Hello, Alice here. Your parcel left today.")
        agent = w(page, "li.agent")
        await agent.wait_for()
        assert await agent.locator(".who").inner_text() == "Agent (human)"
        assert await agent.locator(".text").inner_text() == "Hello, Alice here. Your parcel left today."
        await agent.locator("button[aria-label='Good reply']").click()  # an agent's reply is rated too
        await agent.locator(".meta", has_text="Thanks for your feedback").wait_for()
        announced = page.locator("learnloop-chat [role=log] p", has_text="Agent (human): Hello, Alice here.")
        await announced.wait_for(state="attached")
        await shot(page, "05-agent")

        await app.presence.leave(cid)
        await page.locator("learnloop-chat li.note", has_text="The agent left").wait_for()
        await w(page, "textarea").fill("And the invoice?")
        await w(page, "textarea").press("Enter")
        await w(page, "li.bot[data-state=done]").nth(1).wait_for()  # the model answers again
        assert app.store is not None
        ratings = (await app.store.conversations.export_feedback()).ratings
        agent_id = await agent.get_attribute("data-id")
        assert [(r.message_id, r.value) for r in ratings] == [(agent_id, 1)]
        assert not problems, problems


async def test_a_tab_closed_for_idleness_stays_closed_until_the_visitor_comes_back(
    tiny_model: Path, tmp_path: Path
) -> None:
    s = widget_settings(tiny_model, tmp_path / "data")
    app = App(dataclasses.replace(s, server=dataclasses.replace(s.server, idle_timeout_s=1.0)))
    async with app.lifespan(), browser_page() as (page, problems):
        closes: list[int] = []

        async def count(ws: Any) -> None:
            server = ws.connect_to_server()

            async def closed(code: int | None, reason: str | None) -> None:
                closes.append(code or 0)
                await ws.close(code=code, reason=reason)  # a handler on the server side stops the forwarding

            server.on_close(closed)

        await page.route_web_socket(re.compile(r"^ws://"), count)
        await page.goto(f"http://127.0.0.1:{app.channels_port}/")
        await w(page, ".bubble").click()
        await online(page)
        await page.evaluate("() => document.querySelector('learnloop-chat').shadowRoot.activeElement?.blur()")
        for _ in range(300):  # the server closes it with 4408 after a second without a frame
            if closes:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(3)  # the old widget reconnected within 0.5 s, and was closed again each second
        assert closes == [4408]
        assert await w(page, ".banner").is_hidden()  # quiet: not "Reconnecting…"
        assert await w(page, ".status").text_content() == ""
        await w(page, "textarea").focus()  # the visitor comes back: connected again
        await online(page)
        await w(page, "textarea").fill(QUESTION)
        await w(page, "textarea").press("Enter")
        await w(page, "li.bot[data-state=done]").wait_for()
        assert not problems, problems
