"""Where training runs: the device rule (pure), and one real run through `accelerate launch` on CPU.

The GPU path is the same code with ``use_cpu`` off (and bf16 where the GPU has it); no GPU is
here, so the rule is tested as a function and the launcher end to end on CPU.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from feedback import FeedbackStore
from tests.test_release_faults import config, seed, wait_for_job
from training.config import device_args, job_command
from training.cycle import CycleStatus, TrainingCycle


def test_the_device_rule() -> None:
    assert device_args("auto", cuda_available=False, bf16_supported=False) == {
        "use_cpu": True, "bf16": False, "fp16": False, "device": "cpu"
    }  # fmt: skip
    gpu = device_args("auto", cuda_available=True, bf16_supported=True)
    assert gpu["use_cpu"] is False and gpu["bf16"] is True and gpu["device"] == "cuda"
    assert device_args("auto", cuda_available=True, bf16_supported=False)["bf16"] is False  # e.g. a T4: float32
    assert device_args("cpu", cuda_available=True, bf16_supported=True)["use_cpu"] is True
    with pytest.raises(ValueError, match="no CUDA"):
        device_args("cuda", cuda_available=False, bf16_supported=False)


def test_the_job_command() -> None:
    assert job_command("py", "s.json", accelerate_config=None) == ["py", "-m", "training.train", "s.json"]
    launched = job_command("py", "s.json", accelerate_config="acc.yaml")
    assert launched[:5] == ["py", "-m", "accelerate.commands.launch", "--config_file", "acc.yaml"]
    assert launched[5:] == ["-m", "training.train", "s.json"]
    assert job_command("py", "s.json", accelerate_config=None, nice=19)[:3] == ["nice", "-n", "19"]


def thread_nices(pid: int) -> set[int]:
    """The niceness of every thread of process ``pid`` (field 19 of /proc/PID/task/TID/stat)."""
    nices = set()
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            after_name = stat.read_text().rsplit(")", 1)[1].split()  # fields 3 onwards
        except OSError:  # the thread ended
            continue
        nices.add(int(after_name[16]))
    return nices


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the job's threads from /proc")
async def test_the_job_runs_at_training_nice_with_training_threads(tiny_model: Path, tmp_path: Path) -> None:
    """training.nice and training.threads reach the real job: every one of its threads runs that much
    nicer than this process while it trains, and it reports the torch threads it trained with."""
    own = os.getpriority(os.PRIO_PROCESS, 0)
    async with await FeedbackStore.open(tmp_path / "db.sqlite") as store:
        await seed(store)
        # steps until the 3 s budget is spent: the job is still training when its threads are read
        cycle = TrainingCycle(
            store, config(tiny_model, tmp_path, nice=7, threads=1, max_steps=100_000, max_minutes=0.05)
        )
        run = asyncio.create_task(cycle.run())
        await wait_for_job(cycle, store)
        assert cycle.job_pid is not None
        nices = thread_nices(cycle.job_pid)
        result = await run
        assert result.version is not None, result.reason
        budget = (await store.versions.get(result.version)).eval_report["budget"]  # type: ignore[index]
    assert nices == {min(own + 7, 19)}
    assert budget["nice"] == min(own + 7, 19) and budget["threads"] == 1


async def test_a_run_under_accelerate_launch_on_cpu(tiny_model: Path, tmp_path: Path) -> None:
    accelerate = tmp_path / "accelerate.yaml"
    accelerate.write_text(
        json.dumps(  # YAML is a superset of JSON: accelerate reads this as its config file
            {
                "compute_environment": "LOCAL_MACHINE",
                "distributed_type": "NO",
                "num_processes": 1,
                "num_machines": 1,
                "machine_rank": 0,
                "mixed_precision": "no",
                "use_cpu": True,
            }
        )
    )
    async with await FeedbackStore.open(tmp_path / "db.sqlite") as store:
        await seed(store)
        cycle = TrainingCycle(store, config(tiny_model, tmp_path, accelerate_config=str(accelerate)))
        result = await cycle.run()
        assert result.status in (CycleStatus.PROMOTED, CycleStatus.REJECTED), result.reason  # it trained
        run = (await store.runs.recent())[0]
        assert run.progress and run.progress.get("step"), run.progress
        assert result.version == "v1" and (await store.versions.get("v1")).eval_report is not None
