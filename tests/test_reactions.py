"""The simulated customers' reactions (bench/reactions.py): seeded, in the deployment's language, readable."""

from __future__ import annotations

import random

from bench.rater import deployment_names, load_deployment
from bench.reactions import MIX, react
from training.implicit import ImplicitSignal, classify_reaction


def test_reactions_are_seeded_and_follow_the_documented_mix() -> None:
    dep = load_deployment("shop")
    intent = dep.intent("refund")
    draws = {
        up: [react(random.Random(f"t:{n}"), dep, intent, intent.train[0], up=up) for n in range(2000)]
        for up in (True, False)
    }
    assert draws[True][:20] == [
        react(random.Random(f"t:{n}"), dep, intent, intent.train[0], up=True) for n in range(20)
    ]
    for up, mix in MIX.items():
        for signal, share in mix:
            got = sum(r.signal is signal for r in draws[up]) / len(draws[up])
            assert abs(got - share) < 0.04, (up, signal, got)
    assert all((r.text is None) == (r.signal is ImplicitSignal.ABANDON) for r in draws[False])


def test_reactions_speak_the_deployment_language_and_never_use_held_out_questions() -> None:
    for name in deployment_names():
        dep = load_deployment(name)
        heldout = {s[-1] for i in dep.intents for s in i.heldout}
        for intent in dep.intents:
            for n in range(40):
                r = react(random.Random(f"{name}:{n}"), dep, intent, intent.train[n % 6], up=n % 2 == 0)
                if r.text is None:
                    continue
                assert not any(h in r.text for h in heldout), (name, r.text)
                has_han = any("\u4e00" <= c <= "\u9fff" for c in r.text)
                assert has_han == (dep.language == "zh"), (name, r.text)


def test_the_classifier_reads_most_simulated_reactions() -> None:
    hits = total = 0
    for name in deployment_names():
        dep = load_deployment(name)
        for intent in dep.intents:
            for k, script in enumerate(intent.train):
                for up in (True, False):
                    r = react(random.Random(f"acc:{name}:{intent.id}:{k}:{up}"), dep, intent, script, up=up)
                    got = classify_reaction(r.text, previous_user=script[-1], idle_s=None if r.text else 3600.0)
                    hits += got.signal is r.signal
                    total += 1
    assert hits / total >= 0.95, hits / total
