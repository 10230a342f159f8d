"""Rows to records and records to rows: the one place where column names meet field names.

Tables whose columns carry their record's field names (conversations, messages,
corrections) are written from the record itself (``insert_sql`` and ``row_values``), so
their column lists are written out once, in ``feedback.records``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from feedback.db import Row
from feedback.records import (
    Conversation,
    Correction,
    FinishReason,
    Message,
    ModelVersion,
    Rating,
    Reaction,
    Role,
    RunState,
    Takeover,
    TrainingRun,
    VersionState,
)

T = TypeVar("T")


def columns(record_type: type[Any], *, without: Iterable[str] = ()) -> tuple[str, ...]:
    """The field names of a record dataclass, which are its table's column names."""
    skip = set(without)
    return tuple(f.name for f in dataclasses.fields(record_type) if f.name not in skip)


def insert_sql(table: str, record_type: type[Any], *, without: Iterable[str] = ()) -> str:
    """``INSERT INTO table (fields...) VALUES (?, ...)`` for a record's fields (less ``without``)."""
    names = columns(record_type, without=without)
    return f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"


def row_values(record: Any, *, without: Iterable[str] = ()) -> tuple[Any, ...]:
    """The values for ``insert_sql(table, type(record), without=without)``, in its order."""
    return tuple(getattr(record, name) for name in columns(type(record), without=without))


def _record(cls: type[T], r: Row, **convert: Callable[[Any], Any]) -> T:
    """A record dataclass from a row whose columns carry the fields' names."""
    present = set(r.keys())
    values = {
        f.name: convert.get(f.name, lambda v: v)(r[f.name])
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.name in present
    }
    return cls(**values)


def message(r: Row) -> Message:
    return _record(Message, r, role=Role, finish_reason=lambda v: None if v is None else FinishReason(v))


def conversation(r: Row) -> Conversation:
    return _record(Conversation, r)


def rating(r: Row) -> Rating:
    return _record(Rating, r)


def correction(r: Row) -> Correction:
    return _record(Correction, r)


def reaction(r: Row) -> Reaction:
    return _record(Reaction, r)


def _json_or_none(v: str | None) -> Any:
    return json.loads(v) if v else None


def version(r: Row) -> ModelVersion:
    return _record(
        ModelVersion,
        r,
        state=VersionState,
        eval_report=_json_or_none,
        gate_reasons=lambda v: tuple(json.loads(v)) if v else (),
        feedback_ids=lambda v: json.loads(v) if v else {},
    )


def takeover(r: Row) -> Takeover:
    return _record(Takeover, r)


def run(r: Row) -> TrainingRun:
    return _record(TrainingRun, r, state=RunState, progress=_json_or_none)
