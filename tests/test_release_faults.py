"""Faults around training and release: killed jobs, races, cancels, time-outs, bad adapter files."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import signal
import struct
import uuid
from pathlib import Path
from typing import Any

import pytest

from feedback import FeedbackStore, RunState, VersionState
from server.app import AdapterRejectedError, App
from server.settings import load_settings
from tests.factories import build_tiny_model
from tests.test_engine import make_adapter
from training.config import CycleConfig, TrainConfig
from training.cycle import CycleStatus, TrainingCycle, sha256_file
from training.pairs import replay_plan

ANSWER = "Refunds are accepted within 30 days of delivery."


async def seed(store: FeedbackStore, n: int = 6, answers: tuple[str, ...] = (ANSWER,)) -> None:
    await store.versions.ensure_base("unused")
    for i in range(n):
        cid = uuid.uuid4().hex
        await store.conversations.create(cid, user_id=f"u{i}")
        u = await store.conversations.add_message(
            message_id=uuid.uuid4().hex,
            conversation_id=cid,
            role="user",  # type: ignore[arg-type]
            text=f"What is your refund policy, question {i}?",
            parent_id=None,
        )
        a = await store.conversations.add_message(
            message_id=uuid.uuid4().hex,
            conversation_id=cid,
            role="assistant",  # type: ignore[arg-type]
            text=f"no idea {i}",
            parent_id=u.id,
            model_version="base",
        )
        await store.conversations.add_correction(message_id=a.id, text=answers[i % len(answers)], operator="op")


def config(model: Path, data_dir: Path, **train: Any) -> CycleConfig:
    return CycleConfig(
        base_model=str(model),
        data_dir=data_dir,
        min_new_feedback=1,
        heldout_fraction=0.3,
        # replay rows off: on a random tiny model they would only dilute the few seeded pairs
        # exactly max_steps steps (epochs 0): the slow and hung jobs below train until stopped
        train=TrainConfig(**{"max_steps": 10, "epochs": 0.0, "learning_rate": 1e-3, "replay_pairs": 0, **train}),
    )


async def wait_for_job(cycle: TrainingCycle, store: FeedbackStore) -> None:
    for _ in range(600):
        runs = await store.runs.recent()
        if cycle.job_pid and runs and runs[0].progress:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the training job never reported progress")


async def test_killed_job_leaves_live_serving_and_the_next_run_succeeds(tiny_model: Path, tmp_path: Path) -> None:
    async with await FeedbackStore.open(tmp_path / "db.sqlite") as store:
        await seed(store)
        slow = TrainingCycle(store, config(tiny_model, tmp_path, max_steps=100_000))
        task = asyncio.create_task(slow.run())
        await wait_for_job(slow, store)
        os.kill(slow.job_pid, signal.SIGKILL)  # type: ignore[arg-type]
        result = await task
        assert result.status is CycleStatus.FAILED and "exited with code -9" in result.reason
        assert (await store.versions.live()).name == "base"
        assert not (tmp_path / "adapters").exists() or not any((tmp_path / "adapters").iterdir())
        assert (await store.runs.recent())[0].state is RunState.FAILED
        # the data was not consumed: the next run trains on it without --force
        result = await TrainingCycle(store, config(tiny_model, tmp_path)).run()
        assert result.status is CycleStatus.PROMOTED and result.version == "v1"


async def test_a_kill_during_the_adapter_save_publishes_nothing(tiny_model: Path, tmp_path: Path) -> None:
    """The job is killed after the weights are written and before the adapter's metadata is: the
    half-saved folder never becomes a version, and the next run trains on the same data."""
    async with await FeedbackStore.open(tmp_path / "db.sqlite") as store:
        await seed(store)
        cycle = TrainingCycle(store, config(tiny_model, tmp_path))
        task = asyncio.create_task(cycle.run())
        adapter = cycle.config.runs_dir / "run-1" / "adapter"
        for _ in range(600):  # the run's folder exists (its rows) before the job starts training
            if adapter.parent.is_dir():
                break
            await asyncio.sleep(0.05)
        adapter.mkdir(parents=True, exist_ok=True)
        # learnloop.json is written last (after the weights): as a FIFO nobody reads, writing it
        # blocks, which holds the job inside the save for as long as the test needs
        os.mkfifo(adapter / "learnloop.json")
        for _ in range(1200):
            if (adapter / "adapter_model.safetensors").is_file() and cycle.job_pid:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the job never wrote its weights")
        os.kill(cycle.job_pid, signal.SIGKILL)  # type: ignore[arg-type]
        result = await task
        assert result.status is CycleStatus.FAILED and "exited with code -9" in result.reason
        assert (await store.versions.live()).name == "base" and len(await store.versions.all()) == 1
        assert not adapter.exists()  # the half-saved folder is gone
        assert not (tmp_path / "adapters").exists() or not any((tmp_path / "adapters").iterdir())
        result = await TrainingCycle(store, config(tiny_model, tmp_path)).run()
        assert result.status is CycleStatus.PROMOTED and result.version == "v1"


async def test_two_triggers_train_once(tiny_model: Path, tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite"
    async with await FeedbackStore.open(db) as store_a, await FeedbackStore.open(db) as store_b:
        await seed(store_a)
        # two "processes" (separate connections and cycles) and a double trigger within one;
        # --force skips the amount check, never the one-at-a-time rule
        a = TrainingCycle(store_a, config(tiny_model, tmp_path))
        b = TrainingCycle(store_b, config(tiny_model, tmp_path))
        results = await asyncio.gather(a.run(), a.run(force=True), b.run(force=True))
        statuses = sorted(r.status for r in results)
        assert statuses.count(CycleStatus.PROMOTED) == 1 and statuses.count(CycleStatus.SKIPPED) == 2
        assert any("lease" in r.reason for r in results) and any("in progress" in r.reason for r in results)
        assert len(await store_a.runs.recent()) == 1


async def test_cancel_and_timeout_fail_the_run_cleanly(tiny_model: Path, tmp_path: Path) -> None:
    async with await FeedbackStore.open(tmp_path / "db.sqlite") as store:
        await seed(store)
        slow = TrainingCycle(store, config(tiny_model, tmp_path, max_steps=100_000))
        task = asyncio.create_task(slow.run())
        await wait_for_job(slow, store)
        run = (await store.runs.recent())[0]
        assert await store.runs.request_cancel(run.id, actor="op")
        result = await task
        assert result.status is CycleStatus.FAILED and result.reason == "cancelled by an operator"
        hung = TrainingCycle(store, dataclasses.replace(config(tiny_model, tmp_path, max_steps=100_000), timeout_s=8))
        result = await hung.run()
        assert result.status is CycleStatus.FAILED and "timed out" in result.reason
        assert [r.state for r in await store.runs.recent()] == [RunState.FAILED, RunState.FAILED]
        assert (await store.versions.live()).name == "base"


async def test_interrupted_runs_are_marked_failed_by_the_next_cycle(tiny_model: Path, tmp_path: Path) -> None:
    async with await FeedbackStore.open(tmp_path / "db.sqlite") as store:
        await seed(store)
        orphan = await store.runs.start(max_rating_id=0, max_correction_id=0)  # its process "died"
        result = await TrainingCycle(store, config(tiny_model, tmp_path)).run()
        assert result.status is CycleStatus.PROMOTED
        assert (await store.runs.get(orphan)).state is RunState.FAILED


@pytest.fixture
def bad_adapters(tiny_model: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (folder, sha256 registered for it)."""
    out: dict[str, tuple[Path, str]] = {}
    good = make_adapter(tiny_model, tmp_path / "good", seed=1)
    out["good"] = (good, sha256_file(good / "adapter_model.safetensors"))
    truncated = make_adapter(tiny_model, tmp_path / "truncated", seed=2)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    out["truncated"] = (truncated, sha256_file(weights))  # the checksum matches: the file is still cut short
    tampered = make_adapter(tiny_model, tmp_path / "tampered", seed=3)
    digest = sha256_file(tampered / "adapter_model.safetensors")
    data = bytearray((tampered / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tampered / "adapter_model.safetensors").write_bytes(bytes(data))
    out["tampered"] = (tampered, digest)
    other = build_tiny_model(tmp_path / "other-model", vocab_size=300)
    import json

    cfg = json.loads((other / "config.json").read_text())
    cfg.update(hidden_size=32, intermediate_size=64)
    (other / "config.json").write_text(json.dumps(cfg))
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(other)).save_pretrained(other)
    wrong = make_adapter(other, tmp_path / "wrong-shapes", seed=4)
    out["wrong-shapes"] = (wrong, sha256_file(wrong / "adapter_model.safetensors"))
    pickled = make_adapter(tiny_model, tmp_path / "pickled", seed=5)
    (pickled / "adapter_model.bin").write_bytes(b"not today")
    out["pickled"] = (pickled, sha256_file(pickled / "adapter_model.safetensors"))
    # damaged before it was registered (its checksum matches): the header checks must catch it
    oversize = make_adapter(tiny_model, tmp_path / "header-length", seed=6)
    weights = oversize / "adapter_model.safetensors"
    weights.write_bytes(struct.pack("<Q", 2**40) + weights.read_bytes()[8:])
    out["header-length"] = (oversize, sha256_file(weights))
    flipped = make_adapter(tiny_model, tmp_path / "dtype-flip", seed=7)
    weights = flipped / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data.replace(b'"dtype":"F32"', b'"dtype":"F16"', 1))
    assert weights.read_bytes() != data
    out["dtype-flip"] = (flipped, sha256_file(weights))
    return out


CHECK = {
    "truncated": "truncated",
    "tampered": "checksum",
    "wrong-shapes": "shape",
    "pickled": "pickle",
    "header-length": "header",
    "dtype-flip": "tensor",
}


@pytest.mark.parametrize("kind", sorted(CHECK))
async def test_bad_adapter_is_refused_and_the_old_version_keeps_serving(
    kind: str,
    bad_adapters: dict[str, tuple[Path, str]],
    tiny_model: Path,
    tmp_path: Path,
    open_client: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = load_settings(
        env={},
        data_dir=tmp_path / "data",
        overrides={
            "console": {"port": 0},
            "channels": {"port": 0},
            "server": {"port": 0},
            "model": {"name": str(tiny_model), "max_new_tokens": 6},
            "schedule": {"enabled": False, "version_poll_s": 3600},
            "canary": {"share": 0.5, "check_interval_s": 3600},
        },
    )
    app = App(settings)
    async with app.lifespan():
        assert app.store is not None
        good, good_sha = bad_adapters["good"]
        await app.store.versions.register(
            adapter_path=str(good),
            sha256=good_sha,
            parent="base",
            base_model="m",
            eval_report={},
            feedback_ids={},
            training_run_id=None,
        )
        await app.release.promote("v1", actor="test")
        assert app.release.live_version == "v1"
        folder, sha = bad_adapters[kind]
        await app.store.versions.register(
            adapter_path=str(folder),
            sha256=sha,
            parent="v1",
            base_model="m",
            eval_report={},
            feedback_ids={},
            training_run_id=None,
        )
        # as a canary: refused and rolled back automatically
        await app.store.versions.set_state("v2", VersionState.CANARY, actor="gate")
        await app.release.sync()
        v2 = await app.store.versions.get("v2")
        assert v2.state is VersionState.ROLLED_BACK and any("refused" in r for r in v2.gate_reasons)
        assert app.release.canary_version is None
        # promoted by hand: refused, and v1 keeps serving
        await app.store.versions.set_state("v2", VersionState.LIVE, actor="test")
        with pytest.raises(AdapterRejectedError):
            await app.release.sync()
        assert app.release.live_version == "v1" and "v2" not in app.engine.versions  # type: ignore[union-attr]
        # the alert: a metric by failed check and an error line, for each refusal (canary, then live)
        refusals = app.metrics.registry.get_sample_value("learnloop_adapter_refusals_total", {"check": CHECK[kind]})
        assert refusals == 2
        alerts = [r for r in caplog.records if r.levelname == "ERROR" and "adapter refused" in r.getMessage()]
        assert len(alerts) == 2 and all(getattr(r, "version", None) == "v2" for r in alerts)
        client = await open_client(app.port)
        assert (await client.hello())["model_version"] == "v1"
        done, _ = await client.chat("still serving?", "x")
        assert done["model_version"] == "v1"


def polling_settings(tiny_model: Path, tmp_path: Path) -> Any:
    """A gateway alone (no console, no channels) whose version poll runs every 50 ms."""
    return load_settings(
        env={},
        data_dir=tmp_path / "data",
        overrides={
            "console": {"enabled": False},
            "channels": {"enabled": False},
            "server": {"port": 0},
            "model": {"name": str(tiny_model), "max_new_tokens": 6},
            "schedule": {"enabled": False, "version_poll_s": 0.05},
        },
    )


async def test_a_live_version_refused_at_start_up_serves_base_with_one_alert(
    tiny_model: Path, tmp_path: Path, open_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario 7: the store's live version has a corrupted adapter when the server starts. It
    serves the base model, says so in one error line and one count, and the version poll does
    not re-alert; promoting a good version by hand serves it."""
    settings = polling_settings(tiny_model, tmp_path)
    good = make_adapter(tiny_model, tmp_path / "good", seed=1)
    async with await FeedbackStore.open(settings.db_path) as store:
        await store.versions.ensure_base(str(tiny_model))
        for folder in (make_adapter(tiny_model, tmp_path / "v1", seed=2), good):
            await store.versions.register(
                adapter_path=str(folder),
                sha256=sha256_file(folder / "adapter_model.safetensors"),
                parent="base",
                base_model=str(tiny_model),
                eval_report={},
                feedback_ids={},
                training_run_id=None,
            )
        await store.versions.set_state("v1", VersionState.LIVE, actor="test")
    weights = tmp_path / "v1" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit flipped on disk after registration
    weights.write_bytes(bytes(data))

    caplog.set_level(logging.INFO)
    app = App(settings)
    async with app.lifespan():
        assert app.release is not None and app.port is not None
        assert app.release.live_version == "base"
        client = await open_client(app.port)
        assert (await client.hello())["model_version"] == "base"
        done, _ = await client.chat("are you serving?", "m1")
        assert done["model_version"] == "base"
        for _ in range(10):  # rounds of the version poll (every 0.05 s) and a sync by hand
            await asyncio.sleep(0.05)
        await app.release.sync()
        assert app.release.live_version == "base" and "v1" not in app.engine.versions  # type: ignore[union-attr]
        refusals = app.metrics.registry.get_sample_value("learnloop_adapter_refusals_total", {"check": "checksum"})
        assert refusals == 1
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("learnloop")]
        assert len(errors) == 1, [r.getMessage() for r in errors]
        assert "adapter refused (checksum)" in errors[0].getMessage() and errors[0].exc_info is None
        assert getattr(errors[0], "version", None) == "v1"
        assert any("serving base" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)

        await app.release.promote("v2", actor="op")  # the way out: a good version, by hand
        assert app.release.live_version == "v2"
        done, _ = await client.chat("and now?", "m2")
        assert done["model_version"] == "v2"


async def test_a_live_adapter_missing_while_its_volume_mounts_is_retried_and_said_once(
    tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A passing fault (the weights file not there yet) is not remembered like a corrupt file: base
    serves meanwhile, one warning line and one count, and the version poll loads it once it appears."""
    settings = polling_settings(tiny_model, tmp_path)
    folder = make_adapter(tiny_model, tmp_path / "v1", seed=2)
    weights = folder / "adapter_model.safetensors"
    async with await FeedbackStore.open(settings.db_path) as store:
        await store.versions.ensure_base(str(tiny_model))
        await store.versions.register(
            adapter_path=str(folder),
            sha256=sha256_file(weights),
            parent="base",
            base_model=str(tiny_model),
            eval_report={},
            feedback_ids={},
            training_run_id=None,
        )
        await store.versions.set_state("v1", VersionState.LIVE, actor="test")
    aside = tmp_path / "aside.safetensors"
    weights.rename(aside)  # the volume has not mounted yet

    caplog.set_level(logging.INFO)
    app = App(settings)
    async with app.lifespan():
        assert app.release is not None and app.engine is not None
        assert app.release.live_version == "base"
        for _ in range(10):  # rounds of the version poll (every 0.05 s) and a sync by hand
            await asyncio.sleep(0.05)
        await app.release.sync()
        assert app.release.live_version == "base" and "v1" not in app.release.refused_live
        aside.rename(weights)  # mounted
        for _ in range(200):
            if app.release.live_version == "v1":
                break
            await asyncio.sleep(0.05)
        assert app.release.live_version == "v1" and "v1" in app.engine.versions
        said = [r for r in caplog.records if "not loadable yet" in r.getMessage()]
        assert len(said) == 1 and said[0].levelno == logging.WARNING
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("learnloop")]
        refusals = app.metrics.registry.get_sample_value("learnloop_adapter_refusals_total", {"check": "missing"})
        assert refusals == 1


async def test_continuing_from_live_with_a_kto_stage(tiny_model: Path, tmp_path: Path) -> None:
    """init_from=live starts from v1's weights; thumbs both ways add a KTO stage on the same adapter."""
    async with await FeedbackStore.open(tmp_path / "db.sqlite") as store:
        await seed(store)
        first = await TrainingCycle(store, config(tiny_model, tmp_path)).run()
        assert first.status is CycleStatus.PROMOTED and first.version == "v1"
        snapshot = await store.conversations.export_feedback()
        replies = [m for m in snapshot.messages if m.role == "assistant"]
        for n, reply in enumerate(replies):
            await store.conversations.add_rating(
                message_id=reply.id, value=1 if n % 2 else -1, rater=f"u{n}", client_id="t"
            )
        again = TrainingCycle(store, config(tiny_model, tmp_path, init_from="live", kto_steps=3))
        result = await again.run(force=True)
        assert result.status in (CycleStatus.PROMOTED, CycleStatus.REJECTED), result.reason
        version = await store.versions.get(result.version or "")
        assert version.eval_report is not None and version.eval_report["trainer"] == "dpo+kto"
        # the corrections' demos are their pairs' chosen answers: no SFT stage; the budget is recorded
        budget = version.eval_report["budget"]
        assert [(s["trainer"], s["steps"]) for s in budget["stages"]] == [("dpo", 10), ("kto", 3)]
        assert budget["max_minutes"] == 30.0 and 0 < budget["share_seen"] <= 1
        assert version.parent == "v1"


async def test_live_contrast_pick_keeps_the_likeliest_candidates(tiny_model: Path, tmp_path: Path) -> None:
    """contrast_pick = "live": the cycle hands every other correction to the job as a candidate, and
    the job keeps the ``contrast_pairs`` likeliest under the live version (the base model, then v1)."""
    answers = (ANSWER, "Standard shipping takes 3 to 5 business days.", "We accept Visa, Mastercard and PayPal.")
    async with await FeedbackStore.open(tmp_path / "db.sqlite") as store:
        await seed(store, n=9, answers=answers)
        cfg = config(tiny_model, tmp_path, contrast_pairs=1, contrast_pick="live")
        for expected_live in ("base", "v1"):
            result = await TrainingCycle(store, cfg).run(force=True)
            assert result.status is CycleStatus.PROMOTED, result.reason
            version = await store.versions.get(result.version or "")
            assert version.parent == expected_live
            meta = json.loads((Path(version.adapter_path or "") / "learnloop.json").read_text())
            train_corrections = meta["rows"]["contrast_candidates"] // 2  # two other answers each
            assert train_corrections > 0
            # each training correction twice (operator weight 2) and its one picked contrast pair
            assert meta["rows"]["dpo"] == 3 * train_corrections
            assert version.eval_report is not None and version.eval_report["n_heldout"] == 2 * (9 - train_corrections)


async def test_replay_pairs_add_ordinary_chat_against_a_correction(tiny_model: Path, tmp_path: Path) -> None:
    """replay_pairs: ordinary chat prompts with their shipped answers as chosen, one operator
    correction (the live version's likeliest there) as rejected."""
    answers = (ANSWER, "Standard shipping takes 3 to 5 business days.")
    async with await FeedbackStore.open(tmp_path / "db.sqlite") as store:
        await seed(store, n=6, answers=answers)
        cfg = config(tiny_model, tmp_path, replay_pairs=4, contrast_pairs=0, contrast_pick="live")
        result = await TrainingCycle(store, cfg).run(force=True)
        assert result.status is CycleStatus.PROMOTED, result.reason
        version = await store.versions.get(result.version or "")
        meta = json.loads((Path(version.adapter_path or "") / "learnloop.json").read_text())
        assert meta["rows"]["replay_candidates"] == 4 * 2  # four prompts, each against both answers
        corrections = meta["rows"]["dpo"] - 4  # one replay pair per prompt, the rest operator rows (x2)
        assert corrections > 0 and corrections % 2 == 0


async def test_replay_share_grows_the_replay_with_the_runs_pairs(tiny_model: Path, tmp_path: Path) -> None:
    """replay_share: the replay pairs make that share of the run's pairs, spread over every shipped
    prompt, each prompt against as many corrections as the share needs (here both)."""
    answers = (ANSWER, "Standard shipping takes 3 to 5 business days.")
    async with await FeedbackStore.open(tmp_path / "db.sqlite") as store:
        await seed(store, n=6, answers=answers)
        cfg = config(tiny_model, tmp_path, replay_pairs=2, replay_share=0.9, contrast_pairs=0, contrast_pick="live")
        result = await TrainingCycle(store, cfg).run(force=True)
        # the job ran; on a random tiny model nine replay pairs in ten may drown the seeded ones at the gate
        assert result.status in (CycleStatus.PROMOTED, CycleStatus.REJECTED), result.reason
        version = await store.versions.get(result.version or "")
        meta = json.loads((Path(version.adapter_path or "") / "learnloop.json").read_text())
        assert meta["rows"]["replay_candidates"] == 40 * 2  # every shipped prompt, each against both answers
        others = 2 * result.counts["train_dpo"]  # each training correction twice (operator weight 2)
        plan = replay_plan(others, prompts=2, share=0.9, candidates=[2] * 40)
        # nine in ten asks for 9 * others pairs; each prompt can stand against both answers, no more
        assert plan == [2] * 40 if 9 * others >= 80 else sum(plan) == math.ceil(9 * others)
        assert meta["rows"]["dpo"] == others + sum(plan)
