"""The whole loop over real sockets: chat -> feedback -> training cycle -> hot-swap.

The fast variant uses a tiny random Llama; the slow one the real SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from feedback import VersionState
from server.app import App
from server.cli import main as cli_main
from server.settings import load_settings
from server.trainer import describe
from tests.store_backends import store_env
from training.cycle import CycleStatus

CORRECT = "Refunds are accepted within 30 days of delivery."
QUESTIONS = [
    "What is your refund policy?",
    "Can I get my money back?",
    "How do refunds work?",
    "I want to return an item, what are the rules?",
    "Do you refund purchases?",
    "How long do I have to ask for a refund?",
]


def settings_for(model: str, data_dir: Path, **training: Any) -> Any:
    return load_settings(
        env={},
        data_dir=data_dir,
        overrides={
            "console": {"port": 0},
            "channels": {"port": 0},
            "server": {"port": 0},
            "model": {"engine": "transformers", "name": model, "max_new_tokens": 16, "dtype": "float32"},
            "schedule": {"enabled": False, "min_new_feedback": 1, "heldout_fraction": 0.3, "version_poll_s": 0.2},
            "training": training,
            "canary": {"share": 0.0},  # these tests take the direct path: gate -> live
        },
    )


def env_for(settings: Any) -> dict[str, str]:
    """The same settings as LEARNLOOP_* variables, for a `learnloop` process beside the server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEARNLOOP_")}
    env["LEARNLOOP_DATA_DIR"] = str(settings.data_dir)
    env.update(store_env(settings.data_dir))  # the PostgreSQL pass: the test's schema (tests/store_backends.py)
    for section in ("model", "schedule", "training", "gate", "trust", "canary"):
        for key, value in dataclasses.asdict(getattr(settings, section)).items():
            if value is not None:
                value = ",".join(value) if isinstance(value, list | tuple) else value
                env[f"LEARNLOOP_{section.upper()}_{key.upper()}"] = str(value)
    return env


async def train_in_another_process(settings: Any) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server.cli",
        "train",
        env=env_for(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 600)
    assert proc.returncode == 0, err.decode()[-3000:]
    result: dict[str, Any] = json.loads(out.decode()[out.decode().index("{") :])
    return result


async def run_loop(settings: Any, open_client: Any, n_conversations: int, *, train_via_cli: bool) -> None:
    app = App(settings)
    async with app.lifespan():
        assert app.port
        main = await open_client(app.port)  # stays open through the whole test
        ready = await main.hello(user="alice")
        assert ready["model_version"] == "base" and ready["protocol"] == 1
        done, text = await main.chat("Hello!", "m-0")
        assert done["model_version"] == "base"

        corrected: list[str] = []
        for i, question in enumerate(QUESTIONS[:n_conversations]):
            other = await open_client(app.port)
            await other.hello(user=f"customer-{i}")
            done, text = await other.chat(question, f"q-{i}")
            assert done["finish_reason"] in ("stop", "length")
            assert text.strip() or done["finish_reason"] == "stop"
            # thumbs down, acknowledged only after commit; a replay is acknowledged again, not duplicated
            for _ in range(2):
                await other.send(type="rating", message_id=done["message_id"], value=-1, id=f"r-{i}", reason="wrong")
                ack, _ = await other.until("ack")
                assert ack == {"type": "ack", "id": f"r-{i}"}
            if i % 2 == 0:
                # regenerate: a sibling reply, then rate it up
                await other.send(type="regenerate", message_id=done["message_id"])
                regen, _ = await other.until("done")
                assert regen["regenerated_from"] == done["message_id"]
                await other.send(type="rating", message_id=regen["message_id"], value=1, id=f"r-{i}-up")
                await other.until("ack")
            corrected.append(done["message_id"])

        # operators correct through the CLI, writing to the same database while the server runs
        for message_id in corrected:
            argv = ["--data-dir", str(settings.data_dir), "correct", message_id, CORRECT]
            assert await asyncio.to_thread(cli_main, argv) == 0

        if train_via_cli:
            # `learnloop train` in its own process; the server notices the promotion by polling
            result = await train_in_another_process(settings)
            for _ in range(100):
                if app.release.live_version == "v1":
                    break
                await asyncio.sleep(0.1)
        else:
            result = describe(await app.trainer.run())
        assert result["status"] == CycleStatus.PROMOTED, result
        assert result["version"] == "v1" and app.release.live_version == "v1"
        assert result["report"]["candidate"]["chosen_nll"] < result["report"]["live"]["chosen_nll"]
        assert result["counts"]["heldout_dpo"] >= 1
        # the job also read what both models say to the held-out corrected questions (gate.judge)
        replies = result["report"]["replies"]
        assert replies["n"] >= 1 and replies["examples"][0]["answer"] == CORRECT
        assert replies["wins"] + replies["losses"] <= replies["n"]

        version = await app.store.versions.get("v1")  # type: ignore[union-attr]
        assert version.state is VersionState.LIVE
        assert version.sha256 and Path(version.adapter_path or "", "adapter_model.safetensors").is_file()
        assert version.parent == "base"
        assert version.feedback_ids["corrections"] and version.feedback_ids["ratings"]
        assert version.eval_report and version.eval_report["n_heldout"] >= 1

        # the connection opened before training is still up, and new replies come from v1
        done, _ = await main.chat("What is your refund policy?", "m-1")
        assert done["model_version"] == "v1"
        messages = await app.store.conversations.messages(ready["conversation_id"])  # type: ignore[union-attr]
        assert [m.model_version for m in messages if m.role == "assistant"] == ["base", "v1"]


async def test_whole_loop_tiny_model(tiny_model: Path, tmp_path: Path, open_client: Any) -> None:
    settings = settings_for(
        str(tiny_model), tmp_path / "data", max_steps=10, epochs=0.0, learning_rate=1e-3, replay_pairs=0
    )
    await run_loop(settings, open_client, n_conversations=6, train_via_cli=True)


async def test_scheduled_cycle_promotes_inside_the_server(tiny_model: Path, tmp_path: Path, open_client: Any) -> None:
    settings = settings_for(
        str(tiny_model), tmp_path / "data", max_steps=10, epochs=0.0, learning_rate=1e-3, replay_pairs=0
    )
    settings = dataclasses.replace(
        settings, schedule=dataclasses.replace(settings.schedule, enabled=True, interval_s=0.5, min_new_feedback=4)
    )
    app = App(settings)
    async with app.lifespan():
        main = await open_client(app.port)
        await main.hello()
        for i, question in enumerate(QUESTIONS[:4]):
            c = await open_client(app.port)
            await c.hello(user=f"u{i}")
            done, _ = await c.chat(question, f"q{i}")
            await app.store.conversations.add_correction(message_id=done["message_id"], text=CORRECT, operator="op")  # type: ignore[union-attr]
        for _ in range(600):  # the APScheduler job trains and promotes on its own
            if app.release.live_version == "v1":
                break
            await asyncio.sleep(0.1)
        assert app.release.live_version == "v1"
        runs = await app.store.runs.recent()  # type: ignore[union-attr]
        assert [r.state for r in runs] == ["succeeded"] and runs[0].progress
        # the pairs' stage ran its 10 steps (a demo stage may follow it: its steps start again at 1)
        steps = [h["step"] for h in runs[0].progress["history"]]
        assert steps[:10] == list(range(1, 11)), steps
        done, _ = await main.chat("What is your refund policy?", "after")
        assert done["model_version"] == "v1"


@pytest.mark.slow
async def test_whole_loop_smollm2(tmp_path: Path, open_client: Any) -> None:
    settings = settings_for("smollm2-135m-instruct", tmp_path / "data", max_steps=4, learning_rate=5e-4)
    settings = dataclasses.replace(settings, model=dataclasses.replace(settings.model, max_new_tokens=24))
    # five raters: with trust.max_rater_share = 0.2, fewer could not contribute ratings at all
    await run_loop(settings, open_client, n_conversations=5, train_via_cli=False)
