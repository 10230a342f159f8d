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
TRL, PEFT) live in this process only: the server never imports this module. Which trainer each
stage takes, with what arguments and callbacks, is ``training.trainers``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from feedback.specials import defuse_row, tokenizer_specials
from training.chats import generic_chat_path, load_chat, replay_chat_path, shared_prompts
from training.config import JobSpec, disk_full
from training.evaluate import LIVE, evaluate_pairs, perplexity, read_replies, rejected_scores
from training.forgetting import ForgettingGuard
from training.gate import EvalReport
from training.pairs import pick_likeliest, prompt_key, replay_plan
from training.signals import replay_rows
from training.steps import StageReport, TrlRow, budget_report, demo_prompt_completion, extra_demos
from training.trainers import (
    Deadline,
    Objective,
    Progress,
    build_trainer,
    emit,
    next_stage,
    run_device,
    train_stage,
)


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
    report = evaluate(trainer.model, tokenizer, rows.heldout, spec, phases, rows.kept)
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
    kept: list[TrlRow] = dataclasses.field(default_factory=list)  # held-out replies rated up (the gate's)

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
            kept=read_jsonl("kept"),
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


def evaluate(
    model: Any,
    tokenizer: Any,
    heldout: list[TrlRow],
    spec: JobSpec,
    phases: dict[str, float] | None = None,
    kept: list[TrlRow] | None = None,
) -> EvalReport:
    """The candidate against the live version (loaded beside it, then dropped) on the held-out pairs,
    and on the ``kept`` replies (held out, rated up) when it reads replies; the seconds of its two
    parts go into ``phases`` ("evaluate_pairs", "evaluate_replies")."""
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
            kept=kept or [],
            kept_questions=spec.kept_questions,
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
