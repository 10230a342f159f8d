"""The gateway over real websocket connections on loopback, with the tiny model."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

from feedback import VersionState
from server.app import App
from server.settings import load_settings
from tests.factories import ask_reply, register_candidate
from tests.store_backends import StoreTarget
from tests.test_engine import make_adapter


def settings(tiny_model: Path, tmp_path: Path, *, store_url: str | None = None, **server: Any) -> Any:
    return load_settings(
        env={},
        data_dir=tmp_path / "data",
        overrides={
            "store": {"url": store_url},
            "console": {"port": 0},
            "channels": {"port": 0},
            "server": {"port": 0, **server},
            "model": {"name": str(tiny_model), "max_new_tokens": 8, "dtype": "float32", "max_pending": 2},
            "schedule": {"enabled": False, "version_poll_s": 0.1},
        },
    )


@pytest.fixture
async def app(tiny_model: Path, tmp_path: Path, store_target: StoreTarget) -> AsyncIterator[App]:
    """The gateway on each backend (store.url for PostgreSQL)."""
    url = None if store_target.backend == "sqlite" else str(store_target.target)
    a = App(settings(tiny_model, tmp_path, store_url=url))
    async with a.lifespan():
        yield a


async def test_bad_input_gets_typed_errors_and_the_connection_stays(app: App, open_client: Any) -> None:
    c = await open_client(app.port)
    await c.send(type="message", text="hi", client_id="x")
    assert (await c.recv())["code"] == "hello_required"
    await c.ws.send("{not json")
    assert (await c.recv())["code"] == "bad_request"
    await c.send(type="wave")
    assert (await c.recv())["code"] == "unknown_type"
    await c.hello()
    await c.send(type="message", text="x" * 5000, client_id="big")
    err = await c.recv()
    assert (err["code"], err["id"]) == ("too_large", "big")
    await c.send(type="rating", message_id="nope", value=1, id="r1")
    assert (await c.recv())["code"] == "not_found"
    done, _ = await c.chat("still here?", "ok")
    assert done["type"] == "done"


async def test_a_rating_waiting_for_its_commit_does_not_hold_up_the_connection(app: App, open_client: Any) -> None:
    """Each rating waits for its group commit in its own task: the frames after it are read and
    answered meanwhile, and a client's pipelined ratings share one commit. Here the writer is held
    by another operation; the connection still answers, and every ack comes once it commits."""
    c = await open_client(app.port)
    await c.hello()
    done, _ = await c.chat("rate me", "1")
    assert app.store is not None
    held, release = asyncio.Event(), asyncio.Event()

    async def hold(conn: Any) -> None:
        held.set()
        await release.wait()

    holding = asyncio.create_task(app.store.db.write(hold))
    await held.wait()
    for i in range(5):
        await c.send(type="rating", message_id=done["message_id"], value=1, id=f"r{i}")
    await c.ws.send("{not json")
    assert (await c.recv())["code"] == "bad_request"  # answered while the five ratings wait
    release.set()
    await holding
    acks = {(await c.recv())["id"] for _ in range(5)}
    assert acks == {f"r{i}" for i in range(5)}
    ratings = (await app.store.conversations.export_feedback()).ratings
    assert sorted(r.client_id for r in ratings) == [f"r{i}" for i in range(5)]


async def test_health_endpoint(app: App) -> None:
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{app.port}/healthz").read())
    assert body == b"ok\n"


async def test_token_is_required_when_configured(tiny_model: Path, tmp_path: Path, open_client: Any) -> None:
    a = App(settings(tiny_model, tmp_path, token="s3cret"))
    async with a.lifespan():
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            with pytest.raises(InvalidStatus) as refused:  # before the upgrade: no session
                await open_client(a.port, additional_headers=headers)
            assert refused.value.response.status_code == 401
        c = await open_client(a.port, additional_headers={"Authorization": "Bearer s3cret"})
        assert (await c.hello())["type"] == "ready"


async def test_resume_a_conversation_and_regenerate(app: App, open_client: Any) -> None:
    c = await open_client(app.port)
    ready = await c.hello()
    done, _ = await c.chat("first", "1")
    await c.ws.close()
    c2 = await open_client(app.port)
    again = await c2.hello(conversation_id=ready["conversation_id"])
    assert again["conversation_id"] == ready["conversation_id"]
    await c2.send(type="regenerate", message_id=done["message_id"])
    regen, _ = await c2.until("done")
    assert regen["regenerated_from"] == done["message_id"]
    await c2.send(type="hello", conversation_id="missing")
    assert (await c2.recv())["code"] == "conflict"
    c3 = await open_client(app.port)
    await c3.send(type="hello", conversation_id="missing")
    assert (await c3.recv())["code"] == "not_found"


async def test_overload_answers_fast_and_ratings_keep_flowing(
    tiny_model: Path, tmp_path: Path, open_client: Any
) -> None:
    s = settings(tiny_model, tmp_path)
    # greedy: a sampled reply of the tiny random model can draw its end-of-turn token by chance and
    # end with "stop" before the client's stop arrives (seen once in CI); the greedy one is the same every run
    s = dataclasses.replace(s, model=dataclasses.replace(s.model, max_new_tokens=100_000, temperature=0.0))
    a = App(s)
    async with a.lifespan():
        rated = await open_client(a.port)
        await rated.hello()
        first = await open_client(a.port)
        await first.hello()
        busy = []
        for i in range(2):  # max_pending=2: fill the engine with endless replies
            c = await open_client(a.port)
            await c.hello()
            await c.send(type="message", text="talk forever", client_id=f"b{i}")
            await c.until("token")
            busy.append(c)
        started = time.monotonic()
        await first.send(type="message", text="me too", client_id="late")
        await first.until("ack")
        err = await first.recv()
        assert err["code"] == "overloaded" and err["retry_after"] > 0
        assert time.monotonic() - started < 2.0  # refused at once, never queued without bound
        for c in busy:
            await c.send(type="stop")
            done, _ = await c.until("done")
            assert done["finish_reason"] == "cancelled"


async def test_reply_in_flight_finishes_on_its_version_during_a_swap(
    tiny_model: Path, tmp_path: Path, open_client: Any
) -> None:
    s = settings(tiny_model, tmp_path)
    s = dataclasses.replace(s, model=dataclasses.replace(s.model, max_new_tokens=100_000))
    a = App(s)
    async with a.lifespan():
        assert a.store is not None
        streaming = await open_client(a.port)
        await streaming.hello()
        await streaming.send(type="message", text="long one", client_id="l")
        await streaming.until("token")
        adapter = make_adapter(tiny_model, tmp_path / "adapters" / "v1", seed=3)
        await register_candidate(a.store, adapter, str(tiny_model))
        await a.store.versions.set_state("v1", VersionState.LIVE, actor="test")
        for _ in range(100):  # the poller picks up a version promoted by another process
            if a.release.live_version == "v1":
                break
            await asyncio.sleep(0.05)
        assert a.release.live_version == "v1"
        await streaming.until("token")  # the reply kept streaming across the swap
        await streaming.send(type="stop")
        frame, _ = await streaming.until("done")
        assert frame["model_version"] == "base"  # started on base, finished on base
        fresh = await open_client(a.port)
        assert (await fresh.hello())["model_version"] == "v1"
        done, _ = await fresh.chat("hi", "h")
        assert done["model_version"] == "v1"


async def test_tampered_adapter_is_refused_and_old_version_keeps_serving(
    tiny_model: Path, tmp_path: Path, open_client: Any
) -> None:
    a = App(settings(tiny_model, tmp_path))
    async with a.lifespan():
        assert a.store is not None
        adapter = make_adapter(tiny_model, tmp_path / "adapters" / "v1", seed=4)
        await a.store.versions.register(
            adapter_path=str(adapter),
            sha256="0" * 64,
            parent="base",
            base_model=str(tiny_model),
            eval_report={},
            feedback_ids={},
            training_run_id=None,
        )
        await a.store.versions.set_state("v1", VersionState.LIVE, actor="test")
        from server.app import AdapterRejectedError

        with pytest.raises(AdapterRejectedError, match="sha256"):
            await a.release.sync()
        assert a.release.live_version == "base"
        c = await open_client(a.port)
        await c.hello()
        done, _ = await c.chat("hi", "h")
        assert done["model_version"] == "base"


async def test_ratings_are_limited_per_rater_across_connections(
    tiny_model: Path, tmp_path: Path, open_client: Any
) -> None:
    a = App(settings(tiny_model, tmp_path, ratings_per_minute=2.0))
    async with a.lifespan():
        replies = []
        for i in range(2):  # the same identity on two connections
            c = await open_client(a.port)
            await c.hello(user="rita")
            done, _ = await c.chat("hi", f"m{i}")
            replies.append((c, done["message_id"]))
        for n, (c, message_id) in enumerate(replies):
            await c.send(type="rating", message_id=message_id, value=1, id=f"r{n}")
            assert (await c.until("ack"))[0]["id"] == f"r{n}"
        c, message_id = replies[0]
        await c.send(type="rating", message_id=message_id, value=-1, id="r-extra")
        err = await c.recv()
        assert (err["code"], err["id"]) == ("rate_limited", "r-extra") and err["retry_after"] > 0
        other = await open_client(a.port)
        await other.hello(user="sam")  # another rater is not affected
        done, _ = await other.chat("hi", "s")
        await other.send(type="rating", message_id=done["message_id"], value=1, id="s1")
        await other.until("ack")
        # hello.user is a claim: "rita" from another address has a budget of its own, so a stranger
        # cannot spend hers (a site's verified user has one budget wherever they rate from)
        claimed = await open_client(a.port, local_addr=("127.0.0.2", 0))
        await claimed.hello(user="rita")
        done, _ = await claimed.chat("hi", "x")
        await claimed.send(type="rating", message_id=done["message_id"], value=1, id="x1")
        await claimed.until("ack")


async def test_five_times_capacity_excess_refused_fast_the_rest_complete(
    tiny_model: Path, tmp_path: Path, open_client: Any
) -> None:
    """Capacity 4 (2 generating + 2 queued); 20 sessions at once: 16 get `overloaded` at once, 4 finish.

    "At once" is an order, not a clock: every refusal arrives before the last admitted reply is done,
    so no refused client waited for a slot (a wall-clock bound here failed once on a loaded CI machine;
    the latency figures are `bench/load.py`'s)."""
    import resource

    s = settings(tiny_model, tmp_path)
    s = dataclasses.replace(s, model=dataclasses.replace(s.model, max_new_tokens=24, max_pending=4, max_active=2))
    a = App(s)
    async with a.lifespan():
        assert a.engine is not None
        clients = [await open_client(a.port) for _ in range(20)]
        for c in clients:
            await c.hello()
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        async def ask(c: Any, i: int) -> tuple[str, float]:  # the outcome and when it arrived
            await c.send(type="message", text=f"question {i}", client_id=f"q{i}")
            while True:
                frame = await c.recv()
                if frame["type"] == "error":
                    assert frame["code"] == "overloaded" and frame["retry_after"] > 0, frame
                    return "overloaded", time.monotonic()
                if frame["type"] == "done":
                    return frame["finish_reason"], time.monotonic()

        results = await asyncio.gather(*(ask(c, i) for i, c in enumerate(clients)))
        refused = [t for outcome, t in results if outcome == "overloaded"]
        completed = [(outcome, t) for outcome, t in results if outcome != "overloaded"]
        assert len(refused) == 16 and len(completed) == 4
        assert all(outcome in ("stop", "length") for outcome, _ in completed)
        last_done = max(t for _, t in completed)
        assert max(refused) < last_done, f"a refusal came {max(refused) - last_done:.3f} s after the last reply"
        assert a.engine._inbox.qsize() == 0 and a.engine._pending == 0  # nothing left behind
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
        assert grown_mb < 200, f"peak memory grew {grown_mb:.0f} MB"
        # capacity is back for the next wave
        done, _ = await clients[0].chat("again", "again")
        assert done["finish_reason"] in ("stop", "length")


async def test_hot_swap_under_load_eight_sessions(tiny_model: Path, tmp_path: Path, open_client: Any) -> None:
    """8 sessions stream while v1 is promoted: none fails or is cut short, each reply has one
    version, and replies after the swap are exactly what the v1 adapter writes (greedy)."""
    s = settings(tiny_model, tmp_path)
    s = dataclasses.replace(
        s, model=dataclasses.replace(s.model, max_new_tokens=40, temperature=0.0, max_pending=16, max_active=16)
    )
    a = App(s)
    async with a.lifespan():
        assert a.store is not None and a.engine is not None
        clients = [await open_client(a.port) for _ in range(8)]
        for c in clients:
            await c.hello()
        question = "Where is my order?"

        before = [asyncio.create_task(ask_reply(c, question, "before")) for c in clients]
        while a.engine.stats.tokens < 16:  # every session is streaming now
            await asyncio.sleep(0.01)
        adapter = make_adapter(tiny_model, tmp_path / "adapters" / "v1", seed=5)
        await register_candidate(a.store, adapter, str(tiny_model))
        await a.release.promote("v1", actor="test")
        first_wave = await asyncio.gather(*before)
        for done, text, frames in first_wave:
            assert done["model_version"] == "base" and done["finish_reason"] in ("stop", "length")
            assert done["usage"]["completion_tokens"] >= 1 and text
            assert {f["message_id"] for f in frames if f["type"] == "token"} == {done["message_id"]}
        # what v1 writes for this conversation, straight from the engine (greedy: deterministic)
        history = [{"role": "user", "content": question}]
        expected_v1 = "".join(
            [chunk.delta async for chunk in a.engine.stream(history, version="v1", sampling=a.sampling)]
        )
        expected_base = "".join(
            [chunk.delta async for chunk in a.engine.stream(history, version="base", sampling=a.sampling)]
        )
        assert expected_v1 != expected_base
        assert all(text == expected_base for _, text, _ in first_wave)
        fresh = [await open_client(a.port) for _ in range(8)]
        for c in fresh:
            assert (await c.hello())["model_version"] == "v1"
        second_wave = await asyncio.gather(*(ask_reply(c, question, "after") for c in fresh))
        for done, text, _ in second_wave:
            assert done["model_version"] == "v1" and text == expected_v1
