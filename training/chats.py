"""Everyday chat, by language: the sets learnloop ships, how settings name them, and the rule
that keeps the two apart. Pure (paths and reading a JSONL file).

Two sets per language, both ``{"prompt": [messages], "completion": "..."}`` rows:

* **generic** (``gate.generic_chat``): the gate reads it and nothing trains on it. Its perplexity
  is the guard against forgetting, and replies to its prompts are read for leaks.
* **replay** (``training.replay_chat``): the training job replays it (``training.replay_pairs``),
  so the adapter keeps talking as it did. None of its prompts may be in the generic set, or the
  gate would measure forgetting on prompts the adapter trained on.

A setting names a shipped language (``en``, ``zh``) or a JSONL file of the operator's own.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data"


@dataclass(frozen=True)
class ChatSets:
    generic: Path  # the gate's (24 exchanges)
    replay: Path  # the training job's (40 exchanges, none of them in generic)


SHIPPED: dict[str, ChatSets] = {
    "en": ChatSets(DATA / "generic_chat.jsonl", DATA / "replay_chat.jsonl"),
    "zh": ChatSets(DATA / "generic_chat_zh.jsonl", DATA / "replay_chat_zh.jsonl"),  # the same exchanges in Chinese
}


def check_name(setting: str, name: str, *, empty_ok: bool = False) -> None:
    """Refuse a setting that names neither a shipped set nor an existing file."""
    if (empty_ok and name == "") or name in SHIPPED or Path(name).is_file():
        return
    also = " (or leave it empty)" if empty_ok else ""
    raise ValueError(f"{setting} {name!r}: use {' or '.join(SHIPPED)} or the path of a JSONL file{also}")


def generic_chat_path(name: str) -> Path:
    """The file ``gate.generic_chat`` names."""
    return SHIPPED[name].generic if name in SHIPPED else Path(name)


def replay_chat_path(replay_chat: str, generic_chat: str) -> Path:
    """The file the training job replays: the one ``training.replay_chat`` names; when it is empty,
    the shipped set in the language the gate guards (``gate.generic_chat``), English when the gate
    reads a file of the operator's own."""
    if replay_chat:
        return SHIPPED[replay_chat].replay if replay_chat in SHIPPED else Path(replay_chat)
    return SHIPPED.get(generic_chat, SHIPPED["en"]).replay


def load_chat(path: Path = SHIPPED["en"].generic) -> list[dict[str, Any]]:
    """``{"prompt": [messages], "completion": str}`` rows of ordinary chat (a row without both is refused)."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for n, row in enumerate(rows, 1):
        if not (
            isinstance(row, dict) and isinstance(row.get("prompt"), list) and isinstance(row.get("completion"), str)
        ):
            raise ValueError(f'{path}, row {n}: need {{"prompt": [messages], "completion": "..."}}')
    if not rows:
        raise ValueError(f"{path}: no rows of everyday chat")
    return rows


def _question(row: dict[str, Any]) -> str:
    return " ".join(str(row["prompt"][-1].get("content", "")).split()).lower() if row["prompt"] else ""


def shared_prompts(replay: Sequence[dict[str, Any]], generic: Sequence[dict[str, Any]]) -> list[str]:
    """The replay questions the generic set also asks (case and spacing aside), in replay order."""
    asked = {_question(g) for g in generic}
    return [_question(r) for r in replay if _question(r) in asked]


__all__ = [
    "SHIPPED",
    "ChatSets",
    "check_name",
    "generic_chat_path",
    "load_chat",
    "replay_chat_path",
    "shared_prompts",
]
