"""Raters held for review: who was flagged, why, and what an operator decided.

``store.raters``. The flags come from ``training.trust`` (bursts, volume, disagreement);
this module only stores them and the reviews. A pending or rejected rater's ratings do
not train (``FeedbackSnapshot.rater_states``).
"""

from __future__ import annotations

import json
import time
from typing import Any

from feedback.accounts import write_audit
from feedback.db import Connection, Database
from feedback.records import RaterState


class Raters:
    """Rater reviews in the feedback database (``store.raters``)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def flag(self, flags: dict[str, list[str]]) -> list[str]:
        """Hold newly flagged raters for review; raters already reviewed keep their state.

        ``flags``: reasons by rater. Returns the raters that became pending now.
        """
        now = time.time()

        async def op(conn: Connection) -> list[str]:
            added = []
            for rater, reasons in sorted(flags.items()):
                cursor = await conn.execute(
                    "INSERT INTO rater_reviews (rater, state, reasons, updated_at) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (rater) DO NOTHING",
                    (rater, RaterState.PENDING, json.dumps(reasons), now),
                )
                if cursor.rowcount == 1:
                    added.append(rater)
                    await write_audit(conn, "trust", "flag", rater, {"reasons": reasons})
            return added

        return await self._db.write(op)

    async def review(self, rater: str, state: RaterState, *, reviewer: str) -> None:
        """An operator's decision on a rater (flagged or not)."""
        now = time.time()

        async def op(conn: Connection) -> None:
            await conn.execute(
                "INSERT INTO rater_reviews (rater, state, reasons, reviewer, updated_at) VALUES (?, ?, '[]', ?, ?)"
                " ON CONFLICT (rater) DO UPDATE SET state = excluded.state, reviewer = excluded.reviewer,"
                " updated_at = excluded.updated_at",
                (rater, state, reviewer, now),
            )
            await write_audit(conn, reviewer, f"rater:{state}", rater, {})

        await self._db.write(op)

    async def reviews(self) -> list[dict[str, Any]]:
        """Every flagged or reviewed rater with their reasons and number of ratings, latest first."""
        found = await self._db.read(
            "SELECT r.rater, r.state, r.reasons, r.reviewer, r.updated_at,"
            " (SELECT COUNT(*) FROM ratings x WHERE x.rater = r.rater) AS n_ratings"
            " FROM rater_reviews r ORDER BY r.updated_at DESC"
        )
        return [{**dict(r), "reasons": json.loads(r["reasons"])} for r in found]
