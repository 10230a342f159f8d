"""The gate's judges over every learning run on file, as run and under today's chosen-NLL check.

Until the fifteenth session the gate allowed no rise in the held-out corrections' NLL; today's
default allows 1 nat per token above live's (``gate.max_chosen_nll_rise``). A cycle recorded
with the gate's figures (``judged.report``, since the fifteenth session) is decided again exactly
(``bench.learning.rejudge`` under today's default gate). The runs before recorded each judge's
verdict, not every check's figures, so such a cycle is decided from what the record holds: the
pairs judge rejected it and the candidate's chosen NLL rose over live's, so the old check failed
it; it flips to promote when the rise is within today's limit, unless another check is known to
have failed (``OTHER_FAILURES``: the run logs and ``bench/RESULTS.md`` give each rejection's
reasons). Prints the flipped cycles and the agreement
with the rubric, over every decided cycle and over those beyond chance (``bench/RESULTS.md``, "The
chosen-NLL check").

    python bench/chosen_nll.py [bench/runs/*/*/learning.json]
"""

from __future__ import annotations

import copy
import glob
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.learning import BEYOND_CHANCE, agreement, better, rejudge, verdict_shares
from training.gate import GateConfig, chosen_nll_ceiling

OTHER_FAILURES = {("bench/runs/replay-share-0.15/airline-seed0-explicit/learning.json", 3)}
"""(run file, cycle) whose rejection also failed another pair check (reward accuracy 0.492)."""


def without_nll_check(files: list[str], runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """``runs`` with the pairs verdict of each cycle the old chosen-NLL check (no rise) alone failed
    turned to promote where today's default gate passes it."""
    gate = GateConfig()
    out = copy.deepcopy(runs)
    flipped = []
    for name, run in zip(files, out, strict=True):
        for n, cycle in enumerate(run["cycles"], 1):
            judged = cycle.get("judged")
            if not judged or not judged.get("chosen_nll") or (name, n) in OTHER_FAILURES:
                continue
            cand, live = judged["chosen_nll"]
            now = rejudge(judged, gate)
            ceiling = chosen_nll_ceiling(live, gate)
            promote = now["pairs"] if now is not None else live < cand and (ceiling is None or cand <= ceiling)
            if judged["verdicts"]["pairs"] is False and promote:
                judged["verdicts"]["pairs"] = True
                shares = " vs ".join(f"{s:.1%}" for s in verdict_shares(judged))
                flipped.append(
                    f"{name} cycle {n}: chosen NLL {cand:.3f} vs {live:.3f}; held-out {shares}, "
                    f"the rubric says {'better' if better(judged) else 'worse'}"
                )
    return out, flipped


def main(argv: list[str]) -> None:
    files = argv or sorted(glob.glob("bench/runs/*/*/learning.json"))
    runs = [json.loads(Path(f).read_text()) for f in files]
    changed, flipped = without_nll_check(files, runs)
    print("\n".join(flipped))
    for label, rs in (("as run", runs), ("under today's chosen-NLL check", changed)):
        found = agreement(rs)
        clear = found[BEYOND_CHANCE]["judges"]["pairs"]
        print(
            f"{label}: pairs agrees on {found['pairs']['agree']} of {found['pairs']['of']} decided cycles, "
            f"{clear['agree']} of {clear['of']} beyond chance; misses there: {clear['disagreements'] or '-'}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
