"""Implicit feedback: what a customer's next message says about the reply before it. Pure.

Most customers never click a thumb, but what they write next, or that they write nothing,
still says something about the reply: "thanks, that helped" / "好的，谢谢" (GRATITUDE), "no,
that's wrong" / "不对" (COMPLAINT), the same question again in other words (REPEAT), "can I
talk to a human?" / "转人工" (HUMAN), or no next message at all (ABANDON). Anything else is
NONE: "ok", "嗯", or a new, unrelated question.

``classify_reaction`` reads one next message (English or Chinese; the rules for both run on
every text) with the user turn before the reply, and returns the signal with a confidence
and the cue that decided it, for audits. ``reading_after_reply`` does the same from a
stored conversation, including the silence case. Rules are checked in this order, so a
message that fits two reads as the first: HUMAN (a request, not a question about agents'
hours), COMPLAINT (the reply is called wrong, also as sarcasm, and also after a "thanks
but"), REPEAT (re-asks: a phrase such as "I asked" or "我问的是", or most of the previous
question's content words (English) or character bigrams (Chinese) again), a lone "no" or
"are you sure" (COMPLAINT, weaker), GRATITUDE (not inside a question about something else:
"how do I write a thank-you note?" is NONE), NONE.

``reaction_record`` turns a reading into the ``feedback.records.Reaction`` the store keeps
against the reply (the gateway, the IM inbox and the OpenAI-compatible API record one when a
customer's next message arrives). ``silent_replies`` finds the replies a customer left without a
word: silence is no event, so ABANDON is never recorded but read from the messages' times by
whoever needs it (the console), with the ``abandon_after_s`` in force then.

``implicit_label`` turns a signal into a training label and a weight relative to one
explicit thumb (weight 1.0); multiply it by the reading's confidence:

=========== ======= ====== ==========================================================
signal      value   weight why
=========== ======= ====== ==========================================================
GRATITUDE   +1      0.5    polite customers also thank for a wrong answer they did not check
COMPLAINT   -1      0.8    says the reply is wrong: nearly a thumbs down, but some are wrong
REPEAT      -1      0.5    re-asking usually means the reply missed; some ask for more detail
HUMAN       -1      0.3    some requests no assistant may serve (a refund to process) go to a person anyway
ABANDON     None    0.0    silence follows right answers as often as wrong ones
NONE        None    0.0    says nothing about the reply
=========== ======= ====== ==========================================================
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from feedback.records import Message, Reaction, Role


class ImplicitSignal(Enum):
    GRATITUDE = "gratitude"
    COMPLAINT = "complaint"
    REPEAT = "repeat"
    HUMAN = "human"
    ABANDON = "abandon"
    NONE = "none"


@dataclass(frozen=True)
class ImplicitReading:
    signal: ImplicitSignal
    confidence: float  # in [0, 1]: how sure the rule is that this is the signal
    cue: str  # the rule or words that decided it


@dataclass(frozen=True)
class ImplicitConfig:
    """The ``[implicit]`` settings: how next messages are read, and whether their labels train."""

    train: bool = field(
        default=False,
        metadata={
            "help": "Train on implicit feedback: a reply's weak label from the customer's next message (thanks +1; "
            "complaint, re-ask, asking for a person -1) becomes a KTO row weighted below a thumb, capped per "
            "customer and conversation (trust.implicit_*), never where a thumb or correction exists. Readings are "
            "recorded and shown in the console either way. Off until bench/learning.py measures a gain."
        },
    )
    abandon_after_s: float = field(
        default=1800.0, metadata={"help": "A reply that ends a conversation silent this long was abandoned."}
    )
    repeat_overlap: float = field(
        default=0.6, metadata={"help": "Dice overlap of content words (bigrams in Chinese) that makes a re-ask."}
    )

    def __post_init__(self) -> None:
        if self.abandon_after_s <= 0:
            raise ValueError("implicit.abandon_after_s must be positive")
        if not 0 < self.repeat_overlap <= 1:
            raise ValueError("implicit.repeat_overlap is a share: set it in (0, 1]")


LABELS: dict[ImplicitSignal, tuple[int | None, float]] = {
    ImplicitSignal.GRATITUDE: (1, 0.5),
    ImplicitSignal.COMPLAINT: (-1, 0.8),
    ImplicitSignal.REPEAT: (-1, 0.5),
    ImplicitSignal.HUMAN: (-1, 0.3),
    ImplicitSignal.ABANDON: (None, 0.0),
    ImplicitSignal.NONE: (None, 0.0),
}


def implicit_label(signal: ImplicitSignal) -> tuple[int | None, float]:
    """(value: +1, -1 or None, weight relative to one explicit thumb); see the module's table."""
    return LABELS[signal]


def _rx(*alternatives: str) -> re.Pattern[str]:
    return re.compile("|".join(alternatives))


_WHO = r"(?:a |an |some ?one |somebody |your |the |real |live |actual )*"
_PERSON = r"(?:human|person|people|agent|representative|rep|operator|manager|supervisor|someone|somebody|staff)\b"
_HUMAN = _rx(
    rf"\b(?:talk|speak|chat)(?:ing)? (?:to|with) {_WHO}{_PERSON}",
    rf"\b(?:get|give|connect|transfer|put|pass) me (?:to |through to |with )?{_WHO}{_PERSON}",
    rf"\b(?:want|need|would like|'d like|demand) {_WHO}{_PERSON}",
    rf"\b(?:is there|are there|any) {_WHO}{_PERSON}",
    r"^(?:a |an )?(?:human|real person|live agent|agent|operator|representative)(?: please| pls| now)?[.!?]*$",
    r"\bare you (?:a )?(?:bot|robot|real person|human|machine)\b|\bam i (?:talking|chatting) to a (?:bot|machine)",
    r"\b(?:real|live|actual) (?:person|human|agent|people)\b",
    r"转(?:一下|个)?人工|人工客服|人工服务|找人工|要人工|接人工|^人工|真人|活人|工作人员|客服人员|经理|主管|负责人|领导|转接|换个人"
    r"|叫(?:你们)?(?:的)?客服出来",
)
# A question about when or how much, not a request ("at what hours can I talk to an agent?").
_HUMAN_NOT = _rx(
    r"\b(?:when|what time|what hours|which hours|hours|opening|open|how much|how long|cost)\b",
    r"什么时候|几点|时间|多久|工作日|周末|上班|下班|在线吗",
)

_SUBJECT = r"\b(?:that|this|it|you|your (?:answer|reply|info\w*)|the (?:answer|reply|info\w*))"
_COMPLAINT = _rx(
    rf"{_SUBJECT}(?:'s|'re| is| are| was| were)? (?:\w+ )?(?:wrong|incorrect|false|nonsense|rubbish|useless)",
    rf"{_SUBJECT}(?:'s not|'re not| is not| isn't| are not| aren't| was not| wasn't) (?:\w+ )?"
    r"(?:right|correct|true|accurate|what i asked|it|helpful)",
    r"\b(?:says?|said|told me|was told) (?:something |me something )?(?:else|different|otherwise)\b",
    r"^(?:wrong|incorrect|false|not true|not correct|nonsense)\b",
    r"\bwrong (?:answer|info\w*|number)|\bgot (?:it|that) wrong\b|\bnot what (?:i asked|your|the)",
    r"\b(?:doesn't|does not|didn't|did not) (?:answer|help|make sense)|\bmakes no sense\b",
    r"\b(?:made|making) (?:that|it|this|things) up\b|\byou(?:'re| are) (?:lying|wrong|making)",
    r"\bthat can'?t be right\b|\bthat'?s not it\b|\bnot helpful\b|\buseless\b",
    r"不对(?!劲)|(?:你|说|搞|弄|答|回答|讲|完全|全)错|^错了|错的|错误的|(?:回答|答案|信息)(?:是)?错误|有误|不正确|不准确"
    r"|答非所问|我问的(?:没|没有|无)关系|没用|没有用|等于没说|胡说|瞎说|乱说|乱讲|瞎讲|胡扯|瞎扯"
    r"|不是这样|不是这个|不是我问的|没回答|没有回答|骗人|不靠谱|牛头不对马嘴|废话|你确定",
)
_SARCASM = _rx(
    r"\bthanks? (?:a lot |so much )?for nothing\b|\byeah,? right\b|\b(?:helpful|useful|great)[.!,]* not\b",
    r"\bgreat,? (?:just great|another|more)\b|\bwow,? (?:thanks|so) (?:useless|helpful)\b.*\bnot\b",
    r"才怪|呵呵|谢了个寂寞|服了|无语",
)
_NOT_COMPLAINT = _rx(r"\b(?:nothing|not|isn't|wasn't|no one's) wrong\b|\bno problem\b", r"对不对|没错|不错")
_WEAK_COMPLAINT = _rx(
    r"^(?:no|nope|nah)\b(?![, ]*(?:thanks|thank you|that's (?:all|it)|problem|worries))",
    r"\bare you sure\b|\bi don'?t think so\b|\breally\?",
    r"^不是|^不\W|真的吗|确定吗",
)
_REPEAT = _rx(
    r"\bi (?:asked|was asking|meant|mean)\b|\bmy question (?:was|is)\b|\b(?:let me |to )rephrase\b",
    r"\bin other words\b|^again\b|\bagain[:,]|\b(?:asking|ask) again\b|\bone more time\b|\bi repeat\b",
    r"\b(?:answer|read) my question\b|\bthat's not what i asked\b|\bto be clear\b|\bjust to clarify\b",
    r"我问的是|我是问|我的问题是|我是说|再问一遍|再问一次|换个说法|换句话说|我刚才问|重复一遍|我说的是|我想问的是|到底"
    r"|直接回答|正面回答|回答我的问题",
)
_GRATITUDE = _rx(
    r"\b(?:thanks?|thank (?:you|u)|thx|ty|tysm|cheers|appreciated?|grateful)\b",
    r"\b(?:that|this|it) (?:helped|helps|answers it)\b|\bvery helpful\b|\bhelpful\b",
    r"\b(?:great|perfect|awesome|excellent|brilliant|wonderful|fantastic|lovely|sorted)\b",
    r"\b(?:got it|makes sense|understood|all good|that's (?:all|what i needed))\b",
    r"谢|感谢|3q|明白了|懂了|了解了|清楚了|知道了|太好了|很好|有帮助|帮大忙|解决了|搞定|完美|不错|没错|好评|棒",
)
_NOT_GRATITUDE = _rx(r"不用谢|不客气|别客气|谢什么|感谢信|感谢卡|谢卡|\bthank[- ]you (?:note|card|letter)")
_STRONG_GRATITUDE = _rx(r"\b(?:thanks?|thank (?:you|u)|thx|ty|tysm|appreciated?)\b|谢|感谢|帮大忙|有帮助|解决了")
_QUESTION = _rx(
    r"\?$|^(?:how|what|when|where|which|who|why|can|could|do|does|is|are|will|would|should)\b",
    r"吗$|吗\?|怎么|如何|什么|哪|几|多少|多久|是否",
)
_THANKS_FIRST = _rx(
    r"^(?:ok(?:ay)?,? |great,? |perfect,? )?(?:thanks?|thank you|thx|ty|cheers)\b|^(?:好的,?)?谢|^感谢|^多谢"
)

_EN_STOP_WORDS = (
    "a an the i me my mine you your we our us it its is are was were be been am do does did can could would should "
    "will shall may might how what when where which who whom why there here this that these those to of for on in at "
    "with and or if so as by from about into than then too very just also any some much many long get got please "
    "hi hello hey ok okay thanks thank again asked ask mean meant question"
)
_EN_STOP = frozenset(_EN_STOP_WORDS.split())
_ZH_STOP = frozenset("的了吗呢吧啊呀么我你您们是在有就都也还要想请问这那个一下")
_HAN = re.compile(r"[\u3400-\u9fff]")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def _normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'")
    return re.sub(r"\s+", " ", text).strip()


def _stem(word: str) -> str:
    word = word.removesuffix("'s")
    for suffix, keep in (("ing", 5), ("ed", 4), ("es", 4), ("s", 3)):
        if len(word) > keep and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def content_tokens(text: str) -> frozenset[str]:
    """English content words (stemmed, stop words dropped) and Chinese character bigrams."""
    text = _normalize(text)
    words = {_stem(w) for w in _WORD.findall(text) if w not in _EN_STOP}
    han = [c for c in text if _HAN.match(c) and c not in _ZH_STOP]
    bigrams = {a + b for a, b in itertools.pairwise(han)}
    if len(han) == 1:
        bigrams.add(han[0])
    return frozenset(words | bigrams)


def overlap(a: str, b: str) -> float:
    """Dice coefficient of the two texts' content tokens (0 when either has none)."""
    ta, tb = content_tokens(a), content_tokens(b)
    if not ta or not tb:
        return 0.0
    return 2 * len(ta & tb) / (len(ta) + len(tb))


def _hit(pattern: re.Pattern[str], text: str) -> str | None:
    match = pattern.search(text)
    return match.group(0) if match else None


def classify_reaction(
    text: str | None,
    *,
    previous_user: str | None = None,
    idle_s: float | None = None,
    config: ImplicitConfig = ImplicitConfig(),
) -> ImplicitReading:
    """The signal in the customer's next message ``text`` after a reply.

    ``previous_user`` is the user turn the reply answered (for REPEAT). ``text`` None means
    no next message: ABANDON once ``idle_s`` (seconds since the reply) reaches
    ``config.abandon_after_s``, NONE while it is too early to tell.
    """
    if text is None or not text.strip():
        if idle_s is not None and idle_s >= config.abandon_after_s:
            return ImplicitReading(ImplicitSignal.ABANDON, 0.9, f"silent for {idle_s:.0f} s")
        return ImplicitReading(ImplicitSignal.NONE, 0.5, "no next message yet")
    norm = _normalize(text)
    is_question = _QUESTION.search(norm) is not None
    if (cue := _hit(_HUMAN, norm)) and not (is_question and _HUMAN_NOT.search(norm)):
        return ImplicitReading(ImplicitSignal.HUMAN, 0.9, cue)
    if cue := _hit(_SARCASM, norm):
        return ImplicitReading(ImplicitSignal.COMPLAINT, 0.7, f"sarcasm: {cue}")
    if (cue := _hit(_COMPLAINT, norm)) and not _NOT_COMPLAINT.search(norm):
        return ImplicitReading(ImplicitSignal.COMPLAINT, 0.9, cue)
    if cue := _hit(_REPEAT, norm):
        return ImplicitReading(ImplicitSignal.REPEAT, 0.8, cue)
    if previous_user and (score := overlap(norm, previous_user)) >= config.repeat_overlap:
        return ImplicitReading(ImplicitSignal.REPEAT, min(0.95, 0.5 + score / 2), f"overlap {score:.2f}")
    if (cue := _hit(_WEAK_COMPLAINT, norm)) and not _NOT_COMPLAINT.search(norm) and not _GRATITUDE.search(norm):
        return ImplicitReading(ImplicitSignal.COMPLAINT, 0.6, cue)
    gratitude = (cue := _hit(_GRATITUDE, norm)) and not _NOT_GRATITUDE.search(norm)
    # "how do I write a thank-you note?" is a question, not thanks; "thanks! and ...?" is thanks
    if gratitude and (not is_question or _THANKS_FIRST.search(norm)):
        strong = _STRONG_GRATITUDE.search(norm) is not None
        return ImplicitReading(ImplicitSignal.GRATITUDE, 0.9 if strong else 0.6, cue or "")
    return ImplicitReading(ImplicitSignal.NONE, 0.5, "no cue")


def reading_after_reply(
    messages: Sequence[Message],
    reply_id: str,
    *,
    now: float,
    config: ImplicitConfig = ImplicitConfig(),
) -> ImplicitReading:
    """The signal after the reply ``reply_id`` in a stored conversation (all its messages).

    The next message is the user turn whose parent is the reply. Without one, the reply is
    abandoned only if nothing at all came after it (no regeneration, no other branch) and
    it is older than ``config.abandon_after_s``.
    """
    by_id = {m.id: m for m in messages}
    reply = by_id[reply_id]
    previous = by_id.get(reply.parent_id) if reply.parent_id else None
    previous_text = previous.text if previous is not None and previous.role is Role.USER else None
    following = [m for m in messages if m.parent_id == reply.id and m.role is Role.USER]
    if following:
        first = min(following, key=lambda m: (m.created_at, m.seq))
        return classify_reaction(first.text, previous_user=previous_text, config=config)
    if any(m.created_at > reply.created_at for m in messages if m.id != reply.id):
        return ImplicitReading(ImplicitSignal.NONE, 0.5, "the conversation went on elsewhere")
    return classify_reaction(None, idle_s=now - reply.created_at, config=config)


MAX_CUE_CHARS = 120


def label_weight(reading: ImplicitReading) -> tuple[int | None, float]:
    """The reading's weak label and its weight (``implicit_label``'s weight times the confidence)."""
    value, weight = implicit_label(reading.signal)
    return value, round(weight * reading.confidence, 4) if value is not None else 0.0


def reaction_record(reading: ImplicitReading, *, reply_id: str, message_id: str) -> Reaction:
    """What the store keeps of a reading against the reply ``reply_id`` (``message_id``: the next message)."""
    value, weight = label_weight(reading)
    return Reaction(
        reply_id=reply_id,
        message_id=message_id,
        signal=reading.signal.value,
        confidence=reading.confidence,
        cue=reading.cue[:MAX_CUE_CHARS],
        value=value,
        weight=weight,
    )


def silent_replies(
    messages: Sequence[Message], *, now: float, config: ImplicitConfig = ImplicitConfig()
) -> dict[str, ImplicitReading]:
    """The assistant reply of one conversation that was abandoned, with its reading: the newest
    message, if it is a reply after which nothing came (no next message, no regeneration, no other
    branch) for ``config.abandon_after_s``. Empty when there is none."""
    if not messages:
        return {}
    last = max(messages, key=lambda m: (m.created_at, m.seq))  # only the newest message has nothing after it
    if last.role is not Role.ASSISTANT or not last.text.strip():
        return {}
    reading = reading_after_reply(messages, last.id, now=now, config=config)
    return {last.id: reading} if reading.signal is ImplicitSignal.ABANDON else {}
