"""The operator console in a real browser: Debian's chromium driven by Playwright.

Against a real running server (gateway + console, tiny model): log in, filter and search
conversations, open a transcript, write a correction and find it in the dataset preview,
promote and roll back a version, and take over a live conversation while a websocket
client receives the operator's reply (and see what the customer wrote after each reply). Screenshots go to ``test-artifacts/console/`` (or
``$LEARNLOOP_ARTIFACTS``), which ``.ci/run`` lists at the end.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from feedback import Role, RunState
from server.app import App
from server.protocol import Turn
from server.replies import reaction_after
from tests.console_support import PASSWORD, Seeded, register_adapter, running_app, seed
from training.implicit import ImplicitConfig

CHROMIUM = os.environ.get("LEARNLOOP_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("LEARNLOOP_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))

if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        raise RuntimeError(f"chromium not found at {CHROMIUM}: .ci/run installs Debian's chromium package")
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)

playwright_api = pytest.importorskip("playwright.async_api")


@pytest.fixture
async def app(tiny_model: Path, tmp_path: Path) -> AsyncIterator[App]:
    async with running_app(tiny_model, tmp_path) as a:
        yield a


@pytest.fixture
async def page(app: App) -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        # bypass_csp: wait_for_function evaluates strings, which the console's CSP (rightly) forbids
        context = await browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)
        pg = await context.new_page()
        pg.set_default_timeout(15_000)
        errors: list[str] = []
        pg.on("pageerror", lambda exc: errors.append(str(exc)))
        yield pg
        await browser.close()
        assert not errors, f"javascript errors in the console: {errors}"


async def shot(page: Any, name: str) -> None:
    folder = ARTIFACTS / "console"
    folder.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


async def log_in(page: Any, app: App, name: str, path: str = "/conversations") -> None:
    response = await page.goto(f"http://127.0.0.1:{app.console_port}{path}")
    assert response.status == 401  # the page itself is behind the login; the form is what it shows
    await page.fill("#login-name", name)
    await page.fill("#login-password", PASSWORD)
    await page.click("#login-submit")
    await page.wait_for_selector("#whoami")
    assert name in await page.inner_text("#whoami")


async def test_review_correct_and_release_in_the_browser(app: App, page: Any, tiny_model: Path, tmp_path: Path) -> None:
    assert app.store is not None
    seeded: Seeded = await seed(app.store)
    version = await register_adapter(app, tiny_model, tmp_path / "adapters" / "v1")
    await log_in(page, app, "alice")
    rows = page.locator("tr.conv-row")
    await rows.first.wait_for()
    assert await rows.count() == 3
    await shot(page, "01-conversations")

    # filter: thumbs-down only, then full-text search
    await page.select_option("#filter-rating", "down")
    await page.click("#filter-apply")
    await page.wait_for_function("document.querySelectorAll('tr.conv-row').length === 1")
    assert await rows.first.get_attribute("data-id") == seeded.refund
    await page.select_option("#filter-rating", "")
    # "Customer wrote": a complaint after the Telegram reply (implicit feedback) finds that conversation
    messages = await app.store.conversations.messages(seeded.telegram)
    branch = [Turn(m.id, str(m.role), m.text) for m in messages]
    complaint = "no, that's wrong"
    await app.store.conversations.add_message(
        message_id="complaint",
        conversation_id=seeded.telegram,
        role=Role.USER,
        text=complaint,
        parent_id=messages[-1].id,
        reaction=reaction_after(branch, message_id="complaint", text=complaint, config=ImplicitConfig()),
    )
    await page.select_option("#filter-reaction", "down")
    await page.click("#filter-apply")
    await page.wait_for_function("new URLSearchParams(location.search).get('reaction') === 'down'")
    await page.wait_for_function(
        f"[...document.querySelectorAll('tr.conv-row')].map(r => r.dataset.id).join() === '{seeded.telegram}'"
    )
    await page.select_option("#filter-reaction", "")
    await page.fill("#search-q", "shipping")
    await page.press("#search-q", "Enter")
    await page.wait_for_function(
        f"[...document.querySelectorAll('tr.conv-row')].map(r => r.dataset.id).join() === '{seeded.shipping}'"
    )
    await shot(page, "02-search")

    # filter by channel: the Telegram conversation alone
    await page.fill("#search-q", "")
    await page.select_option("#filter-channel", "telegram")
    await page.click("#filter-apply")
    await page.wait_for_function(
        f"[...document.querySelectorAll('tr.conv-row')].map(r => r.dataset.id).join() === '{seeded.telegram}'"
    )
    assert "telegram · support" in await rows.first.locator(".conv-channel").inner_text()
    await shot(page, "02b-channel-filter")
    # and by site: the bot "support" has that one; no conversation came through a site "nosuch"
    await page.fill("#filter-site", "support")
    await page.click("#filter-apply")
    await page.wait_for_function("new URLSearchParams(location.search).get('site') === 'support'")
    await page.wait_for_function(
        f"[...document.querySelectorAll('tr.conv-row')].map(r => r.dataset.id).join() === '{seeded.telegram}'"
    )
    await page.fill("#filter-site", "nosuch")
    await page.click("#filter-apply")
    await page.wait_for_function("document.querySelectorAll('tr.conv-row').length === 0")
    await page.fill("#filter-site", "")
    await page.select_option("#filter-channel", "")

    # open the refund transcript from the list
    await page.fill("#search-q", "blender")
    await page.press("#search-q", "Enter")
    await page.wait_for_function(
        f"[...document.querySelectorAll('tr.conv-row')].map(r => r.dataset.id).join() === '{seeded.refund}'"
    )
    await page.click(f"tr.conv-row[data-id='{seeded.refund}'] .conv-preview a")
    reply = page.locator(f".msg[data-id='{seeded.refund_reply}']")
    await reply.wait_for()
    assert "base" in await reply.locator(".msg-version").inner_text()
    assert await reply.locator("li.rating[data-value='-1']").count() == 1

    # write a correction with a reason tag
    better = "Refunds are accepted within 30 days of delivery."
    await reply.locator("button.correct-btn").click()
    await reply.locator("textarea.correction-text").fill(better)
    await reply.locator("input.correction-reason").fill("wrong-fact")
    await reply.locator("button.correction-save").click()
    await page.wait_for_selector(f".msg[data-id='{seeded.refund_reply}'] .correction:has-text('30 days')")
    await shot(page, "03-transcript-corrected")

    # the correction is in the next run's dataset preview
    await page.click("a[data-nav=dataset]")
    await page.wait_for_selector("#dataset-rows .dataset-row")
    assert better in await page.inner_text("#dataset-rows")
    await shot(page, "04-dataset-preview")

    # promote the candidate, then roll it back
    await page.click("a[data-nav=versions]")
    row = page.locator(f"tr.version-row[data-name='{version}']")
    await row.wait_for()
    # the gate's reading of the replies, without opening the raw report
    assert (
        await row.locator(".eval-replies").inner_text()
        == "replies 0.41 vs live 0.16 (5 better, 1 worse of 6) · leaks 0 vs 1"
    )
    await row.locator(".promote-btn").click()
    await page.wait_for_function(
        f"document.querySelector(\"tr.version-row[data-name='{version}'] .version-state\").textContent.includes('live')"
    )
    assert app.release.live_version == version
    assert await row.locator(".rollback-btn").get_attribute("title") == "back to base"  # where it leads
    await shot(page, "05-promoted")
    await row.locator(".rollback-btn").click()
    await page.wait_for_function(
        f"document.querySelector(\"tr.version-row[data-name='{version}'] .version-state\")"
        ".textContent.includes('rolled_back')"
    )
    assert app.release.live_version == "base"
    base = page.locator("tr.version-row[data-name='base']")
    assert "live" in await base.locator(".version-state").inner_text()
    assert await base.locator(".rollback-btn").count() == 0  # base has nothing to roll back to
    assert "conversations\n3" in await base.locator(".version-stats").inner_text()  # the 3 it replied in
    await shot(page, "06-rolled-back")
    audit = {e["action"] for e in await app.store.browse.audit_log(limit=50)}
    assert {"correct", "state:live", "state:rolled_back", "login"} <= audit

    # charts per version, a run's loss curve, the audit log
    await page.click("a[data-nav=charts]")
    await page.wait_for_function("document.querySelectorAll('svg.chart').length === 5")
    assert await page.locator("svg.chart[data-metric=up_rate]").count() == 1
    # thumbs per channel and version: the rated websocket replies as a bar, every channel in the table
    assert await page.locator("#channel-chart rect.bar[data-channel=websocket][data-version=base]").count() == 1
    assert await page.locator("#channel-table tr[data-channel=telegram]").count() == 1
    await shot(page, "07-charts")
    await page.locator("#by-channel").screenshot(path=str(ARTIFACTS / "console" / "07b-thumbs-by-channel.png"))
    run_id = await app.store.runs.start(max_rating_id=0, max_correction_id=0)
    history = [{"step": i, "loss": 2.0 / i} for i in range(1, 21)]
    await app.store.runs.update(run_id, progress={"step": 20, "max_steps": 20, "loss": 0.1, "history": history})
    await app.store.runs.finish(run_id, state=RunState.SUCCEEDED, version=version)
    await page.click("a[data-nav=runs]")
    await page.click(f"tr.run-row[data-id='{run_id}'] a")
    await page.wait_for_selector("svg#loss-chart path, svg#loss-chart polyline")
    # what the run did with its time budget, from the version's eval report
    await page.wait_for_function("document.querySelector('#run-info').textContent.includes('of rows seen')")
    info = await page.inner_text("#run-info")
    assert "dpo 10/10 steps, 1 epochs; sft 2/2 steps" in info and "100% of rows seen · budget 30 min" in info
    await shot(page, "08-run-loss-curve")
    await page.click("a[data-nav=audit]")
    await page.wait_for_selector("tr.audit-row")
    assert "state:rolled_back" in await page.inner_text("#audit-table")


async def test_take_over_a_live_conversation_in_the_browser(app: App, page: Any, open_client: Any) -> None:
    customer = await open_client(app.port)
    ready = await customer.hello(user="cust-live")
    cid = ready["conversation_id"]
    await customer.chat("My parcel never arrived.", "c1")

    await log_in(page, app, "rita", f"/conversations/{cid}")
    await page.wait_for_selector(".msg[data-role=assistant]")
    assert "connected: 1" in await page.inner_text("#connected")
    await page.click("#takeover-start")
    await customer.until("operator_joined")

    # the customer writes while the operator holds the conversation: it shows up in the console
    await customer.send(type="message", text="Hello, is someone there?", client_id="c2")
    await customer.until("ack")
    await page.wait_for_selector(".msg[data-role=user]:has-text('is someone there')")

    answer = "Hi, this is Rita from support. I have re-sent your parcel today."
    await page.fill("#takeover-text", answer)
    await page.click("#takeover-send")
    pushed, seen = await customer.until("operator_message")
    assert pushed["text"] == answer
    assert not [f for f in seen if f["type"] == "token"]  # no model reply while an operator answers
    await page.wait_for_selector(".msg[data-role=assistant]:has-text('re-sent your parcel')")
    await shot(page, "09-takeover")

    await page.click("#takeover-stop")
    await customer.until("operator_left")
    done, _ = await customer.chat("Thank you!", "c3")  # the model answers again
    assert done["model_version"] == "base"
    # what the customer wrote after each reply shows on it: a weak label, not a thumb
    thanked = page.locator(".msg[data-role=assistant]:has-text('re-sent your parcel') .reaction")
    await thanked.wait_for()
    assert (await thanked.get_attribute("data-signal"), await thanked.inner_text()) == (
        "gratitude",
        "customer: gratitude ▲",
    )
    await shot(page, "09b-reactions")
    first_reply = page.locator(".msg[data-role=assistant]").first
    assert await first_reply.locator(".reaction").get_attribute("data-signal") == "none"  # "is someone there?"


async def test_the_transcript_shows_personal_data_only_after_the_toggle(app: App, page: Any) -> None:
    """Scenario 14 in the browser: redacted by default; a reviewer's toggle shows the raw text."""
    from tests.test_console_redaction import EMAIL, PHONE, seed_pii

    assert app.store is not None
    cid, _ = await seed_pii(app.store)
    await log_in(page, app, "rita", f"/conversations/{cid}")
    await page.locator(".msg").first.wait_for()
    shown = await page.inner_text("#messages")
    assert "[EMAIL]" in shown and "[PHONE]" in shown and EMAIL not in shown and PHONE not in shown
    assert "redacted" in await page.inner_text("#redaction-note")
    await shot(page, "14-redacted")
    await page.click("#raw-toggle")
    await page.wait_for_function(f"document.querySelector('#messages').innerText.includes('{EMAIL}')")
    assert "audit log" in await page.inner_text("#redaction-note")
    assert await page.inner_text("#raw-toggle") == "Hide personal data"
    await page.click("#raw-toggle")
    await page.wait_for_function(f"!document.querySelector('#messages').innerText.includes('{EMAIL}')")
