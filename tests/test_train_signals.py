"""Every signal trains, with the others present: real ``trainer.train()`` runs of the training job
(``training.train.run``, in process) on the tiny random Llama, and the step arithmetic
(``training.steps``), pure, in milliseconds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from training.config import JobSpec, TrainConfig
from training.steps import (
    StageReport,
    budget_report,
    demo_prompt_completion,
    epochs_done,
    extra_demos,
    plan_steps,
    share_seen,
)

REFUND_Q = "What is your refund policy?"
REFUND_A = "Refunds are accepted within 30 days of delivery."
ORDER_Q = "Where is my order?"
ORDER_A = "You can track your order from the Orders page of your account."  # the takeover reply
SHIP_Q = "How long does shipping take?"
SHIP_A = "Shipping takes 3 to 5 business days and costs 4.99."


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def pair(q: str, chosen: str, rejected: str) -> dict[str, Any]:
    return {
        "prompt": user(q),
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def demo(q: str, a: str) -> dict[str, Any]:
    return {"messages": [*user(q), {"role": "assistant", "content": a}]}


def thumb(q: str, a: str, label: bool) -> dict[str, Any]:
    return {"prompt": user(q), "completion": [{"role": "assistant", "content": a}], "label": label}


PAIRS = [pair(REFUND_Q, REFUND_A, "no idea"), pair(SHIP_Q, SHIP_A, "Hello! How can I help you today?")] * 2
THUMBS = [thumb(REFUND_Q, REFUND_A, True), thumb(SHIP_Q, "no idea at all", False)] * 2


# -- the step arithmetic, pure ---------------------------------------------------------------


def test_steps_follow_the_data_or_the_fixed_count() -> None:
    assert plan_steps(200, 2, epochs=1.0, max_steps=1000) == 100
    assert plan_steps(2000, 2, epochs=1.0, max_steps=1000) == 1000
    assert plan_steps(5, 2, epochs=2.0, max_steps=60) == 5  # ceil(10 / 2)
    assert plan_steps(1, 4, epochs=0.1, max_steps=60) == 1  # at least one step
    assert plan_steps(200, 2, epochs=0.0, max_steps=60) == 60  # epochs 0: exactly max_steps
    assert plan_steps(5000, 2, epochs=1.0, max_steps=1000) == 1000  # max_steps caps a pass
    assert plan_steps(0, 2, epochs=1.0, max_steps=60) == 0


def test_epochs_and_share_seen() -> None:
    assert epochs_done(60, 2, 200) == 0.6 and share_seen(60, 2, 200) == 0.6
    assert epochs_done(60, 2, 2000) == 0.06
    assert epochs_done(100, 2, 50) == 4.0 and share_seen(100, 2, 50) == 1.0
    assert share_seen(3, 2, 0) == 0.0


def test_budget_report_records_a_cut_stage() -> None:
    stages = [StageReport("dpo", 200, 2, 100, 40), StageReport("sft", 10, 2, 5, 5)]
    report = budget_report(stages, max_minutes=30.0, epochs=1.0, seconds=12.34)
    assert report["stopped_by_budget"] and report["steps"] == 45 and report["train_seconds"] == 12.3
    assert report["share_seen"] == round((80 + 10) / 210, 3)
    assert report["stages"][0] == {
        "trainer": "dpo",
        "rows": 200,
        "batch_size": 2,
        "planned_steps": 100,
        "steps": 40,
        "epochs": 0.4,
        "share_seen": 0.4,
    }
    whole = budget_report([StageReport("sft", 4, 2, 2, 2)], max_minutes=1.0, epochs=0.0, seconds=1.0)
    assert not whole["stopped_by_budget"] and whole["share_seen"] == 1.0


def test_demos_the_pairs_teach_are_left_out() -> None:
    correction = demo(REFUND_Q, REFUND_A + " ")  # the pair's chosen answer, as the cycle writes both
    near = demo(REFUND_Q.lower(), REFUND_A.upper())  # a near-duplicate, as training.clean compares them
    takeover = demo(ORDER_Q, ORDER_A)
    system = {"role": "system", "content": "You are the shop's assistant."}
    later_turn = {"messages": [system, *user("hi"), *user(ORDER_Q), {"role": "assistant", "content": REFUND_A}]}
    assert extra_demos([correction, near, takeover, later_turn], PAIRS, sft_weight=1.0) == [takeover, later_turn]
    # without DPO's SFT term nothing trains the corrections' text: their demos stay
    assert extra_demos([correction, takeover], PAIRS, sft_weight=0.0) == [correction, takeover]
    assert demo_prompt_completion(takeover) == {
        "prompt": user(ORDER_Q),
        "completion": [{"role": "assistant", "content": ORDER_A}],
    }


def test_settings_are_checked() -> None:
    for bad in ({"epochs": -1.0}, {"demo_epochs": -0.5}, {"max_minutes": 0.0}):
        with pytest.raises(ValueError):
            TrainConfig(**bad)  # type: ignore[arg-type]


# -- real runs on the tiny model ---------------------------------------------------------------


def run_job(tiny_model: Path, run_dir: Path, rows: dict[str, list[dict[str, Any]]], **train: Any) -> dict[str, Any]:
    """Write the rows and a spec, run the job in this process, return its learnloop.json."""
    from training import train as job

    run_dir.mkdir(parents=True)
    for name in ("dpo", "kto", "sft", "kept"):
        with open(run_dir / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows.get(name, []))
    (run_dir / "heldout.jsonl").write_text(json.dumps(pair(SHIP_Q, SHIP_A, "no idea")) + "\n")
    cfg = TrainConfig(
        **{
            "max_steps": 6,
            "epochs": 0.0,  # exactly max_steps steps unless a test asks for passes
            "learning_rate": 5e-3,
            "replay_pairs": 0,
            "contrast_pick": "hash",
            "lora_r": 4,
            "lora_alpha": 8,
            "max_length": 64,
            **train,
        }
    )
    spec = JobSpec(base_model=str(tiny_model), train=cfg, run_dir=run_dir, dataset_id="test", kto_weights=(1.0, 1.0))
    job.run(spec)
    meta: dict[str, Any] = json.loads((spec.output_dir / "learnloop.json").read_text())
    return meta


def nll(tiny_model: Path, adapter: Path | None, q: str, a: str) -> float:
    """Mean negative log-likelihood per token of ``a`` answering ``q``, under the base model or an adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.evaluate import completion_logprob

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model: Any = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    lp, n = completion_logprob(model, tokenizer, user(q), a)
    return -lp / n


def lora_weights(adapter: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(adapter / "adapter_model.safetensors"))


def changed(adapter: Path) -> bool:
    """A fresh LoRA starts with B = 0: any trained step makes some B non-zero."""
    return any(float(t.abs().sum()) > 0 for k, t in lora_weights(adapter).items() if "lora_B" in k)


def test_a_takeover_reply_trains_beside_preference_pairs(tiny_model: Path, tmp_path: Path) -> None:
    before = nll(tiny_model, None, ORDER_Q, ORDER_A)
    rows = {"dpo": PAIRS, "sft": [demo(REFUND_Q, REFUND_A), demo(ORDER_Q, ORDER_A)]}
    meta = run_job(tiny_model, tmp_path / "run", rows, demo_epochs=4.0)
    assert meta["trainer"] == "dpo+sft"
    dpo_stage, sft_stage = meta["budget"]["stages"]
    assert (dpo_stage["trainer"], dpo_stage["steps"]) == ("dpo", 6)  # epochs 0: max_steps
    # the correction's demo is left out (DPO's SFT term trains it); the takeover's runs 4 passes
    assert (sft_stage["rows"], sft_stage["steps"], sft_stage["epochs"]) == (1, 2, 4.0)
    assert nll(tiny_model, tmp_path / "run" / "adapter", ORDER_Q, ORDER_A) < before
    # where the run's seconds went: each part once, in order, within the run's own seconds
    phases = meta["budget"]["phases"]
    assert list(phases)[:4] == ["load", "pick", "train", "evaluate_pairs"] and min(phases.values()) >= 0
    assert sum(phases.values()) <= meta["seconds"] + 0.5  # each is rounded to 0.1 s


@pytest.mark.parametrize(("sft_weight", "trainer"), [(0.0, "dpo+sft"), (1.0, "dpo")])
def test_a_correction_demo_trains_beside_preference_pairs(
    tiny_model: Path, tmp_path: Path, sft_weight: float, trainer: str
) -> None:
    """With DPO's SFT term the correction trains as a pair's chosen answer; without it, in the SFT stage."""
    before = nll(tiny_model, None, REFUND_Q, REFUND_A)
    rows = {"dpo": PAIRS, "sft": [demo(REFUND_Q, REFUND_A)]}
    meta = run_job(tiny_model, tmp_path / "run", rows, sft_weight=sft_weight, demo_epochs=4.0)
    assert meta["trainer"] == trainer
    assert nll(tiny_model, tmp_path / "run" / "adapter", REFUND_Q, REFUND_A) < before


def test_thumbs_change_the_adapter_when_pairs_exist(tiny_model: Path, tmp_path: Path) -> None:
    without = run_job(tiny_model, tmp_path / "pairs", {"dpo": PAIRS}, max_steps=2)
    both = run_job(tiny_model, tmp_path / "both", {"dpo": PAIRS, "kto": THUMBS}, max_steps=2, kto_steps=2)
    assert (without["trainer"], both["trainer"]) == ("dpo", "dpo+kto")
    a, b = lora_weights(tmp_path / "pairs" / "adapter"), lora_weights(tmp_path / "both" / "adapter")
    assert any(not a[k].equal(b[k]) for k in a)


def test_the_kto_only_and_sft_only_runs_train(tiny_model: Path, tmp_path: Path) -> None:
    kto = run_job(tiny_model, tmp_path / "kto", {"kto": THUMBS})
    assert kto["trainer"] == "kto" and kto["budget"]["stages"][0]["steps"] == 6
    assert changed(tmp_path / "kto" / "adapter")
    before = nll(tiny_model, None, ORDER_Q, ORDER_A)
    sft = run_job(tiny_model, tmp_path / "sft", {"sft": [demo(ORDER_Q, ORDER_A)] * 4}, epochs=2.0)
    assert sft["trainer"] == "sft" and sft["budget"]["stages"][0]["planned_steps"] == 4  # 4 rows x 2 / 2
    assert changed(tmp_path / "sft" / "adapter")
    assert nll(tiny_model, tmp_path / "sft" / "adapter", ORDER_Q, ORDER_A) < before


def test_the_gate_asks_held_out_liked_replies_again(tiny_model: Path, tmp_path: Path) -> None:
    """The ``kept`` rows (held-out replies rated up) are asked again of both models, each reply
    scored against the liked one; a prompt the corrected questions already ask is not asked twice."""
    kept = [thumb(REFUND_Q, REFUND_A, True), thumb(ORDER_Q, ORDER_A, True), thumb(SHIP_Q, SHIP_A, True)]
    meta = run_job(tiny_model, tmp_path / "run", {"dpo": PAIRS, "kept": kept}, max_steps=2)
    replies = meta["report"]["replies"]
    assert (replies["n"], replies["kept"]) == (1, 2)  # SHIP_Q is the held-out pair's question
    assert replies["kept_lost"] + replies["kept_regained"] <= 2
    again = [e for e in replies["examples"] if e.get("kept")]
    assert [(e["question"], e["answer"]) for e in again] == [(REFUND_Q, REFUND_A), (ORDER_Q, ORDER_A)]
    assert [e["answer"] for e in replies["examples"] if not e.get("kept")] == [SHIP_A]
    assert all(isinstance(e["candidate"], str) and -0.5 <= e["candidate_score"] <= 1 for e in again)
    # the mean reply scores count the liked replies' questions beside the corrected one
    every = replies["examples"]  # the liked questions count up to READS_RIGHT (0.6)
    counted = [e["candidate_score"] if not e.get("kept") else min(e["candidate_score"], 0.6) for e in every]
    assert replies["candidate"] == round(sum(counted) / 3, 4)
    assert replies["wins"] + replies["losses"] <= 3


def test_a_kto_row_weight_scales_its_loss(tiny_model: Path, tmp_path: Path) -> None:
    """Implicit labels train as KTO rows with a ``weight`` column: weight 1 trains exactly as a thumb's
    row without one; a lower weight trains less (another adapter)."""
    plain = run_job(tiny_model, tmp_path / "plain", {"kto": THUMBS}, max_steps=3)
    ones = run_job(tiny_model, tmp_path / "ones", {"kto": [{**t, "weight": 1.0} for t in THUMBS]}, max_steps=3)
    weak = [{**t, "weight": 0.3} for t in THUMBS[:2]] + THUMBS[2:]  # some rows weighted, others not
    light = run_job(tiny_model, tmp_path / "light", {"kto": weak}, max_steps=3)
    assert plain["trainer"] == ones["trainer"] == light["trainer"] == "kto"
    a, b, c = (lora_weights(tmp_path / name / "adapter") for name in ("plain", "ones", "light"))
    assert all(a[k].equal(b[k]) for k in a)
    assert any(not a[k].equal(c[k]) for k in a) and changed(tmp_path / "light" / "adapter")


def test_the_deadline_stops_training_at_the_end_of_a_step() -> None:
    from transformers import TrainerControl

    from training.trainers import Deadline

    control = TrainerControl()
    Deadline(at=float("inf")).on_step_end(None, None, control)
    assert not control.should_training_stop
    Deadline(at=0.0).on_step_end(None, None, control)
    assert control.should_training_stop


def test_a_later_sft_stage_needs_demo_epochs(tmp_path: Path) -> None:
    """demo_epochs 0 means no SFT stage; plan_steps reads epochs 0 as "exactly max_steps", so a
    stage asked for anyway is refused, not run for max_steps (the job never asks: it adds none)."""
    from training.trainers import Objective, next_stage

    spec = JobSpec(base_model="unused", train=TrainConfig(demo_epochs=0.0), run_dir=tmp_path, dataset_id="t")
    with pytest.raises(ValueError, match="demo_epochs above 0"):
        next_stage(Objective.SFT, None, None, [demo(ORDER_Q, ORDER_A)], spec, [])


def test_a_spent_budget_is_reported(tiny_model: Path, tmp_path: Path) -> None:
    """A budget spent before the first step: no stage trains, and the report says so."""
    rows = {"dpo": PAIRS, "sft": [demo(ORDER_Q, ORDER_A)]}
    meta = run_job(tiny_model, tmp_path / "run", rows, epochs=3.0, max_minutes=1e-9)
    budget = meta["budget"]
    assert budget["stopped_by_budget"] and budget["max_minutes"] == 1e-9 and budget["share_seen"] == 0.0
    assert [(s["trainer"], s["planned_steps"], s["steps"]) for s in budget["stages"]] == [("dpo", 6, 0), ("sft", 1, 0)]
