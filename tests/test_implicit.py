"""The implicit-feedback classifier reads customers' next messages in English and Chinese."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from feedback.records import Message, Role
from training.implicit import (
    ImplicitConfig,
    ImplicitSignal,
    classify_reaction,
    implicit_label,
    overlap,
    reading_after_reply,
)

CASES_FILE = Path(__file__).resolve().parent.parent / "bench" / "implicit_cases.jsonl"
CASES = [json.loads(line) for line in CASES_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_the_hand_labelled_set_is_big_enough_in_both_languages() -> None:
    for lang in ("en", "zh"):
        cases = [c for c in CASES if c["lang"] == lang]
        assert len(cases) >= 40
        assert {c["signal"] for c in cases} == {"gratitude", "complaint", "repeat", "human", "none"}
        assert sum("note" in c for c in cases) >= 8  # the hard negatives say why they are hard


@pytest.mark.parametrize("case", CASES, ids=[f"{c['lang']}-{c['text'][:30]}" for c in CASES])
def test_hand_labelled_case(case: dict[str, str]) -> None:
    reading = classify_reaction(case["text"], previous_user=case["previous"])
    assert reading.signal is ImplicitSignal(case["signal"]), reading
    assert 0 < reading.confidence <= 1 and reading.cue


def test_thanks_then_wrong_is_a_complaint_and_thanks_then_a_new_question_is_gratitude() -> None:
    assert classify_reaction("thanks but that's wrong").signal is ImplicitSignal.COMPLAINT
    assert classify_reaction("谢谢，但是不对").signal is ImplicitSignal.COMPLAINT
    assert classify_reaction("Thanks! Do you ship to Canada?", previous_user="Is shipping free?").signal is (
        ImplicitSignal.GRATITUDE
    )


def test_repeat_is_judged_against_the_previous_question() -> None:
    text = "what's the weight limit for a cabin bag?"
    assert classify_reaction(text, previous_user="Is there a weight limit for cabin bags?").signal is (
        ImplicitSignal.REPEAT
    )
    assert classify_reaction(text, previous_user="Do you have a physical store?").signal is ImplicitSignal.NONE
    assert classify_reaction(text).signal is ImplicitSignal.NONE
    assert overlap("退货期限是多久？", "退货期限是多久") == 1.0
    assert overlap("Hi", "Do you ship to Canada?") == 0.0


def test_silence_is_abandon_only_after_the_idle_time() -> None:
    config = ImplicitConfig(abandon_after_s=600)
    assert classify_reaction(None, idle_s=601, config=config).signal is ImplicitSignal.ABANDON
    assert classify_reaction(None, idle_s=599, config=config).signal is ImplicitSignal.NONE
    assert classify_reaction("   ", idle_s=None, config=config).signal is ImplicitSignal.NONE


def _msg(mid: str, seq: int, role: Role, text: str, parent: str | None, at: float) -> Message:
    return Message(id=mid, conversation_id="c", seq=seq, role=role, text=text, parent_id=parent, created_at=at)


def test_reading_after_a_reply_in_a_stored_conversation() -> None:
    q = _msg("u1", 1, Role.USER, "How long does shipping take?", None, 100.0)
    a = _msg("a1", 2, Role.ASSISTANT, "Shipping takes 10 days.", "u1", 101.0)
    nxt = _msg("u2", 3, Role.USER, "how long does shipping take??", "a1", 130.0)
    reading = reading_after_reply([q, a, nxt], "a1", now=10_000.0)
    assert reading.signal is ImplicitSignal.REPEAT
    # the reply ended the conversation long ago: abandoned; a minute ago: too early to tell
    assert reading_after_reply([q, a], "a1", now=101.0 + 3600).signal is ImplicitSignal.ABANDON
    assert reading_after_reply([q, a], "a1", now=161.0).signal is ImplicitSignal.NONE
    # a regeneration came after it: the customer did not leave
    regen = _msg("a2", 4, Role.ASSISTANT, "3 to 5 business days.", "u1", 140.0)
    assert reading_after_reply([q, a, regen], "a1", now=101.0 + 3600).signal is ImplicitSignal.NONE


def test_labels_and_weights() -> None:
    assert implicit_label(ImplicitSignal.GRATITUDE) == (1, 0.5)
    assert implicit_label(ImplicitSignal.COMPLAINT) == (-1, 0.8)
    assert implicit_label(ImplicitSignal.REPEAT) == (-1, 0.5)
    assert implicit_label(ImplicitSignal.HUMAN) == (-1, 0.3)
    for signal in (ImplicitSignal.ABANDON, ImplicitSignal.NONE):
        assert implicit_label(signal) == (None, 0.0)


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="abandon_after_s"):
        ImplicitConfig(abandon_after_s=0)
    with pytest.raises(ValueError, match="repeat_overlap"):
        ImplicitConfig(repeat_overlap=1.5)
