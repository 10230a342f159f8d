"""Errors on the wire: one mapping for the websocket, one for HTTP.

Every error learnloop raises on purpose is a ``feedback.exceptions.LearnloopError`` (the tree
is drawn in that module's docstring) and carries its code. Here it becomes what the peer
sees: an ``error`` frame (``error_frame_for``) or a JSON envelope
``{"error": {"code", "message"}}`` with the code's HTTP status and ``Retry-After``
(``http_error``). An error that is not public, and any other exception, reaches the peer as
its code with a generic message; its details are logged here, never sent.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from feedback.exceptions import HTTP_STATUS, ErrorCode, LearnloopError
from server.protocol import error_frame

log = logging.getLogger("learnloop.errors")

_GENERIC = {
    ErrorCode.INTERNAL: "internal error; details are in the server log",
    ErrorCode.UNAVAILABLE: "the feedback store failed; retry later",
}


class ApiError(LearnloopError):
    """An HTTP-only refusal (login, CSRF, roles, channel keys); the code decides the status."""

    public = True


def public_view(exc: BaseException, *, where: str = "") -> tuple[ErrorCode, str, float | None]:
    """(code, message, retry_after) that may be shown to the peer; logs what may not."""
    if isinstance(exc, LearnloopError) and exc.public:
        return exc.code, exc.message, exc.retry_after
    code = exc.code if isinstance(exc, LearnloopError) else ErrorCode.INTERNAL
    log.error("%s%s: %s", where + ": " if where else "", type(exc).__name__, exc, exc_info=exc)
    return code, _GENERIC.get(code, f"{code} (details are in the server log)"), None


def error_frame_for(exc: BaseException, *, id: str | None = None, where: str = "") -> dict[str, Any]:
    """The websocket ``error`` frame for an exception (``id``: the client's id of the failed frame)."""
    code, message, retry_after = public_view(exc, where=where)
    return error_frame(code, message, retry_after=retry_after, id=id)


def error_body(code: ErrorCode | str, message: str) -> dict[str, Any]:
    return {"error": {"code": str(code), "message": message}}


def error_response(
    code: ErrorCode, message: str, *, retry_after: float | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The one HTTP error envelope, with the code's status and ``Retry-After`` when there is one."""
    headers = dict(headers or {})
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return JSONResponse(error_body(code, message), status_code=HTTP_STATUS[code], headers=headers or None)


# the statuses Starlette raises itself (our routes raise errors of the tree instead)
_CODE_OF_STATUS = {
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.TOO_LARGE,
    429: ErrorCode.RATE_LIMITED,
}


def http_error(exc: BaseException, *, where: str = "") -> JSONResponse:
    """The HTTP response for an exception: the code's status, the envelope, ``Retry-After``."""
    if isinstance(exc, StarletteHTTPException):  # routing: unknown path, wrong method
        fallback = ErrorCode.BAD_REQUEST if exc.status_code < 500 else ErrorCode.INTERNAL
        code = _CODE_OF_STATUS.get(exc.status_code, fallback)
        message = {404: f"no route {where}", 405: f"this method is not allowed: {where}"}.get(
            exc.status_code, str(exc.detail)
        )
        return JSONResponse(error_body(code, message), status_code=exc.status_code, headers=exc.headers)
    code, message, retry_after = public_view(exc, where=where)
    return error_response(ErrorCode(code), message, retry_after=retry_after)


def install_error_handlers(app: FastAPI) -> None:
    """Every error of a FastAPI app through ``http_error``, and schema failures as ``invalid`` (422)."""

    async def known(request: Request, exc: Exception) -> JSONResponse:
        return http_error(exc, where=f"{request.method} {request.url.path}")

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        parts = [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return error_response(ErrorCode.INVALID, "; ".join(parts))

    for kind in (LearnloopError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, known)
    app.add_exception_handler(RequestValidationError, invalid)
