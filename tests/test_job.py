"""The training job's DPO trainer: TRL's pipeline and forwards, a per-row loss (pairs and anchors)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

ROWS = [
    ("How long do I have to return something?", "Within 30 days of delivery.", "No idea."),
    ("Do gift cards expire?", "Let me check that for you.", "Shipping takes 3 to 5 business days."),
]


def _rows(anchor: list[bool] | None, *, chosen: str | None = None) -> list[dict[str, Any]]:
    rows = []
    for n, (question, good, bad) in enumerate(ROWS):
        row: dict[str, Any] = {
            "prompt": [{"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": chosen or good}],
            "rejected": [{"role": "assistant", "content": bad}],
        }
        if anchor is not None:
            row["anchor"] = anchor[n]
        rows.append(row)
    return rows


def _batch_loss(
    tiny_model: Path, tmp_path: Path, rows: list[dict[str, Any]], *, ours: bool, trained: bool = False
) -> float:
    """Loss of the rows as one batch. A fresh LoRA has B = 0, so the policy equals the reference;
    ``trained`` sets B to random values (seeded) so that it does not."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from training.job import dpo_sft_trainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    common: dict[str, Any] = dict(
        output_dir=str(tmp_path / "trainer"), use_cpu=True, report_to="none", max_length=128, beta=0.1
    )
    kwargs: dict[str, Any] = dict(
        model=model,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    if ours:
        trainer: Any = dpo_sft_trainer(args=DPOConfig(**common, loss_type=["sigmoid"]), sft_weight=0.5, **kwargs)
    else:
        trainer = DPOTrainer(args=DPOConfig(**common, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]), **kwargs)
    if trained:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in trainer.model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    trainer.model.train()
    return float(trainer.compute_loss(trainer.model, batch))


@pytest.mark.parametrize("trained", [False, True])
def test_pairs_get_trls_own_dpo_plus_sft_loss(tiny_model: Path, tmp_path: Path, trained: bool) -> None:
    trl_loss = _batch_loss(tiny_model, tmp_path, _rows(None), ours=False, trained=trained)
    ours = _batch_loss(tiny_model, tmp_path, _rows([False, False]), ours=True, trained=trained)
    assert ours == pytest.approx(trl_loss, rel=1e-5)
    assert trl_loss > math.log(2) + 0.1  # the SFT term is in it


def test_anchor_rows_get_no_sft_loss(tiny_model: Path, tmp_path: Path) -> None:
    # policy == reference: an anchor row costs nothing
    assert _batch_loss(tiny_model, tmp_path, _rows([True, True]), ours=True) == pytest.approx(0.0, abs=1e-6)
    # a pair beside an anchor: the SFT term covers the pair's answer alone
    mixed = _batch_loss(tiny_model, tmp_path, _rows([False, True]), ours=True)
    pair_alone = _batch_loss(tiny_model, tmp_path, _rows(None)[:1], ours=False)  # log 2 + 0.5 * SFT(pair)
    assert mixed == pytest.approx(pair_alone - math.log(2) / 2, rel=1e-5)  # (log 2 + 0) / 2 + 0.5 * SFT(pair)


def test_preference_loss_pairs_are_dpo_anchors_only_stop_a_rise() -> None:
    import torch

    from training.job import ANCHOR_SLACK, preference_loss

    d_chosen = torch.tensor([2.0, 2.0, -5.0, 0.0, 3.0, 0.0])
    d_rejected = torch.tensor([-1.0, 4.0, -3.0, 4.0, 4.0, 10.0 * ANCHOR_SLACK])
    tokens = torch.tensor([10, 10, 10, 4, 4, 10])
    anchor = torch.tensor([False, False, True, True, True, True])
    loss = preference_loss(d_chosen, d_rejected, tokens, anchor, 0.1)
    assert loss[0] == pytest.approx(-math.log(1 / (1 + math.exp(-0.3))))  # DPO, margin 3
    assert loss[1] == pytest.approx(-math.log(1 / (1 + math.exp(0.2))))  # DPO, margin -2
    assert loss[2] == 0.0  # the transplant got less likely than the reference finds it
    assert loss[5] == 0.0  # it rose, but by the slack per token at most
    # a rise of 1 nat per token costs what it exceeds the slack by, whatever the chosen side is
    assert loss[3] == pytest.approx(1.0 - ANCHOR_SLACK) and loss[4] == pytest.approx(1.0 - ANCHOR_SLACK)
    d_rejected.requires_grad_(True)
    d_chosen.requires_grad_(True)
    preference_loss(d_chosen, d_rejected, tokens, anchor, 0.1).sum().backward()
    assert d_chosen.grad is not None and d_chosen.grad[2:].tolist() == [0.0] * 4  # no push on the chosen
    assert d_rejected.grad is not None and d_rejected.grad[2:].tolist() == pytest.approx([0.0, 0.25, 0.25, 0.0])


def test_an_anchor_rows_chosen_side_does_not_train(tiny_model: Path, tmp_path: Path) -> None:
    """With policy != reference, a pair's loss depends on its chosen answer; an anchor's does not."""
    other = "I am not sure, sorry."
    pairs = [
        _batch_loss(tiny_model, tmp_path, _rows([False, False], chosen=c), ours=True, trained=True)
        for c in (None, other)
    ]
    anchors = [
        _batch_loss(tiny_model, tmp_path, _rows([True, True], chosen=c), ours=True, trained=True) for c in (None, other)
    ]
    assert pairs[0] != pytest.approx(pairs[1], rel=1e-3)
    assert anchors[0] == pytest.approx(anchors[1], rel=1e-6)


def test_held_out_anchor_rows_are_no_pairs_and_give_the_transplant_rise(tiny_model: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.evaluate import completion_logprob, evaluate_pairs

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    pairs = [{**row, "source": "correction"} for row in _rows(None)]
    anchor = {**_rows(None)[1], "source": "anchor", "anchor": True}
    plain = evaluate_pairs(model, tokenizer, pairs, live_adapter=None, beta=0.1)
    with_anchor = evaluate_pairs(model, tokenizer, [*pairs, anchor], live_adapter=None, beta=0.1)
    assert with_anchor.n_heldout == plain.n_heldout == 2
    assert (with_anchor.candidate, with_anchor.live, with_anchor.reward_margin) == (
        plain.candidate,
        plain.live,
        plain.reward_margin,
    )
    assert plain.extra["anchor_rows"] == 0 and plain.extra["transplant_rise"] is None
    rejected = anchor["rejected"][0]["content"]
    cand, n = completion_logprob(model, tokenizer, anchor["prompt"], rejected)
    with model.disable_adapter():
        live, _ = completion_logprob(model, tokenizer, anchor["prompt"], rejected)
    assert with_anchor.extra["anchor_rows"] == 1
    assert with_anchor.extra["transplant_rise"] == pytest.approx((cand - live) / n)
    assert with_anchor.extra["transplant_rise"] != pytest.approx(0.0, abs=1e-4)
