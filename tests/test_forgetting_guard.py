"""The forgetting guard inside a training run (training/forgetting.py, ``training.guard_every``):
the callback's rule on a real tiny PeftModel in milliseconds, then real jobs on the tiny model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from feedback import FeedbackStore
from tests.test_release_faults import ANSWER, config, seed
from training.config import TrainConfig
from training.cycle import CycleStatus, TrainingCycle
from training.forgetting import ForgettingGuard, ppl_limit


def peft_model(tiny_model: Path) -> Any:
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def nudge(model: Any, by: float) -> None:
    """A training step's stand-in: move every LoRA weight."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(by)


def test_the_guard_keeps_the_last_weights_under_the_limit(tiny_model: Path) -> None:
    model = peft_model(tiny_model)
    start = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    readings = iter([10.0, 10.4, 10.9, 11.5])  # base, then steps 2, 4 and 6
    guard = ForgettingGuard(2, 0.10, lambda m: next(readings))
    control = SimpleNamespace(should_training_stop=False)
    guard.on_train_begin(None, None, control, model=model)
    assert guard.base_ppl == 10.0 and guard.limit == pytest.approx(11.0) == ppl_limit(10.0, 0.10)
    kept: dict[str, torch.Tensor] = {}
    for step in range(1, 7):
        nudge(model, 0.01)
        guard.on_step_end(None, None, control, model=model)
        if step == 4:
            kept = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
        assert control.should_training_stop is (step == 6)  # 11.5 passes the limit at step 6
    guard.finish(model)
    now = get_peft_model_state_dict(model)
    assert all(torch.equal(now[k], kept[k]) for k in kept) and not torch.equal(
        now[next(iter(kept))], start[next(iter(kept))]
    )
    assert guard.report() == {
        "every": 2,
        "base_ppl": 10.0,
        "limit": 11.0,
        "checks": [[2, 10.4], [4, 10.9], [6, 11.5]],
        "stopped_at_step": 6,
        "kept_step": 4,
    }
    assert model.training  # measuring left the model as it found it (training)


def test_steps_after_the_last_check_are_checked_at_the_end_and_a_run_under_the_limit_is_untouched(
    tiny_model: Path,
) -> None:
    model = peft_model(tiny_model)
    readings = iter([10.0, 10.5, 12.0])  # base, step 4, then the end (step 5): over the limit
    guard = ForgettingGuard(4, 0.10, lambda m: next(readings))
    control = SimpleNamespace(should_training_stop=False)
    guard.on_train_begin(None, None, control, model=model)
    for _ in range(5):
        nudge(model, 0.01)
        guard.on_step_end(None, None, control, model=model)
    at_4 = {k: v - 0.01 for k, v in get_peft_model_state_dict(model).items()}
    guard.finish(model)
    now = get_peft_model_state_dict(model)
    assert all(torch.allclose(now[k], at_4[k]) for k in at_4) and guard.report()["stopped_at_step"] == 5
    # a run that stays under the limit keeps its last weights, checked or not
    model = peft_model(tiny_model)
    calm = ForgettingGuard(4, 0.10, lambda m: 10.0)
    calm.on_train_begin(None, None, control, model=model)
    for _ in range(5):
        nudge(model, 0.01)
        calm.on_step_end(None, None, control, model=model)
    last = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    calm.finish(model)
    assert all(torch.equal(get_peft_model_state_dict(model)[k], last[k]) for k in last)
    assert calm.report()["checks"] == [[4, 10.0], [5, 10.0]] and calm.report()["kept_step"] is None
    with pytest.raises(ValueError, match="every >= 1"):
        ForgettingGuard(0, 0.1, lambda m: 1.0)


def _adapter(result: Any, store_version: Any) -> dict[str, torch.Tensor]:
    return load_file(str(Path(store_version.adapter_path) / "adapter_model.safetensors"))


async def test_a_job_under_the_limit_trains_the_same_adapter_with_the_guard_on(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Measuring draws no random number and runs no dropout: a run the guard never stops ends on
    the very weights it ends on without the guard."""
    adapters = []
    for guard_every in (0, 3):
        folder = tmp_path / f"guard{guard_every}"
        async with await FeedbackStore.open(folder / "db.sqlite") as store:
            await seed(store, n=6, answers=(ANSWER, "Standard shipping takes 3 to 5 business days."))
            cfg = config(tiny_model, folder, guard_every=guard_every)
            cfg = dataclasses.replace(cfg, gate=dataclasses.replace(cfg.gate, max_generic_ppl_increase=1e9))
            result = await TrainingCycle(store, cfg).run(force=True)
            assert result.status in (CycleStatus.PROMOTED, CycleStatus.REJECTED), result.reason
            version = await store.versions.get(result.version or "")
            adapters.append(_adapter(result, version))
            meta = json.loads((Path(version.adapter_path or "") / "learnloop.json").read_text())
            guard = meta["budget"].get("guard")
            if guard_every:
                assert [c[0] for c in guard["checks"]] == [3, 6, 9, 10] and guard["stopped_at_step"] is None
            else:
                assert guard is None
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


async def test_a_job_that_would_forget_stops_and_keeps_what_passed(tiny_model: Path, tmp_path: Path) -> None:
    """A limit below the base model's own perplexity: the first check fails, the run stops there,
    every later stage is skipped, and the adapter is its starting weights (a fresh LoRA: the base
    model), which the gate then judges as any candidate."""
    async with await FeedbackStore.open(tmp_path / "db.sqlite") as store:
        await seed(store, n=6)
        cfg = config(tiny_model, tmp_path, guard_every=2, demo_epochs=1.0)
        cfg = dataclasses.replace(cfg, gate=dataclasses.replace(cfg.gate, max_generic_ppl_increase=-0.5))
        result = await TrainingCycle(store, cfg).run(force=True)
        assert result.status is CycleStatus.REJECTED, result.reason
        version = await store.versions.get(result.version or "")
        meta = json.loads((Path(version.adapter_path or "") / "learnloop.json").read_text())
        guard, stages = meta["budget"]["guard"], meta["budget"]["stages"]
        assert guard["stopped_at_step"] == 2 and guard["kept_step"] == 0 and len(guard["checks"]) == 1
        assert stages[0]["steps"] == 2 and all(s["steps"] == 0 for s in stages[1:])  # a later stage: skipped
        assert meta["budget"]["stopped_by_budget"] is False
        lora_b = [t for k, t in _adapter(result, version).items() if "lora_B" in k]
        assert lora_b and all(not t.any() for t in lora_b)  # a fresh LoRA's B is zero: nothing learned is kept
        report = version.eval_report or {}
        assert report["candidate"]["generic_ppl"] == pytest.approx(report["base_generic_ppl"])


def test_the_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="guard_every"):
        TrainConfig(guard_every=-1)
