"""One training cycle: feedback -> data -> LoRA (subprocess) -> evaluation -> gate -> version.

    export snapshot -> trust filter (erased, excluded, held raters, share caps) -> TRL rows
    -> clean (PII, control tokens, dedupe) -> split -> weight reviewed rows -> JSONL
    -> python -m training.job (progress lines -> training_runs.progress)
    -> move adapter to adapters/vN (atomic rename) -> sha256 -> register candidate
    -> gate.decide -> live (previous live retired) or rejected

A run that fails leaves nothing under ``adapters/`` and its data stays eligible; a run
that trained consumes its data whatever the gate said. The caller (the server's
scheduler, or ``learnloop train``) loads a promoted version into the engine.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from feedback import FeedbackSnapshot, FeedbackStore, RunState, VersionState
from feedback.exceptions import LearnloopError
from training import pairs
from training.clean import CleanReport, clean
from training.config import CycleConfig
from training.gate import EvalReport, decide
from training.policy import should_train
from training.signals import build_training_data
from training.trust import TrustReport, filter_snapshot, weight_reviewed
from training.validate import ADAPTER_FILE, sha256_file

MAX_LOSS_POINTS = 1000

log = logging.getLogger("learnloop.training")

LEASE = "training"
LEASE_TTL_S = 60.0


class CycleStatus(StrEnum):
    SKIPPED = "skipped"
    PROMOTED = "promoted"  # straight to live (canary.share = 0)
    CANARY = "canary"  # passed the gate; serves a share of new conversations
    REJECTED = "rejected"
    FAILED = "failed"


@dataclass(frozen=True)
class CycleResult:
    status: CycleStatus
    reason: str
    version: str | None = None
    run_id: int | None = None
    report: dict[str, Any] | None = None
    gate_reasons: tuple[str, ...] = ()
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class PreparedData:
    """What the next run trains and is judged on, and what was left out and why."""

    data: pairs.TrainingData  # every clean row (lineage covers these)
    train: pairs.TrainingData
    weighted_train: pairs.TrainingData  # operator-reviewed rows repeated
    heldout: pairs.TrainingData
    trust: TrustReport
    cleaning: CleanReport

    @property
    def counts(self) -> dict[str, int]:
        return {**{f"train_{k}": v for k, v in self.train.counts().items()}, "heldout_dpo": len(self.heldout.dpo)}

    def summary(self, *, rows: bool = False) -> dict[str, Any]:
        """The dataset preview (CLI and console): counts per signal, split, what was dropped and why."""
        by_source = collections.Counter([r.source for r in self.data.dpo] + [r.source for r in self.data.sft])
        out: dict[str, Any] = {
            "rows": self.data.counts(),
            "by_signal": {**dict(by_source), "thumbs (kto)": len(self.data.kto)},
            "split": self.counts,
            "trust": self.trust.summary(),
            "held_raters": self.trust.held_raters,
            "new_flags": self.trust.new_flags,
            "capped": self.trust.capped,
            "cleaning": self.cleaning.summary(),
            "dropped": [{"row": row, "reason": reason} for row, reason in self.cleaning.dropped],
        }
        if rows:
            out["train_rows"] = [
                {"kind": kind, "source": getattr(r, "source", "thumbs"), "split": split, **r.to_trl()}
                for split, data in (("train", self.train), ("heldout", self.heldout))
                for kind, rs in (("dpo", data.dpo), ("kto", data.kto), ("sft", data.sft))
                for r in rs
            ]
        return out

    def train_rows(self, kind: str | None = None, *, heldout_too: bool = False) -> list[pairs.Row]:
        """The rows the next run trains on (before weighting), optionally of one kind: dpo, kto or sft.

        ``heldout_too`` adds the rows held out for the gate (an export wants every clean row).
        """
        data = self.data if heldout_too else self.train
        kinds: dict[str, tuple[pairs.Row, ...]] = {"dpo": data.dpo, "kto": data.kto, "sft": data.sft}
        if kind is not None and kind not in kinds:
            raise ValueError("kind must be dpo, kto or sft")
        return [r for k, rows in kinds.items() if kind in (None, k) for r in rows]


def prepare(snapshot: FeedbackSnapshot, cfg: CycleConfig) -> PreparedData:
    """Snapshot -> trust filter -> rows -> cleaning -> split -> weighting. Pure."""
    trusted, trust_report = filter_snapshot(snapshot, cfg.trust)
    data, cleaning = clean(
        build_training_data(
            trusted,
            system_prompt=cfg.system_prompt,
            contrast=cfg.train.contrast_pairs,
            numbers=cfg.train.number_pairs,
            contrast_pool=cfg.train.picks_in_job,
            transplants=cfg.train.transplant_pairs,
        )
    )
    train, heldout = pairs.split(data, cfg.heldout_fraction)
    weighted = weight_reviewed(train, cfg.trust.operator_weight)
    return PreparedData(data, train, weighted, heldout, trust_report, cleaning)


class TrainingJobError(LearnloopError):
    """The training subprocess failed; ``detail`` holds the end of its stderr."""


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return str(path)


class TrainingCycle:
    """Runs cycles one at a time (in this process) against one store."""

    def __init__(
        self, store: FeedbackStore, config: CycleConfig, on_progress: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        self.store = store
        self.config = config
        self.on_progress = on_progress
        self._lock = asyncio.Lock()
        self.job_pid: int | None = None  # the training subprocess while one runs

    @property
    def running(self) -> bool:
        return self._lock.locked()

    async def run(self, *, force: bool = False) -> CycleResult:
        """One cycle, unless one runs already here or in any other process on this store."""
        if self._lock.locked():
            return CycleResult(CycleStatus.SKIPPED, "a training run is already in progress")
        async with self._lock:
            holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
            if not await self.store.acquire_lease(LEASE, holder, LEASE_TTL_S):
                return CycleResult(CycleStatus.SKIPPED, "another process holds the training lease")
            renew = asyncio.create_task(self._renew(holder))
            try:
                # the lease was free, so any run still marked running lost its process
                if n := await self.store.fail_interrupted_runs():
                    log.warning("%d interrupted training runs marked failed", n)
                return await self._run(force=force)
            finally:
                renew.cancel()
                await self.store.release_lease(LEASE, holder)

    async def _renew(self, holder: str) -> None:
        while True:
            await asyncio.sleep(LEASE_TTL_S / 4)
            await self.store.acquire_lease(LEASE, holder, LEASE_TTL_S)

    async def _run(self, *, force: bool) -> CycleResult:
        started = time.monotonic()
        cfg = self.config
        last = await self.store.last_consumed_run()
        new = await self.store.count_new_feedback(
            after_rating_id=last.max_rating_id if last else 0,
            after_correction_id=last.max_correction_id if last else 0,
            after_time=last.started_at if last else 0.0,
        )
        decision = should_train(new_feedback=new, min_new_feedback=cfg.min_new_feedback, running=False, force=force)
        if not decision.train:
            return CycleResult(CycleStatus.SKIPPED, decision.reason)

        snapshot = await self.store.export_feedback()
        prepared = prepare(snapshot, cfg)
        if prepared.trust.new_flags:
            held = await self.store.flag_raters(prepared.trust.new_flags)
            log.warning("held %d raters for review: %s", len(held), ", ".join(held[:10]))
        data, train, heldout, counts = prepared.data, prepared.train, prepared.heldout, prepared.counts
        if not train.dpo and not pairs.class_balance_ok(train) and not train.sft:
            return CycleResult(CycleStatus.SKIPPED, f"no trainable rows yet ({counts})", counts=counts)

        run_id = await self.store.start_run(
            max_rating_id=snapshot.max_rating_id, max_correction_id=snapshot.max_correction_id
        )
        run_dir = cfg.runs_dir / f"run-{run_id}"
        run_dir.mkdir(parents=True, exist_ok=True)
        live = await self.store.live_version()
        adapter_tmp = run_dir / "adapter"
        pool = cfg.train.picks_in_job  # contrast rows are candidates: the job keeps the likeliest

        def rows_of(dpo: tuple[pairs.DPORow, ...], *, contrast: bool, source: bool = False) -> list[dict[str, Any]]:
            picked = [r for r in dpo if not pool or (r.source == "contrast") == contrast]
            return [{**r.to_trl(), "source": r.source} if source else r.to_trl() for r in picked]

        spec: dict[str, Any] = {
            "base_model": cfg.base_model,
            "train": asdict(cfg.train),
            "output_dir": str(adapter_tmp),
            "live_adapter": live.adapter_path,
            "init_adapter": live.adapter_path if cfg.train.init_from == "live" else None,
            "dpo": _write_jsonl(run_dir / "dpo.jsonl", rows_of(prepared.weighted_train.dpo, contrast=False)),
            "kto": _write_jsonl(run_dir / "kto.jsonl", [r.to_trl() for r in prepared.weighted_train.kto]),
            "sft": _write_jsonl(run_dir / "sft.jsonl", [r.to_trl() for r in prepared.weighted_train.sft]),
            "heldout": _write_jsonl(run_dir / "heldout.jsonl", rows_of(heldout.dpo, contrast=False, source=True)),
            "contrast": _write_jsonl(
                run_dir / "contrast.jsonl", rows_of(prepared.weighted_train.dpo, contrast=True) if pool else []
            ),
            "heldout_contrast": _write_jsonl(
                run_dir / "heldout_contrast.jsonl", rows_of(heldout.dpo, contrast=True, source=True) if pool else []
            ),
            "replay": {
                "n": cfg.train.replay_pairs,
                "system_prompt": cfg.system_prompt,
                "corrections": sorted({r.chosen for r in train.dpo if r.source == "correction"}),
            },
            "kto_weights": list(train.kto_weights()),
            "dataset_id": pairs.dataset_id(data),
        }
        spec_path = run_dir / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        log.info("training run %d started: %s", run_id, counts)
        try:
            try:
                job = await self._run_job(run_id, spec_path)
            finally:  # the rows hold customers' words: keep them no longer than the run
                for name in ("dpo", "kto", "sft", "heldout", "contrast", "heldout_contrast"):
                    Path(spec[name]).unlink(missing_ok=True)
            report = EvalReport.from_dict(job["report"])
            if not (adapter_tmp / ADAPTER_FILE).is_file():
                raise TrainingJobError(f"the job reported success but wrote no {ADAPTER_FILE}")
            name = await self.store.next_version_name()
            final = cfg.adapters_dir / name
            final.parent.mkdir(parents=True, exist_ok=True)
            adapter_tmp.rename(final)  # atomic on one filesystem: an adapter is whole or absent
            version = await self.store.register_version(
                name=name,
                adapter_path=str(final),
                sha256=sha256_file(final / ADAPTER_FILE),
                parent=live.name,
                base_model=cfg.base_model,
                eval_report={
                    **report.to_dict(),
                    "cleaning": prepared.cleaning.summary(),
                    "trust": prepared.trust.summary(),
                    "trainer": job.get("trainer"),
                    "counts": counts,
                    "dataset_id": spec["dataset_id"],
                },
                feedback_ids=data.feedback_ids(),
                training_run_id=run_id,
            )
        except Exception as exc:
            detail = str(exc)
            log.error("training run %d failed: %s", run_id, detail)
            await self.store.finish_run(run_id, state=RunState.FAILED, detail=detail[-4000:])
            shutil.rmtree(adapter_tmp, ignore_errors=True)
            return CycleResult(
                CycleStatus.FAILED, detail, run_id=run_id, seconds=time.monotonic() - started, counts=counts
            )
        gate = decide(report, cfg.gate)
        if not gate.promote:
            state, status = VersionState.REJECTED, CycleStatus.REJECTED
        elif cfg.canary_share > 0:
            state, status = VersionState.CANARY, CycleStatus.CANARY
        else:
            state, status = VersionState.LIVE, CycleStatus.PROMOTED
        await self.store.set_version_state(version.name, state, actor="gate", reasons=gate.reasons)
        await self.store.finish_run(
            run_id, state=RunState.SUCCEEDED, version=version.name, detail="; ".join(gate.reasons)
        )
        log.info("training run %d: %s %s (%s)", run_id, version.name, status, "; ".join(gate.reasons))
        return CycleResult(
            status,
            "; ".join(gate.reasons),
            version=version.name,
            run_id=run_id,
            report=report.to_dict(),
            gate_reasons=gate.reasons,
            seconds=time.monotonic() - started,
            counts=counts,
        )

    async def _run_job(self, run_id: int, spec_path: Path) -> dict[str, Any]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "training.job",
            str(spec_path),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        self.job_pid = proc.pid
        stderr_tail: collections.deque[str] = collections.deque(maxlen=40)
        result: dict[str, Any] = {}
        cancelled = False

        async def watch_cancel() -> None:
            nonlocal cancelled
            while proc.returncode is None:
                await asyncio.sleep(0.5)
                if (await self.store.get_run(run_id)).state is RunState.CANCELLING:
                    cancelled = True
                    proc.kill()
                    return

        history: list[dict[str, Any]] = []  # the loss curve the console draws

        async def read_stdout() -> None:
            assert proc.stdout is not None
            async for raw in proc.stdout:
                line = raw.decode(errors="replace").strip()
                if not line.startswith("{"):
                    continue
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if event.get("event") == "progress":
                    if isinstance(event.get("loss"), int | float):
                        history.append({"step": event.get("step"), "loss": event["loss"]})
                        del history[:-MAX_LOSS_POINTS]
                    await self.store.update_run(run_id, progress={**event, "history": history})
                    if self.on_progress:
                        self.on_progress(event)
                    log.info(
                        "run %d step %s/%s loss %.4f eta %ss",
                        run_id,
                        event.get("step"),
                        event.get("max_steps"),
                        event.get("loss", float("nan")),
                        event.get("eta_s"),
                    )
                elif event.get("event") == "report":
                    result.update(event)

        async def read_stderr() -> None:
            assert proc.stderr is not None
            async for raw in proc.stderr:
                stderr_tail.append(raw.decode(errors="replace").rstrip())

        watcher = asyncio.create_task(watch_cancel())
        try:
            await asyncio.wait_for(asyncio.gather(read_stdout(), read_stderr(), proc.wait()), self.config.timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise TrainingJobError(
                f"training job timed out after {self.config.timeout_s:.0f} s and was killed"
            ) from None
        except asyncio.CancelledError:
            proc.kill()
            await proc.wait()
            raise
        finally:
            watcher.cancel()
            self.job_pid = None
        if cancelled:
            raise TrainingJobError("cancelled by an operator")
        if proc.returncode != 0 or "report" not in result:
            tail = "\n".join(stderr_tail)
            raise TrainingJobError(f"training job exited with code {proc.returncode}:\n{tail}")
        return result
