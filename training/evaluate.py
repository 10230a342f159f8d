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
from typing import Any

import torch

from training.gate import EvalReport, ModelScores, ReplyReport
from training.reading import AnswerWeights, leaked, operator_facts, score_reply

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


def perplexity(model: Any, tokenizer: Any, generic: Sequence[dict[str, Any]]) -> float | None:
    """Perplexity of the ``generic`` rows' fixed answers under the active model; None without rows."""
    if not generic:
        return None
    lps = [completion_logprob(model, tokenizer, g["prompt"], g["completion"]) for g in generic]
    return math.exp(-sum(lp for lp, _ in lps) / max(sum(n for _, n in lps), 1))


def golden(pairs: Sequence[dict[str, Any]]) -> list[int]:
    """Indices of the held-out pairs whose chosen answer is an operator's correction (the golden
    answers), or of every pair when there is none: what the chosen NLL and the replies are read on."""
    return [i for i, p in enumerate(pairs) if p.get("source") == "correction"] or list(range(len(pairs)))


def generate_replies(
    model: Any, tokenizer: Any, prompts: Sequence[Sequence[dict[str, str]]], *, max_new_tokens: int, batch: int = 8
) -> list[str]:
    """Greedy replies of the active model to chat ``prompts``, as served: the chat template's
    generation prompt, the model's end of turn, special tokens dropped."""
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # the new tokens of every row start at the same column
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    replies: list[str] = []
    try:
        for start in range(0, len(prompts), batch):
            texts = [
                tokenizer.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True)
                for p in prompts[start : start + batch]
            ]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, use_cache=True
                )
            new = out[:, enc["input_ids"].shape[1] :]
            replies.extend(tokenizer.decode(row, skip_special_tokens=True).strip() for row in new)
    finally:
        tokenizer.padding_side = side
    return replies


def read_replies(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[dict[str, Any]],
    *,
    live_adapter: str | None,
    generic: Sequence[dict[str, Any]] = (),
    corrections: Sequence[str] = (),
    questions: int = 16,
    max_new_tokens: int = 48,
    examples: int | None = None,
) -> ReplyReport | None:
    """Both models answer up to ``questions`` held-out questions; each reply is scored against
    the operator's answer (``training.reading``, each word weighted by how rare it is among the
    operators' answers: ``corrections`` and the held-out ones), and each model's replies to the ``generic``
    prompts are read for operator facts (of ``corrections`` and the held-out answers) that the
    prompt does not hold. The questions are the held-out corrections' (all held-out pairs' when
    there are none), one per distinct prompt and answer. The report keeps the first ``examples``
    questions with both replies (all of them by default: a later reading can score them again).
    None when ``questions`` is 0 or there is no held-out pair."""
    seen: set[str] = set()
    asked: list[tuple[list[dict[str, str]], str]] = []
    for p in (pairs[i] for i in golden(pairs)):
        key = json.dumps([p["prompt"], p["chosen"][0]["content"]], sort_keys=True)
        if key not in seen and len(asked) < questions:
            seen.add(key)
            asked.append((list(p["prompt"]), p["chosen"][0]["content"]))
    if not asked:
        return None
    answers = [*corrections, *(answer for _, answer in asked)]  # the operators': a leak's facts, each word's weight
    facts, weights = operator_facts(answers), AnswerWeights.of(answers)
    generic_prompts = [list(g["prompt"]) for g in generic]
    said: dict[str, list[str]] = {}
    heard: dict[str, list[str]] = {}
    for key, adapter in (("cand", CANDIDATE), ("live", live_adapter)):
        with _as(model, adapter):
            said[key] = generate_replies(model, tokenizer, [q for q, _ in asked], max_new_tokens=max_new_tokens)
            heard[key] = generate_replies(model, tokenizer, generic_prompts, max_new_tokens=max_new_tokens)
    model.set_adapter(CANDIDATE)
    scores = {
        key: [score_reply(r, answer, weights).score for r, (_, answer) in zip(said[key], asked, strict=True)]
        for key in said
    }

    def leaks(key: str) -> int:
        return sum(1 for r, p in zip(heard[key], generic_prompts, strict=True) if leaked(r, p[-1]["content"], facts))

    pairs_of_scores = list(zip(scores["cand"], scores["live"], strict=True))
    return ReplyReport(
        n=len(asked),
        candidate=round(sum(scores["cand"]) / len(asked), 4),
        live=round(sum(scores["live"]) / len(asked), 4),
        wins=sum(1 for c, v in pairs_of_scores if c > v),
        losses=sum(1 for c, v in pairs_of_scores if c < v),
        candidate_leaks=leaks("cand"),
        live_leaks=leaks("live"),
        examples=tuple(
            {
                "question": q[-1]["content"],
                "answer": answer,
                "candidate": said["cand"][i],
                "candidate_score": scores["cand"][i],
                "live": said["live"][i],
                "live_score": scores["live"][i],
            }
            for i, (q, answer) in enumerate(asked[:examples] if examples is not None else asked)
        ),
    )


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
            ppl[key] = perplexity(model, tokenizer, generic)
    base_ppl = ppl["live"]  # the base model is live, or is measured on its own:
    if live_adapter is not None:
        with _as(model, None):
            base_ppl = perplexity(model, tokenizer, generic)
    model.set_adapter(CANDIDATE)

    # NLL is measured on the operators' corrections (the golden answers) when the held-out
    # set has any: a sibling that a customer merely preferred is no target to imitate.
    on = golden(pairs)

    def model_scores(rows: list[tuple[float, int, float, int]], generic_ppl: float | None) -> ModelScores:
        if not rows:
            return ModelScores(preference_accuracy=0.0, chosen_nll=math.inf, generic_ppl=generic_ppl)
        wins = sum(1 for c, cn, r, rn in rows if c / max(cn, 1) > r / max(rn, 1))
        nll = sum(-rows[i][0] for i in on) / max(sum(rows[i][1] for i in on), 1)
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
