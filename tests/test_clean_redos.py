"""The PII detectors on hostile text: every one finishes (training/clean.py).

The console redacts customers' messages in the event loop it shares with the websocket gateway,
so a pattern that backtracks without end on some input freezes the server for everyone. The
Chinese address pattern did: 30 times "市" took half a second, 36 took six, 60 never ended.
Hypothesis builds texts of up to 4,000 characters from runs of the characters the patterns
hinge on (省市区县镇, road types, 号, digits, separators, letters); each call gets a generous
2 seconds (an alarm: a hang, not a speed, fails the test; with linear patterns a call takes
milliseconds, bench-free)."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from training.clean import DEFAULT_DETECTORS, is_non_text, redact, strip_control_tokens

LIMIT_S = 2.0
MAX_CHARS = 4000

# the runs a hostile text is made of: each a character or a short string the patterns turn on
UNITS = [
    *"省市区县镇路街巷弄号號室楼栋幢自治大道京王先生女士我叫",
    "单元",
    "自治区",
    "大街",
    *"0123456789",
    *" .-:@+()#,/=_",
    "\u3000",
    *"aAzZfFxX",
    "Mr",
    "Street",
    "<|",
    "|>",
]


class Hang(Exception):
    pass


@contextmanager
def at_most(seconds: float, what: str) -> Iterator[None]:
    def ring(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"{what} ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


runs = st.lists(st.tuples(st.sampled_from(UNITS), st.integers(1, MAX_CHARS)), min_size=1, max_size=8)
hostile = runs.map(lambda rs: "".join(unit * n for unit, n in rs)[:MAX_CHARS])

CHECKS: list[tuple[str, Callable[[str], object]]] = [
    *((d.__name__, d) for d in DEFAULT_DETECTORS),
    ("redact", redact),
    ("is_non_text", is_non_text),
    ("strip_control_tokens", strip_control_tokens),
]


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@example("市" * 60)
@example("市" * MAX_CHARS)
@example("北京市" * 1333)
@example("市" * 3990 + "路1号")
@example("省市区县" * 1000)
@example("a" * MAX_CHARS)
@example("1 " * 2000)
@example("王先生" * 1333)
@given(hostile)
def test_every_detector_finishes_on_hostile_text(text: str) -> None:
    for name, check in CHECKS:
        with at_most(LIMIT_S, f"{name} on {text[:20]!r}... ({len(text)} chars)"):
            check(text)
