"""The scheduled training job (APScheduler, inside the server's event loop).

The job only decides and waits: the heavy work runs in the training subprocess, so the
event loop keeps serving while a run trains.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

log = logging.getLogger("learnloop.schedule")

TRAINING_JOB_ID = "learnloop-training-cycle"


def start_scheduler(job: Callable[[], Awaitable[Any]], *, interval_s: float) -> AsyncIOScheduler:
    """Start a scheduler that calls ``job`` every ``interval_s`` seconds, never two at once.

    Call from inside the running event loop; stop with ``scheduler.shutdown(wait=False)``.
    """
    scheduler = AsyncIOScheduler()
    scheduler.add_job(
        job,
        IntervalTrigger(seconds=interval_s),
        id=TRAINING_JOB_ID,
        max_instances=1,
        coalesce=True,
        misfire_grace_time=None,
    )
    scheduler.start()
    log.info("training cycle scheduled every %.0f s", interval_s)
    return scheduler
