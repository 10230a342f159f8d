"""bench/learning.py's command line and --all table (the runs themselves are benchmarks, not tests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.learning import (
    BEYOND_CHANCE,
    KEPT,
    OWN_QUESTIONS,
    PLAIN,
    SCORE_ALONE,
    STARVED,
    Cycle,
    VerdictTest,
    agreement,
    agreement_table,
    better,
    gate_figures,
    intent_p,
    labelled_runs,
    live_curve,
    main,
    mcnemar_p,
    parse_args,
    plain_words,
    plot_runs,
    rejudge,
    shape,
    share_p_range,
    starved,
    table,
    verdict_chance,
    verdict_shares,
)
from bench.rater import SATISFIED, load_deployment
from training.config import CycleConfig, TrainConfig
from training.gate import EvalReport, GateConfig, ModelScores, verdicts


def _row(deployment: str, seed: int, gain: float, *, reactions: bool = False) -> dict[str, Any]:
    return {
        "deployment": deployment,
        "seed": seed,
        "thumbs_share": 0.2 if reactions else 1.0,
        "reactions": reactions,
        "implicit_training": reactions,
        "operator_reads_reactions": reactions,
        "base": 0.0,
        "by_version": {"base": 0.0, "v1": gain / 100},
        "best_version": "v1",
        "best_gain_pp": gain,
        "leaks": {"base": {"uncorrected": 0, "generic": 0}, "v1": {"uncorrected": 2, "generic": 1}},
        "ppl_rise_best": -0.168,
        "minutes": 14.5,
    }


def test_defaults_keep_the_shop_run() -> None:
    args = parse_args([])
    assert args.deployment == "shop" and args.seed == 0 and args.cycles == 3
    assert args.thumbs_share == 1.0 and not args.reactions and args.max_new_tokens == 48
    assert parse_args(["--all"]).seeds == "0,1"
    # the recipe is the product's: one pass over each run's rows, at most 1000 steps
    assert (args.epochs, args.steps) == (1.0, 1000)
    # every training knob the bench sets defaults to the product's own (training.config)
    product = TrainConfig()
    assert (args.max_minutes, args.demo_epochs, args.lr, args.sft_weight, args.init_from, args.kto_steps) == (
        product.max_minutes,
        product.demo_epochs,
        product.learning_rate,
        product.sft_weight,
        product.init_from,
        product.kto_steps,
    )
    assert (args.contrast, args.contrast_pick, args.replay, args.replay_share, args.transplants, args.numbers) == (
        product.contrast_pairs,
        product.contrast_pick,
        product.replay_pairs,
        product.replay_share,
        product.transplant_pairs,
        product.number_pairs,
    )
    assert args.guard_every == product.guard_every


def test_reactions_are_read_and_trained_unless_told_otherwise() -> None:
    args = parse_args(["--thumbs-share", "0.2", "--reactions"])
    assert args.implicit_training and args.operator_reads_reactions
    args = parse_args(["--reactions", "--no-implicit-training"])
    assert not args.implicit_training and args.operator_reads_reactions
    assert not parse_args([]).implicit_training
    assert parse_args(["--all", "--modes", "explicit,implicit,sparse"]).modes == "explicit,implicit,sparse"


def test_bad_flags_are_refused() -> None:
    for argv in (
        ["--thumbs-share", "1.5"],
        ["--modes", "explicit,loud"],
        ["--deployment", "nowhere"],
        ["--implicit-training"],  # reads reactions: needs --reactions
        ["--starve", "4"],  # a cycle the run does not have (3 cycles)
        ["--starve", "0"],
        ["--starve", "2", "--starve-steps", "0"],
    ):
        with pytest.raises(SystemExit):
            parse_args(argv)


def test_table_has_a_row_per_run_and_the_mean_gain_per_mode() -> None:
    text = table([_row("shop", 0, 38.9), _row("bank", 1, 20.0), _row("shop", 0, 10.0, reactions=True)])
    lines = text.splitlines()
    assert lines[2] == "| shop | 0 | thumbs 100% | 0.0% | 38.9% (v1) | +38.9 | 2 / 1 | -16.8% | 14.5 |"
    assert "| thumbs 20% + reactions (read and trained) |" in lines[4]
    assert lines[-3:] == [
        "mean gain, thumbs 100%: +29.4 pp over 2 runs",
        "mean gain, thumbs 20% + reactions (read and trained): +10.0 pp over 1 runs",
        "mean gain, all runs: +23.0 pp over 3 runs",
    ]
    assert table([_row("shop", 0, 38.9)]).splitlines()[-1] == "mean gain, thumbs 100%: +38.9 pp over 1 runs"


def _judged(cand: float, live: float, pairs: bool, replies: bool) -> dict[str, Any]:
    return {
        "judged": {
            "candidate": "v2",
            "candidate_heldout": cand,
            "live": "v1",
            "live_heldout": live,
            "verdicts": {"pairs": pairs, "replies": replies, "both": pairs and replies},
        }
    }


def test_each_judge_is_held_to_the_rubric_and_ties_decide_nothing() -> None:
    run = _row("bank", 0, 20.0) | {
        "cycles": [
            _judged(0.5, 0.2, pairs=True, replies=True),  # better: both right
            _judged(0.1, 0.2, pairs=True, replies=False),  # worse: pairs wrong (promoted it)
            _judged(0.3, 0.3, pairs=False, replies=True),  # a tie: not counted
            {"judged": None},  # a cycle that trained nothing
        ]
    }
    found = agreement([run])
    assert (found["pairs"]["agree"], found["pairs"]["of"], found["ties"]) == (1, 2, 1)
    assert (found["replies"]["agree"], found["both"]["agree"]) == (2, 2)
    assert found["pairs"]["disagreements"] == [
        "bank seed 0 (thumbs 100%) cycle 2: v2 10% vs v1 20% of 36, pairs said promote"
    ]
    lines = agreement_table([run]).splitlines()
    assert lines[2].startswith("| pairs | 1 of 2 (50%) | bank seed 0")
    assert lines[3] == "| replies | 2 of 2 (100%) | - |"
    assert lines[-3] == "ties (equal satisfaction, not counted): 1"
    assert lines[-2].startswith(f"{BEYOND_CHANCE}, question by question (")
    # the held-out replies customers liked, asked again: listed beside the rubric's verdict
    kept = _judged(0.1, 0.2, pairs=True, replies=False)
    kept["judged"]["replies"] = {"candidate": 0.3, "live": 0.2, "kept": 9, "kept_lost": 3, "kept_regained": 1}
    found = agreement([_row("bank", 0, 20.0) | {"cycles": [kept]}])
    assert found[KEPT] == ["bank seed 0 (thumbs 100%) cycle 1: 3 lost, 1 regained of 9; v2 10% vs v1 20% of 36"]
    assert f"{KEPT} (gate.kept_questions): bank seed 0" in agreement_table([_row("bank", 0, 20.0) | {"cycles": [kept]}])


def test_a_starved_cycle_trains_a_few_steps_and_is_judged_apart_from_the_others(tmp_path: Path) -> None:
    args = parse_args(["--cycles", "4", "--starve", "4,2", "--starve-steps", "3"])
    assert (args.starve, args.starve_steps) == ({2, 4}, 3)
    assert parse_args([]).starve == set()
    cfg = CycleConfig(base_model="m", data_dir=tmp_path, train=TrainConfig(max_steps=1000, learning_rate=2e-4))
    cut = starved(cfg, 3)
    assert cut.train.max_steps == 3 and cut.train.learning_rate == 2e-4 and cut.data_dir == tmp_path
    assert cfg.train.max_steps == 1000  # the normal config is left as it was
    run = _row("bank", 0, 20.0) | {
        "cycles": [
            _judged(0.5, 0.2, pairs=True, replies=True),
            _judged(0.0, 0.5, pairs=False, replies=False) | {"starved": True},  # worse; both rejected it
            _judged(0.1, 0.5, pairs=True, replies=False) | {"starved": True},  # worse; pairs promoted it
            _judged(0.5, 0.5, pairs=False, replies=False) | {"starved": True},  # as good as live
        ]
    }
    found = agreement([run])
    # the natural cycles' figures do not count the starved ones
    assert (found["pairs"]["agree"], found["pairs"]["of"], found["ties"]) == (1, 1, 0)
    cut_found = found[STARVED]
    assert (cut_found["cycles"], cut_found["worse"]) == (3, 2)
    assert (cut_found["judges"]["pairs"]["agree"], cut_found["judges"]["pairs"]["of"]) == (1, 2)
    assert (cut_found["judges"]["replies"]["agree"], cut_found["judges"]["replies"]["of"]) == (2, 2)
    assert cut_found["not_worse"] == ["bank seed 0 (thumbs 100%) cycle 4: v2 50% vs v1 50% of 36"]
    line = next(x for x in agreement_table([run]).splitlines() if x.startswith(STARVED))
    assert "3, the rubric says worse than live on 2; there pairs agrees on 1 of 2, replies agrees on 2 of 2" in line
    assert STARVED not in agreement_table([_row("bank", 0, 20.0) | {"cycles": run["cycles"][:1]}])


def test_the_reply_judge_before_word_weights_is_read_again_from_the_kept_replies() -> None:
    answer = "Open Trash in the sidebar, right-click the note, and choose Restore."
    kept = [
        {
            "question": "Where do deleted notes go?",
            "answer": answer,
            "candidate": "It is in Trash.",
            "live": "Open Settings, choose Organization.",
        }
    ]
    report = {"replies": {"n": 1, "candidate": 0.4, "live": 0.05, "wins": 1, "losses": 0, "examples": kept}}
    plain = plain_words(report)
    assert plain is not None and plain["replies"]["live"] == 0.3333  # open, choose: a third of the words
    assert (plain["replies"]["candidate"], plain["replies"]["wins"], plain["replies"]["losses"]) == (
        0.2222,
        0,
        1,
    )  # trash: 1 of 8 words
    assert plain_words({"replies": {"n": 2, "examples": kept}}) is None  # a report that kept 1 of 2 questions
    assert plain_words({}) is None
    run = _row("helpdesk", 0, 20.0) | {
        "cycles": [
            _judged(0.2, 0.0, pairs=False, replies=True),
            _judged(0.0, 0.2, pairs=False, replies=False),
        ]
    }
    run["cycles"][0]["judged"]["verdicts_plain"] = {"pairs": False, "replies": False, "both": False}
    found = agreement([run])
    assert (found[PLAIN]["agree"], found[PLAIN]["of"]) == (0, 1)  # only the cycle that kept its replies
    assert (found["replies"]["agree"], found["replies"]["of"]) == (2, 2)
    assert "| replies, plain words | 0 of 1 (0%) | helpdesk seed 0" in agreement_table([run])
    assert "plain words" not in agreement_table([_row("bank", 0, 1.0) | {"cycles": [_judged(0.2, 0.0, True, True)]}])
    # the reading without its checks: a candidate whose replies read better, rejected by a guard
    run["cycles"][1]["judged"]["replies"] = {"n": 3, "candidate": 0.5, "live": 0.1}
    assert (found := agreement([run]))[SCORE_ALONE] == {
        "agree": 0,
        "of": 1,
        "disagreements": [
            "helpdesk seed 0 (thumbs 100%) cycle 2: v2 0% vs v1 20% of 36, reply score alone said promote"
        ],
    }


def test_the_rubric_reads_the_gates_own_questions_to_tell_a_misreading_from_a_small_sample() -> None:
    answer = load_deployment("helpdesk").intent("forgot_password").answer
    right, wrong = answer, "Open Settings, choose Account, and turn on Two-step login."

    def cycle(cand: float, live: float, said: tuple[float, float], replies: list[tuple[str, str]]) -> dict[str, Any]:
        c = _judged(cand, live, pairs=True, replies=True)
        c["judged"]["replies"] = {"n": len(replies), "candidate": said[0], "live": said[1]}
        c["judged"]["reply_examples"] = [
            {"question": "I forgot my password", "answer": answer, "candidate": a, "live": b} for a, b in replies
        ]
        return c

    run = _row("helpdesk", 0, 20.0) | {
        "cycles": [
            cycle(0.3, 0.1, (0.9, 0.1), [(right, wrong), (wrong, wrong)]),  # told apart; reading and 36 agree
            cycle(0.2, 0.1, (0.1, 0.4), [(wrong, wrong)]),  # 0 vs 0 right: the sample cannot tell
            cycle(0.0, 0.3, (0.5, 0.1), [(right, wrong)]),  # told apart; the 36 say the other way
            cycle(0.2, 0.0, (0.5, 0.1), []) | {"judged": _judged(0.2, 0.0, True, True)["judged"]},  # kept nothing
            cycle(0.1, 0.1, (0.9, 0.1), [(right, wrong)]),  # a tie on the 36: not decided
        ]
    }
    own = agreement([run])[OWN_QUESTIONS]
    assert own == {
        "cycles": 3,
        "cannot_tell": ["helpdesk seed 0 (thumbs 100%) cycle 2: 0 vs 0 right of 1"],
        "reading_agrees": 2,
        "reading_of": 2,
        "heldout_agrees": 1,
        "heldout_of": 2,
    }
    assert (
        agreement_table([run])
        .splitlines()[-3]
        .startswith(
            f"{OWN_QUESTIONS} (3 decided cycles that kept every reply): they tell the versions apart on 2; there the"
            " reading agrees with them on 2 of 2 and the held-out verdict on 1 of 2; they cannot tell on 1:"
        )
    )


def test_a_verdict_counts_beyond_chance_only_when_enough_questions_went_one_way() -> None:
    assert (mcnemar_p(6, 0), mcnemar_p(5, 0), round(mcnemar_p(8, 2), 3), mcnemar_p(1, 1), mcnemar_p(0, 0)) == (
        0.03125,
        0.0625,
        0.109,
        1.0,
        1.0,
    )
    # from counts alone: 8 against 2 right of 36 lost none (p 0.03) or up to 2 (8 gained, 2 lost: p 0.11)
    assert share_p_range(8, 2, 36) == (mcnemar_p(6, 0), mcnemar_p(8, 2))
    assert share_p_range(6, 0, 36) == (mcnemar_p(6, 0), mcnemar_p(6, 0))  # live had none to lose
    assert share_p_range(35, 29, 36) == (mcnemar_p(6, 0), mcnemar_p(7, 1))  # one question left for the winner to lose
    dep = load_deployment("bank")
    keys = [f"{i.id}: {' | '.join(q)}" for i in dep.intents for q in i.heldout]
    assert len(keys) == 36  # three per intent, in order
    # six questions gained in two intents: beyond chance question by question, not intent by intent
    assert intent_p(set(keys[:6]), set()) == 0.5
    six_intents = {keys[3 * k] for k in range(6)}
    assert intent_p(six_intents, set()) == mcnemar_p(6, 0)  # one question in each of six intents
    assert intent_p(set(keys[:3]), set(keys[3:4])) == 1.0  # +3 in one intent, -1 in another: 4 of 4 signs reach 2

    def cycle(cand: float, live: float, pairs: bool, **kept: Any) -> dict[str, Any]:
        c = _judged(cand, live, pairs=pairs, replies=not pairs)
        c["judged"].update(kept)
        return c

    run = _row("bank", 0, 20.0) | {
        "cycles": [
            # recorded question by question: 7 gained, 1 lost (p 0.07): within chance, though 6 net
            cycle(7 / 36, 1 / 36, True, candidate_right=keys[:7], live_right=keys[7:8]),
            # recorded: one question in each of six intents gained, none lost: beyond chance both ways
            cycle(6 / 36, 0.0, False, candidate_right=sorted(six_intents), live_right=[]),
            # not recorded: 8 against 2 may be beyond chance or not (p 0.03 to 0.11)
            cycle(8 / 36, 2 / 36, True),
            # not recorded: 5 net can never be (p 0.0625 at best)
            cycle(5 / 36, 0.0, True),
            # worse by 1 question: within chance, whatever a judge says
            cycle(0.0, 1 / 36, True, candidate_right=[], live_right=keys[:1]),
        ]
    }
    found = agreement([run])[BEYOND_CHANCE]
    assert (found["decided"], found["clear"], found["known"], found["intent_clear"]) == (5, 1, 3, 1)
    assert found["judges"]["pairs"] == {
        "agree": 0,
        "of": 1,
        "disagreements": ["bank seed 0 (thumbs 100%) cycle 2: v2 17% vs v1 0% of 36, pairs said reject"],
    }
    assert found["judges"]["replies"]["agree"] == 1 and found["intent_judges"]["replies"]["agree"] == 1
    assert found["undetermined"] == ["bank seed 0 (thumbs 100%) cycle 3: v2 22% vs v1 6% of 36, p 0.03 to 0.11"]
    assert found["within_chance"] == [
        "bank seed 0 (thumbs 100%) cycle 1: v2 19% vs v1 3% of 36, p 0.07, by intent 0.50",
        "bank seed 0 (thumbs 100%) cycle 4: v2 14% vs v1 0% of 36, p 0.06",
        "bank seed 0 (thumbs 100%) cycle 5: v2 0% vs v1 3% of 36, p 1.00, by intent 1.00",
    ]
    # a cycle that recorded no answers is read from the run's kept replies, with the rubric's reasons
    # at run time: the base satisfied nothing, the promoted v1 one question
    missing = ["missing the fact: fee"]
    kept = {k: ["Please contact us.", *missing] for k in keys}
    run2 = _row("bank", 0, 20.0) | {
        "replies": {"base": kept, "v1": {**kept, keys[0]: ["(the answer)", SATISFIED]}},
        "cycles": [{"judged": {**_judged(1 / 36, 0.0, True, True)["judged"], "candidate": "v1", "live": "base"}}],
    }
    judged = run2["cycles"][0]["judged"]
    assert verdict_chance(Cycle("bank", 0, "thumbs 100%", 1, judged, run2)) == VerdictTest(1.0, 1.0, 1.0)
    run2["replies"]["v1"] = dict.fromkeys(keys, "a reply alone")  # an older file: the shares alone
    assert verdict_chance(Cycle("bank", 0, "thumbs 100%", 1, judged, run2)) == VerdictTest(1.0, 1.0, None)
    # a cycle that asked the deployment's extra held-out questions is judged on all of them: a tie on
    # the 36 becomes a verdict, and its bound counts the extra questions too
    wide = _judged(0.1, 0.1, pairs=True, replies=False)
    wide["judged"].update(candidate_heldout_wide=12 / 108, live_heldout_wide=4 / 108)
    assert (better(wide["judged"]), verdict_shares(wide["judged"])) == (True, (12 / 108, 4 / 108))
    assert verdict_chance(Cycle("bank", 0, "thumbs 100%", 1, wide["judged"], {})) == VerdictTest(
        *share_p_range(12, 4, 108), None
    )
    tied = agreement([_row("bank", 0, 1.0) | {"cycles": [wide]}])
    assert (tied["ties"], tied["pairs"]["agree"], tied["replies"]["disagreements"]) == (
        0,
        1,
        ["bank seed 0 (thumbs 100%) cycle 1: v2 11% vs v1 4% of 108, replies said reject"],
    )
    lines = agreement_table([run]).splitlines()
    assert lines[-2].startswith(
        f"{BEYOND_CHANCE}, question by question (exact McNemar p < 0.05; from the two shares alone where a rejected"
        " candidate's answers were not kept): 1 of 5 decided cycles; there pairs 0 of 1, replies 1 of 1"
    )
    assert lines[-1] == (
        f"{BEYOND_CHANCE}, intent by intent (exact sign-flip p < 0.05 over each intent's net, on the 3 decided cycles"
        " whose answers are known question by question): 1; there pairs 0 of 1, replies 1 of 1, both 0 of 1"
    )


def test_each_version_prints_its_reply_length_in_the_rubrics_unit_and_its_time() -> None:
    evaluated = {"length": 23.25, "length_right": 14.0, "seconds": 0.4512}
    assert shape(load_deployment("shop"), evaluated) == (
        "replies 23.2 words on average (14.0 where right), 0.45 s to a complete reply"
    )
    none_right = {**evaluated, "length_right": None}
    assert shape(load_deployment("zh_shop"), none_right) == (
        "replies 23.2 characters on average, 0.45 s to a complete reply"
    )


def _cycled(deployment: str, seed: int, curve: list[float]) -> dict[str, Any]:
    """A run whose live version after cycle k held ``curve[k]`` of the held-out paraphrases."""
    versions = {"base": curve[0], **{f"v{k}": x for k, x in enumerate(curve[1:], start=1)}}
    return {
        **_row(deployment, seed, 0.0),
        "by_version": {**versions, "v9": 0.99},  # a rejected candidate: never live, never on the curve
        "cycles": [{"version": f"v{k}"} for k in range(1, len(curve))],
    }


def test_runs_are_plotted_per_deployment_from_their_files(tmp_path: Path) -> None:
    run = _cycled("bank", 0, [0.0, 0.25, 0.5])
    run["cycles"][1]["version"] = "v1"  # cycle 2's candidate was rejected: v1 stayed live
    assert live_curve(run) == [0.0, 0.25, 0.25]
    run["cycles"][1]["status"] = "failed"  # a failed job trained nothing: the curve stops
    assert live_curve(run) == [0.0, 0.25]
    for name, seed in (("bank", 0), ("shop", 1)):
        folder = tmp_path / "ep1" / f"{name}-seed{seed}-explicit"
        folder.mkdir(parents=True)
        (folder / "learning.json").write_text(json.dumps(_cycled(name, seed, [0.0, 0.1, 0.3])))
    runs = labelled_runs([f"epochs 1={tmp_path}/ep1/*/learning.json"])
    assert [(label, r["deployment"], r["seed"]) for label, r in runs] == [
        ("epochs 1", "bank", 0),
        ("epochs 1", "shop", 1),
    ]
    with pytest.raises(ValueError, match="matches no file"):
        labelled_runs([f"default={tmp_path}/none/*.json"])
    with pytest.raises(ValueError, match="LABEL=GLOB"):
        labelled_runs([f"{tmp_path}/ep1/*/learning.json"])
    with pytest.raises(SystemExit):
        parse_args(["--plot-runs", "only.png"])
    with pytest.raises(SystemExit):  # a parser error, not a traceback
        parse_args(["--plot-runs", "runs.png", f"{tmp_path}/ep1/*/learning.json"])
    with pytest.raises(SystemExit, match="matches no file"):
        main(["--plot-runs", str(tmp_path / "runs.png"), f"default={tmp_path}/none/*.json"])


def test_the_runs_plot_is_drawn(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")  # the bench extra (make bench-deps); the pure parts are tested above
    runs = [("one pass", _cycled(name, 0, [0.0, 0.1, 0.3])) for name in ("bank", "shop")]
    png = tmp_path / "runs.png"
    plot_runs(runs, png)
    assert png.read_bytes().startswith(b"\x89PNG")


def test_a_recorded_cycle_is_judged_again_under_another_gate() -> None:
    """``judge_candidate`` keeps the pair figures (``gate_figures``) beside the replies' figures, so
    a cycle can be decided again under another gate: here a chosen-NLL rise within the default
    gate's loose limit that ``gate.max_chosen_nll_increase = 0`` rejects."""
    report = EvalReport(
        n_heldout=6,
        candidate=ModelScores(0.9, 1.4, generic_ppl=7.0),
        live=ModelScores(0.5, 0.9, generic_ppl=6.8),
        reward_margin=2.0,
        reward_accuracy=0.8,
        base_generic_ppl=7.5,
        extra={"budget": {"steps": 3}},
    ).to_dict()
    judged = {"report": gate_figures(report), "replies": None}
    assert "extra" not in judged["report"] and "replies" not in judged["report"]
    said, strict = rejudge(judged, GateConfig()), rejudge(judged, GateConfig(max_chosen_nll_increase=0.0))
    assert said == verdicts(EvalReport.from_dict(report), GateConfig())
    assert said is not None and said["pairs"] is True
    assert strict is not None and strict["pairs"] is False
    assert rejudge({"verdicts": {"pairs": True}}, GateConfig()) is None  # a record from before the report was kept


def test_the_pairs_verdict_under_todays_chosen_nll_check() -> None:
    """``bench/chosen_nll.py``: a rejection with a chosen-NLL rise within today's limit (1 nat per
    token above live's) flips to promote (decided exactly where the record keeps the gate's figures, from the
    rise where it does not); a rejection without a rise, with a rise past the limit, or known to
    have failed another check, stays."""
    from bench.chosen_nll import OTHER_FAILURES, without_nll_check

    risen = EvalReport(
        n_heldout=6,
        candidate=ModelScores(0.9, 1.4),
        live=ModelScores(0.5, 0.9),
        reward_margin=2.0,
        reward_accuracy=0.8,
    ).to_dict()

    def cycle(nll: list[float], report: dict[str, Any] | None = None) -> dict[str, Any]:
        judged = _judged(0.3, 0.1, pairs=False, replies=False)["judged"] | {"chosen_nll": nll}
        return {"judged": judged | ({"report": gate_figures(report), "replies": None} if report else {})}

    failed_more = risen | {"reward_accuracy": 0.4}  # recorded: the reward accuracy failed too
    cycles = [
        cycle([1.4, 0.9]),
        cycle([0.8, 0.9]),
        cycle([1.4, 0.9], risen),
        cycle([1.4, 0.9], failed_more),
        cycle([2.0, 0.9]),  # more than 1 nat above live's: today's check fails it too
    ]
    run = _row("helpdesk", 0, 20.0) | {"cycles": cycles}
    (changed,), flipped = without_nll_check(["a.json"], [run])
    assert [c["judged"]["verdicts"]["pairs"] for c in changed["cycles"]] == [True, False, True, False, False]
    assert len(flipped) == 2 and flipped[0].startswith("a.json cycle 1: chosen NLL 1.400 vs 0.900")
    assert run["cycles"][0]["judged"]["verdicts"]["pairs"] is False  # the runs read are left as they were
    ((known, n),) = OTHER_FAILURES
    (kept,), _ = without_nll_check(
        [known], [_row("airline", 0, 20.0) | {"cycles": [cycle([1.4, 0.9]) for _ in range(n)]}]
    )
    assert kept["cycles"][n - 1]["judged"]["verdicts"]["pairs"] is False
