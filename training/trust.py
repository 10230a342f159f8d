"""Trust: who may teach the model, and how much. Pure functions over a feedback snapshot.

Before rows are built:

* erased users' conversations and ratings are dropped (belt and braces: the store deleted them);
* messages an operator excluded are dropped, with everything built on them;
* ratings of raters held for review (flagged, not yet approved, or rejected) are dropped;
* no single rater, channel or tenant supplies more than a set share of the run's ratings (for
  a rater, also no more than ``rater_share_multiple`` equal shares: 1% when 1,000 rate):
  the largest per-identity count ``k`` with ``k <= share * sum(min(count, k))`` is kept
  (earliest ratings first). Operator corrections and takeover replies are reviewed data and
  are not capped; they are repeated ``operator_weight`` times in the training set instead.
* implicit feedback (a weak label read from the customer's next message) has its own caps: at
  most ``implicit_max_per_conversation`` labels from one conversation (the earliest), and no
  customer supplies more than ``implicit_max_rater_share`` of the run's implicit labels (nor
  more than ``rater_share_multiple`` equal shares). It never overrides an explicit verdict: a
  reply that any thumb (a held rater's too) or an operator's correction judged gets no implicit
  label, and a customer held for review teaches nothing implicitly either.

Raters are flagged when they rate in bursts, rate far more than the typical rater, or keep
contradicting the other raters or the operators of the same replies.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from feedback.records import Conversation, FeedbackSnapshot, RaterState, Rating, Reaction, subject_hash
from training.pairs import TrainingData


@dataclass(frozen=True)
class TrustConfig:
    max_rater_share: float = field(
        default=0.2, metadata={"help": "Largest share of a run's ratings one rater may supply (1 = no cap)."}
    )
    rater_share_multiple: float = field(
        default=10.0,
        metadata={
            "help": "Nor more than this many times an equal share (1 / raters) of the run's ratings: with "
            "1,000 raters no one supplies over 1% (0 = no such cap)."
        },
    )
    max_channel_share: float = field(default=1.0, metadata={"help": "Same cap per channel."})
    max_tenant_share: float = field(default=1.0, metadata={"help": "Same cap per tenant."})
    flag_min_ratings: int = field(default=50, metadata={"help": "Raters with fewer ratings are never volume-flagged."})
    flag_volume_factor: float = field(
        default=10.0, metadata={"help": "Flag a rater with more than this many times the median rater's ratings."}
    )
    flag_burst_count: int = field(default=30, metadata={"help": "Flag more than this many ratings in one window..."})
    flag_burst_window_s: float = field(default=60.0, metadata={"help": "...of this many seconds."})
    flag_disagreement: float = field(
        default=0.8, metadata={"help": "Flag a rater who contradicts the others on this share of shared replies..."}
    )
    flag_min_shared: int = field(default=10, metadata={"help": "...once they share at least this many replies."})
    operator_weight: int = field(
        default=2, metadata={"help": "Operator-reviewed rows (corrections, takeovers) count this many times."}
    )
    implicit_max_rater_share: float = field(
        default=0.2,
        metadata={
            "help": "Largest share of a run's implicit labels (implicit.train) one customer may supply (1 = no cap); "
            "also no more than rater_share_multiple equal shares."
        },
    )
    implicit_max_per_conversation: int = field(
        default=3,
        metadata={"help": "Most implicit labels one conversation gives a run (its earliest; 0 = none)."},
    )

    def __post_init__(self) -> None:
        for name in ("max_rater_share", "max_channel_share", "max_tenant_share", "implicit_max_rater_share"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"trust.{name} is a share: set it in (0, 1]")
        if self.rater_share_multiple < 0 or 0 < self.rater_share_multiple < 1:
            raise ValueError("trust.rater_share_multiple: 0 (off) or at least 1")
        if self.operator_weight < 1:
            raise ValueError("trust.operator_weight must be at least 1")
        if self.implicit_max_per_conversation < 0:
            raise ValueError("trust.implicit_max_per_conversation must be 0 or more")


@dataclass
class TrustReport:
    removed: Counter[str] = field(default_factory=Counter)  # reason -> number of items
    held_raters: dict[str, int] = field(default_factory=dict)  # rater -> ratings held
    capped: dict[str, int] = field(default_factory=dict)  # "rater:x" / "channel:y" / "implicit:z" -> items cut
    new_flags: dict[str, list[str]] = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        return {
            "removed": dict(self.removed),
            "held_raters": len(self.held_raters),
            "held_ratings": sum(self.held_raters.values()),
            "capped_ratings": sum(v for k, v in self.capped.items() if not k.startswith("implicit:")),
            "capped_implicit": sum(v for k, v in self.capped.items() if k.startswith("implicit:")),
            "new_flags": len(self.new_flags),
        }


def flag_raters(snapshot: FeedbackSnapshot, config: TrustConfig) -> dict[str, list[str]]:
    """Raters whose ratings look anomalous, with the reasons. Approved raters are never flagged."""
    by_rater: dict[str, list[Rating]] = defaultdict(list)
    for r in snapshot.ratings:
        by_rater[r.rater].append(r)
    if not by_rater:
        return {}
    flags: dict[str, list[str]] = defaultdict(list)
    median = statistics.median(len(v) for v in by_rater.values())
    # pass 1: volume and bursts
    for rater, ratings in by_rater.items():
        n = len(ratings)
        if n >= config.flag_min_ratings and n > config.flag_volume_factor * median:
            flags[rater].append(f"volume: {n} ratings, {n / median:.0f}x the median rater ({median:g})")
        times = sorted(r.created_at for r in ratings)
        j = 0
        for i, t in enumerate(times):
            while t - times[j] > config.flag_burst_window_s:
                j += 1
            if i - j + 1 > config.flag_burst_count:
                flags[rater].append(f"burst: {i - j + 1} ratings within {config.flag_burst_window_s:g} s")
                break
    # pass 2: disagreement with the others, counting only raters not already flagged (so a
    # flood of coordinated votes cannot make honest raters look like the dissenters)
    corrected = {c.message_id for c in snapshot.corrections}
    operator_replies = {m.id for m in snapshot.messages if m.by_operator}
    votes: dict[str, dict[str, int]] = defaultdict(dict)
    for r in snapshot.ratings:
        if r.rater not in flags:
            votes[r.message_id][r.rater] = r.value  # latest vote per rater
    for rater, ratings in by_rater.items():
        shared = disagree = 0
        for message_id, value in {r.message_id: r.value for r in ratings}.items():
            others = [v for who, v in votes[message_id].items() if who != rater]
            verdict = sum(others)
            if message_id in corrected:  # an operator said the reply was wrong
                verdict -= max(1, len(others))
            if message_id in operator_replies:  # an operator wrote it
                verdict += max(1, len(others))
            if verdict == 0:
                continue
            shared += 1
            disagree += (verdict > 0) != (value > 0)
        if shared >= config.flag_min_shared and disagree / shared >= config.flag_disagreement:
            flags[rater].append(
                f"disagreement: contradicts other raters or operators on {disagree} of {shared} replies"
            )
    return {
        rater: reasons for rater, reasons in flags.items() if snapshot.rater_states.get(rater) != RaterState.APPROVED
    }


def cap_counts(counts: dict[str, int], max_share: float) -> dict[str, int]:
    """Per-identity allowance so that no identity exceeds ``max_share`` of the kept total."""
    if max_share >= 1 or not counts:
        return dict(counts)
    lo, hi = 0, max(counts.values())
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mid <= max_share * sum(min(c, mid) for c in counts.values()):
            lo = mid
        else:
            hi = mid - 1
    return {who: min(c, lo) for who, c in counts.items()}


def rater_share(config: TrustConfig, raters: int, *, implicit: bool = False) -> float:
    """The largest share of the run's ratings (``implicit``: implicit labels) one rater may supply when
    ``raters`` contribute: ``max_rater_share`` (``implicit_max_rater_share``), and at most
    ``rater_share_multiple`` equal shares."""
    share = config.implicit_max_rater_share if implicit else config.max_rater_share
    if config.rater_share_multiple == 0 or raters == 0:
        return share
    return min(share, config.rater_share_multiple / raters)


def _cap(
    ratings: list[Rating], key: Callable[[Rating], str | None], share: float, label: str, report: TrustReport
) -> list[Rating]:
    counts = Counter(k for r in ratings if (k := key(r)) is not None)
    allowed = cap_counts(dict(counts), share)
    used: Counter[str] = Counter()
    kept = []
    for r in sorted(ratings, key=lambda r: r.id):
        k = key(r)
        if k is not None:
            used[k] += 1
            if used[k] > allowed[k]:
                report.capped[f"{label}:{k}"] = report.capped.get(f"{label}:{k}", 0) + 1
                continue
        kept.append(r)
    return kept


def filter_snapshot(snapshot: FeedbackSnapshot, config: TrustConfig) -> tuple[FeedbackSnapshot, TrustReport]:
    """The snapshot that may train: erased, excluded, held and over-cap items removed."""
    report = TrustReport()
    erased = snapshot.erased_subjects
    conversations = {c.id: c for c in snapshot.conversations}
    gone_conversations = {c.id for c in snapshot.conversations if c.user_id and subject_hash(c.user_id) in erased}
    messages = []
    for m in snapshot.messages:
        if m.conversation_id in gone_conversations:
            report.removed["erased user's message"] += 1
        elif m.id in snapshot.excluded_messages:
            report.removed["excluded by an operator"] += 1
        else:
            messages.append(m)
    kept_ids = {m.id for m in messages}
    conversation_of = {m.id: m.conversation_id for m in messages}

    report.new_flags = flag_raters(snapshot, config)
    held = {r for r, s in snapshot.rater_states.items() if s in (RaterState.PENDING, RaterState.REJECTED)}
    held |= set(report.new_flags)
    ratings: list[Rating] = []
    for r in snapshot.ratings:
        if subject_hash(r.rater) in erased:
            report.removed["erased rater"] += 1
        elif r.message_id not in kept_ids:
            report.removed["rating of a removed message"] += 1
        elif r.rater in held:
            report.held_raters[r.rater] = report.held_raters.get(r.rater, 0) + 1
        else:
            ratings.append(r)
    raters = len({r.rater for r in ratings})
    ratings = _cap(ratings, lambda r: r.rater, rater_share(config, raters), "rater", report)

    def conv_attr(attr: str) -> Callable[[Rating], str | None]:
        def key(r: Rating) -> str | None:
            conv = conversations.get(conversation_of.get(r.message_id, ""))
            return getattr(conv, attr) if conv is not None else None

        return key

    ratings = _cap(ratings, conv_attr("channel"), config.max_channel_share, "channel", report)
    ratings = _cap(ratings, conv_attr("tenant"), config.max_tenant_share, "tenant", report)
    corrections = []
    for c in snapshot.corrections:
        if c.message_id in kept_ids:
            corrections.append(c)
        else:
            report.removed["correction of a removed message"] += 1
    reactions = _trusted_reactions(snapshot, kept_ids, conversations, conversation_of, held, config, report)
    filtered = dataclasses.replace(
        snapshot,
        messages=tuple(messages),
        ratings=tuple(ratings),
        corrections=tuple(corrections),
        reactions=reactions,
    )
    return filtered, report


def reaction_rater(conversation_id: str, conversations: dict[str, Conversation]) -> str:
    """Who an implicit label comes from: the conversation's user, or the conversation itself for an
    anonymous one (the rater name the gateway gives an anonymous conversation's thumbs)."""
    conv = conversations.get(conversation_id)
    user = conv.user_id if conv is not None else None
    return user or f"conversation:{conversation_id}"


def _trusted_reactions(
    snapshot: FeedbackSnapshot,
    kept_ids: set[str],
    conversations: dict[str, Conversation],
    conversation_of: dict[str, str],
    held: set[str],
    config: TrustConfig,
    report: TrustReport,
) -> tuple[Reaction, ...]:
    """The implicit labels that may train (module docstring): capped per conversation, then per customer."""
    judged = {r.message_id for r in snapshot.ratings} | {c.message_id for c in snapshot.corrections}
    candidates: list[tuple[Reaction, str, str]] = []  # (reaction, conversation, rater)
    for r in sorted(snapshot.reactions, key=lambda r: (r.created_at, r.reply_id)):
        if r.value is None:
            continue
        if r.reply_id not in kept_ids or r.message_id not in kept_ids:
            report.removed["implicit label of a removed message"] += 1
        elif r.reply_id in judged:
            report.removed["implicit label where a thumb or correction decides"] += 1
        elif (rater := reaction_rater(conversation_of[r.reply_id], conversations)) in held:
            report.removed["implicit label of a rater held for review"] += 1
        else:
            candidates.append((r, conversation_of[r.reply_id], rater))
    per_conversation: Counter[str] = Counter()
    within: list[tuple[Reaction, str]] = []
    for r, conversation_id, rater in candidates:
        per_conversation[conversation_id] += 1
        if per_conversation[conversation_id] > config.implicit_max_per_conversation:
            report.removed["implicit label over the per-conversation cap"] += 1
        else:
            within.append((r, rater))
    counts = Counter(rater for _, rater in within)
    allowed = cap_counts(dict(counts), rater_share(config, len(counts), implicit=True))
    used: Counter[str] = Counter()
    kept: list[Reaction] = []
    for r, rater in within:
        used[rater] += 1
        if used[rater] > allowed[rater]:
            report.capped[f"implicit:{rater}"] = report.capped.get(f"implicit:{rater}", 0) + 1
        else:
            kept.append(r)
    return tuple(kept)


def weight_reviewed(data: TrainingData, operator_weight: int) -> TrainingData:
    """Repeat operator-reviewed rows so they outweigh anonymous ratings."""

    def repeat(rows: Iterable[object]) -> tuple[object, ...]:
        out: list[object] = []
        for row in rows:
            n = operator_weight if getattr(row, "source", "") in ("correction", "takeover") else 1
            out += [row] * n
        return tuple(out)

    return TrainingData(repeat(data.dpo), data.kto, repeat(data.sft))  # type: ignore[arg-type]
