"""The canary release policy on synthetic rating streams: pure, milliseconds."""

from __future__ import annotations

import random

import pytest

from feedback.records import VersionStats
from training.canary import CanaryAction, CanaryConfig, assign, decide, z_score


def stream(
    name: str,
    n_replies: int,
    up_rate: float,
    rated: float = 0.5,
    regen: float = 0.05,
    latency: float = 400,
    errors: int = 0,
    seed: int = 0,
) -> VersionStats:
    rng = random.Random(seed)
    up = down = regenerated = 0
    for _ in range(n_replies):
        if rng.random() < rated:
            if rng.random() < up_rate:
                up += 1
            else:
                down += 1
        regenerated += rng.random() < regen
    return VersionStats(name, n_replies, n_replies, up, down, regenerated, errors, latency, 40.0)


CFG = CanaryConfig()


def test_clearly_better_is_promoted() -> None:
    d = decide(stream("live", 400, 0.5, seed=1), stream("v2", 200, 0.8, seed=2), CFG)
    assert d.action is CanaryAction.PROMOTE and "thumbs-up" in d.reasons[0]


def test_clearly_worse_is_rolled_back() -> None:
    d = decide(stream("live", 400, 0.6, seed=1), stream("v2", 200, 0.3, seed=2), CFG)
    assert d.action is CanaryAction.ROLLBACK


def test_too_little_evidence_waits() -> None:
    d = decide(stream("live", 400, 0.5, seed=1), stream("v2", 20, 1.0, seed=2), CFG)
    assert d.action is CanaryAction.WAIT and any("need 30" in r for r in d.reasons)


def test_no_real_difference_waits() -> None:
    d = decide(stream("live", 300, 0.6, seed=1), stream("v2", 300, 0.6, seed=3), CFG)
    assert d.action is CanaryAction.WAIT


@pytest.mark.parametrize(
    ("canary", "needle"),
    [
        (stream("v2", 200, 0.9, regen=0.4, seed=2), "regeneration rate"),
        (stream("v2", 200, 0.9, errors=40, seed=2), "error rate"),
        (stream("v2", 200, 0.9, latency=900, seed=2), "latency"),
    ],
)
def test_better_ratings_do_not_hide_a_regression(canary: VersionStats, needle: str) -> None:
    d = decide(stream("live", 400, 0.5, seed=1), canary, CFG)
    assert d.action is CanaryAction.ROLLBACK and any(needle in r for r in d.reasons)


def test_false_alarm_rate_is_near_the_confidence_level() -> None:
    """Equal versions: the one-sided rollback test fires in about 5% of streams, not more."""
    rollbacks = sum(
        decide(
            stream("live", 200, 0.6, regen=0.0, seed=i), stream("v2", 200, 0.6, regen=0.0, seed=10_000 + i), CFG
        ).action
        is CanaryAction.ROLLBACK
        for i in range(400)
    )
    assert rollbacks / 400 < 0.09


def test_small_latency_jitter_is_no_regression() -> None:
    d = decide(stream("live", 400, 0.5, latency=4.0, seed=1), stream("v2", 200, 0.8, latency=9.0, seed=2), CFG)
    assert d.action is CanaryAction.PROMOTE


def test_z_and_assignment() -> None:
    assert z_score(0, 0, 5, 10) == 0.0 and z_score(80, 100, 50, 100) > 4
    share = sum(assign(f"conv-{i}", 0.2) for i in range(5000)) / 5000
    assert 0.17 < share < 0.23 and assign("x", 0.2) == assign("x", 0.2)
    with pytest.raises(ValueError):
        CanaryConfig(share=1.0)
