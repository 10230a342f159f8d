"""Cleaning before anything trains. Pure: text in, text and reasons out.

* PII redaction: emails, phone numbers (mainland China mobiles included), payment card
  numbers (Luhn-checked), IBANs (mod-97-checked), IPv4/IPv6 addresses and 18-digit Chinese
  resident ID numbers (checksum-checked), street addresses (English and Chinese) and names said
  as names ("my name is", titles, 我叫, 张先生) become placeholders like ``[EMAIL]``. Detectors are
  plain functions ``text -> [(start, end, kind)]``: pass your own to add more.
* Chat-template control tokens typed by users (``<|im_end|>``, ``<s>``, ``[INST]``...) are
  removed, so no one can forge turns inside a training prompt.
* Rows with an empty, non-text (binary, encoded blob) or over-long text are dropped; near-duplicates (same words, ignoring
  case, spacing and punctuation) collapse to the first.

Every change and drop is recorded with its reason in a ``CleanReport``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from training.pairs import DPORow, KTORow, SFTRow, TrainingData

R = TypeVar("R", DPORow, KTORow, SFTRow)
C = TypeVar("C", KTORow, SFTRow)

Span = tuple[int, int, str]
Detector = Callable[[str], list[Span]]

# Every pattern here runs on untrusted text in the console's event loop: each is linear in the text.
# No nested or overlapping quantifiers; runs are possessive (``++``) or atomic (``(?>...)``) where
# what follows cannot take back what they took, and a run starts only where the run starts (a
# lookbehind), so a long run is scanned once, not once per position (tests/test_clean_redos.py).
_EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]++@[A-Za-z0-9-]++(?:\.[A-Za-z0-9-]++)*\.[A-Za-z]{2,}")
_CN_ID = re.compile(r"(?<![0-9A-Za-z])\d{17}[0-9Xx](?![0-9A-Za-z])")
_CARD = re.compile(r"(?<![\d+-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_IPV4 = re.compile(
    r"(?<!\d)(?<!\d\.)(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\.?\d)"
)
_IPV6 = re.compile(r"(?<![0-9A-Fa-f:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![0-9A-Fa-f:])")
_CN_MOBILE = re.compile(r"(?<![\d+])(?:(?:\+|00)86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}(?!\d)")
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,8}){1,4}(?![\w-])"
    r"|(?<![\w+])\+\d{7,14}(?!\w)"
)
# street addresses: a house number, one to four capitalised words, a street type (English); a
# street or road with its number, after optional province/city/district parts (Chinese)
_STREET_TYPES = (
    "Street|St\\.?|Avenue|Ave\\.?|Road|Rd\\.?|Boulevard|Blvd\\.?|Lane|Ln\\.?|Drive|Dr\\.?|Court|Ct\\.?"
    "|Place|Pl\\.?|Way|Terrace|Close|Crescent|Square|Sq\\.?|Parkway|Highway|Hwy\\.?|Strasse|Straße"
)
_ADDRESS_EN = re.compile(
    rf"\b\d{{1,5}}+[A-Za-z]?,?\s++(?:[A-Z][a-z'-]++\.?\s++){{1,4}}(?:{_STREET_TYPES})(?![A-Za-z])"
    r"(?:,?\s++(?:Apt|Apartment|Suite|Unit|Flat)\.?\s*+#?\w++)?"
)
# Chinese: up to five administrative parts (北京市, 朝阳区, 广西壮族自治区: up to eight characters
# that are no 省/市/区/县/镇, then one; atomic, so a run of them splits one way only), a road name of
# one to ten characters, the road type, the number. The parts used to be ``(?:[\u4e00-\u9fa5]{1,8}?
# (?:省|...))*``: any character could end a part or begin the next, and 60 times "市" never finished.
_ZH_PART = r"(?>(?:(?![省市区县镇])[\u4e00-\u9fa5]){0,8}[省市区县镇])"
_ZH_ROAD_NUMBER = r"(?:路|街|大道|大街|巷|弄)\d{1,5}+(?:号|號)"
_ADDRESS_ZH = re.compile(
    rf"{_ZH_PART}{{0,5}}[\u4e00-\u9fa5]{{1,10}}?{_ZH_ROAD_NUMBER}"
    r"(?:[\u4e00-\u9fa5\dA-Za-z-]{0,12}?(?:室|楼|栋|幢|单元))?"
)
_HAS_ROAD_NUMBER = re.compile(_ZH_ROAD_NUMBER)
# names said as names: after "my name is", a title, or 我叫 / 我的名字是 / 姓名; or 张先生-style
_NAME_EN = re.compile(
    r"(?:\b[Mm]y name is|\b[Mm]y name's|\b[Nn]ame:|\b(?:Mr|Mrs|Ms|Miss|Dr|Prof)\.?)\s++"
    r"(?P<name>[A-Z][a-z'-]++(?:\s++[A-Z][a-z'-]++){0,2})"
)
_NAME_ZH = re.compile(
    r"(?:我叫|我的名字是|我的名字叫|姓名[:：]?\s*+|联系人[:：]?\s*+)(?P<name>[\u4e00-\u9fa5]{2,4}?)(?=[，,。.！!？?\s的]|$)"
    r"|(?P<surname>[\u4e00-\u9fa5]{1,2})(?:先生|女士|小姐)"
)
_COMMON_ZH_SURNAMES = set(
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔向汤"
)

_DATE = re.compile(r"\d{4}[./-]\d{1,2}[./-]\d{1,2}|\d{1,2}[./-]\d{1,2}[./-]\d{2,4}")
_CONTROL = re.compile(r"<\|[^<>|\s]{1,40}\|>|</?s>|\[/?INST\]|<</?SYS>>|<unk>|<pad>")

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    s = iban.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def cn_id_ok(number: str) -> bool:
    body, check = number[:17], number[17].upper()
    return _ID_CHECK[sum(int(d) * w for d, w in zip(body, _ID_WEIGHTS, strict=True)) % 11] == check


def detect_emails(text: str) -> list[Span]:
    return [(m.start(), m.end(), "EMAIL") for m in _EMAIL.finditer(text)]


def detect_cn_ids(text: str) -> list[Span]:
    return [(m.start(), m.end(), "ID") for m in _CN_ID.finditer(text) if cn_id_ok(m.group())]


def detect_cards(text: str) -> list[Span]:
    spans = []
    for m in _CARD.finditer(text):
        digits = re.sub(r"[ -]", "", m.group())
        if _CN_MOBILE.fullmatch(m.group()):  # a phone number that happens to pass Luhn
            continue
        if 13 <= len(digits) <= 19 and luhn_ok(digits):
            spans.append((m.start(), m.end(), "CARD"))
    return spans


def detect_ibans(text: str) -> list[Span]:
    return [(m.start(), m.end(), "IBAN") for m in _IBAN.finditer(text) if iban_ok(m.group())]


def detect_ips(text: str) -> list[Span]:
    spans = [(m.start(), m.end(), "IP") for m in _IPV4.finditer(text)]
    for m in _IPV6.finditer(text):
        try:
            ipaddress.IPv6Address(m.group())
        except ValueError:
            continue
        spans.append((m.start(), m.end(), "IP"))
    return spans


def detect_phones(text: str) -> list[Span]:
    spans = [(m.start(), m.end(), "PHONE") for m in _CN_MOBILE.finditer(text)]
    for m in _PHONE.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 7 <= len(digits) <= 15 and not _DATE.fullmatch(m.group()):
            spans.append((m.start(), m.end(), "PHONE"))
    return spans


def detect_addresses(text: str) -> list[Span]:
    """Street addresses (house number and street; Chinese road and number), not whole postal addresses."""
    chinese = _ADDRESS_ZH.finditer(text) if _HAS_ROAD_NUMBER.search(text) else ()
    return [(m.start(), m.end(), "ADDRESS") for m in (*_ADDRESS_EN.finditer(text), *chinese)]


def detect_names(text: str) -> list[Span]:
    """People's names where the text says they are names (cue words, titles, 先生/女士); a bare name in a
    sentence is not found (docs/reliability.md gives the measured recall)."""
    spans = [(m.start("name"), m.end("name"), "NAME") for m in _NAME_EN.finditer(text)]
    for m in _NAME_ZH.finditer(text):
        if m.group("name"):
            spans.append((m.start("name"), m.end("name"), "NAME"))
        elif m.group("surname") and m.group("surname")[-1] in _COMMON_ZH_SURNAMES:
            spans.append((m.end("surname") - 1, m.end("surname"), "NAME"))
    return spans


# Checksummed detectors first: on overlapping spans the earlier detector wins.
DEFAULT_DETECTORS: tuple[Detector, ...] = (
    detect_emails,
    detect_cn_ids,
    detect_cards,
    detect_ibans,
    detect_ips,
    detect_phones,
    detect_addresses,
    detect_names,
)


def find_pii(text: str, detectors: Sequence[Detector] = DEFAULT_DETECTORS) -> list[Span]:
    """Every detected value, in text order, none overlapping (on overlap the earlier detector wins).
    Linear in the text: a value's characters are marked taken, not compared with every value before."""
    taken: list[Span] = []
    used = bytearray(len(text))
    for detector in detectors:
        for start, end, kind in detector(text):
            if end > start and 1 not in used[start:end]:
                used[start:end] = b"\x01" * (end - start)
                taken.append((start, end, kind))
    return sorted(taken)


def redact(text: str, detectors: Sequence[Detector] = DEFAULT_DETECTORS) -> tuple[str, Counter[str]]:
    """Replace every detected value with ``[KIND]``; returns the text and counts per kind."""
    counts: Counter[str] = Counter()
    parts: list[str] = []
    pos = 0
    for start, end, kind in find_pii(text, detectors):
        parts += [text[pos:start], f"[{kind}]"]
        pos = end
        counts[kind] += 1
    parts.append(text[pos:])
    return "".join(parts), counts


_BLOB = re.compile(r"(?<![A-Za-z0-9+/=_-])[A-Za-z0-9+/=_-]{200,}")


def is_non_text(text: str) -> bool:
    """Binary junk (control characters) or a long encoded blob (base64, hex) is no chat text."""
    odd = sum(1 for ch in text if unicodedata.category(ch)[0] == "C" and ch not in "\n\r\t")
    return odd > 0.1 * len(text) or "\x00" in text or bool(_BLOB.search(text))


def strip_control_tokens(text: str) -> tuple[str, int]:
    out, n = _CONTROL.subn("", text)
    return out, n


@dataclass(frozen=True)
class CleanConfig:
    max_chars: int = field(default=8000, metadata={"help": "Rows with a longer text are dropped."})
    detectors: tuple[Detector, ...] = DEFAULT_DETECTORS


@dataclass
class CleanReport:
    redactions: Counter[str] = field(default_factory=Counter)
    control_tokens_removed: int = 0
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (row description, reason)

    def summary(self) -> dict[str, object]:
        reasons = Counter(reason for _, reason in self.dropped)
        return {
            "redactions": dict(self.redactions),
            "control_tokens_removed": self.control_tokens_removed,
            "dropped": dict(reasons),
        }


def norm_text(text: str) -> str:
    """Lower case, punctuation to spaces, runs of whitespace to one: what near-duplicates share."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def clean(data: TrainingData, config: CleanConfig | None = None) -> tuple[TrainingData, CleanReport]:
    """Redact, neutralise, drop and dedupe every row; nothing raw passes through."""
    config = config or CleanConfig()
    report = CleanReport()

    def fix(text: str) -> str:
        text, n = strip_control_tokens(text)
        report.control_tokens_removed += n
        text, counts = redact(text, config.detectors)
        report.redactions.update(counts)
        return text

    def fix_prompt(prompt: tuple[dict[str, str], ...]) -> tuple[dict[str, str], ...]:
        return tuple({"role": m["role"], "content": fix(m["content"])} for m in prompt)

    def problem(texts: Sequence[str]) -> str | None:
        if any(not t.strip() for t in texts):
            return "empty text"
        if any(is_non_text(t) for t in texts):
            return "not text (binary or an encoded blob)"
        if any(len(t) > config.max_chars for t in texts):
            return f"text over {config.max_chars} characters"
        return None

    seen: set[tuple[str, ...]] = set()

    def keep(kind: str, row: object, texts: Sequence[str], key: tuple[str, ...]) -> bool:
        reason = problem(texts)
        if reason is None and key in seen:
            reason = "near-duplicate"
        if reason is not None:
            report.dropped.append((f"{kind} {getattr(row, 'group', '?')}", reason))
            return False
        seen.add(key)
        return True

    def kept(
        kind: str,
        rows: Sequence[R],
        fixed: Callable[[R], R],
        answers: Callable[[R], tuple[str, ...]],
        tags: Callable[[R], tuple[str, ...]] = lambda _: (),
        weaker: Callable[[R], bool] = lambda _: False,
    ) -> tuple[R, ...]:
        """The rows fixed, without those with a problem or a near-duplicate (same last prompt
        message and answers, normalised, and same ``tags``) of a row kept before; a ``weaker`` row
        comes after every other, so a near-duplicate of both kinds keeps the stronger. The rows
        keep their order."""
        out: list[tuple[int, R]] = []
        for i in sorted(range(len(rows)), key=lambda i: weaker(rows[i])):  # stable: the order within a kind stays
            row: R = fixed(rows[i])
            texts = [m["content"] for m in row.prompt] + list(answers(row))
            key = (kind, norm_text(row.prompt[-1]["content"]), *map(norm_text, answers(row)), *tags(row))
            if keep(kind, row, texts, key):
                out.append((i, row))
        return tuple(row for _, row in sorted(out, key=lambda x: x[0]))

    def fix_completion(r: C) -> C:
        return dataclasses.replace(r, prompt=fix_prompt(r.prompt), completion=fix(r.completion))

    dpo = kept(
        "dpo",
        data.dpo,
        lambda r: dataclasses.replace(r, prompt=fix_prompt(r.prompt), chosen=fix(r.chosen), rejected=fix(r.rejected)),
        lambda r: (r.chosen, r.rejected),
    )
    # a thumb and an implicit label on the same answer: the thumb's row stays (implicit labels are weaker)
    kto = kept(
        "kto", data.kto, fix_completion, lambda r: (r.completion,), lambda r: (str(r.label),), lambda r: bool(r.signal)
    )
    sft = kept("sft", data.sft, fix_completion, lambda r: (r.completion,))
    return TrainingData(dpo, kto, sft), report
