"""Should a training run start now? Pure."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainDecision:
    train: bool
    reason: str


def should_train(*, new_feedback: int, min_new_feedback: int, force: bool = False) -> TrainDecision:
    """Train when enough new feedback arrived since the last run that used its data.

    ``force`` (``learnloop train --force``) skips the amount check. One run at a time is not
    decided here: ``TrainingCycle.run`` holds a lock in its process and a lease in the store.
    """
    if force:
        return TrainDecision(True, f"forced ({new_feedback} new feedback items)")
    if new_feedback < min_new_feedback:
        return TrainDecision(False, f"{new_feedback} new feedback items; waiting for {min_new_feedback}")
    return TrainDecision(True, f"{new_feedback} new feedback items (threshold {min_new_feedback})")
