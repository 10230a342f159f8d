"""What a demonstration costs to train beside preference pairs, two ways, on the tiny random Llama:

* an SFT stage after DPO (what ``training.train`` does, ``training.demo_epochs``): SFTTrainer
  steps on the demos, prompt-completion, loss on the reply;
* the demo folded into the DPO run as a pair whose chosen and rejected are both the demo: the
  sigmoid term's gradient is 0 there and DPO's SFT term (``sft_weight``) trains the reply, but
  each such row pays DPO's four forward passes (policy and reference, chosen and rejected).

    python bench/demo_stage.py [--rows 16] [--steps 8]

Prints seconds per trained demo row each way (the faster of two alternating runs each, as the
first trainer pays a one-off warm-up) and their ratio, measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.factories import build_tiny_model
from training.config import JobSpec, TrainConfig
from training.train import load_model, load_tokenizer
from training.trainers import Deadline, Objective, Progress, build_trainer

DEMO = [
    {"role": "user", "content": "Where is my order?"},
    {"role": "assistant", "content": "You can track your order from the Orders page of your account."},
]


def seconds_per_row(objective: Objective, rows: list[dict[str, Any]], spec: JobSpec) -> float:
    tokenizer = load_tokenizer(spec.base_model)
    model, lora = load_model(spec)
    deadline = Deadline(time.monotonic() + 3600)
    trainer = build_trainer(objective, model, tokenizer, lora, rows, spec, Progress(time.monotonic()), deadline)
    started = time.monotonic()
    trainer.train()
    return (time.monotonic() - started) / (trainer.state.global_step * spec.train.batch_size)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "tiny")
        cfg = TrainConfig(max_steps=args.steps, replay_pairs=0, contrast_pick="hash", lora_r=4, lora_alpha=8)
        spec = JobSpec(base_model=str(model), train=cfg, run_dir=Path(tmp) / "run", dataset_id="bench")
        sft_rows = [{"prompt": DEMO[:1], "completion": DEMO[1:]}] * args.rows
        pair_rows = [{"prompt": DEMO[:1], "chosen": DEMO[1:], "rejected": DEMO[1:]}] * args.rows
        # twice each, alternating, keeping the faster: the first trainer pays one-off warm-up
        sft = dpo = float("inf")
        for _ in range(2):
            sft = min(sft, seconds_per_row(Objective.SFT, sft_rows, spec))
            dpo = min(dpo, seconds_per_row(Objective.DPO, pair_rows, spec))
    print(f"SFT stage:          {sft * 1000:.1f} ms per demo row")
    print(f"as DPO pairs (+sft): {dpo * 1000:.1f} ms per demo row")
    print(f"ratio (pairs / stage): {dpo / sft:.2f}")


if __name__ == "__main__":
    main()
