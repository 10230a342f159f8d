"""The simulated customer's rubric: deterministic, published, unit-tested. Pure.

A reply to a question of intent X earns a thumbs up when
  1. it states X's fact (every ``required`` pattern of X matches),
  2. it states no contradicting fact (no ``forbidden`` pattern of X matches),
  3. it does not drag in another intent's fact (all ``required`` patterns of another intent
     matching counts as a leak), and
  4. it is concise (at most ``max_words`` words).
Matching is case-insensitive on the reply text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

SHOP = Path(__file__).parent / "shop" / "intents.json"


@dataclass(frozen=True)
class Intent:
    id: str
    answer: str
    required: tuple[re.Pattern[str], ...]
    forbidden: tuple[re.Pattern[str], ...]
    train: tuple[str, ...]
    heldout: tuple[str, ...]


@dataclass(frozen=True)
class Verdict:
    up: bool
    reasons: tuple[str, ...]
    leaked: tuple[str, ...] = ()  # ids of other intents whose facts the reply stated


def load_intents(path: Path = SHOP) -> tuple[list[Intent], int]:
    raw = json.loads(path.read_text())
    intents = [
        Intent(
            id=i["id"],
            answer=i["answer"],
            required=tuple(re.compile(p, re.I) for p in i["required"]),
            forbidden=tuple(re.compile(p, re.I) for p in i["forbidden"]),
            train=tuple(i["train"]),
            heldout=tuple(i["heldout"]),
        )
        for i in raw["intents"]
    ]
    return intents, int(raw["max_words"])


def states(intent: Intent, text: str) -> bool:
    return all(p.search(text) for p in intent.required)


def leaks(text: str, intents: list[Intent], *, own: str | None = None) -> tuple[str, ...]:
    """Other intents whose whole fact the text states."""
    return tuple(i.id for i in intents if i.id != own and states(i, text))


def rate(intent: Intent, reply: str, intents: list[Intent], max_words: int) -> Verdict:
    reasons = []
    if not states(intent, reply):
        reasons.append("missing the fact")
    hits = [p.pattern for p in intent.forbidden if p.search(reply)]
    if hits:
        reasons.append(f"contradicting fact ({hits[0]})")
    leaked = tuple(
        i for i in leaks(reply, intents, own=intent.id) if not states(intent, intents_by_id(intents)[i].answer)
    )
    if leaked:
        reasons.append(f"states facts of other topics: {', '.join(leaked)}")
    words = len(reply.split())
    if words > max_words:
        reasons.append(f"rambling ({words} words > {max_words})")
    return Verdict(not reasons, tuple(reasons) or ("states the fact, nothing wrong, concise",), leaked)


def intents_by_id(intents: list[Intent]) -> dict[str, Intent]:
    return {i.id: i for i in intents}
