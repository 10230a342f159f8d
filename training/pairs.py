"""TRL training rows: their types, their content order, the train/held-out split. Pure.

TRL's column names are the contract (conversational format, so TRL applies the model's
chat template exactly as serving does):

* DPO: ``{"prompt": [msgs...], "chosen": [assistant msg], "rejected": [assistant msg]}``
* KTO: ``{"prompt": [msgs...], "completion": [assistant msg], "label": bool}``
* SFT: ``{"messages": [msgs..., assistant msg]}``

``training.signals`` builds these rows from feedback, one function per signal.

Everything here is keyed by content, never by ids or arrival order: the same feedback gives
the same rows, in the same order, split the same way, whatever conversation ids the server
drew and in whatever order replies were stored. The split keeps every conversation whole and
puts conversations that open the same way (the same context before their first pair) on one
side, so a question asked again in a later conversation never sits in training and in the
gate's held-out set at once.

Hard negatives (``pick_likeliest``) are chosen here too, from scores the training job computes:
of the candidate rows of one question, the ones whose rejected answer the live version finds
likeliest there.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

ChatMessage = dict[str, str]
Prompt = tuple[ChatMessage, ...]
T = TypeVar("T")


@dataclass(frozen=True)
class FeedbackRef:
    """Which stored items a row was built from (for lineage and exclusion)."""

    ratings: tuple[int, ...] = ()
    corrections: tuple[int, ...] = ()
    messages: tuple[str, ...] = ()


def _chat(prompt: Prompt) -> list[ChatMessage]:
    return [dict(m) for m in prompt]


def _reply(text: str) -> list[ChatMessage]:
    return [{"role": "assistant", "content": text}]


@dataclass(frozen=True)
class DPORow:
    """A preference pair; ``source`` names the signal that gave it (``correction``, ``contrast``, ...)."""

    prompt: Prompt
    chosen: str
    rejected: str
    source: str
    group: str  # conversation id: rows of one conversation stay on one side of the split
    refs: FeedbackRef = field(default_factory=FeedbackRef)

    def to_trl(self) -> dict[str, Any]:
        return {"prompt": _chat(self.prompt), "chosen": _reply(self.chosen), "rejected": _reply(self.rejected)}


@dataclass(frozen=True)
class KTORow:
    """A rated reply: ``label`` is True for a thumbs up.

    A weak label read from the customer's next message (implicit feedback) names its ``signal``
    and weighs ``weight`` (below one thumb's 1.0); its TRL row carries a ``weight`` column, which
    the training job multiplies into that row's KTO loss (a thumb's row has none: weight 1).
    """

    prompt: Prompt
    completion: str
    label: bool  # True: the raters' verdict is up
    group: str
    refs: FeedbackRef = field(default_factory=FeedbackRef)
    weight: float = 1.0
    signal: str | None = None  # implicit feedback: what the next message said (None: a thumb)

    def to_trl(self) -> dict[str, Any]:
        row = {"prompt": _chat(self.prompt), "completion": _reply(self.completion), "label": self.label}
        return row if self.signal is None else {**row, "weight": self.weight}

    @property
    def thumb_up(self) -> bool:
        """Raters clicked this reply up (a weak label read from a next message is no click)."""
        return self.label and self.signal is None


@dataclass(frozen=True)
class SFTRow:
    """A demonstration: the chat up to the reply, then the reply to learn."""

    prompt: Prompt
    completion: str
    source: str  # "correction" or "takeover" (the signal that gave it)
    group: str
    refs: FeedbackRef = field(default_factory=FeedbackRef)

    def to_trl(self) -> dict[str, Any]:
        return {"messages": _chat(self.prompt) + _reply(self.completion)}


Row = DPORow | KTORow | SFTRow
R = TypeVar("R", DPORow, KTORow, SFTRow)


@dataclass(frozen=True)
class TrainingData:
    """Every row of one run, each kind in its content order (``canonical``)."""

    dpo: tuple[DPORow, ...] = ()
    kto: tuple[KTORow, ...] = ()
    sft: tuple[SFTRow, ...] = ()

    def counts(self) -> dict[str, int]:
        return {"dpo": len(self.dpo), "kto": len(self.kto), "sft": len(self.sft)}

    def feedback_ids(self) -> dict[str, list[Any]]:
        ratings: set[int] = set()
        corrections: set[int] = set()
        messages: set[str] = set()
        rows: tuple[Row, ...] = (*self.dpo, *self.kto, *self.sft)
        for row in rows:
            ratings.update(row.refs.ratings)
            corrections.update(row.refs.corrections)
            messages.update(row.refs.messages)
        return {"ratings": sorted(ratings), "corrections": sorted(corrections), "messages": sorted(messages)}

    def kept(self) -> tuple[KTORow, ...]:
        """The replies raters clicked up (implicit labels left out), one per context: on held-out
        rows, what the gate asks both models again (``gate.kept_questions``)."""
        seen: set[str] = set()
        out: list[KTORow] = []
        for r in self.kto:
            if r.thumb_up and (key := prompt_key(r.prompt)) not in seen:
                seen.add(key)
                out.append(r)
        return tuple(out)

    def kto_weights(self) -> tuple[float, float]:
        """(desirable_weight, undesirable_weight) that make both classes weigh the same in total
        (each row counted by its weight: a thumb 1, an implicit label less)."""
        n_up = sum(r.weight for r in self.kto if r.label)
        n_down = sum(r.weight for r in self.kto if not r.label)
        if not n_up or not n_down:
            return 1.0, 1.0
        if n_up >= n_down:
            return n_down / n_up, 1.0
        return 1.0, n_up / n_down


def prompt_key(prompt: Sequence[ChatMessage]) -> str:
    """The prompt as one string: rows with the same chat up to the reply share it."""
    return "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in prompt)


def bucket(key: str) -> float:
    """A stable hash of ``key`` in [0, 1): the same key lands in the same place on every machine."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def canonical(rows: Sequence[R]) -> tuple[R, ...]:
    """Rows in an order fixed by their content alone (a hash, so kinds and topics interleave)."""
    return tuple(sorted(rows, key=lambda r: bucket(f"{getattr(r, 'source', '')}\x00{r.to_trl()!r}")))


def stable_pick(seed: str, items: Iterable[T], key: Callable[[T], str], k: int) -> list[T]:
    """Up to ``k`` of ``items``, ordered by a hash of ``seed`` and each item's ``key``: the same
    inputs always pick the same items, whatever order they came in."""
    return sorted(items, key=lambda item: bucket(f"{seed}\x00{key(item)}"))[:k]


def pick_likeliest(rows: Sequence[dict[str, Any]], scores: Sequence[float], k: int) -> list[dict[str, Any]]:
    """Hard negatives: of the contrast candidates of each question (TRL DPO rows sharing a prompt
    and a chosen answer), the ``k`` whose rejected answer scored highest (the scoring model's
    mean log-probability per token): the other answers that model is likeliest to give there.
    Ties go by a stable hash; the rows keep their input order."""
    if len(rows) != len(scores):
        raise ValueError(f"{len(rows)} contrast rows but {len(scores)} scores")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[f"{prompt_key(row['prompt'])}\x00{row['chosen'][0]['content']}"].append(i)
    keep: set[int] = set()
    for key, members in groups.items():
        ranked = sorted(members, key=lambda i: (-scores[i], bucket(f"{key}\x00{rows[i]['rejected'][0]['content']}")))
        keep.update(ranked[:k])
    return [row for i, row in enumerate(rows) if i in keep]


def replay_plan(others: int, *, prompts: int, share: float, candidates: Sequence[int]) -> list[int]:
    """How many replay pairs each shipped ordinary-chat prompt gets (in the shipped order) in a run
    with ``others`` other pairs, where prompt ``i`` has ``candidates[i]`` corrections to stand
    against: the first ``prompts`` prompts with one pair each, or, with ``share > 0``, as many
    pairs as make ``share`` of the run's pairs when that is more, dealt one per prompt in turn
    (a prompt then stands against several corrections) until the candidates run out.
    ``prompts = 0`` turns replay off; so do no other pairs.

    >>> replay_plan(100, prompts=3, share=0.0, candidates=[5] * 40)
    [1, 1, 1]
    >>> replay_plan(270, prompts=20, share=0.15, candidates=[5] * 40)[:10]
    [2, 2, 2, 2, 2, 2, 2, 2, 1, 1]
    """
    if not 0 <= share < 1:
        raise ValueError(f"replay share {share}: use 0 (a fixed count) up to below 1")
    if prompts <= 0 or others <= 0:
        return []
    if not share:
        return [min(1, n) for n in candidates[:prompts]]
    left = min(sum(candidates), max(prompts, math.ceil(share * others / (1 - share) - 1e-9)))
    plan = [0] * len(candidates)
    while left:
        for i, n in enumerate(candidates):
            if left and plan[i] < n:
                plan[i] += 1
                left -= 1
    while plan and not plan[-1]:
        plan.pop()
    return plan


def split_groups(groups: Iterable[str], fraction: float) -> set[str]:
    """The groups held out for evaluation: a stable hash bucket below ``fraction``.

    With two or more groups and ``fraction > 0``, at least one group is held out and at
    least one stays for training.
    """
    unique = sorted(set(groups), key=bucket)
    if fraction <= 0 or len(unique) < 2:
        return set()
    held = {g for g in unique if bucket(g) < fraction}
    if not held:
        held = {unique[0]}
    if len(held) == len(unique):
        held.discard(unique[-1])
    return held


def split(data: TrainingData, fraction: float, *, liked: int = 0) -> tuple[TrainingData, TrainingData]:
    """(train, held-out), split by conversation so no conversation sits on both sides.

    The split is over the DPO pairs' conversations (the gate's evidence); other rows of a
    held-out conversation are held out with them. A conversation's side is decided by its
    content (the smallest context among its pairs), not its id, so conversations that open
    alike fall on one side and the same feedback always splits the same way.

    With ``liked`` above 0, conversations with thumbs alone (no pair, no demonstration) and a
    reply rated up are split too, keyed by their smallest rated context: the held-out ones give
    the gate replies customers liked, to see whether a candidate still says what live said
    right (``gate.kept_questions``). A context that a pair or a demonstration also asks goes to
    that row's side (to training when rows of both sides ask it); of the others, those whose
    hash falls below ``fraction``, at most ``liked`` distinct contexts (the lowest hashes), are
    held out. Pairs and demonstrations split exactly as without them, and thumbs nobody asks
    again stay in training: with no held-out pair (a run of thumbs alone) the gate reads no
    replies, so none is held out.
    """
    keys = _smallest_contexts(data.dpo)
    held_keys = split_groups(keys.values(), fraction)
    held = {group for group, key in keys.items() if key in held_keys}
    if liked > 0 and held:  # the gate reads replies only beside held-out pairs
        held |= _liked_held(data, held, fraction, liked)

    def part(rows: Sequence[R], keep_held: bool) -> tuple[R, ...]:
        return tuple(r for r in rows if (r.group in held) == keep_held)

    train = TrainingData(part(data.dpo, False), part(data.kto, False), part(data.sft, False))
    heldout = TrainingData(part(data.dpo, True), part(data.kto, True), part(data.sft, True))
    return train, heldout


def _smallest_contexts(rows: Iterable[DPORow | KTORow]) -> dict[str, str]:
    """Each conversation's smallest context (``prompt_key``) among ``rows``: its key in the split."""
    keys: dict[str, str] = {}
    for row in rows:
        key = prompt_key(row.prompt)
        if row.group not in keys or key < keys[row.group]:
            keys[row.group] = key
    return keys


def _liked_held(data: TrainingData, held: set[str], fraction: float, liked: int) -> set[str]:
    """The conversations with thumbs alone and a reply rated up that ``split`` holds out."""
    asking: tuple[DPORow | SFTRow, ...] = (*data.dpo, *data.sft)
    taught = {r.group for r in asking}
    sides: dict[str, set[bool]] = defaultdict(set)  # a pair's or a demo's context -> the sides asking it
    for r in asking:
        sides[prompt_key(r.prompt)].add(r.group in held)
    rated_up = {r.group for r in data.kto if r.thumb_up and r.group not in taught}
    alone = _smallest_contexts(r for r in data.kto if r.group in rated_up)
    picked = sorted({k for k in alone.values() if k not in sides and bucket(k) < fraction}, key=bucket)[:liked]
    return {g for g, k in alone.items() if sides.get(k) == {True} or k in picked}


def class_balance_ok(data: TrainingData) -> bool:
    """KTO needs both desirable and undesirable examples."""
    labels = {r.label for r in data.kto}
    return len(labels) == 2


def dataset_id(data: TrainingData) -> str:
    """A short content hash of the rows, stored with the adapter it trained."""
    h = hashlib.sha256()
    rows: tuple[Row, ...] = (*data.dpo, *data.kto, *data.sft)
    for row in rows:
        h.update(repr(row.to_trl()).encode())
    return h.hexdigest()[:16]


__all__ = [
    "DPORow",
    "FeedbackRef",
    "KTORow",
    "Prompt",
    "Row",
    "SFTRow",
    "TrainingData",
    "bucket",
    "canonical",
    "class_balance_ok",
    "dataset_id",
    "pick_likeliest",
    "prompt_key",
    "replay_plan",
    "split",
    "split_groups",
    "stable_pick",
]
