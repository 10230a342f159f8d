"""The learning benchmark's rater: deterministic and strict, for every simulated deployment."""

from __future__ import annotations

import pytest

from bench.rater import deployment_names, leaks, load_deployment, rate, steps_in_order

SHOP = load_deployment("shop")
INTENTS, RUBRIC = list(SHOP.intents), SHOP.rubric
BY_ID = {i.id: i for i in INTENTS}


def test_shop_has_enough_intents_and_split_paraphrases() -> None:
    assert len(INTENTS) >= 12
    for intent in INTENTS:
        assert len(intent.train) >= 6 and len(intent.heldout) >= 3
        assert not set(intent.train) & set(intent.heldout)


def test_every_canonical_answer_passes_its_own_rubric() -> None:
    for intent in INTENTS:
        verdict = rate(intent, intent.answer, INTENTS, RUBRIC)
        assert verdict.up, (intent.id, verdict.reasons)


def test_correct_answer_in_other_words_passes() -> None:
    v = rate(BY_ID["refund"], "Sure! You have 30 days after delivery to request a full refund.", INTENTS, RUBRIC)
    assert v.up


def test_wrong_missing_contradicting_rambling_and_leaking_answers_fail() -> None:
    refund = BY_ID["refund"]
    assert rate(refund, "I'm not sure, please contact us.", INTENTS, RUBRIC).reasons == ("missing the fact",)
    v = rate(refund, "Refunds are possible within 30 days, or 14 days for sale items.", INTENTS, RUBRIC)
    assert not v.up and "contradicting" in v.reasons[0]
    v = rate(refund, "Refunds within 30 days. " + "We really care about you. " * 20, INTENTS, RUBRIC)
    assert not v.up and "rambling" in v.reasons[-1]
    v = rate(refund, "Refunds within 30 days. We accept Visa, Mastercard and PayPal.", INTENTS, RUBRIC)
    assert not v.up and v.leaked == ("payment",)
    v = rate(BY_ID["warranty"], "All products carry a lifetime warranty.", INTENTS, RUBRIC)
    assert not v.up


def test_rater_is_deterministic_and_leak_detection_works_on_generic_text() -> None:
    text = "Click Forgot password on the sign-in page."
    assert rate(BY_ID["refund"], text, INTENTS, RUBRIC) == rate(BY_ID["refund"], text, INTENTS, RUBRIC)
    assert leaks(text, INTENTS) == ("password_reset",)
    assert leaks("Paris is the capital of France.", INTENTS) == ()


def test_shop_keeps_its_prompt_and_never_corrected_intents() -> None:
    assert SHOP.system_prompt == (
        "You are the customer-service assistant of Northwind Goods, an online shop. Answer briefly."
    )
    assert SHOP.never_corrected == ("gift_card", "stores")
    assert SHOP.generic is None and SHOP.rubric.max_words == 80 and SHOP.language == "en"


# --- two facts per answer (bank) ---------------------------------------------------------

BANK = load_deployment("bank")


def test_bank_answers_need_both_facts_and_each_missing_one_is_named() -> None:
    atm = BANK.intent("atm_fee")
    assert [f.name for f in atm.facts] == ["fee", "limit"]
    assert BANK.rate(atm, "Other banks' ATMs cost $2.50 per withdrawal; the daily limit is $800.").up
    assert BANK.rate(atm, "It costs 2.50 dollars at another bank's machine.").reasons == ("missing the fact: limit",)
    assert BANK.rate(atm, "You can withdraw up to 800 dollars a day.").reasons == ("missing the fact: fee",)
    assert BANK.rate(atm, "Please visit a branch.").reasons == ("missing the fact: fee", "missing the fact: limit")


def test_bank_numbers_do_not_match_inside_other_numbers() -> None:
    savings = BANK.intent("savings_rate")
    # "2.50" holds "50" and "12.1%" holds "2.1%": neither states the savings facts
    assert not BANK.rate(savings, "We pay 12.1% on balances up to 2.50 dollars.").up
    assert BANK.rate(savings, "Savings earn 2.1% a year on up to $50,000.").up
    v = BANK.rate(savings, "Savings earn 2.1% a year on up to $50,000, or 3% for students.")
    assert not v.up and "contradicting" in v.reasons[0]


def test_bank_leak_needs_every_fact_of_the_other_intent() -> None:
    joint = BANK.intent("joint_account")
    assert BANK.leaks("It costs 2.50 dollars.", own="joint_account") == ()
    v = BANK.rate(joint, "It costs 2.50 dollars and you can take out 800 dollars a day.")
    assert not v.up and v.leaked == ("atm_fee",)


# --- steps in order (helpdesk) -------------------------------------------------------------

HELPDESK = load_deployment("helpdesk")


def test_helpdesk_steps_must_all_appear_in_order() -> None:
    sync = HELPDESK.intent("sync_fix")
    assert HELPDESK.rate(sync, "Log out, close and reopen the app, and log back in.").up
    v = HELPDESK.rate(sync, "Sign in again, restart the app, then sign out.")
    assert not v.up and v.reasons[0].startswith("steps out of order")
    assert HELPDESK.rate(sync, "Just restart the app.").reasons[0].startswith("missing step 1")
    v = HELPDESK.rate(sync, "Sign out, restart, sign in. Or reinstall the app.")
    assert not v.up and "contradicting" in v.reasons[0]


def test_steps_take_the_earliest_match_after_the_previous_step() -> None:
    steps = HELPDESK.intent("two_factor").steps
    # "security" appears before "settings" too; the walk still finds an in-order set
    text = "For security: open Settings, then Security, enable two-factor, scan the QR code."
    assert steps_in_order(steps, text) is None
    assert steps_in_order(steps, "Scan the QR code, then open Settings > Security > 2FA.") is not None


# --- Chinese (zh_shop) -------------------------------------------------------------------------

ZH = load_deployment("zh_shop")


def test_chinese_rubric_matches_without_word_boundaries_and_folds_full_width() -> None:
    ret = ZH.intent("return")
    assert ZH.rate(ret, "您好，签收后7天内都可以无理由退货哦。").up
    assert ZH.rate(ret, "签收后７天内可以退货。").up  # full-width digit
    assert ZH.rate(ret, "七天内可以退货").up
    assert ZH.rate(ret, "十七天内可以退货").reasons == ("missing the fact",)
    v = ZH.rate(ret, "签收后30天内可以退货。")
    assert not v.up and v.reasons[0] == "missing the fact" and "contradicting" in v.reasons[1]


def test_chinese_length_is_counted_in_characters() -> None:
    ret = ZH.intent("return")
    assert ZH.rubric.max_words is None and ZH.rubric.max_chars == 80
    long_reply = "签收后7天内可以退货。" + "感谢您的耐心等待与支持。" * 7
    v = ZH.rate(ret, long_reply)
    assert not v.up and v.reasons[-1].startswith("rambling (") and "characters" in v.reasons[-1]
    # spaces are not characters of the reply: the same text spaced out is no longer
    assert ZH.rubric.length_reason(" ".join("签收后7天内可以退货")) is None
    # a reply's length is counted in the unit its rubric limits
    assert ZH.rubric.length(" ".join("签收后7天内可以退货")) == 10
    assert load_deployment("shop").rubric.length("Returns are free within 30 days.") == 6


def test_chinese_two_facts_and_leaks() -> None:
    points = ZH.intent("points")
    assert ZH.rate(points, "每消费1元积1分，100积分可抵1元。").up
    assert ZH.rate(points, "每消费一元积一分。").reasons == ("missing the fact: redeem",)
    assert ZH.leaks("一个星期有7天。") == ()  # a number of days is not the return policy
    assert ZH.leaks("家电保修1年。", own="gift_card") == ("warranty",)


# --- every deployment ------------------------------------------------------------------------


def _bigrams(text: str) -> set[str]:
    t = "".join(text.lower().split())
    return {t[k : k + 2] for k in range(len(t) - 1)}


@pytest.mark.parametrize("name", deployment_names())
def test_every_deployment_is_well_formed(name: str) -> None:
    dep = load_deployment(name)
    assert 8 <= len(dep.intents) <= 14
    assert len(dep.never_corrected) >= 2
    for intent in dep.intents:
        assert len(intent.train) >= 6 and len(intent.heldout) >= 3 and len(intent.heldout_extra) == 6, intent.id
        assert dep.rate(intent, intent.answer).up, (intent.id, dep.rate(intent, intent.answer).reasons)
        assert dep.leaks(intent.answer, own=intent.id) == (), intent.id
        assert intent.facts or intent.steps, intent.id
        # held-out paraphrases are not near-copies of training ones; the extra ones are not
        # near-copies of any other paraphrase either
        for held in intent.heldout:
            for train in intent.train:
                a, b = _bigrams(held[-1]), _bigrams(train[-1])
                assert len(a & b) / len(a | b) < 0.6, (intent.id, held, train)
        for k, extra in enumerate(intent.heldout_extra):
            for other in intent.train + intent.heldout + intent.heldout_extra[:k]:
                a, b = _bigrams(extra[-1]), _bigrams(other[-1])
                assert len(a & b) / len(a | b) < 0.6, (intent.id, extra, other)
    assert set(deployment_names()) >= {"shop", "bank", "airline", "helpdesk", "zh_shop"}


def test_airline_questions_come_after_a_greeting_or_context() -> None:
    dep = load_deployment("airline")
    for intent in dep.intents:
        for script in intent.train + intent.heldout + intent.heldout_extra:
            assert 2 <= len(script) <= 3, (intent.id, script)


def test_unknown_deployment_names_the_known_ones() -> None:
    with pytest.raises(FileNotFoundError, match="shop"):
        load_deployment("nowhere")
