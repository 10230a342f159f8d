"""The release policy: compare a canary with the live version on customers' behaviour. Pure.

Each check is a one-sided two-proportion z-test at ``confidence`` (pooled variance):

* thumbs-up rate (up / (up + down)): the canary is promoted only when it is significantly
  higher, with at least ``min_ratings`` ratings on each side;
* regeneration rate (regenerated / replies) and error rate (errors / attempts): the canary
  is rolled back when either is significantly higher, with ``min_replies`` on each side;
  it is also rolled back when its thumbs-up rate is significantly lower;
* latency: rolled back when its mean time to first token exceeds ``max_latency_ratio``
  times live's and by more than ``latency_slack_ms`` (``min_replies`` each side).

Anything else waits for more evidence. Rollback wins over promotion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from statistics import NormalDist

from feedback.records import VersionStats


class CanaryAction(StrEnum):
    PROMOTE = "promote"
    ROLLBACK = "rollback"
    WAIT = "wait"


@dataclass(frozen=True)
class CanaryConfig:
    share: float = field(
        default=0.2,
        metadata={"help": "Share of new conversations a canary serves (0 = a version that passes the gate goes live)."},
    )
    min_ratings: int = field(default=30, metadata={"help": "Ratings each side needs before thumbs-up rates count."})
    min_replies: int = field(default=50, metadata={"help": "Replies each side needs before rates and latency count."})
    confidence: float = field(default=0.95, metadata={"help": "One-sided confidence of each test."})
    max_latency_ratio: float = field(
        default=1.5, metadata={"help": "Roll back when canary latency exceeds live's by this factor."}
    )
    latency_slack_ms: float = field(
        default=100.0, metadata={"help": "Latency differences smaller than this never count as a regression."}
    )
    check_interval_s: float = field(default=30.0, metadata={"help": "How often the server checks the canary."})

    def __post_init__(self) -> None:
        if not 0 <= self.share < 1:
            raise ValueError("canary.share is a share of new conversations: set it in [0, 1)")
        if not 0.5 < self.confidence < 1:
            raise ValueError("canary.confidence must be between 0.5 and 1")


@dataclass(frozen=True)
class CanaryDecision:
    action: CanaryAction
    reasons: tuple[str, ...]


def z_score(hits_a: int, n_a: int, hits_b: int, n_b: int) -> float:
    """z of (rate a - rate b), pooled; 0 when undefined."""
    if n_a == 0 or n_b == 0:
        return 0.0
    pooled = (hits_a + hits_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if se == 0:
        return 0.0
    return (hits_a / n_a - hits_b / n_b) / se


def decide(live: VersionStats, canary: VersionStats, config: CanaryConfig) -> CanaryDecision:
    crit = NormalDist().inv_cdf(config.confidence)
    worse: list[str] = []
    better: list[str] = []
    waiting: list[str] = []

    rated_c, rated_l = canary.thumbs_up + canary.thumbs_down, live.thumbs_up + live.thumbs_down
    if min(rated_c, rated_l) >= config.min_ratings:
        z = z_score(canary.thumbs_up, rated_c, live.thumbs_up, rated_l)
        text = (
            f"thumbs-up {canary.thumbs_up}/{rated_c} ({canary.thumbs_up / rated_c:.0%}) vs live "
            f"{live.thumbs_up}/{rated_l} ({live.thumbs_up / rated_l:.0%}), z={z:+.2f}"
        )
        if z >= crit:
            better.append(text)
        elif z <= -crit:
            worse.append(text)
        else:
            waiting.append(text + f" (|z| < {crit:.2f})")
    else:
        waiting.append(f"ratings: canary {rated_c}, live {rated_l}; need {config.min_ratings} each")

    if min(canary.replies, live.replies) >= config.min_replies:
        for label, c_hits, c_n, l_hits, l_n in (
            ("regeneration", canary.regenerated, canary.replies, live.regenerated, live.replies),
            ("error", canary.errors, canary.replies + canary.errors, live.errors, live.replies + live.errors),
        ):
            z = z_score(c_hits, c_n, l_hits, l_n)
            if z >= crit:
                worse.append(f"{label} rate {c_hits}/{c_n} vs live {l_hits}/{l_n}, z={z:+.2f}")
        if canary.mean_latency_ms and live.mean_latency_ms:
            ratio = canary.mean_latency_ms / live.mean_latency_ms
            slower_by = canary.mean_latency_ms - live.mean_latency_ms
            if ratio > config.max_latency_ratio and slower_by > config.latency_slack_ms:
                worse.append(
                    f"latency {canary.mean_latency_ms:.0f} ms vs live {live.mean_latency_ms:.0f} ms "
                    f"({ratio:.2f}x > {config.max_latency_ratio:.2f}x)"
                )
    else:
        waiting.append(f"replies: canary {canary.replies}, live {live.replies}; need {config.min_replies} each")

    if worse:
        return CanaryDecision(CanaryAction.ROLLBACK, tuple(f"worse: {w}" for w in worse))
    if better:
        return CanaryDecision(CanaryAction.PROMOTE, tuple(f"better: {b}" for b in better))
    return CanaryDecision(CanaryAction.WAIT, tuple(f"waiting: {w}" for w in waiting) or ("waiting: no difference yet",))


def assign(conversation_id: str, share: float) -> bool:
    """Whether a new conversation goes to the canary: a stable hash bucket below ``share``."""
    import hashlib

    bucket = int.from_bytes(hashlib.sha256(conversation_id.encode()).digest()[:8], "big") / 2**64
    return bucket < share
