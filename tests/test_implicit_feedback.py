"""Implicit feedback from reading to training: what a customer writes after a reply is recorded
against that reply (through a real websocket session), shown in the console, and becomes a weak
KTO row with its own weight and caps (pure, in milliseconds), which a real training run uses."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from feedback import FeedbackStore
from feedback.records import Conversation, Correction, FeedbackSnapshot, Message, RaterState, Rating, Reaction, Role
from server.console.api import with_silence
from server.protocol import Turn
from server.replies import reaction_after
from tests.console_support import running_app
from training.clean import clean
from training.config import CycleConfig, TrainConfig
from training.cycle import CycleStatus, TrainingCycle, prepare
from training.implicit import (
    ImplicitConfig,
    ImplicitReading,
    ImplicitSignal,
    reaction_record,
    silent_replies,
)
from training.pairs import KTORow, TrainingData
from training.signals import build_training_data
from training.trust import TrustConfig, filter_snapshot

U, A = Role.USER, Role.ASSISTANT
REFUND_Q = "What is your refund policy?"
CONFIG = ImplicitConfig(train=True)

# -- pure: readings, labels, rows, caps --------------------------------------------------------


def test_a_reading_becomes_a_weak_label_weighted_below_a_thumb() -> None:
    complaint = reaction_record(ImplicitReading(ImplicitSignal.COMPLAINT, 0.9, "wrong"), reply_id="a", message_id="u")
    assert (complaint.signal, complaint.value, complaint.weight) == ("complaint", -1, 0.72)  # 0.8 x 0.9
    thanks = reaction_record(ImplicitReading(ImplicitSignal.GRATITUDE, 0.6, "great"), reply_id="a", message_id="u")
    assert (thanks.value, thanks.weight) == (1, 0.3)
    none = reaction_record(ImplicitReading(ImplicitSignal.NONE, 0.5, "no cue"), reply_id="a", message_id="u")
    assert (none.value, none.weight) == (None, 0.0)
    long_cue = reaction_record(ImplicitReading(ImplicitSignal.HUMAN, 0.9, "x" * 500), reply_id="a", message_id="u")
    assert len(long_cue.cue) == 120


def test_a_turn_is_read_against_the_reply_before_it_and_its_question() -> None:
    branch = [Turn("u1", "user", "How long does shipping take?"), Turn("a1", "assistant", "10 days.")]
    again = reaction_after(branch, message_id="u2", text="how long does shipping take??", config=CONFIG)
    assert again is not None and (again.reply_id, again.message_id, again.signal) == ("a1", "u2", "repeat")
    human = reaction_after(branch, message_id="u2", text="转人工", config=CONFIG)
    assert human is not None and (human.signal, human.value) == ("human", -1)
    assert reaction_after(branch[:1], message_id="u2", text="thanks", config=CONFIG) is None  # no reply before it
    # a long turn is read by its first 1,000 characters (the rules run in the event loop)
    late = reaction_after(branch, message_id="u2", text="x " * 600 + "that's wrong", config=CONFIG)
    assert late is not None and late.signal == "none"
    assert reaction_after([], message_id="u1", text="hello", config=CONFIG) is None


def _msg(mid: str, cid: str, seq: int, role: Role, text: str, parent: str | None, **kw: Any) -> Message:
    return Message(mid, cid, seq, role, text, parent, created_at=float(seq), **kw)


def _conversation(
    cid: str, user: str | None, answer: str, reaction: str | None, value: int | None
) -> tuple[Conversation, list[Message], list[Reaction]]:
    """A customer asks, the model answers, and (with ``reaction``) the customer's next message reads so."""
    messages = [_msg(f"{cid}-u1", cid, 1, U, REFUND_Q, None), _msg(f"{cid}-a1", cid, 2, A, answer, f"{cid}-u1")]
    reactions = []
    if reaction is not None:
        messages.append(_msg(f"{cid}-u2", cid, 3, U, "next", f"{cid}-a1"))
        reactions.append(Reaction(f"{cid}-a1", f"{cid}-u2", reaction, 0.9, "cue", value, 0.45, float(3)))
    return Conversation(cid, user, "websocket", 0.0), messages, reactions


def snapshot(*convs: tuple[Conversation, list[Message], list[Reaction]], **extra: Any) -> FeedbackSnapshot:
    return FeedbackSnapshot(
        messages=tuple(m for _, ms, _ in convs for m in ms),
        ratings=extra.pop("ratings", ()),
        corrections=extra.pop("corrections", ()),
        conversations=tuple(c for c, _, _ in convs),
        reactions=tuple(r for _, _, rs in convs for r in rs),
        **extra,
    )


def kto(snap: FeedbackSnapshot, *, trust: TrustConfig | None = None) -> Sequence[KTORow]:
    trusted, _ = filter_snapshot(snap, trust or TrustConfig())
    return build_training_data(trusted, implicit=True).kto


def test_implicit_labels_become_weighted_kto_rows_only_when_asked() -> None:
    snap = snapshot(
        *(_conversation(f"c{i}", f"user{i}", "Within 30 days.", "gratitude", 1) for i in range(5)),
        _conversation("c5", "user5", "No refunds ever.", "complaint", -1),
        _conversation("c6", "user6", "Maybe.", "none", None),  # no label: no row
    )
    rows = kto(snap)
    assert sorted((r.group, r.label, r.weight, r.signal) for r in rows) == [
        *((f"c{i}", True, 0.45, "gratitude") for i in range(5)),
        ("c5", False, 0.45, "complaint"),
    ]
    assert all(r.refs.messages == (f"{r.group}-a1", f"{r.group}-u2") for r in rows)
    assert all(r.to_trl()["weight"] == 0.45 for r in rows)
    assert build_training_data(snap).kto == ()  # implicit=False: reactions never train
    # class balance counts each row by its weight: five thanks and one complaint of the same weight
    assert TrainingData(kto=tuple(rows)).kto_weights() == (pytest.approx(0.2), 1.0)


def test_a_thumb_or_a_correction_on_the_reply_wins_over_its_implicit_label() -> None:
    convs = [_conversation(f"c{i}", f"user{i}", f"answer {i}", "complaint", -1) for i in range(8)]
    thumb = Rating(1, "c0-a1", 1, "user0", "r1")
    held = Rating(2, "c1-a1", 1, "held-rater", "r2")  # a held rater's thumb trains not, but still decides
    correction = Correction(1, "c2-a1", "Within 30 days.", "op")
    snap = snapshot(
        *convs, ratings=(thumb, held), corrections=(correction,), rater_states={"held-rater": RaterState.PENDING}
    )
    rows = kto(snap, trust=TrustConfig(max_rater_share=1.0))  # one thumb alone: no rater cap here
    assert {r.group for r in rows if r.signal} == {"c3", "c4", "c5", "c6", "c7"}
    _, report = filter_snapshot(snap, TrustConfig())
    assert report.removed["implicit label where a thumb or correction decides"] == 3
    assert [r.signal for r in rows if r.group == "c0"] == [None]  # the thumb's own row


def test_implicit_labels_have_their_own_caps_per_conversation_and_customer() -> None:
    # one long conversation of one customer complaining after every reply, and five others with one each
    cid, messages, reactions = "long", [], []
    parent = None
    for turn in range(6):
        u, a = f"long-u{turn}", f"long-a{turn}"
        messages += [
            _msg(u, cid, 2 * turn + 1, U, f"question {turn}", parent),
            _msg(a, cid, 2 * turn + 2, A, f"answer {turn}", u),
        ]
        if turn:
            reactions.append(Reaction(f"long-a{turn - 1}", u, "complaint", 0.9, "cue", -1, 0.72, float(2 * turn + 1)))
        parent = a
    long = (Conversation(cid, "loud", "websocket", 0.0), messages, reactions)
    others = [_conversation(f"c{i}", f"user{i}", f"answer {i}", "gratitude", 1) for i in range(5)]
    snap = snapshot(long, *others)
    no_share = TrustConfig(implicit_max_per_conversation=3, implicit_max_rater_share=1.0)
    trusted, report = filter_snapshot(snap, no_share)
    kept = [r.reply_id for r in trusted.reactions if r.reply_id.startswith("long")]
    assert kept == ["long-a0", "long-a1", "long-a2"]  # the earliest three
    assert report.removed["implicit label over the per-conversation cap"] == 2
    assert len(kto(snap, trust=no_share)) == 8
    # per customer: no one supplies over 20% of the labels kept; the loud customer keeps 1 of 6 (17%)
    trusted, report = filter_snapshot(snap, TrustConfig(implicit_max_per_conversation=10))
    assert sum(r.reply_id.startswith("long") for r in trusted.reactions) == 1
    assert report.capped == {"implicit:loud": 4}
    assert (report.summary()["capped_implicit"], report.summary()["capped_ratings"]) == (4, 0)
    assert not filter_snapshot(snap, TrustConfig(implicit_max_per_conversation=0))[0].reactions


def test_an_excluded_next_message_or_a_held_customer_teaches_nothing() -> None:
    convs = [_conversation(f"c{i}", f"user{i}", f"answer {i}", "gratitude", 1) for i in range(7)]
    snap = snapshot(*convs, excluded_messages=frozenset({"c0-u2"}), rater_states={"user1": RaterState.REJECTED})
    trusted, report = filter_snapshot(snap, TrustConfig())
    assert {r.reply_id for r in trusted.reactions} == {f"c{i}-a1" for i in range(2, 7)}
    assert report.removed["implicit label of a removed message"] == 1
    assert report.removed["implicit label of a rater held for review"] == 1


def test_an_anonymous_conversation_is_its_own_customer() -> None:
    convs = [_conversation(f"c{i}", None, f"answer {i}", "gratitude", 1) for i in range(6)]
    snap = snapshot(*convs, rater_states={"conversation:c0": RaterState.PENDING})
    assert {r.group for r in kto(snap)} == {"c1", "c2", "c3", "c4", "c5"}


def test_cleaning_keeps_the_thumb_when_a_thumb_and_an_implicit_label_say_the_same() -> None:
    prompt = ({"role": "user", "content": REFUND_Q},)
    implicit = KTORow(prompt, "Within 30 days.", True, "c1", weight=0.45, signal="gratitude")
    thumb = KTORow(prompt, "Within 30 days!", True, "c2")
    other = KTORow(prompt, "No refunds.", False, "c3", weight=0.72, signal="complaint")
    data, report = clean(TrainingData(kto=(implicit, thumb, other)))
    assert [(r.group, r.signal) for r in data.kto] == [("c2", None), ("c3", "complaint")]
    assert report.dropped == [("kto c1", "near-duplicate")]


def test_silence_is_read_from_the_times_never_stored() -> None:
    q, a = _msg("u1", "c", 1, U, REFUND_Q, None), _msg("a1", "c", 2, A, "Within 30 days.", "u1")
    config = ImplicitConfig(abandon_after_s=600)
    assert set(silent_replies([q, a], now=2.0 + 601, config=config)) == {"a1"}
    assert silent_replies([q, a], now=2.0 + 599, config=config) == {}
    assert silent_replies([q, a, _msg("u2", "c", 3, U, "thanks", "a1")], now=1e9, config=config) == {}
    assert silent_replies([q], now=1e9, config=config) == {}  # an unanswered question is no abandoned reply
    shown = [dataclasses.asdict(m) | {"reaction": None} for m in (q, a)]
    with_silence(shown, now=2.0 + 601, config=config)
    assert shown[0]["reaction"] is None
    assert shown[1]["reaction"]["signal"] == "abandon" and shown[1]["reaction"]["value"] is None


# -- the store, through a real websocket session ------------------------------------------------


async def test_the_next_message_is_recorded_against_the_previous_reply(
    tiny_model: Path, tmp_path: Path, open_client: Any
) -> None:
    async with running_app(tiny_model, tmp_path) as app:
        assert app.store is not None
        client = await open_client(app.port)
        cid = (await client.hello(user="cust-1"))["conversation_id"]
        first, _ = await client.chat(REFUND_Q, "c1")
        second, _ = await client.chat("no, that's wrong", "c2")
        await client.chat("ok thanks, that helped", "c3")
        messages = await app.store.conversations.messages(cid)
        users = [m for m in messages if m.role is U]
        reactions = {r.reply_id: r for r in await app.store.conversations.reactions(cid)}
        assert set(reactions) == {first["message_id"], second["message_id"]}  # the last reply has none yet
        complaint, thanks = reactions[first["message_id"]], reactions[second["message_id"]]
        assert (complaint.message_id, complaint.signal, complaint.value) == (users[1].id, "complaint", -1)
        assert (thanks.message_id, thanks.signal, thanks.value) == (users[2].id, "gratitude", 1)
        assert 0 < thanks.weight < 1 and complaint.created_at > 0

        # the console's transcript shows it on the reply; the training export carries it
        transcript = await app.store.browse.transcript(cid)
        assert transcript is not None
        shown = {m["id"]: m["reaction"] for m in transcript["messages"]}
        assert shown[first["message_id"]]["signal"] == "complaint" and shown[users[0].id] is None
        exported = await app.store.conversations.export_feedback()
        assert {r.reply_id for r in exported.reactions} == set(reactions)
        assert {m.conversation_id for m in exported.messages} == {cid}  # a reaction alone exports the conversation
        assert (
            await app.store.conversations.count_new_feedback(
                after_rating_id=0, after_correction_id=0, after_time=0.0, implicit=True
            )
            == 2
        )
        assert (
            await app.store.conversations.count_new_feedback(after_rating_id=0, after_correction_id=0, after_time=0.0)
            == 0
        )

        # erasing the customer erases what was read from their messages
        await app.store.erasure.erase_user("cust-1", actor="test")
        assert await app.store.conversations.reactions(cid) == []
        assert not (await app.store.conversations.export_feedback()).reactions


# -- a real training run on implicit labels alone --------------------------------------------------


async def seed_reactions(store: FeedbackStore, n: int) -> None:
    """``n`` customers each ask, get an answer and react to it: thanks for the even ones, a complaint
    for the odd ones (no thumb, no correction anywhere)."""
    await store.versions.ensure_base("unused")
    for i in range(n):
        cid = f"c{i}"
        await store.conversations.create(cid, user_id=f"user{i}")
        await store.conversations.add_message(
            message_id=f"{cid}-u1", conversation_id=cid, role=U, text=REFUND_Q, parent_id=None
        )
        answer = f"Refunds are accepted within {20 + i} days." if i % 2 == 0 else f"no idea {i}"
        await store.conversations.add_message(
            message_id=f"{cid}-a1",
            conversation_id=cid,
            role=A,
            text=answer,
            parent_id=f"{cid}-u1",
            model_version="base",
        )
        text = "thanks, that helped" if i % 2 == 0 else "no, that's wrong"
        branch = [Turn(f"{cid}-u1", "user", REFUND_Q), Turn(f"{cid}-a1", "assistant", answer)]
        await store.conversations.add_message(
            message_id=f"{cid}-u2",
            conversation_id=cid,
            role=U,
            text=text,
            parent_id=f"{cid}-a1",
            reaction=reaction_after(branch, message_id=f"{cid}-u2", text=text, config=CONFIG),
        )


async def test_a_kto_run_on_implicit_labels_alone_trains_the_adapter(tiny_model: Path, tmp_path: Path) -> None:
    async with await FeedbackStore.open(tmp_path / "db.sqlite") as store:
        await seed_reactions(store, 8)

        def config(train: bool) -> CycleConfig:
            return CycleConfig(
                base_model=str(tiny_model),
                data_dir=tmp_path,
                min_new_feedback=1,
                train=TrainConfig(max_steps=4, learning_rate=5e-3, replay_pairs=0, contrast_pick="hash", lora_r=4),
                implicit=ImplicitConfig(train=train),
            )

        off = await TrainingCycle(store, config(False)).run()
        assert off.status is CycleStatus.SKIPPED  # implicit.train off: no new feedback, nothing to train
        prepared = prepare(await store.conversations.export_feedback(), config(True))
        assert [r.signal for r in prepared.train.kto].count("gratitude") == 4 and len(prepared.train.kto) == 8
        assert prepared.summary()["by_signal"] == {"thumbs (kto)": 0, "implicit (kto)": 8}

        result = await TrainingCycle(store, config(True)).run()
        # no pairs: no held-out pairs, so the gate rejects; the run trained all the same
        assert result.status is CycleStatus.REJECTED and result.version == "v1", result.reason
        version = await store.versions.get("v1")
        assert version.eval_report is not None and version.eval_report["trainer"] == "kto"
        assert [(s["trainer"], s["steps"]) for s in version.eval_report["budget"]["stages"]] == [("kto", 4)]
        assert sorted(version.feedback_ids["messages"]) == sorted(f"c{i}-{m}" for i in range(8) for m in ("a1", "u2"))
        adapter = Path(version.adapter_path or "")
        assert json.loads((adapter / "learnloop.json").read_text())["rows"]["kto"] == 8
        from safetensors.torch import load_file

        weights = load_file(str(adapter / "adapter_model.safetensors"))
        assert any(float(t.abs().sum()) > 0 for k, t in weights.items() if "lora_B" in k)  # B starts at 0
