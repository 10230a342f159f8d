"""One training cycle: feedback -> data -> LoRA (subprocess) -> evaluation -> gate -> version.

    export snapshot -> trust filter (erased, excluded, held raters, share caps) -> TRL rows
    -> clean (PII, control tokens, dedupe) -> split -> weight reviewed rows    (prepare, pure)
    -> JSONL rows + spec.json (a JobSpec)                                        (write_job_inputs)
    -> python -m training.train SPEC (progress lines -> training_runs.progress)  (_run_job)
    -> move adapter to adapters/vN (atomic rename) -> sha256 -> register candidate (_register)
    -> gate.decide -> live (previous live retired), canary or rejected          (_gate)

A run that fails leaves nothing under ``adapters/`` and its data stays eligible (a full disk
makes its detail start ``storage_full:``); a run
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
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from feedback import FeedbackSnapshot, FeedbackStore, ModelVersion, RunState, VersionState
from feedback.exceptions import ErrorCode, LearnloopError
from training import pairs
from training.clean import CleanReport, clean
from training.config import ROW_FILES, CycleConfig, JobSpec, disk_full, job_command
from training.gate import EvalReport, decide
from training.policy import TrainDecision, should_train
from training.signals import build_training_data
from training.trust import TrustReport, filter_snapshot, weight_reviewed
from training.validate import ADAPTER_FILE, sha256_file

MAX_LOSS_POINTS = 1000
SPEC_FILE = "spec.json"  # in the run's folder, beside the row files

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
        implicit = sum(1 for r in self.train.kto if r.signal)
        return {
            **{f"train_{k}": v for k, v in self.train.counts().items()},
            "heldout_dpo": len(self.heldout.dpo),
            **({"heldout_kept": n} if (n := len(self.heldout.kept())) else {}),  # replies rated up, held out
            **({"train_implicit": implicit} if implicit else {}),  # of train_kto: weak labels (implicit.train)
        }

    @property
    def trainable(self) -> bool:
        """Pairs, thumbs of both kinds (KTO needs both) or demonstrations to train on."""
        return bool(self.train.dpo) or pairs.class_balance_ok(self.train) or bool(self.train.sft)

    def summary(self, *, rows: bool = False) -> dict[str, Any]:
        """The dataset preview (CLI and console): counts per signal, split, what was dropped and why."""
        by_source = collections.Counter([r.source for r in self.data.dpo] + [r.source for r in self.data.sft])
        out: dict[str, Any] = {
            "rows": self.data.counts(),
            "by_signal": {
                **dict(by_source),
                "thumbs (kto)": sum(1 for r in self.data.kto if r.signal is None),
                **({"implicit (kto)": n} if (n := sum(1 for r in self.data.kto if r.signal)) else {}),
            },
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
                {"kind": kind, "source": _source(r), "split": split, **r.to_trl()}
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


def _source(row: pairs.Row) -> str:
    """The signal a row came from, as the dataset preview names it."""
    if isinstance(row, pairs.KTORow):
        return f"implicit:{row.signal}" if row.signal else "thumbs"
    return row.source


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
            implicit=cfg.implicit.train,
        )
    )
    # the replies customers liked that the gate asks again (none when it reads no replies)
    liked = cfg.gate.kept_questions if cfg.gate.reply_questions else 0
    train, heldout = pairs.split(data, cfg.heldout_fraction, liked=liked)
    weighted = weight_reviewed(train, cfg.trust.operator_weight)
    return PreparedData(data, train, weighted, heldout, trust_report, cleaning)


class TrainingJobError(LearnloopError):
    """The training subprocess failed; ``detail`` holds the end of its stderr."""


def failure_reason(exc: Exception) -> str:
    """A failed run's detail: the error's text, led by ``storage_full:`` when the disk was full."""
    if disk_full(exc) and not str(exc).startswith(ErrorCode.STORAGE_FULL):
        return f"{ErrorCode.STORAGE_FULL}: no space left on device: {exc}"
    return str(exc)


def job_spec(cfg: CycleConfig, prepared: PreparedData, *, run_dir: Path, live_adapter: str | None) -> JobSpec:
    """The ``JobSpec`` of a run in ``run_dir`` (pure: nothing is written)."""
    train = prepared.train
    return JobSpec(
        base_model=cfg.base_model,
        train=cfg.train,
        run_dir=run_dir,
        dataset_id=pairs.dataset_id(prepared.data),
        live_adapter=live_adapter,
        kto_weights=train.kto_weights(),
        system_prompt=cfg.system_prompt,
        corrections=tuple(sorted({r.chosen for r in train.dpo if r.source == "correction"})),
        reply_questions=cfg.gate.reply_questions,
        kept_questions=cfg.gate.kept_questions,
        reply_tokens=cfg.gate.reply_tokens,
        generic_chat=cfg.gate.generic_chat,
        generic_ppl_increase=cfg.gate.max_generic_ppl_increase,
    )


def write_job_inputs(cfg: CycleConfig, prepared: PreparedData, *, run_dir: Path, live_adapter: str | None) -> JobSpec:
    """The job's inputs in ``run_dir``: its rows as TRL JSONL and the ``JobSpec`` naming them (spec.json).

    With ``contrast_pick = "live"`` the contrast rows are candidates and go to files of their own,
    for the job to narrow; otherwise they are ordinary pairs.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    heldout, weighted = prepared.heldout, prepared.weighted_train
    spec = job_spec(cfg, prepared, run_dir=run_dir, live_adapter=live_adapter)
    pool = cfg.train.picks_in_job

    def dpo(rows: tuple[pairs.DPORow, ...], *, contrast: bool, source: bool = False) -> list[dict[str, Any]]:
        picked = [r for r in rows if not pool or (r.source == "contrast") == contrast]
        return [{**r.to_trl(), "source": r.source} if source else r.to_trl() for r in picked]

    files: dict[str, list[dict[str, Any]]] = {
        "dpo": dpo(weighted.dpo, contrast=False),
        "kto": [r.to_trl() for r in weighted.kto],
        "sft": [r.to_trl() for r in weighted.sft],
        "heldout": dpo(heldout.dpo, contrast=False, source=True),
        "contrast": dpo(weighted.dpo, contrast=True) if pool else [],
        "heldout_contrast": dpo(heldout.dpo, contrast=True, source=True) if pool else [],
        "kept": [r.to_trl() for r in heldout.kept()],
    }
    for name, rows in files.items():
        with open(spec.rows_path(name), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    (run_dir / SPEC_FILE).write_text(spec.to_json())
    return spec


def remove_job_rows(spec: JobSpec) -> None:
    for name in ROW_FILES:
        spec.rows_path(name).unlink(missing_ok=True)


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
            if not await self.store.runs.acquire_lease(LEASE, holder, LEASE_TTL_S):
                return CycleResult(CycleStatus.SKIPPED, "another process holds the training lease")
            renew = asyncio.create_task(self._renew(holder))
            try:
                # the lease was free, so any run still marked running lost its process
                if n := await self.store.runs.fail_interrupted():
                    log.warning("%d interrupted training runs marked failed", n)
                return await self._run(force=force)
            finally:
                renew.cancel()
                await self.store.runs.release_lease(LEASE, holder)

    async def _renew(self, holder: str) -> None:
        while True:
            await asyncio.sleep(LEASE_TTL_S / 4)
            await self.store.runs.acquire_lease(LEASE, holder, LEASE_TTL_S)

    async def _run(self, *, force: bool) -> CycleResult:
        """Decide, prepare the data, write the job's inputs, run the job, register, gate."""
        started = time.monotonic()
        decision = await self._should_train(force=force)
        if not decision.train:
            return CycleResult(CycleStatus.SKIPPED, decision.reason)
        snapshot, prepared = await self._prepare()
        counts = prepared.counts
        if not prepared.trainable:
            return CycleResult(CycleStatus.SKIPPED, f"no trainable rows yet ({counts})", counts=counts)

        if prepared.train.dpo and prepared.train.kto and self.config.train.kto_steps == 0:
            log.info(
                "%d KTO rows (%s implicit) do not train in this run: it has preference pairs and "
                "training.kto_steps is 0",
                len(prepared.train.kto),
                counts.get("train_implicit", 0),
            )
        run_id = await self.store.runs.start(
            max_rating_id=snapshot.max_rating_id, max_correction_id=snapshot.max_correction_id
        )
        live = await self.store.versions.live()
        run_dir = self.config.runs_dir / f"run-{run_id}"
        # a live adapter that learned from erased data is neither continued nor used to score rows
        tainted = live.trained_on_erased is not None
        adapter = None if tainted else live.adapter_path
        spec = job_spec(self.config, prepared, run_dir=run_dir, live_adapter=adapter)
        log.info("training run %d started: %s", run_id, counts)
        try:
            try:  # inside: a full disk while writing the rows fails the run like any other failure
                write_job_inputs(self.config, prepared, run_dir=run_dir, live_adapter=adapter)
                job = await self._run_job(run_id, spec)
            finally:  # the rows hold customers' words: keep them no longer than the run
                remove_job_rows(spec)
            version = await self._register(run_id, spec, prepared, job, parent=live.name)
        except Exception as exc:
            await self._fail(run_id, spec, failure_reason(exc))
            return CycleResult(
                CycleStatus.FAILED, str(exc), run_id=run_id, seconds=time.monotonic() - started, counts=counts
            )
        status, reasons = await self._gate(run_id, version.name, job.report)
        return CycleResult(
            status,
            "; ".join(reasons),
            version=version.name,
            run_id=run_id,
            report=job.report.to_dict(),
            gate_reasons=reasons,
            seconds=time.monotonic() - started,
            counts=counts,
        )

    async def _should_train(self, *, force: bool) -> TrainDecision:
        """Enough new feedback since the last run that consumed its data (or ``force``)?"""
        last = await self.store.runs.last_consumed()
        new = await self.store.conversations.count_new_feedback(
            after_rating_id=last.max_rating_id if last else 0,
            after_correction_id=last.max_correction_id if last else 0,
            after_time=last.started_at if last else 0.0,
            implicit=self.config.implicit.train,
        )
        return should_train(new_feedback=new, min_new_feedback=self.config.min_new_feedback, force=force)

    async def _prepare(self) -> tuple[FeedbackSnapshot, PreparedData]:
        """Snapshot, trust filter and rows; raters the filter newly flagged are held for review."""
        snapshot = await self.store.conversations.export_feedback()
        prepared = prepare(snapshot, self.config)
        if prepared.trust.new_flags:
            held = await self.store.raters.flag(prepared.trust.new_flags)
            log.warning("held %d raters for review: %s", len(held), ", ".join(held[:10]))
        return snapshot, prepared

    async def _register(
        self, run_id: int, spec: JobSpec, prepared: PreparedData, job: JobResult, *, parent: str
    ) -> ModelVersion:
        """Move the adapter to adapters/vN (atomic: whole or absent) and register it as a candidate."""
        if not (spec.output_dir / ADAPTER_FILE).is_file():
            raise TrainingJobError(f"the job reported success but wrote no {ADAPTER_FILE}")
        name = await self.store.versions.next_name()
        final = self.config.adapters_dir / name
        final.parent.mkdir(parents=True, exist_ok=True)
        spec.output_dir.rename(final)  # atomic on one filesystem: an adapter is whole or absent
        return await self.store.versions.register(
            name=name,
            adapter_path=str(final),
            sha256=sha256_file(final / ADAPTER_FILE),
            parent=parent,
            base_model=spec.base_model,
            eval_report={
                **job.report.to_dict(),
                "cleaning": prepared.cleaning.summary(),
                "trust": prepared.trust.summary(),
                "trainer": job.trainer,
                "budget": job.budget,
                "counts": prepared.counts,
                "dataset_id": spec.dataset_id,
            },
            feedback_ids=prepared.data.feedback_ids(),
            training_run_id=run_id,
        )

    async def _gate(self, run_id: int, version: str, report: EvalReport) -> tuple[CycleStatus, tuple[str, ...]]:
        """Judge the candidate: rejected, canary (with a canary share) or live; the run is done."""
        gate = decide(report, self.config.gate)
        if not gate.promote:
            state, status = VersionState.REJECTED, CycleStatus.REJECTED
        elif self.config.canary_share > 0:
            state, status = VersionState.CANARY, CycleStatus.CANARY
        else:
            state, status = VersionState.LIVE, CycleStatus.PROMOTED
        await self.store.versions.set_state(version, state, actor="gate", reasons=gate.reasons)
        await self.store.runs.finish(run_id, state=RunState.SUCCEEDED, version=version, detail="; ".join(gate.reasons))
        log.info("training run %d: %s %s (%s)", run_id, version, status, "; ".join(gate.reasons))
        return status, gate.reasons

    async def _fail(self, run_id: int, spec: JobSpec, detail: str) -> None:
        """The run failed: nothing of it stays under adapters/, and its data stays eligible.

        The half-written adapter goes first: on a full disk, its bytes are the room the store's
        write of the failure may need.
        """
        shutil.rmtree(spec.output_dir, ignore_errors=True)
        log.error("training run %d failed: %s", run_id, detail)
        await self.store.runs.finish(run_id, state=RunState.FAILED, detail=detail[-4000:])

    async def _run_job(self, run_id: int, spec: JobSpec) -> JobResult:
        """``python -m training.train SPEC`` in a subprocess (under ``accelerate launch`` when
        ``training.accelerate_config`` is set): its progress lines go to the run's row;
        an operator's cancel, the time-out or our own cancellation kills it."""
        command = job_command(
            sys.executable,
            str(spec.run_dir / SPEC_FILE),
            accelerate_config=spec.train.accelerate_config,
            nice=spec.train.nice,
        )
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        self.job_pid = proc.pid
        out = _JobOutput()
        watcher = asyncio.create_task(self._watch_cancel(run_id, proc, out))
        try:
            await asyncio.wait_for(
                asyncio.gather(self._read_stdout(run_id, proc.stdout, out), out.read_stderr(proc.stderr), proc.wait()),
                self.config.timeout_s,
            )
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
        if out.cancelled:
            raise TrainingJobError("cancelled by an operator")
        if out.error is not None and out.error.get("code") == ErrorCode.STORAGE_FULL:
            raise TrainingJobError(
                f"{ErrorCode.STORAGE_FULL}: the training job stopped: {out.error.get('detail')}",
                code=ErrorCode.STORAGE_FULL,
            )
        if proc.returncode != 0 or out.report is None:
            tail = "\n".join(out.stderr_tail)
            raise TrainingJobError(f"training job exited with code {proc.returncode}:\n{tail}")
        return JobResult(
            report=EvalReport.from_dict(out.report["report"]),
            trainer=out.report.get("trainer"),
            seconds=out.report.get("seconds"),
            budget=out.report.get("budget"),
        )

    async def _watch_cancel(self, run_id: int, proc: asyncio.subprocess.Process, out: _JobOutput) -> None:
        while proc.returncode is None:
            await asyncio.sleep(0.5)
            if (await self.store.runs.get(run_id)).state is RunState.CANCELLING:
                out.cancelled = True
                proc.kill()
                return

    async def _read_stdout(self, run_id: int, stdout: asyncio.StreamReader, out: _JobOutput) -> None:
        """The job's JSON lines: progress goes to the run's row (with the loss curve the console
        draws) and to ``on_progress``; the report is kept. Other lines are ignored."""
        async for raw in stdout:
            line = raw.decode(errors="replace").strip()
            if not line.startswith("{"):
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("event") == "progress":
                if isinstance(event.get("loss"), int | float):
                    out.history.append({"step": event.get("step"), "loss": event["loss"]})
                    del out.history[:-MAX_LOSS_POINTS]
                await self.store.runs.update(run_id, progress={**event, "history": out.history})
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
                out.report = event
            elif event.get("event") == "error":
                out.error = event


@dataclass(frozen=True)
class JobResult:
    """The job's report line: the candidate's scores against live, and what trained it."""

    report: EvalReport
    trainer: str | None  # the stages, train.Objective values joined with "+": dpo, dpo+sft, kto+sft, sft, ...
    seconds: float | None
    budget: dict[str, Any] | None = None  # steps.budget_report: the time budget, steps, epochs, share of rows seen


@dataclass
class _JobOutput:
    """What a running job said so far."""

    report: dict[str, Any] | None = None  # its report line
    error: dict[str, Any] | None = None  # its error line: {"code": "storage_full", "detail": ...}
    history: list[dict[str, Any]] = field(default_factory=list)  # the loss curve, at most MAX_LOSS_POINTS
    stderr_tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=40))
    cancelled: bool = False  # an operator cancelled the run and the job was killed

    async def read_stderr(self, stderr: asyncio.StreamReader) -> None:
        async for raw in stderr:
            self.stderr_tail.append(raw.decode(errors="replace").rstrip())
