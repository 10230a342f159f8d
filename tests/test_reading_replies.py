"""Reading replies (training/reading.py) and the gate's reply judge (training/gate.py): pure, milliseconds."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from training.chats import SHIPPED, generic_chat_path, load_chat
from training.gate import EvalReport, GateConfig, GateJudge, ModelScores, ReplyReport, decide, verdicts
from training.reading import (
    AnswerWeights,
    content_words,
    counted,
    kept_changes,
    leaked,
    leaks,
    numbers,
    operator_facts,
    reply_score,
    score_reply,
)

REFUND = "Refunds are accepted within 30 days of delivery."


def test_the_docstrings_examples() -> None:
    close = score_reply("Refunds within 30 days of delivery.", REFUND)
    assert (round(close.content, 2), close.facts, close.wrong, close.score) == (0.89, 1.0, 0.0, 0.9444)
    wrong = score_reply("You have 14 days.", REFUND)
    assert (round(wrong.content, 2), wrong.facts, wrong.wrong, wrong.score) == (0.33, 0.0, 1.0, -0.3333)


def test_scores_order_replies_as_a_reader_would() -> None:
    exact = reply_score(REFUND, REFUND)
    words_no_figure = reply_score("Refunds are accepted after delivery.", REFUND)
    silent = reply_score("I am not sure, please ask our team.", REFUND)
    contradicting = reply_score("Refunds are accepted within 14 days of delivery.", REFUND)
    assert exact == 1.0
    assert exact > words_no_figure > silent == 0.0
    assert contradicting < words_no_figure  # a wrong figure costs more than a missing one
    assert reply_score("", REFUND) == 0.0 and reply_score("anything", "") == 0.0


def test_an_answer_without_figures_is_judged_on_its_words() -> None:
    answer = "Open Settings, choose Privacy, then Clear history."
    s = score_reply("Go to Settings, choose Privacy and Clear history.", answer)
    assert s.facts is None and s.score == s.content > 0.8
    assert score_reply("Go to Settings, then step 3.", answer).wrong == 1.0  # a figure the operator never gave


def test_chinese_counts_characters_and_full_width_digits() -> None:
    answer = "收货后7天内可以无理由退货。"
    assert content_words("退货期限是7天") == ["退", "货", "期", "限", "天"]
    assert numbers("７天，１，０００元") == ["7", "1000"]
    right = reply_score("７天内可以退货", answer)  # full-width 7 is the operator's 7
    assert right > 0.6 and right > reply_score("15天内可以退货", answer)


def test_numbers_fold_thousands_and_decimal_commas() -> None:
    assert numbers("1,000 and 12,500.50 and 2.1% and 3,5 and 9:30") == ["1000", "12500.50", "2.1", "3.5", "9:30"]


def test_a_leak_is_an_operators_fact_the_prompt_does_not_hold() -> None:
    facts = operator_facts([REFUND, "Standard shipping takes 3 to 5 business days and costs 4.95."])
    assert {"30", "4.95", "refunds accepted within days delivery"} <= facts
    assert "3" not in facts and "5" not in facts  # one digit: too common to be an operator's fact
    assert leaked("Cats sleep about 30 hours a week.", "How long do cats sleep?", facts) == ("30",)
    assert leaked("It is 30.", "What is 15 plus 15? Is it 30?", facts) == ()  # the prompt holds it
    copied = leaked("Poems: refunds are accepted within 30 days of delivery.", "Write a poem", facts)
    assert copied == ("30", "refunds accepted within days delivery")
    assert leaked("A haiku about rain.", "Write a haiku", facts) == ()
    # what the gate keeps of each leak, so an operator can read why a candidate failed the check
    assert leaks(
        ["Cats sleep about 30 hours a week.", "A haiku about rain.", "It is 30."],
        ["How long do cats sleep?", "Write a haiku", "What is 15 plus 15? Is it 30?"],
        facts,
    ) == [{"prompt": "How long do cats sleep?", "reply": "Cats sleep about 30 hours a week.", "facts": ["30"]}]


def report(*, cand: float, live: float, leaks: tuple[int, int] = (0, 0), margin: float = 0.5) -> EvalReport:
    return EvalReport(
        n_heldout=4,
        candidate=ModelScores(preference_accuracy=1.0, chosen_nll=1.0, generic_ppl=10.0),
        live=ModelScores(preference_accuracy=0.5, chosen_nll=2.0, generic_ppl=10.0),
        reward_margin=margin,
        reward_accuracy=1.0 if margin > 0 else 0.0,
        base_generic_ppl=10.0,
        replies=ReplyReport(
            n=4, candidate=cand, live=live, wins=3, losses=1, candidate_leaks=leaks[0], live_leaks=leaks[1]
        ),
    )


def test_the_reply_judge_promotes_only_better_replies_without_new_leaks() -> None:
    judge = GateConfig(judge="replies")
    assert decide(report(cand=0.6, live=0.2), judge).promote
    assert not decide(report(cand=0.2, live=0.2), judge).promote  # no better: no evidence to promote
    worse = decide(report(cand=0.1, live=0.2), judge)
    assert not worse.promote and "reply score 0.100 vs live 0.200" in worse.reasons[0]
    leaky = decide(report(cand=0.6, live=0.2, leaks=(2, 1)), judge)
    assert not leaky.promote and leaky.reasons == (
        "failed: generic replies stating an operator's fact: 2 vs live 1 (need <= 1)",
    )
    # a failed leak check names what the candidate said where live's reply leaked nothing
    cats, poem = "How long do cats sleep?", "Write a poem"
    leaked = ReplyReport.label_leaks(
        [
            {"prompt": cats, "reply": "About 30 hours.", "facts": ["30"]},
            {"prompt": poem, "reply": "Refunds within 30 days of delivery.", "facts": ["30", "refunds within days"]},
        ],
        [{"prompt": cats, "reply": "Cats sleep 30 hours.", "facts": ["30"]}],
    )
    assert [(x["model"], x["prompt"]) for x in leaked] == [("candidate", cats), ("candidate", poem), ("live", cats)]
    named = dataclasses.replace(
        report(cand=0.6, live=0.2, leaks=(2, 1)),
        replies=dataclasses.replace(report(cand=0.6, live=0.2, leaks=(2, 1)).replies, leaked=leaked),  # type: ignore[arg-type]
    )
    assert named.replies is not None and [x["prompt"] for x in named.replies.new_leaks()] == [poem]
    assert decide(named, judge).reasons == (
        "failed: generic replies stating an operator's fact: 2 vs live 1 (need <= 1); the candidate said"
        " '30 / refunds within days' to 'Write a poem'",
    )
    assert not decide(report(cand=0.6, live=0.2), dataclasses.replace(judge, min_reply_gain=0.5)).promote
    # the pair checks do not count for it; the perplexity check does
    assert decide(report(cand=0.6, live=0.2, margin=-1.0), judge).promote
    blown = dataclasses.replace(report(cand=0.6, live=0.2), candidate=ModelScores(1.0, 1.0, generic_ppl=12.0))
    assert not decide(blown, judge).promote


def test_the_liked_replies_count_in_the_reading_and_their_losses_are_counted() -> None:
    # a kept answer is lost when live's reply reads as the liked one (0.6 or more) and the candidate's does not
    assert kept_changes([0.9, 0.2, 0.7, 0.1, 0.65], [0.95, 0.8, 0.3, 0.1, 0.6]) == (1, 1)
    # a liked question counts up to 0.6 (reading as the liked reply is all it shows); a corrected one as scored
    assert (counted(0.9, liked=True), counted(0.4, liked=True), counted(0.9, liked=False)) == (0.6, 0.4, 0.9)
    liked = "Refunds are accepted within 30 days of delivery."
    assert reply_score("You can return it within 30 days of delivery.", liked) >= 0.6  # the same answer, reworded
    assert reply_score("Refunds take 14 days.", liked) < 0.6
    r = report(cand=0.3, live=0.2)
    kept = dataclasses.replace(r, replies=dataclasses.replace(r.replies, kept=2, kept_lost=1, kept_regained=0))  # type: ignore[arg-type]
    decision = decide(kept, GateConfig(judge="replies"))
    assert decision.promote and decision.reasons[0] == (
        "passed: reply score 0.300 vs live 0.200 over 6 questions (4 corrected, 2 rated up: 1 of those lost,"
        " 0 regained), 3 better and 1 worse (need > 0.200)"
    )
    with pytest.raises(ValueError, match="kept_questions"):
        GateConfig(kept_questions=-1)


def test_each_judge_reads_its_own_evidence() -> None:
    assert verdicts(report(cand=0.6, live=0.2, margin=-1.0), GateConfig()) == {
        "pairs": False,
        "replies": True,
        "both": False,
    }
    assert verdicts(report(cand=0.1, live=0.2), GateConfig()) == {"pairs": True, "replies": False, "both": False}
    unread = dataclasses.replace(report(cand=0.6, live=0.2), replies=None)
    decision = decide(unread, GateConfig(judge=GateJudge.BOTH))
    assert not decision.promote and "no replies were read" in decision.reasons[0]
    assert decide(unread, GateConfig()).promote  # the default judge, pairs, needs none


def test_a_report_with_replies_survives_json_and_an_older_report_has_none() -> None:
    r = dataclasses.replace(
        report(cand=0.6, live=0.2),
        replies=dataclasses.replace(
            report(cand=0.6, live=0.2).replies,  # type: ignore[arg-type]
            examples=({"question": "q"},),
            leaked=({"model": "live", "prompt": "p", "reply": "r 30", "facts": ["30"]},),
        ),
    )
    assert EvalReport.from_dict(r.to_dict()) == r
    older = r.to_dict()
    del older["replies"]
    assert EvalReport.from_dict(older).replies is None
    # a report written by a newer training job (the code on disk upgraded under a running server):
    # figures the server does not know are left out, not a failed run; a missing figure still fails
    newer = r.to_dict()
    newer["replies"]["judged_by"] = "a later reading"
    newer["candidate"]["generic_ppl_zh"] = 9.1
    assert EvalReport.from_dict(newer) == r
    del newer["replies"]["wins"]
    with pytest.raises(TypeError, match="wins"):
        EvalReport.from_dict(newer)


def test_a_gate_judge_must_be_known() -> None:
    with pytest.raises(ValueError, match=r"gate\.judge 'vibes': use one of pairs, replies, both"):
        GateConfig(judge="vibes")
    with pytest.raises(ValueError, match="reply_questions"):
        GateConfig(reply_questions=-1)


def test_the_generic_chat_set_is_named_or_a_file(tmp_path: Path) -> None:
    """gate.generic_chat: the shipped English and Chinese sets, or a deployment's own JSONL."""
    en, zh = (load_chat(generic_chat_path(name)) for name in SHIPPED)
    assert len(en) == len(zh) == 24  # the same exchanges, translated
    assert all(any("\u4e00" <= ch <= "\u9fff" for ch in row["completion"]) for row in zh)
    own = tmp_path / "fr.jsonl"
    own.write_text('{"prompt": [{"role": "user", "content": "Bonjour !"}], "completion": "Bonjour !"}\n')
    assert GateConfig(generic_chat=str(own)).generic_chat == str(own)
    assert load_chat(generic_chat_path(str(own)))[0]["completion"] == "Bonjour !"
    with pytest.raises(ValueError, match=r"gate\.generic_chat 'fr': use en or zh or the path of a JSONL file"):
        GateConfig(generic_chat="fr")
    own.write_text('{"prompt": "Bonjour !"}\n')
    with pytest.raises(ValueError, match="row 1: need"):
        load_chat(own)


TRASH = "Open Trash in the sidebar, right-click the note, and choose Restore."
HELPDESK = [
    TRASH,
    "Open Settings, choose Appearance, and select Dark.",
    "Open the note, click Share, choose Export as PDF, then pick a folder to save it in.",
    "Open Settings, choose Account, and turn on Two-step login.",
]


def test_weighted_words_count_by_how_rare_they_are_among_the_answers() -> None:
    weights = AnswerWeights.of([*HELPDESK, TRASH, "  "])  # a repeated answer counts once, a blank one never
    assert weights.n == 4 and weights.df["open"] == 4 and weights.df["trash"] == 1
    assert weights("open") < weights("settings") < weights("trash") < weights("organization")  # 4, 2, 1, 0 answers
    assert weights("open") > 0  # a word of every answer still counts a little
    # the docstring's examples: the common frame with the wrong step, then the right step
    assert reply_score("Open Settings, choose Organization.", TRASH) == 0.3333
    assert reply_score("Open Settings, choose Organization.", TRASH, weights) == 0.0438
    assert reply_score("Open Trash, then choose Restore.", TRASH, weights) == 0.5799
    assert reply_score(TRASH, TRASH, weights) == 1.0
    # figures are read as before: a wrong one costs the same with weights
    refund = AnswerWeights.of([REFUND, "Standard shipping takes 3 to 5 business days."])
    assert score_reply("You have 14 days.", REFUND, refund).wrong == 1.0
    assert reply_score("Refunds within 30 days of delivery.", REFUND, refund) > reply_score(
        "You have 14 days.", REFUND, refund
    )


def test_weights_read_chinese_characters_too() -> None:
    answers = ["收货后7天内可以无理由退货。", "订单付款后48小时内发货。", "收货后请在页面上确认。"]
    weights = AnswerWeights.of(answers)
    assert weights("退") > weights("收")  # 退 is one answer's, 收 two
    assert reply_score("7天内可以退货", answers[0], weights) > reply_score("收货后48小时", answers[0], weights)
