"""The IM channels' store: inbox dedupe, outbox lanes and attempts, one-transaction finish, erasure.
On a real SQLite file and a real PostgreSQL (``store_target``)."""

from __future__ import annotations

import time
from pathlib import Path

from feedback import Role
from feedback.inbox import InboxItem, InboxState, Thread
from feedback.outbox import OutboxItem, OutboxState
from tests.store_backends import StoreTarget


def item(key: str, lane: str = "telegram:support:42", **body: object) -> OutboxItem:
    return OutboxItem(key, "telegram", "support", lane, "sendMessage", {"chat_id": 42, **body})


def event(key: str, *, lane: str = "telegram:support:42", user: str | None = "telegram:42") -> InboxItem:
    return InboxItem("telegram", "support", key, lane, "message", {"text": "hi"}, f"t-{key}", f"r-{key}", user)


async def test_a_redelivered_event_is_received_once_also_after_reopening(store_target: StoreTarget) -> None:
    async with await store_target.open() as store:
        assert await store.inbox.receive(event("update:1")) is True
        assert await store.inbox.receive(event("update:1")) is False
        assert await store.inbox.receive(event("update:2")) is True
    async with await store_target.open() as store:
        assert await store.inbox.receive(event("update:1")) is False  # durable: across a restart
        [head] = await store.inbox.due(time.time())  # update:2 waits behind update:1 in its lane
        assert (head.key, head.turn_id, head.reply_id, head.payload) == (
            "update:1",
            "t-update:1",
            "r-update:1",
            {"text": "hi"},
        )
        await store.inbox.finish(head.id, send=[item("reply:1")])
        [head] = await store.inbox.due(time.time())
        assert head.key == "update:2"
        done = await store.inbox.get(1)
        assert done is not None and done.state is InboxState.DONE and done.payload == {}  # the text is gone
        assert [r.key for r in await store.outbox.rows()] == ["reply:1"]
        assert await store.inbox.receive(event("update:1")) is False  # the key outlives the text

        now = time.time()
        await store.inbox.retry_later(head.id, error="overloaded", at=now + 60, count=False)  # a wait
        await store.inbox.retry_later(head.id, error="boom", at=now + 60)  # a failure
        waiting = await store.inbox.get(head.id)
        assert waiting is not None and (waiting.attempts, waiting.last_error) == (1, "boom")
        assert await store.inbox.due(now) == [] and await store.inbox.next_due_at() == now + 60


async def test_outbox_keys_lanes_and_attempts(store_target: StoreTarget) -> None:
    async with await store_target.open() as store:
        assert await store.outbox.enqueue([item("a"), item("b"), item("c", lane="telegram:support:7")]) == 3
        assert await store.outbox.enqueue([item("a", text="again")]) == 0  # the same key is one call
        now = time.time()
        heads = await store.outbox.due(now)
        assert [r.key for r in heads] == ["a", "c"]  # b waits for a: replies of a chat stay in order
        assert [r.key for r in await store.outbox.due(now, skip_lanes=["telegram:support:42"])] == ["c"]
        a = heads[0]
        await store.outbox.begin_attempt(a.id)
        row = await store.outbox.get(a.id)
        assert row is not None and (row.attempts, row.uncertain) == (1, True)
        await store.outbox.retry_later(a.id, error="ConnectError", at=now + 60, uncertain=False)
        row = await store.outbox.get(a.id)
        assert row is not None and (row.uncertain, row.last_error, row.next_attempt_at) == (
            False,
            "ConnectError",
            now + 60,
        )
        assert [r.key for r in await store.outbox.due(now)] == ["c"]  # the lane waits for its head's next try
        assert await store.outbox.next_due_at() == heads[1].next_attempt_at
        await store.outbox.delivered(heads[1].id, {"message_id": 5})
        delivered = await store.outbox.get(heads[1].id)
        assert (
            delivered is not None
            and delivered.state is OutboxState.DELIVERED
            and delivered.response == {"message_id": 5}
        )
        assert await store.outbox.counts() == {"pending": 2, "delivered": 1, "failed": 0}


async def test_outbox_gives_up_old_rows_and_an_operator_requeues_them(store_target: StoreTarget) -> None:
    async with await store_target.open() as store:
        await store.outbox.enqueue([item("old")])
        [row] = await store.outbox.give_up(created_before=time.time() + 1)
        failed = await store.outbox.get(row.id)
        assert (
            failed is not None
            and failed.state is OutboxState.FAILED
            and "gave up after 0 attempts" in (failed.last_error or "")
        )
        assert await store.outbox.due(time.time()) == []
        assert await store.outbox.requeue([row.id, 999]) == 1
        [again] = await store.outbox.due(time.time())
        assert again.id == row.id and again.state is OutboxState.PENDING
        await store.outbox.delivered(row.id)
        assert await store.outbox.prune(delivered_before=time.time() - 60) == 0
        assert await store.outbox.prune(delivered_before=time.time() + 1) == 1


async def test_threads_map_to_their_newest_conversation(store_target: StoreTarget) -> None:
    async with await store_target.open() as store:
        thread = Thread("telegram", "support", "42")
        assert await store.inbox.thread_conversation(thread) is None
        for cid in ("c1", "c2"):
            await store.conversations.create(cid, user_id="telegram:42", channel="telegram", site="support")
            await store.inbox.map_thread(cid, thread)
        assert await store.inbox.thread_conversation(thread) == "c2"
        assert await store.inbox.thread_of("c1") == thread
        assert await store.inbox.thread_of("nope") is None


async def test_erasing_a_user_takes_their_threads_outbox_and_pending_events(store_target: StoreTarget) -> None:
    async with await store_target.open() as store:
        await store.conversations.create("c1", user_id="telegram:42", channel="telegram", site="support")
        await store.conversations.add_message(
            message_id="u1", conversation_id="c1", role=Role.USER, text="secret order 4711", parent_id=None
        )
        await store.inbox.map_thread("c1", Thread("telegram", "support", "42"))
        await store.outbox.enqueue(
            [OutboxItem("reply:1", "telegram", "support", "l", "sendMessage", {"text": "about 4711"}, "c1")]
        )
        await store.inbox.receive(event("update:9"))
        await store.inbox.receive(event("update:10", lane="other", user="telegram:43"))
        await store.erasure.erase_user("telegram:42", actor="test")
        assert await store.inbox.thread_of("c1") is None
        assert await store.outbox.rows() == []
        assert [r.key for r in await store.inbox.rows()] == ["update:10"]
    if store_target.backend == "sqlite":  # the bytes left the file (PostgreSQL: tests/test_erasure.py)
        assert isinstance(store_target.target, Path)
        assert b"4711" not in store_target.target.read_bytes()
