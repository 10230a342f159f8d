"""Reading replies: how close a generated reply comes to an operator's answer, and whether it
drags an operator's fact where it does not belong. Pure; the gate's reply check (``training.gate``,
``gate.judge``) and the evaluation (``training.evaluate.read_replies``) use it.

The pair metrics (``training.gate``) score fixed texts; customers read what the model *says*. So
the evaluation also lets the candidate and the live version answer the held-out questions that
an operator corrected (greedy, as served), and scores each reply against the operator's answer:

* ``content``: F1 of the content words (stop words and numbers left out) of the reply against
  the answer; Chinese, written without spaces, counts each Han character as a word. Given the
  operators' answers (``AnswerWeights``), each word counts by how rare it is among them (BM25's
  inverse document frequency): "Open Settings, choose ..." opens half a helpdesk's answers and
  proves little, "Trash" or "Forgot password" names one answer. A reply that gets the common
  frame right and the step wrong then scores near 0, not a third;
* ``facts``: the share of the answer's numbers the reply states (``30`` days, ``2.1`` %); an
  answer without numbers is judged on its words alone;
* ``wrong``: the share of the reply's numbers the answer does not hold: a reply that gives
  another figure than the operator's contradicts it.

``score = content`` (no numbers in the answer) or ``(content + facts) / 2``, minus
``wrong / 2``: from -0.5 (only wrong figures) to 1 (the operator's words and figures).

A leak is a generic chat reply (a prompt about nothing the operators corrected) that states an
operator's fact: one of a correction's numbers of two or more digits (``30``, ``2.1``, ``59``),
or five of its content words in a row, that the prompt does not hold.

Examples (``tests/test_reading_replies.py`` asserts them)::

    TRASH = "Open Trash in the sidebar, right-click the note, and choose Restore."
    weights = AnswerWeights.of([TRASH, "Open Settings, choose Appearance, and select Dark.",
        "Open the note, click Share, choose Export as PDF, then pick a folder to save it in.",
        "Open Settings, choose Account, and turn on Two-step login."])
    reply_score("Open Settings, choose Organization.", TRASH)           -> 0.3333 (plain words)
    reply_score("Open Settings, choose Organization.", TRASH, weights)  -> 0.0438
    reply_score("Open Trash, then choose Restore.", TRASH, weights)     -> 0.5799

    reply_score("Refunds within 30 days of delivery.", "Refunds are accepted within 30 days of delivery.")
    -> 0.9444 (content 0.89, facts 1, wrong 0)
    reply_score("You have 14 days.", "Refunds are accepted within 30 days of delivery.")
    -> -0.3333 (content 0.33, facts 0, wrong 1)
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_NUMBER = re.compile(r"\d+(?:[.,:]\d+)*")
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)
_HAN_CHARS = "\u3400-\u9fff\uf900-\ufaff"
_HAN = re.compile(f"[{_HAN_CHARS}]")
_HAN_OR_NOT = re.compile(f"[{_HAN_CHARS}]|[^{_HAN_CHARS}]+")

# function words of the two languages the first users write in; what is left carries meaning
_STOP_WORDS = """a an the and or but if of to in on at by for with from as is are was were be been being it its
    this that these those there here i you he she we they me him her us them my your our their his
    do does did done have has had can could will would shall should may might must not no yes so
    than then too very just also only any some all each every what which who whom whose when where
    why how about into over under up down out off again please thank thanks sorry hello hi
    的 了 是 吗 呢 吧 啊 呀 我 你 您 他 她 它 们 在 和 与 或 也 都 就 这 那 个 有 会 能 可 以 对 请 谢"""
_STOP = frozenset(_STOP_WORDS.split())


def _fold(text: str) -> str:
    return unicodedata.normalize("NFKC", text).lower()


def numbers(text: str) -> list[str]:
    """The numbers a text states, thousands separators dropped (``1,000`` -> ``1000``), a decimal
    comma read as a point (``3,5`` -> ``3.5``), full-width digits folded."""
    out = []
    for m in _NUMBER.finditer(_fold(text)):
        n = m.group(0)
        if re.fullmatch(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?", n):  # 1,000 and 12,500.50: thousands
            n = n.replace(",", "")
        out.append(n.replace(",", "."))  # 3,5: a decimal comma
    return out


def content_words(text: str) -> list[str]:
    """The words that carry meaning, in order: no stop words, no numbers; a Han character is a word."""
    words: list[str] = []
    for w in _WORD.findall(_fold(text)):
        if _HAN.search(w):  # a run of Chinese: one word per character (Latin letters inside stay whole)
            words.extend(_HAN_OR_NOT.findall(w))
        else:
            words.append(w)
    return [w for w in words if w not in _STOP]


@dataclass(frozen=True)
class AnswerWeights:
    """How much each content word proves, from the operators' answers: BM25's inverse document
    frequency ``ln(1 + (n - df + 0.5) / (df + 0.5))`` over ``n`` distinct answers, ``df`` of which
    hold the word. A word of every answer weighs little, a word of one answer much, a word of none
    (the reply's own invention) most."""

    df: Mapping[str, int]
    n: int

    @classmethod
    def of(cls, answers: Iterable[str]) -> AnswerWeights:
        distinct = {a for a in answers if a.strip()}
        df: Counter[str] = Counter()
        for answer in distinct:
            df.update(set(content_words(answer)))
        return cls(df=dict(df), n=len(distinct))

    def __call__(self, word: str) -> float:
        df = self.df.get(word, 0)
        return math.log(1.0 + (self.n - df + 0.5) / (df + 0.5))


def _f1(reply: Sequence[str], answer: Sequence[str], weights: AnswerWeights | None = None) -> float:
    def mass(counts: Mapping[str, int]) -> float:
        return sum(c * (weights(w) if weights else 1.0) for w, c in counts.items())

    common = mass(Counter(reply) & Counter(answer))
    if not common:
        return 0.0
    precision, recall = common / mass(Counter(reply)), common / mass(Counter(answer))
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class ReplyScore:
    content: float  # F1 of content words against the answer
    facts: float | None  # share of the answer's numbers stated; None when the answer has none
    wrong: float  # share of the reply's numbers the answer does not hold
    score: float


def score_reply(reply: str, answer: str, weights: AnswerWeights | None = None) -> ReplyScore:
    """How close ``reply`` comes to the operator's ``answer`` (see the module's docstring); with
    ``weights``, each content word counts by how rare it is among the operators' answers."""
    content = _f1(content_words(reply), content_words(answer), weights)
    said, expected = set(numbers(reply)), set(numbers(answer))
    facts = len(said & expected) / len(expected) if expected else None
    wrong = len(said - expected) / len(said) if said else 0.0
    base = content if facts is None else (content + facts) / 2
    return ReplyScore(content=round(content, 4), facts=facts, wrong=wrong, score=round(base - wrong / 2, 4))


def reply_score(reply: str, answer: str, weights: AnswerWeights | None = None) -> float:
    return score_reply(reply, answer, weights).score


# A reply scoring this much against an answer reads as that answer: over the learning bench's kept
# replies, 73 of the 74 the rubric rated right score 0.6 or more against the operator's answer,
# and 16 of the 552 it rated wrong do (bench/RESULTS.md, "The reply judge's own questions").
READS_RIGHT = 0.6


def counted(score: float, *, liked: bool) -> float:
    """How a reply's score counts in the reply judge's mean: against an operator's answer as it is;
    against a reply customers liked up to ``READS_RIGHT``, since reading as the liked one is all it
    can show (live may have written that reply word for word; a candidate saying the same in other
    words is as good)."""
    return min(score, READS_RIGHT) if liked else score


def kept_changes(candidate: Sequence[float], live: Sequence[float]) -> tuple[int, int]:
    """(lost, regained) over questions whose reference is a reply customers rated up, each model's
    reply scored against it: lost where live's reply reads as it (``READS_RIGHT``) and the
    candidate's does not, regained the other way round."""
    pairs = list(zip(candidate, live, strict=True))
    lost = sum(1 for c, v in pairs if v >= READS_RIGHT > c)
    regained = sum(1 for c, v in pairs if c >= READS_RIGHT > v)
    return lost, regained


def _runs(words: Sequence[str]) -> set[str]:
    """Every five content words in a row."""
    return {" ".join(words[i : i + 5]) for i in range(len(words) - 4)}


def operator_facts(answers: Iterable[str]) -> frozenset[str]:
    """What counts as an operator's fact in a leak: numbers of two or more digits, and runs of
    five content words, of each answer."""
    facts: set[str] = set()
    for answer in answers:
        facts.update(n for n in numbers(answer) if len(n.replace(".", "").replace(":", "")) >= 2)
        facts.update(_runs(content_words(answer)))
    return frozenset(facts)


def leaked(reply: str, prompt: str, facts: frozenset[str]) -> tuple[str, ...]:
    """The operator facts ``reply`` states that ``prompt`` does not hold (sorted)."""

    def stated(text: str) -> set[str]:
        return (set(numbers(text)) | _runs(content_words(text))) & facts

    return tuple(sorted(stated(reply) - stated(prompt)))


def leaks(replies: Sequence[str], prompts: Sequence[str], facts: frozenset[str]) -> list[dict[str, Any]]:
    """Each of ``replies`` (to ``prompts``, in order) that states an operator's fact, with the facts:
    what the gate's leak check counts, kept so an operator can read why a candidate failed it."""
    return [
        {"prompt": prompt, "reply": reply, "facts": list(found)}
        for reply, prompt in zip(replies, prompts, strict=True)
        if (found := leaked(reply, prompt, facts))
    ]


__all__ = [
    "READS_RIGHT",
    "AnswerWeights",
    "ReplyScore",
    "content_words",
    "counted",
    "kept_changes",
    "leaked",
    "leaks",
    "numbers",
    "operator_facts",
    "reply_score",
    "score_reply",
]
