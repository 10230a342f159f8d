"""Operator accounts: roles, password hashing, API tokens and console sessions.

The rules are pure functions (``OperatorRole.allows``, ``hash_password``/``verify_password``,
``token_hash``); ``Accounts`` stores them (``store.accounts``) and writes the audit log,
which every part of the store writes through ``write_audit``. Only hashes are stored: scrypt for passwords, SHA-256 for API tokens and session ids
(both are 32 random bytes, so a fast hash is enough).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from feedback.db import Connection, Database, Row, constraint_errors, fetch_one
from feedback.exceptions import AccountError as AccountError  # callers catch it from here too

NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_PASSWORD_CHARS = 8
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


class OperatorRole(StrEnum):
    VIEWER = "viewer"
    REVIEWER = "reviewer"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def allows(self, required: OperatorRole) -> bool:
        """Roles are ordered: admin may do what a reviewer may, a reviewer what a viewer may."""
        return self.rank >= required.rank


_RANKS = {OperatorRole.VIEWER: 0, OperatorRole.REVIEWER: 1, OperatorRole.ADMIN: 2}


@dataclass(frozen=True)
class Operator:
    name: str
    role: OperatorRole
    disabled: bool = False
    created_at: float = 0.0


@dataclass(frozen=True)
class ConsoleSession:
    operator: Operator
    csrf_token: str
    expires_at: float


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """``scrypt$n$r$p$salt$hash`` (base64); a fresh 16-byte salt unless one is given."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, maxmem=64 * 2**20, **_SCRYPT)
    b64 = base64.b64encode
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt_b64, digest_b64 = stored.split("$")
        if scheme != "scrypt":
            return False
        salt, digest = base64.b64decode(salt_b64), base64.b64decode(digest_b64)
        candidate = hashlib.scrypt(
            password.encode(), salt=salt, n=int(n), r=int(r), p=int(p), dklen=len(digest), maxmem=64 * 2**20
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(candidate, digest)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_secret(prefix: str = "") -> str:
    return prefix + secrets.token_urlsafe(32)


def check_new_account(name: str, password: str, role: str) -> OperatorRole:
    if not NAME_RE.match(name):
        raise AccountError("operator names are 1-64 letters, digits or . _ @ -")
    if len(password) < MIN_PASSWORD_CHARS:
        raise AccountError(f"passwords need at least {MIN_PASSWORD_CHARS} characters")
    try:
        return OperatorRole(role)
    except ValueError:
        raise AccountError(f"role must be one of {', '.join(r.value for r in OperatorRole)}") from None


def _operator(r: Row) -> Operator:
    return Operator(r["name"], OperatorRole(r["role"]), bool(r["disabled"]), r["created_at"])


class Accounts:
    """Operator accounts, API tokens and console sessions, stored in the feedback database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def add_operator(self, name: str, password: str, role: str, *, actor: str) -> Operator:
        checked = check_new_account(name, password, role)
        password_hash = hash_password(password)
        now = time.time()

        async def op(conn: Connection) -> None:
            with constraint_errors(lambda _: AccountError(f"operator {name!r} already exists")):
                await conn.execute(
                    "INSERT INTO operators (name, password_hash, role, created_at) VALUES (?, ?, ?, ?)",
                    (name, password_hash, checked, now),
                )
            await write_audit(conn, actor, "operator.add", name, {"role": checked})

        await self._db.write(op)
        return Operator(name, checked, False, now)

    async def set_operator(
        self,
        name: str,
        *,
        actor: str,
        password: str | None = None,
        role: str | None = None,
        disabled: bool | None = None,
    ) -> None:
        """Change a password, a role or lock an account; locking ends its sessions and tokens."""
        changes: dict[str, Any] = {}
        if password is not None:
            check_new_account(name, password, OperatorRole.VIEWER)
            changes["password_hash"] = hash_password(password)
        if role is not None:
            changes["role"] = check_new_account(name, "x" * MIN_PASSWORD_CHARS, role)
        if disabled is not None:
            changes["disabled"] = int(disabled)

        async def op(conn: Connection) -> None:
            if changes:
                sets = ", ".join(f"{k} = ?" for k in changes)
                cursor = await conn.execute(f"UPDATE operators SET {sets} WHERE name = ?", (*changes.values(), name))
                if cursor.rowcount == 0:
                    raise AccountError(f"no operator {name!r}")
            if password is not None or disabled:
                await conn.execute("DELETE FROM console_sessions WHERE operator = ?", (name,))
            if disabled:
                await conn.execute("DELETE FROM api_tokens WHERE operator = ?", (name,))
            detail = {k: v for k, v in changes.items() if k != "password_hash"}
            await write_audit(conn, actor, "operator.change", name, {**detail, "password": password is not None})

        await self._db.write(op)

    async def operators(self) -> list[Operator]:
        return [_operator(r) for r in await self._db.read("SELECT * FROM operators ORDER BY name")]

    async def check_login(self, name: str, password: str) -> Operator | None:
        rows = await self._db.read("SELECT * FROM operators WHERE name = ?", (name,))
        if not rows:
            verify_password(password, hash_password("timing-equaliser", salt=b"0" * 16))  # same cost either way
            return None
        row = rows[0]
        if row["disabled"] or not verify_password(password, row["password_hash"]):
            return None
        return _operator(row)

    async def create_token(self, name: str, *, label: str, actor: str) -> str:
        token = new_secret("ll_")
        now = time.time()

        async def op(conn: Connection) -> None:
            if await fetch_one(conn, "SELECT 1 FROM operators WHERE name = ? AND disabled = 0", (name,)) is None:
                raise AccountError(f"no active operator {name!r}")
            await conn.execute(
                "INSERT INTO api_tokens (token_hash, operator, label, created_at) VALUES (?, ?, ?, ?)",
                (token_hash(token), name, label, now),
            )
            await write_audit(conn, actor, "token.create", name, {"label": label})

        await self._db.write(op)
        return token

    async def operator_for_token(self, token: str) -> Operator | None:
        rows = await self._db.read(
            "SELECT o.* FROM api_tokens t JOIN operators o ON o.name = t.operator"
            " WHERE t.token_hash = ? AND o.disabled = 0",
            (token_hash(token),),
        )
        return _operator(rows[0]) if rows else None

    async def create_session(self, operator: Operator, *, ttl_s: float) -> tuple[str, ConsoleSession]:
        """A new console session: the cookie value (shown once) and what it stands for."""
        session_id, csrf = new_secret(), new_secret()
        now = time.time()

        async def op(conn: Connection) -> None:
            await conn.execute("DELETE FROM console_sessions WHERE expires_at < ?", (now,))
            await conn.execute(
                "INSERT INTO console_sessions (session_hash, operator, csrf_token, created_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (token_hash(session_id), operator.name, csrf, now, now + ttl_s),
            )
            await write_audit(conn, operator.name, "login", operator.name, {})

        await self._db.write(op)
        return session_id, ConsoleSession(operator, csrf, now + ttl_s)

    async def get_session(self, session_id: str) -> ConsoleSession | None:
        rows = await self._db.read(
            "SELECT o.*, s.csrf_token, s.expires_at FROM console_sessions s JOIN operators o ON o.name = s.operator"
            " WHERE s.session_hash = ? AND s.expires_at > ? AND o.disabled = 0",
            (token_hash(session_id), time.time()),
        )
        if not rows:
            return None
        return ConsoleSession(_operator(rows[0]), rows[0]["csrf_token"], rows[0]["expires_at"])

    async def end_session(self, session_id: str, *, actor: str) -> None:
        async def op(conn: Connection) -> None:
            await conn.execute("DELETE FROM console_sessions WHERE session_hash = ?", (token_hash(session_id),))
            await write_audit(conn, actor, "logout", actor, {})

        await self._db.write(op)

    async def audit(self, actor: str, action: str, subject: str | None, detail: dict[str, Any] | None = None) -> None:
        """Record an operator action that changes nothing in this database (a promote goes through the app)."""

        async def op(conn: Connection) -> None:
            await write_audit(conn, actor, action, subject, detail or {})

        await self._db.write(op)


async def write_audit(conn: Connection, actor: str, action: str, subject: str | None, detail: dict[str, Any]) -> None:
    await conn.execute(
        "INSERT INTO audit_log (at, actor, action, subject, detail) VALUES (?, ?, ?, ?, ?)",
        (time.time(), actor, action, subject, json.dumps(detail)),
    )
