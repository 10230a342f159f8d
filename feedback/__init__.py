"""Durable feedback store: conversations, ratings, corrections, model versions.

This package is the data layer. It imports neither ``training`` nor ``server``.
"""

from feedback.records import (
    BASE_VERSION,
    Conversation,
    Correction,
    FeedbackSnapshot,
    Message,
    ModelVersion,
    RaterState,
    Rating,
    Role,
    RunState,
    TrainingRun,
    VersionState,
    VersionStats,
    subject_hash,
)
from feedback.store import FeedbackStore, InvalidError, NotFoundError, StoreError

__all__ = [
    "BASE_VERSION",
    "Conversation",
    "Correction",
    "FeedbackSnapshot",
    "FeedbackStore",
    "InvalidError",
    "Message",
    "ModelVersion",
    "NotFoundError",
    "Rating",
    "RaterState",
    "Role",
    "RunState",
    "StoreError",
    "TrainingRun",
    "VersionState",
    "VersionStats",
    "subject_hash",
]
