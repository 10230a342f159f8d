"""Plain records that cross from the store into ``training``.

They are frozen dataclasses with no behaviour beyond small derived views, so the pure
training cores can be tested without a database.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Role(StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


class FinishReason(StrEnum):
    """Why a stored reply ended (``done.finish_reason`` on the wire, ``messages.finish_reason`` on disk)."""

    STOP = "stop"  # the model ended its turn
    LENGTH = "length"  # max_new_tokens or the context was reached
    CANCELLED = "cancelled"  # the client sent stop
    SHUTDOWN = "shutdown"  # the server stopped it at shutdown, after server.drain_s (the text is what it had)
    ERROR = "error"  # generation failed: stored empty, never trained on, counted per version
    OPERATOR = "operator"  # an operator wrote it (takeover)


OPERATOR_AUTHOR_PREFIX = "operator:"


def operator_author(name: str) -> str:
    """The ``author`` of a reply an operator wrote."""
    return f"{OPERATOR_AUTHOR_PREFIX}{name}"


CLIENT_AUTHOR = "client"
"""``author`` of an assistant turn a client wrote itself (an OpenAI-API request's history): never the model's."""


def is_operator_author(author: str | None) -> bool:
    return bool(author and author.startswith(OPERATOR_AUTHOR_PREFIX))


class VersionState(StrEnum):
    """Life cycle of a model version (docs/architecture.md, "Model versions")."""

    CANDIDATE = "candidate"
    REJECTED = "rejected"
    CANARY = "canary"
    LIVE = "live"
    ROLLED_BACK = "rolled_back"
    RETIRED = "retired"


class RaterState(StrEnum):
    """Review state of a rater whose ratings were flagged as anomalous."""

    PENDING = "pending"  # held: their ratings do not train until an operator decides
    APPROVED = "approved"  # an operator vouched for them: never flagged again
    REJECTED = "rejected"  # their ratings never train


class RunState(StrEnum):
    RUNNING = "running"
    CANCELLING = "cancelling"  # asked to stop; the cycle kills the job and marks it failed
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"


BASE_VERSION = "base"
"""Name of the version that serves the base model without any adapter."""


def subject_hash(subject: str) -> str:
    """The form in which an erased user is remembered (tombstones never hold the raw id)."""
    return hashlib.sha256(f"learnloop-erasure:{subject}".encode()).hexdigest()


@dataclass(frozen=True)
class Conversation:
    id: str
    user_id: str | None
    channel: str
    created_at: float
    tenant: str | None = None
    model_version: str | None = None  # the version this conversation is pinned to
    site: str | None = None  # the widget site ([sites.NAME]) it came from; None for other channels


@dataclass(frozen=True)
class Message:
    id: str
    conversation_id: str
    seq: int
    role: Role
    text: str
    parent_id: str | None
    regenerated_from: str | None = None
    model_version: str | None = None
    latency_ms: float | None = None
    finish_reason: FinishReason | None = None
    n_tokens: int | None = None
    created_at: float = 0.0
    author: str | None = None  # operator_author(name) for a reply an operator wrote (takeover)

    @property
    def by_operator(self) -> bool:
        return is_operator_author(self.author)


@dataclass(frozen=True)
class Rating:
    id: int
    message_id: str
    value: int
    rater: str
    client_id: str
    reason: str | None = None
    comment: str | None = None
    created_at: float = 0.0


@dataclass(frozen=True)
class Correction:
    id: int
    message_id: str
    text: str
    operator: str
    created_at: float = 0.0
    reason: str | None = None


@dataclass(frozen=True)
class Reaction:
    """What the customer's next message said about a reply (implicit feedback), read when it arrived.

    ``signal`` is a ``training.implicit.ImplicitSignal`` value (gratitude, complaint, repeat, human,
    none), ``value`` the weak label it gives (+1, -1 or None) and ``weight`` that label's weight
    relative to one explicit thumb (the rule's weight times its confidence). Silence (abandon) is
    never stored: it is read from the messages' times when needed.
    """

    reply_id: str  # the assistant reply it is about
    message_id: str  # the customer's next message
    signal: str
    confidence: float
    cue: str  # the rule or words that decided it, for audits
    value: int | None
    weight: float
    created_at: float = 0.0


@dataclass(frozen=True)
class FeedbackSnapshot:
    """Everything the pair builder needs, read in one consistent transaction."""

    messages: tuple[Message, ...]
    ratings: tuple[Rating, ...]
    corrections: tuple[Correction, ...]
    max_rating_id: int = 0
    max_correction_id: int = 0
    conversations: tuple[Conversation, ...] = ()
    excluded_messages: frozenset[str] = frozenset()  # operators took these out of training
    rater_states: Mapping[str, RaterState] = field(default_factory=dict)
    erased_subjects: frozenset[str] = frozenset()  # subject_hash() of erased users
    reactions: tuple[Reaction, ...] = ()  # implicit feedback with a label (value not None)


@dataclass(frozen=True)
class ModelVersion:
    name: str
    seq: int
    state: VersionState
    adapter_path: str | None
    sha256: str | None
    parent: str | None
    base_model: str | None
    eval_report: dict[str, Any] | None = None
    gate_reasons: tuple[str, ...] = ()
    feedback_ids: dict[str, list[int]] = field(default_factory=dict)
    training_run_id: int | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    replaced: str | None = None  # the version that was live before this one went live
    trained_on_erased: float | None = None  # when an erasure found this version trained on the erased data
    adapter_deleted: float | None = None  # when its adapter files were deleted (trained on erased data)


@dataclass(frozen=True)
class VersionStats:
    """What customers did with one version's replies (for canary decisions and the console)."""

    name: str
    conversations: int
    replies: int
    thumbs_up: int
    thumbs_down: int
    regenerated: int  # replies of this version the customer asked to regenerate
    errors: int
    mean_latency_ms: float | None
    mean_tokens: float | None


@dataclass(frozen=True)
class Takeover:
    """An operator answers this conversation instead of the model (``store.takeovers``)."""

    conversation_id: str
    operator: str
    since: float  # unix time of the join


@dataclass(frozen=True)
class TrainingRun:
    id: int
    state: RunState
    started_at: float
    finished_at: float | None
    version: str | None
    progress: dict[str, Any] | None
    detail: str | None
    max_rating_id: int
    max_correction_id: int
