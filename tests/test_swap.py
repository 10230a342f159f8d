"""Hot swap under load (issue 15, scenario 17): the real App over loopback websockets, with real
PEFT adapters promoted and rolled back through the console's API (``tests/swap_load.py``).
``bench/swap.py`` runs the same scenario at the issue's size (500 sessions)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from feedback import FeedbackStore, VersionState
from server.app import App
from tests.factories import register_candidate
from tests.swap_load import run_swap, swap_settings
from tests.test_engine import make_adapter

MAX_ACTIVE = 16


@pytest.mark.slow
async def test_hot_swap_under_load_every_reply_whole_on_one_version(tiny_model: Path, tmp_path: Path) -> None:
    run = await run_swap(tiny_model, tmp_path, sessions=100, swaps=10, max_active=MAX_ACTIVE)
    print("\nhot swap under load:", run.figures())
    assert not run.connection_errors
    assert run.overloaded == 0  # max_pending is above the sessions: every reply queues
    assert len(run.swaps) == 10 and len(run.accepted) >= 100 + 10 * (100 // 3)
    # every reply ends with done and a normal finish reason; nothing failed or cut short
    assert run.failed() == []
    assert all(r.foreign_tokens == 0 for r in run.accepted)
    # one version per reply, the one it started on: its text is what that version writes (greedy)
    assert run.wrong_text() == []
    assert {r.version for r in run.accepted} == {"base", *(v for v, _, _ in run.swaps)}  # each version served
    # what the client saw is what the store holds: text, version, token count, finish reason
    assert run.not_as_stored() == []
    # v1..v8 left the loaded set (v9 and v10 are live and previous live after the rollback); each was
    # freed only once every reply on it had ended, by the engine's own count
    assert set(run.unloaded) == {v for v, _, _ in run.swaps[:-2]}
    assert run.late_unloads() == {}
    assert run.still_loaded == {"base", run.rollback_to, run.rollback_from}
    # the rollback routes new replies at once and reaches customers quickly, every session streaming;
    # bounds generous for 2 shared cores (the figures are printed; bench/swap.py records them)
    figures = run.figures()
    assert run.old_after_rollback() == []  # every reply asked for after the call is on the version rolled back to
    # ... and every reply queued then: only those the engine had taken up start on the version rolled back
    assert figures["started_on_old_after_rollback"] <= MAX_ACTIVE, figures
    assert figures["rollback_call_s"] < 10.0
    assert figures["rollback_first_token_s"] is not None and figures["rollback_first_token_s"] < 30.0


async def test_a_reply_takes_the_version_live_when_it_starts_not_when_its_turn_arrived(
    tiny_model: Path, tmp_path: Path, open_client: Any
) -> None:
    """A user turn waits for the store while another process promotes twice: the version the
    gateway would have picked on arrival is unloaded by then, and the reply must not fail."""
    s = swap_settings(tiny_model, tmp_path / "data", sessions=4, max_new_tokens=6, max_active=4)
    s = dataclasses.replace(s, schedule=dataclasses.replace(s.schedule, version_poll_s=3600.0))
    a = App(s)
    async with a.lifespan():
        assert a.store is not None and a.release is not None and a.engine is not None and a.port is not None
        names = [
            await register_candidate(
                a.store, make_adapter(tiny_model, tmp_path / f"a{i}", seed=20 + i), str(tiny_model)
            )
            for i in range(3)
        ]
        await a.release.promote(names[0], actor="test")
        c = await open_client(a.port)
        await c.hello()
        gate = asyncio.Event()

        async def hold(_: Any) -> None:
            await gate.wait()

        held = asyncio.create_task(a.store.db.write(hold, outside_transaction=True))  # the writer is busy
        await c.send(type="message", text="Where is my order?", client_id="m")
        await asyncio.sleep(0.3)  # the reply has begun: its user turn waits behind the held writer
        other = await FeedbackStore.open(s.db_path)  # another process (learnloop promote) on the same database
        try:
            for name in names[1:]:
                await other.versions.set_state(name, VersionState.LIVE, actor="other")
                await a.release.sync()  # what the version poller does
        finally:
            await other.close()
        assert not a.engine.has_version(names[0])  # neither live nor kept for a rollback: unloaded
        gate.set()
        await held
        await c.until("ack")
        done, _ = await c.until("done")
        assert done["model_version"] == names[2] and done["finish_reason"] in ("stop", "length")
