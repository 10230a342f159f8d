"""Durable feedback store: conversations, ratings, corrections, model versions.

This package is the data layer. It imports neither ``training`` nor ``server``.
"""

from feedback.exceptions import (
    AccountError,
    BrowseError,
    ErrorCode,
    InvalidError,
    LearnloopError,
    NotFoundError,
    StorageFullError,
    StoreError,
)
from feedback.records import (
    BASE_VERSION,
    Conversation,
    Correction,
    FeedbackSnapshot,
    FinishReason,
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
from feedback.store import FeedbackStore

__all__ = [
    "AccountError",
    "BrowseError",
    "ErrorCode",
    "LearnloopError",
    "StorageFullError",
    "BASE_VERSION",
    "Conversation",
    "Correction",
    "FeedbackSnapshot",
    "FeedbackStore",
    "FinishReason",
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
