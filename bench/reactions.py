"""What a simulated customer writes after a reply: seeded, in the deployment's language. Pure.

With ``bench/learning.py --reactions`` every simulated customer of a training cycle writes a
next message as a real one would (or leaves), chosen from the rubric's verdict on the reply:

===================== ================================================================
the rubric says        the customer
===================== ================================================================
right (thumbs up)      thanks (GRATITUDE) 55%, leaves without a word (ABANDON) 35%,
                       moves on (NONE: "ok", or another topic's question) 10%
wrong (thumbs down)    says it is wrong (COMPLAINT) 35%, asks again (REPEAT) 25%,
                       asks for a person (HUMAN) 15%, leaves (ABANDON) 15%,
                       thanks anyway, not noticing (GRATITUDE) 10%
===================== ================================================================

A re-ask is the same question (alone, or after "I asked:" / "我问的是"), or another training
paraphrase of the same intent (after "let me rephrase" / "换个说法", or alone). Some
complaints open with thanks ("thanks but that's wrong", "谢谢，但是不对"). Held-out
paraphrases are never used, so no reaction puts a held-out question into training data.
The signal drawn is the truth label ``bench/implicit.py`` measures the classifier against.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from bench.rater import Deployment, Intent, Script
from training.implicit import ImplicitSignal

S = ImplicitSignal
MIX: dict[bool, tuple[tuple[ImplicitSignal, float], ...]] = {
    True: ((S.GRATITUDE, 0.55), (S.ABANDON, 0.35), (S.NONE, 0.10)),
    False: ((S.COMPLAINT, 0.35), (S.REPEAT, 0.25), (S.HUMAN, 0.15), (S.ABANDON, 0.15), (S.GRATITUDE, 0.10)),
}

TEXTS: dict[str, dict[ImplicitSignal, tuple[str, ...]]] = {
    "en": {
        S.GRATITUDE: (
            "thanks, that helped",
            "Thank you!",
            "great, thanks a lot",
            "perfect, that's what I needed",
            "ok thanks",
            "Got it, thank you.",
            "thx",
            "Awesome, appreciate it",
            "Cheers!",
            "that answers it, thanks",
        ),
        S.COMPLAINT: (
            "no, that's wrong",
            "That's not right.",
            "that is not what your website says",
            "Wrong answer.",
            "thanks but that's wrong",
            "Are you sure? That doesn't sound right",
            "that doesn't answer my question",
            "nope, incorrect",
            "This is not correct, I was told something else.",
            "You're making that up.",
        ),
        S.HUMAN: (
            "can I talk to a human?",
            "I want to speak to a real person",
            "agent please",
            "Connect me to a representative.",
            "Is there a human I can talk to?",
            "get me someone from your team",
            "operator!",
            "This bot is useless, I need a human.",
        ),
        S.NONE: ("ok", "hmm", "ok, and {other}", "{other}"),
    },
    "zh": {
        S.GRATITUDE: (
            "好的，谢谢",
            "谢谢！",
            "明白了，谢谢你",
            "太好了，感谢",
            "多谢",
            "好的，解决了",
            "谢啦",
            "非常感谢，很有帮助",
            "了解了，谢谢",
            "OK，谢谢",
        ),
        S.COMPLAINT: (
            "不对",
            "不对吧，你说错了",
            "这不对，官网上不是这么写的",
            "答非所问",
            "谢谢，但是不对",
            "你确定吗？好像不是这样",
            "错了",
            "这个回答没用",
            "你这说的不对啊",
            "不是这样的",
        ),
        S.HUMAN: (
            "转人工",
            "人工客服",
            "我要找人工",
            "能不能让真人来回答",
            "请帮我转接人工客服",
            "有没有工作人员",
            "叫你们客服出来",
            "机器人没用，我要人工",
        ),
        S.NONE: ("嗯", "哦", "好的，那{other}", "{other}"),
    },
}
REPEATS: dict[str, tuple[str, ...]] = {
    "en": ("{q}", "I asked: {q}", "My question was: {q}", "Let me rephrase. {q2}", "I mean, {q2}", "{q2}"),
    "zh": ("{q}", "我问的是{q}", "再问一遍：{q}", "我是说，{q2}", "换个说法：{q2}", "{q2}"),
}


@dataclass(frozen=True)
class Reaction:
    signal: ImplicitSignal  # what the customer meant: the truth label
    text: str | None  # the next message; None: the customer leaves without one


def _draw(rng: random.Random, up: bool) -> ImplicitSignal:
    x = rng.random()
    for signal, share in MIX[up]:
        if x < share:
            return signal
        x -= share
    return MIX[up][-1][0]


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text


def react(rng: random.Random, deployment: Deployment, intent: Intent, script: Script, *, up: bool) -> Reaction:
    """The customer's next message after a reply to ``script`` that the rubric rated ``up``."""
    signal = _draw(rng, up)
    if signal is S.ABANDON:
        return Reaction(signal, None)
    texts = TEXTS[deployment.language]
    question = script[-1]
    if signal is S.REPEAT:
        others = [s[-1] for s in intent.train if s[-1] != question] or [question]
        template = rng.choice(REPEATS[deployment.language])
        return Reaction(signal, template.format(q=question, q2=rng.choice(others)))
    if signal is S.NONE:
        topics = [i for i in deployment.intents if i.id != intent.id]
        other = rng.choice(rng.choice(topics).train)[-1]
        text = rng.choice(texts[S.NONE])
        if deployment.language == "en" and text.startswith("ok, and"):
            other = _lower_first(other)
        return Reaction(signal, text.format(other=other))
    return Reaction(signal, rng.choice(texts[signal]))
