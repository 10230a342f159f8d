"""The training job: ``python -m training.train SPEC.json``, SPEC being the ``JobSpec`` the cycle wrote.

One run, top to bottom: load the base model and its tokenizer (and the live adapter, to continue
from it, when ``init_from = "live"``); read the rows; narrow the contrast and replay candidates
to hard negatives; train in stages on one adapter: first the objective the data allows (DPO
mixed with an SFT loss on the chosen answers when there are preference pairs, KTO when there are
only thumbs, SFT when there are only demonstrations), then optionally KTO on the thumbs
(``kto_steps``), then SFT on the demonstrations the pairs do not teach, such as operator
takeover replies (``demo_epochs``); every stage's steps follow its rows (``training.steps``)
within the run's time budget (``max_minutes``); score the adapter against the live version on
the held-out pairs; save it with the resolved config, the data id, the budget and what was
done with it, and the metrics that produced it (``learnloop.json``); report.

The parent reads stdout, one JSON object a line:

    {"event": "progress", "step": 3, "max_steps": 40, "loss": 0.69, "eta_s": 120.5}
    {"event": "report", "report": {...EvalReport...}, "trainer": "dpo+sft", "budget": {...}, "seconds": 93.2}

Anything else on stdout is ignored; logs go to stderr. The heavy imports (torch, transformers,
TRL, PEFT) live in this process only: the server never imports this module.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, SFTConfig, SFTTrainer
from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

from feedback.specials import defuse_row, tokenizer_specials
from training.chats import generic_chat_path, load_chat, replay_chat_path, shared_prompts
from training.config import JobSpec, device_args, disk_full
from training.evaluate import LIVE, evaluate_pairs, perplexity, read_replies, rejected_scores
from training.forgetting import ForgettingGuard
from training.gate import EvalReport
from training.pairs import pick_likeliest, prompt_key, replay_plan
from training.signals import replay_rows
from training.steps import StageReport, budget_report, demo_prompt_completion, extra_demos, plan_steps

TrlRow = dict[str, Any]


class Objective(StrEnum):
    """What the adapter was trained with (``trainer`` in the report and in learnloop.json)."""

    DPO = "dpo"  # DPO mixed with an SFT loss on the chosen answers (sft_weight)
    KTO = "kto"
    SFT = "sft"


# A run's stages, joined with "+" in the report: the first objective the data allows, then KTO on
# thumbs (kto_steps, after DPO), then SFT on the demonstrations the pairs do not teach (demo_epochs):
# "dpo", "dpo+sft", "dpo+kto+sft", "kto+sft", "sft", ...


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m training.train SPEC.json")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        run(JobSpec.from_json(Path(sys.argv[1]).read_text()))
    except Exception as exc:
        if disk_full(exc):  # say so in a line the cycle reads: the run fails with a storage reason
            emit("error", code="storage_full", detail=f"no space left on device: {exc}")
        raise


def run(spec: JobSpec) -> None:
    started = time.monotonic()
    cfg = spec.train
    torch.manual_seed(cfg.seed)
    if cfg.threads:  # training.threads; its niceness (training.nice) came with the command line
        torch.set_num_threads(cfg.threads)
    tokenizer = load_tokenizer(spec.base_model)
    model, lora = load_model(spec)
    rows = Rows.read(spec).defused(tokenizer_specials(tokenizer))
    phases = {"load": time.monotonic() - started}  # where the run's seconds went, in the budget report
    add_hard_negatives(rows, spec, tokenizer)
    deadline = Deadline(time.monotonic() + cfg.max_minutes * 60)
    callbacks: list[TrainerCallback] = [Progress(started), deadline]
    guard = forgetting_guard(spec, tokenizer)
    if guard is not None:
        callbacks.append(guard)
    train_started = time.monotonic()
    phases["pick"] = train_started - started - phases["load"]

    objective = choose_objective(rows)
    stages: list[StageReport] = []
    first = rows.of(objective)
    trainer = build_trainer(objective, model, tokenizer, lora, first, spec, callbacks)
    stages.append(train_stage(trainer, objective, first, spec))
    names = [str(objective)]
    if objective is Objective.DPO and cfg.kto_steps > 0 and len({r["label"] for r in rows.kto}) == 2:
        # a stage on the same adapter: thumbs (KTO) teach what the pairs cannot, such as
        # "do not answer a gift-card question with the refund window"
        trainer = next_stage(Objective.KTO, trainer.model, tokenizer, rows.kto, spec, callbacks)
        stages.append(train_stage(trainer, Objective.KTO, rows.kto, spec))
        names.append(str(Objective.KTO))
    demos = [] if objective is Objective.SFT else rows.extra_demos(cfg.sft_weight)
    if demos and cfg.demo_epochs > 0:
        # demonstrations the pairs do not teach (takeover replies) train last, so the pairs' and
        # thumbs' stages cannot pull the model off them
        trainer = next_stage(Objective.SFT, trainer.model, tokenizer, demos, spec, callbacks)
        stages.append(train_stage(trainer, Objective.SFT, demos, spec))
        names.append(str(Objective.SFT))
    budget = budget_report(
        stages, max_minutes=cfg.max_minutes, epochs=cfg.epochs, seconds=time.monotonic() - train_started
    )
    # the share of the machine it trained with: its niceness and torch threads, as they were
    budget |= {"nice": os.getpriority(os.PRIO_PROCESS, 0), "threads": torch.get_num_threads()}
    if guard is not None:  # training.guard_every: where the run stopped, and which weights it kept
        guard.finish(trainer.model)
        budget["guard"] = guard.report()
        if guard.crossed:  # the stages it cut short were the guard's doing, not the time budget's
            budget["stopped_by_budget"] = budget["stopped_by_budget"] and deadline.spent()

    phases["train"] = time.monotonic() - train_started
    report = evaluate(trainer.model, tokenizer, rows.heldout, spec, phases)
    budget["phases"] = {name: round(seconds, 1) for name, seconds in phases.items()}
    if not PartialState().is_main_process:  # the main process saves and reports
        return
    trained_with = "+".join(names)
    seconds = save(trainer.model, spec, trainer=trained_with, rows=rows, report=report, budget=budget, started=started)
    emit(
        "report",
        report=report.to_dict(),
        trainer=trained_with,
        budget=budget,
        seconds=seconds,
        device=run_device(cfg.device)["device"],
    )


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


def load_tokenizer(base_model: str) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: JobSpec) -> tuple[Any, LoraConfig | None]:
    """The base model in float32, and the LoRA the trainer adds to it; or, to continue from the live
    adapter, the model with that adapter trainable and no new LoRA."""
    cfg = spec.train
    model: Any = AutoModelForCausalLM.from_pretrained(spec.base_model, dtype=torch.float32)
    lora: LoraConfig | None = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    if spec.init_adapter:
        model = PeftModel.from_pretrained(model, spec.init_adapter, is_trainable=True)
        lora = None
    return model, lora


@dataclass
class Rows:
    """The run's TRL rows as the cycle wrote them (``JobSpec.rows_path``), plus the replay candidates."""

    dpo: list[TrlRow]
    kto: list[TrlRow]
    sft: list[TrlRow]
    heldout: list[TrlRow]
    contrast: list[TrlRow]  # contrast candidates, with contrast_pick = "live"
    heldout_contrast: list[TrlRow]
    replay: list[TrlRow]  # replay candidates (only when there are pairs to mix them into)

    @classmethod
    def read(cls, spec: JobSpec) -> Rows:
        def read_jsonl(name: str) -> list[TrlRow]:
            path = spec.rows_path(name)
            if not path.exists():
                return []
            with open(path, encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]

        dpo = read_jsonl("dpo")
        kto = read_jsonl("kto")
        if any("weight" in r for r in kto):  # implicit labels weigh less than a thumb (weight 1)
            kto = [{**r, "weight": float(r.get("weight", 1.0))} for r in kto]
        return cls(
            dpo=dpo,
            kto=kto,
            sft=read_jsonl("sft"),
            heldout=read_jsonl("heldout"),
            contrast=read_jsonl("contrast"),
            heldout_contrast=read_jsonl("heldout_contrast"),
            replay=replay_candidates(spec) if dpo else [],
        )

    def defused(self, specials: tuple[str, ...]) -> Rows:
        """The same rows with message text defused: a special token written in feedback stays text."""
        fields = {f.name: [defuse_row(r, specials) for r in getattr(self, f.name)] for f in dataclasses.fields(self)}
        return Rows(**fields)

    def of(self, objective: Objective) -> list[TrlRow]:
        """The rows ``objective`` trains on first (demonstrations as prompt-completion rows)."""
        if objective is Objective.SFT:
            return [demo_prompt_completion(r) for r in self.sft]
        return {Objective.DPO: self.dpo, Objective.KTO: self.kto}[objective]

    def extra_demos(self, sft_weight: float) -> list[TrlRow]:
        """The demonstrations a stage after the pairs or thumbs trains on (``steps.extra_demos``)."""
        taught = self.dpo + self.heldout
        return [demo_prompt_completion(r) for r in extra_demos(self.sft, taught, sft_weight=sft_weight)]

    def counts(self) -> dict[str, int]:
        return {
            "dpo": len(self.dpo),
            "kto": len(self.kto),
            "sft": len(self.sft),
            "contrast_candidates": len(self.contrast),
            "replay_candidates": len(self.replay),
        }


def replay_candidates(spec: JobSpec) -> list[TrlRow]:
    """training.replay_pairs: ordinary chat prompts (``training.chats``), each against every operator
    correction. A replay set that asks the gate's generic questions is refused: the forgetting
    guard must read prompts the adapter never trained on."""
    if not spec.train.replay_pairs:
        return []
    path = replay_chat_path(spec.train.replay_chat, spec.generic_chat)
    chat = load_chat(path)
    shared = shared_prompts(chat, load_chat(generic_chat_path(spec.generic_chat)))
    if shared:
        raise ValueError(
            f"training.replay_chat {str(path)!r} asks {len(shared)} question(s) of the gate's generic chat "
            f"(gate.generic_chat), e.g. {shared[0]!r}: the gate would judge forgetting on what the adapter trained on"
        )
    if not spec.train.replay_share:  # a share may call on every prompt; a fixed count on the first few
        chat = chat[: spec.train.replay_pairs]
    rows = replay_rows(
        [g["prompt"][-1]["content"] for g in chat],
        [g["completion"] for g in chat],
        spec.corrections,
        system_prompt=spec.system_prompt,
    )
    return [r.to_trl() for r in rows]


def add_hard_negatives(rows: Rows, spec: JobSpec, tokenizer: Any) -> None:
    """Keep ``contrast_pairs`` contrast candidates per question and one replay candidate per prompt,
    and add them to the pairs: training ones to ``dpo``, held-out ones to ``heldout``."""
    if not (rows.contrast or rows.heldout_contrast or rows.replay):
        return
    pick = hard_negative_picker(spec, tokenizer)
    rows.dpo += pick(rows.contrast, spec.train.contrast_pairs)
    rows.heldout += pick(rows.heldout_contrast, spec.train.contrast_pairs)
    by_prompt: dict[str, list[TrlRow]] = {}
    for row in rows.replay:
        by_prompt.setdefault(prompt_key(row["prompt"]), []).append(row)
    groups = list(by_prompt.values())  # in the shipped order
    plan = replay_plan(
        len(rows.dpo),
        prompts=spec.train.replay_pairs,
        share=spec.train.replay_share,
        candidates=[len(g) for g in groups],
    )
    rows.dpo += [row for group, k in zip(groups[: len(plan)], plan, strict=True) for row in pick(group, k)]
    # the scoring model goes with ``pick`` when this returns, before the trainer loads


def hard_negative_picker(spec: JobSpec, tokenizer: Any) -> Callable[[list[TrlRow], int], list[TrlRow]]:
    """How candidate rows are narrowed to ``k`` per question. ``contrast_pick = "live"``: the
    rejected answers the live version finds likeliest there (it is loaded once, beside the
    model in training); ``"hash"``: every score ties and a stable hash picks."""
    scorer: Any = None
    if spec.train.picks_in_job:
        scorer = AutoModelForCausalLM.from_pretrained(spec.base_model, dtype=torch.float32)
        if spec.live_adapter:
            scorer = PeftModel.from_pretrained(scorer, spec.live_adapter)

    def pick(rows: list[TrlRow], k: int) -> list[TrlRow]:
        scores = rejected_scores(scorer, tokenizer, rows) if scorer is not None and rows else [0.0] * len(rows)
        return pick_likeliest(rows, scores, k)

    return pick


def choose_objective(rows: Rows) -> Objective:
    """The objective follows the data: pairs if any, else thumbs, else demonstrations."""
    if rows.dpo:
        return Objective.DPO
    if rows.kto:
        return Objective.KTO
    if rows.sft:
        return Objective.SFT
    raise SystemExit("nothing to train: the spec names no DPO, KTO or SFT rows")


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


def forgetting_guard(spec: JobSpec, tokenizer: Any) -> ForgettingGuard | None:
    """``training.guard_every``: the guard on the gate's generic chat and limit (``training.forgetting``)."""
    if not spec.train.guard_every:
        return None
    generic = load_chat(generic_chat_path(spec.generic_chat))  # never empty: load_chat refuses that

    def measure(model: Any) -> float:
        ppl = perplexity(model, tokenizer, generic)
        assert ppl is not None
        return ppl

    return ForgettingGuard(spec.train.guard_every, spec.generic_ppl_increase, measure)


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
    ``kto_steps`` steps, SFT for ``demo_epochs`` passes over its rows."""
    if "ref" in model.peft_config:  # DPO's frozen copy of a starting adapter; a later trainer needs none
        model.set_adapter("default")
        model.delete_adapter("ref")
    overrides: dict[str, Any] = {"output_dir": str(spec.run_dir / f"trainer-{objective}")}
    cfg = spec.train
    if objective is Objective.KTO:
        overrides["max_steps"] = cfg.kto_steps
    else:
        # demo_epochs 0: no SFT stage (no steps), never a fixed count
        steps = plan_steps(len(rows), cfg.batch_size, epochs=cfg.demo_epochs, max_steps=cfg.max_steps)
        overrides["max_steps"] = steps if cfg.demo_epochs > 0 else 0
    return build_trainer(objective, model, tokenizer, None, rows, spec, callbacks, **overrides)


def evaluate(
    model: Any, tokenizer: Any, heldout: list[TrlRow], spec: JobSpec, phases: dict[str, float] | None = None
) -> EvalReport:
    """The candidate against the live version (loaded beside it, then dropped) on the held-out pairs;
    the seconds of its two parts go into ``phases`` ("evaluate_pairs", "evaluate_replies")."""
    phases = {} if phases is None else phases
    started = time.monotonic()
    if spec.live_adapter:
        model.load_adapter(spec.live_adapter, adapter_name=LIVE)
    live = LIVE if spec.live_adapter else None
    generic = load_chat(generic_chat_path(spec.generic_chat))
    report = evaluate_pairs(model, tokenizer, heldout, live_adapter=live, beta=spec.train.beta, generic=generic)
    phases["evaluate_pairs"] = time.monotonic() - started
    if spec.reply_questions > 0:  # what each model says, read against the operators' answers (gate.judge)
        replies = read_replies(
            model,
            tokenizer,
            heldout,
            live_adapter=live,
            generic=generic,
            corrections=spec.corrections,
            questions=spec.reply_questions,
            max_new_tokens=spec.reply_tokens,
        )
        report = dataclasses.replace(report, replies=replies)
        phases["evaluate_replies"] = time.monotonic() - started - phases["evaluate_pairs"]
    if spec.live_adapter:
        model.delete_adapter(LIVE)
    return report


def save(
    model: Any,
    spec: JobSpec,
    *,
    trainer: str,
    rows: Rows,
    report: EvalReport,
    budget: dict[str, Any],
    started: float,
) -> float:
    """The adapter, and learnloop.json beside it: the config, data and metrics that produced it.
    Returns the run's seconds so far."""
    model.save_pretrained(spec.output_dir)
    seconds = round(time.monotonic() - started, 1)
    meta = {
        "trainer": trainer,
        "train_config": asdict(spec.train),
        "base_model": spec.base_model,
        "dataset_id": spec.dataset_id,
        "rows": rows.counts(),
        "init_adapter": spec.init_adapter,
        "report": report.to_dict(),
        "budget": budget,
        "seconds": seconds,
    }
    (spec.output_dir / "learnloop.json").write_text(json.dumps(meta, indent=2))
    return seconds


if __name__ == "__main__":
    main()
