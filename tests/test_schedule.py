"""The training job's scheduling policy, explicit and observed (scenario 19 of docs/reliability.md)."""

from __future__ import annotations

import asyncio
import time

from training.schedule import TRAINING_JOB_ID, start_scheduler


async def test_the_job_policy_is_explicit() -> None:
    async def job() -> None:
        return None

    scheduler = start_scheduler(job, interval_s=3600)
    try:
        j = scheduler.get_job(TRAINING_JOB_ID)
        assert (j.max_instances, j.coalesce, j.misfire_grace_time) == (1, True, None)
    finally:
        scheduler.shutdown(wait=False)


async def test_runs_never_overlap_and_a_stalled_loop_catches_up_once() -> None:
    """A run longer than the interval skips the runs it covers; after a stall the missed runs are one run."""
    starts: list[float] = []
    running = 0
    most = 0

    async def job() -> None:
        nonlocal running, most
        starts.append(time.monotonic())
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.5 if len(starts) == 1 else 0)  # the first run outlasts five intervals
        running -= 1

    scheduler = start_scheduler(job, interval_s=0.1)
    try:
        while len(starts) < 3:
            await asyncio.sleep(0.02)
        assert most == 1  # the runs during the long one were skipped, not stacked
        time.sleep(1.0)  # noqa: ASYNC251 (on purpose:) the event loop stalls for ten intervals (a blocking call, a paused VM)
        stalled = time.monotonic()
        await asyncio.sleep(0.05)  # less than one interval
        # coalesce: one catch-up run, not ten (a second may be the next regular one on a slow machine)
        assert len([s for s in starts if s >= stalled]) <= 2
    finally:
        scheduler.shutdown(wait=False)
