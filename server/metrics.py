"""Prometheus metrics: what happens in this process, counted as it happens, and what the store knows, read at scrape.

Two kinds of figure, on purpose:

- **This process** (counters and histograms kept in memory, per process, as Prometheus
  expects of each replica): connections, replies and their tokens, time to first token and
  between tokens, engine admission refusals (``overloaded``), rating acknowledgements and
  their latency, rating refusals and every error frame sent, by error code, adapters refused by
  validation, by failed check (an alert: a refused adapter never serves), the event
  loop's lag (``watch_event_loop``) and the garbage collector's pauses (``watch_gc``).
- **The store** (gauges read by each scrape, so every replica reports the same truth and a
  restart loses nothing): thumbs up and down per model version, versions by state, training
  runs by state, and the release decisions taken so far (gate rejections, canaries,
  promotions, rollbacks: the audit log's ``state:*`` moves).

``MeteredEngine`` wraps any engine, so every channel (websocket, widget, OpenAI API, IM) is
measured at the one place all replies pass. The console serves ``GET /metrics`` (viewer role:
Prometheus scrapes with a bearer token, ``authorization`` in its scrape config).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from feedback import FeedbackStore, RunState, VersionState
from server.engines import Chunk, Engine, EngineStats, Messages, OverloadedError, SamplingConfig

log = logging.getLogger("learnloop.metrics")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# seconds; replies on a CPU take from tens of milliseconds to seconds to start
_TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
_INTER_TOKEN_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
_ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
LOOP_PROBE_S = 0.05  # how often the event loop's lag is sampled
LOOP_BLOCKED_S = 0.1  # a lag over this is logged: every socket of the process waited that long
_GC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5)


class Metrics:
    """One process's metrics, in their own registry (several apps in one process do not mix)."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.connections = Gauge("learnloop_connections", "Open websocket connections.", registry=registry)
        self.connections_opened = Counter(
            "learnloop_connections_opened", "Websocket connections accepted.", registry=registry
        )
        self.replies = Counter(
            "learnloop_replies",
            "Replies ended, by version and finish reason.",
            ["version", "finish_reason"],
            registry=registry,
        )
        self.tokens = Counter("learnloop_tokens", "Tokens generated, by version.", ["version"], registry=registry)
        self.ttft = Histogram(
            "learnloop_ttft_seconds",
            "Time to the first token of a reply.",
            ["version"],
            buckets=_TTFT_BUCKETS,
            registry=registry,
        )
        self.inter_token = Histogram(
            "learnloop_inter_token_seconds",
            "Time between streamed pieces of a reply.",
            ["version"],
            buckets=_INTER_TOKEN_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "learnloop_replies_in_flight", "Replies generating or queued in the engine.", registry=registry
        )
        self.overloaded = Counter(
            "learnloop_overloaded", "Replies refused because the engine queue was full.", registry=registry
        )
        self.rating_acks = Counter(
            "learnloop_rating_acks", "Ratings stored and acknowledged, by value.", ["value"], registry=registry
        )
        self.rating_ack_seconds = Histogram(
            "learnloop_rating_ack_seconds",
            "From a rating's arrival to its acknowledgement (after commit).",
            buckets=_ACK_BUCKETS,
            registry=registry,
        )
        self.rating_errors = Counter(
            "learnloop_rating_errors",
            "Ratings the store or the rater limit refused, by error code.",
            ["code"],
            registry=registry,
        )
        self.adapter_refusals = Counter(
            "learnloop_adapter_refusals",
            "Adapters refused by validation before loading, by failed check (checksum, header, tensor, ...).",
            ["check"],
            registry=registry,
        )
        self.wire_errors = Counter(
            "learnloop_wire_errors", "Error frames sent to websocket clients, by code.", ["code"], registry=registry
        )

        self.loop_lag = Histogram(
            "learnloop_event_loop_lag_seconds",
            "How late a 50 ms timer of the event loop fired: at least the longest callback run meanwhile.",
            buckets=_LAG_BUCKETS,
            registry=registry,
        )

        self.gc_pause = Histogram(
            "learnloop_gc_pause_seconds",
            "Garbage collections of this process, by generation: each holds the GIL, so every thread waits.",
            ["generation"],
            buckets=_GC_BUCKETS,
            registry=registry,
        )

    @contextlib.contextmanager
    def watch_gc(self) -> Iterator[None]:
        """Time every garbage collection while the block runs; one over ``LOOP_BLOCKED_S`` is logged.

        A collection runs in whichever thread allocates and holds the GIL throughout, so the event
        loop waits for all of it: a full one over the start-up's heap took about 200 ms here
        (``freeze_startup_heap`` takes that heap out of its reach).
        """
        started: list[tuple[float, float]] = []

        def on_gc(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                started.append((time.perf_counter(), time.thread_time()))
            elif started:
                wall, cpu = started.pop()
                pause = time.perf_counter() - wall
                self.gc_pause.labels(generation=str(info["generation"])).observe(pause)
                if pause > LOOP_BLOCKED_S:  # the CPU time tells a long collection from a descheduled thread
                    log.warning(
                        "garbage collection (generation %d) paused the process for %.0f ms (%.0f ms of CPU)",
                        info["generation"],
                        pause * 1000,
                        (time.thread_time() - cpu) * 1000,
                    )

        gc.callbacks.append(on_gc)
        try:
            yield
        finally:
            gc.callbacks.remove(on_gc)

    async def watch_event_loop(self) -> None:
        """Sample the event loop's lag until cancelled; a lag over ``LOOP_BLOCKED_S`` is logged.

        A timer that fires late was held up by whatever ran in that iteration of the loop, so the
        lag bounds the longest callback from above (``bench/load.py`` reports its maximum). A late
        timer has two causes, told apart in the log line by the CPU time the loop's thread used
        meanwhile: callbacks that ran long (it ran about as long as the lag), or a thread that was
        not running (it ran little: it waited for a core, or for the GIL another thread held).
        """
        loop = asyncio.get_running_loop()
        while True:
            started, cpu = loop.time(), time.thread_time()
            await asyncio.sleep(LOOP_PROBE_S)
            lag = max(0.0, loop.time() - started - LOOP_PROBE_S)
            self.loop_lag.observe(lag)
            if lag > LOOP_BLOCKED_S:
                ran = time.thread_time() - cpu
                log.warning("event loop blocked for %.0f ms (its thread ran %.0f ms)", lag * 1000, ran * 1000)

    def rating_acked(self, value: int, started: float) -> None:
        self.rating_acks.labels(value="up" if value > 0 else "down").inc()
        self.rating_ack_seconds.observe(time.monotonic() - started)

    def adapter_refused(self, version: str, check: str) -> None:
        self.adapter_refusals.labels(check=check).inc()

    def rating_refused(self, code: str) -> None:
        self.rating_errors.labels(code=code).inc()

    async def render(self, store: FeedbackStore) -> bytes:
        """The exposition text: this process's metrics and the store's, read now."""
        snapshot = await StoreSnapshot.read(store)
        return generate_latest(self.registry) + generate_latest(_Once(snapshot.families()))


class StoreSnapshot:
    """What the store says at one scrape (pure once read: ``families`` makes the metrics)."""

    def __init__(
        self,
        thumbs: dict[str, tuple[int, int]],
        versions: dict[str, str],
        runs: dict[str, int],
        moves: dict[str, int],
    ) -> None:
        self.thumbs, self.versions, self.runs, self.moves = thumbs, versions, runs, moves

    @classmethod
    async def read(cls, store: FeedbackStore) -> StoreSnapshot:
        versions = {v.name: str(v.state) for v in await store.versions.all()}
        return cls(await store.versions.thumbs(), versions, await store.runs.counts(), await store.versions.moves())

    def families(self) -> list[Metric]:
        up = CounterMetricFamily(
            "learnloop_version_thumbs_up", "Thumbs up on model-written replies, by version.", labels=["version"]
        )
        down = CounterMetricFamily(
            "learnloop_version_thumbs_down", "Thumbs down on model-written replies, by version.", labels=["version"]
        )
        for version in sorted(set(self.thumbs) | set(self.versions)):
            u, d = self.thumbs.get(version, (0, 0))
            up.add_metric([version], u)
            down.add_metric([version], d)
        state = GaugeMetricFamily(
            "learnloop_version_state", "1 for each version's current state.", labels=["version", "state"]
        )
        for version, current in sorted(self.versions.items()):
            state.add_metric([version, current], 1)
        runs = GaugeMetricFamily("learnloop_training_runs", "Training runs, by state.", labels=["state"])
        for run_state in RunState:
            runs.add_metric([str(run_state)], self.runs.get(str(run_state), 0))
        moves = CounterMetricFamily(
            "learnloop_release_decisions",
            "Version moves so far (gate: rejected; canary; promotion: live; rollback: rolled_back).",
            labels=["state"],
        )
        for version_state in VersionState:
            moves.add_metric([str(version_state)], self.moves.get(str(version_state), 0))
        return [up, down, state, runs, moves]


class _Once:
    """A registry-like collector over metric families already made (for ``generate_latest``)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


class MeteredEngine:
    """An engine that counts what passes through ``stream``; everything else goes to the engine."""

    def __init__(self, engine: Engine, metrics: Metrics) -> None:
        self.inner = engine
        self.metrics = metrics
        self.stats: EngineStats = engine.stats  # the same object: the engine keeps counting in it

    @property
    def versions(self) -> set[str]:
        return self.inner.versions

    def __getattr__(self, name: str) -> Any:  # load, close, load_adapter, prompt_ids, ...
        return getattr(self.inner, name)

    def load(self) -> None:
        self.inner.load()

    def close(self) -> None:
        self.inner.close()

    async def aclose(self) -> None:
        await self.inner.aclose()

    def linear_shapes(self) -> dict[str, tuple[int, int]] | None:
        return self.inner.linear_shapes()

    def adapter_refusal(self, config: dict[str, Any]) -> str | None:
        return self.inner.adapter_refusal(config)

    def has_version(self, name: str) -> bool:
        return self.inner.has_version(name)

    async def load_adapter(self, name: str, path: str) -> float:
        return await self.inner.load_adapter(name, path)

    async def unload_adapter(self, name: str) -> None:
        await self.inner.unload_adapter(name)

    def redirect(self, versions: Iterable[str], to: str) -> None:
        self.inner.redirect(versions, to)

    async def stream(
        self, messages: Messages, *, version: str, sampling: SamplingConfig, cancel: threading.Event | None = None
    ) -> AsyncIterator[Chunk]:
        m = self.metrics
        started = last = time.monotonic()
        first = True
        m.in_flight.inc()
        try:
            async for chunk in self.inner.stream(messages, version=version, sampling=sampling, cancel=cancel):
                version = chunk.version or version  # redirected before it started
                if chunk.delta:
                    now = time.monotonic()
                    if first:
                        m.ttft.labels(version=version).observe(now - started)
                        first = False
                    else:
                        m.inter_token.labels(version=version).observe(now - last)
                    last = now
                if chunk.finish_reason is not None:
                    m.replies.labels(version=version, finish_reason=str(chunk.finish_reason)).inc()
                    m.tokens.labels(version=version).inc(chunk.n_tokens)
                yield chunk
        except OverloadedError:
            m.overloaded.inc()
            raise
        finally:
            m.in_flight.dec()


def freeze_startup_heap() -> int:
    """Collect once, then move every object alive now (imported libraries, the model, the app) to
    the collector's permanent generation, where no later collection scans it; returns how many.

    ``learnloop serve`` calls it once it serves: the start-up heap (torch, transformers, FastAPI,
    about 240,000 objects) made each full collection hold the GIL for about 200 ms, and every
    socket waited (docs/reliability.md, scenario 2). The cost: a reference cycle that was alive
    at start-up is never collected once it becomes garbage; serving creates no such cycles among
    start-up objects (the app, engine and store live until the process exits).
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
