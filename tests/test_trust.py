"""Trust filtering and rater flags (pure), with property tests over random feedback."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from feedback.records import Conversation, Correction, FeedbackSnapshot, Message, RaterState, Rating, Role, subject_hash
from training.clean import clean
from training.signals import build_training_data
from training.trust import TrustConfig, cap_counts, filter_snapshot, flag_raters, weight_reviewed

U, A = Role.USER, Role.ASSISTANT


def test_cap_counts_water_fills() -> None:
    capped = cap_counts({"big": 100, "a": 10, "b": 10, "c": 10, "d": 10, "e": 10}, 0.2)
    total = sum(capped.values())
    assert capped["big"] == 12 and all(v / total <= 0.2 for v in capped.values())
    assert cap_counts({"solo": 10}, 0.2) == {"solo": 0}  # one rater alone cannot be 20% of anything
    assert cap_counts({"x": 5}, 1.0) == {"x": 5}


@st.composite
def snapshots(draw: st.DrawFn) -> FeedbackSnapshot:
    n_conv = draw(st.integers(1, 6))
    users = [f"user{i}" for i in range(4)]
    raters = [f"rater{i}" for i in range(5)]
    messages: list[Message] = []
    conversations: list[Conversation] = []
    seq = 0
    for c in range(n_conv):
        cid = f"c{c}"
        conversations.append(Conversation(cid, draw(st.sampled_from(users)), draw(st.sampled_from(["web", "im"])), 0.0))
        parent = None
        for turn in range(draw(st.integers(1, 3))):
            seq += 1
            uid = f"{cid}-u{turn}"
            messages.append(Message(uid, cid, seq, U, f"question {c}.{turn}", parent))
            siblings = draw(st.integers(1, 3))
            first = None
            for s in range(siblings):
                seq += 1
                aid = f"{cid}-a{turn}.{s}"
                author = "operator:op" if draw(st.integers(0, 9)) == 0 else None
                messages.append(
                    Message(
                        aid,
                        cid,
                        seq,
                        A,
                        f"answer {c}.{turn}.{s}",
                        uid,
                        regenerated_from=first if s else None,
                        author=author,
                    )
                )
                first = first or aid
            parent = aid
    replies = [m.id for m in messages if m.role is A]
    ratings = tuple(
        Rating(
            i + 1,
            draw(st.sampled_from(replies)),
            draw(st.sampled_from([1, -1])),
            draw(st.sampled_from(raters)),
            f"r{i}",
        )
        for i in range(draw(st.integers(0, 25)))
    )
    corrections = tuple(
        Correction(i + 1, draw(st.sampled_from(replies)), f"better {i}", "op") for i in range(draw(st.integers(0, 5)))
    )
    return FeedbackSnapshot(
        messages=tuple(messages),
        ratings=ratings,
        corrections=corrections,
        conversations=tuple(conversations),
        excluded_messages=frozenset(draw(st.sets(st.sampled_from(replies + [m.id for m in messages]), max_size=3))),
        rater_states={
            r: draw(st.sampled_from(list(RaterState))) for r in draw(st.sets(st.sampled_from(raters), max_size=2))
        },
        erased_subjects=frozenset(subject_hash(u) for u in draw(st.sets(st.sampled_from(users), max_size=1))),
    )


NO_CAPS = TrustConfig(max_rater_share=1.0, flag_min_ratings=10_000, flag_burst_count=10_000, flag_min_shared=10_000)


@settings(max_examples=150, deadline=None)
@given(snapshots())
def test_no_row_is_built_from_excluded_erased_or_held_items(snap: FeedbackSnapshot) -> None:
    filtered, report = filter_snapshot(snap, NO_CAPS)
    data, _ = clean(build_training_data(filtered))
    by_id = {m.id: m for m in snap.messages}
    erased_convs = {c.id for c in snap.conversations if c.user_id and subject_hash(c.user_id) in snap.erased_subjects}
    held = {r for r, s in snap.rater_states.items() if s is not RaterState.APPROVED}
    rating_by_id = {r.id: r for r in snap.ratings}
    for row in (*data.dpo, *data.kto, *data.sft):
        for message_id in row.refs.messages:
            assert message_id not in snap.excluded_messages
            assert by_id[message_id].conversation_id not in erased_convs
        for rating_id in row.refs.ratings:
            assert rating_by_id[rating_id].rater not in held
        prompt_texts = {m["content"] for m in row.prompt}
        excluded_texts = {by_id[m].text for m in snap.excluded_messages}
        assert not prompt_texts & excluded_texts  # nor anything built on top of them
    assert set(report.held_raters) <= held


@settings(max_examples=150, deadline=None)
@given(snapshots())
def test_each_signal_becomes_its_rows(snap: FeedbackSnapshot) -> None:
    clean_snap = dataclasses.replace(snap, excluded_messages=frozenset(), rater_states={}, erased_subjects=frozenset())
    data = build_training_data(clean_snap)
    by_id = {m.id: m for m in snap.messages}
    latest = {}
    for c in snap.corrections:
        latest[c.message_id] = c
    # every correction (that differs from the reply) is a DPO pair and an SFT demonstration
    for message_id, c in latest.items():
        reply = by_id[message_id]
        sft = [r for r in data.sft if r.source == "correction" and r.refs.corrections == (c.id,)]
        assert (
            len(sft) == 1
            and sft[0].completion == c.text
            and sft[0].prompt[-1]["content"] == by_id[reply.parent_id].text
        )
        if c.text != reply.text:
            assert any(r.chosen == c.text and r.rejected == reply.text for r in data.dpo)
    # every operator-written reply is a demonstration and never a thumbs row
    for m in snap.messages:
        if m.by_operator:
            assert any(r.source == "takeover" and r.completion == m.text for r in data.sft)
            assert all(r.completion != m.text for r in data.kto)
    # thumbs: label = sign of the sum of each rater's latest vote
    votes: dict[str, dict[str, int]] = {}
    for r in snap.ratings:
        votes.setdefault(r.message_id, {})[r.rater] = r.value
    for message_id, vs in votes.items():
        total = sum(vs.values())
        rows = [r for r in data.kto if r.refs.messages == (message_id,)]
        if total == 0 or by_id[message_id].by_operator:
            assert rows == []
        else:
            assert len(rows) == 1 and rows[0].label == (total > 0)
    # TRL's columns, and the prompt always ends with the user turn
    for row in data.dpo:
        assert set(row.to_trl()) == {"prompt", "chosen", "rejected"} and row.prompt[-1]["role"] == "user"
    for row in data.kto:
        assert set(row.to_trl()) == {"prompt", "completion", "label"}


def rating(i: int, message: str, value: int, rater: str, at: float = 0.0) -> Rating:
    return Rating(i, message, value, rater, f"r{i}", created_at=at)


def test_flags_volume_burst_and_disagreement() -> None:
    msgs = [Message(f"a{i}", "c", i, A, "x", None) for i in range(40)]
    ratings = [rating(i, f"a{i % 40}", 1, f"honest{i % 20}", at=i * 10.0) for i in range(200)]
    ratings += [rating(1000 + i, f"a{i % 40}", -1, "contrarian", at=i * 100.0) for i in range(40)]
    ratings += [rating(2000 + i, f"a{i % 40}", 1, "burster", at=5000 + i * 0.5) for i in range(40)]
    snap = FeedbackSnapshot(messages=tuple(msgs), ratings=tuple(ratings), corrections=())
    flags = flag_raters(snap, TrustConfig(flag_min_ratings=30, flag_volume_factor=3))
    assert set(flags) == {"contrarian", "burster"}
    assert any("disagreement" in r for r in flags["contrarian"]) and any("volume" in r for r in flags["contrarian"])
    assert any("burst" in r for r in flags["burster"])
    approved = dataclasses.replace(snap, rater_states={"burster": RaterState.APPROVED})
    assert "burster" not in flag_raters(approved, TrustConfig(flag_min_ratings=30, flag_volume_factor=3))


def test_operator_rows_are_weighted() -> None:
    snap = FeedbackSnapshot(
        messages=(Message("u", "c", 1, U, "q", None), Message("a", "c", 2, A, "bad", "u")),
        ratings=(),
        corrections=(Correction(1, "a", "good", "op"),),
    )
    data = weight_reviewed(build_training_data(snap), 3)
    assert len(data.dpo) == 3 and len(data.sft) == 3
