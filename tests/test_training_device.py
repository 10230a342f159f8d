"""Where training runs: the device rule (pure), and one real run through `accelerate launch` on CPU.

The GPU path is the same code with ``use_cpu`` off (and bf16 where the GPU has it); no GPU is
here, so the rule is tested as a function and the launcher end to end on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from feedback import FeedbackStore
from tests.test_release_faults import config, seed
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
