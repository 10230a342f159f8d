"""Score a candidate adapter against the live version on held-out preference pairs.

Runs inside the training subprocess, on the model the trainer just trained (a PeftModel
whose adapter ``default`` is the candidate). The live version is either the bare base
model or another adapter loaded beside it under the name ``live``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from training.gate import EvalReport, ModelScores, ReplyReport
from training.reading import AnswerWeights, counted, kept_changes, leaks, operator_facts, score_reply

CANDIDATE = "default"
LIVE = "live"
# tokens of padded batch per scoring forward pass: the logits of SmolLM2's 49,152-word vocabulary for
# 1,024 tokens are 200 MB in float32 (bench/score_batch.py measured the batch against one row at a time)
SCORE_BATCH_TOKENS = 1024


def completion_tokens(tokenizer: Any, prompt: Sequence[dict[str, str]], completion: str) -> tuple[list[int], list[int]]:
    """The chat prompt's token ids (with the generation prompt) and the completion's, tokenized apart."""
    prompt_text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": completion}], tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError("the chat template does not render the prompt as a prefix of the full conversation")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    return list(prompt_ids), list(completion_ids)


def completion_logprobs(
    model: Any,
    tokenizer: Any,
    items: Sequence[tuple[Sequence[dict[str, str]], str]],
    *,
    batch_tokens: int = SCORE_BATCH_TOKENS,
) -> list[tuple[float, int]]:
    """For each (chat prompt, completion): the sum of the completion tokens' log-probabilities given
    the prompt under the active model, and their count, in the order given. Completions of one
    prompt (a replay prompt against every correction, a question's contrast candidates, a pair)
    read the prompt once, from its KV cache; other rows of like length share a forward pass. A
    pass holds at most ``batch_tokens`` tokens of padded batch (the cached prompt not counted)."""
    tokens = [completion_tokens(tokenizer, prompt, completion) for prompt, completion in items]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[tuple[float, int]] = [(0.0, 0)] * len(tokens)
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, (prompt_ids, completion_ids) in enumerate(tokens):
        if completion_ids:
            by_prompt.setdefault(tuple(prompt_ids), []).append(i)
    alone = [i for rows in by_prompt.values() if len(rows) == 1 for i in rows]
    for i, scored in zip(alone, _score_whole(model, [tokens[i] for i in alone], pad, batch_tokens), strict=True):
        out[i] = scored
    for shared, rows in by_prompt.items():
        if len(rows) > 1:
            completions = [tokens[i][1] for i in rows]
            for i, scored in zip(rows, _score_after(model, list(shared), completions, pad, batch_tokens), strict=True):
                out[i] = scored
    return out


def _completion_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum of log-softmax(``logits``) at ``targets``: logits row t predicts target t."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return float(logprobs.gather(1, targets.unsqueeze(1)).sum())


def _chunks(widths: Sequence[int], batch_tokens: int) -> Iterator[list[int]]:
    """Indices of ``widths`` in batches of like width, longest first, each at most ``batch_tokens``
    tokens when padded to its longest row (one row per batch at the least)."""
    order = sorted(range(len(widths)), key=lambda i: -widths[i])
    start = 0
    while start < len(order):
        rows = order[start : start + max(1, batch_tokens // widths[order[start]])]
        start += len(rows)
        yield rows


def _score_whole(
    model: Any, tokens: Sequence[tuple[list[int], list[int]]], pad: int, batch_tokens: int
) -> list[tuple[float, int]]:
    """(prompt ids, completion ids) rows, prompt and completion in one right-padded forward pass."""
    out: list[tuple[float, int]] = [(0.0, 0)] * len(tokens)
    for rows in _chunks([len(p) + len(c) for p, c in tokens], batch_tokens):
        seqs = [tokens[i][0] + tokens[i][1] for i in rows]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        for b, i in enumerate(rows):
            n_prompt, n = len(tokens[i][0]), len(tokens[i][1])
            # the logits at position t predict token t + 1: the completion's from the prompt's last token on
            out[i] = (_completion_sum(logits[b, n_prompt - 1 : n_prompt - 1 + n], ids[b, n_prompt : n_prompt + n]), n)
    return out


def _score_after(
    model: Any, prompt: list[int], completions: Sequence[list[int]], pad: int, batch_tokens: int
) -> list[tuple[float, int]]:
    """Completions of one prompt: the prompt's forward pass once (its KV cache and the logits that
    predict each completion's first token), then the completions in right-padded batches on a copy
    of that cache."""
    with torch.no_grad():
        head = model(input_ids=torch.tensor([prompt]), use_cache=True)
    first = torch.log_softmax(head.logits[0, -1].float(), dim=-1)
    out: list[tuple[float, int]] = [(0.0, 0)] * len(completions)
    for rows in _chunks([len(c) for c in completions], batch_tokens):
        width = len(completions[rows[0]])
        ids = torch.tensor([completions[i] + [pad] * (width - len(completions[i])) for i in rows])
        mask = torch.tensor(
            [[1] * (len(prompt) + len(completions[i])) + [0] * (width - len(completions[i])) for i in rows]
        )
        cache = copy.deepcopy(head.cache)
        cache.batch_repeat_interleave(len(rows))
        positions = torch.arange(len(prompt), len(prompt) + width).expand(len(rows), width)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, cache=cache, position_ids=positions).logits
        for b, i in enumerate(rows):
            n = len(completions[i])
            rest = _completion_sum(logits[b, : n - 1], ids[b, 1:n]) if n > 1 else 0.0
            out[i] = (float(first[completions[i][0]]) + rest, n)
    return out


def completion_logprob(
    model: Any, tokenizer: Any, prompt: Sequence[dict[str, str]], completion: str
) -> tuple[float, int]:
    """Sum of log-probabilities of the completion's tokens given the chat prompt, and their count."""
    return completion_logprobs(model, tokenizer, [(prompt, completion)])[0]


def rejected_scores(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]]) -> list[float]:
    """Mean log-probability per token of each DPO row's rejected answer under ``model``."""
    model.eval()
    scored = completion_logprobs(model, tokenizer, [(row["prompt"], row["rejected"][0]["content"]) for row in rows])
    return [lp / max(n, 1) for lp, n in scored]


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
    lps = completion_logprobs(model, tokenizer, [(g["prompt"], g["completion"]) for g in generic])
    return math.exp(-sum(lp for lp, _ in lps) / max(sum(n for _, n in lps), 1))


def golden(pairs: Sequence[dict[str, Any]]) -> list[int]:
    """Indices of the held-out pairs whose chosen answer is an operator's correction (the golden
    answers), or of every pair when there is none: what the chosen NLL and the replies are read on."""
    return [i for i, p in enumerate(pairs) if p.get("source") == "correction"] or list(range(len(pairs)))


def generate_replies(
    model: Any, tokenizer: Any, prompts: Sequence[Sequence[dict[str, str]]], *, max_new_tokens: int, batch: int = 32
) -> list[str]:
    """Greedy replies of the active model to chat ``prompts``, as served: the chat template's
    generation prompt, the model's end of turn, special tokens dropped. ``batch`` prompts decode
    together (SmolLM2 on 2 cores: the airline's 12 questions and 24 generic prompts, 48 tokens, in
    12.8 s by 8 and 7.1 s by 40)."""
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
    kept: Sequence[dict[str, Any]] = (),
    kept_questions: int = 16,
    max_new_tokens: int = 48,
    examples: int | None = None,
) -> ReplyReport | None:
    """Both models answer up to ``questions`` held-out questions; each reply is scored against
    the operator's answer (``training.reading``, each word weighted by how rare it is among the
    operators' answers: ``corrections`` and the held-out ones), and each model's replies to the ``generic``
    prompts are read for operator facts (of ``corrections`` and the held-out answers) that the
    prompt does not hold. The questions are the held-out corrections' (all held-out pairs' when
    there are none), one per distinct prompt and answer. Then up to ``kept_questions`` of the
    ``kept`` rows (held-out replies customers rated up, TRL KTO rows) on other prompts: each
    model's reply is scored against the liked one and counted in the means and the wins and
    losses as ``training.reading.counted`` says, and the report counts the kept answers the
    candidate lost and regained (``training.reading.kept_changes``). The report keeps the first
    ``examples`` questions with both replies (all of them by default: a later reading can score
    them again; a kept one is marked ``"kept": true``). None when ``questions`` is 0 or there is
    no held-out pair."""
    seen: set[str] = set()
    asked: list[tuple[list[dict[str, str]], str]] = []
    for p in (pairs[i] for i in golden(pairs)):
        key = json.dumps([p["prompt"], p["chosen"][0]["content"]], sort_keys=True)
        if key not in seen and len(asked) < questions:
            seen.add(key)
            asked.append((list(p["prompt"]), p["chosen"][0]["content"]))
    if not asked:
        return None
    prompts = {json.dumps(q, sort_keys=True) for q, _ in asked}
    again: list[tuple[list[dict[str, str]], str]] = []
    for row in kept:
        key = json.dumps(row["prompt"], sort_keys=True)
        if key not in prompts and len(again) < kept_questions:
            prompts.add(key)
            again.append((list(row["prompt"]), row["completion"][0]["content"]))
    every = asked + again
    answers = [*corrections, *(answer for _, answer in asked)]  # the operators': a leak's facts, each word's weight
    facts, weights = operator_facts(answers), AnswerWeights.of(answers)
    generic_prompts = [list(g["prompt"]) for g in generic]
    said: dict[str, list[str]] = {}
    heard: dict[str, list[str]] = {}
    for key, adapter in (("cand", CANDIDATE), ("live", live_adapter)):
        with _as(model, adapter):
            said[key] = generate_replies(model, tokenizer, [q for q, _ in every], max_new_tokens=max_new_tokens)
            heard[key] = generate_replies(model, tokenizer, generic_prompts, max_new_tokens=max_new_tokens)
    model.set_adapter(CANDIDATE)
    scores = {
        key: [score_reply(r, answer, weights).score for r, (_, answer) in zip(said[key], every, strict=True)]
        for key in said
    }
    n = len(asked)
    lost, regained = kept_changes(scores["cand"][n:], scores["live"][n:])
    counts = {key: [counted(x, liked=i >= n) for i, x in enumerate(v)] for key, v in scores.items()}
    leaked = {key: leaks(heard[key], [p[-1]["content"] for p in generic_prompts], facts) for key in heard}
    pairs_of_scores = list(zip(counts["cand"], counts["live"], strict=True))
    shown = range(len(every)) if examples is None else [*range(min(examples, n)), *range(n, n + len(again))][:examples]
    return ReplyReport(
        n=n,
        candidate=round(sum(counts["cand"]) / len(every), 4),
        live=round(sum(counts["live"]) / len(every), 4),
        wins=sum(1 for c, v in pairs_of_scores if c > v),
        losses=sum(1 for c, v in pairs_of_scores if c < v),
        candidate_leaks=len(leaked["cand"]),
        live_leaks=len(leaked["live"]),
        leaked=ReplyReport.label_leaks(leaked["cand"], leaked["live"]),
        kept=len(again),
        kept_lost=lost,
        kept_regained=regained,
        examples=tuple(
            {
                "question": every[i][0][-1]["content"],
                "answer": every[i][1],
                "candidate": said["cand"][i],
                "candidate_score": scores["cand"][i],
                "live": said["live"][i],
                "live_score": scores["live"][i],
                **({"kept": True} if i >= n else {}),
            }
            for i in shown
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
            scored = completion_logprobs(
                model,
                tokenizer,
                [(p["prompt"], p[side][0]["content"]) for p in pairs for side in ("chosen", "rejected")],
            )
            scores[key] = [(*scored[2 * k], *scored[2 * k + 1]) for k in range(len(pairs))]
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
