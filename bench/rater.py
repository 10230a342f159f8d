"""The simulated customer's rubric and the simulated deployments it rates: deterministic, published, unit-tested. Pure.

A deployment is a folder ``bench/deployments/<name>/`` (``policy.md``, ``intents.json``,
``deployment.json``; the schema is in ``bench/deployments/README.md``). A reply to a
question of intent X earns a thumbs up when
  1. it states X's facts: every pattern of every fact of X matches (the shop's ``required``
     list is one unnamed fact; ``facts`` names several, such as a fee and a limit, and each
     one missing is its own reason),
  2. it states X's ``steps`` in order (each pattern matches after the previous one's match),
  3. it states no contradicting fact (no ``forbidden`` pattern of X matches),
  4. it does not drag in another intent's fact (every fact and step of another intent
     matching counts as a leak), and
  5. it is concise: at most ``max_words`` whitespace-separated words, or, for languages
     written without spaces (Chinese), at most ``max_chars`` characters other than spaces.
Matching is case-insensitive on the reply text; a rubric with ``"normalize": "NFKC"`` folds
full-width digits, letters and punctuation (``７天``, ``：``) to their plain forms first.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

DEPLOYMENTS = Path(__file__).parent / "deployments"

Script = tuple[str, ...]
"""One paraphrase: the customer's turns in order; the last one is the question that is rated."""


@dataclass(frozen=True)
class Fact:
    name: str
    patterns: tuple[re.Pattern[str], ...]

    def stated(self, text: str) -> bool:
        return all(p.search(text) for p in self.patterns)


@dataclass(frozen=True)
class Intent:
    id: str
    answer: str
    facts: tuple[Fact, ...]
    forbidden: tuple[re.Pattern[str], ...]
    train: tuple[Script, ...]
    heldout: tuple[Script, ...]
    steps: tuple[re.Pattern[str], ...] = ()  # a procedure: these must appear in this order
    # more held-out paraphrases, asked after ``heldout``: with them a cycle's verdict (better or
    # worse) can be beyond chance at a smaller difference; ``heldout`` alone keeps every figure
    # comparable with the runs before them
    heldout_extra: tuple[Script, ...] = ()


def _words(text: str) -> int:
    return len(text.split())


def _chars(text: str) -> int:
    """Characters other than spaces (a language written without spaces between words)."""
    return len("".join(text.split()))


@dataclass(frozen=True)
class Rubric:
    max_words: int | None = None
    max_chars: int | None = None  # for languages written without spaces between words
    nfkc: bool = False

    def prepare(self, text: str) -> str:
        return unicodedata.normalize("NFKC", text) if self.nfkc else text

    def length(self, text: str) -> int:
        """A reply's length in the unit this rubric limits: words, or characters other than spaces."""
        return _words(text) if self.max_words is not None else _chars(text)

    def length_reason(self, text: str) -> str | None:
        if self.max_words is not None and (words := _words(text)) > self.max_words:
            return f"rambling ({words} words > {self.max_words})"
        if self.max_chars is not None and (chars := _chars(text)) > self.max_chars:
            return f"rambling ({chars} characters > {self.max_chars})"
        return None


SATISFIED = "states the fact, nothing wrong, concise"
"""The reason a satisfied reply's verdict gives (the learning bench's kept replies carry it)."""


@dataclass(frozen=True)
class Verdict:
    up: bool
    reasons: tuple[str, ...]
    leaked: tuple[str, ...] = ()  # ids of other intents whose facts the reply stated


@dataclass(frozen=True)
class Deployment:
    """One simulated deployment: its intents and rubric, the model's system prompt, and the
    intents the simulated operator never corrects (they measure leaks)."""

    name: str
    title: str
    language: str  # "en" or "zh": the simulated customers' reactions are written in it
    system_prompt: str
    never_corrected: tuple[str, ...]
    intents: tuple[Intent, ...]
    rubric: Rubric
    generic: tuple[str, ...] | None  # everyday prompts for the leak check; None: the shared English set
    path: Path

    def rate(self, intent: Intent, reply: str) -> Verdict:
        return rate(intent, self.rubric.prepare(reply), list(self.intents), self.rubric)

    def leaks(self, text: str, *, own: str | None = None) -> tuple[str, ...]:
        return leaks(self.rubric.prepare(text), list(self.intents), own=own)

    def intent(self, intent_id: str) -> Intent:
        return intents_by_id(list(self.intents))[intent_id]


def deployment_names() -> list[str]:
    return sorted(p.parent.name for p in DEPLOYMENTS.glob("*/deployment.json"))


def load_deployment(name: str = "shop") -> Deployment:
    folder = DEPLOYMENTS / name
    if not (folder / "deployment.json").is_file():
        raise FileNotFoundError(f"no deployment {name!r}: choose one of {', '.join(deployment_names())}")
    meta = json.loads((folder / "deployment.json").read_text(encoding="utf-8"))
    intents, rubric = load_intents(folder / "intents.json")
    known = {i.id for i in intents}
    unknown = set(meta["never_corrected"]) - known
    if unknown:
        raise ValueError(f"{name}: never_corrected names unknown intents {sorted(unknown)}")
    generic = meta.get("generic")
    return Deployment(
        name=name,
        title=meta["title"],
        language=meta["language"],
        system_prompt=meta["system_prompt"],
        never_corrected=tuple(meta["never_corrected"]),
        intents=tuple(intents),
        rubric=rubric,
        generic=tuple(generic) if generic is not None else None,
        path=folder,
    )


def _script(raw: str | list[str]) -> Script:
    return (raw,) if isinstance(raw, str) else tuple(raw)


def _compile(patterns: list[str]) -> tuple[re.Pattern[str], ...]:
    return tuple(re.compile(p, re.I) for p in patterns)


def load_intents(path: Path) -> tuple[list[Intent], Rubric]:
    raw = json.loads(path.read_text(encoding="utf-8"))
    intents = []
    for i in raw["intents"]:
        if "facts" in i:
            facts = tuple(Fact(f["name"], _compile(f["required"])) for f in i["facts"])
        else:
            facts = (Fact("fact", _compile(i.get("required", []))),) if i.get("required") else ()
        intents.append(
            Intent(
                id=i["id"],
                answer=i["answer"],
                facts=facts,
                forbidden=_compile(i["forbidden"]),
                train=tuple(_script(s) for s in i["train"]),
                heldout=tuple(_script(s) for s in i["heldout"]),
                steps=_compile(i.get("steps", [])),
                heldout_extra=tuple(_script(s) for s in i.get("heldout_extra", [])),
            )
        )
    rubric = Rubric(max_words=raw.get("max_words"), max_chars=raw.get("max_chars"), nfkc=raw.get("normalize") == "NFKC")
    if rubric.max_words is None and rubric.max_chars is None:
        raise ValueError(f"{path}: set max_words or max_chars")
    return intents, rubric


def steps_in_order(steps: tuple[re.Pattern[str], ...], text: str) -> str | None:
    """None when every step matches after the previous one's match; else what is wrong.

    Each step takes its earliest match after the end of the previous step's match: if any
    in-order set of matches exists, this greedy walk finds one.
    """
    at = 0
    for k, step in enumerate(steps):
        match = step.search(text, at)
        if match is None:
            if step.search(text) is None:
                return f"missing step {k + 1} ({step.pattern})"
            return f"steps out of order: step {k + 1} ({step.pattern}) comes too early"
        at = match.end()
    return None


def states(intent: Intent, text: str) -> bool:
    """The text states all of the intent's facts and steps (in any order)."""
    return all(f.stated(text) for f in intent.facts) and all(s.search(text) for s in intent.steps)


def leaks(text: str, intents: list[Intent], *, own: str | None = None) -> tuple[str, ...]:
    """Other intents whose whole fact the text states."""
    return tuple(i.id for i in intents if i.id != own and states(i, text))


def rate(intent: Intent, reply: str, intents: list[Intent], rubric: Rubric) -> Verdict:
    reasons = []
    missing = [f.name for f in intent.facts if not f.stated(reply)]
    if missing and len(intent.facts) == 1:
        reasons.append("missing the fact")
    elif missing:
        reasons.extend(f"missing the fact: {name}" for name in missing)
    if intent.steps and (wrong := steps_in_order(intent.steps, reply)):
        reasons.append(wrong)
    hits = [p.pattern for p in intent.forbidden if p.search(reply)]
    if hits:
        reasons.append(f"contradicting fact ({hits[0]})")
    leaked = tuple(
        i for i in leaks(reply, intents, own=intent.id) if not states(intent, intents_by_id(intents)[i].answer)
    )
    if leaked:
        reasons.append(f"states facts of other topics: {', '.join(leaked)}")
    if too_long := rubric.length_reason(reply):
        reasons.append(too_long)
    return Verdict(not reasons, tuple(reasons) or (SATISFIED,), leaked)


def intents_by_id(intents: list[Intent]) -> dict[str, Intent]:
    return {i.id: i for i in intents}
