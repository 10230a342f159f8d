"""The learning benchmark's rater: deterministic and strict."""

from __future__ import annotations

from bench.rater import leaks, load_intents, rate

INTENTS, MAX_WORDS = load_intents()
BY_ID = {i.id: i for i in INTENTS}


def test_shop_has_enough_intents_and_split_paraphrases() -> None:
    assert len(INTENTS) >= 12
    for intent in INTENTS:
        assert len(intent.train) >= 6 and len(intent.heldout) >= 3
        assert not set(intent.train) & set(intent.heldout)


def test_every_canonical_answer_passes_its_own_rubric() -> None:
    for intent in INTENTS:
        verdict = rate(intent, intent.answer, INTENTS, MAX_WORDS)
        assert verdict.up, (intent.id, verdict.reasons)


def test_correct_answer_in_other_words_passes() -> None:
    v = rate(BY_ID["refund"], "Sure! You have 30 days after delivery to request a full refund.", INTENTS, MAX_WORDS)
    assert v.up


def test_wrong_missing_contradicting_rambling_and_leaking_answers_fail() -> None:
    refund = BY_ID["refund"]
    assert rate(refund, "I'm not sure, please contact us.", INTENTS, MAX_WORDS).reasons == ("missing the fact",)
    v = rate(refund, "Refunds are possible within 30 days, or 14 days for sale items.", INTENTS, MAX_WORDS)
    assert not v.up and "contradicting" in v.reasons[0]
    v = rate(refund, "Refunds within 30 days. " + "We really care about you. " * 20, INTENTS, MAX_WORDS)
    assert not v.up and "rambling" in v.reasons[-1]
    v = rate(refund, "Refunds within 30 days. We accept Visa, Mastercard and PayPal.", INTENTS, MAX_WORDS)
    assert not v.up and v.leaked == ("payment",)
    v = rate(BY_ID["warranty"], "All products carry a lifetime warranty.", INTENTS, MAX_WORDS)
    assert not v.up


def test_rater_is_deterministic_and_leak_detection_works_on_generic_text() -> None:
    text = "Click Forgot password on the sign-in page."
    assert rate(BY_ID["refund"], text, INTENTS, MAX_WORDS) == rate(BY_ID["refund"], text, INTENTS, MAX_WORDS)
    assert leaks(text, INTENTS) == ("password_reset",)
    assert leaks("Paris is the capital of France.", INTENTS) == ()
