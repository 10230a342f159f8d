"""The training job's trainers: which TRL trainer each objective takes, with what arguments, for
how many steps, and the callbacks every stage shares (progress lines for the cycle, the run's time
budget). ``training.train`` runs them in stages; ``bench/demo_stage.py`` builds them directly.

Like ``training.train``, this imports torch, transformers, TRL and PEFT: the server never imports it.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, SFTConfig, SFTTrainer
from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

from training.config import JobSpec, device_args
from training.forgetting import ForgettingGuard
from training.steps import StageReport, TrlRow, plan_steps


class Objective(StrEnum):
    """What the adapter was trained with (``trainer`` in the report and in learnloop.json)."""

    DPO = "dpo"  # DPO mixed with an SFT loss on the chosen answers (sft_weight)
    KTO = "kto"
    SFT = "sft"


# A run's stages, joined with "+" in the report: the first objective the data allows, then KTO on
# thumbs (kto_steps, after DPO), then SFT on the demonstrations the pairs do not teach (demo_epochs):
# "dpo", "dpo+sft", "dpo+kto+sft", "kto+sft", "sft", ...


def train_stage(trainer: Any, objective: Objective, rows: list[TrlRow], spec: JobSpec) -> StageReport:
    """Train ``trainer`` unless the time budget is spent or the forgetting guard stopped the run; what it did."""
    planned = int(trainer.args.max_steps)
    callbacks = trainer.callback_handler.callbacks
    deadline = next(cb for cb in callbacks if isinstance(cb, Deadline))
    if deadline.spent() or any(cb.crossed for cb in callbacks if isinstance(cb, ForgettingGuard)):
        return StageReport(str(objective), len(rows), spec.train.batch_size, planned, 0)
    trainer.train()
    return StageReport(str(objective), len(rows), spec.train.batch_size, planned, int(trainer.state.global_step))


def emit(event: str, **fields: Any) -> None:
    if not PartialState().is_main_process:  # under accelerate launch, one process speaks for the run
        return
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


class Progress(TrainerCallback):
    """Each logged step as a progress line for the cycle (which stores it for the console's loss
    curve and kills this process when an operator cancels the run)."""

    def __init__(self, started: float) -> None:
        self.started = started

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        if not logs or "loss" not in logs:
            return
        elapsed = time.monotonic() - self.started
        step = int(state.global_step)
        eta = elapsed / max(step, 1) * (state.max_steps - step)
        emit(
            "progress",
            step=step,
            max_steps=int(state.max_steps),
            loss=float(logs["loss"]),
            eta_s=round(eta, 1),
            **{k: float(v) for k, v in logs.items() if k.startswith("rewards/") and isinstance(v, int | float)},
        )


def run_device(device: str) -> dict[str, Any]:
    """``training.config.device_args`` for this machine."""
    cuda = torch.cuda.is_available()
    return device_args(device, cuda_available=cuda, bf16_supported=cuda and torch.cuda.is_bf16_supported())


class Deadline(TrainerCallback):
    """``training.max_minutes``: the run's training steps, every stage together, stop at the end of
    the step that passes ``at`` (a ``time.monotonic()`` value)."""

    def __init__(self, at: float) -> None:
        self.at = at

    def spent(self) -> bool:
        return time.monotonic() >= self.at

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.spent():
            control.should_training_stop = True


def trainer_args(spec: JobSpec, **overrides: Any) -> dict[str, Any]:
    """What every trainer shares. TRL's defaults are set for full fine-tuning (gradient
    checkpointing, learning rate 1e-6): this trains a LoRA (float32 on CPU; bf16 mixed precision
    on a GPU that has it, ``training.device``) at a constant rate, logs every step (the progress
    lines) and saves no checkpoints. ``max_steps`` comes from the caller (``steps.plan_steps``)."""
    cfg = spec.train
    return {
        "output_dir": str(spec.run_dir / "trainer"),
        "per_device_train_batch_size": cfg.batch_size,
        "learning_rate": cfg.learning_rate,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "max_length": cfg.max_length,
        "seed": cfg.seed,
        **{k: v for k, v in run_device(cfg.device).items() if k != "device"},
        "gradient_checkpointing": False,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        **overrides,
    }


def build_trainer(
    objective: Objective,
    model: Any,
    tokenizer: Any,
    lora: LoraConfig | None,
    rows: list[TrlRow],
    spec: JobSpec,
    callbacks: list[TrainerCallback],
    **overrides: Any,
) -> Any:
    """The one TRL trainer for ``objective`` on ``rows`` (``lora``: a new LoRA; None: train the
    adapter ``model`` already has), for the steps ``steps.plan_steps`` gives unless ``overrides``
    name them."""
    cfg = spec.train
    steps = plan_steps(len(rows), cfg.batch_size, epochs=cfg.epochs, max_steps=cfg.max_steps)
    trainer_cls, args = trainer_config(objective, spec, **{"max_steps": steps, **overrides})
    return trainer_cls(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=callbacks,
    )


@dataclass
class _WeightedCollator(DataCollatorForUnpairedPreference):
    """TRL's KTO collator, passing each row's ``weight`` on as a tensor."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        output = super().torch_call(examples)
        if "weight" in examples[0]:
            output["weight"] = torch.tensor([float(e["weight"]) for e in examples], dtype=torch.float32)
        return output


class WeightedKTOTrainer(KTOTrainer):  # type: ignore[misc]
    """KTO with a weight per row: a ``weight`` column (implicit labels, below 1) scales that row's loss
    on top of its class's weight; rows without the column weigh 1, as in TRL.

    TRL multiplies the chosen and the rejected losses of a batch by ``desirable_weight`` and
    ``undesirable_weight``; for one batch these become tensors, the class weight times the weights
    of that class's rows in batch order (TRL takes them in that order too), then they are put back.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("data_collator") is None:
            config, tokenizer = kwargs["args"], kwargs["processing_class"]
            kwargs["data_collator"] = _WeightedCollator(
                pad_token_id=tokenizer.pad_token_id,
                max_length=config.max_length,
                pad_to_multiple_of=config.pad_to_multiple_of,
            )
        super().__init__(*args, **kwargs)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and "weight" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "weight"]

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
        weight = inputs.pop("weight", None)
        if weight is None:
            return super()._compute_loss(model, inputs, return_outputs)
        labels = torch.as_tensor(inputs["label"], dtype=torch.bool)
        weight = weight.to(self.accelerator.device)
        desirable, undesirable = self.desirable_weight, self.undesirable_weight
        self.desirable_weight = desirable * weight[labels.to(weight.device)]
        self.undesirable_weight = undesirable * weight[~labels.to(weight.device)]
        try:
            return super()._compute_loss(model, inputs, return_outputs)
        finally:
            self.desirable_weight, self.undesirable_weight = desirable, undesirable


def trainer_config(objective: Objective, spec: JobSpec, **overrides: Any) -> tuple[type[Any], Any]:
    """The TRL trainer class and its config for ``objective``:

    * DPO (sigmoid loss) mixed with an SFT loss on the chosen answers, weighted ``sft_weight``
      (plain DPO moved margins but no greedy reply: bench/RESULTS.md);
    * KTO on thumbs, both classes weighing the same in total (``JobSpec.kto_weights``), each row
      scaled by its own ``weight`` where it has one (implicit labels: ``WeightedKTOTrainer``);
    * SFT on demonstrations.
    """
    cfg = spec.train
    args = trainer_args(spec, **overrides)
    if objective is Objective.DPO:
        losses, weights = (["sigmoid", "sft"], [1.0, cfg.sft_weight]) if cfg.sft_weight > 0 else (["sigmoid"], [1.0])
        return DPOTrainer, DPOConfig(**args, beta=cfg.beta, loss_type=losses, loss_weights=weights)
    if objective is Objective.KTO:
        desirable, undesirable = spec.kto_weights
        config = KTOConfig(**args, beta=cfg.beta, desirable_weight=desirable, undesirable_weight=undesirable)
        return WeightedKTOTrainer, config
    return SFTTrainer, SFTConfig(**args)


def next_stage(
    objective: Objective,
    model: Any,
    tokenizer: Any,
    rows: list[TrlRow],
    spec: JobSpec,
    callbacks: list[TrainerCallback],
) -> Any:
    """A trainer for a later stage on the adapter the last one trained (no new LoRA): KTO for
    ``kto_steps`` steps, SFT for ``demo_epochs`` passes over its rows (``demo_epochs`` 0 means no SFT
    stage: the job adds none, and this refuses one rather than read 0 as ``max_steps``)."""
    cfg = spec.train
    if objective is Objective.SFT and cfg.demo_epochs <= 0:
        raise ValueError("an SFT stage after the first needs training.demo_epochs above 0")
    if "ref" in model.peft_config:  # DPO's frozen copy of a starting adapter; a later trainer needs none
        model.set_adapter("default")
        model.delete_adapter("ref")
    overrides: dict[str, Any] = {"output_dir": str(spec.run_dir / f"trainer-{objective}")}
    if objective is Objective.KTO:
        overrides["max_steps"] = cfg.kto_steps
    else:
        overrides["max_steps"] = plan_steps(len(rows), cfg.batch_size, epochs=cfg.demo_epochs, max_steps=cfg.max_steps)
    return build_trainer(objective, model, tokenizer, None, rows, spec, callbacks, **overrides)
