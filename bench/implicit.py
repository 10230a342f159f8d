"""How well does the implicit-feedback classifier (``training/implicit.py``) read customers?

    python bench/implicit.py [--per-script 4] [--seed 0]

Three measurements, printed as accuracy (and per signal):
1. simulated: the next messages the simulated customers of ``bench/learning.py --reactions``
   write (``bench/reactions.py``), for every training paraphrase of every deployment, after a
   right and after a wrong reply, ``--per-script`` times each; the signal the simulation drew
   is the truth. Silence is given an idle time past the abandon threshold.
2. hand-labelled: ``bench/implicit_cases.jsonl``, the unit tests' examples (the rules were
   written against these, so this is a training-set figure);
3. held out: ``bench/implicit_holdout.jsonl``, written before the classifier was first run and
   never tuned on.
For the simulation it also prints how often a signal's label (+1/-1) agrees with the rubric.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.rater import deployment_names, load_deployment
from bench.reactions import react
from training.implicit import ImplicitConfig, ImplicitSignal, classify_reaction, implicit_label

HERE = Path(__file__).parent
IDLE_S = ImplicitConfig().abandon_after_s * 2


def load_cases(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def simulated(per_script: int, seed: int) -> list[tuple[str, ImplicitSignal, ImplicitSignal, bool]]:
    """(language, truth, predicted, rubric verdict) for every simulated reaction."""
    rows = []
    for name in deployment_names():
        dep = load_deployment(name)
        for intent in dep.intents:
            for k, script in enumerate(intent.train):
                for up in (True, False):
                    for n in range(per_script):
                        rng = random.Random(f"{seed}:{name}:{intent.id}:{k}:{up}:{n}")
                        reaction = react(rng, dep, intent, script, up=up)
                        got = classify_reaction(
                            reaction.text, previous_user=script[-1], idle_s=IDLE_S if reaction.text is None else None
                        )
                        rows.append((dep.language, reaction.signal, got.signal, up))
    return rows


def report(title: str, rows: list[tuple[str, ImplicitSignal, ImplicitSignal]]) -> dict[str, object]:
    by_lang: dict[str, list[bool]] = defaultdict(list)
    by_signal: dict[ImplicitSignal, list[bool]] = defaultdict(list)
    confusion: Counter[tuple[ImplicitSignal, ImplicitSignal]] = Counter()
    for lang, truth, got in rows:
        by_lang[lang].append(truth is got)
        by_signal[truth].append(truth is got)
        if truth is not got:
            confusion[(truth, got)] += 1
    total = sum(truth is got for _, truth, got in rows) / len(rows)
    langs = ", ".join(f"{lang} {sum(v) / len(v):.1%} of {len(v)}" for lang, v in sorted(by_lang.items()))
    print(f"{title}: {total:.1%} of {len(rows)} ({langs})")
    for signal in ImplicitSignal:
        if v := by_signal.get(signal, []):
            print(f"    {signal.value:10} {sum(v) / len(v):6.1%} of {len(v)}")
    if confusion:
        worst = ", ".join(f"{t.value}->{g.value} {n}" for (t, g), n in confusion.most_common(4))
        print(f"    most confused: {worst}")
    return {
        "accuracy": round(total, 3),
        "n": len(rows),
        "by_language": {lang: round(sum(v) / len(v), 3) for lang, v in by_lang.items()},
        "by_signal": {s.value: round(sum(v) / len(v), 3) for s, v in by_signal.items()},
    }


def hand(path: Path) -> list[tuple[str, ImplicitSignal, ImplicitSignal]]:
    rows = []
    for case in load_cases(path):
        got = classify_reaction(case["text"], previous_user=case.get("previous"))
        rows.append((case["lang"], ImplicitSignal(case["signal"]), got.signal))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-script", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sim = simulated(args.per_script, args.seed)
    summary = {"simulated": report("simulated reactions", [(lang, t, g) for lang, t, g, _ in sim])}
    agree = [(implicit_label(g)[0] == (1 if up else -1)) for _, _, g, up in sim if implicit_label(g)[0] is not None]
    labelled = sum(implicit_label(g)[0] is not None for _, _, g, _ in sim)
    print(
        f"    labels: {labelled / len(sim):.1%} of simulated replies get a +1/-1 label; "
        f"it agrees with the rubric on {sum(agree) / max(len(agree), 1):.1%} of them"
    )
    summary["simulated"]["labelled_share"] = round(labelled / len(sim), 3)
    summary["simulated"]["label_agrees_with_rubric"] = round(sum(agree) / max(len(agree), 1), 3)
    summary["hand_labelled"] = report("hand-labelled (unit-test set)", hand(HERE / "implicit_cases.jsonl"))
    summary["held_out"] = report("held-out hand-labelled", hand(HERE / "implicit_holdout.jsonl"))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
