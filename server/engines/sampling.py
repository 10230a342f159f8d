"""Sampling a token from numpy logits (the llamacpp engine's sampler): greedy, temperature, top-p."""

from __future__ import annotations

from typing import Any

import numpy as np

from server.engines.base import SamplingConfig

_TOP_CANDIDATES = 256  # top-p looks at this many most likely tokens first (full sort only if they fall short)


def sample(logits: Any, s: SamplingConfig, rng: Any) -> int:
    """Greedy at temperature <= 0; else temperature and top-p, drawing from ``rng`` (a numpy Generator)."""
    if s.temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / s.temperature
    z -= z.max()
    probs = np.exp(z)
    probs /= probs.sum()
    if s.top_p < 1.0:
        k = min(_TOP_CANDIDATES, probs.size)
        order = np.argpartition(-probs, k - 1)[:k]
        order = order[np.argsort(-probs[order], kind="stable")]
        if probs[order].sum() < s.top_p and k < probs.size:  # a flat distribution: sort it all
            order = np.argsort(-probs, kind="stable")
        kept = probs[order]
        keep = np.cumsum(kept) - kept < s.top_p
        order, kept = order[keep], kept[keep]
    else:
        order, kept = np.arange(probs.size), probs
    cdf = np.cumsum(kept)
    choice = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return int(order[min(choice, len(order) - 1)])
