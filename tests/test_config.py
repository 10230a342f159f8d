"""JobSpec, the contract between the cycle and the training job: what one writes, the other reads."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from feedback.records import Correction, FeedbackSnapshot, Message, Rating, Role
from training.config import ROW_FILES, CycleConfig, JobSpec, TrainConfig
from training.cycle import SPEC_FILE, prepare, remove_job_rows, write_job_inputs
from training.train import Rows, replay_candidates


def spec(tmp_path: Path, **changes: object) -> JobSpec:
    base = JobSpec(
        base_model="/models/tiny",
        train=TrainConfig(max_steps=7, contrast_pick="hash", target_modules=("q_proj", "v_proj")),
        run_dir=tmp_path,
        dataset_id="abc123",
        live_adapter="/adapters/v3",
        kto_weights=(0.5, 1.0),
        system_prompt="Be brief.",
        corrections=("Within 30 days.", "3 to 5 days."),
        generic_chat="zh",
    )
    return dataclasses.replace(base, **changes)


def test_job_spec_round_trips_through_json(tmp_path: Path) -> None:
    s = spec(tmp_path)
    assert JobSpec.from_json(s.to_json()) == s
    assert json.loads(s.to_json())["train"]["max_steps"] == 7  # plain JSON, readable in the run folder
    assert s.output_dir == tmp_path / "adapter" and s.rows_path("dpo") == tmp_path / "dpo.jsonl"


def test_job_spec_continues_from_the_live_adapter_only_when_asked(tmp_path: Path) -> None:
    assert spec(tmp_path).init_adapter is None  # init_from = "base": a fresh LoRA
    live = spec(tmp_path, train=TrainConfig(init_from="live"))
    assert live.init_adapter == "/adapters/v3"
    assert dataclasses.replace(live, live_adapter=None).init_adapter is None  # live is the base model


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"base_model": ""}, "base_model"),
        ({"dataset_id": ""}, "dataset_id"),
        ({"kto_weights": (0.0, 1.0)}, "kto_weights"),
        ({"kto_weights": (1.0,)}, "kto_weights"),
    ],
)
def test_job_spec_refuses_what_the_job_could_not_use(tmp_path: Path, changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spec(tmp_path, **changes)


def test_job_spec_names_only_its_row_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no row file"):
        spec(tmp_path).rows_path("../db.sqlite")


def _snapshot() -> FeedbackSnapshot:
    messages, corrections, ratings = [], [], []
    for k in range(8):
        c = f"c{k}"
        messages += [
            Message(f"u{k}", c, 1, Role.USER, f"question {k}?", None),
            Message(f"a{k}", c, 2, Role.ASSISTANT, f"meh {k}", f"u{k}"),
        ]
        corrections.append(Correction(k + 1, f"a{k}", f"answer {k % 3} is {k}", "op"))
        ratings.append(Rating(k + 1, f"a{k}", 1 if k % 2 else -1, f"r{k}", f"x{k}"))
    return FeedbackSnapshot(tuple(messages), tuple(ratings), tuple(corrections))


@pytest.mark.parametrize("pick", ["hash", "live"])
def test_the_job_reads_the_rows_and_spec_the_cycle_wrote(tmp_path: Path, pick: str) -> None:
    cfg = CycleConfig(
        base_model="/models/tiny",
        data_dir=tmp_path,
        system_prompt="Be brief.",
        train=TrainConfig(contrast_pick=pick, contrast_pairs=1, replay_pairs=0),
    )
    prepared = prepare(_snapshot(), cfg)
    written = write_job_inputs(cfg, prepared, run_dir=tmp_path / "run-1", live_adapter=None)
    read = JobSpec.from_json((tmp_path / "run-1" / SPEC_FILE).read_text())
    assert read == written and read.kto_weights == prepared.train.kto_weights()
    assert read.corrections == tuple(sorted({r.chosen for r in prepared.train.dpo if r.source == "correction"}))
    rows = Rows.read(read)
    trained = [r.to_trl() for r in prepared.weighted_train.dpo]
    if pick == "live":  # contrast rows are candidates, apart, for the job to narrow
        assert rows.contrast and all(r in trained for r in rows.dpo + rows.contrast)
        assert len(rows.dpo) + len(rows.contrast) == len(trained)
    else:
        assert rows.dpo == trained and not rows.contrast and not rows.heldout_contrast
    assert rows.kto == [r.to_trl() for r in prepared.weighted_train.kto] and rows.kto
    assert rows.sft == [r.to_trl() for r in prepared.weighted_train.sft] and rows.sft
    assert [{k: v for k, v in r.items() if k != "source"} for r in rows.heldout + rows.heldout_contrast] == [
        r.to_trl() for r in prepared.heldout.dpo if pick == "hash" or r.source != "contrast"
    ] + [r.to_trl() for r in prepared.heldout.dpo if pick == "live" and r.source == "contrast"]
    remove_job_rows(read)
    assert not any(read.rows_path(name).exists() for name in ROW_FILES)
    assert (tmp_path / "run-1" / SPEC_FILE).exists()


def test_the_job_replays_chat_in_the_language_the_gate_guards(tmp_path: Path) -> None:
    """A Chinese deployment (gate.generic_chat = "zh") replays Chinese everyday chat, each prompt
    against each correction; an English one the English set."""
    train = TrainConfig(replay_pairs=2, contrast_pick="hash")
    zh = replay_candidates(spec(tmp_path, train=train))
    assert [r["prompt"][-1]["content"] for r in zh[::2]] == ["你好，今天过得怎么样？", "日本的首都是哪里？"]
    assert {r["rejected"][0]["content"] for r in zh} == {"Within 30 days.", "3 to 5 days."}
    en = replay_candidates(spec(tmp_path, train=train, generic_chat="en"))
    assert en[0]["prompt"][-1]["content"] == "Hello, how are you today?" and len(en) == 4
    # with a share, every shipped prompt is a candidate: the job deals them out (pairs.replay_plan)
    assert len(replay_candidates(spec(tmp_path, train=dataclasses.replace(train, replay_share=0.2)))) == 40 * 2


def test_an_operators_own_replay_file_trains_and_may_not_ask_the_gates_questions(tmp_path: Path) -> None:
    """training.replay_chat: a deployment that guards its own everyday chat replays its own too;
    a replay file that asks a question of the gate's set is refused by the job, by name."""

    def chat(path: Path, *questions: str) -> str:
        rows = [{"prompt": [{"role": "user", "content": q}], "completion": f"{q} Bien sûr."} for q in questions]
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        return str(path)

    generic = chat(tmp_path / "generic_fr.jsonl", "Bonjour, ça va ?", "Quelle heure est-il ?")
    replay = chat(tmp_path / "replay_fr.jsonl", "Quel temps fait-il ?", "Une blague ?")
    own = TrainConfig(replay_pairs=2, contrast_pick="hash", replay_chat=replay)
    rows = replay_candidates(spec(tmp_path, train=own, generic_chat=generic))
    assert [r["prompt"][-1]["content"] for r in rows[::2]] == ["Quel temps fait-il ?", "Une blague ?"]
    chat(Path(replay), "Quel temps fait-il ?", "  quelle heure est-il ? ")
    with pytest.raises(ValueError, match=r"asks 1 question\(s\) of the gate's generic chat .*'quelle heure est-il \?'"):
        replay_candidates(spec(tmp_path, train=own, generic_chat=generic))
    # nothing named: the shipped English set, whatever file the gate reads
    english = replay_candidates(
        spec(tmp_path, train=TrainConfig(replay_pairs=1, contrast_pick="hash"), generic_chat=generic)
    )
    assert english[0]["prompt"][-1]["content"] == "Hello, how are you today?"
    with pytest.raises(
        ValueError, match=r"training.replay_chat 'fr': use en or zh or the path of a JSONL file \(or leave it empty\)"
    ):
        TrainConfig(replay_chat="fr")
