"""The training subprocess: ``python -m training.job SPEC.json``.

Trains a LoRA adapter with TRL on the rows the cycle wrote (the objective follows the data:
DPO mixed with an SFT loss on the chosen answers when there are preference pairs, KTO when
there are only thumbs, SFT when there are only demonstrations), scores it against the live
version on the held-out pairs, saves it with the config and data id that produced it,
and reports on stdout, one JSON object a line:

    {"event": "progress", "step": 3, "max_steps": 40, "loss": 0.69, "eta_s": 120.5}
    {"event": "report", "report": {...EvalReport...}, "trainer": "dpo", "seconds": 93.2}

Anything else on stdout is ignored by the parent; logs go to stderr. Heavy imports stay
in this process so the server never pays for them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from training.config import TrainConfig


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def read_jsonl(path: str | None) -> list[dict[str, Any]]:
    if not path or not Path(path).exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def replay_candidate_rows(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """training.replay_pairs: ordinary chat prompts, each against every operator correction."""
    from training.evaluate import REPLAY_CHAT, load_generic_chat
    from training.signals import replay_rows

    replay = spec.get("replay") or {}
    if not replay.get("n"):
        return []
    chat = load_generic_chat(REPLAY_CHAT)[: int(replay["n"])]
    rows = replay_rows(
        [g["prompt"][-1]["content"] for g in chat],
        [g["completion"] for g in chat],
        replay.get("corrections", []),
        system_prompt=replay.get("system_prompt"),
    )
    return [r.to_trl() for r in rows]


def picker(spec: dict[str, Any], cfg: TrainConfig, tokenizer: Any) -> Callable[[list[dict[str, Any]], int], list[Any]]:
    """How candidate rows are narrowed to ``k`` per question. ``contrast_pick = "live"``: the
    rejected answers the live version finds likeliest there (it is loaded once, beside the
    model in training); ``"hash"``: every score ties and a stable hash picks."""
    from training.evaluate import rejected_scores
    from training.pairs import pick_likeliest

    scorer: Any = None
    if cfg.picks_in_job:
        import torch
        from transformers import AutoModelForCausalLM

        scorer = AutoModelForCausalLM.from_pretrained(spec["base_model"], dtype=torch.float32)
        if spec.get("live_adapter"):
            from peft import PeftModel

            scorer = PeftModel.from_pretrained(scorer, spec["live_adapter"])

    def pick(rows: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
        scores = rejected_scores(scorer, tokenizer, rows) if scorer is not None and rows else [0.0] * len(rows)
        return pick_likeliest(rows, scores, k)

    return pick


def run(spec: dict[str, Any]) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from training.evaluate import LIVE, evaluate_pairs, load_generic_chat

    started = time.monotonic()
    cfg = TrainConfig(**{**spec["train"], "target_modules": tuple(spec["train"]["target_modules"])})
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(spec["base_model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model: Any = AutoModelForCausalLM.from_pretrained(spec["base_model"], dtype=torch.float32)
    lora: Any = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    if spec.get("init_adapter"):  # continue from the live adapter instead of a fresh LoRA
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, spec["init_adapter"], is_trainable=True)
        lora = None
    out = Path(spec["output_dir"])
    common: dict[str, Any] = dict(
        output_dir=str(out.parent / "trainer"),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_length=cfg.max_length,
        seed=cfg.seed,
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )

    class Progress(TrainerCallback):  # type: ignore[misc]
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if not logs or "loss" not in logs:
                return
            elapsed = time.monotonic() - started
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

    dpo_rows = read_jsonl(spec.get("dpo"))
    kto_rows = read_jsonl(spec.get("kto"))
    sft_rows = read_jsonl(spec.get("sft"))
    heldout_rows = read_jsonl(spec.get("heldout"))
    contrast_rows, heldout_contrast = read_jsonl(spec.get("contrast")), read_jsonl(spec.get("heldout_contrast"))
    replay_candidates = replay_candidate_rows(spec) if dpo_rows else []
    if contrast_rows or heldout_contrast or replay_candidates:
        pick = picker(spec, cfg, tokenizer)
        dpo_rows += pick(contrast_rows, cfg.contrast_pairs) + pick(replay_candidates, 1)
        heldout_rows += pick(heldout_contrast, cfg.contrast_pairs)
        del pick  # and the scorer model with it
    if dpo_rows:
        from trl import DPOConfig, DPOTrainer

        losses, weights = (["sigmoid", "sft"], [1.0, cfg.sft_weight]) if cfg.sft_weight > 0 else (["sigmoid"], [1.0])
        trainer: Any = DPOTrainer(
            model=model,
            args=DPOConfig(**common, beta=cfg.beta, loss_type=losses, loss_weights=weights),
            train_dataset=Dataset.from_list(dpo_rows),
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[Progress()],
        )
        kind = "dpo"
    elif kto_rows:
        from trl import KTOConfig, KTOTrainer

        desirable, undesirable = spec.get("kto_weights") or (1.0, 1.0)
        trainer = KTOTrainer(
            model=model,
            args=KTOConfig(**common, beta=cfg.beta, desirable_weight=desirable, undesirable_weight=undesirable),
            train_dataset=Dataset.from_list(kto_rows),
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[Progress()],
        )
        kind = "kto"
    elif sft_rows:
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(**common),
            train_dataset=Dataset.from_list(sft_rows),
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[Progress()],
        )
        kind = "sft"
    else:
        raise SystemExit("nothing to train: the spec names no DPO, KTO or SFT rows")
    trainer.train()
    if kind == "dpo" and cfg.kto_steps > 0 and len({r["label"] for r in kto_rows}) == 2:
        # second stage on the same adapter: thumbs (KTO) teach what the pairs cannot, such as
        # "do not answer a gift-card question with the refund window"
        from trl import KTOConfig, KTOTrainer

        desirable, undesirable = spec.get("kto_weights") or (1.0, 1.0)
        stage2 = {**common, "max_steps": cfg.kto_steps, "output_dir": str(out.parent / "trainer-kto")}
        stage1_model = trainer.model
        if "ref" in stage1_model.peft_config:  # DPO's frozen copy of a starting adapter; KTO makes its own
            stage1_model.set_adapter("default")
            stage1_model.delete_adapter("ref")
        trainer = KTOTrainer(
            model=stage1_model,
            args=KTOConfig(**stage2, beta=cfg.beta, desirable_weight=desirable, undesirable_weight=undesirable),
            train_dataset=Dataset.from_list(kto_rows),
            processing_class=tokenizer,
            callbacks=[Progress()],
        )
        trainer.train()
        kind = "dpo+kto"
    peft_model = trainer.model

    live_adapter = spec.get("live_adapter")
    if live_adapter:
        peft_model.load_adapter(live_adapter, adapter_name=LIVE)
    report = evaluate_pairs(
        peft_model,
        tokenizer,
        heldout_rows,
        live_adapter=LIVE if live_adapter else None,
        beta=cfg.beta,
        generic=load_generic_chat(),
    )

    if live_adapter:
        peft_model.delete_adapter(LIVE)
    peft_model.save_pretrained(out)
    meta = {
        "trainer": kind,
        "train_config": asdict(cfg),
        "base_model": spec["base_model"],
        "dataset_id": spec.get("dataset_id"),
        "rows": {
            "dpo": len(dpo_rows),
            "kto": len(kto_rows),
            "sft": len(sft_rows),
            "contrast_candidates": len(contrast_rows),
            "replay_candidates": len(replay_candidates),
        },
        "init_adapter": spec.get("init_adapter"),
        "report": report.to_dict(),
        "seconds": round(time.monotonic() - started, 1),
    }
    (out / "learnloop.json").write_text(json.dumps(meta, indent=2))
    emit("report", report=report.to_dict(), trainer=kind, seconds=meta["seconds"])


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m training.job SPEC.json")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(json.loads(Path(sys.argv[1]).read_text()))


if __name__ == "__main__":
    main()
