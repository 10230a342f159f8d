"""The offline gate and the training policy: pure decisions, milliseconds."""

from __future__ import annotations

import dataclasses

import pytest

from training.gate import EvalReport, GateConfig, ModelScores, decide
from training.policy import should_train


def report(**kw: object) -> EvalReport:
    base = {
        "n_heldout": 5,
        "candidate": ModelScores(0.8, 2.0),
        "live": ModelScores(0.6, 2.5),
        "reward_margin": 0.4,
        "reward_accuracy": 0.8,
    }
    base.update(kw)
    return EvalReport(**base)  # type: ignore[arg-type]


def test_clearly_better_candidate_is_promoted_with_reasons() -> None:
    d = decide(report(), GateConfig(max_chosen_nll_rise=None))
    assert d.promote and len(d.reasons) == 3 and all(r.startswith("passed") for r in d.reasons)
    d = decide(report(), GateConfig())
    assert d.promote and len(d.reasons) == 4 and any("chosen NLL" in r for r in d.reasons)


def test_chosen_nll_is_checked_loosely_by_default() -> None:
    """A candidate that reads the held-out corrections as somewhat less likely than live does, with
    every preference check passed, is promoted by default (the bench's reason: ``gate.max_chosen_nll_rise``,
    1 nat per token); one that reads them as far less likely (a run cut short) is not; unset, the
    figure is not checked; a relative limit (``gate.max_chosen_nll_increase``) adds to it and the
    tighter one decides."""
    risen = report(candidate=ModelScores(0.8, 2.9), live=ModelScores(0.6, 2.0))
    d = decide(risen, GateConfig())
    assert d.promote and "passed: chosen NLL 2.9000 vs live 2.0000 (need <= 3.0000)" in d.reasons, d.reasons
    # the bench's starved helpdesk candidate: 3.73 against live's 0.31, every other check passed
    starved = report(candidate=ModelScores(0.8, 3.73), live=ModelScores(0.6, 0.31))
    d = decide(starved, GateConfig())
    assert not d.promote and "failed: chosen NLL 3.7300 vs live 0.3100 (need <= 1.3100)" in d.reasons
    unset = decide(starved, GateConfig(max_chosen_nll_rise=None))
    assert unset.promote and not any("chosen NLL" in r for r in unset.reasons)
    d = decide(risen, GateConfig(max_chosen_nll_increase=0.4))
    assert not d.promote and "failed: chosen NLL 2.9000 vs live 2.0000 (need <= 2.8000)" in d.reasons
    assert decide(risen, GateConfig(max_chosen_nll_increase=0.5)).promote
    d = decide(risen, GateConfig(max_chosen_nll_rise=0.5))
    assert not d.promote and "failed: chosen NLL 2.9000 vs live 2.0000 (need <= 2.5000)" in d.reasons
    for bad in ({"max_chosen_nll_increase": -0.1}, {"max_chosen_nll_rise": -0.1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GateConfig(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"n_heldout": 0}, "held-out set has 0 pairs"),
        ({"reward_accuracy": 0.4}, "reward accuracy"),
        ({"reward_margin": -0.1}, "reward margin"),
        ({"candidate": ModelScores(0.5, 2.0)}, "preference accuracy"),
        ({"candidate": ModelScores(0.8, 2.6)}, "chosen NLL"),
    ],
)
def test_each_failed_check_rejects_and_says_why(change: dict[str, object], needle: str) -> None:
    d = decide(report(**change), GateConfig(max_chosen_nll_increase=0.0))
    assert not d.promote
    assert any(needle in r for r in d.reasons), d.reasons


def test_thresholds_are_configurable() -> None:
    worse_nll = report(candidate=ModelScores(0.8, 2.6))
    assert decide(worse_nll, GateConfig(max_chosen_nll_increase=0.05)).promote
    assert not decide(report(), GateConfig(min_reward_margin=1.0)).promote
    assert not decide(report(n_heldout=3), GateConfig(min_heldout_pairs=4)).promote


def test_generic_perplexity_is_judged_against_the_base_model() -> None:
    """A live version below base does not tighten the limit; without a base figure, live's is used."""
    low_live = report(candidate=ModelScores(0.8, 2.0, generic_ppl=7.0), live=ModelScores(0.6, 2.5, generic_ppl=6.0))
    assert decide(dataclasses.replace(low_live, base_generic_ppl=7.5), GateConfig()).promote
    assert not decide(low_live, GateConfig()).promote  # 7.0 > 6.0 * 1.1
    too_high = dataclasses.replace(low_live, candidate=ModelScores(0.8, 2.0, generic_ppl=8.3), base_generic_ppl=7.5)
    d = decide(too_high, GateConfig())
    assert not d.promote and any("perplexity 8.30 vs base 7.50" in r for r in d.reasons)


def test_gate_config_rejects_a_gate_without_evidence() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        GateConfig(min_heldout_pairs=0)


def test_report_round_trips() -> None:
    r = report()
    assert EvalReport.from_dict(r.to_dict()) == r
    assert EvalReport.from_dict(dataclasses.replace(r, base_generic_ppl=7.5).to_dict()).base_generic_ppl == 7.5


def test_policy() -> None:
    assert not should_train(new_feedback=3, min_new_feedback=10).train
    assert should_train(new_feedback=10, min_new_feedback=10).train
    assert should_train(new_feedback=0, min_new_feedback=10, force=True).train
    # one run at a time, even forced: test_release_faults.test_two_triggers_train_once
