"""Score a candidate adapter against the live version on held-out preference pairs.

Runs inside the training subprocess, on the model the trainer just trained (a PeftModel
whose adapter ``default`` is the candidate). The live version is either the bare base
model or another adapter loaded beside it under the name ``live``.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from training.gate import EvalReport, ModelScores

CANDIDATE = "default"
LIVE = "live"


def completion_logprob(
    model: Any, tokenizer: Any, prompt: Sequence[dict[str, str]], completion: str
) -> tuple[float, int]:
    """Sum of log-probabilities of the completion's tokens given the chat prompt, and their count."""
    prompt_text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": completion}], tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError("the chat template does not render the prompt as a prefix of the full conversation")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    if not completion_ids:
        return 0.0, 0
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    targets = ids[0, 1:]
    token_lp = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1)[len(prompt_ids) - 1 :]
    return float(token_lp.sum()), len(completion_ids)


def rejected_scores(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]]) -> list[float]:
    """Mean log-probability per token of each DPO row's rejected answer under ``model``."""
    model.eval()
    scores = []
    for row in rows:
        lp, n = completion_logprob(model, tokenizer, row["prompt"], row["rejected"][0]["content"])
        scores.append(lp / max(n, 1))
    return scores


@contextlib.contextmanager
def _as(model: Any, adapter: str | None) -> Iterator[None]:
    """Run the block with ``adapter`` active, or with adapters disabled for ``None`` (the base model)."""
    if adapter is None:
        with model.disable_adapter():
            yield
    else:
        model.set_adapter(adapter)
        yield


GENERIC_CHAT = Path(__file__).parent / "data" / "generic_chat.jsonl"
# ordinary chat for training (training.replay_pairs), none of it in GENERIC_CHAT: the gate's
# perplexity check must stay on prompts the adapter never trained on
REPLAY_CHAT = Path(__file__).parent / "data" / "replay_chat.jsonl"


def load_generic_chat(path: Path = GENERIC_CHAT) -> list[dict[str, Any]]:
    """``{"prompt": [messages], "completion": str}`` rows of ordinary chat."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _perplexity(model: Any, tokenizer: Any, generic: Sequence[dict[str, Any]]) -> float | None:
    """Perplexity of the ``generic`` rows' fixed answers under the active model; None without rows."""
    if not generic:
        return None
    lps = [completion_logprob(model, tokenizer, g["prompt"], g["completion"]) for g in generic]
    return math.exp(-sum(lp for lp, _ in lps) / max(sum(n for _, n in lps), 1))


def evaluate_pairs(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[dict[str, Any]],
    *,
    live_adapter: str | None,
    beta: float,
    generic: Sequence[dict[str, Any]] = (),
) -> EvalReport:
    """``pairs`` are TRL DPO rows (conversational). ``live_adapter`` is None when live is the base model.

    ``generic`` rows (``{"prompt": [...], "completion": str}``) give each model's perplexity on
    ordinary chat, the general-ability check.
    """
    model.eval()
    scores: dict[str, list[tuple[float, int, float, int]]] = {"cand": [], "live": []}
    ppl: dict[str, float | None] = {"cand": None, "live": None}
    for key, adapter in (("cand", CANDIDATE), ("live", live_adapter)):
        with _as(model, adapter):
            for pair in pairs:
                c_lp, c_n = completion_logprob(model, tokenizer, pair["prompt"], pair["chosen"][0]["content"])
                r_lp, r_n = completion_logprob(model, tokenizer, pair["prompt"], pair["rejected"][0]["content"])
                scores[key].append((c_lp, c_n, r_lp, r_n))
            ppl[key] = _perplexity(model, tokenizer, generic)
    base_ppl = ppl["live"]  # the base model is live, or is measured on its own:
    if live_adapter is not None:
        with _as(model, None):
            base_ppl = _perplexity(model, tokenizer, generic)
    model.set_adapter(CANDIDATE)

    # NLL is measured on the operators' corrections (the golden answers) when the held-out
    # set has any: a sibling that a customer merely preferred is no target to imitate.
    golden = [i for i, p in enumerate(pairs) if p.get("source") == "correction"] or list(range(len(pairs)))

    def model_scores(rows: list[tuple[float, int, float, int]], generic_ppl: float | None) -> ModelScores:
        if not rows:
            return ModelScores(preference_accuracy=0.0, chosen_nll=math.inf, generic_ppl=generic_ppl)
        wins = sum(1 for c, cn, r, rn in rows if c / max(cn, 1) > r / max(rn, 1))
        nll = sum(-rows[i][0] for i in golden) / max(sum(rows[i][1] for i in golden), 1)
        return ModelScores(preference_accuracy=wins / len(rows), chosen_nll=nll, generic_ppl=generic_ppl)

    margins = [
        beta * ((c - lc) - (r - lr))
        for (c, _, r, _), (lc, _, lr, _) in zip(scores["cand"], scores["live"], strict=True)
    ]
    return EvalReport(
        n_heldout=len(pairs),
        candidate=model_scores(scores["cand"], ppl["cand"]),
        live=model_scores(scores["live"], ppl["live"]),
        reward_margin=sum(margins) / len(margins) if margins else 0.0,
        reward_accuracy=sum(1 for m in margins if m > 0) / len(margins) if margins else 0.0,
        extra={"nll_on": "corrections" if any(p.get("source") == "correction" for p in pairs) else "all pairs"},
        base_generic_ppl=base_ppl,
    )
