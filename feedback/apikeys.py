"""Keys of the OpenAI-compatible API, and the conversations it may continue (``store.api_keys``).

A key belongs to a name (a customer's integration, say ``shop``): its conversations are stored
with ``channel = "openai"`` and ``site`` = that name. A name may hold several keys (rotate by
creating a new one, then revoking the name's old ones). As with operator tokens
(``feedback.accounts``), only SHA-256 hashes are stored; the key is shown once.

``api_openings`` remembers each API conversation's *opening* (a hash of the key's name, the
request's ``user`` and the turns up to the first user turn), so a request finds the few
conversations it could continue without reading every conversation of the key.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

from feedback import rows
from feedback.accounts import new_secret, token_hash, write_audit
from feedback.db import Connection, Database, constraint_errors, fetch_one
from feedback.exceptions import AccountError, InvalidError, NotFoundError
from feedback.records import CLIENT_AUTHOR, Conversation, Message, Reaction, Role

KEY_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
KEY_PREFIX = "llk-"
_INSERT_MESSAGE = rows.insert_sql("messages", Message)
_INSERT_REACTION = rows.insert_sql("reactions", Reaction) + " ON CONFLICT (reply_id) DO NOTHING"


@dataclass(frozen=True)
class ApiKeyInfo:
    name: str
    keys: int
    created_at: float  # the newest key's


def check_key_name(name: str) -> str:
    if not KEY_NAME.fullmatch(name):
        raise AccountError(f"API key name {name!r}: use 1-64 of a-z 0-9 _ - (starting with a letter or digit)")
    return name


class ApiKeys:
    """API keys and the openings of API conversations, in the feedback database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(self, name: str, *, actor: str) -> str:
        """A new key for ``name`` (printed once by the CLI; only its hash is kept)."""
        check_key_name(name)
        key = new_secret(KEY_PREFIX)

        async def op(conn: Connection) -> None:
            await conn.execute(
                "INSERT INTO api_keys (key_hash, name, created_at) VALUES (?, ?, ?)",
                (token_hash(key), name, time.time()),
            )
            await write_audit(conn, actor, "apikey.create", name, {})

        await self._db.write(op)
        return key

    async def name_for(self, key: str) -> str | None:
        """The name a key belongs to, or None for an unknown or revoked key."""
        found = await self._db.read("SELECT name FROM api_keys WHERE key_hash = ?", (token_hash(key),))
        return str(found[0][0]) if found else None

    async def names(self) -> list[ApiKeyInfo]:
        found = await self._db.read("SELECT name, COUNT(*), MAX(created_at) FROM api_keys GROUP BY name ORDER BY name")
        return [ApiKeyInfo(r[0], int(r[1]), float(r[2])) for r in found]

    async def revoke(self, name: str, *, actor: str) -> int:
        """Revoke every key of ``name``; their conversations stay. Returns how many were revoked."""

        async def op(conn: Connection) -> int:
            cursor = await conn.execute("DELETE FROM api_keys WHERE name = ?", (name,))
            if cursor.rowcount == 0:
                raise AccountError(f"no API key named {name!r}")
            await write_audit(conn, actor, "apikey.revoke", name, {"keys": cursor.rowcount})
            return int(cursor.rowcount)

        return await self._db.write(op)

    async def add_turns(
        self,
        conversation_id: str,
        turns: Sequence[tuple[str, Role, str]],
        *,
        parent_id: str | None,
        opening: str | None = None,
        reaction: Reaction | None = None,
    ) -> list[Message]:
        """Append ``(id, role, text)`` turns, each the child of the one before (the first of
        ``parent_id``), and remember a new conversation's ``opening``: one transaction. ``reaction``:
        the first turn's reading as implicit feedback on ``parent_id``, a reply (stored with it)."""
        now = time.time()
        if reaction is not None:
            if not turns or reaction.message_id != turns[0][0] or reaction.reply_id != parent_id:
                raise InvalidError("a reaction belongs to the first new turn and is about its parent reply")
            reaction = dataclasses.replace(reaction, created_at=now)

        async def op(conn: Connection) -> list[Message]:
            if opening is not None:
                await conn.execute(
                    "INSERT INTO api_openings (conversation_id, opening, created_at) VALUES (?, ?, ?)"
                    " ON CONFLICT (conversation_id) DO NOTHING",
                    (conversation_id, opening, now),
                )
            row = await fetch_one(
                conn, "SELECT COALESCE(MAX(seq), 0) FROM messages WHERE conversation_id = ?", (conversation_id,)
            )
            seq, parent, added = int(row[0]) if row else 0, parent_id, []
            for message_id, role, text in turns:
                seq += 1
                author = CLIENT_AUTHOR if role is Role.ASSISTANT else None  # the model did not write it
                message = Message(message_id, conversation_id, seq, role, text, parent, created_at=now, author=author)
                with constraint_errors(
                    lambda detail: NotFoundError(f"conversation {conversation_id!r} or parent does not exist: {detail}")
                ):
                    await conn.execute(_INSERT_MESSAGE, rows.row_values(message))
                added.append(message)
                parent = message_id
            if reaction is not None:
                found = await fetch_one(conn, "SELECT role FROM messages WHERE id = ?", (reaction.reply_id,))
                if found is not None and found["role"] == Role.ASSISTANT:
                    await conn.execute(_INSERT_REACTION, rows.row_values(reaction))
            return added

        return await self._db.write(op)

    async def candidates(
        self, opening: str, *, site: str, user_id: str | None, limit: int
    ) -> list[tuple[Conversation, list[Message]]]:
        """The newest ``limit`` API conversations of ``site`` and ``user_id`` with this opening, newest
        first, each with its messages in order (two reads, whatever ``limit`` is)."""
        found = await self._db.read(
            "SELECT c.* FROM api_openings o JOIN conversations c ON c.id = o.conversation_id"
            " WHERE o.opening = ? AND c.channel = 'openai' AND c.site = ? AND c.user_id IS NOT DISTINCT FROM ?"
            " ORDER BY o.created_at DESC, o.rowid DESC LIMIT ?",
            (opening, site, user_id, limit),
        )
        conversations = [rows.conversation(r) for r in found]
        if not conversations:
            return []
        marks = ",".join("?" * len(conversations))
        by_conversation: dict[str, list[Message]] = {c.id: [] for c in conversations}
        for r in await self._db.read(
            f"SELECT * FROM messages WHERE conversation_id IN ({marks}) ORDER BY conversation_id, seq",
            [c.id for c in conversations],
        ):
            message = rows.message(r)
            by_conversation[message.conversation_id].append(message)
        return [(c, by_conversation[c.id]) for c in conversations]
