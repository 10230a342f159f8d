"""The pair builder: feedback records -> TRL rows. Pure, milliseconds."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import astuple
from pathlib import Path
from typing import Any

import pytest

from feedback.records import Correction, FeedbackSnapshot, FinishReason, Message, Rating, Role, operator_author
from training import signals
from training.chats import SHIPPED, load_chat, replay_chat_path, shared_prompts
from training.pairs import (
    FeedbackRef,
    TrainingData,
    bucket,
    dataset_id,
    pick_likeliest,
    prompt_key,
    replay_plan,
    split,
    split_groups,
)
from training.signals import CONTRAST_POOL, build_training_data, fact_fragments, replay_rows, swap_numbers


def msg(
    id: str, role: Role, text: str, parent: str | None, seq: int, conv: str = "c1", regen: str | None = None
) -> Message:
    return Message(id=id, conversation_id=conv, seq=seq, role=role, text=text, parent_id=parent, regenerated_from=regen)


def rating(id: int, message: str, value: int, rater: str = "u1") -> Rating:
    return Rating(id=id, message_id=message, value=value, rater=rater, client_id=f"r{id}")


U, A = Role.USER, Role.ASSISTANT


def test_correction_becomes_dpo_pair_and_sft_demo_with_multi_turn_context() -> None:
    snap = FeedbackSnapshot(
        messages=(
            msg("u1", U, "hi", None, 1),
            msg("a1", A, "hello", "u1", 2),
            msg("u2", U, "refund?", "a1", 3),
            msg("a2", A, "no idea", "u2", 4),
        ),
        ratings=(),
        corrections=(Correction(7, "a2", "Within 30 days.", "op"),),
    )
    data = build_training_data(snap, system_prompt="Be brief.")
    (pair,) = data.dpo
    assert pair.to_trl() == {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "refund?"},
        ],
        "chosen": [{"role": "assistant", "content": "Within 30 days."}],
        "rejected": [{"role": "assistant", "content": "no idea"}],
    }
    assert pair.source == "correction" and pair.refs.corrections == (7,)
    (demo,) = data.sft
    assert demo.to_trl()["messages"][-1] == {"role": "assistant", "content": "Within 30 days."}
    assert data.feedback_ids() == {"ratings": [], "corrections": [7], "messages": ["a2"]}


def test_latest_correction_wins_and_identical_one_is_no_pair() -> None:
    snap = FeedbackSnapshot(
        messages=(msg("u1", U, "q", None, 1), msg("a1", A, "same", "u1", 2)),
        ratings=(),
        corrections=(Correction(1, "a1", "better", "op"), Correction(2, "a1", "same", "op")),
    )
    data = build_training_data(snap)
    assert data.dpo == () and len(data.sft) == 1


def test_regeneration_with_upvoted_sibling() -> None:
    snap = FeedbackSnapshot(
        messages=(msg("u1", U, "q", None, 1), msg("a1", A, "bad", "u1", 2), msg("a2", A, "good", "u1", 3, regen="a1")),
        ratings=(rating(1, "a2", 1),),
        corrections=(),
    )
    data = build_training_data(snap)
    (pair,) = data.dpo
    assert (pair.chosen, pair.rejected, pair.source) == ("good", "bad", "regeneration")
    assert pair.refs.ratings == (1,)
    assert [(r.completion, r.label) for r in data.kto] == [("good", True)]


def test_regeneration_kept_by_continuing_the_conversation() -> None:
    snap = FeedbackSnapshot(
        messages=(
            msg("u1", U, "q", None, 1),
            msg("a1", A, "bad", "u1", 2),
            msg("a2", A, "good", "u1", 3, regen="a1"),
            msg("u2", U, "thanks", "a2", 4),
        ),
        ratings=(),
        corrections=(),
    )
    (pair,) = build_training_data(snap).dpo
    assert (pair.chosen, pair.rejected) == ("good", "bad")


def test_regeneration_without_a_verdict_makes_no_pair() -> None:
    snap = FeedbackSnapshot(
        messages=(msg("u1", U, "q", None, 1), msg("a1", A, "x", "u1", 2), msg("a2", A, "y", "u1", 3, regen="a1")),
        ratings=(),
        corrections=(),
    )
    assert build_training_data(snap).dpo == ()


def test_up_and_down_on_same_context_is_a_pair() -> None:
    snap = FeedbackSnapshot(
        messages=(msg("u1", U, "q", None, 1), msg("a1", A, "meh", "u1", 2), msg("a2", A, "great", "u1", 3)),
        ratings=(rating(1, "a1", -1), rating(2, "a2", 1)),
        corrections=(),
    )
    (pair,) = build_training_data(snap).dpo
    assert (pair.chosen, pair.rejected, pair.source) == ("great", "meh", "thumbs_pair")


def test_thumbs_become_kto_rows_by_majority_of_latest_votes() -> None:
    snap = FeedbackSnapshot(
        messages=(
            msg("u1", U, "q", None, 1),
            msg("a1", A, "r1", "u1", 2),
            msg("u2", U, "q2", "a1", 3),
            msg("a2", A, "r2", "u2", 4),
        ),
        ratings=(
            rating(1, "a1", 1, "x"),
            rating(2, "a1", -1, "x"),  # x changed their mind: down
            rating(3, "a1", -1, "y"),
            rating(4, "a2", 1, "x"),
            rating(5, "a2", -1, "y"),  # a tie: no row
        ),
        corrections=(),
    )
    data = build_training_data(snap)
    assert [(r.completion, r.label, r.refs.ratings) for r in data.kto] == [("r1", False, (2, 3))]


def test_kto_weights_balance_classes() -> None:
    snap = FeedbackSnapshot(
        messages=tuple(
            m
            for i in range(4)
            for m in (msg(f"u{i}", U, "q", None, 1, f"c{i}"), msg(f"a{i}", A, f"r{i}", f"u{i}", 2, f"c{i}"))
        ),
        ratings=(rating(1, "a0", 1), rating(2, "a1", 1), rating(3, "a2", 1), rating(4, "a3", -1)),
        corrections=(),
    )
    assert build_training_data(snap).kto_weights() == (1 / 3, 1.0)


def test_missing_context_is_skipped() -> None:
    snap = FeedbackSnapshot(
        messages=(msg("a1", A, "orphan", "gone", 2),),
        ratings=(rating(1, "a1", 1),),
        corrections=(Correction(1, "a1", "x", "o"),),
    )
    assert build_training_data(snap).counts() == {"dpo": 0, "kto": 0, "sft": 0}


def test_split_keeps_conversations_whole_and_both_sides_nonempty() -> None:
    groups = [f"conv-{i}" for i in range(50)]
    held = split_groups(groups, 0.2)
    assert 0 < len(held) < 50
    assert split_groups(groups, 0.2) == held  # deterministic
    assert split_groups(["a", "b"], 0.01) and len(split_groups(["a", "b"], 0.99)) == 1
    assert split_groups(["only"], 0.5) == set()
    snap = FeedbackSnapshot(
        messages=tuple(
            m
            for i in range(10)
            for m in (msg(f"u{i}", U, f"q{i}", None, 1, f"c{i}"), msg(f"a{i}", A, "r", f"u{i}", 2, f"c{i}"))
        ),
        ratings=(),
        corrections=tuple(Correction(i, f"a{i}", "fixed", "op") for i in range(10)),
    )
    train, heldout = split(build_training_data(snap), 0.3)
    assert train.dpo and heldout.dpo
    assert not {r.group for r in train.dpo} & {r.group for r in heldout.dpo}
    assert {r.group for r in heldout.sft} <= {r.group for r in heldout.dpo}


def test_conversations_with_thumbs_alone_are_held_out_too_and_pairs_split_as_before() -> None:
    """The gate asks held-out replies customers liked again (gate.kept_questions): conversations
    with only thumbs and a reply rated up are split by content like the others, at most ``liked``
    contexts of them; the pairs' split does not move, and thumbs nobody asks again stay in training."""
    corrected = [
        m
        for i in range(10)
        for m in (msg(f"u{i}", U, f"q{i}", None, 1, f"c{i}"), msg(f"a{i}", A, "r", f"u{i}", 2, f"c{i}"))
    ]
    liked = [
        m
        for i in range(40)
        for m in (msg(f"v{i}", U, f"t{i}", None, 1, f"d{i}"), msg(f"b{i}", A, f"good {i}", f"v{i}", 2, f"d{i}"))
    ]
    disliked = [
        m
        for i in range(40)
        for m in (msg(f"w{i}", U, f"s{i}", None, 1, f"e{i}"), msg(f"x{i}", A, f"bad {i}", f"w{i}", 2, f"e{i}"))
    ]
    corrections = tuple(Correction(i, f"a{i}", "fixed", "op") for i in range(10))
    ups = tuple(rating(100 + i, f"b{i}", 1) for i in range(40))
    downs = tuple(rating(200 + i, f"x{i}", -1) for i in range(40))
    data = build_training_data(FeedbackSnapshot(tuple(corrected + liked + disliked), ups + downs, corrections))
    without = build_training_data(FeedbackSnapshot(tuple(corrected), (), corrections))
    train, heldout = split(data, 0.3, liked=16)
    before = split(without, 0.3)
    assert (train.dpo, heldout.dpo, train.sft, heldout.sft) == (
        before[0].dpo,
        before[1].dpo,
        before[0].sft,
        before[1].sft,
    )
    assert not {r.group for r in train.kto} & {r.group for r in heldout.kto}
    assert 0 < len(heldout.kept()) < 16 and {r.group for r in heldout.kto} <= {f"d{i}" for i in range(40)}
    assert all(r.label and r.signal is None for r in heldout.kept())
    assert len(split(data, 0.3, liked=2)[1].kept()) == 2  # the cap: the two lowest hashes
    assert split(data, 0.3)[1].kto == () and split(data, 0.0, liked=16)[1].kto == ()  # nobody asks them
    thumbs_alone = dataclasses.replace(data, dpo=(), sft=())  # no held-out pair: the gate reads no replies
    assert split(thumbs_alone, 0.3, liked=16)[1].kto == ()


def test_a_liked_reply_to_a_question_a_pair_asks_goes_to_the_pairs_side() -> None:
    """Two corrected conversations, neither hashing below the fraction: the split still holds one
    out (split_groups), and a thumbs-only conversation asking that question goes with it, though its
    own hash would keep it in training; one asking the other question stays in training."""
    questions = ["q-alpha", "q-beta"]
    snap_msgs = [
        m
        for i, q in enumerate(questions)
        for m in (msg(f"u{i}", U, q, None, 1, f"c{i}"), msg(f"a{i}", A, "r", f"u{i}", 2, f"c{i}"))
    ]
    snap_msgs += [
        m
        for i, q in enumerate(questions)
        for m in (msg(f"v{i}", U, q, None, 1, f"d{i}"), msg(f"b{i}", A, "ok", f"v{i}", 2, f"d{i}"))
    ]
    corrections = tuple(Correction(i, f"a{i}", "fixed", "op") for i in range(2))
    ups = tuple(rating(10 + i, f"b{i}", 1) for i in range(2))
    data = build_training_data(FeedbackSnapshot(tuple(snap_msgs), ups, corrections))
    fraction = 0.01
    keys = {r.group: prompt_key(r.prompt) for r in data.dpo}
    assert all(bucket(k) >= fraction for k in keys.values())  # held out by split_groups' rule alone
    train, heldout = split(data, fraction, liked=16)
    (held_pair,) = {r.group for r in heldout.dpo}
    other = next(g for g in keys if g != held_pair)
    assert {r.group for r in heldout.kto} == {"d" + held_pair[1:]}
    assert {r.group for r in train.kto} == {"d" + other[1:]}


def _corrected_chats(n: int) -> FeedbackSnapshot:
    messages, corrections = [], []
    for k in range(n):
        messages += [
            msg(f"u{k}", U, f"question {k}", None, 1, conv=f"c{k}"),
            msg(f"a{k}", A, "meh", f"u{k}", 2, conv=f"c{k}"),
        ]
        corrections.append(Correction(k + 1, f"a{k}", f"answer {k % 3}", "op"))  # three distinct answers
    return FeedbackSnapshot(tuple(messages), (), tuple(corrections))


def test_contrast_pairs_reject_other_questions_corrections_only() -> None:
    snap = _corrected_chats(6)
    plain = build_training_data(snap)
    assert {r.source for r in plain.dpo} == {"correction"}
    data = build_training_data(snap, contrast=5)
    contrast = [r for r in data.dpo if r.source == "contrast"]
    # each corrected reply gets one pair per OTHER distinct answer: 2 of them, capped by the text count not 5
    assert len(contrast) == 6 * 2
    for row in contrast:
        k = int(row.prompt[-1]["content"].split()[-1])
        assert row.chosen == f"answer {k % 3}" and row.rejected != row.chosen and row.rejected.startswith("answer ")
        assert row.group == f"c{k}" and len(row.refs.corrections) == 2
    assert len(data.sft) == 6  # demonstrations are not repeated
    assert build_training_data(snap, contrast=5) == data  # stable: no randomness


def test_contrast_pairs_are_capped_and_picked_stably() -> None:
    snap = _corrected_chats(6)
    one = [r for r in build_training_data(snap, contrast=1).dpo if r.source == "contrast"]
    assert len(one) == 6
    two = [r for r in build_training_data(snap, contrast=2).dpo if r.source == "contrast"]
    assert {(r.prompt[-1]["content"], r.rejected) for r in one} <= {(r.prompt[-1]["content"], r.rejected) for r in two}


def _numbered_corrections() -> FeedbackSnapshot:
    """Two corrected replies whose answers hold numbers, and one password question corrected without any."""
    chats = [
        ("refund", "How long do I have to return something?", "You can be reimbursed within a year."),
        ("warranty", "What is the warranty period?", "It depends."),
        ("password", "How do I reset my password?", "Call us."),
    ]
    messages: list[Message] = []
    for conv, question, reply in chats:
        messages += [
            msg(f"u-{conv}", U, question, None, 1, conv=conv),
            msg(f"a-{conv}", A, reply, f"u-{conv}", 2, conv=conv),
        ]
    corrections = [
        Correction(1, "a-refund", "You can return any item for a full refund within 30 days of delivery.", "op"),
        Correction(2, "a-warranty", "Every product comes with a 2-year warranty against defects.", "op"),
        Correction(3, "a-password", 'Click "Forgot password" on the sign-in page.', "op"),
    ]
    return FeedbackSnapshot(tuple(messages), (), tuple(corrections))


def test_swap_numbers_replaces_each_number_in_turn() -> None:
    assert swap_numbers("within 30 days, 9am to 6pm", ["50", "4.99"]) == "within 50 days, 4.99am to 50pm"
    assert swap_numbers("no numbers here", ["1"]) == "no numbers here"


def test_number_pairs_reject_the_correction_with_other_corrections_numbers() -> None:
    snap = _numbered_corrections()
    assert [r for r in build_training_data(snap).dpo if r.source == "numbers"] == []
    rows = [r for r in build_training_data(snap, numbers=3).dpo if r.source == "numbers"]
    assert {(r.group, r.chosen, r.rejected) for r in rows} == {
        (
            "refund",
            "You can return any item for a full refund within 30 days of delivery.",
            "You can return any item for a full refund within 2 days of delivery.",
        ),
        (
            "warranty",
            "Every product comes with a 2-year warranty against defects.",
            "Every product comes with a 30-year warranty against defects.",
        ),
    }
    assert all(r.refs.corrections for r in rows)
    assert not any(r.group == "password" for r in rows)  # its answer holds no number
    assert build_training_data(snap, numbers=3) == build_training_data(snap, numbers=3)


def _renamed(snap: FeedbackSnapshot, tag: str) -> FeedbackSnapshot:
    """The same feedback under other ids, stored in the reverse order: what another run of the
    server (other uuids, other arrival order) would have stored."""
    ids = {m.id: f"{tag}-{m.id}" for m in snap.messages}
    messages = tuple(
        Message(
            id=ids[m.id],
            conversation_id=f"{tag}-{m.conversation_id}",
            seq=m.seq,
            role=m.role,
            text=m.text,
            parent_id=ids.get(m.parent_id) if m.parent_id else None,
        )
        for m in reversed(snap.messages)
    )
    corrections = tuple(Correction(c.id, ids[c.message_id], c.text, c.operator) for c in reversed(snap.corrections))
    return FeedbackSnapshot(messages, (), corrections)


def test_rows_order_and_split_depend_on_content_not_ids_or_arrival_order() -> None:
    snap = _corrected_chats(12)
    a, b = (
        build_training_data(snap, contrast=2, numbers=1),
        build_training_data(_renamed(snap, "x"), contrast=2, numbers=1),
    )
    assert [r.to_trl() for r in a.dpo] == [r.to_trl() for r in b.dpo]
    assert [r.to_trl() for r in a.sft] == [r.to_trl() for r in b.sft]
    for (train_a, held_a), (train_b, held_b) in [(split(a, 0.3), split(b, 0.3))]:
        assert [r.to_trl() for r in held_a.dpo] == [r.to_trl() for r in held_b.dpo]
        assert [r.to_trl() for r in train_a.dpo] == [r.to_trl() for r in train_b.dpo]
        assert held_a.dpo and train_a.dpo


def test_a_question_asked_again_lands_on_the_side_of_its_first_asking() -> None:
    """Ten questions, each asked in three conversations: every copy of a question falls on one side."""
    messages, corrections = [], []
    for k in range(30):
        question = f"question {k % 10}"
        messages += [
            msg(f"u{k}", U, question, None, 1, conv=f"c{k}"),
            msg(f"a{k}", A, f"meh {k}", f"u{k}", 2, conv=f"c{k}"),
        ]
        corrections.append(Correction(k + 1, f"a{k}", f"answer {k % 10}", "op"))
    train, held = split(build_training_data(FeedbackSnapshot(tuple(messages), (), tuple(corrections))), 0.3)
    held_questions = {r.prompt[-1]["content"] for r in held.dpo}
    train_questions = {r.prompt[-1]["content"] for r in train.dpo}
    assert held_questions and train_questions and not held_questions & train_questions
    assert len(held.dpo) == 3 * len(held_questions)  # all three askings of each held-out question


def test_contrast_pool_holds_every_other_answer_and_the_likeliest_are_kept() -> None:
    snap = _corrected_chats(6)  # three distinct answers
    pool = [r for r in build_training_data(snap, contrast=1, contrast_pool=True).dpo if r.source == "contrast"]
    assert len(pool) == 6 * 2 and CONTRAST_POOL >= 2  # both other answers, not just one
    rows = [r.to_trl() for r in pool]
    scores = [-1.0 if r["rejected"][0]["content"] == "answer 2" else -3.0 for r in rows]
    kept = pick_likeliest(rows, scores, 1)
    by_question = {r["prompt"][-1]["content"]: r["rejected"][0]["content"] for r in kept}
    assert len(kept) == 6 and len(by_question) == 6
    for question, rejected in by_question.items():
        own = f"answer {int(question.split()[-1]) % 3}"
        assert rejected == ("answer 1" if own == "answer 2" else "answer 2")  # the likeliest other answer
    assert pick_likeliest(rows, scores, 5) == rows  # k above the pool keeps all, in order
    assert pick_likeliest(rows, [0.0] * len(rows), 1) == pick_likeliest(rows, [0.0] * len(rows), 1)  # ties: stable
    with pytest.raises(ValueError, match="scores"):
        pick_likeliest(rows, scores[:-1], 1)


def test_replay_rows_pit_the_shipped_answer_against_every_correction() -> None:
    replay = replay_rows(
        ["How many legs does a spider have?"],
        ["A spider has eight legs."],
        ["Within 30 days.", "3 to 5 business days.", "Within 30 days. "],
        system_prompt="Be brief.",
    )
    assert {(r.source, r.group, r.refs) for r in replay} == {("replay", "replay", FeedbackRef())}
    rows = [r.to_trl() for r in replay]
    assert [r["rejected"][0]["content"] for r in rows] == ["3 to 5 business days.", "Within 30 days."]
    assert all(r["chosen"][0]["content"] == "A spider has eight legs." for r in rows)
    assert rows[0]["prompt"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How many legs does a spider have?"},
    ]
    assert len(pick_likeliest(rows, [-2.0, -1.0], 1)) == 1


@pytest.mark.parametrize("language", list(SHIPPED))
def test_replay_chat_never_overlaps_the_gates_generic_set(language: str) -> None:
    replay, generic = load_chat(SHIPPED[language].replay), load_chat(SHIPPED[language].generic)
    assert len(replay) == 40 and len({r["prompt"][-1]["content"] for r in replay}) == 40
    assert shared_prompts(replay, generic) == []


def test_shared_prompts_ignore_case_and_spacing() -> None:
    def row(q: str) -> dict[str, Any]:
        return {"prompt": [{"role": "user", "content": q}], "completion": "..."}

    generic = [row("How are you?"), row("Tell me a joke.")]
    assert shared_prompts([row("how  are you?"), row("What is 2+2?"), row(" TELL me a joke. ")], generic) == [
        "how are you?",
        "tell me a joke.",
    ]
    assert shared_prompts([row("What is 2+2?")], generic) == []


def test_the_replay_is_in_the_language_the_gate_guards_or_the_one_named() -> None:
    assert replay_chat_path("", "zh") == SHIPPED["zh"].replay
    assert replay_chat_path("", "en") == SHIPPED["en"].replay
    assert replay_chat_path("", "/srv/our_chat.jsonl") == SHIPPED["en"].replay  # an operator's own generic set
    assert replay_chat_path("/srv/our_replay.jsonl", "/srv/our_chat.jsonl") == Path("/srv/our_replay.jsonl")
    assert replay_chat_path("zh", "en") == SHIPPED["zh"].replay  # named: whatever the gate reads
    zh = load_chat(SHIPPED["zh"].replay)
    assert all(re.search(r"[\u4e00-\u9fff]", r["prompt"][-1]["content"] + r["completion"]) for r in zh)


def test_fact_fragments_are_numbers_with_their_word_or_five_word_runs() -> None:
    assert fact_fragments("Refunds within 30 days of delivery.") == {"30 day"}
    assert fact_fragments("A 2-year warranty; shipping costs 4.99 dollars.") == {"2 year", "4.99 dollar"}
    assert "forgot password on the sign" in fact_fragments('Click "Forgot password" on the sign-in page.')
    assert fact_fragments("Too short.") == set()


def _transplant_snapshot(v1_reply: str, v1_vote: int) -> FeedbackSnapshot:
    """A refund question corrected; a gift-card question asked of base, then of v1."""

    def v(m: Message, version: str) -> Message:
        return dataclasses.replace(m, model_version=version)

    messages = (
        msg("u1", U, "How long do I have to return something?", None, 1, conv="c1"),
        v(msg("a1", A, "Whenever you like.", "u1", 2, conv="c1"), "base"),
        msg("u2", U, "When does a gift card run out?", None, 1, conv="c2"),
        v(msg("a2", A, "Gift cards never run out.", "u2", 2, conv="c2"), "base"),
        msg("u3", U, "When does a gift card run out?", None, 1, conv="c3"),
        v(msg("a3", A, v1_reply, "u3", 2, conv="c3"), "v1"),
    )
    ratings = (rating(1, "a2", -1), rating(2, "a3", v1_vote))
    correction = Correction(1, "a1", "You can return any item for a full refund within 30 days of delivery.", "op")
    return FeedbackSnapshot(messages, ratings, (correction,))


def test_a_rated_down_reply_stating_a_corrections_fact_loses_to_another_versions_reply() -> None:
    snap = _transplant_snapshot("Gift cards expire 30 days after purchase.", -1)
    assert not [r for r in build_training_data(snap).dpo if r.source == "transplant"]  # off by default
    (row,) = [r for r in build_training_data(snap, transplants=True).dpo if r.source == "transplant"]
    assert (row.chosen, row.rejected) == ("Gift cards never run out.", "Gift cards expire 30 days after purchase.")
    assert row.prompt[-1]["content"] == "When does a gift card run out?" and row.group == "c3"


def test_no_transplant_pair_for_a_liked_reply_or_one_without_a_corrections_fact() -> None:
    liked = _transplant_snapshot("Gift cards expire 30 days after purchase.", 1)
    other = _transplant_snapshot("Gift cards expire after 5 years.", -1)
    for snap in (liked, other):
        assert not [r for r in build_training_data(snap, transplants=True).dpo if r.source == "transplant"]


RETURN_Q, GIFT_Q, WARRANTY_Q = (
    "How long do I have to return something?",
    "When does a gift card run out?",
    "What is the warranty period?",
)
REFUND = "You can return any item for a full refund within 30 days of delivery."
WARRANTY = "Every product comes with a 2-year warranty against defects."
PASSWORD = 'Click "Forgot password" on the sign-in page, then check your email.'
GIFT_30, ORDERS = "Gift cards expire 30 days after purchase.", "Check the Orders page."


def _every_signal() -> FeedbackSnapshot:
    """One snapshot that gives every kind of row, including a pair two signals both give: c7's thumbs
    pair and c6's regeneration pair are the same pair (stored first, c7's keeps it)."""

    def reply(id: str, text: str, parent: str, seq: int, conv: str, version: str = "base", **kw: Any) -> Message:
        return dataclasses.replace(msg(id, A, text, parent, seq, conv), model_version=version, **kw)

    messages = (
        msg("u1", U, "hi", None, 1, "c1"),
        reply("a1", "hello", "u1", 2, "c1"),
        msg("u1b", U, "How long do I have to return something?", "a1", 3, "c1"),
        reply("a1b", "Whenever you like.", "u1b", 4, "c1"),
        msg("u2", U, "When does a gift card run out?", None, 1, "c2"),
        reply("a2", "Gift cards never run out.", "u2", 2, "c2"),
        msg("u3", U, "When does a gift card run out?", None, 1, "c3"),
        reply("a3", "Gift cards expire 30 days after purchase.", "u3", 2, "c3", "v1"),
        msg("u4", U, "What is the warranty period?", None, 1, "c4"),
        reply("a4", "It depends.", "u4", 2, "c4"),
        msg("u5", U, "How do I reset my password?", None, 1, "c5"),
        reply("a5", "Call us.", "u5", 2, "c5"),
        reply("a5x", "", "u5", 3, "c5", finish_reason=FinishReason.ERROR),
        msg("u7", U, "Where is my order?", None, 1, "c7"),
        reply("a7", "Check the Orders page.", "u7", 2, "c7"),
        reply("a7b", "No idea.", "u7", 3, "c7", "v1", regenerated_from="a7"),
        msg("u6", U, "Where is my order?", None, 1, "c6"),
        reply("a6", "No idea.", "u6", 2, "c6"),
        reply("a6b", "Check the Orders page.", "u6", 3, "c6", "v1", regenerated_from="a6"),
        msg("u9", U, "Do you ship abroad?", None, 1, "c9"),
        reply("a9", "Maybe.", "u9", 2, "c9"),
        reply("a9b", "We ship to 40 countries.", "u9", 3, "c9", "v1", regenerated_from="a9"),
        msg("u9b", U, "Thanks!", "a9b", 4, "c9"),
        msg("u8", U, "Can I talk to a human?", None, 1, "c8"),
        reply("a8", "Hi, this is Sam from support.", "u8", 2, "c8", None, author=operator_author("sam")),
    )
    ratings = (
        rating(1, "a2", -1),
        rating(2, "a3", -1),
        rating(3, "a3", -1, "u2"),
        rating(4, "a6b", 1),
        rating(5, "a7", 1),
        rating(6, "a7b", -1),
        rating(7, "a5x", 1),
        rating(8, "a4", 1, "u2"),
        rating(9, "a4", -1, "u3"),  # a tie: no verdict
    )
    corrections = (
        Correction(1, "a1b", "You can return any item for a full refund within 30 days of delivery.", "op"),
        Correction(2, "a4", "Every product comes with a 2-year warranty against defects.", "op"),
        Correction(3, "a5", 'Click "Forgot password" on the sign-in page.', "op"),
        Correction(4, "a5", 'Click "Forgot password" on the sign-in page, then check your email.', "op"),
    )
    return FeedbackSnapshot(messages, ratings, corrections)


def _rendered(data: TrainingData) -> list[tuple[Any, ...]]:
    """Every row in order: kind, source, group, last prompt message, answers or label, refs."""
    return [
        (type(r).__name__, getattr(r, "source", ""), r.group, r.prompt[-1]["content"], *answers, astuple(r.refs))
        for r, answers in [
            *((r, (r.chosen, r.rejected)) for r in data.dpo),
            *((r, (r.completion, r.label)) for r in data.kto),
            *((r, (r.completion,)) for r in data.sft),
        ]
    ]


# Computed by the builder before it became one function per signal (training/pairs.py at b143a7a):
# every row, in order, must stay exactly this.
EVERY_SIGNAL_ROWS = [
    ("DPORow", "contrast", "c5", "How do I reset my password?", PASSWORD, REFUND, ((), (4, 1), ("a5",))),
    ("DPORow", "transplant", "c3", GIFT_Q, "Gift cards never run out.", GIFT_30, ((2, 3), (), ("a2", "a3"))),
    ("DPORow", "numbers", "c1", RETURN_Q, REFUND, REFUND.replace("30", "2"), ((), (1,), ("a1b",))),
    ("DPORow", "numbers", "c4", WARRANTY_Q, WARRANTY, WARRANTY.replace("2", "30"), ((), (2,), ("a4",))),
    ("DPORow", "correction", "c5", "How do I reset my password?", PASSWORD, "Call us.", ((), (4,), ("a5",))),
    ("DPORow", "correction", "c4", WARRANTY_Q, WARRANTY, "It depends.", ((), (2,), ("a4",))),
    ("DPORow", "contrast", "c5", "How do I reset my password?", PASSWORD, WARRANTY, ((), (4, 2), ("a5",))),
    ("DPORow", "contrast", "c1", RETURN_Q, REFUND, PASSWORD, ((), (1, 4), ("a1b",))),
    ("DPORow", "thumbs_pair", "c7", "Where is my order?", ORDERS, "No idea.", ((5, 6), (), ("a7", "a7b"))),
    ("DPORow", "contrast", "c4", WARRANTY_Q, WARRANTY, PASSWORD, ((), (2, 4), ("a4",))),
    ("DPORow", "correction", "c1", RETURN_Q, REFUND, "Whenever you like.", ((), (1,), ("a1b",))),
    ("DPORow", "contrast", "c1", RETURN_Q, REFUND, WARRANTY, ((), (1, 2), ("a1b",))),
    ("DPORow", "contrast", "c4", WARRANTY_Q, WARRANTY, REFUND, ((), (2, 1), ("a4",))),
    (
        "DPORow",
        "regeneration",
        "c9",
        "Do you ship abroad?",
        "We ship to 40 countries.",
        "Maybe.",
        ((), (), ("a9b", "a9")),
    ),
    ("KTORow", "", "c6", "Where is my order?", ORDERS, True, ((4,), (), ("a6b",))),
    ("KTORow", "", "c7", "Where is my order?", ORDERS, True, ((5,), (), ("a7",))),
    ("KTORow", "", "c7", "Where is my order?", "No idea.", False, ((6,), (), ("a7b",))),
    ("KTORow", "", "c3", GIFT_Q, GIFT_30, False, ((2, 3), (), ("a3",))),
    ("KTORow", "", "c2", GIFT_Q, "Gift cards never run out.", False, ((1,), (), ("a2",))),
    ("SFTRow", "correction", "c5", "How do I reset my password?", PASSWORD, ((), (4,), ("a5",))),
    ("SFTRow", "correction", "c4", WARRANTY_Q, WARRANTY, ((), (2,), ("a4",))),
    ("SFTRow", "correction", "c1", RETURN_Q, REFUND, ((), (1,), ("a1b",))),
    ("SFTRow", "takeover", "c8", "Can I talk to a human?", "Hi, this is Sam from support.", ((), (), ("a8",))),
]


def test_every_signal_gives_the_same_rows_in_the_same_order_as_before() -> None:
    snap = _every_signal()
    data = build_training_data(snap, system_prompt="Be brief.", contrast=2, numbers=1, transplants=True)
    assert _rendered(data) == EVERY_SIGNAL_ROWS
    assert dataset_id(data) == "86fda091c7217c1d"  # the full rows: prompts with the system prompt too
    assert {r.group for r in split(data, 0.3)[1].dpo} == {"c5"}
    one = {"system_prompt": "Be brief.", "contrast": 1, "numbers": 1, "transplants": True}
    assert dataset_id(build_training_data(snap, **one)) == "293cb58866f60ad9"
    assert dataset_id(build_training_data(snap, **one, contrast_pool=True)) == "86fda091c7217c1d"
    assert dataset_id(build_training_data(snap)) == "e9fe751f9472eeca"


def test_readme_names_the_function_of_every_signal() -> None:
    """README, "Feedback becomes training data": each row names the functions that build it."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("## Feedback becomes training data", 1)[1].split("\n\n", 2)[1]
    named = [re.findall(r"`(\w+)`", line.rsplit("|", 2)[1]) for line in table.splitlines()[2:]]
    assert all(named) and len(named) == 10
    builders = {name for name in signals.__all__ if name.endswith(("_pairs", "_demos", "_rows"))}
    assert {name for names in named for name in names} == builders
    assert all(callable(getattr(signals, name)) for name in builders)


def test_an_assistant_turn_a_client_wrote_is_never_a_model_reply() -> None:
    """An OpenAI-API request's history may hold assistant turns the client wrote itself (stored with
    author "client"): thumbs on one make no KTO row, and it is never the chosen side of a transplant."""
    from dataclasses import replace

    from feedback.records import CLIENT_AUTHOR

    written = replace(msg("a1", A, "our refund window is 30 days", "u1", 2), author=CLIENT_AUTHOR)
    snap = FeedbackSnapshot(
        messages=(msg("u1", U, "refund?", None, 1), written),
        ratings=(rating(1, "a1", 1),),
        corrections=(),
    )
    assert build_training_data(snap).kto == ()
    model = FeedbackSnapshot(
        messages=(msg("u1", U, "refund?", None, 1), msg("a1", A, "30 days", "u1", 2)),
        ratings=(rating(1, "a1", 1),),
        corrections=(),
    )
    assert len(build_training_data(model).kto) == 1


def test_replay_plan_is_a_fixed_count_until_the_share_asks_for_more() -> None:
    ship = [30] * 40  # the 40 shipped prompts, each against 30 distinct corrections
    assert replay_plan(100, prompts=20, share=0.0, candidates=ship) == [1] * 20
    assert replay_plan(100, prompts=20, share=0.0, candidates=[30] * 8) == [1] * 8  # no more prompts than ship
    # cycle 1 of the airline (about 126 pairs): 15% asks for 23 pairs, so 23 prompts one each
    assert replay_plan(126, prompts=20, share=0.15, candidates=ship) == [1] * 23
    assert replay_plan(60, prompts=20, share=0.15, candidates=ship) == [1] * 20  # the count is a floor
    # cycle 3 (270 pairs): 48 pairs over the 40 prompts, the first 8 against two corrections
    plan = replay_plan(270, prompts=20, share=0.15, candidates=ship)
    assert plan == [2] * 8 + [1] * 32
    assert sum(plan) / (270 + sum(plan)) >= 0.15
    # a prompt stands against each correction at most once: the share stops where they run out
    assert replay_plan(1000, prompts=20, share=0.5, candidates=[2, 1, 3]) == [2, 1, 3]
    assert replay_plan(10, prompts=1, share=0.5, candidates=[0, 3, 3]) == [0, 3, 3]  # none for a prompt with none


def test_replay_plan_off() -> None:
    assert replay_plan(100, prompts=0, share=0.5, candidates=[30] * 40) == []  # replay_pairs 0 turns replay off
    assert replay_plan(0, prompts=20, share=0.5, candidates=[30] * 40) == []  # nothing to mix into
    assert replay_plan(100, prompts=20, share=0.5, candidates=[]) == []
    with pytest.raises(ValueError, match="replay share"):
        replay_plan(100, prompts=20, share=1.0, candidates=[30] * 40)
