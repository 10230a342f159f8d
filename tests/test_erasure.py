"""Erasure: the user's words leave the database file and its WAL, and stay out of every dataset."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from feedback import FeedbackStore, Role, subject_hash
from tests.store_backends import StoreTarget
from tests.test_cli import run_cli
from training.config import CycleConfig
from training.cycle import prepare

SECRET = "ZEBRA-QUOKKA-7731 my card is in the drawer"
COMMENT = "PLATYPUS-COMMENT-4410"
FIX = "OPERATOR-FIX-FOR-EVE-9921"


async def seed(store: FeedbackStore) -> dict[str, list]:
    ids: dict[str, list] = {"messages": [], "ratings": [], "corrections": []}
    for who in ("eve", "bob", "carol", "dan", "erin", "frank"):
        for k in range(2):
            cid = f"{who}-{k}"
            await store.conversations.create(cid, user_id=who)
            text = f"{SECRET} ({k})" if who == "eve" else f"{who} asks about refunds {k}"
            u = await store.conversations.add_message(
                message_id=f"{cid}-u", conversation_id=cid, role=Role.USER, text=text, parent_id=None
            )
            a = await store.conversations.add_message(
                message_id=f"{cid}-a",
                conversation_id=cid,
                role=Role.ASSISTANT,
                text=f"reply to {who} {k}",
                parent_id=u.id,
            )
            r, _ = await store.conversations.add_rating(
                message_id=a.id, value=-1, rater=who, client_id="r", comment=COMMENT if who == "eve" else None
            )
            c = await store.conversations.add_correction(
                message_id=a.id, text=FIX if who == "eve" else f"fix {who} {k}", operator="op"
            )
            if who == "eve":
                ids["messages"] += [u.id, a.id]
                ids["ratings"].append(r.id)
                ids["corrections"].append(c.id)
    # eve also rated bob's reply from her own identity
    r, _ = await store.conversations.add_rating(message_id="bob-0-a", value=1, rater="eve", client_id="eve-on-bob")
    ids["ratings"].append(r.id)
    return ids


async def register_trained_on_eve(store: FeedbackStore, ids: dict[str, list]) -> None:
    """Version v1, trained on eve's messages (the erasure names it)."""
    await store.versions.register(
        adapter_path="/x",
        sha256="0",
        parent="base",
        base_model="m",
        eval_report={},
        feedback_ids={"messages": ids["messages"], "ratings": [], "corrections": []},
        training_run_id=None,
    )


async def erase_eve(data_dir: Path) -> dict[str, Any]:
    """``learnloop erase --user eve`` through the CLI: its JSON summary."""
    code, out = await asyncio.to_thread(run_cli, data_dir, "erase", "--user", "eve")
    assert code == 0
    return dict(json.loads(out.split("\nthese model versions")[0]))


def raw_bytes(db: Path) -> bytes:
    data = db.read_bytes()
    wal = db.with_name(db.name + "-wal")
    return data + (wal.read_bytes() if wal.exists() else b"")


@pytest.mark.sqlite_only(
    "the SQLite file's and its WAL's bytes (PostgreSQL's: test_erase_on_postgresql_leaves_no_row_tuple_or_index_entry)"
)
async def test_erase_removes_every_byte_and_keeps_them_out(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    db = data_dir / "learnloop.db"
    async with await FeedbackStore.open(db) as store:
        ids = await seed(store)
        await register_trained_on_eve(store, ids)
        await store.versions.register(
            adapter_path="/y",
            sha256="0",
            parent="base",
            base_model="m",
            eval_report={},
            feedback_ids={"messages": ["bob-0-u"], "ratings": [], "corrections": []},
            training_run_id=None,
        )
        assert SECRET.encode() in raw_bytes(db)
        shutil.copy(db, tmp_path / "backup.db")  # an older backup, taken while eve's data was there
        shutil.copy(db.with_name("learnloop.db-wal"), tmp_path / "backup.db-wal")

    result = await erase_eve(data_dir)
    assert result["versions_trained_on_them"] == ["v1"]
    assert (result["conversations"], result["messages"], result["corrections"]) == (2, 4, 2)
    assert result["ratings"] == 3

    raw = raw_bytes(db)
    for needle in (SECRET, "ZEBRA-QUOKKA", COMMENT, FIX, "eve-on-bob"):
        assert needle.encode() not in raw, needle
    # nor in the full-text search index, which holds lower-cased terms
    assert b"zebra" not in raw.lower() and b"quokka" not in raw.lower()
    assert b"eve" not in db.with_name("learnloop.db.erasures").read_bytes()  # tombstones hold hashes only

    async with await FeedbackStore.open(db) as store:
        snapshot = await store.conversations.export_feedback()
        assert subject_hash("eve") in snapshot.erased_subjects
        prepared = prepare(snapshot, CycleConfig(base_model="m", data_dir=data_dir))
        rows = json.dumps([r.to_trl() for r in (*prepared.data.dpo, *prepared.data.kto, *prepared.data.sft)])
        assert "ZEBRA" not in rows and FIX not in rows and "bob asks" in rows
        assert all(r.rater != "eve" for r in snapshot.ratings)

    # restore the older backup: opening it beside the tombstone file erases eve again
    shutil.copy(tmp_path / "backup.db", db)
    shutil.copy(tmp_path / "backup.db-wal", db.with_name("learnloop.db-wal"))
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM conversations WHERE user_id = 'eve'").fetchone()[0] == 2
    async with await FeedbackStore.open(db) as store:
        snapshot = await store.conversations.export_feedback()
        assert all("ZEBRA" not in m.text for m in snapshot.messages)
        assert all(r.rater != "eve" for r in snapshot.ratings)
    assert SECRET.encode() not in raw_bytes(db)


PAGE_NEEDLES = (b"ZEBRA", b"zebra", b"PLATYPUS", b"OPERATOR-FIX-FOR-EVE")


def pages_holding(target: StoreTarget, relation: str) -> int:
    """How many of ``relation``'s pages (as PostgreSQL's buffers hold them) contain an erased needle."""
    pages = target.sql(f"SELECT pg_relation_size('{relation}') / 8192")[0][0]
    found = 0
    for page in range(pages):
        [(raw,)] = target.sql(f"SELECT public.get_raw_page('{relation}', {page})")
        found += any(needle in bytes(raw) for needle in PAGE_NEEDLES)
    return found


def tuples_holding(target: StoreTarget, table: str) -> int:
    """Live or dead tuples of ``table`` whose bytes contain an erased needle (pageinspect)."""
    pages = target.sql(f"SELECT pg_relation_size('{table}') / 8192")[0][0]
    total = 0
    for page in range(pages):
        rows = target.sql(f"SELECT t_data FROM public.heap_page_items(public.get_raw_page('{table}', {page}))")
        total += sum(1 for (data,) in rows if data is not None and any(n in bytes(data) for n in PAGE_NEEDLES))
    return total


async def test_erase_on_postgresql_leaves_no_row_tuple_or_index_entry(
    postgres_target: StoreTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL (store.url): the CLI erases through the setting; afterwards no query, no tuple (live
    or dead) and no index page holds the user's words, and the tombstone file erases them again when
    they come back (a restored backup). What PostgreSQL does not promise (the freed space of a heap
    page, the WAL) is in docs/architecture.md, "The store"; the heap pages are measured, not asserted."""
    target = postgres_target
    target.sql("CREATE EXTENSION IF NOT EXISTS pageinspect SCHEMA public")
    async with await target.open() as store:
        for i in range(300):  # other customers around eve's rows, on the same and other pages
            await store.conversations.create(f"o{i}", user_id=f"other{i}")
            await store.conversations.add_message(
                message_id=f"o{i}-u",
                conversation_id=f"o{i}",
                role=Role.USER,
                text=f"question {i} " * 20,
                parent_id=None,
            )
        ids = await seed(store)
        await register_trained_on_eve(store, ids)
    assert target.sql("SELECT COUNT(*) FROM messages WHERE text LIKE 'ZEBRA%%'") == [(2,)]
    assert tuples_holding(target, "messages") == 2 and pages_holding(target, "messages_search") >= 1

    data_dir = target.tombstones.parent
    monkeypatch.setenv("LEARNLOOP_STORE_URL", str(target.target))

    result = await erase_eve(data_dir)
    assert result["versions_trained_on_them"] == ["v1"]
    assert (result["conversations"], result["messages"], result["corrections"], result["ratings"]) == (2, 4, 2, 3)

    tables = [r[0] for r in target.sql("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")]
    assert "messages" in tables and "audit_log" in tables
    for table in tables:  # every column of every row, as text
        for needle in (SECRET, "ZEBRA", COMMENT, FIX, "eve-on-bob"):
            hits = target.sql(f"SELECT COUNT(*) FROM {table} t WHERE t::text LIKE %s", (f"%{needle}%",))
            assert hits == [(0,)], (table, needle)
    assert target.sql("SELECT COUNT(*) FROM messages WHERE to_tsvector('simple', text) @@ 'zebra'::tsquery") == [(0,)]
    for table in ("messages", "ratings", "corrections"):  # VACUUM removed the dead tuples
        assert tuples_holding(target, table) == 0, table
    for index in ("messages_search", "messages_pkey", "ratings_message", "corrections_message"):
        assert pages_holding(target, index) == 0, index  # the search index was rebuilt, the others vacuumed
    print(f"messages heap pages still holding erased bytes in their free space: {pages_holding(target, 'messages')}")
    assert b"eve" not in target.tombstones.read_bytes()  # hashes only

    # eve's rows come back (a restored older backup): opening the store erases them again
    async with await target.open() as store:
        await store.conversations.create("eve-back", user_id="eve")
        await store.conversations.add_message(
            message_id="eve-back-u", conversation_id="eve-back", role=Role.USER, text=SECRET, parent_id=None
        )
    async with await target.open() as store:
        snapshot = await store.conversations.export_feedback()
        assert all("ZEBRA" not in m.text for m in snapshot.messages)
        assert await store.conversations.messages("eve-back") == []
