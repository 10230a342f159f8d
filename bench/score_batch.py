"""Scoring completions one whole conversation at a time against ``completion_logprobs``.

The training job scores completions in three places: the hard-negative picker (each replay and
contrast candidate's rejected answer under the live version), the gate's pair metrics (chosen and
rejected under the candidate and live) and generic-chat perplexity (three times). All go through
``training.evaluate.completion_logprobs``, which reads a prompt shared by several completions once
(its KV cache) and puts rows of like length in one forward pass. This bench times it on
SmolLM2-135M-Instruct for what a replay pick scores on ``--deployment``: its system prompt and each
of the first ``--prompts`` shipped replay prompts against each of its operator answers; at
``--budgets`` tokens of padded batch per pass, against the old path (each whole conversation in its
own forward pass) measured in the same run. It prints seconds, rows per second, the speed-up and the
largest difference in a row's mean log-probability per token.

    python bench/score_batch.py [--deployment airline] [--prompts 20] [--budgets 1,512,1024,2048]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.rater import deployment_names, load_deployment
from training.chats import load_chat, replay_chat_path
from training.evaluate import completion_logprobs, completion_tokens
from training.models import resolve_model


def rows(deployment: str, prompts: int) -> list[tuple[list[dict[str, str]], str]]:
    """A replay pick's rows: (system prompt + replay prompt, an operator answer), every pairing."""
    dep = load_deployment(deployment)
    chat = load_chat(replay_chat_path("", dep.language))[:prompts]
    return [
        ([{"role": "system", "content": dep.system_prompt}, *g["prompt"]], intent.answer)
        for g in chat
        for intent in dep.intents
    ]


def one_at_a_time(model: Any, tokenizer: Any, items: list[tuple[list[dict[str, str]], str]]) -> list[tuple[float, int]]:
    """The old path: each whole conversation in its own forward pass, every position's log-softmax
    (also the reference of ``tests/test_scoring_batches.py``)."""
    import torch

    out = []
    for prompt, completion in items:
        prompt_ids, completion_ids = completion_tokens(tokenizer, prompt, completion)
        if not completion_ids:
            out.append((0.0, 0))
            continue
        ids = torch.tensor([prompt_ids + completion_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        token_lp = logprobs.gather(1, ids[0, 1:].unsqueeze(1)).squeeze(1)[len(prompt_ids) - 1 :]
        out.append((float(token_lp.sum()), len(completion_ids)))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deployment", default="airline", choices=deployment_names())
    parser.add_argument("--prompts", type=int, default=20, help="replay prompts (training.replay_pairs' default)")
    parser.add_argument("--budgets", default="1,512,1024,2048", help="tokens of padded batch per pass")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    items = rows(args.deployment, args.prompts)
    completion_logprobs(model, tokenizer, items[:4], batch_tokens=512)  # warm up
    started = time.perf_counter()
    baseline = one_at_a_time(model, tokenizer, items)
    baseline_s = time.perf_counter() - started
    results: dict[str, tuple[float, list[tuple[float, int]]]] = {"old path": (baseline_s, baseline)}
    for budget in args.budgets.split(","):
        started = time.perf_counter()
        scored = completion_logprobs(model, tokenizer, items, batch_tokens=int(budget))
        results[budget] = (time.perf_counter() - started, scored)
    print(f"{args.deployment}: {len(items)} rows, torch threads {torch.get_num_threads()}")
    print("| tokens per pass | seconds | rows/s | speed-up | max difference (log-prob per token) |")
    print("| --- | --- | --- | --- | --- |")
    summary = {}
    for budget, (seconds, scored) in results.items():
        diff = max(abs(a / max(n, 1) - b / max(n, 1)) for (a, n), (b, _) in zip(scored, baseline, strict=True))
        print(f"| {budget} | {seconds:.1f} | {len(items) / seconds:.1f} | {baseline_s / seconds:.2f}x | {diff:.2e} |")
        summary[budget] = {"seconds": round(seconds, 2), "speedup": round(baseline_s / seconds, 2), "diff": diff}
    print(
        json.dumps(
            {"deployment": args.deployment, "rows": len(items), "threads": torch.get_num_threads(), "budgets": summary}
        )
    )


if __name__ == "__main__":
    main()
