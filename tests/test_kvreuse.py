"""The KV book's rules (server/engines/kvreuse.py), pure: which cells a new reply reuses, and how."""

from __future__ import annotations

from server.engines import KvBook, Op, common_prefix, lane_for

SYSTEM = list(range(100, 120))  # a rendered system turn of 20 tokens


def test_next_turn_reuses_its_parked_cells_in_place() -> None:
    book = KvBook(2, 1, min_reuse=4)
    turn1 = [*SYSTEM, 1, 2, 3]
    plan = book.plan("base", turn1)
    assert (plan.seq, plan.reuse, plan.ops) == (0, 0, [Op("keep", 0, n=0)])
    book.release(0, "base", turn1)
    turn2 = [*turn1, 7, 8, 9, 10]
    plan = book.plan("base", turn2)
    assert (plan.seq, plan.reuse, plan.ops) == (0, len(turn1), [Op("keep", 0, n=len(turn1))])
    assert book.copies == 0 and book.reused_tokens == len(turn1)


def test_regeneration_prefills_the_last_two_tokens_again() -> None:
    book = KvBook(1, 0, min_reuse=4)
    prompt = [*SYSTEM, 1, 2, 3]
    book.plan("base", prompt)
    book.release(0, "base", prompt)
    assert book.plan("base", prompt).reuse == len(prompt) - 2


def test_other_version_never_reuses_and_parked_cells_move_to_the_pool() -> None:
    book = KvBook(1, 1, min_reuse=4)
    prompt = [*SYSTEM, 1, 2, 3]
    book.plan("base", prompt)
    book.release(0, "base", prompt)
    plan = book.plan("v1", prompt)  # the hot-swapped version: same tokens, other weights
    assert plan.reuse == 0 and plan.ops == [Op("copy", 1, src=0), Op("keep", 0, n=0)]
    book.release(0, "v1", prompt)
    plan = book.plan("base", [*prompt, 4, 5])  # base's conversation comes back from the pool
    assert plan.reuse == len(prompt)
    assert Op("copy", 0, src=1) in plan.ops and plan.ops[-1] == Op("keep", 0, n=len(prompt))
    # the pool's only slot was the copy's source: v1's parked cells were dropped, not stored
    assert all(e.version == "base" for e in book.entries.values()) and book.drop_version("v1") == []
    assert book.release(0, "base", [*prompt, 4, 5]) == [Op("keep", 1, n=0)]  # the pool's copy is stale now
    assert book.drop_version("base") == [Op("keep", 0, n=0)]


def test_system_prefix_is_shared_by_new_conversations() -> None:
    book = KvBook(1, 2, min_reuse=4)
    a = [*SYSTEM, 1, 2, 3]
    book.plan("base", a)
    ops = book.share_prefix("base", SYSTEM, 0)
    assert ops == [Op("copy", 1, src=0), Op("keep", 1, n=len(SYSTEM))]
    assert book.share_prefix("base", SYSTEM, 0) == []  # once per version and system prompt
    book.release(0, "base", a)
    b = [*SYSTEM, 9, 9, 9, 9]  # another conversation: a's cells are the best match (same prefix)
    plan = book.plan("base", b)
    assert plan.reuse == len(SYSTEM)
    book.release(0, "base", b)
    c = [*SYSTEM, 5, 5]  # b's parked cells move to the pool (evicting nothing: a slot is free)
    assert book.plan("base", c).reuse == len(SYSTEM)
    assert sum(e.prefix for e in book.entries.values()) == 1


def test_short_matches_are_not_copied_and_lru_is_evicted() -> None:
    book = KvBook(1, 1, min_reuse=8)
    book.plan("base", [1, 2, 3, 4])
    book.release(0, "base", [1, 2, 3, 4])
    plan = book.plan("base", [9, 1, 2, 3, 4])  # no common prefix: a fresh prefill, a's cells to the pool
    assert plan.reuse == 0 and Op("copy", 1, src=0) in plan.ops
    book.release(0, "base", [9, 1, 2, 3, 4])
    plan = book.plan("base", [7, 7])  # the pool holds a (older): the parked newer one replaces it
    assert plan.ops[0] == Op("copy", 1, src=0)
    assert book.entries[1].tokens == [9, 1, 2, 3, 4]


def test_reuse_off_plans_full_prefills() -> None:
    book = KvBook(2, 0, enabled=False)
    book.plan("base", [1, 2, 3])
    assert book.release(0, "base", [1, 2, 3]) == [Op("keep", 0, n=0)]
    assert book.plan("base", [1, 2, 3, 4]).reuse == 0 and not book.entries
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2


def test_a_settled_reply_is_followed_where_its_entry_moves() -> None:
    """A settle extends the entry wherever it is now; once a reply took it, there is none to settle."""
    book = KvBook(1, 1, min_reuse=4)
    prompt = [*SYSTEM, 1, 2, 3]
    book.plan("base", prompt)
    book.release(0, "base", prompt)
    entry = book.entries[0]
    book.extend(0, [4, 5, 6])  # the reply and its end of turn, prefilled again
    assert entry.tokens == [*prompt, 4, 5, 6] and book.settled_tokens == 3
    next_turn = [*prompt, 4, 5, 6, 7, 8, 9]
    assert book.plan("base", next_turn).reuse == len(prompt) + 3  # only the new message is prefilled
    assert book.seq_of(entry) is None  # taken in place by that reply: a pending settle is dropped
    book.release(0, "base", next_turn)
    moved = book.entries[0]
    book.plan("v1", [9, 9, 9])  # the slot is needed: the entry moves to the pool
    assert book.seq_of(moved) == 1
    assert book.drop(1) == [Op("keep", 1, n=0)] and book.seq_of(moved) is None


def test_each_version_keeps_a_run_of_consecutive_slots() -> None:
    """Live and canary replies arriving in turn: live fills 0-3 and the canary 15-12, where the
    lowest free slot would have interleaved them (four micro-batches per step for each)."""
    book = KvBook(16, 0)
    slots = {"base": [], "v1": []}
    for i in range(8):
        version = ("base", "v1")[i % 2]
        slots[version].append(book.plan(version, [i, i, i]).seq)
    assert slots == {"base": [0, 1, 2, 3], "v1": [15, 14, 13, 12]}
    book.release(1, "base", None)
    assert book.plan("base", [9, 9, 9]).seq == 1  # a hole in the run is filled again
    book.release(13, "v1", None)
    assert book.plan("v2", [9, 9, 9]).seq == 7  # a third version: as far as it can be from both (7 or 8)


def test_an_idle_engine_reuses_a_parked_conversation_in_place() -> None:
    """With nothing in flight any slot will do: the one where the conversation's cells are parked."""
    book = KvBook(2, 0, min_reuse=4)
    a, b = [*SYSTEM, 1, 2], [*SYSTEM, 3, 4]
    book.plan("base", a)
    book.plan("base", b)
    book.release(0, "base", a)
    book.release(1, "base", b)
    plan = book.plan("base", [*b, 5, 6])
    assert (plan.seq, plan.reuse, plan.ops) == (1, len(b), [Op("keep", 1, n=len(b))])


def test_a_reply_starts_in_the_single_lane_only_when_few_are_in_flight() -> None:
    assert lane_for(0, 0, 0, 1) == "single"  # alone
    assert lane_for(1, 0, 0, 1) == "batch"  # beside one in flight (which then moves to the batch lane)
    assert lane_for(0, 0, 1, 1) == "batch"  # another one waits: a burst is batched from its first reply
    assert lane_for(1, 0, 0, 2) == "single" and lane_for(1, 0, 1, 2) == "batch"
    assert lane_for(0, 1, 0, 2) == "batch"  # never beside the batch lane's: one decode a round
    assert lane_for(0, 0, 0, 0) == "batch"  # no single lane
