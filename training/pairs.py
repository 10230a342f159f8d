"""Feedback records -> TRL training rows. Pure: no I/O, no clock, no randomness.

TRL's column names are the contract (conversational format, so TRL applies the model's
chat template exactly as serving does):

* DPO: ``{"prompt": [msgs...], "chosen": [assistant msg], "rejected": [assistant msg]}``
* KTO: ``{"prompt": [msgs...], "completion": [assistant msg], "label": bool}``
* SFT: ``{"messages": [msgs..., assistant msg]}``

Signals (DESIGN.md, "Feedback signals -> training data"):

>>> # operator correction of reply R        -> DPO(chosen=correction, rejected=R) + SFT(correction)
>>> # regenerate, one sibling rated up/kept -> DPO(chosen=that sibling, rejected=regenerated-away one)
>>> # thumbs on a reply                     -> KTO(label = majority of raters' latest votes)
>>> # up and down on answers to one context -> DPO(chosen=up, rejected=down)
>>> # operator takeover reply               -> SFT(the operator's reply)
>>> # reply R rated down, not corrected, stating a correction's fact (``transplants``)
>>> #                                       -> DPO(chosen=another version's reply in that context without it, rejected=R)
>>> # correction C of a reply to Q, with other corrections D (``contrast`` > 0)
>>> #                                       -> DPO(Q, chosen=C, rejected=D) for up to ``contrast`` of them
>>> # correction C with a number, numbers N of other corrections (``numbers`` > 0)
>>> #                                       -> DPO(Q, chosen=C, rejected=C with its numbers set to N)

Contrast pairs teach that an answer belongs to its question: without them the SFT loss on a
few short policy answers makes the model answer any shop question with the nearest one it
learned (bench/RESULTS.md, "leaks"). Their rejected side is another context's correction
whose text differs, picked by a stable hash, or, with ``contrast_pool``, every such
correction, of which the training job keeps the ones the live version finds likeliest there
(``pick_likeliest``: hard negatives).

Number pairs teach it fact by fact: the rejected side is the correction itself with its
numbers replaced by another correction's ("within 50 days of delivery"), so the pair differs
only where the fact is and DPO's gradient lands on those tokens. A number the operator wrote
is the fact; any other number there is wrong, so these pairs need no guess about topics.

Transplant pairs need none either. A trained answer given to its own question is what the
customer asked for, so a reply rated down that repeats a correction's fact (``fact_fragments``)
is most likely that answer transplanted to a question it was not written for, as on a topic
operators never correct; it loses to what another version said in the same context.

Everything here is keyed by content, never by ids or arrival order: the same feedback gives
the same rows, in the same order, split the same way, whatever conversation ids the server
drew and in whatever order replies were stored. The split keeps every conversation whole and
puts conversations that open the same way (the same context before their first pair) on one
side, so a question asked again in a later conversation never sits in training and in the
gate's held-out set at once.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from feedback.records import Correction, FeedbackSnapshot, FinishReason, Message, Role

ChatMessage = dict[str, str]
T = TypeVar("T")


@dataclass(frozen=True)
class FeedbackRef:
    """Which stored items a row was built from (for lineage and exclusion)."""

    ratings: tuple[int, ...] = ()
    corrections: tuple[int, ...] = ()
    messages: tuple[str, ...] = ()


@dataclass(frozen=True)
class DPORow:
    prompt: tuple[ChatMessage, ...]
    chosen: str
    rejected: str
    source: str
    group: str  # conversation id: rows of one conversation stay on one side of the split
    refs: FeedbackRef = field(default_factory=FeedbackRef)

    def to_trl(self) -> dict[str, Any]:
        return {
            "prompt": [dict(m) for m in self.prompt],
            "chosen": [{"role": "assistant", "content": self.chosen}],
            "rejected": [{"role": "assistant", "content": self.rejected}],
        }


@dataclass(frozen=True)
class KTORow:
    prompt: tuple[ChatMessage, ...]
    completion: str
    label: bool
    group: str
    refs: FeedbackRef = field(default_factory=FeedbackRef)

    def to_trl(self) -> dict[str, Any]:
        return {
            "prompt": [dict(m) for m in self.prompt],
            "completion": [{"role": "assistant", "content": self.completion}],
            "label": self.label,
        }


@dataclass(frozen=True)
class SFTRow:
    prompt: tuple[ChatMessage, ...]
    completion: str
    source: str
    group: str
    refs: FeedbackRef = field(default_factory=FeedbackRef)

    def to_trl(self) -> dict[str, Any]:
        return {"messages": [dict(m) for m in self.prompt] + [{"role": "assistant", "content": self.completion}]}


Row = DPORow | KTORow | SFTRow
R = TypeVar("R", DPORow, KTORow, SFTRow)


@dataclass(frozen=True)
class TrainingData:
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

    def kto_weights(self) -> tuple[float, float]:
        """(desirable_weight, undesirable_weight) that make both classes weigh the same in total."""
        n_up = sum(1 for r in self.kto if r.label)
        n_down = len(self.kto) - n_up
        if not n_up or not n_down:
            return 1.0, 1.0
        if n_up >= n_down:
            return n_down / n_up, 1.0
        return 1.0, n_up / n_down


_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")


_WORD = re.compile(r"[a-z]+|\d+(?:[.,]\d+)?")


def fact_fragments(text: str) -> set[str]:
    """What a reply must repeat to state a correction's fact: each number with the word after it
    ("30 day", "4.99 dollar", plural s dropped) and, for answers without numbers, every run of
    five words ("forgot password on the sign")."""
    words = [w[:-1] if len(w) > 3 and w.endswith("s") else w for w in _WORD.findall(text.lower().replace("-", " "))]
    numbered = {f"{a} {b}" for a, b in itertools.pairwise(words) if a[0].isdigit() and not b[0].isdigit()}
    if numbered or any(w[0].isdigit() for w in words):
        return numbered
    return {" ".join(words[i : i + 5]) for i in range(len(words) - 4)}


def swap_numbers(text: str, numbers: Sequence[str]) -> str:
    """``text`` with its n-th number replaced by ``numbers[n % len(numbers)]``."""
    count = itertools.count()
    return _NUMBER.sub(lambda _m: numbers[next(count) % len(numbers)], text)


CONTRAST_POOL = 16  # most contrast candidates per corrected reply when the training job picks


def build_training_data(
    snapshot: FeedbackSnapshot,
    *,
    system_prompt: str | None = None,
    contrast: int = 0,
    numbers: int = 0,
    contrast_pool: bool = False,
    transplants: bool = False,
) -> TrainingData:
    """Build every DPO, KTO and SFT row the snapshot supports.

    ``contrast``: for every corrected reply, up to this many extra pairs whose rejected side is
    the correction written for another question (a different text). With ``contrast_pool``
    the rows hold every candidate instead (up to ``CONTRAST_POOL``), and the training job keeps
    the ``contrast`` likeliest under the live model (``pick_likeliest``).
    ``transplants``: a reply rated down, not corrected, that states a fact of an operator
    correction (``fact_fragments``) loses to a reply another model version gave in the same
    context without such a fact.
    ``numbers``: for every corrected reply whose correction holds numbers, up to this many
    pairs whose rejected side is that correction with another correction's numbers in it.
    """
    usable = [m for m in snapshot.messages if m.finish_reason is not FinishReason.ERROR]  # failed replies never train
    messages = {m.id: m for m in usable}
    children: dict[str | None, list[Message]] = defaultdict(list)
    for m in usable:
        children[m.parent_id].append(m)

    def prompt_for(reply: Message) -> tuple[ChatMessage, ...] | None:
        chain: list[ChatMessage] = []
        node_id = reply.parent_id
        seen: set[str] = set()
        while node_id is not None:
            node = messages.get(node_id)
            if node is None or node_id in seen:  # a hole or a loop: the context is unknown
                return None
            seen.add(node_id)
            chain.append({"role": str(node.role), "content": node.text})
            node_id = node.parent_id
        chain.reverse()
        if system_prompt and (not chain or chain[0]["role"] != Role.SYSTEM):
            chain.insert(0, {"role": "system", "content": system_prompt})
        if not chain or chain[-1]["role"] != Role.USER:
            return None
        return tuple(chain)

    # Each rater's latest vote per message; the message's label is the majority.
    latest: dict[tuple[str, str], tuple[int, int]] = {}
    for rating in snapshot.ratings:
        if rating.message_id in messages:
            latest[(rating.message_id, rating.rater)] = (rating.id, rating.value)
    votes: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for (message_id, _rater), vote in latest.items():
        votes[message_id].append(vote)
    labels: dict[str, tuple[int, tuple[int, ...]]] = {}
    for message_id, vs in votes.items():
        total = sum(v for _, v in vs)
        if total:
            labels[message_id] = (1 if total > 0 else -1, tuple(sorted(i for i, _ in vs)))

    def rating_ids_of(message_id: str) -> tuple[int, ...]:
        return labels[message_id][1] if message_id in labels else ()

    latest_correction: dict[str, Correction] = {}
    for c in snapshot.corrections:
        if c.message_id in messages and c.text.strip():
            latest_correction[c.message_id] = c

    dpo: list[DPORow] = []
    sft: list[SFTRow] = []
    kto: list[KTORow] = []
    seen_pairs: set[tuple[tuple[tuple[str, str], ...], str, str]] = set()

    def add_pair(
        prompt: tuple[ChatMessage, ...], chosen: str, rejected: str, source: str, group: str, refs: FeedbackRef
    ) -> None:
        key = (tuple((m["role"], m["content"]) for m in prompt), chosen.strip(), rejected.strip())
        if chosen.strip() == rejected.strip() or key in seen_pairs:
            return
        seen_pairs.add(key)
        dpo.append(DPORow(prompt, chosen, rejected, source, group, refs))

    # 1. operator corrections
    for message_id, c in latest_correction.items():
        reply = messages[message_id]
        prompt = prompt_for(reply)
        if prompt is None:
            continue
        refs = FeedbackRef(corrections=(c.id,), messages=(reply.id,))
        add_pair(prompt, c.text, reply.text, "correction", reply.conversation_id, refs)
        sft.append(SFTRow(prompt, c.text, "correction", reply.conversation_id, refs))

    # 1b. contrast: a correction beats the answers written for other questions
    if contrast > 0:
        corrected = [(c, messages[mid]) for mid, c in latest_correction.items()]
        for c, reply in corrected:
            prompt = prompt_for(reply)
            if prompt is None:
                continue
            own = c.text.strip()
            others: dict[str, Correction] = {}
            for other, _ in corrected:  # one candidate per distinct text
                if other.text.strip() != own:
                    others.setdefault(other.text.strip(), other)
            seed = f"{_prompt_key(prompt)}\x00{own}"
            cap = CONTRAST_POOL if contrast_pool else contrast
            for other in _stable_pick(seed, others.values(), lambda o: o.text.strip(), cap):
                refs = FeedbackRef(corrections=(c.id, other.id), messages=(reply.id,))
                add_pair(prompt, c.text, other.text, "contrast", reply.conversation_id, refs)

    # 1c. numbers: a correction beats itself with another correction's numbers
    if numbers > 0:
        number_sets = {tuple(found) for c in latest_correction.values() if (found := _NUMBER.findall(c.text))}
        for message_id, c in latest_correction.items():
            reply = messages[message_id]
            prompt = prompt_for(reply)
            own_numbers = sorted(_NUMBER.findall(c.text))
            if prompt is None or not own_numbers:
                continue
            alternatives = [a for a in number_sets if sorted(a) != own_numbers]
            seed = f"{_prompt_key(prompt)}\x00{c.text.strip()}"
            for alternative in _stable_pick(seed, alternatives, " ".join, numbers):
                refs = FeedbackRef(corrections=(c.id,), messages=(reply.id,))
                add_pair(prompt, c.text, swap_numbers(c.text, alternative), "numbers", reply.conversation_id, refs)

    # 2 and 4. siblings: answers to one context (regenerations, or up and down votes)
    for parent_id, group in children.items():
        replies = [m for m in group if m.role is Role.ASSISTANT]
        if parent_id is None or len(replies) < 2:
            continue
        prompt = prompt_for(replies[0])
        if prompt is None:
            continue
        regenerated_away = {m.regenerated_from for m in replies if m.regenerated_from}
        up = [m for m in replies if labels.get(m.id, (0,))[0] == 1]
        down = [m for m in replies if labels.get(m.id, (0,))[0] == -1]
        kept = [m for m in replies if any(ch.role is Role.USER for ch in children.get(m.id, ()))]
        if up:
            chosen_reply = max(up, key=lambda m: m.seq)
        elif kept and regenerated_away:
            chosen_reply = max(kept, key=lambda m: m.seq)
        else:
            continue
        for loser in replies:
            if loser is chosen_reply or loser in up or not (loser.id in regenerated_away or loser in down):
                continue
            refs = FeedbackRef(
                ratings=rating_ids_of(chosen_reply.id) + rating_ids_of(loser.id),
                messages=(chosen_reply.id, loser.id),
            )
            source = "regeneration" if loser.id in regenerated_away else "thumbs_pair"
            add_pair(prompt, chosen_reply.text, loser.text, source, chosen_reply.conversation_id, refs)

    # 2b. transplants: a reply customers rated down that states another correction's fact loses
    # to a reply another version gave in the same context without it
    if transplants:
        facts = {text: fact_fragments(text) for text in {c.text.strip() for c in latest_correction.values()}}
        by_context: dict[str, list[Message]] = defaultdict(list)
        contexts: dict[str, tuple[ChatMessage, ...]] = {}
        for m in usable:
            if m.role is Role.ASSISTANT and not m.by_operator and m.text.strip() and m.id not in latest_correction:
                context = prompt_for(m)
                if context is not None:
                    by_context[_prompt_key(context)].append(m)
                    contexts[m.id] = context
        for key, replies in by_context.items():
            stated = {m.id: [t for t, f in facts.items() if f & fact_fragments(m.text)] for m in replies}
            for m in replies:
                if labels.get(m.id, (0,))[0] != -1 or not stated[m.id]:
                    continue
                clean = [o for o in replies if o.model_version != m.model_version and not stated[o.id]]
                if not clean:
                    continue
                (chosen_reply,) = _stable_pick(key, clean, lambda o: o.text, 1)
                refs = FeedbackRef(ratings=rating_ids_of(m.id), messages=(chosen_reply.id, m.id))
                add_pair(contexts[m.id], chosen_reply.text, m.text, "transplant", m.conversation_id, refs)

    # 3. thumbs -> KTO
    for message_id, (label, rating_ids) in labels.items():
        reply = messages[message_id]
        if reply.role is not Role.ASSISTANT or reply.by_operator or not reply.text.strip():
            continue
        prompt = prompt_for(reply)
        if prompt is None:
            continue
        kto.append(
            KTORow(
                prompt,
                reply.text,
                label > 0,
                reply.conversation_id,
                FeedbackRef(ratings=rating_ids, messages=(reply.id,)),
            )
        )

    # 5. operator takeover replies -> SFT demonstrations
    for m in snapshot.messages:
        if m.role is Role.ASSISTANT and m.by_operator and m.text.strip():
            prompt = prompt_for(m)
            if prompt is not None:
                sft.append(SFTRow(prompt, m.text, "takeover", m.conversation_id, FeedbackRef(messages=(m.id,))))

    return TrainingData(dpo=_canonical(dpo), kto=_canonical(kto), sft=_canonical(sft))


def replay_rows(
    prompts: Sequence[str], answers: Sequence[str], corrections: Iterable[str], *, system_prompt: str | None
) -> list[dict[str, Any]]:
    """Contrast candidates on ordinary chat: each prompt's shipped answer (chosen) against every
    distinct operator correction (rejected), as TRL DPO rows. The job keeps one per prompt
    (``pick_likeliest``). The SFT half of the loss replays ordinary chat, so the adapter keeps
    talking as it did; the DPO half says a shop answer does not belong there."""
    texts = sorted({c.strip() for c in corrections if c.strip()})
    rows = []
    for prompt, answer in zip(prompts, answers, strict=True):
        chat = [{"role": "system", "content": system_prompt}] if system_prompt else []
        chat.append({"role": "user", "content": prompt})
        rows += [
            {
                "prompt": chat,
                "chosen": [{"role": "assistant", "content": answer}],
                "rejected": [{"role": "assistant", "content": t}],
            }
            for t in texts
            if t != answer.strip()
        ]
    return rows


def pick_likeliest(rows: Sequence[dict[str, Any]], scores: Sequence[float], k: int) -> list[dict[str, Any]]:
    """Hard negatives: of the contrast candidates of each question (TRL DPO rows sharing a prompt
    and a chosen answer), the ``k`` whose rejected answer scored highest (the scoring model's
    mean log-probability per token): the other answers that model is likeliest to give there.
    Ties go by a stable hash; the rows keep their input order."""
    if len(rows) != len(scores):
        raise ValueError(f"{len(rows)} contrast rows but {len(scores)} scores")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[f"{_prompt_key(row['prompt'])}\x00{row['chosen'][0]['content']}"].append(i)
    keep: set[int] = set()
    for key, members in groups.items():
        ranked = sorted(members, key=lambda i: (-scores[i], _bucket(f"{key}\x00{rows[i]['rejected'][0]['content']}")))
        keep.update(ranked[:k])
    return [row for i, row in enumerate(rows) if i in keep]


def _prompt_key(prompt: Sequence[ChatMessage]) -> str:
    return "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in prompt)


def _canonical(rows: Sequence[R]) -> tuple[R, ...]:
    """Rows in an order fixed by their content alone (a hash, so kinds and topics interleave)."""
    return tuple(sorted(rows, key=lambda r: _bucket(f"{getattr(r, 'source', '')}\x00{r.to_trl()!r}")))


def _stable_pick(seed: str, items: Iterable[T], key: Callable[[T], str], k: int) -> list[T]:
    """Up to ``k`` of ``items``, ordered by a hash of ``seed`` and each item's ``key``: the same
    inputs always pick the same items, whatever order they came in."""
    return sorted(items, key=lambda item: _bucket(f"{seed}\x00{key(item)}"))[:k]


def _bucket(group: str) -> float:
    digest = hashlib.sha256(group.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_groups(groups: Iterable[str], fraction: float) -> set[str]:
    """The groups held out for evaluation: a stable hash bucket below ``fraction``.

    With two or more groups and ``fraction > 0``, at least one group is held out and at
    least one stays for training.
    """
    unique = sorted(set(groups), key=_bucket)
    if fraction <= 0 or len(unique) < 2:
        return set()
    held = {g for g in unique if _bucket(g) < fraction}
    if not held:
        held = {unique[0]}
    if len(held) == len(unique):
        held.discard(unique[-1])
    return held


def split(data: TrainingData, fraction: float) -> tuple[TrainingData, TrainingData]:
    """(train, held-out), split by conversation so no conversation sits on both sides.

    The split is over the DPO pairs' conversations (the gate's evidence); other rows of a
    held-out conversation are held out with them. A conversation's side is decided by its
    content (the smallest context among its pairs), not its id, so conversations that open
    alike fall on one side and the same feedback always splits the same way.
    """
    keys: dict[str, str] = {}
    for row in data.dpo:
        key = _prompt_key(row.prompt)
        if row.group not in keys or key < keys[row.group]:
            keys[row.group] = key
    held_keys = split_groups(keys.values(), fraction)
    held = {group for group, key in keys.items() if key in held_keys}

    def part(rows: Sequence[Any], keep_held: bool) -> tuple[Any, ...]:
        return tuple(r for r in rows if (r.group in held) == keep_held)

    train = TrainingData(part(data.dpo, False), part(data.kto, False), part(data.sft, False))
    heldout = TrainingData(part(data.dpo, True), part(data.kto, True), part(data.sft, True))
    return train, heldout


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
    "SFTRow",
    "TrainingData",
    "build_training_data",
    "class_balance_ok",
    "dataset_id",
    "fact_fragments",
    "pick_likeliest",
    "replay_rows",
    "split",
    "split_groups",
    "swap_numbers",
]
