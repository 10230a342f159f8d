"""Hostile input to the pure session state machine (scenario 1 of docs/reliability.md).

Hypothesis drives ``ChatSession`` with arbitrary bytes, text, JSON and plausible-but-wrong
frames, interleaved with the gateway's results (opened, finished, failed): ``receive`` never
raises, every error frame carries a code docs/protocol.md lists, and the session's invariants
hold after every step.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from server.protocol import (
    Cancel,
    ChatSession,
    Effect,
    Generate,
    Limits,
    OpenConversation,
    Phase,
    Send,
    StoreRating,
    StoreTurn,
)

DOCUMENTED = set(
    re.findall(r"^\| `([a-z_]+)` \|", (Path(__file__).parent.parent / "docs" / "protocol.md").read_text(), re.M)
)
FRAME_TYPES = {"ready", "ack", "token", "done", "error", "operator_joined", "operator_message", "operator_left"}


def check_effects(effects: list[Effect]) -> None:
    for effect in effects:
        assert isinstance(effect, Send | OpenConversation | Generate | StoreTurn | StoreRating | Cancel), effect
        if isinstance(effect, Send):
            assert effect.frame["type"] in FRAME_TYPES
            json.dumps(effect.frame)  # always serializable
            if effect.frame["type"] == "error":
                assert effect.frame["code"] in DOCUMENTED, effect.frame


def test_json_nested_thirty_thousand_deep_is_a_bad_request_not_a_crash() -> None:
    s = ChatSession(new_id=lambda: "x", limits=Limits(rate_per_s=None))
    for raw in ("[" * 30_000 + "]" * 30_000, '{"a":' * 30_000 + "1" + "}" * 30_000):
        effects = s.receive(raw, 0.0)
        assert len(effects) == 1 and isinstance(effects[0], Send)
        assert effects[0].frame["code"] == "bad_request"
    assert s.phase is Phase.AWAITING_HELLO  # and the session goes on
    assert isinstance(s.receive(json.dumps({"type": "hello"}), 0.0)[0], OpenConversation)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
ids = st.sampled_from(["id1", "id2", "id3", "id4", "nope", ""]) | st.text(max_size=5)
field_values = json_values | ids | st.integers(-2, 2)
plausible = st.fixed_dictionaries(
    {"type": st.sampled_from(["hello", "message", "regenerate", "rating", "stop", "wave", ""])},
    optional={
        "text": st.text(max_size=30) | field_values,
        "client_id": ids | field_values,
        "message_id": ids | field_values,
        "value": st.integers(-2, 2) | field_values,
        "id": ids | field_values,
        "reason": st.text(max_size=5) | field_values,
        "comment": st.text(max_size=5) | field_values,
        "token": st.text(max_size=5) | field_values,
        "conversation_id": ids | field_values,
        "user": st.text(max_size=5) | field_values,
        "site": st.text(max_size=5) | field_values,
        "user_hash": st.text(max_size=5) | field_values,
    },
).map(json.dumps)
raw_frames = plausible | st.binary(max_size=40) | st.text(max_size=40) | json_values.map(json.dumps)


class SessionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        counter = itertools.count(1)
        self.session = ChatSession(new_id=lambda: f"id{next(counter)}", limits=Limits(max_text_chars=20))
        self.now = 0.0
        self.opening = False
        self.pending: Generate | None = None

    def _apply(self, effects: list[Effect]) -> None:
        check_effects(effects)
        for effect in effects:
            if isinstance(effect, OpenConversation):
                self.opening = True
            elif isinstance(effect, Generate):
                assert self.pending is None, "a second reply started while one streams"
                self.pending = effect

    @rule(raw=raw_frames, dt=st.floats(0, 2))
    def client_frame(self, raw: str | bytes, dt: float) -> None:
        self.now += dt
        self._apply(self.session.receive(raw, self.now))

    @rule(ok=st.booleans())
    def gateway_opens(self, ok: bool) -> None:
        if not self.opening:
            return
        self.opening = False
        if ok:
            self._apply(self.session.opened("conv", [], set(), "base"))
        else:
            self._apply(self.session.open_failed(self.session_code("not_found"), "no"))

    @rule(outcome=st.sampled_from(["stop", "length", "cancelled", "failed"]))
    def reply_ends(self, outcome: str) -> None:
        if self.pending is None:
            return
        g, self.pending = self.pending, None
        if outcome == "failed":
            self._apply(self.session.failed(g.message_id, self.session_code("internal"), "generation failed"))
        else:
            self._apply(self.session.finished(g.message_id, "reply", "base", outcome))

    @staticmethod
    def session_code(code: str) -> Any:
        from feedback.exceptions import ErrorCode

        return ErrorCode(code)

    @invariant()
    def phases_agree(self) -> None:
        s = self.session
        assert (s.phase is Phase.GENERATING) == (self.pending is not None)
        assert (s.streaming_id is not None) == (s.phase is Phase.GENERATING)
        assert (s.phase is Phase.OPENING) == self.opening
        ids_in_history = [t.id for t in s.history]
        assert len(ids_in_history) == len(set(ids_in_history))


TestSessionMachine = SessionMachine.TestCase
TestSessionMachine.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
