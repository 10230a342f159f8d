"""Generic-chat replay for the training job: ordinary prompts answered by the base model itself.

Each run can add DPO pairs on prompts that have nothing to do with the deployment
(``training/data/replay_chat.jsonl``, 40 everyday questions, none of them in the gate's
``generic_chat.jsonl``): the chosen side is the base model's own greedy reply, the rejected
side is an operator correction (``pairs.replay_rows``). The SFT half of the loss keeps the
model answering ordinary chat as it did (self-distillation), and the DPO half teaches that a
trained shop answer does not belong to an unrelated question.

The base replies depend only on the base model, the system prompt and the prompts, so they
are generated once (batched, greedy) and cached next to the runs.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPLAY_CHAT = Path(__file__).parent / "data" / "replay_chat.jsonl"
MAX_NEW_TOKENS = 96
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def load_replay_prompts(n: int, path: Path = REPLAY_CHAT) -> list[str]:
    with open(path, encoding="utf-8") as f:
        prompts = [json.loads(line)["prompt"][-1]["content"] for line in f if line.strip()]
    return prompts[:n]


def whole_sentences(text: str) -> str:
    """A reply cut at the token limit, trimmed back to its last full sentence (whole if none ends)."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    return text[: ends[-1]].strip() if ends else text.strip()


def cache_key(base_model: str, system_prompt: str | None, prompts: Sequence[str]) -> str:
    h = hashlib.sha256(json.dumps([base_model, system_prompt, list(prompts), MAX_NEW_TOKENS]).encode())
    return h.hexdigest()[:16]


def base_replies(
    model: Any, tokenizer: Any, prompts: Sequence[str], *, system_prompt: str | None, cache_dir: Path | None, base: str
) -> list[str]:
    """The base model's greedy replies to ``prompts`` (with the deployment's system prompt), cached."""
    cache = cache_dir / f"replay-{cache_key(base, system_prompt, prompts)}.json" if cache_dir else None
    if cache is not None and cache.is_file():
        return list(json.loads(cache.read_text()))
    import torch

    chats = [
        ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": p}]
        for p in prompts
    ]
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    model.eval()
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    new = out[:, batch["input_ids"].shape[1] :]
    replies = [whole_sentences(tokenizer.decode(row, skip_special_tokens=True)) for row in new]
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(replies))
    return replies
