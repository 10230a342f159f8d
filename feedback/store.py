"""The durable feedback store: one database and one object per concept over it.

``FeedbackStore`` holds the ``Database`` (``feedback/db.py``: one writer with group
commit, acknowledgements only after ``COMMIT``; a SQLite file or PostgreSQL) and a namespace
per concept, each its own module::

    store.conversations  conversations, messages, ratings, corrections, exclusions, snapshot
    store.versions       model versions: states, live, canary, rollback, stats
    store.runs           training runs and the training lease
    store.raters         raters flagged for review and the reviews
    store.erasure        erasing users, tombstones
    store.accounts       operators, API tokens, console sessions, audit entries
    store.api_keys       keys of the OpenAI-compatible API, the openings of its conversations
    store.browse         the console's queries: lists, search, transcripts, series, audit log
    store.inbox          IM platform events (each processed once) and the conversation of each thread
    store.outbox         calls to IM platforms waiting for delivery
    store.takeovers      the conversations an operator answers (shared by the server processes)
    store.limits         rate limits shared by the server processes (PostgreSQL only)
"""

from __future__ import annotations

from pathlib import Path

from feedback.accounts import Accounts
from feedback.apikeys import ApiKeys
from feedback.browse import Browse
from feedback.conversations import Conversations
from feedback.db import Database, open_database
from feedback.erasure import Erasure
from feedback.inbox import Inbox
from feedback.limits import Limits
from feedback.outbox import Outbox
from feedback.runs import Runs
from feedback.takeovers import Takeovers
from feedback.trust import Raters
from feedback.versions import Versions


class FeedbackStore:
    """The durable store. Open with ``await FeedbackStore.open(path)``; close with ``close()``."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.conversations = Conversations(db)
        self.versions = Versions(db)
        self.runs = Runs(db)
        self.raters = Raters(db)
        self.erasure = Erasure(db)
        self.accounts = Accounts(db)
        self.api_keys = ApiKeys(db)
        self.browse = Browse(db)
        self.inbox = Inbox(db)
        self.outbox = Outbox(db)
        self.takeovers = Takeovers(db)
        self.limits = Limits(db)

    @classmethod
    async def open(cls, target: str | Path, *, tombstone_path: Path | None = None) -> FeedbackStore:
        """Open (or create) the database, migrate it, and re-apply erasures.

        ``target``: a SQLite file (the default backend) or a ``postgresql://`` URL
        (``feedback.db.open_database``); ``tombstone_path``: the erasures file (beside a SQLite
        file by default; required for PostgreSQL).
        """
        store = cls(await open_database(target, tombstone_path=tombstone_path))
        try:
            await store.erasure.reapply_tombstones()
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        await self.db.close()

    async def __aenter__(self) -> FeedbackStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
