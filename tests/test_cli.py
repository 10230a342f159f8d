"""The operator CLI against a real store: takeover, exclude, raters, dataset preview and show."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from pathlib import Path
from typing import Any

from feedback import FeedbackStore, Role
from server.cli import main as cli_main
from tests.store_backends import stored_bytes


def run_cli(data_dir: Path, *argv: str) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli_main(["--data-dir", str(data_dir), *argv])
    return code, buf.getvalue()


async def cli(data_dir: Path, *argv: str) -> tuple[int, str]:
    return await asyncio.to_thread(run_cli, data_dir, *argv)


async def seed(db: Path) -> None:
    async with await FeedbackStore.open(db) as store:
        for i in range(6):
            cid = f"c{i}"
            await store.conversations.create(cid, user_id=f"user{i}")
            await store.conversations.add_message(
                message_id=f"u{i}",
                conversation_id=cid,
                role=Role.USER,
                text=f"Where is order {i}? Mail me at user{i}@example.com",
                parent_id=None,
            )
            await store.conversations.add_message(
                message_id=f"a{i}", conversation_id=cid, role=Role.ASSISTANT, text=f"No idea {i}", parent_id=f"u{i}"
            )
            await store.conversations.add_rating(
                message_id=f"a{i}", value=-1, rater=f"user{i}", client_id="r", reason="wrong", comment="useless"
            )


async def test_operator_commands_shape_the_next_dataset(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    await seed(data_dir / "learnloop.db")
    code, out = await cli(data_dir, "takeover", "c0", "Your order ships tomorrow; tracking is on the Orders page.")
    assert code == 0 and "demonstration" in out
    assert (await cli(data_dir, "correct", "a1", "Order 1 arrives on Friday."))[0] == 0
    assert (await cli(data_dir, "exclude", "a2", "--reason", "rude customer"))[0] == 0

    code, out = await cli(data_dir, "dataset", "preview", "--rows")
    preview: dict[str, Any] = json.loads(out)
    assert preview["by_signal"]["takeover"] == 1 and preview["by_signal"]["correction"] == 2  # DPO pair + SFT demo
    assert preview["by_signal"]["thumbs (kto)"] == 5  # a2 excluded
    assert preview["trust"]["removed"]["excluded by an operator"] == 1
    assert preview["cleaning"]["redactions"]["EMAIL"] >= 5
    text = json.dumps(preview["train_rows"])
    assert "@example.com" not in text and "[EMAIL]" in text

    code, out = await cli(data_dir, "exclude", "a2", "--undo")
    assert json.loads((await cli(data_dir, "dataset", "preview"))[1])["by_signal"]["thumbs (kto)"] == 6

    code, out = await cli(data_dir, "raters")
    assert code == 0 and "rater" in out
    assert (await cli(data_dir, "raters", "reject", "user3"))[0] == 0
    preview = json.loads((await cli(data_dir, "dataset", "preview"))[1])
    assert preview["held_raters"] == {"user3": 1}


async def test_dataset_show_prints_lineage(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    await seed(data_dir / "learnloop.db")
    async with await FeedbackStore.open(data_dir / "learnloop.db") as store:
        await store.conversations.add_correction(message_id="a1", text="Order 1 arrives on Friday.", operator="op")
        await store.versions.register(
            adapter_path="/x",
            sha256="0",
            parent="base",
            base_model="m",
            eval_report={"dataset_id": "abc123", "counts": {"train_dpo": 1}},
            feedback_ids={"messages": ["a1"], "ratings": [], "corrections": [1]},
            training_run_id=None,
        )
    _code, out = await cli(data_dir, "dataset", "show", "v1", "--rows")
    lineage = json.loads(out)
    assert lineage["dataset_id"] == "abc123" and lineage["trained_on"]["corrections"] == 1
    assert [r["chosen"][0]["content"] for r in lineage["rows_still_in_store"] if "chosen" in r] == [
        "Order 1 arrives on Friday."
    ]


def test_operator_accounts_from_the_command_line(tmp_path: Path, monkeypatch: Any) -> None:
    data = tmp_path / "data"
    monkeypatch.setattr("sys.stdin", io.StringIO("a-long-password\n"))
    assert run_cli(data, "operator", "add", "alice", "--role", "admin", "--password-stdin")[0] == 0
    code, token = run_cli(data, "operator", "token", "alice", "--label", "ci")
    assert code == 0 and token.strip().startswith("ll_")
    assert run_cli(data, "operator", "set", "alice", "--role", "viewer")[0] == 0
    code, out = run_cli(data, "operator", "list")
    assert out.split() == ["alice", "viewer"]
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert run_cli(data, "operator", "add", "bob", "--password-stdin")[0] != 0  # too short: a clear error

    async def check() -> None:
        async with await FeedbackStore.open(data / "learnloop.db") as store:
            operator = await store.accounts.operator_for_token(token.strip())
            assert operator is not None and operator.name == "alice"
            assert await store.accounts.check_login("alice", "a-long-password") is not None
            await store.accounts.set_operator("alice", actor="t", disabled=True)
            assert await store.accounts.operator_for_token(token.strip()) is None
            assert await store.accounts.check_login("alice", "a-long-password") is None

    asyncio.run(check())


def test_api_keys_from_the_command_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    code, first = run_cli(data, "apikey", "create", "shop")
    assert code == 0 and first.strip().startswith("llk-")
    second = run_cli(data, "apikey", "create", "shop")[1].strip()  # a second key of the name: for rotation
    assert run_cli(data, "apikey", "create", "Not A Name")[0] != 0
    assert run_cli(data, "apikey", "list")[1].split() == ["shop", "2", "key(s)"]

    async def names(*keys: str) -> list[str | None]:
        async with await FeedbackStore.open(data / "learnloop.db") as store:
            db_text = stored_bytes(data / "learnloop.db")
            assert all(k.encode() not in db_text for k in keys)  # hashes only
            return [await store.api_keys.name_for(k) for k in keys]

    assert asyncio.run(names(first.strip(), second)) == ["shop", "shop"]
    assert run_cli(data, "apikey", "revoke", "shop") == (0, "2 key(s) of shop revoked\n")
    assert asyncio.run(names(first.strip(), second)) == [None, None]
    assert run_cli(data, "apikey", "revoke", "shop")[0] != 0
