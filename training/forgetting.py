"""The forgetting guard inside a training run (``training.guard_every``).

The gate rejects a candidate whose perplexity on everyday chat (``gate.generic_chat``) rose more
than ``gate.max_generic_ppl_increase`` over the base model's. As the feedback grows, a run takes
more steps and drifts further: its early steps may have learned the deployment's answers while
still talking as the base model did, and its last ones forgot how to talk, so the whole run was
thrown away. With the guard on, the job measures that same perplexity every ``guard_every``
steps (every stage together). The first time it passes the gate's limit the run stops, and the
adapter goes back to the last weights that passed (the starting weights if none did). A run that
never passes the limit is untouched: measuring runs no dropout and draws no random number.

The gate still judges the result as it judges any candidate; the guard only keeps the run from
ending on the wrong side of a limit the gate would have applied anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import TrainerCallback


def ppl_limit(base_ppl: float, increase: float) -> float:
    """The highest perplexity the gate lets a candidate have (``gate.max_generic_ppl_increase``)."""
    return base_ppl * (1.0 + increase)


class ForgettingGuard(TrainerCallback):
    """A callback for every stage's trainer of one run (see the module's docstring).

    ``measure(model)`` is the active adapter's perplexity on the generic chat; the guard measures
    the base model with the adapter disabled once, when the first stage begins.
    """

    def __init__(self, every: int, increase: float, measure: Callable[[Any], float]) -> None:
        if every < 1:
            raise ValueError("ForgettingGuard needs every >= 1 (training.guard_every 0 builds no guard)")
        self.every = every
        self.increase = increase
        self.measure = measure
        self.base_ppl: float | None = None
        self.steps = 0  # optimizer steps, every stage together
        self.checks: list[tuple[int, float]] = []
        self.kept: dict[str, torch.Tensor] | None = None
        self.kept_step = 0
        self.crossed_at: int | None = None

    @property
    def limit(self) -> float:
        assert self.base_ppl is not None, "the guard measures the base model when the first stage begins"
        return ppl_limit(self.base_ppl, self.increase)

    @property
    def crossed(self) -> bool:
        return self.crossed_at is not None

    def _measure(self, model: Any) -> float:
        training = model.training
        model.eval()
        try:
            return float(self.measure(model))
        finally:
            model.train(training)

    def _keep(self, model: Any) -> None:
        self.kept = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
        self.kept_step = self.steps

    def _check(self, model: Any) -> bool:
        ppl = self._measure(model)
        self.checks.append((self.steps, round(ppl, 4)))
        if ppl <= self.limit:
            self._keep(model)
            return True
        self.crossed_at = self.steps
        return False

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        if self.base_ppl is None:  # the run's first stage: the base model's figure and the starting weights
            with model.disable_adapter():
                self.base_ppl = self._measure(model)
            self._keep(model)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self.steps += 1
        if self.crossed or self.steps % self.every:
            return
        if not self._check(model):
            control.should_training_stop = True

    def finish(self, model: Any) -> None:
        """After the last stage: check the steps since the last check, and put the last weights
        that passed back if the run crossed the limit."""
        if self.base_ppl is None:  # no stage trained
            return
        if not self.crossed and self.steps != self.kept_step:
            self._check(model)
        if self.crossed:
            assert self.kept is not None
            set_peft_model_state_dict(model, self.kept)

    def report(self) -> dict[str, Any]:
        """What the guard saw, for the version's budget report."""
        return {
            "every": self.every,
            "base_ppl": None if self.base_ppl is None else round(self.base_ppl, 4),
            "limit": None if self.base_ppl is None else round(self.limit, 4),
            "checks": [list(c) for c in self.checks],
            "stopped_at_step": self.crossed_at,
            "kept_step": self.kept_step if self.crossed else None,
        }


__all__ = ["ForgettingGuard", "ppl_limit"]
