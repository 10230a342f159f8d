"""Console auth: who is asking (a session cookie with CSRF, or a bearer API token) and what role a route needs.

Each route states the lowest role it allows with ``role(...)`` (recorded in its OpenAPI
extra, read by the route-walk test), or takes the operator as a parameter (``AsViewer``...).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from feedback import ErrorCode, FeedbackStore
from feedback.accounts import ConsoleSession, Operator, OperatorRole
from server.errors import ApiError

COOKIE = "learnloop_session"
ROLE_KEY = "x-learnloop-role"
UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}


@dataclass(frozen=True)
class Principal:
    operator: Operator
    csrf_token: str | None  # None when authenticated by an API token
    session_id: str | None = None


async def authenticate(request: Request, store: FeedbackStore) -> Principal | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        operator = await store.accounts.operator_for_token(header[7:].strip())
        if operator is None:
            raise ApiError("the API token is unknown or revoked", code=ErrorCode.UNAUTHORIZED)
        return Principal(operator, None)
    session_id = request.cookies.get(COOKIE)
    if not session_id:
        return None
    session: ConsoleSession | None = await store.accounts.get_session(session_id)
    if session is None:
        return None
    return Principal(session.operator, session.csrf_token, session_id)


def require(role: OperatorRole) -> Callable[[Request], Awaitable[Principal]]:
    async def dependency(request: Request) -> Principal:
        store: FeedbackStore = request.app.state.store
        principal = await authenticate(request, store)
        if principal is None:
            raise ApiError("log in, or send Authorization: Bearer <api token>", code=ErrorCode.UNAUTHORIZED)
        if request.method in UNSAFE and principal.csrf_token is not None:
            sent = request.headers.get("x-csrf-token", "")
            if not hmac.compare_digest(sent, principal.csrf_token):
                raise ApiError("missing or wrong X-CSRF-Token header", code=ErrorCode.CSRF)
        if not principal.operator.role.allows(role):
            raise ApiError(f"this needs the {role} role; you are {principal.operator.role}", code=ErrorCode.FORBIDDEN)
        return principal

    return dependency


_REQUIRE = {r: require(r) for r in OperatorRole}  # one callable per role: FastAPI runs it once a request


def role(required: OperatorRole) -> dict[str, Any]:
    """Route options: the auth dependency and the role, recorded in the OpenAPI document."""
    return {"dependencies": [Depends(_REQUIRE[required])], "openapi_extra": {ROLE_KEY: str(required)}}


# the authenticated operator as a parameter (the same dependency as ``role``: evaluated once)
AsViewer = Annotated[Principal, Depends(_REQUIRE[OperatorRole.VIEWER])]
AsReviewer = Annotated[Principal, Depends(_REQUIRE[OperatorRole.REVIEWER])]
AsAdmin = Annotated[Principal, Depends(_REQUIRE[OperatorRole.ADMIN])]
