"""How many steps a run takes and what it saw: pure arithmetic, no I/O, no clock.

A run's steps follow its data: ``epochs`` passes over a stage's rows, ``ceil(rows * epochs /
batch_size)`` steps at most ``max_steps``, or with ``epochs = 0`` exactly ``max_steps`` (the fixed
recipe of the first bench/RESULTS.md runs). Either way ``training.max_minutes`` bounds the training
steps of the whole run: the job stops at the end of the step that passes it (``train.Deadline``)
and reports, per stage, the steps planned and done, the epochs done and the share of the stage's
rows seen (``StageReport``).

Demonstrations (operator takeovers, the SFT demos of corrections) train in a stage of their own
after the preference pairs; ``extra_demos`` leaves out the demos the pairs already teach: with
``sft_weight > 0`` DPO's SFT term trains every pair's chosen answer, and a correction's demo is
its pair's chosen answer in the same context.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from training.clean import norm_text

TrlRow = dict[str, Any]


def plan_steps(rows: int, batch_size: int, *, epochs: float, max_steps: int) -> int:
    """The optimizer steps of a stage over ``rows`` rows: ``epochs`` passes (at least one step) but
    at most ``max_steps``, or exactly ``max_steps`` when ``epochs`` is 0; no rows, no steps."""
    if rows < 1:
        return 0
    if epochs <= 0:
        return max_steps
    return min(max_steps, max(1, math.ceil(rows * epochs / batch_size)))


def epochs_done(steps: int, batch_size: int, rows: int) -> float:
    """Passes over ``rows`` rows that ``steps`` steps of ``batch_size`` made."""
    return steps * batch_size / rows if rows else 0.0


def share_seen(steps: int, batch_size: int, rows: int) -> float:
    """The share of ``rows`` that ``steps`` steps of ``batch_size`` reached at least once (the
    trainer shuffles each pass, so a partial pass sees distinct rows)."""
    return min(1.0, epochs_done(steps, batch_size, rows)) if rows else 0.0


def demo_prompt_completion(row: TrlRow) -> TrlRow:
    """A demonstration (``{"messages": [..., assistant]}``) as TRL's conversational prompt-completion
    row, so the SFT loss falls on the reply only, not on the customer's words."""
    messages = row["messages"]
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def extra_demos(sft: Sequence[TrlRow], dpo: Sequence[TrlRow], *, sft_weight: float) -> list[TrlRow]:
    """The demonstrations the preference pairs do not already teach. With ``sft_weight > 0`` every
    pair's chosen answer is trained in its context, so a demo that is one (a correction's demo:
    the same last message and answer, as ``clean`` compares near-duplicates) is left out; takeover
    replies, which have no pair, stay. ``dpo``: every pair the run knows, held-out ones too (a
    correction whose pair was held out, or collapsed into a near-duplicate that was, stays out)."""
    if sft_weight <= 0:
        return list(sft)
    taught = {_key(row["prompt"][-1], row["chosen"][-1]) for row in dpo}
    return [row for row in sft if _key(row["messages"][-2], row["messages"][-1]) not in taught]


def _key(question: dict[str, Any], answer: dict[str, Any]) -> tuple[str, str]:
    return norm_text(question["content"]), norm_text(answer["content"])


@dataclass(frozen=True)
class StageReport:
    """One training stage of a run, as the version's report records it."""

    trainer: str  # dpo, kto or sft
    rows: int
    batch_size: int
    planned_steps: int
    steps: int  # done: fewer than planned when the time budget ran out

    @property
    def epochs(self) -> float:
        return round(epochs_done(self.steps, self.batch_size, self.rows), 3)

    @property
    def share_seen(self) -> float:
        return round(share_seen(self.steps, self.batch_size, self.rows), 3)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "epochs": self.epochs, "share_seen": self.share_seen}


def budget_report(
    stages: Sequence[StageReport], *, max_minutes: float, epochs: float, seconds: float
) -> dict[str, Any]:
    """The run's budget and what it did with it: per stage, and the share of all training rows seen."""
    rows = sum(s.rows for s in stages)
    seen = sum(min(s.rows, s.steps * s.batch_size) for s in stages)
    return {
        "max_minutes": max_minutes,
        "epochs": epochs,
        "train_seconds": round(seconds, 1),
        "stopped_by_budget": any(s.steps < s.planned_steps for s in stages),
        "steps": sum(s.steps for s in stages),
        "share_seen": round(seen / rows, 3) if rows else 0.0,
        "stages": [s.to_dict() for s in stages],
    }


__all__ = [
    "StageReport",
    "budget_report",
    "demo_prompt_completion",
    "epochs_done",
    "extra_demos",
    "plan_steps",
    "share_seen",
]
