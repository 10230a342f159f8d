"""Does the loop learn? Simulated customer-service deployments and their satisfaction curves.

    python bench/learning.py [--deployment shop] [--cycles 3] [--seed 0] [--out bench/out]
    python bench/learning.py --all [--seeds 0,1] [--modes explicit,implicit]
    python bench/learning.py --plot-runs runs.png "epochs 1=bench/out/*/learning.json" ...

A simulated deployment (``bench/deployments/<name>/``: a policy sheet, intents with training
and held-out paraphrases, a rubric, a system prompt; see ``bench/deployments/README.md``)
runs on the real server (default model, websockets on loopback). The default is the shop,
Northwind Goods (12 intents). Each cycle:

1. simulated customers ask every training paraphrase on the live version (a paraphrase may be
   a short conversation whose last turn is the question) and rate each reply by the
   published rubric (``bench/rater.py``); with ``--thumbs-share`` below 1 only that share of
   them clicks a thumb, and with ``--reactions`` each writes a next message as a real
   customer would (``bench/reactions.py``), which the gateway reads and records against the
   reply like any customer's (``training/implicit.py``);
2. a simulated operator writes the policy answer for ``--correct-share`` of the
   thumbs-down replies, as in the console, except for the deployment's never-corrected
   intents (the shop's ``gift_card`` and ``stores``), which measure leakage; with
   ``--operator-reads-reactions`` (on with ``--reactions``) also of the replies without a thumb
   whose recorded reaction is a weak thumbs down (the console's ``customer: complaint ▼`` badge);
3. the training job the scheduler runs (``Trainer.scheduled``) trains, gates and
   promotes a version; with ``--implicit-training`` (``implicit.train``, on with
   ``--reactions``) the recorded reactions are weak KTO rows of the run (they train in a
   thumbs-only run, or in the ``--kto-steps`` stage after DPO);
4. the new live version answers every held-out paraphrase and a set of generic chat
   prompts; satisfaction is the share of thumbs up. A candidate the gate rejected answers them
   too (promoted for that alone, then rolled back), so every cycle holds what the customers
   would have said of it beside what each of the gate's judges (``gate.verdicts``) said;
   ``--judge`` picks the judge that decides (``gate.judge``).

``--starve CYCLES`` cuts the training of those cycles short: each stage stops after
``--starve-steps`` optimizer steps (``training.max_steps`` for that cycle alone), as a run whose
time budget ran out on a busy machine would. Trained from the base model (``training.init_from``
"base", the default), such a candidate is close to the base model: a version customers like less
than a trained live one, which the gate must hold back. No natural cycle on file was clearly worse
than live, so without these the judges' rejections go untested; the agreement table counts the
starved cycles apart from the others (``STARVED``).

Prints, per version: held-out and training satisfaction, leaks, generic-chat perplexity,
cycle wall time; writes a PNG plot; the last line is one JSON object. ``--all`` runs every
deployment for every seed of ``--seeds`` and every mode of ``--modes`` one after another
(``explicit``: every customer clicks a thumb; ``implicit``: ``--thumbs-share`` of them, 0.2
unless set below 1, and every one reacts, read by the operator and trained; ``sparse``: the
same thumbs and reactions, neither read nor trained: what is lost when few customers click),
then prints one table and the mean gain per mode.

Customers come one at a time (``--concurrency 1``): a greedy reply decoded beside others in one
batch can differ from the same reply decoded alone (other rounding), and which replies share a
batch depends on arrival timing; one at a time, two runs of one commit on one machine give the same
replies, corrections, rows and adapters.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import glob
import itertools
import json
import math
import operator
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.rater import SATISFIED, Deployment, deployment_names, load_deployment
from bench.sim import Answer, ask, ask_and_rate
from feedback import Reaction
from server.app import App
from server.settings import load_settings
from training.chats import load_chat
from training.config import CycleConfig, TrainConfig
from training.gate import EvalReport, GateConfig, GateJudge, verdicts
from training.reading import counted, reply_score


async def run(args: argparse.Namespace, dep: Deployment) -> dict[str, Any]:
    started = time.monotonic()
    intents = dep.intents
    uncorrected = dep.never_corrected
    rng = random.Random(args.seed)
    prompts = dep.generic if dep.generic is not None else [g["prompt"][-1]["content"] for g in load_chat()]
    generic = list(prompts)[: args.generic]
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(
            env={},
            data_dir=Path(tmp),
            overrides={
                "console": {"port": 0},
                "channels": {"port": 0},
                "server": {"port": 0, "rate_per_s": 1000.0, "ratings_per_minute": 100_000.0},
                "model": {
                    "name": args.model,
                    "max_new_tokens": args.max_new_tokens,
                    "temperature": 0.0,
                    "system_prompt": dep.system_prompt,
                    # one format at every load: which replies started on the single-stream format
                    # would depend on arrival timing, and runs must be comparable (README, Two formats)
                    "single_streams": 0,
                },
                "schedule": {"enabled": False, "min_new_feedback": 1, "heldout_fraction": 0.2},
                "training": {
                    "max_steps": args.steps,
                    "epochs": args.epochs,
                    "max_minutes": args.max_minutes,
                    "demo_epochs": args.demo_epochs,
                    "learning_rate": args.lr,
                    "sft_weight": args.sft_weight,
                    "init_from": args.init_from,
                    "kto_steps": args.kto_steps,
                    "contrast_pairs": args.contrast,
                    "contrast_pick": args.contrast_pick,
                    "replay_pairs": args.replay,
                    "replay_share": args.replay_share,
                    "guard_every": args.guard_every,
                    "transplant_pairs": args.transplants,
                    "number_pairs": args.numbers,
                },
                "canary": {"share": 0.0},
                # the forgetting guard and the leak check in the customers' language (en, zh), as
                # a deployment's operator sets it: configuration, not a tuned knob
                "gate": {"judge": args.judge, "generic_chat": dep.language},
                "implicit": {"train": args.implicit_training},
            },
        )
        app = App(settings)
        async with app.lifespan():
            assert app.port is not None and app.store is not None
            port = app.port
            sem = asyncio.Semaphore(args.concurrency)

            async def limited(coro: Any) -> Any:
                async with sem:
                    return await coro

            async def evaluate(version: str) -> dict[str, Any]:
                jobs = [
                    limited(ask_and_rate(port, q, f"eval-{version}-{i.id}-{k}", i, dep, send_rating=False))
                    for i in intents
                    for k, q in enumerate(i.heldout)
                ]
                results = await asyncio.gather(*jobs)
                pairs = [(i, " | ".join(q)) for i in intents for q in i.heldout]
                ups = sum(r.up for r in results)
                # the deployment's extra held-out paraphrases, after the 36 (whose figures stay
                # comparable with every earlier run): the verdict of a cycle reads them all
                extra = [(i, q) for i in intents for q in i.heldout_extra]
                extra_results = await asyncio.gather(
                    *(
                        limited(ask_and_rate(port, q, f"eval-{version}-{i.id}-x{k}", i, dep, send_rating=False))
                        for k, (i, q) in enumerate(extra)
                    )
                )
                # each question by "intent: turns", as the replies, right answers and samples name it
                keys = [f"{i.id}: {q}" for i, q in [*pairs, *((i, " | ".join(q)) for i, q in extra)]]
                every = [*results, *extra_results]
                generic_replies = await asyncio.gather(
                    *(limited(ask(port, (g,), f"generic-{version}-{n}")) for n, g in enumerate(generic))
                )
                uncorrected_leaks = [
                    f"{q} -> {r.reply!r} ({', '.join(found)})"
                    for (i, q), r in zip(pairs, results, strict=True)
                    if i.id in uncorrected and (found := dep.leaks(r.reply, own=i.id))
                ]
                generic_leaks = [
                    f"{g} -> {text!r} ({', '.join(found)})"
                    for g, (text, _, _) in zip(generic, generic_replies, strict=True)
                    if (found := dep.leaks(text))
                ]
                uncorrected_ups = sum(r.up for (i, _), r in zip(pairs, results, strict=True) if i.id in uncorrected)
                # what the seed promises: a trained version answers shorter and sooner where it is right
                lengths = [dep.rubric.length(r.reply) for r in results]
                right = [n for n, r in zip(lengths, results, strict=True) if r.up]
                served = {r.version for r in every}
                assert served == {version}, served
                return {
                    "heldout": ups / len(results),
                    "heldout_uncorrected": uncorrected_ups / sum(1 for i, _ in pairs if i.id in uncorrected),
                    "leaks_uncorrected": len(uncorrected_leaks),
                    "leaks_generic": len(generic_leaks),
                    "length": statistics.fmean(lengths),
                    "length_right": statistics.fmean(right) if right else None,
                    "seconds": statistics.fmean(r.seconds for r in results),
                    "leak_examples": uncorrected_leaks + generic_leaks,
                    # which held-out questions it answered right, so a cycle's verdict can be tested
                    # question by question and intent by intent (``verdict_chance``)
                    "right": [key for key, r in zip(keys, every, strict=True) if r.up],
                    "heldout_wide": sum(r.up for r in every) / len(every),
                    "samples": {key: r.reply for key, r in list(zip(keys[: len(results)], results, strict=True))[::6]},
                    # why replies failed, counted (a rubric check: are the reasons plausible?)
                    "reasons": dict(
                        Counter(reason.split(" (")[0] for r in results if not r.up for reason in r.reasons)
                    ),
                    "replies": {key: [r.reply, *r.reasons] for key, r in zip(keys, every, strict=True)},
                }

            extra_questions = sum(len(i.heldout_extra) for i in intents)

            def held(v: dict[str, Any]) -> str:
                """A version's held-out satisfaction as the lines print it."""
                wide = (
                    f" ({v['heldout_wide']:.0%} of {len(v['replies'])} with the extra ones)" if extra_questions else ""
                )
                return f"held-out satisfaction {v['heldout']:.0%}{wide}"

            by_version: dict[str, dict[str, Any]] = {"base": await evaluate("base")}
            print(f"base: {held(by_version['base'])}, {shape(dep, by_version['base'])}", flush=True)
            for cycle in range(1, args.cycles + 1):
                t0 = time.monotonic()
                live = app.release.live_version
                jobs = []
                for i in intents:
                    for k, q in enumerate(i.train):
                        key = f"{args.seed}:{cycle}:{i.id}:{k}"
                        rated = args.thumbs_share >= 1 or random.Random(f"thumbs:{key}").random() < args.thumbs_share
                        react_rng = random.Random(f"react:{key}") if args.reactions else None
                        user = f"c{cycle}-{i.id}-{k}"
                        jobs.append(
                            limited(ask_and_rate(port, q, user, i, dep, send_rating=rated, react_rng=react_rng))
                        )
                results = await asyncio.gather(*jobs)
                asked = [(i, q) for i in intents for q in i.train]
                train_sat = sum(r.up for r in results) / len(results)
                by_version[live]["train"] = train_sat
                corrected = from_reactions = 0
                # The operator finds wrong replies by their thumbs down, as in the console, and with
                # --operator-reads-reactions by the weak thumbs down the console shows on a reply
                # without a thumb (what the gateway recorded from the customer's next message).
                complained = await recorded_complaints(app, results) if args.operator_reads_reactions else set()
                for (intent, _q), answer in zip(asked, results, strict=True):
                    flagged = (answer.rated and not answer.up) or (not answer.rated and answer.message_id in complained)
                    if flagged and intent.id not in uncorrected and rng.random() < args.correct_share:
                        await app.store.conversations.add_correction(
                            message_id=answer.message_id, text=intent.answer, operator="sim-op"
                        )
                        corrected += 1
                        from_reactions += not answer.rated
                reactions = Counter(r.reaction.signal.value for r in results if r.reaction is not None)
                recorded = await recorded_reactions(app, results)
                read = Counter(x.signal for x in recorded.values())
                agree = sum(
                    x.signal == r.reaction.signal.value
                    for r in results
                    if r.reaction is not None and (x := recorded.get(r.message_id)) is not None
                )
                normal = app.trainer.cycle.config
                if cycle in args.starve:
                    app.trainer.cycle.config = starved(normal, args.starve_steps)
                try:
                    result = await app.trainer.run(force=True)
                finally:
                    app.trainer.cycle.config = normal
                train_s = time.monotonic() - t0
                print(
                    f"cycle {cycle}: {live} training satisfaction {train_sat:.0%}, {corrected} corrections"
                    f" ({from_reactions} found by a reaction); "
                    + (
                        f"{len(recorded)} reactions recorded, {agree} read as meant, "
                        f"{result.counts.get('train_implicit', 0)} implicit rows; "
                        if args.reactions
                        else ""
                    )
                    + (f"training cut short at {args.starve_steps} step(s) a stage; " if cycle in args.starve else "")
                    + f"training -> {result.status} {result.version} ({result.reason[:160]})",
                    flush=True,
                )
                version = app.release.live_version
                report = result.report or {}
                if report.get("base_generic_ppl"):
                    by_version["base"].setdefault("generic_ppl", report["base_generic_ppl"])
                if version not in by_version:
                    by_version[version] = await evaluate(version)
                    by_version[version]["generic_ppl"] = report.get("candidate", {}).get("generic_ppl")
                trained = await app.store.versions.get(result.version) if result.version else None
                trained_report = (trained.eval_report if trained else None) or {}
                judged = None
                if trained is not None and trained_report.get("candidate"):
                    judged = await judge_candidate(app, trained.name, live, trained_report, by_version, evaluate)
                    print(
                        f"cycle {cycle}: {trained.name} held-out satisfaction {judged['candidate_heldout']:.0%} "
                        f"against {live}'s {judged['live_heldout']:.0%}"
                        + (
                            f" ({judged['candidate_heldout_wide']:.0%} against {judged['live_heldout_wide']:.0%} with"
                            f" the extra questions)"
                            if extra_questions
                            else ""
                        )
                        + f"; the gate's judges said {judged['verdicts']}",
                        flush=True,
                    )
                by_version[f"cycle{cycle}"] = {
                    "version": version,
                    # --starve: the run was cut short on purpose, so its candidate should be rejected
                    "starved": cycle in args.starve,
                    "trainer": trained_report.get("trainer"),
                    "budget": trained_report.get("budget"),
                    "ratings": sum(r.rated for r in results),
                    "corrections": corrected,
                    "reactions": dict(sorted(reactions.items())),
                    # what the gateway read and stored (silence is never stored), and how often it
                    # read what the simulated customer meant
                    "reactions_recorded": dict(sorted(read.items())),
                    "reactions_read_right": agree,
                    "corrected_from_reactions": from_reactions,
                    "implicit_rows": (trained_report.get("counts") or {}).get("train_implicit", 0),
                    "status": str(result.status),
                    "judged": judged,
                    "seconds": round(time.monotonic() - t0, 1),
                    "training_seconds": round(result.seconds, 1),
                    "feedback_seconds": round(train_s - result.seconds, 1),
                }
                print(
                    f"cycle {cycle}: live {version}, {held(by_version[version])}, {shape(dep, by_version[version])},"
                    f" {time.monotonic() - t0:.0f} s",
                    flush=True,
                )
    versions = {k: v for k, v in by_version.items() if not k.startswith("cycle")}
    base = versions["base"]["heldout"]
    best = max(v["heldout"] for v in versions.values())
    ppls = {k: v.get("generic_ppl") for k, v in versions.items() if v.get("generic_ppl")}
    best_name = max(versions, key=lambda k: versions[k]["heldout"])
    summary = {
        "deployment": dep.name,
        "seed": args.seed,
        "thumbs_share": args.thumbs_share,
        "reactions": args.reactions,
        "implicit_training": args.implicit_training,
        "operator_reads_reactions": args.operator_reads_reactions,
        "judge": args.judge,
        # the knobs a recipe comparison varies, so a run's files say which recipe they measured
        "recipe": {
            "steps": args.steps,
            "epochs": args.epochs,
            "lr": args.lr,
            "sft_weight": args.sft_weight,
            "kto_steps": args.kto_steps,
            "contrast": args.contrast,
            "replay": args.replay,
            "replay_share": args.replay_share,
            "guard_every": args.guard_every,
            "numbers": args.numbers,
            "starve": sorted(args.starve),
            "starve_steps": args.starve_steps,
        },
        "base": round(base, 3),
        "by_version": {k: round(v["heldout"], 3) for k, v in versions.items()},
        # over the 36 and the deployment's extra held-out questions (the same as by_version without them)
        "wide_by_version": {k: round(v["heldout_wide"], 3) for k, v in versions.items()},
        "train_by_version": {k: round(v["train"], 3) for k, v in versions.items() if "train" in v},
        "uncorrected_by_version": {k: round(v["heldout_uncorrected"], 3) for k, v in versions.items()},
        "leaks": {
            k: {"uncorrected": v["leaks_uncorrected"], "generic": v["leaks_generic"]} for k, v in versions.items()
        },
        "generic_ppl": {k: round(v, 3) for k, v in ppls.items()},
        # per version: mean held-out reply length (the rubric's unit), the same over the satisfied
        # replies, and mean seconds from question to complete reply
        "shape_by_version": {
            k: {
                "length": round(v["length"], 1),
                "length_right": None if v["length_right"] is None else round(v["length_right"], 1),
                "seconds": round(v["seconds"], 3),
            }
            for k, v in versions.items()
        },
        "ppl_rise_best": round(ppls[best_name] / ppls["base"] - 1, 4) if best_name in ppls and "base" in ppls else None,
        "cycles": [by_version[f"cycle{c}"] for c in range(1, args.cycles + 1)],
        "best_gain_pp": round((best - base) * 100, 1),
        "best_version": best_name,
        "minutes": round((time.monotonic() - started) / 60, 1),
        "reasons": {k: v["reasons"] for k, v in versions.items()},
        "samples": {k: v["samples"] for k, v in versions.items()},
        "replies": {k: v["replies"] for k, v in versions.items()},
        "leak_examples": {k: v["leak_examples"] for k, v in versions.items() if v["leak_examples"]},
    }
    return summary


def shape(dep: Deployment, evaluated: dict[str, Any]) -> str:
    """One version's reply length and time to a complete reply, as the per-cycle lines print them."""
    unit = "words" if dep.rubric.max_words is not None else "characters"
    right = evaluated["length_right"]
    return (
        f"replies {evaluated['length']:.1f} {unit} on average"
        + (f" ({right:.1f} where right)" if right is not None else "")
        + f", {evaluated['seconds']:.2f} s to a complete reply"
    )


async def judge_candidate(
    app: App, name: str, live: str, report: dict[str, Any], by_version: dict[str, dict[str, Any]], evaluate: Any
) -> dict[str, Any]:
    """What the customers would say of a trained candidate against the live version it was judged
    against, beside what each of the gate's judges said. A rejected candidate is promoted for its
    evaluation alone and rolled back at once (its held-out conversations are stored unrated); a
    promoted one was evaluated as the new live version."""
    if name in by_version:
        candidate = by_version[name]
    else:
        await app.release.promote(name, actor="bench-judge")
        try:
            candidate = await evaluate(name)
        finally:
            await app.release.rollback(name, actor="bench-judge")
        assert app.release.live_version == live, (app.release.live_version, live)
    said = verdicts(EvalReport.from_dict(report), app.settings.gate)
    replies = dict(report.get("replies") or {})
    plain = plain_words(report)
    return {
        "candidate": name,
        "candidate_heldout": candidate["heldout"],
        "candidate_leaks": candidate["leaks_uncorrected"] + candidate["leaks_generic"],
        "live": live,
        "live_heldout": by_version[live]["heldout"],
        "candidate_right": candidate["right"],
        "live_right": by_version[live]["right"],
        # over the 36 and the deployment's extra held-out questions: the verdict the gate's judges
        # are held to (``verdict_shares``)
        "candidate_heldout_wide": candidate["heldout_wide"],
        "live_heldout_wide": by_version[live]["heldout_wide"],
        "verdicts": said,
        # the gate's pair figures as the job reported them, so that ``rejudge`` can decide the cycle
        # again under another gate configuration
        "report": gate_figures(report),
        "reward_margin": report.get("reward_margin"),
        "chosen_nll": [report["candidate"]["chosen_nll"], report["live"]["chosen_nll"]],
        "replies": {k: v for k, v in replies.items() if k != "examples"},
        "reply_examples": [e for e in replies.get("examples", []) if not e.get("kept")],
        # the held-out replies customers rated up, asked again (gate.kept_questions)
        "kept_examples": [e for e in replies.get("examples", []) if e.get("kept")],
        # what the reply judge said before it weighted words by rarity (the same replies, every word 1)
        "verdicts_plain": verdicts(EvalReport.from_dict(plain), app.settings.gate) if plain else None,
    }


def starved(cfg: CycleConfig, steps: int) -> CycleConfig:
    """``cfg`` for a run cut short (``--starve``): each stage stops after ``steps`` optimizer steps."""
    return replace(cfg, train=replace(cfg.train, max_steps=steps))


def gate_figures(report: dict[str, Any]) -> dict[str, Any]:
    """An evaluation report (``EvalReport.to_dict``) without its replies and extras: what a cycle's
    record keeps beside ``replies`` (which holds the replies' figures without their examples)."""
    return {k: v for k, v in report.items() if k not in ("replies", "extra")}


def rejudge(judged: dict[str, Any], gate: GateConfig) -> dict[str, bool] | None:
    """What each judge would decide on a recorded cycle under ``gate``: the verdicts recorded at run
    time were under the gate of that commit. None for a record from before the report was kept."""
    if not judged.get("report"):
        return None
    return verdicts(EvalReport.from_dict({**judged["report"], "replies": judged.get("replies")}), gate)


PLAIN = "replies, plain words"
"""The reply judge as it read before word weights (``training.reading.AnswerWeights``), in the agreement table."""
SCORE_ALONE = "reply score alone"
"""The reply judge's reading without its checks (no leak check, no perplexity guard): candidate's
mean reply score above live's. It tells a misreading apart from a guard's rejection."""


def plain_words(report: dict[str, Any]) -> dict[str, Any] | None:
    """``report`` with its replies scored again on plain words (every content word counts 1),
    from the replies it keeps; None when it does not keep every question's."""
    replies = report.get("replies") or {}
    shown = replies.get("examples") or []  # the corrected questions', then the ones customers rated up
    corrected = [e for e in shown if not e.get("kept")]
    if not every_reply(corrected, replies) or len(shown) - len(corrected) != replies.get("kept", 0):
        return None
    scores = [
        tuple(counted(reply_score(e[model], e["answer"]), liked=bool(e.get("kept"))) for model in ("candidate", "live"))
        for e in shown
    ]
    return {
        **report,
        "replies": {
            **replies,
            "candidate": round(statistics.fmean(c for c, _ in scores), 4),
            "live": round(statistics.fmean(v for _, v in scores), 4),
            "wins": sum(1 for c, v in scores if c > v),
            "losses": sum(1 for c, v in scores if c < v),
        },
    }


def every_reply(examples: list[dict[str, Any]], replies: dict[str, Any] | None) -> bool:
    """A report kept the replies of every question it read (``replies["n"]``); older ones kept four."""
    return bool(examples) and len(examples) == (replies or {}).get("n")


class Cycle(NamedTuple):
    """One judged cycle of a run, as the agreement table reads it."""

    deployment: str
    seed: int
    mode: str
    n: int  # the cycle's number in its run
    judged: dict[str, Any]  # ``judge_candidate``'s record
    run: dict[str, Any]  # the run's learning.json

    def label(self) -> str:
        return f"{self.deployment} seed {self.seed} ({self.mode}) cycle {self.n}"


def agreement(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """How often each gate judge agreed with the rubric over every judged cycle of ``runs``: the
    rubric says "promote" when the candidate's held-out satisfaction is above live's and "reject"
    when below; equal satisfaction (a tie) decides nothing and is counted apart. The same again
    over the cycles whose verdict is beyond chance (``verdict_chance``), question by question and
    intent by intent."""
    out: dict[str, Any] = {}
    every = [
        (Cycle(r["deployment"], r["seed"], mode_label(r), n, c["judged"], r), bool(c.get("starved")))
        for r in runs
        for n, c in enumerate(r["cycles"], 1)
        if c.get("judged")
    ]
    cycles = [x for x, cut in every if not cut]
    decided = [x for x in cycles if better(x.judged) is not None]
    tests = [(x, verdict_chance(x)) for x in decided]

    def count(name: str, said: Any, over: list[Cycle] = decided) -> dict[str, Any]:
        judged = [x for x in over if said(x.judged) is not None]
        misses = [
            f"{x.label()}: {shares_text(x)}, {name} said {'promote' if said(x.judged) else 'reject'}"
            for x in judged
            if said(x.judged) != better(x.judged)
        ]
        return {"agree": len(judged) - len(misses), "of": len(judged), "disagreements": misses}

    judges = {str(judge): (lambda j, judge=judge: j["verdicts"][judge]) for judge in GateJudge}
    for name, said in judges.items():
        out[name] = count(name, said)
    # --starve: the cycles cut short on purpose, judged apart (their verdicts are the easy ones)
    cut = [x for x, c in every if c]
    out[STARVED] = {
        "cycles": len(cut),
        "worse": sum(better(x.judged) is False for x in cut),
        "judges": {
            name: count(name, said, [x for x in cut if better(x.judged) is not None]) for name, said in judges.items()
        },
        "not_worse": [f"{x.label()}: {shares_text(x)}" for x in cut if better(x.judged) is not False],
    }
    # the reply judge before word weights, on the cycles that kept every reply (since the weights came)
    out[PLAIN] = count(PLAIN, lambda j: (j.get("verdicts_plain") or {}).get(GateJudge.REPLIES))
    out[SCORE_ALONE] = count(SCORE_ALONE, reading)
    out["ties"] = len(cycles) - len(decided)
    out[OWN_QUESTIONS] = own_questions(decided)
    out[KEPT] = [
        f"{x.label()}: {r['kept_lost']} lost, {r['kept_regained']} regained of {r['kept']}; {shares_text(x)}"
        for x in decided
        if (r := x.judged.get("replies") or {}).get("kept")
    ]
    clear = [x for x, t in tests if t.p_high < CHANCE]
    by_intent = [(x, t.intent_p) for x, t in tests if t.intent_p is not None]
    intent_clear = [x for x, p in by_intent if p < CHANCE]
    every_judge = {**judges, SCORE_ALONE: reading}
    out[BEYOND_CHANCE] = {
        "decided": len(decided),
        "clear": len(clear),
        "known": len(by_intent),  # both versions' right answers known question by question
        "judges": {name: count(name, said, clear) for name, said in every_judge.items()},
        "undetermined": [f"{x.label()}: {t.text(x)}" for x, t in tests if t.p_low < CHANCE <= t.p_high],
        "within_chance": [f"{x.label()}: {t.text(x)}" for x, t in tests if t.p_low >= CHANCE],
        "intent_clear": len(intent_clear),
        "intent_judges": {name: count(name, said, intent_clear) for name, said in every_judge.items()},
    }
    return out


def reading(judged: dict[str, Any]) -> bool | None:
    """The reply judge's reading without its checks: the candidate's mean reply score above live's."""
    replies = judged.get("replies")
    return replies["candidate"] > replies["live"] if replies else None


_deployment = functools.cache(load_deployment)  # the rubric of each deployment, read once per process

STARVED = "cycles cut short (--starve)"
"""The cycles whose training was cut short on purpose (``--starve``): how many the rubric found
worse than live, and how often each judge agreed with the rubric on them. Kept apart from the
natural cycles, whose agreement they would inflate."""

CHANCE = 0.05
"""A cycle's verdict counts as beyond chance when its two-sided p-value is below this."""
BEYOND_CHANCE = "verdicts beyond chance"
"""The agreement over the cycles whose rubric verdict (better or worse on the held-out questions)
could not come from chance alone: a difference of one or two questions of 36 says nothing."""


def verdict_shares(judged: dict[str, Any]) -> tuple[float, float]:
    """The held-out satisfaction of the candidate and of live that a cycle's verdict compares: over
    the 36 and the deployment's extra held-out questions where the cycle asked them, else the 36."""
    if "candidate_heldout_wide" in judged:
        return judged["candidate_heldout_wide"], judged["live_heldout_wide"]
    return judged["candidate_heldout"], judged["live_heldout"]


def better(judged: dict[str, Any]) -> bool | None:
    """The rubric's verdict on a cycle: the candidate satisfied more held-out questions than live
    (True), fewer (False), or as many (None, a tie that decides nothing)."""
    cand, live = verdict_shares(judged)
    return None if cand == live else cand > live


def questions_asked(x: Cycle) -> int:
    """How many held-out questions the verdict of cycle ``x`` counts: as many as the run's base
    version answered (its kept replies), else as the deployment holds them now."""
    kept = (x.run.get("replies") or {}).get("base")
    if kept:
        return len(kept)
    wide = "candidate_heldout_wide" in x.judged
    return sum(len(i.heldout) + wide * len(i.heldout_extra) for i in _deployment(x.deployment).intents)


def shares_text(x: Cycle) -> str:
    """The candidate's and live's satisfaction in cycle ``x``, with the number of questions."""
    j, n = x.judged, questions_asked(x)
    cand, live = verdict_shares(j)
    return f"{j['candidate']} {cand:.0%} vs {j['live']} {live:.0%} of {n}"


def mcnemar_p(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value of two versions answering the same questions: ``gained``
    questions the candidate answers right and live wrong, ``lost`` the reverse. Under "neither is
    better" each of the ``gained + lost`` discordant questions goes either way with chance 1/2.
    ``mcnemar_p(6, 0)`` is 0.031 and ``mcnemar_p(5, 0)`` 0.0625: a version must answer at least six
    more right than the other for its verdict to be beyond chance, and more when it also loses some
    (``tests/test_learning.py`` asserts these)."""
    n = gained + lost
    tail = sum(math.comb(n, k) for k in range(min(gained, lost) + 1)) / 2**n
    return min(1.0, 2 * tail)


def share_p_range(cand: int, live: int, questions: int) -> tuple[float, float]:
    """The smallest and the largest McNemar p-value two versions' right-answer counts allow when
    which questions each answered right is unknown: the winner gained ``|cand - live|`` more
    questions than it lost, and it lost from none to as many as the counts allow."""
    net, small, large = abs(cand - live), min(cand, live), max(cand, live)
    ps = [mcnemar_p(net + lost, lost) for lost in range(min(small, questions - large) + 1)]
    return min(ps), max(ps)


def intent_p(cand_right: set[str], live_right: set[str]) -> float:
    """Two-sided exact sign-flip p-value of the net gain summed over intents. A version learns or
    forgets an intent, not one question: the paraphrases of an intent go right or wrong together,
    so questions are not independent. Under "neither is better" each intent's net (its questions
    gained minus lost; keys are ``"intent: question"``) keeps its size and takes either sign with
    chance 1/2. Six intents all gaining are the fewest that can be beyond chance (p 0.031)."""
    nets: Counter[str] = Counter()
    for key in cand_right - live_right:
        nets[key.split(": ")[0]] += 1
    for key in live_right - cand_right:
        nets[key.split(": ")[0]] -= 1
    sizes = [abs(v) for v in nets.values() if v]
    observed = abs(sum(nets.values()))
    if not observed:
        return 1.0
    hits = sum(
        1
        for signs in itertools.product((1, -1), repeat=len(sizes))
        if abs(sum(map(operator.mul, signs, sizes))) >= observed
    )
    return hits / 2 ** len(sizes)


@dataclass(frozen=True)
class VerdictTest:
    """How far a cycle's verdict is from chance: the McNemar p-value over its questions (a range
    when which questions each version answered right is unknown) and the sign-flip p-value over its
    intents (None when unknown)."""

    p_low: float
    p_high: float
    intent_p: float | None

    def text(self, x: Cycle) -> str:
        p = f"p {self.p_low:.2f}" if self.p_low == self.p_high else f"p {self.p_low:.2f} to {self.p_high:.2f}"
        by_intent = "" if self.intent_p is None else f", by intent {self.intent_p:.2f}"
        return f"{shares_text(x)}, {p}{by_intent}"


def right_answers(x: Cycle, version: str) -> set[str] | None:
    """The held-out questions ``version`` answered right in cycle ``x``: as the cycle recorded them,
    or as the run's kept replies say (each kept with the rubric's reasons at run time: promoted
    versions only); None when neither holds them."""
    recorded = x.judged.get("candidate_right" if version == x.judged["candidate"] else "live_right")
    if recorded is not None:
        return set(recorded)
    kept = (x.run.get("replies") or {}).get(version)
    if not kept or not all(isinstance(v, list) for v in kept.values()):
        return None  # not kept, or an older file that kept the reply alone
    return {key for key, (_, *reasons) in kept.items() if reasons == [SATISFIED]}


def verdict_chance(x: Cycle) -> VerdictTest:
    """The p-values of cycle ``x``'s verdict (candidate better or worse than live on the held-out
    questions): exact when both versions' right answers are known question by question; from the
    two shares alone otherwise, as the range the unknown questions allow, with no intent test."""
    cand, live = right_answers(x, x.judged["candidate"]), right_answers(x, x.judged["live"])
    if cand is not None and live is not None:
        p = mcnemar_p(len(cand - live), len(live - cand))
        return VerdictTest(p, p, intent_p(cand, live))
    n = questions_asked(x)
    low, high = share_p_range(*(round(share * n) for share in verdict_shares(x.judged)), n)
    return VerdictTest(low, high, None)


KEPT = "kept answers asked again"
"""The held-out replies customers rated up that the gate asked both models again
(``gate.kept_questions``): per decided cycle, how many the candidate lost and regained, beside the
rubric's verdict. Cycles before the kept questions have none."""

OWN_QUESTIONS = "the rubric on the gate's own questions"
"""The bench's rubric applied to the replies the gate read (its held-out corrected questions, kept
in the report): does the reading agree with the rubric on the questions it reads, and do those
questions agree with the 36 held-out paraphrases? It tells a misreading apart from a sample too
small to tell. Since the gate also asks the questions whose reply customers liked
(``gate.kept_questions``), the reading counts those too while the rubric here reads the corrected
ones alone: the liked replies are no rubric answer to rate against."""


def rubric_on_kept(deployment: str, judged: dict[str, Any]) -> tuple[int, int, int] | None:
    """(candidate's right replies, live's, questions) by the deployment's rubric over the replies the
    gate read, or None when the report did not keep every question's replies."""
    examples = judged.get("reply_examples") or []
    if not every_reply(examples, judged.get("replies")):
        return None
    dep = _deployment(deployment)
    by_answer = {i.answer: i for i in dep.intents}
    if any(e["answer"] not in by_answer for e in examples):
        return None  # an answer the deployment does not hold (an older intents file)
    right = [
        (dep.rate(by_answer[e["answer"]], e["candidate"]).up, dep.rate(by_answer[e["answer"]], e["live"]).up)
        for e in examples
    ]
    return sum(c for c, _ in right), sum(v for _, v in right), len(examples)


def own_questions(decided: list[Cycle]) -> dict[str, Any]:
    """Over ``decided`` cycles (the rubric's held-out verdict says better or worse) whose reports kept
    every reply: how often the gate's own questions, rated by the rubric, could tell the two versions
    apart; where they could, how often the reading (reply score alone) and the held-out verdict agree
    with them. A report that kept every reply has its reading, so it is judged on every such cycle."""
    kept = [(x, r) for x in decided if (r := rubric_on_kept(x.deployment, x.judged)) is not None]
    told = [(x.judged, r) for x, r in kept if r[0] != r[1]]
    return {
        "cycles": len(kept),
        "cannot_tell": [f"{x.label()}: {r[0]} vs {r[1]} right of {r[2]}" for x, r in kept if r[0] == r[1]],
        "reading_agrees": sum(reading(j) == (r[0] > r[1]) for j, r in told),
        "reading_of": len(told),
        "heldout_agrees": sum(better(j) == (r[0] > r[1]) for j, r in told),
        "heldout_of": len(told),
    }


def agreement_table(runs: list[dict[str, Any]]) -> str:
    found = agreement(runs)
    lines = ["| judge | agrees with the rubric | disagreements |", "| --- | --- | --- |"]
    for judge in [*map(str, GateJudge), PLAIN, SCORE_ALONE]:
        a = found[judge]
        if judge in (PLAIN, SCORE_ALONE) and not a["of"]:
            continue
        share = f"{a['agree'] / a['of']:.0%}" if a["of"] else "-"
        lines.append(f"| {judge} | {a['agree']} of {a['of']} ({share}) | {'; '.join(a['disagreements']) or '-'} |")
    lines.append(f"ties (equal satisfaction, not counted): {found['ties']}")
    own = found[OWN_QUESTIONS]
    if own["cycles"]:
        lines.append(
            f"{OWN_QUESTIONS} ({own['cycles']} decided cycles that kept every reply): they tell the versions apart"
            f" on {own['heldout_of']}; there the reading agrees with them on {own['reading_agrees']} of"
            f" {own['reading_of']} and the held-out verdict on {own['heldout_agrees']} of {own['heldout_of']};"
            f" they cannot tell on {len(own['cannot_tell'])}: {'; '.join(own['cannot_tell']) or '-'}"
        )
    if found[KEPT]:
        lines.append(f"{KEPT} (gate.kept_questions): {'; '.join(found[KEPT])}")
    cut = found[STARVED]
    if cut["cycles"]:
        lines.append(
            f"{STARVED}: {cut['cycles']}, the rubric says worse than live on {cut['worse']}; there "
            + ", ".join(f"{name} agrees on {a['agree']} of {a['of']}" for name, a in cut["judges"].items())
            + f"; not worse: {'; '.join(cut['not_worse']) or '-'}"
        )
    chance = found[BEYOND_CHANCE]

    def judges(counts: dict[str, dict[str, Any]]) -> str:
        said = [
            f"{name} {a['agree']} of {a['of']}" for name, a in counts.items() if a["of"] or name in tuple(GateJudge)
        ]
        return ", ".join(said) or "no judge"

    lines.append(
        f"{BEYOND_CHANCE}, question by question (exact McNemar p < {CHANCE}; from the two shares alone where a"
        f" rejected candidate's answers were not kept): {chance['clear']} of {chance['decided']} decided cycles;"
        f" there {judges(chance['judges'])}; undetermined by the shares: {'; '.join(chance['undetermined']) or '-'};"
        f" within chance: {'; '.join(chance['within_chance']) or '-'}"
    )
    lines.append(
        f"{BEYOND_CHANCE}, intent by intent (exact sign-flip p < {CHANCE} over each intent's net, on the"
        f" {chance['known']} decided cycles whose answers are known question by question): {chance['intent_clear']};"
        f" there {judges(chance['intent_judges'])}"
    )
    return "\n".join(lines)


async def recorded_reactions(app: App, results: list[Answer]) -> dict[str, Reaction]:
    """What the gateway recorded against each reply of ``results`` (reply id -> reading)."""
    assert app.store is not None
    found: dict[str, Reaction] = {}
    for conversation_id in {r.conversation_id for r in results}:
        found |= {x.reply_id: x for x in await app.store.conversations.reactions(conversation_id)}
    return found


async def recorded_complaints(app: App, results: list[Answer]) -> set[str]:
    """The replies whose recorded reaction is a weak thumbs down (complaint, re-ask, asking for a person)."""
    return {reply_id for reply_id, x in (await recorded_reactions(app, results)).items() if x.value == -1}


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["by_version"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(names, [summary["by_version"][n] * 100 for n in names], marker="o", label="held-out paraphrases")
    train = summary["train_by_version"]
    ax.plot(
        [n for n in names if n in train],
        [train[n] * 100 for n in names if n in train],
        marker="s",
        linestyle="--",
        label="training paraphrases",
    )
    ax.plot(
        names,
        [summary["uncorrected_by_version"][n] * 100 for n in names],
        marker="^",
        linestyle=":",
        label="never-corrected intents",
    )
    ax.set_ylim(0, 100)
    ax.set_ylabel("satisfaction (% thumbs up)")
    ax.set_xlabel("model version")
    ax.set_title(f"Satisfaction by version, {summary['deployment']} (SmolLM2-135M-Instruct, 2 CPU cores)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def live_curve(summary: dict[str, Any]) -> list[float]:
    """Held-out satisfaction of the live version before the first cycle and after each one, up to
    the first cycle whose training job failed (what came after it measured no training)."""
    versions = summary["by_version"]
    curve = [versions["base"]]
    for c in summary["cycles"]:
        if c.get("status") == "failed":
            break
        curve.append(versions[c["version"]])
    return curve


def plot_runs(labelled: list[tuple[str, dict[str, Any]]], path: Path) -> None:
    """One panel per deployment: the live version's held-out satisfaction over the cycles, a line
    per run (its label, operator seed and signals), so recipes compare deployment by deployment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["deployment"] for _, r in labelled})

    # one colour per line label across every panel, and each label once in the legend
    def line(label: str, r: dict[str, Any]) -> str:
        return f"{label}, seed {r['seed']}, {mode_label(r)}"

    keys = list(dict.fromkeys(line(label, r) for label, r in labelled))
    colours = {key: f"C{i % 10}" for i, key in enumerate(keys)}
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for label, r in labelled:
            if r["deployment"] == name:
                curve = [v * 100 for v in live_curve(r)]
                ax.plot(range(len(curve)), curve, marker="o", color=colours[line(label, r)], label=line(label, r))
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("cycle")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out satisfaction of live (%)")
    legend = {text: handle for ax in axes[0] for handle, text in zip(*ax.get_legend_handles_labels(), strict=True)}
    handles, texts = [legend[k] for k in keys], keys
    fig.legend(handles, texts, loc="lower center", ncol=min(3, len(texts)), fontsize=8)
    fig.tight_layout(rect=(0, 0.08 + 0.04 * (len(texts) // 3), 1, 1))
    fig.savefig(path, dpi=110)


def labelled_runs(specs: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """``LABEL=GLOB`` arguments: every learning.json the glob matches, under that label."""
    out = []
    for spec in specs:
        label, sep, pattern = spec.partition("=")
        if not sep or not label or not pattern:
            raise ValueError(f"--plot-runs: {spec!r} is not LABEL=GLOB")
        files = sorted(glob.glob(pattern))
        if not files:
            raise ValueError(f"--plot-runs: {pattern!r} matches no file")
        out += [(label, json.loads(Path(f).read_text())) for f in files]
    return out


MODES = ("explicit", "implicit", "sparse")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deployment", default="shop", choices=deployment_names())
    parser.add_argument(
        "--all", action="store_true", help="every deployment, every seed of --seeds and mode of --modes"
    )
    parser.add_argument("--seeds", default="0,1", help="--all: the operator seeds")
    parser.add_argument(
        "--modes",
        default="explicit,implicit",
        help="--all: explicit (thumbs on every reply), implicit (thumbs on --thumbs-share, reactions read and "
        "trained), sparse (the same thumbs and reactions, neither read nor trained)",
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--cycles", type=int, default=3)
    defaults = TrainConfig()
    parser.add_argument(
        "--steps", type=int, default=defaults.max_steps, help="training.max_steps (with --epochs 0: exactly this many)"
    )
    parser.add_argument(
        "--epochs",
        type=float,
        default=defaults.epochs,
        help="training.epochs (0: --steps steps; the first runs: 0 and 60)",
    )
    parser.add_argument("--max-minutes", type=float, default=defaults.max_minutes, help="training.max_minutes")
    parser.add_argument("--demo-epochs", type=float, default=defaults.demo_epochs, help="training.demo_epochs")
    parser.add_argument("--lr", type=float, default=defaults.learning_rate, help="training.learning_rate")
    parser.add_argument("--sft-weight", type=float, default=defaults.sft_weight, help="training.sft_weight")
    parser.add_argument("--init-from", choices=["base", "live"], default=defaults.init_from, help="training.init_from")
    parser.add_argument("--kto-steps", type=int, default=defaults.kto_steps, help="training.kto_steps")
    parser.add_argument("--contrast", type=int, default=defaults.contrast_pairs, help="training.contrast_pairs")
    parser.add_argument(
        "--contrast-pick", choices=["hash", "live"], default=defaults.contrast_pick, help="training.contrast_pick"
    )
    parser.add_argument("--replay", type=int, default=defaults.replay_pairs, help="training.replay_pairs")
    parser.add_argument(
        "--replay-share", type=float, default=defaults.replay_share, help="training.replay_share (0: a fixed count)"
    )
    parser.add_argument(
        "--guard-every",
        type=int,
        default=defaults.guard_every,
        help="training.guard_every (0: no forgetting guard inside the run)",
    )
    parser.add_argument(
        "--transplants",
        action=argparse.BooleanOptionalAction,
        default=defaults.transplant_pairs,
        help="training.transplant_pairs",
    )
    parser.add_argument("--numbers", type=int, default=defaults.number_pairs, help="training.number_pairs")
    parser.add_argument(
        "--judge", choices=[str(j) for j in GateJudge], default="pairs", help="gate.judge: the evidence that decides"
    )
    parser.add_argument(
        "--starve",
        type=lambda v: {int(c) for c in v.split(",") if c},
        default=set(),
        metavar="CYCLES",
        help="cut the training of these cycles (comma-separated) short at --starve-steps steps a stage: a "
        "candidate the gate should reject",
    )
    parser.add_argument("--starve-steps", type=int, default=1, help="--starve: optimizer steps a stage")
    parser.add_argument("--correct-share", type=float, default=0.5)
    parser.add_argument("--thumbs-share", type=float, default=1.0, help="share of customers who click a thumb (seeded)")
    parser.add_argument("--reactions", action="store_true", help="every customer writes a next message (or leaves)")
    parser.add_argument(
        "--implicit-training",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="implicit.train: recorded reactions are weak KTO rows (default: on with --reactions)",
    )
    parser.add_argument(
        "--operator-reads-reactions",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the operator also corrects replies whose recorded reaction is a weak thumbs down (default: on with "
        "--reactions)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--generic", type=int, default=10)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="customers at once; above 1, which replies decode in one batch depends on arrival timing and "
        "changes some greedy replies, so two runs of one commit differ (1: the same run every time on one machine)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/out")
    parser.add_argument(
        "--agreement",
        nargs="+",
        metavar="LEARNING_JSON",
        help="print how often each gate judge agreed with the rubric over these runs' learning.json files, and stop",
    )
    parser.add_argument(
        "--plot-runs",
        nargs="+",
        metavar="ARG",
        help="PNG LABEL=GLOB ...: draw the live version's held-out satisfaction per cycle, one panel per "
        "deployment and a line per learning.json the globs match, into PNG, and stop",
    )
    args = parser.parse_args(argv)
    if args.plot_runs is not None and len(args.plot_runs) < 2:
        parser.error("--plot-runs: give the PNG, then LABEL=GLOB arguments")
    for spec in (args.plot_runs or [])[1:]:
        label, _, pattern = spec.partition("=")
        if not (label and pattern):
            parser.error(f"--plot-runs: {spec!r} is not LABEL=GLOB")
    if any(not 1 <= c <= args.cycles for c in args.starve):
        parser.error(f"--starve: cycles are 1 to --cycles ({args.cycles})")
    if args.starve_steps < 1:
        parser.error("--starve-steps: at least 1")
    if not 0 <= args.thumbs_share <= 1:
        parser.error("--thumbs-share is a share: 0 to 1")
    for name in ("implicit_training", "operator_reads_reactions"):
        if getattr(args, name) is None:
            setattr(args, name, args.reactions)
        elif getattr(args, name) and not args.reactions:
            parser.error(f"--{name.replace('_', '-')} reads the customers' reactions: add --reactions")
    if unknown := set(args.modes.split(",")) - set(MODES):
        parser.error(f"--modes: unknown {sorted(unknown)}; choose from {', '.join(MODES)}")
    return args


def write_outputs(summary: dict[str, Any], out: Path) -> dict[str, Any]:
    """Write learning.json and the plot into ``out``; print leaks and samples; return the summary
    without its samples and leak examples (the part printed as the last line)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "learning.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    try:
        plot(summary, out / "learning.png")
        print(f"plot: {out / 'learning.png'}")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
    summary = dict(summary)
    samples = summary.pop("samples")
    summary.pop("replies")
    for version, examples in summary.pop("leak_examples").items():
        for example in examples:
            print(f"  leak [{version}] {example}")
    for version, replies in samples.items():
        for question, reply in list(replies.items())[:3]:
            print(f"  [{version}] {question} -> {reply[:140]!r}")
    return summary


def mode_label(summary: dict[str, Any]) -> str:
    thumbs = f"thumbs {summary['thumbs_share']:.0%}"
    if not summary["reactions"]:
        return thumbs
    used = [
        w
        for w, on in (("read", summary.get("operator_reads_reactions")), ("trained", summary.get("implicit_training")))
        if on
    ]
    return f"{thumbs} + reactions ({' and '.join(used) if used else 'unused'})"


def table(rows: list[dict[str, Any]]) -> str:
    """The --all table: one line per run, then the mean gain per mode."""
    lines = [
        "| deployment | seed | signals | base | best | gain pp | leaks at best (never-corrected / generic) "
        "| perplexity change | minutes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        best = r["best_version"]
        leak = r["leaks"][best]
        ppl = "-" if r["ppl_rise_best"] is None else f"{r['ppl_rise_best']:+.1%}"
        lines.append(
            f"| {r['deployment']} | {r['seed']} | {mode_label(r)} | {r['base']:.1%} | {r['by_version'][best]:.1%} "
            f"({best}) | {r['best_gain_pp']:+.1f} | {leak['uncorrected']} / {leak['generic']} | {ppl} | {r['minutes']} |"
        )
    by_mode: dict[str, list[float]] = {}
    for r in rows:
        by_mode.setdefault(mode_label(r), []).append(r["best_gain_pp"])
    for mode, gains in by_mode.items():
        lines.append(f"mean gain, {mode}: {sum(gains) / len(gains):+.1f} pp over {len(gains)} runs")
    if len(by_mode) > 1:
        gains = [r["best_gain_pp"] for r in rows]
        lines.append(f"mean gain, all runs: {sum(gains) / len(gains):+.1f} pp over {len(gains)} runs")
    return "\n".join(lines)


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for name in deployment_names():
        for seed in (int(s) for s in args.seeds.split(",")):
            for mode in args.modes.split(","):
                run_args = argparse.Namespace(**vars(args))
                run_args.seed = seed
                run_args.reactions = mode != "explicit"
                run_args.implicit_training = run_args.operator_reads_reactions = mode == "implicit"
                run_args.thumbs_share = (
                    1.0 if mode == "explicit" else (args.thumbs_share if args.thumbs_share < 1 else 0.2)
                )
                print(f"=== {name}, seed {seed}, {mode}", flush=True)
                summary = asyncio.run(run(run_args, load_deployment(name)))
                rows.append(write_outputs(summary, Path(args.out) / f"{name}-seed{seed}-{mode}"))
                print(table(rows[-1:]).splitlines()[-2], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.agreement:
        runs = [json.loads(Path(p).read_text()) for p in args.agreement]
        print(agreement_table(runs))
        print(json.dumps(agreement(runs), ensure_ascii=False))
        return
    if args.plot_runs:
        png, *specs = args.plot_runs
        try:
            runs = labelled_runs(specs)
        except ValueError as e:  # a glob that matches nothing: said plainly, no traceback
            raise SystemExit(f"learning.py: error: {e}") from None
        plot_runs(runs, Path(png))
        print(f"plot: {png}")
        return
    if args.all:
        rows = run_all(args)
        print(table(rows))
        print(agreement_table(rows))
        gains = [r["best_gain_pp"] for r in rows]
        print(json.dumps({"runs": rows, "mean_gain_pp": round(sum(gains) / len(gains), 1)}, ensure_ascii=False))
        return
    summary = asyncio.run(run(args, load_deployment(args.deployment)))
    print(agreement_table([summary]))
    print(json.dumps(write_outputs(summary, Path(args.out)), ensure_ascii=False))


if __name__ == "__main__":
    main()
