"""Serving benchmark: single-stream decode through the real websocket gateway.

    python bench/serve.py [--model smollm2-135m-instruct] [--dtype bfloat16] [--max-new-tokens 128]

Measured in one run, on the same prompts:
  * baseline: ``model.generate`` called directly (no server), greedy, same dtype;
  * gateway: one websocket client, reply by reply (decode tokens/s after the first token, TTFT);
  * swap: a LoRA adapter (r=16, all projections) loaded while a reply streams; the longest
    gap between two tokens of that reply against the p95 gap of steady decoding.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from websockets.asyncio.client import connect  # noqa: E402

from server.app import App  # noqa: E402
from server.settings import load_settings  # noqa: E402
from training.models import resolve_model  # noqa: E402

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
    for prompt in PROMPTS:
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


def make_adapter(model_path: str, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets)).save_pretrained(out)
    return out


async def gateway_run(args: argparse.Namespace, data_dir: Path) -> dict[str, float]:
    settings = load_settings(
        env={},
        data_dir=data_dir,
        overrides={
            "console": {"port": 0},
            "server": {"port": 0, "rate_per_s": 1000.0},
            "model": {
                "name": args.model,
                "dtype": args.dtype,
                "max_new_tokens": args.max_new_tokens,
                "temperature": 0.0,
            },
            "schedule": {"enabled": False},
        },
    )
    app = App(settings)
    async with app.lifespan(), connect(f"ws://127.0.0.1:{app.port}") as ws:
        await ws.send(json.dumps({"type": "hello"}))
        json.loads(await ws.recv())
        rates, ttfts, gaps = [], [], []

        async def one(prompt: str, i: int) -> list[float]:
            await ws.send(json.dumps({"type": "message", "text": prompt, "client_id": str(i)}))
            sent = time.perf_counter()
            times: list[float] = []
            while True:
                frame = json.loads(await ws.recv())
                if frame["type"] == "token":
                    times.append(time.perf_counter())
                elif frame["type"] == "done":
                    n = frame["usage"]["completion_tokens"]
                    end = time.perf_counter()
                    if times and n > 1:
                        rates.append((n - 1) / (end - times[0]))
                        ttfts.append(times[0] - sent)
                    return times
                elif frame["type"] == "error":
                    raise RuntimeError(frame)

        for i, prompt in enumerate(PROMPTS):
            times = await one(prompt, i)
            gaps += [b - a for a, b in zip(times, times[1:], strict=False)]

        adapter = await asyncio.to_thread(make_adapter, resolve_model(args.model), data_dir / "bench-adapter")
        assert app.engine is not None
        task = asyncio.create_task(one(PROMPTS[3], 99))
        await asyncio.sleep(1.0)  # let it stream steadily first
        pause = await app.engine.load_adapter("bench", str(adapter))
        times = await task
        swap_gap = max(b - a for a, b in zip(times, times[1:], strict=False))
    gaps.sort()
    return {
        "gateway_single_tps": statistics.median(rates),
        "ttft_p50_s": statistics.median(ttfts),
        "inter_token_p95_s": gaps[int(0.95 * (len(gaps) - 1))],
        "swap_load_s": pause,
        "swap_max_gap_s": swap_gap,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    model_path = resolve_model(args.model)
    base = baseline_tps(model_path, args.dtype, args.max_new_tokens)
    print(f"baseline model.generate single stream: {base:.1f} tok/s ({args.dtype})")
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(gateway_run(args, Path(tmp)))
    print(
        f"gateway single stream: {result['gateway_single_tps']:.1f} tok/s, "
        f"ratio to baseline {result['gateway_single_tps'] / base:.2f}"
    )
    print(f"TTFT p50 {result['ttft_p50_s'] * 1000:.0f} ms, inter-token p95 {result['inter_token_p95_s'] * 1000:.0f} ms")
    print(
        f"adapter hot-swap: load {result['swap_load_s'] * 1000:.0f} ms; longest gap in a reply streaming "
        f"through it {result['swap_max_gap_s'] * 1000:.0f} ms"
    )
    summary = {
        "engine": "transformers",
        "dtype": args.dtype,
        "baseline_single_tps": round(base, 2),
        **{k: round(v, 4) for k, v in result.items()},
        "ratio_to_baseline": round(result["gateway_single_tps"] / base, 3),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
