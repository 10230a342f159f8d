"""Releases: which model versions serve, and moving versions between states.

The store says which version is live and which is the canary; ``Release.sync`` makes the
engine serve exactly that: it loads (validated) adapters that are missing, routes new
replies, and unloads what is no longer needed. What stays loaded is a pure rule
(``adapters_to_unload``): base, live, the canary, and the previous live version (kept for
an instant rollback). The canary check (``check_canary``) compares the canary with live on
what customers did since it started (``training.canary.decide``) and promotes or rolls it
back; operators do the same by hand (``promote``, ``rollback``).

Routing: a new conversation falls in the canary's share or not (``assign_version``); a
conversation pinned to the running canary stays on it, every other follows live
(``serving_version``). Replies already streaming finish on the version they started on:
the engine keeps an unloaded adapter until its last reply ends.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from feedback import BASE_VERSION, FeedbackStore, LearnloopError, ModelVersion, VersionState, VersionStats
from feedback.versions import rollback_refusal
from server.engines import Engine, EngineError
from training.canary import CanaryAction, CanaryConfig, CanaryDecision, assign
from training.canary import decide as decide_canary
from training.validate import AdapterInvalidError, check_adapter

log = logging.getLogger("learnloop.release")


class AdapterRejectedError(LearnloopError):
    """An adapter file failed validation; the old version keeps serving. ``kind``: the failed check.

    ``passing``: the fault may mend itself (the weights file is not there yet, say while a volume
    mounts; an I/O error), so a live version refused for it is tried again on later polls."""

    def __init__(self, message: str, *, kind: str, passing: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.passing = passing


def adapters_to_unload(loaded: Iterable[str], *, live: str, canary: str | None, previous_live: str | None) -> list[str]:
    """Loaded versions that are neither base, live, the canary nor the previous live (sorted)."""
    keep = {BASE_VERSION, live, canary, previous_live}
    return sorted(set(loaded) - keep)


def demoted(loaded: Iterable[str], *, live: str, canary: str | None) -> list[str]:
    """Loaded versions no new reply is asked of (neither live nor the canary; sorted): replies still
    queued on them start on live instead (``Engine.redirect``), so a rollback or a promotion
    reaches every reply that has not started, not only those asked after it."""
    return sorted(set(loaded) - {live, canary})


def previous_live_after(old_live: str, new_live: str, previous_live: str | None) -> str | None:
    """The version an instant rollback goes back to: the live one just replaced, else the same as before."""
    return old_live if old_live != new_live else previous_live


def rollback_target(version: ModelVersion, by_name: Mapping[str, ModelVersion]) -> str | None:
    """Where rolling ``version`` back leads (None: nowhere, so the console offers no Roll back).

    A canary hands back to live; a live version to the one it replaced (or base), unless
    ``feedback.versions.rollback_refusal`` says there is nothing to go back to (it is base, or
    that version's adapter was deleted after an erasure); the store refuses those rollbacks too.
    """
    if version.state is VersionState.CANARY:
        live = [v.name for v in by_name.values() if v.state is VersionState.LIVE]
        return live[0] if live else BASE_VERSION
    if version.state is not VersionState.LIVE:
        return None
    target = version.replaced or BASE_VERSION
    found = by_name.get(target)
    refused = rollback_refusal(version.name, version.replaced, found.adapter_deleted if found else None)
    return None if refused else target


def erased_adapters_to_delete(versions: Iterable[ModelVersion], *, live: str, canary: str | None) -> list[ModelVersion]:
    """Versions trained on erased data whose adapter files still exist and that serve no one now.

    Neither live nor the canary (whose conversations are pinned to it) is deleted: they go once a
    retrain without the erased data replaces them. The previous live version is not kept for an
    instant rollback when it learned from erased data.
    """
    return [
        v
        for v in versions
        if v.trained_on_erased is not None
        and v.adapter_deleted is None
        and v.adapter_path
        and v.name not in (live, canary, BASE_VERSION)
    ]


@dataclass(frozen=True)
class CanaryVerdict:
    """The running canary against live since it started, and what the canary rule says."""

    canary: ModelVersion
    live: ModelVersion
    live_stats: VersionStats
    canary_stats: VersionStats
    decision: CanaryDecision


class Release:
    """Keeps the engine serving what the store says; one swap at a time."""

    def __init__(
        self,
        store: FeedbackStore,
        engine: Engine,
        canary: CanaryConfig,
        *,
        on_refused: Callable[[str, str], None] | None = None,
    ) -> None:
        self.store = store
        self.engine = engine
        self.canary_config = canary
        self.on_refused = on_refused  # (version, kind) for each adapter refused: the metrics count it
        self.live_version: str = BASE_VERSION
        self.canary_version: str | None = None
        self.previous_live: str | None = None
        self.refused_live: set[str] = set()  # live versions whose adapter failed validation: not retried
        self._passing: dict[str, str] = {}  # live version -> its last passing fault (said once, retried)
        self._lock = asyncio.Lock()

    # --- routing -------------------------------------------------------------------------

    def assign_version(self, conversation_id: str) -> str | None:
        """For a new conversation: the canary's name if it falls in the canary's share, else None (live)."""
        if self.canary_version and assign(conversation_id, self.canary_config.share):
            return self.canary_version
        return None

    def serving_version(self, pinned: str | None) -> str:
        """A conversation pinned to the running canary stays on it; every other follows live."""
        if pinned is not None and pinned == self.canary_version:
            return pinned
        return self.live_version

    # --- serving what the store says -------------------------------------------------------

    async def sync(self) -> None:
        """Load the live and canary adapters (validated), route to them, unload the rest.

        A canary whose adapter fails validation is rolled back; a live one raises
        AdapterRejectedError (after the canary is routed) and the version that was serving keeps
        serving: at start-up, the base model. A refused live version is not tried again (no new
        alert, no new count) until an operator promotes a version by hand or the server restarts:
        its file does not mend itself, and the version poll would otherwise re-alert every round.
        A passing fault (the weights file missing, an I/O error: a volume still mounting) is not
        remembered: the old version serves meanwhile, each poll tries again, and each distinct
        fault is said in one warning line (no raise, no traceback per poll).
        """
        async with self._lock:
            live = await self.store.versions.live()
            canary = await self.store.versions.canary()
            if canary is not None and not self.engine.has_version(canary.name):
                try:
                    await self._load(canary)
                except AdapterRejectedError as exc:
                    if exc.passing:  # not readable yet: no canary traffic this round, tried again next poll
                        canary = None
                    else:
                        log.error("canary %s refused: %s", canary.name, exc)
                        await self.store.versions.rollback(
                            canary.name, actor="validation", reasons=[f"adapter refused: {exc}"]
                        )
                        canary = None
            rejected: AdapterRejectedError | None = None
            if live.name not in (BASE_VERSION, *self.refused_live) and not self.engine.has_version(live.name):
                try:
                    await self._load(live)
                except AdapterRejectedError as exc:
                    if not exc.passing:
                        self.refused_live.add(live.name)
                        rejected = exc
            old = self.live_version
            loaded = live.name == BASE_VERSION or self.engine.has_version(live.name)
            serve = live.name if loaded else old  # refused, or not readable yet: the old one keeps serving
            self.live_version = serve
            self.canary_version = canary.name if canary else None
            self.previous_live = previous_live_after(old, serve, self.previous_live)
            if old != serve:
                log.info("new replies now use version %s (was %s)", serve, old)
            self.engine.redirect(demoted(self.engine.versions, live=serve, canary=self.canary_version), to=serve)
            unload = adapters_to_unload(
                self.engine.versions, live=serve, canary=self.canary_version, previous_live=self.previous_live
            )
            for name in unload:
                await self.engine.unload_adapter(name)
            await self._delete_erased_adapters()
        if rejected is not None:
            raise rejected

    async def _delete_erased_adapters(self) -> None:
        """Delete the files of adapters trained on erased data that no longer serve (under the lock)."""
        gone = erased_adapters_to_delete(
            await self.store.versions.erased_with_files(), live=self.live_version, canary=self.canary_version
        )
        for version in gone:
            if self.engine.has_version(version.name):
                await self.engine.unload_adapter(version.name)
            if self.previous_live == version.name:
                self.previous_live = None  # no instant rollback to a model of erased data
            assert version.adapter_path is not None
            await asyncio.to_thread(shutil.rmtree, version.adapter_path, True)
            await self.store.versions.adapter_deleted(version.name, actor="erasure")
            log.warning(
                "deleted the adapter files of %s: it was trained on erased data",
                version.name,
                extra={"version": version.name},
            )

    async def _load(self, version: ModelVersion) -> None:
        if not version.adapter_path:
            raise self._refused(version.name, f"version {version.name} has no adapter path", "missing")
        try:
            await asyncio.to_thread(
                check_adapter,
                Path(version.adapter_path),
                sha256=version.sha256,
                base_linear=self.engine.linear_shapes(),
                refusal=self.engine.adapter_refusal,
            )
        except AdapterInvalidError as exc:
            passing = exc.kind == "missing"  # the weights file is not there (yet): a volume may be mounting
            raise self._refused(version.name, f"version {version.name}: {exc}", exc.kind, passing=passing) from exc
        except OSError as exc:  # unreadable now (I/O error, a mount going away): tried again later
            raise self._refused(version.name, f"version {version.name}: {exc}", "io", passing=True) from exc
        try:
            pause = await self.engine.load_adapter(version.name, version.adapter_path)
        except EngineError as exc:  # the engine (or a model server: any of its replicas) refused it
            raise self._refused(version.name, f"version {version.name}: {exc}", "engine") from exc
        self._passing.pop(version.name, None)  # a passing fault mended: a new one is said again
        log.info("version %s loaded; decoding paused %.0f ms", version.name, pause * 1000)

    def _refused(self, version: str, message: str, kind: str, *, passing: bool = False) -> AdapterRejectedError:
        """The alert for a refused adapter: one log line (with the version and the failed check), the callback.

        A passing fault is said once per distinct message, as a warning, not on every poll."""
        if passing:
            if self._passing.get(version) != message:
                self._passing[version] = message
                log.warning(
                    "adapter not loadable yet (%s): %s; serving %s meanwhile, tried again on every poll",
                    kind,
                    message,
                    self.live_version,
                    extra={"version": version, "check": kind},
                )
                if self.on_refused is not None:
                    self.on_refused(version, kind)
            return AdapterRejectedError(message, kind=kind, passing=True)
        log.error("adapter refused (%s): %s", kind, message, extra={"version": version, "check": kind})
        if self.on_refused is not None:
            self.on_refused(version, kind)
        return AdapterRejectedError(message, kind=kind)

    # --- the canary ------------------------------------------------------------------------

    async def canary_verdict(self) -> CanaryVerdict | None:
        """What the canary rule says now about the running canary (None when there is none)."""
        canary = await self.store.versions.canary()
        if canary is None:
            return None
        live = await self.store.versions.live()
        live_stats = await self.store.versions.stats(live.name, since=canary.updated_at)
        canary_stats = await self.store.versions.stats(canary.name, since=canary.updated_at)
        decision = decide_canary(live_stats, canary_stats, self.canary_config)
        return CanaryVerdict(canary, live, live_stats, canary_stats, decision)

    async def canary_report(self) -> dict[str, Any] | None:
        """The verdict as JSON for the console."""
        verdict = await self.canary_verdict()
        if verdict is None:
            return None
        return {
            "version": verdict.canary.name,
            "live": verdict.live.name,
            "share": self.canary_config.share,
            "since": verdict.canary.updated_at,
            "live_stats": asdict(verdict.live_stats),
            "canary_stats": asdict(verdict.canary_stats),
            "decision": {"action": str(verdict.decision.action), "reasons": list(verdict.decision.reasons)},
        }

    async def check_canary(self) -> CanaryDecision | None:
        """Act on the verdict: promote, roll back, or wait for more evidence."""
        verdict = await self.canary_verdict()
        if verdict is None:
            return None
        decision, name = verdict.decision, verdict.canary.name
        if decision.action is CanaryAction.PROMOTE:
            await self.store.versions.set_state(name, VersionState.LIVE, actor="canary", reasons=decision.reasons)
        elif decision.action is CanaryAction.ROLLBACK:
            await self.store.versions.rollback(name, actor="canary", reasons=decision.reasons)
        if decision.action is not CanaryAction.WAIT:
            log.info("canary %s: %s (%s)", name, decision.action, "; ".join(decision.reasons))
            await self.sync()
        return decision

    # --- by hand ---------------------------------------------------------------------------

    async def promote(self, name: str, *, actor: str) -> None:
        self.refused_live.discard(name)  # an operator's promotion checks the file again
        await self.store.versions.set_state(name, VersionState.LIVE, actor=actor, reasons=[f"promoted by {actor}"])
        await self.sync()

    async def rollback(self, name: str, *, actor: str) -> None:
        await self.store.versions.rollback(name, actor=actor, reasons=[f"rolled back by {actor}"])
        await self.sync()
