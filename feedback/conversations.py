"""Conversations, their messages and the feedback on them: what training reads.

``store.conversations``: create and read conversations, append messages (a customer's turn,
with what it says about the reply before it; a model's reply; an operator's own answer), store
ratings and corrections of replies, keep
messages out of training, and read all of it in one snapshot for a training run. Pinning a
conversation to a model version happens when it is created (``model_version``).
"""

from __future__ import annotations

import dataclasses
import time

from feedback import rows
from feedback.accounts import write_audit
from feedback.db import Connection, Database, RawConnection, Row, constraint_errors, fetch_one
from feedback.exceptions import InvalidError, NotFoundError
from feedback.records import (
    Conversation,
    Correction,
    FeedbackSnapshot,
    FinishReason,
    Message,
    RaterState,
    Rating,
    Reaction,
    Role,
    operator_author,
)

_INSERT_CONVERSATION = rows.insert_sql("conversations", Conversation)
_INSERT_MESSAGE = rows.insert_sql("messages", Message)
_INSERT_CORRECTION = rows.insert_sql("corrections", Correction, without=["id"]) + " RETURNING id"
# a rating of an assistant message, unless (message_id, client_id) has one: the row, or none
_INSERT_RATING = (
    "INSERT INTO ratings (message_id, value, reason, comment, rater, client_id, created_at)"
    " SELECT ?, ?, ?, ?, ?, ?, ? FROM messages WHERE id = ? AND role = ?"
    " ON CONFLICT (message_id, client_id) DO NOTHING RETURNING *"
)
_INSERT_REACTION = rows.insert_sql("reactions", Reaction) + " ON CONFLICT (reply_id) DO NOTHING"


class Conversations:
    """Conversations and messages in the feedback database (``store.conversations``)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(
        self,
        conversation_id: str,
        *,
        user_id: str | None = None,
        channel: str = "websocket",
        tenant: str | None = None,
        model_version: str | None = None,
        site: str | None = None,
    ) -> Conversation:
        """A new conversation; ``model_version`` pins it to a version (a canary's share); ``site``: the
        widget site or bot it came through."""
        conversation = Conversation(conversation_id, user_id, channel, time.time(), tenant, model_version, site)

        def op(conn: RawConnection) -> None:
            conn.execute(_INSERT_CONVERSATION, rows.row_values(conversation))

        await self._db.write_sync(op)
        return conversation

    async def get(self, conversation_id: str) -> Conversation:
        found = await self._db.read("SELECT * FROM conversations WHERE id = ?", (conversation_id,))
        if not found:
            raise NotFoundError(f"conversation {conversation_id!r} does not exist")
        return rows.conversation(found[0])

    async def add_message(
        self,
        *,
        message_id: str,
        conversation_id: str,
        role: Role,
        text: str,
        parent_id: str | None,
        regenerated_from: str | None = None,
        model_version: str | None = None,
        latency_ms: float | None = None,
        finish_reason: str | None = None,
        n_tokens: int | None = None,
        author: str | None = None,
        reaction: Reaction | None = None,
    ) -> Message:
        """Append a message; its ``seq`` is the next in the conversation.

        ``reaction``: a user turn's reading as implicit feedback on the reply it answers (its
        ``reply_id`` is ``parent_id``, its ``message_id`` this message), stored in the same
        transaction; only the first user turn after a reply is kept (a later one, say after a
        regeneration of the turn, leaves the first reading as it was).
        """
        now = time.time()
        finish = None if finish_reason is None else FinishReason(finish_reason)  # ValueError for an unknown one
        if reaction is not None:
            if role is not Role.USER or reaction.reply_id != parent_id or reaction.message_id != message_id:
                raise InvalidError("a reaction belongs to a user turn and is about that turn's parent reply")
            reaction = dataclasses.replace(reaction, created_at=now)

        def op(conn: RawConnection) -> Message:  # every chat turn: one trip to the writer (write_sync)
            row = conn.execute(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM messages WHERE conversation_id = ?", (conversation_id,)
            ).fetchone()
            message = Message(
                id=message_id,
                conversation_id=conversation_id,
                seq=int(row[0]) if row else 1,
                role=role,
                text=text,
                parent_id=parent_id,
                regenerated_from=regenerated_from,
                model_version=model_version,
                latency_ms=latency_ms,
                finish_reason=finish,
                n_tokens=n_tokens,
                created_at=now,
                author=author,
            )
            with constraint_errors(
                lambda detail: NotFoundError(
                    f"conversation {conversation_id!r} or parent message does not exist: {detail}"
                )
            ):
                conn.execute(_INSERT_MESSAGE, rows.row_values(message))
            if reaction is not None:
                parent = conn.execute("SELECT role FROM messages WHERE id = ?", (parent_id,)).fetchone()
                if parent is not None and parent["role"] == Role.ASSISTANT:
                    conn.execute(_INSERT_REACTION, rows.row_values(reaction))
            return message

        return await self._db.write_sync(op)

    async def add_operator_reply(
        self, *, conversation_id: str, text: str, operator: str, message_id: str, live: bool = False
    ) -> Message:
        """An operator's own answer in a conversation (takeover); it trains as a demonstration.

        Offline (``live=False``) it answers the customer's latest message, beside any reply the
        model gave. In a live takeover it continues the conversation after its latest message.
        """
        text = text.strip()
        if not text:
            raise InvalidError("an operator reply needs a non-empty text")
        messages = [m for m in await self.messages(conversation_id) if m.finish_reason is not FinishReason.ERROR]
        users = [m for m in messages if m.role is Role.USER]
        if not users:
            raise NotFoundError(f"conversation {conversation_id!r} has no user message to answer")
        return await self.add_message(
            message_id=message_id,
            conversation_id=conversation_id,
            role=Role.ASSISTANT,
            text=text,
            parent_id=messages[-1].id if live else users[-1].id,
            author=operator_author(operator),
            finish_reason=FinishReason.OPERATOR,
        )

    async def get_message(self, message_id: str) -> Message:
        found = await self._db.read("SELECT * FROM messages WHERE id = ?", (message_id,))
        if not found:
            raise NotFoundError(f"message {message_id!r} does not exist")
        return rows.message(found[0])

    async def messages(self, conversation_id: str) -> list[Message]:
        """A conversation's messages in order (none for an unknown conversation)."""
        found = await self._db.read("SELECT * FROM messages WHERE conversation_id = ? ORDER BY seq", (conversation_id,))
        return [rows.message(r) for r in found]

    async def exclude_message(self, message_id: str, *, reason: str, operator: str) -> None:
        """Keep a message (and every row built from it) out of training."""
        now = time.time()

        async def op(conn: Connection) -> None:
            if await fetch_one(conn, "SELECT 1 FROM messages WHERE id = ?", (message_id,)) is None:
                raise NotFoundError(f"message {message_id!r} does not exist")
            await conn.execute(
                "INSERT INTO training_exclusions (message_id, reason, operator, created_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (message_id) DO UPDATE SET reason = excluded.reason, operator = excluded.operator",
                (message_id, reason, operator, now),
            )
            await write_audit(conn, operator, "exclude", message_id, {"reason": reason})

        await self._db.write(op)

    async def include_message(self, message_id: str, *, operator: str) -> None:
        """Undo ``exclude_message``."""

        async def op(conn: Connection) -> None:
            await conn.execute("DELETE FROM training_exclusions WHERE message_id = ?", (message_id,))
            await write_audit(conn, operator, "include", message_id, {})

        await self._db.write(op)

    # --- feedback on replies ----------------------------------------------------------

    async def add_rating(
        self,
        *,
        message_id: str,
        value: int,
        rater: str,
        client_id: str,
        reason: str | None = None,
        comment: str | None = None,
    ) -> tuple[Rating, bool]:
        """Store a thumbs rating; idempotent on ``(message_id, client_id)``.

        Returns the stored rating and whether this call created it (False for a replay).
        """
        if value not in (1, -1):
            raise InvalidError(f"rating value must be 1 or -1, got {value!r}")
        now = time.time()

        def op(conn: RawConnection) -> tuple[Rating, bool]:
            # the hot path of a rating burst, on the writer's thread (Database.write_sync): one
            # statement for a new rating (a round trip to the server on PostgreSQL); a replay or an
            # error takes one or two more
            stored = conn.execute(
                _INSERT_RATING, (message_id, value, reason, comment, rater, client_id, now, message_id, Role.ASSISTANT)
            ).fetchall()  # all: sqlite3 finishes (resets) the statement
            if stored:
                return rows.rating(stored[0]), True
            row = conn.execute(
                "SELECT * FROM ratings WHERE message_id = ? AND client_id = ?", (message_id, client_id)
            ).fetchone()
            if row is not None:  # a replay (a rating exists only on an assistant message)
                return rows.rating(row), False
            _check_assistant(
                message_id, conn.execute("SELECT role FROM messages WHERE id = ?", (message_id,)).fetchone()
            )
            raise AssertionError(f"rating of {message_id!r} neither stored nor found")  # pragma: no cover

        return await self._db.write_sync(op)

    async def add_correction(
        self, *, message_id: str, text: str, operator: str, reason: str | None = None
    ) -> Correction:
        """Store an operator's better answer for an assistant message (``reason``: a tag, e.g. wrong-fact)."""
        text = text.strip()
        if not text:
            raise InvalidError("a correction needs a non-empty text")
        reason = (reason or "").strip() or None
        if reason is not None and len(reason) > 200:
            raise InvalidError("a correction reason is at most 200 characters")
        correction = Correction(0, message_id, text, operator, time.time(), reason)

        async def op(conn: Connection) -> int:
            await _require_assistant_message(conn, message_id)
            row = await fetch_one(conn, _INSERT_CORRECTION, rows.row_values(correction, without=["id"]))
            await write_audit(conn, operator, "correct", message_id, {"chars": len(text), "reason": reason})
            assert row is not None
            return int(row[0])

        return dataclasses.replace(correction, id=await self._db.write(op))

    async def reactions(self, conversation_id: str) -> list[Reaction]:
        """The implicit-feedback readings of a conversation's replies, in the order they were read."""
        found = await self._db.read(
            "SELECT r.* FROM reactions r JOIN messages m ON m.id = r.reply_id"
            " WHERE m.conversation_id = ? ORDER BY r.created_at, r.reply_id",
            (conversation_id,),
        )
        return [rows.reaction(r) for r in found]

    async def count_new_feedback(
        self, *, after_rating_id: int, after_correction_id: int, after_time: float, implicit: bool = False
    ) -> int:
        """Ratings and corrections after these ids, regenerations and operator replies after this time,
        and with ``implicit`` the labelled reactions after this time."""
        found = await self._db.read(
            "SELECT (SELECT COUNT(*) FROM ratings WHERE id > ?)"
            " + (SELECT COUNT(*) FROM corrections WHERE id > ?)"
            " + (SELECT COUNT(*) FROM messages WHERE (regenerated_from IS NOT NULL OR author LIKE 'operator:%')"
            " AND created_at > ?)"
            " + (SELECT COUNT(*) FROM reactions WHERE ? = 1 AND value IS NOT NULL AND created_at > ?)",
            (after_rating_id, after_correction_id, after_time, int(implicit), after_time),
        )
        return int(found[0][0])

    async def export_feedback(self) -> FeedbackSnapshot:
        """All conversations that carry any feedback, read in one snapshot."""
        async with self._db.snapshot() as snap:
            messages = tuple(
                rows.message(r)
                for r in await snap.read(
                    "SELECT m.* FROM messages m WHERE m.conversation_id IN ("
                    " SELECT DISTINCT x.conversation_id FROM messages x"
                    " WHERE x.regenerated_from IS NOT NULL OR x.author LIKE 'operator:%'"
                    " OR x.id IN (SELECT message_id FROM ratings)"
                    " OR x.id IN (SELECT message_id FROM corrections)"
                    " OR x.id IN (SELECT reply_id FROM reactions WHERE value IS NOT NULL))"
                    " ORDER BY m.conversation_id, m.seq"
                )
            )
            ratings = tuple(rows.rating(r) for r in await snap.read("SELECT * FROM ratings ORDER BY id"))
            corrections = tuple(rows.correction(r) for r in await snap.read("SELECT * FROM corrections ORDER BY id"))
            conversation_ids = sorted({m.conversation_id for m in messages})
            conversations: list[Conversation] = []
            for i in range(0, len(conversation_ids), 500):
                chunk = conversation_ids[i : i + 500]
                sql = f"SELECT * FROM conversations WHERE id IN ({','.join('?' * len(chunk))})"
                conversations += [rows.conversation(r) for r in await snap.read(sql, chunk)]
            excluded = frozenset(r[0] for r in await snap.read("SELECT message_id FROM training_exclusions"))
            reviews = await snap.read("SELECT rater, state FROM rater_reviews")
            erased = frozenset(r[0] for r in await snap.read("SELECT subject_hash FROM erasures"))
            reactions = tuple(
                rows.reaction(r)
                for r in await snap.read(
                    "SELECT * FROM reactions WHERE value IS NOT NULL ORDER BY created_at, reply_id"
                )
            )
        return FeedbackSnapshot(
            messages=messages,
            ratings=ratings,
            corrections=corrections,
            max_rating_id=max((r.id for r in ratings), default=0),
            max_correction_id=max((c.id for c in corrections), default=0),
            conversations=tuple(conversations),
            excluded_messages=excluded,
            rater_states={r[0]: RaterState(r[1]) for r in reviews},
            erased_subjects=erased,
            reactions=reactions,
        )


async def _require_assistant_message(conn: Connection, message_id: str) -> None:
    _check_assistant(message_id, await fetch_one(conn, "SELECT role FROM messages WHERE id = ?", (message_id,)))


def _check_assistant(message_id: str, row: Row | None) -> None:
    if row is None:
        raise NotFoundError(f"message {message_id!r} does not exist")
    if row["role"] != Role.ASSISTANT:
        raise InvalidError(f"message {message_id!r} is a {row['role']} message; only assistant replies take feedback")
