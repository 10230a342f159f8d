"""The gate's and the hard-negative picker's scores (``training.evaluate.completion_logprobs``):
completions of one prompt read it once from its KV cache, other rows of like length share a forward
pass; the same numbers as one row at a time, on the tiny model, with and without a LoRA adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.score_batch import one_at_a_time  # the old path: each whole conversation in its own forward pass


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


ITEMS = [
    (user("Where is my order?"), "It ships within 2 business days."),
    (user("hi"), "Hello! How can I help you today with your order, your refund or anything else?"),
    ([*user("Can I return shoes?"), {"role": "assistant", "content": "Yes."}, *user("How long?")], "30 days."),
    (user("A question with no answer"), ""),  # the template's end of turn alone
    (user("退货期限是多久？"), "收货后7天内可以无理由退货。"),
    (user("hi"), "Hello!"),
    (user("hi"), "Hi, what can I do for you?"),  # three completions of one prompt
    (user("Where is my order?"), "Let me check."),
]


@pytest.fixture(scope="module", params=["base", "lora"])
def model_and_tokenizer(tiny_model: Path, request: pytest.FixtureRequest) -> tuple[Any, Any]:
    """The tiny model, bare or under a LoRA adapter with random weights (as the job scores it)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model: Any = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    if request.param == "lora":
        torch.manual_seed(0)
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
        model = get_peft_model(model, lora)
    model.eval()
    return model, tokenizer


@pytest.mark.parametrize("batch_tokens", [1, 64, 4096])  # one row per pass, a few, all at once
def test_batched_scores_equal_one_row_at_a_time(model_and_tokenizer: tuple[Any, Any], batch_tokens: int) -> None:
    from training.evaluate import completion_logprobs

    model, tokenizer = model_and_tokenizer
    batched = completion_logprobs(model, tokenizer, ITEMS, batch_tokens=batch_tokens)
    alone = one_at_a_time(model, tokenizer, ITEMS)
    assert [n for _, n in batched] == [n for _, n in alone]  # in the order given
    for (lp, n), (want, _) in zip(batched, alone, strict=True):
        assert lp == pytest.approx(want, abs=1e-4 * max(n, 1))  # float rounding of another matmul shape only


def test_pair_scores_and_perplexity_use_the_batches(model_and_tokenizer: tuple[Any, Any]) -> None:
    """The gate's pair metrics and perplexity, and the picker's scores, read the same numbers."""
    import math

    from training.evaluate import perplexity, rejected_scores

    model, tokenizer = model_and_tokenizer
    rows = [{"prompt": p, "rejected": [{"role": "assistant", "content": c}]} for p, c in ITEMS if c]
    alone = one_at_a_time(model, tokenizer, [(r["prompt"], r["rejected"][0]["content"]) for r in rows])
    assert rejected_scores(model, tokenizer, rows) == pytest.approx([lp / n for lp, n in alone], abs=1e-4)
    generic = [{"prompt": r["prompt"], "completion": r["rejected"][0]["content"]} for r in rows]
    want = math.exp(-sum(lp for lp, _ in alone) / sum(n for _, n in alone))
    assert perplexity(model, tokenizer, generic) == pytest.approx(want, rel=1e-4)
