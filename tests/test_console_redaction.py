"""Scenario 14: the console shows transcripts with personal data redacted; the raw text is one
audited step away for reviewers (``server/console/redact.py``). Through the REST API of a real
running server; the browser side is in ``tests/test_console_browser.py``."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from feedback import FeedbackStore, Role, StorageFullError
from server.app import App
from server.console import redact as redacted
from tests.console_support import running_app
from tests.test_clean_redos import at_most
from tests.test_console import login
from tests.test_reliability import fill_the_database, set_page_limit
from training.clean import DEFAULT_DETECTORS, Span

EMAIL, PHONE, STREET, NAME, CARD = (
    "jane.doe@example.com",
    "+49 170 1234567",
    "12 Baker Street",
    "Jane Roe",
    "4111 1111 1111 1111",
)
PLANTED = (EMAIL, PHONE, STREET, NAME, CARD, "jane.doe", "1234567", "4111")
# the first message is longer than the list's preview (160 characters) and the e-mail address
# straddles the cut: cut first and redacted after, half an address would show
FIRST = "x" * 150 + f" mail {EMAIL}; my name is {NAME}, I live at {STREET}."


async def seed_pii(store: FeedbackStore) -> tuple[str, str]:
    """A conversation with PII in a message, a reply, a rating comment and a correction."""
    cid = uuid.uuid4().hex
    await store.conversations.create(cid, user_id="cust-pii")
    first = await store.conversations.add_message(
        message_id=uuid.uuid4().hex, conversation_id=cid, role=Role.USER, text=FIRST, parent_id=None
    )
    user = await store.conversations.add_message(
        message_id=uuid.uuid4().hex,
        conversation_id=cid,
        role=Role.USER,
        text=f"Call me on {PHONE}, card {CARD}.",
        parent_id=first.id,
    )
    reply = await store.conversations.add_message(
        message_id=uuid.uuid4().hex,
        conversation_id=cid,
        role=Role.ASSISTANT,
        text=f"Thanks, we will write to {EMAIL}.",
        parent_id=user.id,
        model_version="base",
    )
    await store.conversations.add_rating(
        message_id=reply.id, value=-1, rater="cust-pii", client_id="r1", comment=f"use {PHONE} instead"
    )
    await store.conversations.add_correction(message_id=reply.id, text=f"We will call {PHONE}.", operator="rita")
    return cid, reply.id


@pytest.fixture
async def app(tiny_model: Path, tmp_path: Path) -> AsyncIterator[App]:
    async with running_app(tiny_model, tmp_path) as a:
        yield a


def _texts(body: object) -> list[str]:
    """The strings of a response, but for random hex ids (where "4111" turns up by chance) and
    numbers (timestamps): a user id or any other field that may hold written text stays in."""
    if isinstance(body, dict):
        return [t for v in body.values() for t in _texts(v)]
    if isinstance(body, list):
        return [t for v in body for t in _texts(v)]
    return [body] if isinstance(body, str) and not re.fullmatch(r"[0-9a-f]{32}", body) else []


def leaks(body: object) -> list[str]:
    text = "\n".join(_texts(body))
    return [v for v in PLANTED if v in text]


async def raw_looks(admin: httpx.AsyncClient, cid: str) -> list[dict[str, object]]:
    entries = (await admin.get("/api/v1/audit")).json()["items"]
    return [e for e in entries if e["action"] == "transcript.raw" and e["subject"] == cid]


async def test_transcripts_are_redacted_by_default_and_raw_text_is_an_audited_reviewer_step(app: App) -> None:
    assert app.store is not None
    cid, _ = await seed_pii(app.store)
    vic, rita, alice = [await login(app, n) for n in ("vic", "rita", "alice")]
    try:
        for client in (vic, rita, alice):  # every role: the default view is redacted
            view = (await client.get(f"/api/v1/conversations/{cid}")).json()
            assert view["redacted"] is True and not leaks(view), leaks(view)
            text = json.dumps(view)
            for kind in ("[EMAIL]", "[PHONE]", "[NAME]", "[ADDRESS]", "[CARD]"):
                assert kind in text
            listing = (await client.get("/api/v1/conversations")).json()["items"]
            preview = next(i["preview"] for i in listing if i["id"] == cid)
            assert not leaks(preview) and preview.endswith("…") and len(preview) <= 160
        assert not await raw_looks(alice, cid)

        refused = await vic.get(f"/api/v1/conversations/{cid}/raw")  # a viewer never sees raw text
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"

        raw = (await rita.get(f"/api/v1/conversations/{cid}/raw")).json()
        assert raw["redacted"] is False and set(leaks(raw)) == set(PLANTED)
        looks = await raw_looks(alice, cid)
        assert [e["actor"] for e in looks] == ["rita"]
        await rita.get(f"/api/v1/conversations/{cid}/raw")  # the page's 2 s poll: one entry per look
        assert len(await raw_looks(alice, cid)) == 1
        await alice.get(f"/api/v1/conversations/{cid}/raw")
        assert sorted(str(e["actor"]) for e in await raw_looks(alice, cid)) == ["alice", "rita"]
    finally:
        for client in (vic, rita, alice):
            await client.aclose()


def test_a_preview_redacts_a_bounded_prefix_and_shows_no_half_value_from_its_edge() -> None:
    seen: list[int] = []

    def recording(text: str) -> list[Span]:
        seen.append(len(text))
        return []

    long_first = "hello " * 700  # 4,200 characters: the console looks at 400 of them, once
    out = redacted.preview(long_first, (*DEFAULT_DETECTORS, recording))
    assert seen == [redacted.REDACT_CHARS] and out.endswith("…") and len(out) == 160
    # a long street shrinks to [ADDRESS]: the 160 characters shown reach far into the raw text, and
    # an e-mail address cut at the 400th character is half an address the detectors never saw
    street = "12 " + " ".join(["A" + "a" * 59] * 4) + " Street"
    text = street + " " + "y" * (redacted.REDACT_CHARS - 5 - len(street) - 1) + EMAIL + " thanks"
    assert text.index(EMAIL) < redacted.REDACT_CHARS < text.index(EMAIL) + len(EMAIL)
    out = redacted.preview(text)
    assert out.startswith("[ADDRESS] yyy") and out.endswith("…") and "jane" not in out, out


async def test_a_hostile_first_message_does_not_stall_the_console(app: App) -> None:
    """60 times "市" once never finished the address pattern; the list and the transcript answer."""
    assert app.store is not None
    cid = uuid.uuid4().hex
    await app.store.conversations.create(cid, user_id=None)
    parent = None
    for text in ("市" * 60, "北京市" * 1333, "市" * 3990 + "路1号"):
        m = await app.store.conversations.add_message(
            message_id=uuid.uuid4().hex, conversation_id=cid, role=Role.USER, text=text, parent_id=parent
        )
        parent = m.id
    vic = await login(app, "vic")
    try:
        with at_most(20.0, "the console on hostile text"):
            listing = (await vic.get("/api/v1/conversations")).json()["items"]
            view = (await vic.get(f"/api/v1/conversations/{cid}")).json()
        assert next(i["preview"] for i in listing if i["id"] == cid) == "市" * 60
        assert view["messages"][2]["text"].endswith("[ADDRESS]")
    finally:
        await vic.aclose()


@pytest.mark.sqlite_only("fills the SQLite file with PRAGMA max_page_count (no per-test full disk on PostgreSQL)")
async def test_a_raw_look_whose_audit_entry_fails_is_not_shown_and_the_next_look_is_audited(app: App) -> None:
    """The database is full: the audit entry cannot be written, so the raw text is not served (507),
    and the look is not counted as audited: once there is room, the next look writes its entry."""
    assert app.store is not None
    cid, _ = await seed_pii(app.store)
    rita, alice = await login(app, "rita"), await login(app, "alice")
    try:
        await fill_the_database(app.store)
        for _ in range(100_000):  # and the audit log's last page: smaller entries than a look's
            try:
                await app.store.accounts.audit("f", "f", None)
            except StorageFullError:
                break
        refused = await rita.get(f"/api/v1/conversations/{cid}/raw")
        assert refused.status_code == 507 and refused.json()["error"]["code"] == "storage_full"
        await set_page_limit(app.store, 1_000_000)
        raw = await rita.get(f"/api/v1/conversations/{cid}/raw")
        assert raw.status_code == 200 and leaks(raw.json())
        assert [e["actor"] for e in await raw_looks(alice, cid)] == ["rita"]
    finally:
        for client in (rita, alice):
            await client.aclose()


# a client may use an e-mail address or a phone number as a user id or a rater id
USER_ID, RATER = "li.wei@example.org", "+86 138 0013 8000"


async def test_reasons_and_personal_ids_are_redacted_and_search_is_the_reviewers(app: App) -> None:
    """Every free text of the default view (ratings' reasons, correction and exclusion reasons) and
    the ids a client chose (user id, rater) when they are personal data; the rater list likewise for
    viewers. ``q`` searches the raw text: reviewers and admins only."""
    assert app.store is not None
    store = app.store
    cid = uuid.uuid4().hex
    await store.conversations.create(cid, user_id=USER_ID)
    ask = await store.conversations.add_message(
        message_id=uuid.uuid4().hex, conversation_id=cid, role=Role.USER, text="hello", parent_id=None
    )
    reply = await store.conversations.add_message(
        message_id=uuid.uuid4().hex, conversation_id=cid, role=Role.ASSISTANT, text="hi", parent_id=ask.id
    )
    await store.conversations.add_rating(
        message_id=reply.id, value=-1, rater=RATER, client_id="r1", reason=f"wrong, mail {EMAIL}"
    )
    await store.conversations.add_correction(
        message_id=reply.id, text="Hi.", operator="rita", reason=f"asked on {PHONE}"
    )
    await store.conversations.exclude_message(reply.id, reason=f"has card {CARD}", operator="rita")
    await store.raters.flag({RATER: ["burst"]})
    planted = (USER_ID, RATER, EMAIL, CARD, PHONE, "li.wei", "0013 8000", "1234567")
    vic, rita = await login(app, "vic"), await login(app, "rita")
    try:
        view = (await vic.get(f"/api/v1/conversations/{cid}")).json()
        text = json.dumps(view, ensure_ascii=False)
        assert not [v for v in planted if v in text], text
        rating = view["messages"][1]["ratings"][0]
        assert rating["rater"] == "[PHONE]" and rating["reason"] == "wrong, mail [EMAIL]"
        assert view["messages"][1]["corrections"][0]["reason"] == "asked on [PHONE]"
        assert view["messages"][1]["excluded"]["reason"] == "has card [CARD]"
        assert view["conversation"]["user_id"] == "[EMAIL]"
        listing = (await vic.get("/api/v1/conversations")).json()["items"]
        assert next(i["user_id"] for i in listing if i["id"] == cid) == "[EMAIL]"
        for_viewer = (await vic.get("/api/v1/raters")).json()["items"]
        assert [r["rater"] for r in for_viewer] == ["[PHONE]"]
        for_reviewer = (await rita.get("/api/v1/raters")).json()["items"]  # who acts on a rater by its id
        assert [r["rater"] for r in for_reviewer] == [RATER]
        raw = json.dumps((await rita.get(f"/api/v1/conversations/{cid}/raw")).json(), ensure_ascii=False)
        assert all(v in raw for v in (USER_ID, RATER, EMAIL, CARD, PHONE))

        refused = await vic.get("/api/v1/conversations", params={"q": "0013"})  # a prefix oracle for a viewer
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
        found = await rita.get("/api/v1/conversations", params={"q": "hello"})
        assert found.status_code == 200 and cid in [i["id"] for i in found.json()["items"]]
    finally:
        for client in (vic, rita):
            await client.aclose()
