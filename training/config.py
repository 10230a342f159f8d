"""Training and cycle configuration (dataclasses; ``server.settings`` fills them from TOML/env)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from training.gate import GateConfig
from training.trust import TrustConfig

CONTRAST_PICKS = ("hash", "live")


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one LoRA training run (TRL)."""

    max_steps: int = field(default=60, metadata={"help": "Optimizer steps per run."})
    learning_rate: float = field(
        default=2e-4, metadata={"help": "LoRA learning rate. TRL's 1e-6 default is far too low for LoRA."}
    )
    batch_size: int = field(default=2, metadata={"help": "Pairs per step."})
    beta: float = field(default=0.1, metadata={"help": "DPO/KTO beta (strength of the pull to the reference)."})
    sft_weight: float = field(
        default=1.0, metadata={"help": "Weight of the SFT loss on chosen answers, mixed with the DPO loss."}
    )
    contrast_pairs: int = field(
        default=3,
        metadata={
            "help": "Per corrected reply, this many extra DPO pairs rejecting other questions' corrections "
            "(teaches that an answer belongs to its question; 0 = off)."
        },
    )
    contrast_pick: str = field(
        default="live",
        metadata={
            "help": "How the contrast pairs' rejected answers are chosen: 'hash' (a stable hash of the question) or "
            "'live' (the other corrections the live version finds likeliest for the question, scored in the job)."
        },
    )
    replay_pairs: int = field(
        default=20,
        metadata={
            "help": "Ordinary chat rows (training/data/replay_chat.jsonl, up to 40, none in the gate's generic set) "
            "added to each run as DPO pairs: chosen = the shipped answer, rejected = an operator correction picked as "
            "contrast_pick says (replays ordinary chat and teaches that shop answers do not belong there; 0 = off)."
        },
    )
    transplant_pairs: bool = field(
        default=True,
        metadata={
            "help": "Pairs against transplants: a reply customers rated down that repeats a fact of an operator "
            "correction (its numbers, or five words in a row) loses to another version's reply in the same context."
        },
    )
    number_pairs: int = field(
        default=0,
        metadata={
            "help": "Per corrected reply whose correction holds numbers, this many extra DPO pairs rejecting the same "
            "correction with another correction's numbers in it (binds each number to its question; 0 = off)."
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    target_modules: tuple[str, ...] = field(
        default=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        metadata={"help": "Modules that get LoRA weights."},
    )
    max_length: int = field(default=512, metadata={"help": "Longest tokenized prompt+answer; longer ones are cut."})
    seed: int = field(default=0, metadata={"help": "Random seed of the run."})
    kto_steps: int = field(
        default=0,
        metadata={
            "help": "KTO steps on thumbs after the DPO stage, on the same adapter (0 = off; at lr 2e-4, 20 steps "
            "broke SmolLM2: see bench/RESULTS.md)."
        },
    )
    init_from: str = field(
        default="base",
        metadata={
            "help": "Start each run from a fresh LoRA on the base model ('base', on all accepted data so far) "
            "or from the live adapter ('live')."
        },
    )

    @property
    def picks_in_job(self) -> bool:
        """Contrast rows are candidates, narrowed in the training job by the live version's scores."""
        return self.contrast_pick == "live"

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError("training.max_steps must be at least 1")
        if not 0 < self.learning_rate < 1:
            raise ValueError(f"training.learning_rate {self.learning_rate} is out of range; LoRA runs use 1e-5..1e-3")
        if self.batch_size < 1:
            raise ValueError("training.batch_size must be at least 1")
        if self.contrast_pairs < 0:
            raise ValueError("training.contrast_pairs must be 0 or more")
        if self.contrast_pick not in CONTRAST_PICKS:
            raise ValueError(f"training.contrast_pick {self.contrast_pick!r}: use one of {', '.join(CONTRAST_PICKS)}")
        if self.replay_pairs < 0:
            raise ValueError("training.replay_pairs must be 0 or more")
        if self.number_pairs < 0:
            raise ValueError("training.number_pairs must be 0 or more")
        if self.init_from not in ("base", "live"):
            raise ValueError(f"training.init_from {self.init_from!r}: use 'base' or 'live'")


@dataclass(frozen=True)
class CycleConfig:
    """One training cycle: which model, where files go, when to run, how to judge."""

    base_model: str
    data_dir: Path
    system_prompt: str | None = None
    min_new_feedback: int = 10
    heldout_fraction: float = 0.2
    timeout_s: float = 3600.0
    train: TrainConfig = field(default_factory=TrainConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    canary_share: float = 0.0  # > 0: a version that passes the gate becomes a canary first

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"
