"""Every error learnloop raises on purpose, in one tree, each carrying the code the peer sees.

The tree (``code`` in brackets; ``*`` marks messages that are safe to show a client)::

    LearnloopError [internal]
    ├── StoreError [unavailable]                  feedback: the store failed (details only in the log)
    │   ├── StorageFullError [storage_full] *     the disk or the database is full; nothing was stored
    │   ├── NotFoundError [not_found] *           no such conversation, message, version, run
    │   ├── ConstraintError [unavailable]         PostgreSQL refused a write: a unique, foreign key or check constraint
    │   └── InvalidError [conflict] *             well formed but not allowed (rating a user turn)
    │       └── AccountError [conflict] *         operator names, passwords, roles, tokens
    ├── BrowseError [bad_request] *               feedback.browse: a console filter or cursor is wrong
    ├── ModelError [internal]                     training.models: fetching or converting the base model
    ├── AdapterInvalidError [internal]            training.validate: an adapter folder is refused
    ├── TrainingJobError [internal]               training.cycle: the training subprocess failed
    ├── SettingsError [bad_request] *             server.settings: a configuration value is wrong
    ├── ProtocolError [per instance] *            server.protocol: a client frame is rejected
    ├── EngineError [internal]                    server.engines: generation failed
    │   ├── OverloadedError [overloaded] *        too many replies queued (``retry_after``)
    │   └── UnknownVersionError [internal]        a version that is not loaded
    ├── AdapterRejectedError [internal]           server.release: an adapter failed validation
    └── ApiError [per instance] *                 server.channels and server.console: HTTP-only refusals

Only this package defines the root; ``training`` and ``server`` subclass it. The wire
mapping lives in one place per transport: ``server.errors.error_frame`` (websocket) and
``server.errors.http_error`` (HTTP). An error whose ``public`` is false reaches the peer as
its code with a generic message; its details go to the server log only.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar


class ErrorCode(StrEnum):
    """Codes on the wire, shared by the websocket protocol and every HTTP envelope."""

    BAD_REQUEST = "bad_request"  # not JSON, wrong field types, missing fields
    UNKNOWN_TYPE = "unknown_type"  # a frame type this protocol does not have
    HELLO_REQUIRED = "hello_required"  # anything but hello before ready
    TOO_LARGE = "too_large"  # text or body over the configured limit
    BUSY = "busy"  # a reply is streaming; send stop or wait for done
    NOT_FOUND = "not_found"  # unknown message or conversation id
    CONFLICT = "conflict"  # e.g. regenerate a reply that is not the latest
    RATE_LIMITED = "rate_limited"  # too many requests; retry_after says when
    OVERLOADED = "overloaded"  # the server cannot take more generations now
    UNAUTHORIZED = "unauthorized"  # token missing or wrong
    FORBIDDEN = "forbidden"  # authenticated, but not allowed
    CSRF = "csrf"  # console: missing or wrong X-CSRF-Token
    INVALID = "invalid"  # HTTP: the body does not match the schema
    METHOD_NOT_ALLOWED = "method_not_allowed"
    UNAVAILABLE = "unavailable"  # the store failed; retry later
    STORAGE_FULL = "storage_full"  # the disk is full; nothing was stored; retry later
    INTERNAL = "internal"  # unexpected: details stay in the server log


HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNKNOWN_TYPE: 400,
    ErrorCode.HELLO_REQUIRED: 400,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.BUSY: 409,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.OVERLOADED: 503,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.CSRF: 403,
    ErrorCode.INVALID: 422,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.STORAGE_FULL: 507,
    ErrorCode.INTERNAL: 500,
}
"""The HTTP status of each code (every code has one)."""


class LearnloopError(Exception):
    """The root. ``code`` is the class's unless an instance names its own."""

    code: ErrorCode = ErrorCode.INTERNAL
    public: ClassVar[bool] = False  # may ``message`` be shown to the peer?

    def __init__(self, message: str, *, code: ErrorCode | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.retry_after = retry_after


class StoreError(LearnloopError):
    """The feedback store failed (I/O, a broken database); nothing of the failed write was stored."""

    code = ErrorCode.UNAVAILABLE


class StorageFullError(StoreError):
    """The disk (or the database's page limit) is full: the write was not stored."""

    code = ErrorCode.STORAGE_FULL
    public = True


class NotFoundError(StoreError):
    """The referenced conversation, message, version or run does not exist."""

    code = ErrorCode.NOT_FOUND
    public = True


class ConstraintError(StoreError):
    """PostgreSQL refused a statement for a unique, foreign key, not-null or check constraint.

    The PostgreSQL backend raises it in place of the driver's error (the cause is chained);
    ``feedback.db.constraint_errors`` turns it, like SQLite's ``IntegrityError``, into the error
    the concept module names (``NotFoundError``, ``AccountError``, ...).
    """


class InvalidError(StoreError):
    """The request is well formed but not allowed (for example: rating a user message)."""

    code = ErrorCode.CONFLICT
    public = True


class AccountError(InvalidError):
    """An operator account request is not allowed (name taken, short password, unknown role)."""


class BrowseError(LearnloopError):
    """A console filter or cursor cannot be used."""

    code = ErrorCode.BAD_REQUEST
    public = True
