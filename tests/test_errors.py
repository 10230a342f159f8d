"""One error tree, one wire mapping per transport: every error reaches the peer in the same shape."""

from __future__ import annotations

import json
import logging

import pytest

from feedback.exceptions import HTTP_STATUS, ErrorCode, LearnloopError, NotFoundError, StorageFullError, StoreError
from server.engines import OverloadedError, UnknownVersionError
from server.errors import ApiError, error_frame_for, http_error
from server.protocol import ProtocolError


def test_every_code_has_an_http_status() -> None:
    assert set(HTTP_STATUS) == set(ErrorCode)


@pytest.mark.parametrize(
    ("exc", "code", "status"),
    [
        (NotFoundError("no conversation 'x'"), "not_found", 404),
        (StorageFullError("database or disk is full"), "storage_full", 507),
        (ProtocolError(ErrorCode.TOO_LARGE, "text has 5000 characters"), "too_large", 413),
        (OverloadedError("64 replies queued", retry_after=1.5), "overloaded", 503),
        (ApiError("too many login attempts", code=ErrorCode.RATE_LIMITED, retry_after=0.2), "rate_limited", 429),
    ],
)
def test_public_errors_keep_code_message_and_retry_after(exc: LearnloopError, code: str, status: int) -> None:
    frame = error_frame_for(exc, id="c1")
    assert frame == {
        "type": "error",
        "code": code,
        "message": exc.message,
        "id": "c1",
        **({"retry_after": round(exc.retry_after, 3)} if exc.retry_after is not None else {}),
    }
    response = http_error(exc)
    assert response.status_code == status
    assert json.loads(bytes(response.body)) == {"error": {"code": code, "message": exc.message}}
    if exc.retry_after is not None:
        assert int(response.headers["retry-after"]) >= 1


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (StoreError("disk I/O error at /srv/secret/learnloop.db"), "unavailable"),
        (UnknownVersionError("version 'v9' is not loaded"), "internal"),
        (RuntimeError("token sk-123 leaked in a traceback"), "internal"),
    ],
)
def test_private_details_stay_in_the_log(exc: Exception, code: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="learnloop.errors"):
        frame = error_frame_for(exc)
        body = json.loads(bytes(http_error(exc).body))
    assert frame["code"] == code and body["error"]["code"] == code
    assert str(exc) not in frame["message"] and str(exc) not in body["error"]["message"]
    assert str(exc) in caplog.text  # the operator still sees what happened
