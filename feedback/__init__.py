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
    Reaction,
    Role,
    RunState,
    Takeover,
    TrainingRun,
    VersionState,
    VersionStats,
    subject_hash,
)
from feedback.store import FeedbackStore

__all__ = [
    "BASE_VERSION",
    "AccountError",
    "BrowseError",
    "Conversation",
    "Correction",
    "ErrorCode",
    "FeedbackSnapshot",
    "FeedbackStore",
    "FinishReason",
    "InvalidError",
    "LearnloopError",
    "Message",
    "ModelVersion",
    "NotFoundError",
    "RaterState",
    "Rating",
    "Reaction",
    "Role",
    "RunState",
    "StorageFullError",
    "StoreError",
    "Takeover",
    "TrainingRun",
    "VersionState",
    "VersionStats",
    "subject_hash",
]
