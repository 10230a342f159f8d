"""The console's REST API against a real running server (uvicorn on loopback, tiny model)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute

from feedback import Role
from feedback.accounts import OperatorRole
from server.app import App
from server.console.api import ROLE_KEY
from server.protocol import Turn
from server.replies import reaction_after
from tests.console_support import (
    OPERATORS,
    PASSWORD,
    Seeded,
    bearer,
    register_adapter,
    running_app,
    seed,
)
from tests.store_backends import StoreTarget
from training.implicit import ImplicitConfig


@pytest.fixture
async def app(tiny_model: Path, tmp_path: Path, store_target: StoreTarget) -> AsyncIterator[App]:
    """The console on each backend (store.url for PostgreSQL)."""
    url = None if store_target.backend == "sqlite" else str(store_target.target)
    async with running_app(tiny_model, tmp_path, store_url=url) as a:
        yield a


@pytest.fixture
async def seeded(app: App) -> Seeded:
    assert app.store is not None
    return await seed(app.store)


async def login(app: App, name: str) -> httpx.AsyncClient:
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.console_port}", timeout=30)
    r = await client.post("/api/v1/session", json={"name": name, "password": PASSWORD})
    assert r.status_code == 200, r.text
    client.headers["X-CSRF-Token"] = r.json()["csrf_token"]
    return client


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1", path)


async def test_every_route_refuses_strangers_and_lower_roles(app: App) -> None:
    """Walk every API and page route: no credentials -> 401; a role below the route's -> 403."""
    assert app.console is not None
    routes = [r for r in app.console.routes if isinstance(r, APIRoute)]
    assert len(routes) > 30
    clients = {name: await login(app, name) for name in OPERATORS}
    stranger = httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.console_port}", timeout=30)
    checked = 0
    try:
        for route in routes:
            required = (route.openapi_extra or {}).get(ROLE_KEY)
            assert required is not None, f"{route.path} declares no role"
            if required == "public":
                continue
            for method in route.methods:
                path = _concrete(route.path)
                r = await stranger.request(method, path, json={})
                assert r.status_code == 401, (method, path, r.status_code, r.text)
                for name, role in OPERATORS.items():
                    if not OperatorRole(role).allows(OperatorRole(required)):
                        r = await clients[name].request(method, path, json={})
                        assert r.status_code == 403, (name, method, path, r.status_code, r.text)
                        checked += 1
        # the OpenAPI document is behind the same login
        assert (await stranger.get("/api/openapi.json")).status_code == 401
        spec = (await clients["vic"].get("/api/openapi.json")).json()
        assert "/api/v1/conversations" in spec["paths"]
    finally:
        await stranger.aclose()
        for c in clients.values():
            await c.aclose()
    assert checked > 15


async def test_login_csrf_tokens_and_rate_limit(app: App) -> None:
    base = f"http://127.0.0.1:{app.console_port}"
    async with httpx.AsyncClient(base_url=base) as c:
        r = await c.post("/api/v1/session", json={"name": "alice", "password": "wrong-password"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        r = await c.post("/api/v1/session", json={"name": "alice", "password": PASSWORD})
        assert r.status_code == 200
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        csrf = r.json()["csrf_token"]
        # a cookie-authenticated change without the CSRF header is refused, with it accepted
        r = await c.post("/api/v1/runs", json={"force": False})
        assert r.status_code == 403 and r.json()["error"]["code"] == "csrf"
        r = await c.post("/api/v1/runs", json={"force": False}, headers={"X-CSRF-Token": "forged"})
        assert r.status_code == 403
        r = await c.delete("/api/v1/session", headers={"X-CSRF-Token": csrf})
        assert r.status_code == 200
        assert (await c.get("/api/v1/me")).status_code == 401
    assert app.store is not None
    token = await app.store.accounts.create_token("rita", label="test", actor="test")
    async with httpx.AsyncClient(base_url=base) as c:
        r = await c.get("/api/v1/me", headers=bearer(token))
        assert r.json()["operator"] == "rita" and r.json()["csrf_token"] is None
        assert (await c.get("/api/v1/me", headers=bearer("ll_revoked"))).status_code == 401
        statuses = [
            (await c.post("/api/v1/session", json={"name": "vic", "password": "nope-nope"})).status_code
            for _ in range(12)
        ]
        assert statuses[0] == 401 and statuses[-1] == 429
    await app.store.accounts.set_operator("rita", actor="test", disabled=True)
    async with httpx.AsyncClient(base_url=base) as c:
        assert (await c.get("/api/v1/me", headers=bearer(token))).status_code == 401


async def test_filters_search_and_paging(app: App, seeded: Seeded) -> None:
    c = await login(app, "rita")  # q searches the raw text: a reviewer's (tests/test_console_redaction.py)
    try:

        async def ids(**params: Any) -> list[str]:
            r = await c.get("/api/v1/conversations", params=params)
            assert r.status_code == 200, r.text
            return [i["id"] for i in r.json()["items"]]

        assert set(await ids()) == {seeded.refund, seeded.shipping, seeded.telegram}
        assert await ids(rating="down") == [seeded.refund]
        assert await ids(rating="up") == [seeded.shipping]
        assert await ids(rating="none") == [seeded.telegram]
        assert await ids(channel="telegram") == [seeded.telegram]
        assert await ids(q="blender") == [seeded.refund]
        assert await ids(q="ship") == [seeded.shipping]  # the last word matches as a prefix
        assert await ids(q='NEAR("x" AND') == []  # search syntax is text, not an error
        assert await ids(version="v9") == []
        assert len(await ids(version="base")) == 3
        assert await ids(has_correction="true") == []
        # implicit feedback: the customer complains after the Telegram reply; the reaction filter finds it
        assert app.store is not None
        reply = [m for m in await app.store.conversations.messages(seeded.telegram) if m.role == "assistant"][-1]
        branch = [Turn(reply.parent_id or "", "user", "?"), Turn(reply.id, "assistant", reply.text)]
        await app.store.conversations.add_message(
            message_id="complaint",
            conversation_id=seeded.telegram,
            role=Role.USER,
            text="no, that's wrong",
            parent_id=reply.id,
            reaction=reaction_after(branch, message_id="complaint", text="no, that's wrong", config=ImplicitConfig()),
        )
        assert await ids(reaction="down") == [seeded.telegram]
        assert await ids(reaction="down", rating="none") == [seeded.telegram]
        assert await ids(reaction="down", rating="down") == [] and await ids(reaction="up") == []
        assert (await c.get("/api/v1/conversations", params={"reaction": "none"})).status_code == 422
        shown = (await c.get(f"/api/v1/conversations/{seeded.telegram}")).json()
        assert [m["reaction"]["signal"] for m in shown["messages"] if m["id"] == reply.id] == ["complaint"]
        # keyset paging: two pages of one and one of one, newest first, no repeats
        r1 = (await c.get("/api/v1/conversations", params={"limit": 2})).json()
        r2 = (await c.get("/api/v1/conversations", params={"limit": 2, "cursor": r1["next_cursor"]})).json()
        assert r2["next_cursor"] is None
        assert [i["id"] for i in r1["items"] + r2["items"]] == [seeded.telegram, seeded.shipping, seeded.refund]
        bad = await c.get("/api/v1/conversations", params={"cursor": "garbage"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_request"
        bad = await c.get("/api/v1/conversations", params={"rating": "sideways"})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid"
        t = (await c.get(f"/api/v1/conversations/{seeded.refund}")).json()
        reply = t["messages"][1]
        assert reply["ratings"][0]["value"] == -1 and reply["ratings"][0]["reason"] == "wrong"
        assert reply["model_version"] == "base" and t["takeover"] is None
        assert (await c.get("/api/v1/conversations/nope")).status_code == 404
    finally:
        await c.aclose()


async def test_review_actions_feed_the_next_run_and_are_audited(app: App, seeded: Seeded) -> None:
    rita, alice = await login(app, "rita"), await login(app, "alice")
    try:
        before = (await rita.get("/api/v1/dataset/preview")).json()["rows"]
        r = await rita.post(
            f"/api/v1/messages/{seeded.refund_reply}/correction",
            json={"text": "You can return it within 30 days for a full refund.", "reason": "wrong-fact"},
        )
        assert r.status_code == 201, r.text
        preview = (await rita.get("/api/v1/dataset/preview", params={"rows": "true"})).json()
        assert preview["rows"]["sft"] == before["sft"] + 1 and preview["rows"]["dpo"] >= 1
        assert any("30 days" in json.dumps(row) for row in preview["train_rows"]) or preview["split"]["heldout_dpo"]
        conv = (await rita.get("/api/v1/conversations", params={"has_correction": "true"})).json()["items"]
        assert [i["id"] for i in conv] == [seeded.refund] and conv[0]["corrections"] == 1
        # exclude, then include again
        r = await rita.post(f"/api/v1/messages/{seeded.refund_reply}/exclusion", json={"reason": "contains PII"})
        assert r.status_code == 200
        assert (await rita.get("/api/v1/dataset/preview")).json()["rows"]["sft"] == before["sft"]
        assert (await rita.delete(f"/api/v1/messages/{seeded.refund_reply}/exclusion")).status_code == 200
        # an empty correction is a typed error
        r = await rita.post(f"/api/v1/messages/{seeded.refund_reply}/correction", json={"text": ""})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid"
        # exports in TRL's formats
        r = await alice.get("/api/v1/export/training.jsonl", params={"kind": "sft"})
        rows = [json.loads(line) for line in r.text.splitlines()]
        assert r.status_code == 200 and rows and all(row["messages"][-1]["role"] == "assistant" for row in rows)
        assert any("30 days" in row["messages"][-1]["content"] for row in rows)
        r = await alice.get("/api/v1/export/conversations.jsonl")
        exported = [json.loads(line) for line in r.text.splitlines()]
        assert {e["conversation"]["id"] for e in exported} == {seeded.refund, seeded.shipping, seeded.telegram}
        audit = (await alice.get("/api/v1/audit")).json()["items"]
        actions = {(e["actor"], e["action"]) for e in audit}
        assert {("rita", "correct"), ("rita", "exclude"), ("rita", "include"), ("alice", "export.training")} <= actions
        stats = (await rita.get("/api/v1/stats/versions", params={"bucket_s": 3600})).json()["series"]
        assert stats and stats[0]["version"] == "base" and stats[0]["replies"] == 3 and stats[0]["up_rate"] == 0.5
    finally:
        await rita.aclose()
        await alice.aclose()


async def test_promote_and_roll_back_through_the_api(app: App, tiny_model: Path, tmp_path: Path) -> None:
    name = await register_adapter(app, tiny_model, tmp_path / "adapters" / "v1")
    alice = await login(app, "alice")
    try:
        r = await alice.post(f"/api/v1/versions/{name}/promote")
        assert r.status_code == 200 and r.json()["state"] == "live", r.text
        assert app.release.live_version == name
        r = await alice.post(f"/api/v1/versions/{name}/rollback")
        assert r.status_code == 200 and r.json()["live"] == "base"
        assert app.release.live_version == "base"
        versions = {v["name"]: v["state"] for v in (await alice.get("/api/v1/versions")).json()["items"]}
        assert versions == {"base": "live", name: "rolled_back"}
        assert (await alice.post("/api/v1/versions/v99/promote")).status_code == 404
    finally:
        await alice.aclose()


async def test_takeover_reaches_the_customer_socket(app: App, open_client: Any) -> None:
    customer = await open_client(app.port)
    ready = await customer.hello(user="cust-9")
    cid = ready["conversation_id"]
    await customer.chat("Where is my parcel?", "m1")
    rita = await login(app, "rita")
    try:
        r = await rita.post(f"/api/v1/conversations/{cid}/takeover")
        assert r.status_code == 200 and r.json()["connected"] == 1
        _joined, _ = await customer.until("operator_joined")
        # while an operator answers, a customer message is stored and acknowledged, and no model reply starts
        await customer.send(type="message", text="Hello? Anyone?", client_id="m2")
        ack, _ = await customer.until("ack")
        assert ack["id"] == "m2"
        r = await rita.post(f"/api/v1/conversations/{cid}/replies", json={"text": "Hi, I am Rita. It ships today."})
        assert r.status_code == 201, r.text
        pushed, seen = await customer.until("operator_message")
        assert pushed["text"] == "Hi, I am Rita. It ships today." and pushed["message_id"] == r.json()["id"]
        assert not [f for f in seen if f["type"] in ("token", "done")]
        # the customer may rate the operator's reply like any other
        await customer.send(type="rating", message_id=pushed["message_id"], value=1, id="rr")
        await customer.until("ack")
        t = (await rita.get(f"/api/v1/conversations/{cid}")).json()
        assert t["takeover"]["operator"] == "rita"
        assert [m["author"] for m in t["messages"]][-2:] == [None, "operator:rita"]
        assert (await rita.delete(f"/api/v1/conversations/{cid}/takeover")).status_code == 200
        await customer.until("operator_left")
        done, _ = await customer.chat("Thanks!", "m3")
        assert done["model_version"] == "base"
        preview = (await rita.get("/api/v1/dataset/preview")).json()
        assert preview["by_signal"].get("takeover", 0) >= 1
    finally:
        await rita.aclose()


async def test_a_second_operator_cannot_hijack_a_takeover(app: App, seeded: Seeded) -> None:
    rita, alice = await login(app, "rita"), await login(app, "alice")
    try:
        assert (await rita.post(f"/api/v1/conversations/{seeded.shipping}/takeover")).status_code == 200
        r = await alice.post(f"/api/v1/conversations/{seeded.shipping}/takeover")
        assert r.status_code == 409 and "rita" in r.json()["error"]["message"]
        r = await alice.post(f"/api/v1/conversations/{seeded.shipping}/replies", json={"text": "hi"})
        assert r.status_code == 409
        await asyncio.sleep(0)
    finally:
        await rita.aclose()
        await alice.aclose()


async def test_flagged_raters_date_ranges_and_rater_review(app: App, seeded: Seeded) -> None:
    assert app.store is not None
    await app.store.raters.flag({"cust-1": ["burst: 40 ratings in 60 s"]})
    rita = await login(app, "rita")
    try:
        r = await rita.get("/api/v1/conversations", params={"flagged": "true"})
        assert [i["id"] for i in r.json()["items"]] == [seeded.refund] and r.json()["items"][0]["flagged"]
        t = (await rita.get(f"/api/v1/conversations/{seeded.refund}")).json()
        assert t["messages"][1]["ratings"][0]["rater_state"] == "pending"
        now = time.time()
        assert len((await rita.get("/api/v1/conversations", params={"since": now - 3600})).json()["items"]) == 3
        assert (await rita.get("/api/v1/conversations", params={"until": now - 3600})).json()["items"] == []
        raters = (await rita.get("/api/v1/raters")).json()["items"]
        assert [(x["rater"], x["state"]) for x in raters] == [("cust-1", "pending")]
        r = await rita.post("/api/v1/raters/cust-1/review", json={"state": "approved"})
        assert r.status_code == 200
        assert (await rita.get("/api/v1/conversations", params={"flagged": "true"})).json()["items"] == []
        bad = await rita.post("/api/v1/raters/cust-1/review", json={"state": "maybe"})
        assert bad.status_code == 422
    finally:
        await rita.aclose()


async def test_channels_sites_and_versions_as_the_console_shows_them(app: App, seeded: Seeded) -> None:
    assert app.store is not None
    await app.store.conversations.create("site-conv", user_id="w1", channel="widget", site="shop")
    http = await login(app, "alice")
    try:
        by_channel = (await http.get("/api/v1/conversations", params={"channel": "telegram"})).json()["items"]
        assert [c["id"] for c in by_channel] == [seeded.telegram]
        by_site = (await http.get("/api/v1/conversations", params={"site": "shop"})).json()["items"]
        assert [(c["id"], c["channel"], c["site"]) for c in by_site] == [("site-conv", "widget", "shop")]
        shown = (await http.get("/api/v1/conversations/site-conv")).json()["conversation"]
        assert (shown["channel"], shown["site"]) == ("widget", "shop")  # the transcript's header shows both
        both = {"channel": "telegram", "site": "support"}  # the seeded Telegram conversation's bot
        assert [c["id"] for c in (await http.get("/api/v1/conversations", params=both)).json()["items"]] == [
            seeded.telegram
        ]
        other = {"channel": "websocket", "site": "support"}
        assert (await http.get("/api/v1/conversations", params=other)).json()["items"] == []
        too_long = await http.get("/api/v1/conversations", params={"site": "x" * 101})
        assert (too_long.status_code, too_long.json()["error"]["code"]) == (422, "invalid")
        stats = {(r["channel"], r["version"]): r for r in (await http.get("/api/v1/stats/channels")).json()["items"]}
        assert stats[("websocket", "base")]["ups"] == 1 and stats[("websocket", "base")]["downs"] == 1
        assert stats[("websocket", "base")]["up_rate"] == 0.5 and stats[("telegram", "base")]["up_rate"] is None
        versions = {v["name"]: v for v in (await http.get("/api/v1/versions")).json()["items"]}
        # base replied in the three seeded conversations; live conversations are not pinned to it
        assert versions["base"]["stats"]["conversations"] == 3 and versions["base"]["stats"]["replies"] == 3
        assert (versions["base"]["can_roll_back"], versions["base"]["rollback_to"]) == (False, None)
        refused = await http.post("/api/v1/versions/base/rollback")
        assert (refused.status_code, refused.json()["error"]["code"]) == (409, "conflict")
        assert "nothing to roll back" in refused.json()["error"]["message"]
        assert (await app.store.versions.live()).name == "base"  # refused: nothing moved
    finally:
        await http.aclose()


async def test_the_versions_page_stats_in_one_pass_equal_each_versions_stats(store_target: StoreTarget) -> None:
    """``versions.all_stats`` (GET /versions) against ``versions.stats`` (the canary's) on both backends:
    thumbs, a regeneration, an error, an operator's turn, a version with no reply, a ``since``."""
    from feedback import Role

    store = await store_target.open()
    try:
        await store.versions.ensure_base("tiny")
        v1 = await store.versions.register(
            adapter_path="/a/v1", sha256="x", parent="base", base_model="tiny", eval_report={}, feedback_ids={},
            training_run_id=None,
        )  # fmt: skip
        idle = await store.versions.register(
            adapter_path="/a/v2", sha256="x", parent="v1", base_model="tiny", eval_report={}, feedback_ids={},
            training_run_id=None,
        )  # fmt: skip
        n = 0

        async def say(cid: str, role: str, version: str | None = None, **kw: Any) -> str:
            nonlocal n
            n += 1
            assistant = role == "assistant"
            await store.conversations.add_message(
                message_id=f"m{n}", conversation_id=cid, role=Role(role), text=f"text {n}", parent_id=None,
                model_version=version, latency_ms=100.0 * n if assistant else None,
                finish_reason=kw.pop("finish", "stop") if assistant else None, n_tokens=n if assistant else None, **kw,
            )  # fmt: skip
            return f"m{n}"

        for i, version in enumerate(["base", "base", v1.name]):
            cid = f"c{i}"
            await store.conversations.create(cid, user_id=f"u{i}", channel="websocket")
            await say(cid, "user")
            first = await say(cid, "assistant", version)
            await store.conversations.add_rating(message_id=first, value=1 if i else -1, rater=f"u{i}", client_id=cid)
            await say(cid, "assistant", version, regenerated_from=first)
            await say(cid, "assistant", version, finish="error")
        await say("c2", "assistant", None, author="alice")  # an operator's turn: no version's reply
        every = await store.versions.all_stats()
        assert every == {v: await store.versions.stats(v) for v in ("base", v1.name, idle.name)}
        assert (every["base"].conversations, every["base"].replies, every["base"].errors) == (2, 4, 2)
        assert (every["base"].thumbs_up, every["base"].thumbs_down, every["base"].regenerated) == (1, 1, 2)
        assert every[idle.name] == await store.versions.stats(idle.name) and every[idle.name].replies == 0
        later = time.time() + 60
        assert await store.versions.all_stats(since=later) == {
            v: await store.versions.stats(v, since=later) for v in ("base", v1.name, idle.name)
        }
    finally:
        await store.close()
