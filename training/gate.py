"""The offline gate: an evaluation report in, promote or reject with reasons out. Pure.

The evaluation (``training.evaluate``) scores the candidate and the live version on the
same held-out preference pairs. Terms, per held-out pair (prompt x, chosen c, rejected r):

* ``reward_margin``: DPO's implicit reward margin of the candidate with the live version as
  reference, ``beta * ((log p_cand(c) - log p_live(c)) - (log p_cand(r) - log p_live(r)))``,
  averaged over pairs; ``reward_accuracy`` is the share of pairs where it is positive.
* ``preference_accuracy`` (per model): share of pairs where the model gives the chosen
  answer a higher mean per-token log-probability than the rejected one.
* ``generic_ppl`` (per model): perplexity of fixed answers to generic chat prompts
  (``gate.generic_chat``: ``training/data/generic_chat.jsonl`` in English, ``generic_chat_zh.jsonl``
  in Chinese, or the deployment's own): an adapter that forgets how to talk fails here. The
  limit is relative to the base model (``base_generic_ppl``), which defines how the
  deployment talks: a live version that happens to sit below base does not tighten it for the
  next candidate.
* ``chosen_nll`` (per model): mean per-token negative log-likelihood of the chosen answers of
  held-out operator corrections (of all held-out chosen answers when there are none). Checked
  loosely by default: at most ``gate.max_chosen_nll_rise`` (1.0) nats per token above live's, that
  is, the candidate gives the operators' words on average at least e^-1 of live's per-token
  likelihood (a difference of mean NLLs is a per-token log-likelihood ratio). A fresh adapter
  trained on more rows often finds the operators' exact words somewhat less likely than live does
  while it answers more held-out questions right: on the learning bench allowing no rise (the
  default until the fifteenth session) rejected a candidate customers liked more in 10 of the 12
  cycles where it failed one, and no natural cycle on file rose more than 0.78. A candidate that
  never learned the operators' answers (a run cut short: ``bench/learning.py --starve``) rose 2.1
  and 3.4 (``bench/RESULTS.md``). ``gate.max_chosen_nll_increase`` adds a relative limit.
* ``replies`` (``ReplyReport``): each model *answers* the held-out corrected questions (greedy);
  each reply is scored against the operator's answer (``training.reading.reply_score``: its words
  and figures, minus figures the operator did not give), and each model's replies to the generic
  chat prompts are read for operator facts that do not belong there (leaks). Both models also
  answer again held-out questions whose reply customers rated up (*kept* questions), each reply
  scored against the liked one, and these scores count in each model's mean beside the
  corrected ones' (up to ``training.reading.READS_RIGHT``: ``training.reading.counted``). The
  corrected questions are all ones live got wrong, so without these the replies cannot show a
  regression. The report also counts the kept answers the candidate *lost* (live's reply still
  reads as the liked one and the candidate's no longer does) and *regained*.

``gate.judge`` says which evidence decides: ``pairs`` (the likelihood checks above), ``replies``
(the candidate's replies must score above live's over the corrected and the kept questions,
with no more leaks), or ``both``. The generic
perplexity check applies to every judge. Whatever the judge, the report holds both kinds of
figures, and ``verdicts`` gives what each judge would decide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum
from typing import Any

from training.chats import check_name


class GateJudge(StrEnum):
    PAIRS = "pairs"  # likelihoods of the held-out pairs' fixed texts
    REPLIES = "replies"  # what each model says to the held-out corrected questions
    BOTH = "both"


def _known(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    """``d`` without the keys ``cls`` has no field for. A report is written by the training job and
    read by the server, and the two may run different code: the job starts a fresh interpreter on
    the code on disk, so a job started after an upgrade writes the newer report to a server still
    running the older one. Figures it does not know it cannot judge on, and must not fail on; a
    missing figure still fails."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass(frozen=True)
class ModelScores:
    preference_accuracy: float
    chosen_nll: float
    generic_ppl: float | None = None  # perplexity on the generic chat set shipped in training/data


@dataclass(frozen=True)
class ReplyReport:
    """The replies each model generated to the held-out corrected questions, as read against the
    operators' answers, and to the held-out questions whose reply customers rated up, as read
    against the liked replies; and its replies to the generic chat prompts, read for leaks."""

    n: int  # corrected questions answered (distinct held-out prompts with an operator's answer)
    candidate: float  # mean reply score (training.reading.reply_score), -0.5 to 1, over n + kept questions
    live: float
    wins: int  # questions (of n + kept) where the candidate's reply scored higher than live's
    losses: int
    candidate_leaks: int = 0  # generic replies stating an operator's fact the prompt does not hold
    live_leaks: int = 0
    examples: tuple[dict[str, Any], ...] = ()  # a few questions with both replies and their scores
    # each leak counted above: {"model": "candidate" or "live", "prompt", "reply", "facts"}
    leaked: tuple[dict[str, Any], ...] = ()
    kept: int = 0  # held-out questions whose reply customers rated up, asked again
    kept_lost: int = 0  # of those: live's reply reads as the liked one, the candidate's does not
    kept_regained: int = 0  # the other way round

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReplyReport:
        d = _known(cls, d)
        return cls(**{**d, "examples": tuple(d.get("examples") or ()), "leaked": tuple(d.get("leaked") or ())})

    @staticmethod
    def label_leaks(candidate: Sequence[dict[str, Any]], live: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
        """Each model's leaks (``training.reading.leaks``) as ``leaked`` holds them, named by model."""
        return tuple(
            {"model": model, **leak} for model, found in (("candidate", candidate), ("live", live)) for leak in found
        )

    def new_leaks(self) -> list[dict[str, Any]]:
        """The candidate's leaks on generic prompts where live's reply leaked nothing: what a failed
        leak check is about."""
        live = {leak["prompt"] for leak in self.leaked if leak["model"] == "live"}
        return [leak for leak in self.leaked if leak["model"] == "candidate" and leak["prompt"] not in live]


@dataclass(frozen=True)
class EvalReport:
    n_heldout: int
    candidate: ModelScores
    live: ModelScores
    reward_margin: float
    reward_accuracy: float
    extra: dict[str, Any] = field(default_factory=dict)
    base_generic_ppl: float | None = None  # the base model's; None: judge against live's
    replies: ReplyReport | None = None  # None: the replies were not read (a report of an older version)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalReport:
        return cls(
            n_heldout=int(d["n_heldout"]),
            candidate=ModelScores(**_known(ModelScores, d["candidate"])),
            live=ModelScores(**_known(ModelScores, d["live"])),
            reward_margin=float(d["reward_margin"]),
            reward_accuracy=float(d["reward_accuracy"]),
            extra=dict(d.get("extra") or {}),
            base_generic_ppl=d.get("base_generic_ppl"),
            replies=ReplyReport.from_dict(d["replies"]) if d.get("replies") else None,
        )


@dataclass(frozen=True)
class GateConfig:
    """Thresholds of the offline gate. Every check must pass for a promotion."""

    min_heldout_pairs: int = field(default=1, metadata={"help": "Fewest held-out pairs to judge a candidate on."})
    min_reward_accuracy: float = field(
        default=0.5, metadata={"help": "Share of held-out pairs whose implicit reward margin must be positive."}
    )
    min_reward_margin: float = field(default=0.0, metadata={"help": "Mean implicit reward margin must exceed this."})
    max_accuracy_drop: float = field(
        default=0.0, metadata={"help": "How far the candidate's preference accuracy may fall below live's."}
    )
    max_chosen_nll_rise: float | None = field(
        default=1.0,
        metadata={
            "help": "Rise allowed in the held-out corrections' mean per-token NLL over live's, in nats (1.0: the "
            "candidate gives the operators' words at least e^-1 of live's per-token likelihood); unset: not checked. "
            "Loose on purpose: on the learning bench allowing no rise failed a candidate customers liked more in 10 "
            "of the 12 cycles where it failed one (a fresh adapter on more rows reads the operators' exact words as "
            "somewhat less likely while answering more questions right); no natural cycle on file rose more than "
            "0.78, and candidates whose run was cut short rose 2.1 and 3.4."
        },
    )
    max_chosen_nll_increase: float | None = field(
        default=None,
        metadata={
            "help": "Relative rise allowed in the held-out corrections' NLL over live's (0.05 = 5%); unset: no "
            "relative limit (gate.max_chosen_nll_rise still applies). It was 0.0 until the fifteenth session."
        },
    )
    max_generic_ppl_increase: float = field(
        default=0.10,
        metadata={
            "help": "Relative rise allowed in perplexity on the generic chat set over the base model's (0.10 = 10%)."
        },
    )

    judge: str = field(
        default=GateJudge.PAIRS.value,
        metadata={
            "help": "Which evidence decides: 'pairs' (likelihoods of the held-out pairs), 'replies' (the candidate's "
            "answers to the held-out corrected questions must score above live's, with no more leaks on generic "
            "chat), or 'both'. The generic perplexity check applies to all three."
        },
    )
    reply_questions: int = field(
        default=16,
        metadata={
            "help": "Held-out corrected questions each model answers for the reply check (greedy); 0 reads no "
            "replies. Each costs two generations in the training job (candidate and live)."
        },
    )
    kept_questions: int = field(
        default=16,
        metadata={
            "help": "Held-out questions whose reply customers rated up that each model answers again (greedy), "
            "each reply scored against the liked one and counted in the mean reply scores: how the reply check "
            "sees a regression, since the corrected questions are all ones live got wrong. 0 asks none."
        },
    )
    reply_tokens: int = field(default=48, metadata={"help": "Tokens each reply of the reply check may have."})
    min_reply_gain: float = field(
        default=0.0,
        metadata={
            "help": "With judge 'replies' or 'both': the candidate's mean reply score must exceed live's by more."
        },
    )

    generic_chat: str = field(
        default="en",
        metadata={
            "help": "The everyday chat the forgetting guard (perplexity) and the leak check (generic replies) read: "
            "'en' (24 English exchanges, shipped), 'zh' (the same 24 in Chinese, shipped), or a JSONL file of "
            '{"prompt": [messages], "completion": "..."} rows in your customers\' language.'
        },
    )

    def __post_init__(self) -> None:
        check_name("gate.generic_chat", self.generic_chat)
        if self.judge not in tuple(GateJudge):
            raise ValueError(f"gate.judge {self.judge!r}: use one of {', '.join(GateJudge)}")
        if self.reply_questions < 0 or self.kept_questions < 0 or self.reply_tokens < 1:
            raise ValueError(
                "gate.reply_questions and gate.kept_questions must be 0 or more and gate.reply_tokens at least 1"
            )
        if self.max_chosen_nll_increase is not None and self.max_chosen_nll_increase < 0:
            raise ValueError("gate.max_chosen_nll_increase is a relative rise: 0 or more, or unset (not checked)")
        if self.max_chosen_nll_rise is not None and self.max_chosen_nll_rise < 0:
            raise ValueError("gate.max_chosen_nll_rise is a rise in nats per token: 0 or more, or unset (not checked)")
        if self.min_heldout_pairs < 1:
            raise ValueError("gate.min_heldout_pairs must be at least 1: a gate with no evidence is no gate")
        if not 0.0 <= self.min_reward_accuracy <= 1.0:
            raise ValueError("gate.min_reward_accuracy is a share: set it between 0 and 1")


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reasons: tuple[str, ...]


def chosen_nll_ceiling(live_nll: float, config: GateConfig) -> float | None:
    """The highest chosen NLL a candidate may have against live's ``live_nll``: the tighter of
    ``gate.max_chosen_nll_rise`` (nats per token above) and ``gate.max_chosen_nll_increase``
    (relative); None when neither is set (not checked)."""
    ceilings = []
    if config.max_chosen_nll_rise is not None:
        ceilings.append(live_nll + config.max_chosen_nll_rise)
    if config.max_chosen_nll_increase is not None:
        ceilings.append(live_nll * (1.0 + config.max_chosen_nll_increase))
    return min(ceilings, default=None)


def _pair_checks(report: EvalReport, config: GateConfig) -> list[tuple[bool, str]]:
    checks: list[tuple[bool, str]] = []
    checks.append(
        (
            report.reward_accuracy >= config.min_reward_accuracy and report.reward_accuracy > 0,
            f"reward accuracy {report.reward_accuracy:.3f} (need >= {config.min_reward_accuracy:.3f})",
        )
    )
    checks.append(
        (
            report.reward_margin > config.min_reward_margin,
            f"reward margin {report.reward_margin:.4f} (need > {config.min_reward_margin:.4f})",
        )
    )
    floor = report.live.preference_accuracy - config.max_accuracy_drop
    checks.append(
        (
            report.candidate.preference_accuracy >= floor,
            f"preference accuracy {report.candidate.preference_accuracy:.3f} vs live "
            f"{report.live.preference_accuracy:.3f} (need >= {floor:.3f})",
        )
    )
    ceiling = chosen_nll_ceiling(report.live.chosen_nll, config)
    if ceiling is not None:
        checks.append(
            (
                report.candidate.chosen_nll <= ceiling,
                f"chosen NLL {report.candidate.chosen_nll:.4f} vs live {report.live.chosen_nll:.4f} "
                f"(need <= {ceiling:.4f})",
            )
        )
    return checks


def _reply_checks(report: EvalReport, config: GateConfig) -> list[tuple[bool, str]]:
    r = report.replies
    if r is None or r.n == 0:
        return [(False, "no replies were read (no held-out question with an operator's answer)")]
    need = r.live + config.min_reply_gain
    named = "".join(f"; the candidate said {' / '.join(x['facts'])!r} to {x['prompt']!r}" for x in r.new_leaks()[:3])
    kept = (
        f" ({r.n} corrected, {r.kept} rated up: {r.kept_lost} of those lost, {r.kept_regained} regained)"
        if r.kept
        else ""
    )
    return [
        (
            r.candidate > need,
            f"reply score {r.candidate:.3f} vs live {r.live:.3f} over {r.n + r.kept} questions{kept}, "
            f"{r.wins} better and {r.losses} worse (need > {need:.3f})",
        ),
        (
            r.candidate_leaks <= r.live_leaks,
            f"generic replies stating an operator's fact: {r.candidate_leaks} vs live {r.live_leaks} "
            f"(need <= {r.live_leaks}){named if r.candidate_leaks > r.live_leaks else ''}",
        ),
    ]


def decide(report: EvalReport, config: GateConfig) -> GateDecision:
    """Promote only if every check of ``config.judge`` passes; the reasons name each check and its figures."""
    if report.n_heldout < config.min_heldout_pairs:
        return GateDecision(
            False, (f"held-out set has {report.n_heldout} pairs; the gate needs at least {config.min_heldout_pairs}",)
        )
    checks: list[tuple[bool, str]] = []
    if config.judge in (GateJudge.PAIRS, GateJudge.BOTH):
        checks += _pair_checks(report, config)
    if config.judge in (GateJudge.REPLIES, GateJudge.BOTH):
        checks += _reply_checks(report, config)
    cand_ppl = report.candidate.generic_ppl
    ref_ppl, ref_name = (
        (report.base_generic_ppl, "base") if report.base_generic_ppl is not None else (report.live.generic_ppl, "live")
    )
    if cand_ppl is not None and ref_ppl is not None:
        ceiling_ppl = ref_ppl * (1.0 + config.max_generic_ppl_increase)
        checks.append(
            (
                cand_ppl <= ceiling_ppl,
                f"generic-chat perplexity {cand_ppl:.2f} vs {ref_name} {ref_ppl:.2f} (need <= {ceiling_ppl:.2f})",
            )
        )
    failed = tuple(f"failed: {text}" for ok, text in checks if not ok)
    if failed:
        return GateDecision(False, failed)
    return GateDecision(True, tuple(f"passed: {text}" for _, text in checks))


def verdicts(report: EvalReport, config: GateConfig) -> dict[str, bool]:
    """What each judge would decide on this report, whatever ``config.judge`` is (the learning bench
    compares them with what customers would say)."""
    return {str(j): decide(report, replace(config, judge=str(j))).promote for j in GateJudge}
