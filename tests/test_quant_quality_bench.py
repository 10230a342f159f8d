"""bench/quant_quality.py: the agreement and perplexity arithmetic, the formats' parsing, the
reply set and the table (no model: the bench itself runs for minutes)."""

from __future__ import annotations

import json
import math

import pytest

from bench.quant_quality import (
    agreement,
    common_prefix,
    completion_logprob_from_logits,
    parse_args,
    parse_formats,
    perplexity,
    reply_set,
    report,
)
from training.chats import load_chat


def test_common_prefix_stops_at_the_first_difference() -> None:
    assert common_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([5], [6]) == 0


def test_agreement_counts_identical_replies_and_prefixes() -> None:
    ref = [[1, 2, 3, 4], [7, 8], []]
    other = [[1, 2, 3, 4], [7, 9, 9], [1]]
    got = agreement(ref, other)
    assert got["identical"] == pytest.approx(1 / 3)
    assert got["prefix_tokens"] == pytest.approx((4 + 1 + 0) / 3)
    # shares of the reference reply covered: 4/4, 1/2, and an empty reference reply counts as covered
    assert got["prefix_share"] == pytest.approx((1.0 + 0.5 + 1.0) / 3)
    assert agreement(ref, ref)["identical"] == 1.0
    # a reply that runs past an identical reference is not identical
    assert agreement([[1, 2]], [[1, 2, 3]])["identical"] == 0.0


def test_agreement_refuses_unmatched_lists_and_is_nan_on_none() -> None:
    with pytest.raises(ValueError):
        agreement([[1]], [])
    assert math.isnan(agreement([], [])["identical"])


def test_perplexity_is_the_gates_rule() -> None:
    # two completions: log-probabilities -2 over 2 tokens and -4 over 2: exp(6 / 4)
    assert perplexity([(-2.0, 2), (-4.0, 2)]) == pytest.approx(math.exp(1.5))
    assert perplexity([]) == 1.0


def test_completion_logprob_reads_each_token_from_the_row_before_it() -> None:
    ids = [0, 1, 2, 1]
    # row i: log-probabilities of the next token after ids[: i + 1]
    rows = [[-9.0, -0.1, -3.0], [-5.0, -6.0, -0.2], [-1.0, -0.7, -2.0], [-0.0, -0.0, -0.0]]
    assert completion_logprob_from_logits(rows, ids, 2) == pytest.approx(-0.2 + -0.7)
    assert completion_logprob_from_logits(rows, ids, 1) == pytest.approx(-0.1 + -0.2 + -0.7)
    with pytest.raises(ValueError):
        completion_logprob_from_logits(rows, ids, 0)


def test_formats_need_a_reference_and_another_each_once() -> None:
    assert parse_formats("f16, shipped,q4_0") == ["f16", "shipped", "q4_0"]
    for bad in ("f16", "f16,f16", "f16,q5_k", ""):
        with pytest.raises(ValueError):
            parse_formats(bad)
    assert parse_args([]).formats == ["f16", "shipped", "q8_0", "q4_0"]
    with pytest.raises(SystemExit):
        parse_args(["--deployments", "nowhere"])
    with pytest.raises(SystemExit):
        parse_args(["--heldout-per-intent", "4"])


def test_reply_set_holds_the_heldout_paraphrases_and_the_generic_prompts() -> None:
    asked = reply_set(["shop", "airline"], 2)
    held = [a for a in asked if a.deployment]
    assert len(held) == 2 * 12 * 2 and len({a.key for a in asked}) == len(asked)
    assert all(a.system for a in held)
    assert any(len(a.turns) > 1 for a in held if a.deployment == "airline")  # multi-turn paraphrases kept whole
    generic = [a for a in asked if a.deployment is None]
    assert [a.turns[-1] for a in generic] == [g["prompt"][-1]["content"] for g in load_chat()]
    assert all(a.system is None for a in generic)  # as the forgetting guard renders them


def test_report_has_a_column_per_format_and_the_reference_marked() -> None:
    one = {
        "file": "x.gguf",
        "size_mb": 1.0,
        "ppl": 7.5,
        "ppl_ratio": 1.0,
        "identical": 1.0,
        "prefix_tokens": 3.0,
        "prefix_share": 1.0,
        "identical_heldout": 1.0,
        "identical_generic": 1.0,
        "rubric": {"up": 0.0, "facts_stated": 0.0, "verdict_same": 1.0},
        "decode_tps": 40.0,
        "decode_tps_all": [39.0, 41.0],
    }
    summary = {
        "reference": "f16",
        "prompts": {"heldout": 60, "generic": 24},
        "max_new_tokens": 48,
        "loadavg_speed": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        "transformers_f32_ppl": 7.5,
        "formats": {"f16": one, "shipped": {**one, "ppl": 7.6, "ppl_ratio": 1.0133}},
    }
    table = report(summary)
    assert "| | F16 (reference) | Q4_1 (shipped) |" in table
    assert "| perplexity / reference | 1.0000 | 1.0133 |" in table
    json.dumps(summary)
