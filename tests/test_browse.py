"""The console's conversation list on both backends: every filter, the search, and keyset paging
give what was stored, through the probe window and beyond it (``PROBE_WINDOW`` made small here
so that both steps of ``Browse._probed_page`` run on a few dozen conversations)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from feedback import FeedbackStore, Role
from feedback import browse as browse_module
from feedback.browse import ConversationFilter
from tests.store_backends import StoreTarget

N = 40


def words(i: int) -> str:
    topic = ("refund", "shipping", "hello")[i % 3]
    return f"{topic} question {i}" + (" blender" if i % 5 == 0 else "")


async def seed(store: FeedbackStore) -> None:
    await store.versions.ensure_base("m")
    await store.raters.flag({"mallory": ["burst"]})
    for i in range(N):
        cid = f"c{i:02d}"
        await store.conversations.create(cid, user_id=f"u{i}", channel="telegram" if i % 2 else "websocket")
        await store.conversations.add_message(
            message_id=f"{cid}-u", conversation_id=cid, role=Role.USER, text=words(i), parent_id=None
        )
        await store.conversations.add_message(
            message_id=f"{cid}-a",
            conversation_id=cid,
            role=Role.ASSISTANT,
            text=f"answer {i}",
            parent_id=f"{cid}-u",
            model_version="base" if i % 2 == 0 else "v1",
            finish_reason="stop",
            latency_ms=100.0,
        )
        if i % 4 in (0, 1):
            value = 1 if i % 4 == 0 else -1
            rater = "mallory" if i % 8 == 1 else f"u{i}"
            await store.conversations.add_rating(message_id=f"{cid}-a", value=value, rater=rater, client_id=cid)
        if i % 7 == 0:
            await store.conversations.add_correction(message_id=f"{cid}-a", text="better", operator="op")


CASES: dict[str, tuple[ConversationFilter, Callable[[int], bool]]] = {
    "all": (ConversationFilter(), lambda i: True),
    "rated up": (ConversationFilter(rating="up"), lambda i: i % 4 == 0),
    "rated down": (ConversationFilter(rating="down"), lambda i: i % 4 == 1),
    "not rated": (ConversationFilter(rating="none"), lambda i: i % 4 > 1),
    "version v1": (ConversationFilter(version="v1"), lambda i: i % 2 == 1),
    "corrected": (ConversationFilter(has_correction=True), lambda i: i % 7 == 0),
    "not corrected": (ConversationFilter(has_correction=False), lambda i: i % 7 != 0),
    "flagged": (ConversationFilter(flagged=True), lambda i: i % 8 == 1),
    "telegram": (ConversationFilter(channel="telegram"), lambda i: i % 2 == 1),
    "search a word": (ConversationFilter(q="refund"), lambda i: i % 3 == 0),
    "search a prefix": (ConversationFilter(q="ship"), lambda i: i % 3 == 1),
    "search two words": (ConversationFilter(q="refund blend"), lambda i: i % 15 == 0),
    "search with operators": (ConversationFilter(q='refund & !"x" | <->'), lambda i: False),
    "search and rating": (ConversationFilter(q="question", rating="up"), lambda i: i % 4 == 0),
    "version and correction": (ConversationFilter(version="base", has_correction=True), lambda i: i % 14 == 0),
    "channel and rating": (ConversationFilter(channel="telegram", rating="down"), lambda i: i % 4 == 1),
}


@pytest.mark.parametrize("window", [2000, 5], ids=["window-2000", "window-5"])
async def test_every_filter_pages_through_what_was_stored(
    store_target: StoreTarget, window: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(browse_module, "PROBE_WINDOW", window)
    monkeypatch.setattr(browse_module, "COMMON_MATCHES", 3)  # a search this common drives last
    async with await store_target.open() as store:
        await seed(store)
        for name, (f, expected) in CASES.items():
            seen: list[str] = []
            cursor: str | None = None
            for _ in range(N):
                page, cursor = await store.browse.list_conversations(f, limit=4, cursor=cursor)
                seen += [row["id"] for row in page]
                if cursor is None:
                    break
            want = [f"c{i:02d}" for i in reversed(range(N)) if expected(i)]
            assert seen == want, name
        [row], _ = await store.browse.list_conversations(ConversationFilter(q="blender"), limit=1)
        assert (row["id"], row["versions"], row["ups"], row["corrections"], row["n_messages"]) == (
            "c35",
            ["v1"],
            0,
            1,
            2,
        )
        transcript = await store.browse.transcript("c00")
        assert transcript is not None
        assert [m["id"] for m in transcript["messages"]] == ["c00-u", "c00-a"]
        assert transcript["messages"][1]["ratings"][0]["value"] == 1
        assert transcript["conversation"]["flagged"] is False


async def test_the_whole_history_tables_count_what_was_stored(store_target: StoreTarget) -> None:
    """Thumbs per channel and version, the per-version series and the Versions page's stats: the
    PostgreSQL backend reads them in one grouped pass over ratings (its own SQL), SQLite with
    subqueries; both give the stored counts."""
    async with await store_target.open() as store:
        await seed(store)
        channels = await store.browse.channel_stats()
        assert [(r["channel"], r["version"], r["replies"], r["ups"], r["downs"]) for r in channels] == [
            ("telegram", "v1", 20, 0, 10),
            ("websocket", "base", 20, 10, 0),
        ]
        series = await store.browse.version_series(bucket_s=1e10)
        assert [(r["version"], r["bucket_start"], r["replies"], r["ups"], r["downs"]) for r in series] == [
            ("base", 0, 20, 10, 0),
            ("v1", 0, 20, 0, 10),
        ]
        stats = await store.versions.all_stats()
        assert (stats["base"].conversations, stats["base"].replies, stats["base"].thumbs_up) == (20, 20, 10)
        assert (stats["v1"].thumbs_down, stats["v1"].regenerated, stats["v1"].mean_latency_ms) == (10, 0, 100.0)
        assert stats == {name: await store.versions.stats(name) for name in stats}
