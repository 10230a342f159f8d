"""Prometheus metrics and JSON logs: a real App on the tiny model, scraped over HTTP on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.logs import JsonFormatter
from server.metrics import Metrics, freeze_startup_heap
from server.settings import SettingsError, load_settings
from tests.console_support import running_app
from tests.factories import ask_reply


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition text (it must parse as Prometheus text), by name and labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_count_what_was_served_and_match_the_store(
    tiny_model: Path, tmp_path: Path, open_client: Any
) -> None:
    async with running_app(tiny_model, tmp_path) as app:
        assert app.store is not None and app.console_port is not None
        c = await open_client(app.port)
        await c.hello(user="u1")
        done, _, _ = await ask_reply(c, "hello there", "m1")
        await c.send(type="rating", message_id=done["message_id"], value=1, id="r1")
        await c.until("ack")
        await c.send(type="rating", message_id="no-such-message", value=-1, id="r2")
        refused = await c.recv()
        assert refused["type"] == "error"
        token = await app.store.accounts.create_token("vic", label="prometheus", actor="test")

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.console_port}") as http:
            assert (await http.get("/metrics")).status_code == 401  # viewers only
            response = await http.get("/metrics", headers={"authorization": f"Bearer {token}"})
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        got = samples(response.text)

        version = done["model_version"]
        assert got[("learnloop_connections", ())] == 1
        assert got[("learnloop_replies_total", (("finish_reason", done["finish_reason"]), ("version", version)))] == 1
        assert got[("learnloop_tokens_total", (("version", version),))] == done["usage"]["completion_tokens"]
        assert got[("learnloop_ttft_seconds_count", (("version", version),))] == 1
        assert got[("learnloop_rating_acks_total", (("value", "up"),))] == 1
        assert got[("learnloop_rating_ack_seconds_count", ())] == 1
        assert got[("learnloop_wire_errors_total", (("code", refused["code"]),))] == 1
        assert got[("learnloop_replies_in_flight", ())] == 0
        # read from the store: the same counts the console shows
        stats = await app.store.versions.stats(version)
        assert got[("learnloop_version_thumbs_up_total", (("version", version),))] == stats.thumbs_up == 1
        assert got[("learnloop_version_thumbs_down_total", (("version", version),))] == stats.thumbs_down == 0
        assert got[("learnloop_version_state", (("state", "live"), ("version", "base")))] == 1
        assert got[("learnloop_training_runs", (("state", "succeeded"),))] == 0


def test_json_logs_are_one_object_per_line_with_ids_as_fields() -> None:
    formatter = JsonFormatter()
    record = logging.LogRecord("learnloop.release", logging.INFO, __file__, 1, "promoted %s", ("v3",), None)
    record.version = "v3"
    record.conversation_id = "c1"
    line = formatter.format(record)
    assert "\n" not in line
    event = json.loads(line)
    assert event["msg"] == "promoted v3" and event["level"] == "INFO" and event["logger"] == "learnloop.release"
    assert event["version"] == "v3" and event["conversation_id"] == "c1"
    assert event["ts"].endswith("Z")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    event = json.loads(formatter.format(record))
    assert "ValueError: boom" in event["exc"]


def test_log_format_is_checked() -> None:
    assert load_settings(env={}, overrides={"server": {"log_format": "json"}}).server.log_format == "json"
    with pytest.raises(SettingsError, match="log_format"):
        load_settings(env={}, overrides={"server": {"log_format": "xml"}})


@pytest.mark.parametrize("hold", ["sleeping", "running"])
async def test_a_blocked_event_loop_is_logged_and_counted(hold: str, caplog: pytest.LogCaptureFixture) -> None:
    """The lag watcher: a callback that holds the loop for 300 ms (three times the threshold)
    shows up as one "event loop blocked" warning and in the lag histogram's top buckets; the line
    says how much of it the loop's thread ran: nearly none when the thread waited (here a sleep,
    as for a core or the GIL), nearly all when a callback computed."""
    metrics = Metrics()
    watching = asyncio.create_task(metrics.watch_event_loop())
    await asyncio.sleep(0.12)  # a few quiet samples
    with caplog.at_level(logging.WARNING, logger="learnloop.metrics"):
        if hold == "sleeping":
            time.sleep(0.3)  # noqa: ASYNC251 (the point: a callback that blocks the loop)
        else:
            until = time.thread_time() + 0.3
            while time.thread_time() < until:
                pass
        await asyncio.sleep(0.12)
    watching.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watching
    blocked = [r.getMessage() for r in caplog.records if "event loop blocked" in r.getMessage()]
    assert len(blocked) == 1, blocked
    ran = int(blocked[0].split("its thread ran ")[1].split(" ms")[0])
    assert ran < 100 if hold == "sleeping" else ran >= 300, blocked
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())}
    buckets = {
        s.labels["le"]: s.value for s in families["learnloop_event_loop_lag_seconds"].samples if "le" in s.labels
    }
    assert buckets["+Inf"] >= 3 and buckets["+Inf"] - buckets["0.25"] == 1  # one sample over 250 ms


def test_garbage_collections_are_timed_while_watched(caplog: pytest.LogCaptureFixture) -> None:
    """``watch_gc``: each collection in the block is one observation of its generation, a pause
    over the threshold is one warning line, and the callback is gone after the block."""
    metrics = Metrics()

    def full_collections() -> float:
        found = samples(generate_latest(metrics.registry).decode())
        return found.get(("learnloop_gc_pause_seconds_count", (("generation", "2"),)), 0.0)

    with metrics.watch_gc():
        gc.collect()
        gc.collect()
    assert full_collections() == 2
    gc.collect()
    assert full_collections() == 2  # unwatched
    cycles = [[] for _ in range(300_000)]  # a heap big enough for a slow full collection
    for c in cycles:
        c.append(c)
    with caplog.at_level(logging.WARNING, logger="learnloop.metrics"), metrics.watch_gc(), _slow_gc():
        gc.collect()
    del cycles
    gc.collect()
    assert [r.getMessage() for r in caplog.records if "garbage collection (generation 2) paused" in r.getMessage()]


@contextlib.contextmanager
def _slow_gc() -> Iterator[None]:
    """A collection longer than the warning's threshold whatever the machine: a callback that
    runs before the watcher's timing ends sleeps past it."""

    def slow(phase: str, info: dict[str, int]) -> None:
        if phase == "stop":
            time.sleep(0.15)

    gc.callbacks.insert(0, slow)
    try:
        yield
    finally:
        gc.callbacks.remove(slow)


def test_the_startup_heap_is_frozen_out_of_every_later_collection() -> None:
    """``freeze_startup_heap`` (called by ``learnloop serve`` once it serves): what is alive then
    is in no generation a collection scans, and what is allocated afterwards still is."""
    before = object.__new__(type("Before", (), {}))
    try:
        frozen = freeze_startup_heap()
        after = object.__new__(type("After", (), {}))
        tracked = {id(o) for o in gc.get_objects()}
        assert frozen >= 1000 and gc.get_freeze_count() == frozen
        assert id(before) not in tracked and id(after) in tracked
    finally:
        gc.unfreeze()
