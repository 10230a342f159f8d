"""Feedback signals -> TRL rows, one function per signal. Pure: no I/O, no clock, no randomness.

``build_training_data`` indexes the snapshot once (``SignalContext``) and runs every signal
over it (README, "Feedback becomes training data"; the row types live in ``training.pairs``):

>>> # operator correction of reply R        -> correction_pairs: DPO(chosen=correction, rejected=R)
>>> #                                          correction_demos: SFT(correction)
>>> # regenerate, one sibling rated up/kept -> sibling_pairs: DPO(chosen=that sibling, rejected=regenerated-away one)
>>> # thumbs on a reply                     -> thumbs_rows: KTO(label = majority of raters' latest votes)
>>> # what the customer wrote next (thanks, complaint, re-ask, asking for a person; ``implicit``)
>>> #                                       -> implicit_rows: KTO(label = the weak label, weight < 1)
>>> # up and down on answers to one context -> opposite_thumbs_pairs: DPO(chosen=up, rejected=down)
>>> # operator takeover reply               -> takeover_demos: SFT(the operator's reply)
>>> # correction C of a reply to Q, with other corrections D (``contrast`` > 0)
>>> #                                       -> contrast_pairs: DPO(Q, chosen=C, rejected=D) for up to ``contrast``
>>> # reply R rated down, not corrected, stating a correction's fact (``transplants``)
>>> #                                       -> transplant_pairs: DPO(chosen=another version's reply in that
>>> #                                          context without it, rejected=R)
>>> # correction C with a number, numbers N of other corrections (``numbers`` > 0)
>>> #                                       -> number_pairs: DPO(Q, chosen=C, rejected=C with its numbers set to N)
>>> # ordinary chat prompt P shipped with answer A, every correction C
>>> #                                       -> replay_rows: DPO(P, chosen=A, rejected=C) (built in the job)

Contrast pairs teach that an answer belongs to its question: without them the SFT loss on a
few short policy answers makes the model answer any shop question with the nearest one it
learned (bench/RESULTS.md, "leaks"). Their rejected side is another context's correction
whose text differs, picked by a stable hash, or, with ``contrast_pool``, every such
correction, of which the training job keeps the ones the live version finds likeliest there
(``training.pairs.pick_likeliest``: hard negatives).

Number pairs teach it fact by fact: the rejected side is the correction itself with its
numbers replaced by another correction's ("within 50 days of delivery"), so the pair differs
only where the fact is and DPO's gradient lands on those tokens. A number the operator wrote
is the fact; any other number there is wrong, so these pairs need no guess about topics.

Transplant pairs need none either. A trained answer given to its own question is what the
customer asked for, so a reply rated down that repeats a correction's fact (``fact_fragments``)
is most likely that answer transplanted to a question it was not written for, as on a topic
operators never correct; it loses to what another version said in the same context.

When two signals give the same pair (the same prompt and answers), the one built first keeps
it, in the order ``build_training_data`` lists them; each kind of row then takes its content
order (``training.pairs.canonical``).
"""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from feedback.records import Correction, FeedbackSnapshot, FinishReason, Message, Reaction, Role
from training.pairs import (
    ChatMessage,
    DPORow,
    FeedbackRef,
    KTORow,
    Prompt,
    SFTRow,
    TrainingData,
    canonical,
    prompt_key,
    stable_pick,
)

CONTRAST_POOL = 16  # most contrast candidates per corrected reply when the training job picks

_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
_WORD = re.compile(r"[a-z]+|\d+(?:[.,]\d+)?")


class Verdict(NamedTuple):
    """What the raters of one message said: the majority of each rater's latest vote."""

    value: int  # 1 (up) or -1 (down); a tie gives no verdict
    rating_ids: tuple[int, ...]  # the latest votes it counted, by id


@dataclass(frozen=True)
class SignalContext:
    """One snapshot, indexed once for every signal."""

    messages: tuple[Message, ...]  # every stored message, failed ones too (takeovers are read from these)
    usable: tuple[Message, ...]  # the messages that may train: failed replies never do
    children: Mapping[str | None, Sequence[Message]]  # usable messages by parent id, in snapshot order
    prompts: Mapping[str, Prompt]  # message id -> the chat up to it, where that chat is whole and ends with the user
    verdicts: Mapping[str, Verdict]  # usable message id -> its verdict
    corrections: Mapping[str, Correction]  # usable message id -> its latest correction with text
    by_id: Mapping[str, Message]  # usable messages by id

    @classmethod
    def of(cls, snapshot: FeedbackSnapshot, *, system_prompt: str | None = None) -> SignalContext:
        usable = tuple(m for m in snapshot.messages if m.finish_reason is not FinishReason.ERROR)
        by_id = {m.id: m for m in usable}
        children: dict[str | None, list[Message]] = defaultdict(list)
        for m in usable:
            children[m.parent_id].append(m)
        prompts = {
            m.id: prompt
            for m in snapshot.messages
            if (prompt := _prompt_for(m, by_id, system_prompt=system_prompt)) is not None
        }
        corrections: dict[str, Correction] = {}
        for c in snapshot.corrections:
            if c.message_id in by_id and c.text.strip():
                corrections[c.message_id] = c  # a later correction replaces the text, not the place
        return cls(
            messages=snapshot.messages,
            usable=usable,
            children=children,
            prompts=prompts,
            verdicts=_verdicts(snapshot, by_id),
            corrections=corrections,
            by_id=by_id,
        )

    def vote(self, message_id: str) -> int:
        """1, -1, or 0 for a message without a verdict."""
        verdict = self.verdicts.get(message_id)
        return verdict.value if verdict else 0

    def rating_ids(self, message_id: str) -> tuple[int, ...]:
        verdict = self.verdicts.get(message_id)
        return verdict.rating_ids if verdict else ()

    def corrected(self) -> Iterator[tuple[Correction, Message, Prompt]]:
        """Each corrected reply whose context is known, with its latest correction and its prompt."""
        for message_id, c in self.corrections.items():
            reply = self.by_id[message_id]
            if (prompt := self.prompts.get(reply.id)) is not None:
                yield c, reply, prompt


def _prompt_for(reply: Message, by_id: Mapping[str, Message], *, system_prompt: str | None) -> Prompt | None:
    """The chat up to ``reply`` (with the system prompt), or None when it has a hole or a loop or
    does not end with the user."""
    chain: list[ChatMessage] = []
    node_id = reply.parent_id
    seen: set[str] = set()
    while node_id is not None:
        node = by_id.get(node_id)
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


def _verdicts(snapshot: FeedbackSnapshot, by_id: Mapping[str, Message]) -> dict[str, Verdict]:
    latest: dict[tuple[str, str], tuple[int, int]] = {}  # (message, rater) -> (rating id, value)
    for rating in snapshot.ratings:
        if rating.message_id in by_id:
            latest[(rating.message_id, rating.rater)] = (rating.id, rating.value)
    votes: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for (message_id, _rater), vote in latest.items():
        votes[message_id].append(vote)
    verdicts = {}
    for message_id, vs in votes.items():
        if total := sum(v for _, v in vs):
            verdicts[message_id] = Verdict(1 if total > 0 else -1, tuple(sorted(i for i, _ in vs)))
    return verdicts


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


def correction_pairs(ctx: SignalContext) -> list[DPORow]:
    """Operator correction of a reply: DPO(chosen = the correction, rejected = the reply)."""
    return [
        DPORow(prompt, c.text, reply.text, "correction", reply.conversation_id, _correction_refs(c, reply))
        for c, reply, prompt in ctx.corrected()
    ]


def correction_demos(ctx: SignalContext) -> list[SFTRow]:
    """Operator correction of a reply: SFT(the correction), a demonstration for that context."""
    return [
        SFTRow(prompt, c.text, "correction", reply.conversation_id, _correction_refs(c, reply))
        for c, reply, prompt in ctx.corrected()
    ]


def _correction_refs(c: Correction, reply: Message) -> FeedbackRef:
    return FeedbackRef(corrections=(c.id,), messages=(reply.id,))


def contrast_pairs(ctx: SignalContext, k: int, *, pool: bool = False) -> list[DPORow]:
    """A correction beats the answers written for other questions: for every corrected reply, up to
    ``k`` pairs whose rejected side is another reply's correction (a different text), picked by a
    stable hash. With ``pool``, every candidate instead (up to ``CONTRAST_POOL``), of which the
    training job keeps the ``k`` likeliest under the live model."""
    if k < 1:
        return []
    rows = []
    for c, reply, prompt in ctx.corrected():
        own = c.text.strip()
        others: dict[str, Correction] = {}
        for other in ctx.corrections.values():  # one candidate per distinct text
            if other.text.strip() != own:
                others.setdefault(other.text.strip(), other)
        seed = f"{prompt_key(prompt)}\x00{own}"
        for other in stable_pick(seed, others.values(), lambda o: o.text.strip(), CONTRAST_POOL if pool else k):
            refs = FeedbackRef(corrections=(c.id, other.id), messages=(reply.id,))
            rows.append(DPORow(prompt, c.text, other.text, "contrast", reply.conversation_id, refs))
    return rows


def number_pairs(ctx: SignalContext, k: int) -> list[DPORow]:
    """A correction beats itself with another correction's numbers: for every correction holding
    numbers, up to ``k`` pairs whose rejected side is that text with, say, "50 days" for "30 days"."""
    if k < 1:
        return []
    number_sets = {tuple(found) for c in ctx.corrections.values() if (found := _NUMBER.findall(c.text))}
    rows = []
    for c, reply, prompt in ctx.corrected():
        own_numbers = sorted(_NUMBER.findall(c.text))
        if not own_numbers:
            continue
        alternatives = [a for a in number_sets if sorted(a) != own_numbers]
        seed = f"{prompt_key(prompt)}\x00{c.text.strip()}"
        for alternative in stable_pick(seed, alternatives, " ".join, k):
            refs = _correction_refs(c, reply)
            rows.append(
                DPORow(prompt, c.text, swap_numbers(c.text, alternative), "numbers", reply.conversation_id, refs)
            )
    return rows


@dataclass(frozen=True)
class _Siblings:
    """The answers to one context, and the one the customer preferred."""

    prompt: Prompt
    replies: Sequence[Message]
    preferred: Message  # the latest rated up, else (after a regeneration) the latest the conversation went on from
    regenerated_away: frozenset[str]
    up: Sequence[Message]
    down: Sequence[Message]

    def pair(self, loser: Message, source: str, ctx: SignalContext) -> DPORow:
        refs = FeedbackRef(
            ratings=ctx.rating_ids(self.preferred.id) + ctx.rating_ids(loser.id),
            messages=(self.preferred.id, loser.id),
        )
        return DPORow(self.prompt, self.preferred.text, loser.text, source, self.preferred.conversation_id, refs)

    def losers(self) -> Iterator[Message]:
        return (m for m in self.replies if m is not self.preferred and m not in self.up)


def _sibling_sets(ctx: SignalContext) -> Iterator[_Siblings]:
    """Every context with two or more answers (regenerations) and a preferred one."""
    for parent_id, group in ctx.children.items():
        replies = [m for m in group if m.role is Role.ASSISTANT]
        if parent_id is None or len(replies) < 2:
            continue
        prompt = ctx.prompts.get(replies[0].id)
        if prompt is None:
            continue
        regenerated_away = frozenset(m.regenerated_from for m in replies if m.regenerated_from)
        up = [m for m in replies if ctx.vote(m.id) == 1]
        down = [m for m in replies if ctx.vote(m.id) == -1]
        kept = [m for m in replies if any(ch.role is Role.USER for ch in ctx.children.get(m.id, ()))]
        if up:
            preferred = max(up, key=lambda m: m.seq)
        elif kept and regenerated_away:
            preferred = max(kept, key=lambda m: m.seq)
        else:
            continue
        yield _Siblings(prompt, replies, preferred, regenerated_away, up, down)


def sibling_pairs(ctx: SignalContext) -> list[DPORow]:
    """Regenerate, then one sibling rated up or kept: DPO(chosen = that sibling, rejected = each
    answer regenerated away)."""
    return [
        s.pair(loser, "regeneration", ctx)
        for s in _sibling_sets(ctx)
        for loser in s.losers()
        if loser.id in s.regenerated_away
    ]


def opposite_thumbs_pairs(ctx: SignalContext) -> list[DPORow]:
    """Thumbs up and down on answers to one context: DPO(chosen = the latest rated up, or kept,
    rejected = each one rated down)."""
    return [
        s.pair(loser, "thumbs_pair", ctx)
        for s in _sibling_sets(ctx)
        for loser in s.losers()
        if loser in s.down and loser.id not in s.regenerated_away
    ]


def transplant_pairs(ctx: SignalContext) -> list[DPORow]:
    """A reply customers rated down that states a correction's fact (``fact_fragments``) loses to a
    reply another model version gave in the same context without one."""
    facts = {text: fact_fragments(text) for text in {c.text.strip() for c in ctx.corrections.values()}}
    by_context: dict[str, list[Message]] = defaultdict(list)
    for m in ctx.usable:
        if _model_reply(m) and m.id not in ctx.corrections and (context := ctx.prompts.get(m.id)) is not None:
            by_context[prompt_key(context)].append(m)
    rows = []
    for key, replies in by_context.items():
        stated = {m.id: [t for t, f in facts.items() if f & fact_fragments(m.text)] for m in replies}
        for m in replies:
            if ctx.vote(m.id) != -1 or not stated[m.id]:
                continue
            clean = [o for o in replies if o.model_version != m.model_version and not stated[o.id]]
            if not clean:
                continue
            (chosen,) = stable_pick(key, clean, lambda o: o.text, 1)
            refs = FeedbackRef(ratings=ctx.rating_ids(m.id), messages=(chosen.id, m.id))
            rows.append(DPORow(ctx.prompts[m.id], chosen.text, m.text, "transplant", m.conversation_id, refs))
    return rows


def thumbs_rows(ctx: SignalContext) -> list[KTORow]:
    """Thumbs on a model's reply: KTO(label = the raters' verdict)."""
    rows = []
    for message_id, (value, rating_ids) in ctx.verdicts.items():
        reply = ctx.by_id[message_id]
        if _model_reply(reply) and (prompt := ctx.prompts.get(reply.id)) is not None:
            refs = FeedbackRef(ratings=rating_ids, messages=(reply.id,))
            rows.append(KTORow(prompt, reply.text, value > 0, reply.conversation_id, refs))
    return rows


def implicit_rows(ctx: SignalContext, reactions: Iterable[Reaction]) -> list[KTORow]:
    """What the customer wrote next, read as a weak label on a model's reply: KTO(label = the label,
    ``weight`` = its weight, below a thumb's). Never where a thumb gave a verdict or an operator
    corrected the reply (``training.trust`` already left those out; this holds without it too)."""
    rows = []
    for r in reactions:
        reply = ctx.by_id.get(r.reply_id)
        if r.value is None or r.weight <= 0 or reply is None or not _model_reply(reply):
            continue
        if r.reply_id in ctx.verdicts or r.reply_id in ctx.corrections:
            continue
        if (prompt := ctx.prompts.get(reply.id)) is not None:
            refs = FeedbackRef(messages=(reply.id, r.message_id))
            rows.append(KTORow(prompt, reply.text, r.value > 0, reply.conversation_id, refs, r.weight, r.signal))
    return rows


def _model_reply(m: Message) -> bool:
    """A reply the model wrote, with text: no author (an operator's reply has one, and so has an assistant
    turn a client wrote itself in an OpenAI-API request)."""
    return m.role is Role.ASSISTANT and m.author is None and bool(m.text.strip())


def takeover_demos(ctx: SignalContext) -> list[SFTRow]:
    """Operator takeover reply: SFT(the operator's reply), a demonstration for that context."""
    return [
        SFTRow(prompt, m.text, "takeover", m.conversation_id, FeedbackRef(messages=(m.id,)))
        for m in ctx.messages
        if m.role is Role.ASSISTANT and m.by_operator and m.text.strip() and (prompt := ctx.prompts.get(m.id))
    ]


def replay_rows(
    prompts: Sequence[str], answers: Sequence[str], corrections: Iterable[str], *, system_prompt: str | None
) -> list[DPORow]:
    """Ordinary chat: each prompt's shipped answer (chosen) against every distinct operator
    correction (rejected), as contrast candidates of which the job keeps one per prompt
    (``pick_likeliest``). The SFT half of the loss replays ordinary chat, so the adapter keeps
    talking as it did; the DPO half says a shop answer does not belong there."""
    texts = sorted({c.strip() for c in corrections if c.strip()})
    chat: Prompt = ({"role": "system", "content": system_prompt},) if system_prompt else ()
    return [
        DPORow((*chat, {"role": "user", "content": prompt}), answer, text, "replay", "replay")
        for prompt, answer in zip(prompts, answers, strict=True)
        for text in texts
        if text != answer.strip()
    ]


def build_training_data(
    snapshot: FeedbackSnapshot,
    *,
    system_prompt: str | None = None,
    contrast: int = 0,
    numbers: int = 0,
    contrast_pool: bool = False,
    transplants: bool = False,
    implicit: bool = False,
) -> TrainingData:
    """Every DPO, KTO and SFT row the snapshot supports.

    ``system_prompt`` opens every prompt; ``contrast`` and ``contrast_pool``: ``contrast_pairs``;
    ``numbers``: ``number_pairs``; ``transplants``: ``transplant_pairs``; ``implicit``:
    ``implicit_rows`` from the snapshot's reactions (all off by default).
    """
    ctx = SignalContext.of(snapshot, system_prompt=system_prompt)
    dpo = _unique(
        [
            *correction_pairs(ctx),
            *contrast_pairs(ctx, contrast, pool=contrast_pool),
            *number_pairs(ctx, numbers),
            *_in_answer_order(ctx, sibling_pairs(ctx) + opposite_thumbs_pairs(ctx)),
            *(transplant_pairs(ctx) if transplants else []),
        ]
    )
    kto = thumbs_rows(ctx) + (implicit_rows(ctx, snapshot.reactions) if implicit else [])
    sft = correction_demos(ctx) + takeover_demos(ctx)
    return TrainingData(dpo=canonical(dpo), kto=canonical(kto), sft=canonical(sft))


def _unique(rows: Iterable[DPORow]) -> list[DPORow]:
    """Each pair once (by prompt and both answers' stripped text: the first one keeps it, with its
    source and refs), and none whose answers are the same."""
    seen: set[tuple[tuple[tuple[str, str], ...], str, str]] = set()
    unique = []
    for row in rows:
        key = (tuple((m["role"], m["content"]) for m in row.prompt), row.chosen.strip(), row.rejected.strip())
        if row.chosen.strip() != row.rejected.strip() and key not in seen:
            seen.add(key)
            unique.append(row)
    return unique


def _in_answer_order(ctx: SignalContext, rows: Iterable[DPORow]) -> list[DPORow]:
    """Pairs between answers to one context, by context (in the order of its first answer), then
    by the rejected answer: where a regeneration and a thumbs pair are the same pair, the one
    whose answer came first keeps it."""
    place: dict[str, tuple[int, int]] = {}
    for i, group in enumerate(ctx.children.values()):
        place.update((m.id, (i, j)) for j, m in enumerate(group))
    return sorted(rows, key=lambda r: place[r.refs.messages[-1]])


__all__ = [
    "CONTRAST_POOL",
    "SignalContext",
    "Verdict",
    "build_training_data",
    "contrast_pairs",
    "correction_demos",
    "correction_pairs",
    "fact_fragments",
    "implicit_rows",
    "number_pairs",
    "opposite_thumbs_pairs",
    "replay_rows",
    "sibling_pairs",
    "swap_numbers",
    "takeover_demos",
    "thumbs_rows",
    "transplant_pairs",
]
