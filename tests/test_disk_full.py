"""Scenario 8 on a real full filesystem: a tiny tmpfs mounted for the data folder (root only).

``tests/test_reliability.py`` fills the database with ``PRAGMA max_page_count``; here the disk
itself is full, as an operator's would be: the training job's adapter save hits ENOSPC, and the
store's writes hit SQLITE_FULL through the gateway.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from feedback import FeedbackStore, RunState
from server.app import App
from server.settings import load_settings
from tests.test_release_faults import config, seed
from training.cycle import CycleStatus, TrainingCycle
from training.validate import ADAPTER_FILE, sha256_file

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root (CI runs as root)")


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A fresh tmpfs of ``size`` mounted on ``path`` for the block."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def fill(folder: Path, *, leave: int) -> Path:
    """Write a filler file that leaves about ``leave`` bytes free on ``folder``'s filesystem."""
    filler = folder / "filler"
    with open(filler, "ab") as f:
        f.write(b"\0" * max(0, free_bytes(folder) - leave))
    return filler


async def test_a_training_run_that_hits_enospc_publishes_nothing(tiny_model: Path, tmp_path: Path) -> None:
    """The adapter save finds the disk full: no version, the run failed with a storage reason,
    live (v1) untouched, nothing left behind; once space is freed the next run publishes."""
    with tmpfs(tmp_path / "data", "8m") as data:
        async with await FeedbackStore.open(tmp_path / "db.sqlite") as store:
            await seed(store)
            first = await TrainingCycle(store, config(tiny_model, data)).run()
            assert first.status is CycleStatus.PROMOTED and first.version == "v1", first.reason
            v1 = await store.versions.get("v1")
            v1_weights = Path(v1.adapter_path or "") / ADAPTER_FILE
            await seed(store)  # new feedback: the next run trains

            # room for the run's rows and spec, not for its adapter
            filler = fill(data, leave=v1_weights.stat().st_size // 2)
            result = await TrainingCycle(store, config(tiny_model, data)).run()
            assert result.status is CycleStatus.FAILED
            assert result.reason.startswith("storage_full:") and "no space left" in result.reason, result.reason
            run = (await store.runs.recent())[0]
            assert run.state is RunState.FAILED and (run.detail or "").startswith("storage_full:")
            assert [v.name for v in await store.versions.all()] == ["base", "v1"]  # nothing published
            assert (await store.versions.live()).name == "v1" and sha256_file(v1_weights) == v1.sha256
            assert sorted(p.name for p in (data / "adapters").iterdir()) == ["v1"]
            assert not list((data / "runs").rglob(ADAPTER_FILE)) and not list((data / "runs").rglob("*.jsonl"))

            filler.unlink()  # space returns: the same data trains and publishes a candidate
            again = await TrainingCycle(store, config(tiny_model, data)).run()
            # the gate's verdict on a random tiny model is chance: the run and its version are the point
            assert again.status in (CycleStatus.PROMOTED, CycleStatus.REJECTED) and again.version == "v2"
            assert (await store.runs.recent())[0].state is RunState.SUCCEEDED
            v2 = await store.versions.get("v2")
            assert sha256_file(Path(v2.adapter_path or "") / ADAPTER_FILE) == v2.sha256


@pytest.mark.sqlite_only("the SQLite file on the full tmpfs (a PostgreSQL store's disk is the server's)")
async def test_ratings_on_a_full_filesystem_get_storage_full_never_a_false_ack_and_writes_resume(
    tiny_model: Path, tmp_path: Path, open_client: Any
) -> None:
    """The whole data folder (the store, its WAL) on a 2 MiB tmpfs that fills up under a live server."""
    with tmpfs(tmp_path / "data", "2m") as data:
        settings = load_settings(
            env={},
            data_dir=data,
            overrides={
                "console": {"enabled": False},
                "channels": {"enabled": False},
                "server": {"port": 0, "rate_per_s": 1000, "rate_burst": 1000, "ratings_per_minute": 10_000},
                "model": {"name": str(tiny_model), "max_new_tokens": 8, "dtype": "float32"},
                "schedule": {"enabled": False},
            },
        )
        app = App(settings)
        async with app.lifespan():
            assert app.store is not None and app.port is not None
            c = await open_client(app.port)
            await c.hello()
            done, _ = await c.chat("rate me", "m1")
            filler = fill(data, leave=0)
            comment = "€" * 1900  # 5,700 bytes: more than a page
            for n in range(1, 4):  # a few times: the error holds, the connection stays
                await c.send(type="rating", message_id=done["message_id"], value=1, id=f"r{n}", comment=comment)
                err = await c.recv()
                assert (err["type"], err["code"], err["id"]) == ("error", "storage_full", f"r{n}")  # no ack
            await c.send(type="message", text="€" * 3000, client_id="m2")
            err = await c.recv()
            assert (err["type"], err["code"]) == ("error", "storage_full")
            newcomer = await open_client(app.port)  # a new conversation cannot be stored: a typed error
            await newcomer.send(type="hello")
            assert (await newcomer.recv())["code"] == "storage_full"  # before the fix: close 1011
            assert not (await app.store.conversations.export_feedback()).ratings

            filler.unlink()  # space returns: the same server and connection take writes again
            for n in range(1, 4):
                await c.send(type="rating", message_id=done["message_id"], value=1, id=f"r{n}", comment=comment)
                assert await c.recv() == {"type": "ack", "id": f"r{n}"}
            # and keep taking them: 700 commits write about 6 MB of WAL pages through a 2 MiB disk
            for n in range(4, 700):
                await c.send(type="rating", message_id=done["message_id"], value=-1, id=f"r{n}")
                assert await c.recv() == {"type": "ack", "id": f"r{n}"}, n
            done2, _ = await c.chat("are you there?", "m3")
            assert done2["type"] == "done"
            await newcomer.hello()  # the same socket opens its conversation once there is room
            ratings = (await app.store.conversations.export_feedback()).ratings
            assert sorted(r.client_id for r in ratings) == sorted(f"r{n}" for n in range(1, 700))
