"""Training and cycle configuration (dataclasses; ``server.settings`` fills them from TOML/env), and
``JobSpec``: what the cycle hands the training job."""

from __future__ import annotations

import errno
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from training.chats import check_name
from training.gate import GateConfig
from training.implicit import ImplicitConfig
from training.trust import TrustConfig

CONTRAST_PICKS = ("hash", "live")


DEVICES = ("auto", "cpu", "cuda")


def device_args(device: str, *, cuda_available: bool, bf16_supported: bool) -> dict[str, Any]:
    """The trainer's device and precision: ``use_cpu``, ``bf16`` and where the run trains (``device``).

    ``auto`` takes CUDA when it is there; bf16 mixed precision where the GPU supports it (the
    LoRA's base stays float32 on CPU, where bf16 is slower). ``cuda`` without a GPU is an error,
    not a silent CPU run.
    """
    if device == "cuda" and not cuda_available:
        raise ValueError("training.device is cuda but no CUDA device is present")
    on_gpu = device == "cuda" or (device == "auto" and cuda_available)
    return {
        "use_cpu": not on_gpu,
        "bf16": on_gpu and bf16_supported,
        "fp16": False,
        "device": "cuda" if on_gpu else "cpu",
    }


def job_command(python: str, spec_path: str, *, accelerate_config: str | None, nice: int = 0) -> list[str]:
    """The training job's command line: one process, or ``accelerate launch`` with a config file;
    under ``nice -n NICE`` when ``nice`` is above 0 (every thread and process of the job inherits it
    from the start, imports included)."""
    prefix = ["nice", "-n", str(nice)] if nice else []
    if accelerate_config is None:
        return [*prefix, python, "-m", "training.train", spec_path]
    return [
        *prefix,
        python,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        accelerate_config,
        "-m",
        "training.train",
        spec_path,
    ]


def disk_full(exc: BaseException) -> bool:
    """Did ``exc`` (or an exception it came from) fail because the disk is full (ENOSPC)?

    safetensors' writer raises its own error type, which names the OS error only in its text.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(seen) or f"os error {errno.ENOSPC}" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one LoRA training run (TRL)."""

    max_steps: int = field(
        default=1000,
        metadata={
            "help": "The most optimizer steps of a stage; with epochs 0, exactly this many steps of the preference "
            "(or only) stage (the fixed recipe of the first bench/learning.py runs: 60)."
        },
    )
    epochs: float = field(
        default=1.0,
        metadata={
            "help": "Passes over the run's rows: each stage takes ceil(rows x epochs / batch_size) steps, at most "
            "max_steps, so steps follow the data (bounded by max_minutes). 0 = exactly max_steps steps."
        },
    )
    max_minutes: float = field(
        default=30.0,
        metadata={
            "help": "Time budget of a run's training steps, all stages together: the run stops at the end of the "
            "step that passes it and reports the steps, epochs and share of rows it did."
        },
    )
    demo_epochs: float = field(
        default=1.0,
        metadata={
            "help": "Passes of an SFT stage, after the preference or thumbs stage, over the demonstrations the "
            "pairs do not already teach (operator takeovers; correction demos when sft_weight is 0). 0 = off."
        },
    )
    device: str = field(
        default="auto",
        metadata={"help": "auto (CUDA when present, with bf16 where the GPU has it; CPU otherwise), cpu or cuda."},
    )
    accelerate_config: str | None = field(
        default=None,
        metadata={
            "help": "An accelerate config file: the job runs under `accelerate launch` with it (several GPUs, DDP; "
            "DeepSpeed ZeRO as accelerate configures it). Unset: one process."
        },
    )
    nice: int = field(
        default=19,
        metadata={
            "help": "Niceness of the training job (0-19; 0 = the server's own priority). At 19 the replies being "
            "written take the cores whenever they need them and the job trains on what is left "
            "(bench/train_serve.py)."
        },
    )
    threads: int = field(
        default=0, metadata={"help": "Torch threads of the training job (0 = torch's default, one per core)."}
    )
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
            "help": "Ordinary chat rows (training/data/replay_chat.jsonl, or replay_chat_zh.jsonl where gate.generic_chat "
            "is zh; up to 40, none in the gate's generic set) "
            "added to each run as DPO pairs: chosen = the shipped answer, rejected = an operator correction picked as "
            "contrast_pick says (replays ordinary chat and teaches that shop answers do not belong there; 0 = off)."
        },
    )
    replay_chat: str = field(
        default="",
        metadata={
            "help": "The ordinary chat replay_pairs replays: 'en' or 'zh' (the shipped sets), or a JSONL file of "
            '{"prompt": [messages], "completion": "..."} rows in your customers\' language, none of whose questions '
            "are in gate.generic_chat. Empty: the shipped set in gate.generic_chat's language (English when that is "
            "a file)."
        },
    )
    replay_share: float = field(
        default=0.0,
        metadata={
            "help": "With replay_pairs on: the share of a run's DPO pairs that are replay pairs, when that is more than "
            "replay_pairs (the replay grows with the feedback: a prompt then stands against several corrections; "
            "0 = a fixed replay_pairs)."
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
    guard_every: int = field(
        default=0,
        metadata={
            "help": "Every this many training steps (all stages together) the job measures the adapter's perplexity "
            "on the gate's generic chat; the first time it passes the gate's limit (gate.max_generic_ppl_increase over "
            "the base model's) the run stops and keeps the last weights that passed, instead of ending as a candidate "
            "the gate rejects for forgetting (0 = off)."
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
        if self.epochs < 0 or self.demo_epochs < 0:
            raise ValueError("training.epochs and training.demo_epochs must be 0 or more")
        if self.max_minutes <= 0:
            raise ValueError("training.max_minutes must be above 0")
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
        check_name("training.replay_chat", self.replay_chat, empty_ok=True)
        if not 0 <= self.replay_share < 1:
            raise ValueError(f"training.replay_share {self.replay_share}: use 0 (a fixed count) up to below 1")
        if self.number_pairs < 0:
            raise ValueError("training.number_pairs must be 0 or more")
        if not 0 <= self.nice <= 19:
            raise ValueError(f"training.nice {self.nice}: use 0 (the server's priority) to 19 (the lowest)")
        if self.threads < 0:
            raise ValueError("training.threads must be 0 (torch's default) or more")
        if self.device not in DEVICES:
            raise ValueError(f"training.device {self.device!r}: use one of {', '.join(DEVICES)}")
        if self.guard_every < 0:
            raise ValueError("training.guard_every must be 0 (off) or more")
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
    implicit: ImplicitConfig = field(default_factory=ImplicitConfig)  # implicit.train: weak labels train
    canary_share: float = 0.0  # > 0: a version that passes the gate becomes a canary first

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"


ROW_FILES = ("dpo", "kto", "sft", "heldout", "contrast", "heldout_contrast", "kept")


@dataclass(frozen=True)
class JobSpec:
    """What one training job needs: the cycle writes it (``spec.json`` in the run's folder) beside the
    row files, and ``python -m training.train SPEC`` reads it. The only contract between the two.

    The rows are TRL JSONL files in ``run_dir`` named after ``ROW_FILES`` (``rows_path``): ``dpo``,
    ``kto`` and ``sft`` to train on (operator-reviewed rows repeated), ``heldout`` (pairs) and
    ``kept`` (held-out replies rated up, as KTO rows) for the gate, and with ``contrast_pick =
    "live"`` the contrast candidates apart (``contrast``, ``heldout_contrast``), which the job
    narrows to hard negatives.
    """

    base_model: str = field(metadata={"help": "The base model: a local folder (or a hub id already cached)."})
    train: TrainConfig = field(metadata={"help": "The run's hyperparameters, resolved."})
    run_dir: Path = field(
        metadata={"help": "The run's folder: rows are read from it, the adapter is written to run_dir/adapter."}
    )
    dataset_id: str = field(
        metadata={"help": "Content hash of every clean row (pairs.dataset_id), kept with the adapter."}
    )
    live_adapter: str | None = field(
        default=None,
        metadata={
            "help": "The live version's adapter folder; None when live is the base model. The gate's reference, "
            "the scorer of hard negatives, and with train.init_from = 'live' the starting point."
        },
    )
    kto_weights: tuple[float, float] = field(
        default=(1.0, 1.0),
        metadata={"help": "KTO (desirable_weight, undesirable_weight) that make thumbs up and down weigh the same."},
    )
    system_prompt: str | None = field(default=None, metadata={"help": "Opens the replay rows' prompts."})
    corrections: tuple[str, ...] = field(
        default=(),
        metadata={"help": "The operator corrections in training: the rejected answers of the replay rows."},
    )
    reply_questions: int = field(
        default=16, metadata={"help": "gate.reply_questions: held-out questions each model answers (0: none)."}
    )
    kept_questions: int = field(
        default=16, metadata={"help": "gate.kept_questions: held-out replies rated up that each model answers again."}
    )
    reply_tokens: int = field(default=48, metadata={"help": "gate.reply_tokens: the longest reply of the reply check."})
    generic_chat: str = field(
        default="en", metadata={"help": "gate.generic_chat: the everyday chat of the perplexity and leak checks."}
    )
    generic_ppl_increase: float = field(
        default=0.10,
        metadata={"help": "gate.max_generic_ppl_increase: the forgetting guard's limit (training.guard_every)."},
    )

    def __post_init__(self) -> None:
        if not self.base_model:
            raise ValueError("JobSpec.base_model is empty: name the base model's folder")
        if not self.dataset_id:
            raise ValueError("JobSpec.dataset_id is empty: pass pairs.dataset_id(rows)")
        if len(self.kto_weights) != 2 or min(self.kto_weights) <= 0:
            raise ValueError(
                f"JobSpec.kto_weights {self.kto_weights}: need two weights above 0 (TrainingData.kto_weights)"
            )

    @property
    def output_dir(self) -> Path:
        """Where the job saves the adapter (the cycle moves it to adapters/vN)."""
        return self.run_dir / "adapter"

    @property
    def init_adapter(self) -> str | None:
        """The adapter training continues from; None: a fresh LoRA on the base model."""
        return self.live_adapter if self.train.init_from == "live" else None

    def rows_path(self, name: str) -> Path:
        if name not in ROW_FILES:
            raise ValueError(f"no row file {name!r}: use one of {', '.join(ROW_FILES)}")
        return self.run_dir / f"{name}.jsonl"

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "run_dir": str(self.run_dir)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        raw: dict[str, Any] = json.loads(text)
        train: dict[str, Any] = raw.pop("train")
        return cls(
            **{
                **raw,
                "train": TrainConfig(**{**train, "target_modules": tuple(train["target_modules"])}),
                "run_dir": Path(raw["run_dir"]),
                "kto_weights": tuple(raw["kto_weights"]),
                "corrections": tuple(raw["corrections"]),
            }
        )
