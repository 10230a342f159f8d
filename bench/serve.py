"""Serving benchmark: single-stream and concurrent decode through the real websocket gateway.

    python bench/serve.py [--engine llamacpp|transformers] [--model smollm2-135m-instruct]
                          [--gguf-quant q8_0] [--dtype float32] [--max-new-tokens 128]
                          [--levels 1,4,8,16]

``--engine`` defaults to the fastest installed: ``llamacpp`` when llama-cpp-python imports
(the default model's GGUF, ``model.gguf``, requantized to ``--gguf-quant``), else ``transformers``.

Measured in one run, on the same prompts:
  * baseline: ``model.generate`` called directly (no server), greedy, same dtype (transformers
    engine); with the llamacpp engine the baseline is the raw llama.cpp single stream below;
  * llama.cpp reference (whenever llama-cpp-python is installed; ``RawLlama``): the LONG_PROMPTS
    through raw llama-cpp-python on the GGUF the engine serves, no gateway and no engine: our own
    ``llama_decode`` loop (greedy, every reply forced to ``--max-new-tokens``): single-stream decode
    tokens/s after the first token (median), and the aggregate of 8 sequences prefilled in one
    call and decoded as one batch per step (all tokens over the wall time from the prefill to the
    last token; median of 3). It runs interleaved with the gateway measurements below: prompt by
    prompt for the single stream, batch by batch against the 8-session level, so that the
    machine's drift in speed (often 20% here) hits both sides of each ratio alike;
  * gateway: the same LONG_PROMPTS through the websocket gateway, one at a time, each in a new
    conversation, twice over (decode tokens/s from the first to the last token, median; TTFT);
  * concurrency: N websocket sessions at once (each its own connection, one reply each),
    for each N in ``--levels``: aggregate tokens/s (all tokens over the wall time from the
    first send to the last ``done``), TTFT p50/p95, inter-token p95, and the ratio of the
    aggregate to the single-session aggregate of the same sweep (8 sessions: the median of 3);
  * swap: a LoRA adapter (r=16, all projections) loaded while a reply streams; the longest
    gap between two tokens of that reply against the p95 gap of steady decoding (llamacpp: the
    adapter is converted to GGUF first, timed apart as ``adapter_convert_s``);
  * llamacpp only, through the engine without the gateway: 8 replies on one version against 4
    on base and 4 on the adapter at once (two ``llama_decode`` calls per step and an adapter
    switch before each): what serving two versions side by side costs.
The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import itertools

from websockets.asyncio.client import connect

from server.app import App
from server.engines import LlamaCppEngine, SamplingConfig, llama_cpp_available, requantize
from server.settings import load_settings
from training.models import default_gguf, resolve_model

# open-ended prompts: greedy replies run to the token limit, so every session decodes as long
LONG_PROMPTS = [
    "Write a detailed, friendly guide for a new customer on how to place an order, pay, track it and return it.",
    "Describe, step by step, everything a support agent should check when a parcel is reported missing.",
    "Write a long, warm apology letter to a customer whose order arrived late and damaged, with next steps.",
    "Explain in detail how our loyalty points work, how to earn them, spend them and what happens when they expire.",
]

PROMPTS = [
    "What is your refund policy?",
    "How long does shipping take to Canada?",
    "Explain in a few sentences how to reset a password.",
    "Write a short apology to a customer whose order arrived late.",
    "What are your support hours?",
]


def baseline_tps(model_path: str, dtype: str, max_new_tokens: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).eval()
    rates = []
    for prompt in LONG_PROMPTS:
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            model.generate(**ids, max_new_tokens=1, do_sample=False)  # prefill + first token
            started = time.perf_counter()
            out = model.generate(**ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
            elapsed = time.perf_counter() - started
        rates.append((out.shape[1] - ids["input_ids"].shape[1]) / elapsed)
    return statistics.median(rates)


ref_sequences = 8  # the batched reference and the concurrency level it is held against


class RawLlama:
    """Raw llama-cpp-python on LONG_PROMPTS (no gateway, no engine): the reference the gateway is held to.

    Our own ``llama_decode`` loop on one context, greedy, every reply forced to ``max_new_tokens``:
    ``single(i)`` decodes prompt ``i`` alone (decode tokens/s after the first token); ``batched()``
    runs ``sequences`` prompts as one batch: all prompts prefilled in one ``llama_decode``, then one
    token per sequence per step (all tokens over the wall time from the prefill to the last token).
    Sequence ids are consecutive, as llama.cpp's split KV cache needs to batch them.
    """

    def __init__(self, gguf: str, model_path: str, max_new_tokens: int, sequences: int = 8) -> None:
        import os

        import llama_cpp.llama_cpp as ll
        from transformers import AutoTokenizer

        from server.engines import extra_buffers_usable, route_llama_log

        route_llama_log(ll)  # llama.cpp's log to Python logging, not the terminal
        self.ll, self.max_new_tokens, self.sequences = ll, max_new_tokens, sequences
        tok = AutoTokenizer.from_pretrained(model_path)
        self.prompts: list[list[int]] = []
        for text in LONG_PROMPTS:
            rendered = tok.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            self.prompts.append(tok(rendered, add_special_tokens=False)["input_ids"])
        ll.llama_backend_init()
        mparams = ll.llama_model_default_params()
        mparams.use_extra_bufts = extra_buffers_usable(gguf)
        self.model = ll.llama_model_load_from_file(gguf.encode(), mparams)
        self.n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(self.model))
        per_seq = -(-(max(len(p) for p in self.prompts) + max_new_tokens) // 256) * 256
        cparams = ll.llama_context_default_params()
        cparams.n_seq_max = sequences
        cparams.n_ctx = per_seq * sequences
        cparams.n_batch = per_seq * sequences  # every prompt in one prefill
        cparams.n_ubatch = 512
        cparams.n_threads = cparams.n_threads_batch = os.cpu_count() or 1
        cparams.kv_unified = False
        self.ctx = ll.llama_init_from_model(self.model, cparams)
        self.mem = ll.llama_get_memory(self.ctx)
        self.batch = ll.llama_batch_init(cparams.n_batch, 0, 1)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:  # (token, pos, seq, logits)
        batch = self.batch
        for i, (token, pos, seq, logits) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
            batch.seq_id[i][0] = seq
        batch.n_tokens = len(items)
        if self.ll.llama_decode(self.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, i: int) -> int:
        import numpy as np

        logits = np.ctypeslib.as_array(self.ll.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
        return int(np.argmax(logits))

    def single(self, i: int) -> float:
        ids = self.prompts[i % len(self.prompts)]
        self.ll.llama_memory_clear(self.mem, True)
        self._decode([(t, p, 0, p == len(ids) - 1) for p, t in enumerate(ids)])
        token = self._argmax(len(ids) - 1)
        started = time.perf_counter()
        for step in range(self.max_new_tokens - 1):
            self._decode([(token, len(ids) + step, 0, True)])
            token = self._argmax(0)
        return (self.max_new_tokens - 1) / (time.perf_counter() - started)

    def batched(self) -> float:
        self.ll.llama_memory_clear(self.mem, True)
        seqs = [self.prompts[i % len(self.prompts)] for i in range(self.sequences)]
        started = time.perf_counter()
        items, ends = [], []
        for seq, ids in enumerate(seqs):
            items += [(t, p, seq, p == len(ids) - 1) for p, t in enumerate(ids)]
            ends.append(len(items) - 1)
        self._decode(items)
        last = [self._argmax(i) for i in ends]
        for step in range(self.max_new_tokens - 1):
            self._decode([(last[seq], len(ids) + step, seq, True) for seq, ids in enumerate(seqs)])
            last = [self._argmax(i) for i in range(self.sequences)]
        return self.sequences * self.max_new_tokens / (time.perf_counter() - started)

    def close(self) -> None:
        self.ll.llama_batch_free(self.batch)
        self.ll.llama_free(self.ctx)
        self.ll.llama_model_free(self.model)


async def mixed_versions(engine: LlamaCppEngine, adapter: str, max_new_tokens: int) -> dict[str, float]:
    """8 replies on base, then 4 on base and 4 on ``adapter`` at once, through the engine (no gateway)."""
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)

    async def one(i: int, version: str) -> int:
        n = 0
        chat = [{"role": "user", "content": LONG_PROMPTS[i % len(LONG_PROMPTS)]}]
        async for chunk in engine.stream(chat, version=version, sampling=sampling):
            n = chunk.n_tokens
        return n

    async def run(versions: list[str]) -> float:
        started = time.perf_counter()
        tokens = await asyncio.gather(*(one(i, v) for i, v in enumerate(versions)))
        return sum(tokens) / (time.perf_counter() - started)

    same = await run(["base"] * 8)
    switches, switch_s = engine.adapter_switches, engine.adapter_switch_s
    mixed = await run(["base", adapter] * 4)
    n = engine.adapter_switches - switches
    return {
        "same_version_agg_tps_8": same,
        "mixed_versions_agg_tps_8": mixed,
        "adapter_switches": n,
        "adapter_switch_call_ms": 1000 * (engine.adapter_switch_s - switch_s) / max(n, 1),
    }


def make_adapter(model_path: str, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets)).save_pretrained(str(out))
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))] if ordered else float("nan")


def long_prompt(i: int, tag: str = "") -> str:
    """The ``i``-th of LONG_PROMPTS (cyclically); with a ``tag``, opened by ``(tag #i)``, which makes
    it new to every prefix cache (``bench/peer.py`` sends the same texts to llama-server)."""
    text = LONG_PROMPTS[i % len(LONG_PROMPTS)]
    return f"({tag} #{i}) {text}" if tag else text


async def sessions_at_once(
    port: int, n: int, *, start: int = 0, tag: str = ""
) -> tuple[int, float, list[float], list[float]]:
    """``n`` clients, each on its own connection, send one prompt at the same moment (client ``i``
    sends ``long_prompt(start + i, tag)``): tokens, wall seconds, times to first token, gaps between
    tokens (``bench/train_serve.py`` and ``bench/peer.py`` use it too)."""
    conns = [await connect(f"ws://127.0.0.1:{port}") for _ in range(n)]
    try:
        for ws in conns:
            await ws.send(json.dumps({"type": "hello"}))
            json.loads(await ws.recv())
        ttfts: list[float] = []
        gaps: list[float] = []
        tokens = 0

        async def one(ws: Any, i: int) -> None:
            nonlocal tokens
            await ws.send(json.dumps({"type": "message", "text": long_prompt(start + i, tag), "client_id": "c"}))
            sent, last = time.perf_counter(), None
            while True:
                frame = json.loads(await ws.recv())
                now = time.perf_counter()
                if frame["type"] == "token":
                    if last is None:
                        ttfts.append(now - sent)
                    else:
                        gaps.append(now - last)
                    last = now
                elif frame["type"] == "done":
                    tokens += frame["usage"]["completion_tokens"]
                    return
                elif frame["type"] == "error":
                    raise RuntimeError(frame)

        started = time.perf_counter()
        await asyncio.gather(*(one(ws, i) for i, ws in enumerate(conns)))
        wall = time.perf_counter() - started
    finally:
        for ws in conns:
            await ws.close()
    return tokens, wall, ttfts, gaps


async def concurrent_level(port: int, sessions: int) -> dict[str, float]:
    """``sessions`` clients, each on its own connection, send one prompt at the same moment."""
    tokens, wall, ttfts, gaps = await sessions_at_once(port, sessions)
    return {
        "sessions": sessions,
        "agg_tps": tokens / wall,
        "tokens": tokens,
        "wall_s": wall,
        "ttft_p50_s": pct(ttfts, 0.5),
        "ttft_p95_s": pct(ttfts, 0.95),
        "inter_token_p95_s": pct(gaps, 0.95),
    }


async def gateway_run(args: argparse.Namespace, data_dir: Path, ref: RawLlama | None) -> dict[str, float]:
    """The gateway figures; with ``ref``, the raw llama.cpp figures too, measured interleaved with
    them (prompt by prompt, and batch by batch at 8 sessions) so that drift in the machine's speed
    hits both sides of each ratio alike."""
    settings = load_settings(
        env={},
        data_dir=data_dir,
        overrides={
            "console": {"port": 0},
            "channels": {"port": 0},
            "server": {"port": 0, "rate_per_s": 1000.0},
            "model": {
                "engine": args.engine,
                "name": args.model,
                "gguf": args.gguf,
                "gguf_quant": args.gguf_quant,
                "dtype": args.dtype,
                "max_new_tokens": args.max_new_tokens,
                "temperature": 0.0,
                "max_pending": max(64, 2 * max(args.levels)),
            },
            "schedule": {"enabled": False, "version_poll_s": 3600.0},  # the bench adapter is loaded by hand
        },
    )
    app = App(settings)
    async with app.lifespan():
        assert app.port is not None
        port = app.port
        rates, ttfts, gaps = [], [], []

        async def one(ws: Any, prompt: str, i: int) -> list[float]:
            await ws.send(json.dumps({"type": "message", "text": prompt, "client_id": str(i)}))
            sent = time.perf_counter()
            times: list[float] = []
            while True:
                frame = json.loads(await ws.recv())
                if frame["type"] == "token":
                    times.append(time.perf_counter())
                elif frame["type"] == "done":
                    n = frame["usage"]["completion_tokens"]
                    if len(times) > 1 and n > 1:  # decode rate: first to last token (the store's write comes after)
                        rates.append((n - 1) / (times[-1] - times[0]))
                        ttfts.append(times[0] - sent)
                    return times
                elif frame["type"] == "error":
                    raise RuntimeError(frame)

        async def fresh(prompt: str, i: int) -> list[float]:
            """One prompt in a new conversation (its own connection), as the raw reference runs it."""
            async with connect(f"ws://127.0.0.1:{app.port}") as ws:
                await ws.send(json.dumps({"type": "hello"}))
                json.loads(await ws.recv())
                return await one(ws, prompt, i)

        raw_single: list[float] = []
        raw_agg: list[float] = []
        for i in range(2 * len(LONG_PROMPTS)):  # the raw reference's prompts, one at a time, twice
            if ref is not None:
                raw_single.append(ref.single(i))
            times = await fresh(LONG_PROMPTS[i % len(LONG_PROMPTS)], i)
            gaps += [b - a for a, b in itertools.pairwise(times)]
        levels = {}
        for n in args.levels:
            if n == ref_sequences and ref is not None:
                runs = []
                for _ in range(3):
                    raw_agg.append(ref.batched())
                    runs.append(await concurrent_level(port, n))
                levels[n] = sorted(runs, key=lambda lv: lv["agg_tps"])[1]  # the median run
            else:
                levels[n] = await concurrent_level(port, n)

        model_path = resolve_model(args.model)
        adapter = await asyncio.to_thread(make_adapter, model_path, data_dir / "bench-adapter")
        extra: dict[str, Any] = {}
        if isinstance(app.engine, LlamaCppEngine):  # convert before the swap: it runs off the worker anyway
            started = time.perf_counter()
            await asyncio.to_thread(app.engine.convert_adapter, adapter)
            extra["adapter_convert_s"] = time.perf_counter() - started
        assert app.engine is not None
        task = asyncio.create_task(fresh(PROMPTS[3], 99))
        await asyncio.sleep(1.0)  # let it stream steadily first
        pause = await app.engine.load_adapter("bench", str(adapter))
        times = await task
        swap_gap = max(b - a for a, b in itertools.pairwise(times))
        if isinstance(app.engine, LlamaCppEngine):
            extra["switch"] = await mixed_versions(app.engine, "bench", args.max_new_tokens)
    gaps.sort()
    if ref is not None:
        extra["raw_single_tps"] = statistics.median(raw_single)
        extra["raw_agg_tps_8"] = statistics.median(raw_agg) if raw_agg else ref.batched()
    return {
        "levels": levels,  # type: ignore[dict-item]
        "gateway_single_tps": statistics.median(rates),
        "ttft_p50_s": statistics.median(ttfts),
        "inter_token_p95_s": gaps[int(0.95 * (len(gaps) - 1))],
        "swap_load_s": pause,
        "swap_max_gap_s": swap_gap,
        **extra,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--engine",
        choices=("transformers", "llamacpp"),
        default="llamacpp" if llama_cpp_available() else "transformers",
        help="engine behind the gateway (default: the fastest installed)",
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--gguf", default=None, help="GGUF file for llama.cpp (default: the model's own)")
    parser.add_argument(
        "--gguf-quant", default="q8_0", help="model.gguf_quant: requantize the GGUF first (q8_0, q4_0; '' = as is)"
    )
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--levels", default="1,4,8,16", help="concurrent sessions to measure, comma-separated")
    args = parser.parse_args()
    args.levels = [int(x) for x in args.levels.split(",")]
    model_path = resolve_model(args.model)
    ref: RawLlama | None = None
    if llama_cpp_available():
        args.gguf = args.gguf or str(default_gguf())
        served = str(requantize(args.gguf, args.gguf_quant)) if args.gguf_quant else args.gguf  # what the engine serves
        ref = RawLlama(served, model_path, args.max_new_tokens, sequences=ref_sequences)
        print(f"GGUF served and measured raw: {Path(served).name}")
    assert ref is not None or args.engine != "llamacpp", "the llamacpp engine needs llama-cpp-python"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = asyncio.run(gateway_run(args, Path(tmp), ref))
    finally:
        if ref is not None:
            ref.close()
    raw = (result.pop("raw_single_tps"), result.pop("raw_agg_tps_8")) if ref is not None else None
    if raw is not None:
        print(f"raw llama.cpp: single stream {raw[0]:.1f} tok/s, 8 sequences batched {raw[1]:.1f} tok/s")
    if args.engine == "llamacpp":
        assert raw is not None
        base, baseline_kind = raw[0], "llama.cpp raw decode loop"
    else:
        base, baseline_kind = baseline_tps(model_path, args.dtype, args.max_new_tokens), "model.generate"
    print(f"baseline ({baseline_kind}) single stream: {base:.1f} tok/s")
    print(
        f"gateway single stream ({args.engine}): {result['gateway_single_tps']:.1f} tok/s, "
        f"ratio to baseline {result['gateway_single_tps'] / base:.2f}"
    )
    print(f"TTFT p50 {result['ttft_p50_s'] * 1000:.0f} ms, inter-token p95 {result['inter_token_p95_s'] * 1000:.0f} ms")
    print(
        f"adapter hot-swap: load {result['swap_load_s'] * 1000:.0f} ms; longest gap in a reply streaming "
        f"through it {result['swap_max_gap_s'] * 1000:.0f} ms"
    )
    if "adapter_convert_s" in result:
        print(f"adapter conversion to GGUF (r=16, all projections): {result['adapter_convert_s']:.1f} s")
    switch: dict[str, float] | None = result.pop("switch", None)  # type: ignore[assignment]
    if switch:
        print(
            f"8 replies at once, one version: {switch['same_version_agg_tps_8']:.1f} tok/s; 4 base + 4 adapter: "
            f"{switch['mixed_versions_agg_tps_8']:.1f} tok/s ({switch['adapter_switches']} adapter switches, "
            f"{switch['adapter_switch_call_ms']:.3f} ms per llama_set_adapters_lora call)"
        )
    levels: dict[int, dict[str, float]] = result.pop("levels")  # type: ignore[assignment]
    single = levels[1]["agg_tps"] if 1 in levels else result["gateway_single_tps"]
    print(f"{'sessions':>8} {'agg tok/s':>10} {'ratio':>6} {'TTFT p50':>9} {'TTFT p95':>9} {'gap p95':>8}")
    for n, lv in levels.items():
        print(
            f"{n:>8} {lv['agg_tps']:>10.1f} {lv['agg_tps'] / single:>6.2f} {lv['ttft_p50_s'] * 1000:>7.0f}ms"
            f" {lv['ttft_p95_s'] * 1000:>7.0f}ms {lv['inter_token_p95_s'] * 1000:>6.0f}ms"
        )
    eight = levels.get(8)
    if raw is not None:
        print(
            f"gateway / raw llama.cpp: single stream {result['gateway_single_tps'] / raw[0]:.2f}"
            + (f", 8 sessions {eight['agg_tps'] / raw[1]:.2f}" if eight else "")
        )
    summary = {
        "engine": args.engine,
        "dtype": args.dtype if args.engine == "transformers" else f"gguf {args.gguf_quant or 'as shipped'}",
        "baseline": baseline_kind,
        "baseline_single_tps": round(base, 2),
        **{k: round(v, 4) for k, v in result.items()},
        "ratio_to_baseline": round(result["gateway_single_tps"] / base, 3),
        "single_tps": round(single, 2),
        "agg_tps_8": round(eight["agg_tps"], 2) if eight else None,
        "ratio_8": round(eight["agg_tps"] / single, 2) if eight else None,
        "ttft_p95_8_s": round(eight["ttft_p95_s"], 3) if eight else None,
        "levels": {str(n): {k: round(v, 4) for k, v in lv.items()} for n, lv in levels.items()},
        "llamacpp_single_tps": round(raw[0], 2) if raw else None,  # raw llama.cpp (None: not installed)
        "llamacpp_agg_tps_8": round(raw[1], 2) if raw else None,
        "gateway_to_llamacpp_single": round(result["gateway_single_tps"] / raw[0], 3) if raw else None,
        "gateway_to_llamacpp_agg_8": round(eight["agg_tps"] / raw[1], 3) if raw and eight else None,
        "switch": {k: round(v, 4) for k, v in switch.items()} if switch else None,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
