"""Takeovers shared by several processes: the pure rules (``server/takeover.py``, milliseconds), the
store's rows (``store.takeovers``, both backends), and presence over PostgreSQL's ``NOTIFY`` with two
stores in one test process standing for two server processes (each with its own connections, as two
processes have; tests/test_multiprocess.py runs two real ``learnloop serve`` processes)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from feedback import FeedbackStore, InvalidError, NotFoundError, Role, Takeover
from server.presence import Presence
from server.protocol import ChatSession, Effect, Send
from server.replies import new_id
from server.takeover import Kind, Notice, apply, changes, decode, encode, reply_refusal
from tests.store_backends import StoreTarget

# --- the rules ----------------------------------------------------------------------------


def test_a_notice_goes_over_the_wire_and_back() -> None:
    for notice in (
        Notice("p1", Kind.JOINED, "c1", "rita", 1700000000.5),
        Notice("p1", Kind.REPLY, "c1", "rita", message_id="m9"),
        Notice("p2", Kind.LEFT, "c1"),
    ):
        assert decode(encode(notice)) == notice
    assert "text" not in encode(Notice("p1", Kind.REPLY, "c1", "rita", message_id="m9"))  # ids only


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "not json",
        "[]",
        '{"kind": "joined", "origin": "p", "conversation_id": "c"}',  # no operator, no since
        '{"kind": "reply", "origin": "p", "conversation_id": "c", "operator": "r"}',  # no message id
        '{"kind": "shouted", "origin": "p", "conversation_id": "c"}',
        '{"kind": "left", "origin": 3, "conversation_id": "c"}',
        '{"kind": "joined", "origin": "p", "conversation_id": "c", "operator": "r", "since": "noon"}',
    ],
)
def test_a_payload_that_is_no_notice_is_refused(payload: str) -> None:
    assert decode(payload) is None


def test_apply_keeps_the_view_of_who_answers_what() -> None:
    view = apply({}, Notice("p", Kind.JOINED, "c1", "rita", 10.0))
    assert view == {"c1": Takeover("c1", "rita", 10.0)}
    assert apply(view, Notice("p", Kind.REPLY, "c1", "rita", message_id="m")) == view
    assert apply(view, Notice("p", Kind.LEFT, "c1")) == {}
    assert apply({}, Notice("p", Kind.LEFT, "c1")) == {}  # a leave told twice


def test_changes_catch_up_what_a_cut_listener_missed() -> None:
    before = {"gone": Takeover("gone", "rita", 1.0), "kept": Takeover("kept", "rita", 2.0)}
    after = {
        "kept": Takeover("kept", "rita", 2.0),
        "new": Takeover("new", "alice", 3.0),
        "gone2": Takeover("gone2", "bob", 4.0),
    }
    found = changes(before, after, origin="me")
    assert Notice("me", Kind.LEFT, "gone") in found
    assert Notice("me", Kind.JOINED, "new", "alice", 3.0) in found
    assert len(found) == 3 and not [n for n in found if n.conversation_id == "kept"]
    view: dict[str, Takeover] = dict(before)
    for notice in found:
        view = apply(view, notice)
    assert view == after
    assert changes(after, after, origin="me") == []


def test_only_the_operator_who_holds_it_answers() -> None:
    assert reply_refusal(Takeover("c", "rita", 1.0), "rita") is None
    assert reply_refusal(Takeover("c", "rita", 1.0), "alice") is not None
    assert reply_refusal(None, "rita") is not None


# --- the store's rows (both backends) -------------------------------------------------------


async def conversation_with_a_question(store: FeedbackStore, user: str = "cust") -> str:
    cid = new_id()
    await store.conversations.create(cid, user_id=user)
    await store.conversations.add_message(
        message_id=new_id(), conversation_id=cid, role=Role.USER, text="Where is my parcel?", parent_id=None
    )
    return cid


async def test_a_takeover_is_held_by_one_operator_and_outlives_a_restart(store_target: StoreTarget) -> None:
    store = await store_target.open()
    try:
        cid = await conversation_with_a_question(store)
        first = await store.takeovers.join(cid, "rita")
        assert (await store.takeovers.join(cid, "rita")).since == first.since  # joining again keeps the time
        with pytest.raises(InvalidError, match="rita"):
            await store.takeovers.join(cid, "alice")
        with pytest.raises(NotFoundError):
            await store.takeovers.join("nope", "rita")
    finally:
        await store.close()
    store = await store_target.open()  # a restart
    try:
        assert await store.takeovers.all() == [first]
        assert await store.takeovers.leave(cid) is True
        assert await store.takeovers.leave(cid) is False
        assert await store.takeovers.get(cid) is None
    finally:
        await store.close()


# --- presence over PostgreSQL's NOTIFY ------------------------------------------------------


class Customer:
    """A connection as presence sees it: a real ``ChatSession``; the frames it would send are kept."""

    def __init__(self, conversation_id: str) -> None:
        self.session = ChatSession(new_id=new_id)
        self.session.opened(conversation_id, [], set(), "base")
        self.frames: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()

    async def apply(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Send):
                self.frames.append(effect.frame)
                self.arrived.set()

    async def until(self, kind: str, timeout: float = 10) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                for frame in self.frames:
                    if frame["type"] == kind:
                        return frame
                self.arrived.clear()
                await self.arrived.wait()


async def test_a_takeover_on_one_process_reaches_a_customer_on_the_other(postgres_target: StoreTarget) -> None:
    store_a, store_b = await postgres_target.open(), await postgres_target.open()
    a, b = Presence(store_a), Presence(store_b)
    try:
        await a.start()
        await b.start()
        cid = await conversation_with_a_question(store_a)
        customer = Customer(cid)
        b.attach(cid, customer)

        started = time.perf_counter()
        await a.join(cid, "rita")
        await customer.until("operator_joined")
        joined_s = time.perf_counter() - started
        assert customer.session.operator == "rita"  # the model stops answering on b
        assert b.takeovers[cid].operator == "rita"
        with pytest.raises(InvalidError, match="rita"):  # a second operator, on the other process
            await b.join(cid, "alice")
        with pytest.raises(InvalidError):
            await b.reply(cid, "alice", "hi")

        started = time.perf_counter()
        message = await a.reply(cid, "rita", "It ships today.")
        pushed = await customer.until("operator_message")
        reply_s = time.perf_counter() - started
        assert (pushed["message_id"], pushed["text"]) == (message.id, "It ships today.")

        await b.leave(cid)  # handed back from the other console
        await customer.until("operator_left")
        for _ in range(100):
            if cid not in a.takeovers:
                break
            await asyncio.sleep(0.01)
        assert cid not in a.takeovers and customer.session.operator is None
        print(f"\ntakeover a->b: operator_joined after {joined_s * 1000:.1f} ms, reply after {reply_s * 1000:.1f} ms")
    finally:
        await a.close()
        await b.close()
        await store_a.close()
        await store_b.close()


async def test_a_lost_listener_listens_again_and_catches_up_joins_and_leaves(postgres_target: StoreTarget) -> None:
    store_a, store_b = await postgres_target.open(), await postgres_target.open()
    a, b = Presence(store_a), Presence(store_b, retry_s=0.05)
    try:
        await a.start()
        await b.start()
        joined_before = await conversation_with_a_question(store_a, "u1")
        joined_during = await conversation_with_a_question(store_a, "u2")
        first, second = Customer(joined_before), Customer(joined_during)
        b.attach(joined_before, first)
        b.attach(joined_during, second)
        await a.join(joined_before, "rita")
        await first.until("operator_joined")  # a notice b got... then b's listening connection is cut
        first.frames.clear()
        cut = postgres_target.sql(  # both processes' listening connections (b's is the one watched)
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = %s",
            (f'LISTEN "learnloop:{postgres_target.schema}"',),
        )
        assert len(cut) == 2
        await a.leave(joined_before)  # meanwhile, one leave and one join b is not told of
        await a.join(joined_during, "alice")
        await second.until("operator_joined")  # caught up from the store when b listens again
        await first.until("operator_left")
        assert b.reconnects >= 1
        assert b.takeovers == {joined_during: (await store_a.takeovers.get(joined_during))}
    finally:
        await a.close()
        await b.close()
        await store_a.close()
        await store_b.close()


async def test_shared_token_buckets_follow_the_token_bucket_rule(postgres_target: StoreTarget) -> None:
    from server.ratelimit import TokenBucket

    store_a, store_b = await postgres_target.open(), await postgres_target.open()
    try:
        assert store_a.limits.shared
        rule = TokenBucket(rate=0.5, burst=3.0)
        t0 = 1_000_000.0
        for i, dt in enumerate([0, 0.1, 0.2, 0.3, 0.4, 2.5, 2.6, 9.0, 9.1, 9.2, 9.3, 9.4]):
            store = (store_a, store_b)[i % 2]  # two processes taking turns: one bucket
            got = await store.limits.take("ratings", "ann", rate=0.5, burst=3, now=t0 + dt)
            want = rule.take(t0 + dt)
            assert (got is None) == (want is None), (i, got, want)
            if want is not None:
                assert got == pytest.approx(want)
        assert await store_a.limits.take("ratings", "bob", rate=0.5, burst=3, now=t0 + 9.4) is None  # per key
        assert await store_a.limits.take("login", "ann", rate=0.5, burst=3, now=t0 + 9.4) is None  # per scope
        # the buckets that refilled are forgotten; ann's (1.5 tokens at t0 + 12, full at t0 + 15) is kept
        assert await store_a.limits.prune(now=t0 + 12.0) == 2
        assert await store_b.limits.take("ratings", "ann", rate=0.5, burst=3, now=t0 + 12.0) is None
        assert await store_b.limits.take("ratings", "ann", rate=0.5, burst=3, now=t0 + 12.0) == pytest.approx(1.0)

        # checks asked at once share statements; the same key asked five times takes three tokens, not five
        before = store_a.limits.statements
        at = t0 + 100.0
        answers = await asyncio.gather(
            *(store_a.limits.take("ratings", f"k{i}", rate=0.5, burst=3, now=at) for i in range(50)),
            *(store_a.limits.take("ratings", "carl", rate=0.5, burst=3, now=at) for _ in range(5)),
        )
        assert answers[:50] == [None] * 50
        assert sum(a is None for a in answers[50:]) == 3
        assert store_a.limits.statements - before <= 6  # 55 checks: one statement per round of distinct keys
    finally:
        await store_a.close()
        await store_b.close()


async def test_a_lost_counter_connection_is_replaced_and_the_limit_keeps_counting(postgres_target: StoreTarget) -> None:
    store = await postgres_target.open()
    try:
        t0 = 2_000_000.0
        assert await store.limits.take("login", "name:rita", rate=0.1, burst=2, now=t0) is None
        cut = postgres_target.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE query LIKE %s AND query NOT LIKE %s AND pid <> pg_backend_pid()",
            ("%INSERT INTO rate_buckets%", "%pg_stat_activity%"),
        )
        assert len(cut) == 1
        # asked again on a new connection: the bucket is in the table, so the second token is the last
        assert await store.limits.take("login", "name:rita", rate=0.1, burst=2, now=t0) is None
        assert await store.limits.take("login", "name:rita", rate=0.1, burst=2, now=t0) == pytest.approx(10.0)
    finally:
        await store.close()
