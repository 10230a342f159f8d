"""Load, burst and kill -9 through ``learnloop serve`` (scenarios 2, 3 and 5 of docs/reliability.md).

The server is a real ``learnloop serve`` process with the tiny random Llama (the model's speed is
not the point: the gateway and the store are), on a free port; clients are websocket connections
on loopback from this process. Three phases (and 1b):

1. ``--sessions`` clients at once, each chatting once then sending ``--ratings`` ratings:
   dropped connections, unacknowledged ratings, p99 rating ack, the server's peak RSS.
1b. ``--idle`` sockets that say hello and stay silent: the server's resident memory per idle
   session (after minus before, over the count) and file descriptors per session.
2. A burst: ``--burst`` ratings from ``--burst-clients`` clients released at the same moment:
   durable acks per second through the gateway, p99 ack.
3. ``--kill9`` rounds of a burst killed with SIGKILL at a random moment, then a restart:
   acknowledged ratings lost or stored twice, ``integrity_check``, seconds until serving again.

The last line is one JSON object: sessions, dropped, unacked, ack_p99_ms, acks_per_s,
kill9_trials, kill9_lost, rss_mb (and a few more).

    python bench/load.py                                      # the issue's sizes: 1000 sessions, 20 kills
    python bench/load.py --sessions 200 --burst-clients 200 --burst 2000 --kill9 5   # smaller
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from websockets.asyncio.client import connect

from tests.factories import build_tiny_model
from tests.serve_process import BURST_ENV, RatingSession, ServeProcess, kill9_trials, stored_ratings


def p99(values: list[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def status_mb(pid: int, field: str = "VmHWM") -> float:
    """A memory figure of ``/proc/PID/status`` in MB: ``VmHWM`` (peak resident) or ``VmRSS`` (now)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (``/proc/PID/stat``, clock ticks of 1/100 s)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


_BLOCKED = re.compile(r"event loop blocked for (\d+) ms \(its thread ran (\d+) ms\)")
_GC = re.compile(r"garbage collection \(generation \d\) paused the process for (\d+) ms \((\d+) ms of CPU\)")


def loop_blocks(log: list[str]) -> dict[str, float]:
    """The server's "event loop blocked" warnings (a 50 ms timer late by over 100 ms): how many, the
    worst, and the most CPU time the loop's thread used in one of them (the longest its callbacks
    can have run; the rest of a lag is waiting for a core or the GIL); garbage collections over 100 ms
    and the most CPU time one of them took (the rest of its pause: the thread was not running)."""
    blocked = [(int(m.group(1)), int(m.group(2))) for line in log if (m := _BLOCKED.search(line))]
    paused = [(int(m.group(1)), int(m.group(2))) for line in log if (m := _GC.search(line))]
    return {
        "loop_blocked_over_100ms": len(blocked),
        "loop_blocked_max_ms": max((lag for lag, _ in blocked), default=0),
        "loop_ran_max_ms": max((ran for _, ran in blocked), default=0),
        "gc_pauses_over_100ms": len(paused),
        "gc_pause_cpu_max_ms": max((cpu for _, cpu in paused), default=0),
    }


def env_for(clients: int) -> dict[str, str]:
    # every client's one chat turn is queued rather than refused: the replies are 4 tokens of the tiny model
    return {**BURST_ENV, "LEARNLOOP_MODEL_MAX_PENDING": str(max(64, clients))}


async def sessions_phase(
    data_dir: Path, model: Path | str, sessions: int, ratings: int, window: int | None
) -> dict[str, float]:
    server = ServeProcess(data_dir, model, env_for(sessions))
    try:
        port = await asyncio.to_thread(server.port)
        rss_start = status_mb(server.proc.pid)
        clients = [RatingSession(f"s{k}", window) for k in range(sessions)]
        started = time.monotonic()
        await asyncio.gather(*(c.run(port, ratings, chat_timeout=600) for c in clients))
        took = time.monotonic() - started
        rss = status_mb(server.proc.pid)
        blocks = loop_blocks(server.log)
    finally:
        server.stop()
    ack_ms = [ms for c in clients for ms in c.ack_ms]
    stored, _ = stored_ratings(server.db_path)
    return {
        "sessions": sessions,
        "dropped": sum(1 for c in clients if c.dropped or not c.connected),
        "unacked": sum(c.sent - len(c.acked) for c in clients) + sum(ratings for c in clients if not c.chatted),
        "errors": sum(len(c.errors) for c in clients),
        "ack_p50_ms": statistics.median(ack_ms) if ack_ms else float("nan"),
        "ack_p99_ms": p99(ack_ms),
        "acked_not_stored": len({a for c in clients for a in c.acked} - set(stored)),
        "sessions_s": took,
        "rss_start_mb": rss_start,
        "rss_mb": rss,
        **blocks,
    }


async def idle_phase(data_dir: Path, model: Path | str, sockets: int) -> dict[str, float]:
    """``sockets`` connections that say hello and then stay open, silent: the server's memory per idle
    session (resident memory after minus before, over the count), read while they are all open."""
    server = ServeProcess(data_dir, model, env_for(sockets))
    conns: list[Any] = []
    try:
        port = await asyncio.to_thread(server.port)
        warm = [await connect(f"ws://127.0.0.1:{port}") for _ in range(8)]  # first-use allocations
        for ws in warm:
            await ws.send(json.dumps({"type": "hello"}))
            json.loads(await ws.recv())
        await asyncio.sleep(1.0)
        before, fds_before = status_mb(server.proc.pid, "VmRSS"), open_fds(server.proc.pid)
        for k in range(0, sockets, 100):  # in waves of 100: the handshakes themselves are not the point
            wave = await asyncio.gather(*(connect(f"ws://127.0.0.1:{port}") for _ in range(min(100, sockets - k))))
            for ws in wave:
                await ws.send(json.dumps({"type": "hello", "user": f"idle{len(conns)}"}))
                conns.append(ws)
            for ws in wave:
                assert json.loads(await ws.recv())["type"] == "ready"
        await asyncio.sleep(2.0)  # the server settles (its per-connection tasks parked on their reads)
        after, fds_after = status_mb(server.proc.pid, "VmRSS"), open_fds(server.proc.pid)
        for ws in [*warm, *conns]:
            await ws.close()
    finally:
        server.stop()
    return {
        "idle_sockets": len(conns),
        "idle_rss_before_mb": before,
        "idle_rss_after_mb": after,
        "idle_kib_per_socket": (after - before) * 1024 / max(len(conns), 1),
        "idle_fds_per_socket": (fds_after - fds_before) / max(len(conns), 1),
    }


async def burst_phase(
    data_dir: Path, model: Path | str, clients_n: int, total: int, window: int | None
) -> dict[str, float]:
    server = ServeProcess(data_dir, model, env_for(clients_n))
    per_client = max(1, total // clients_n)
    try:
        port = await asyncio.to_thread(server.port)
        go = asyncio.Event()
        clients = [RatingSession(f"b{k}", window) for k in range(clients_n)]
        tasks = [asyncio.create_task(c.run(port, per_client, chat_timeout=600, go=go)) for c in clients]
        while sum(c.chatted or c.dropped for c in clients) < clients_n:  # noqa: ASYNC110 (polls the clients)
            await asyncio.sleep(0.05)  # every client connected and chatted
        server_cpu, own_cpu = cpu_s(server.proc.pid), cpu_s(os.getpid())
        released = time.monotonic()
        go.set()
        await asyncio.gather(*tasks)
        server_cpu, own_cpu = cpu_s(server.proc.pid) - server_cpu, cpu_s(os.getpid()) - own_cpu
        logs = "\n".join(server.log)
    finally:
        server.stop()
    acks = sum(len(c.acked) for c in clients)
    last = max((c.last_ack for c in clients), default=released)
    ack_ms = [ms for c in clients for ms in c.ack_ms]
    return {
        "burst_ratings": clients_n * per_client,
        "burst_acked": acks,
        "acks_per_s": acks / max(last - released, 1e-9),
        "burst_ack_p99_ms": p99(ack_ms),
        # CPU per acknowledged rating in the burst, of the server and of these clients (one machine)
        "server_cpu_us_per_ack": server_cpu / max(acks, 1) * 1e6,
        "client_cpu_us_per_ack": own_cpu / max(acks, 1) * 1e6,
        "database_locked": logs.count("database is locked"),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--ratings", type=int, default=10, help="ratings per session in phase 1")
    parser.add_argument("--burst-clients", type=int, default=1000)
    parser.add_argument("--burst", type=int, default=10_000, help="ratings in the burst (phase 2)")
    parser.add_argument(
        "--window",
        type=int,
        default=1,
        help="ratings a client has waiting for their ack (1: the next is sent on the last ack, as learnloop's"
        " client does); phase 2 is also run with every rating sent at once (pipelined) for comparison",
    )
    parser.add_argument(
        "--idle", type=int, default=1000, help="idle sockets held open in phase 1b (the server's memory per one)"
    )
    parser.add_argument(
        "--model",
        default="tiny",
        help="the model phases 1-2 serve: 'tiny' (the tiny random Llama on the transformers engine, the default:"
        " the model's speed is not the point) or a name learnloop serve --model takes, e.g. smollm2-135m-instruct"
        " (the default engine, llamacpp: its decode releases the GIL, the tiny model's Python does not)",
    )
    parser.add_argument("--kill9", type=int, default=20, help="kill -9 rounds (phase 3)")
    parser.add_argument("--kill9-sessions", type=int, default=16)
    parser.add_argument(
        "--kill9-model",
        default="smollm2-135m-instruct",
        help="the model phase 3 restarts with: the default model on the default engine (llamacpp), whose start"
        " is what an operator waits for; 'tiny' for the tiny random Llama of phases 1-2 (transformers engine)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="learnloop-load-") as tmp:
        root = Path(tmp)
        tiny = build_tiny_model(root / "tiny")
        model: Path | str = tiny if args.model == "tiny" else args.model
        result: dict[str, float] = {}
        result.update(await sessions_phase(root / "sessions", model, args.sessions, args.ratings, args.window))
        print(f"phase 1: {args.sessions} sessions x {args.ratings} ratings: {result}", flush=True)
        if args.idle:
            idle = await idle_phase(root / "idle", model, args.idle)
            print(f"phase 1b: {args.idle} idle sockets: {idle}", flush=True)
            result.update(idle)
        burst = await burst_phase(root / "burst", model, args.burst_clients, args.burst, args.window)
        print(f"phase 2: burst, window {args.window}: {burst}", flush=True)
        result.update(burst)
        piped = await burst_phase(root / "piped", model, args.burst_clients, args.burst, None)
        print(f"phase 2b: burst, every rating sent at once: {piped}", flush=True)
        result.update({"piped_acks_per_s": piped["acks_per_s"], "piped_ack_p99_ms": piped["burst_ack_p99_ms"]})
        kill9_model = tiny if args.kill9_model == "tiny" else args.kill9_model
        trials = await kill9_trials(
            root / "kill9",
            kill9_model,
            trials=args.kill9,
            sessions=args.kill9_sessions,
            log=lambda m: print(m, flush=True),
        )
        result.update(
            {
                "kill9_trials": len(trials),
                "kill9_acked": sum(t.acked for t in trials),
                "kill9_lost": sum(t.lost for t in trials),
                "kill9_duplicated": sum(t.duplicated for t in trials),
                "kill9_integrity_ok": all(t.integrity == "ok" for t in trials),
                "restart_s_max": max((t.restart_s for t in trials), default=float("nan")),
            }
        )
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    asyncio.run(main())
