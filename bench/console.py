"""Operator console benchmark: conversation list, filters and search at 100,000 conversations.

    python bench/console.py [--conversations 100000] [--reps 20] [--data-dir DIR] [--keep]
                            [--store-url postgresql://...]

A fresh store gets the real schema (``FeedbackStore.open``), then synthetic history is
bulk-inserted with ``sqlite3`` in one transaction (the FTS triggers index every message):
conversations over 90 days on three channels, 2-6 messages each from ~40 customer-service
topics with some rare words, replies by base/v1/v2/v3, ~30% of replies rated, ~2% corrected,
a few raters held for review. Then the real console (``start_console``) answers real HTTP
requests (httpx, API token): the first page and the next, each filter alone, a combination,
full-text searches (common word, rare word, two words, prefix, no match), a transcript, and
the whole-history tables: thumbs per channel and version (``GET /api/v1/stats/channels``) and
the Versions page (``GET /api/v1/versions``, every version with its stats). Conversations
carry a site (the Telegram bot or Slack app; none on the websocket) for the ``site`` filter.
Each kind is warmed up once and timed ``--reps`` times: p50, p95 and max of the HTTP round
trip, and p50 and p95 of the same read called on the store directly (``list_conversations``,
``transcript``: the queries without HTTP). ``GET /api/v1/me`` gives the floor of a request
(auth and HTTP, no query to speak of).
The last line is one JSON object with the figures.

``--store-url postgresql://...`` measures the PostgreSQL backend instead: the bench makes a
schema ``console_bench`` afresh in that database (dropping an old one), seeds it with psycopg
in one transaction (the same rows, from the same seed), runs ``ANALYZE`` (as autovacuum would
soon after a bulk load), and drops the schema at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sqlite3
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from feedback import FeedbackStore
from feedback.browse import ConversationFilter, fts_query, tsquery
from server.console.api import start_console
from server.presence import Presence
from server.settings import ConsoleConfig

TARGET_MS = 300.0
DAY = 86400.0
SPAN_DAYS = 90
CHANNELS = (("websocket", 0.6), ("telegram", 0.25), ("slack", 0.15))
SITES = {"websocket": (None,), "telegram": ("support", "sales"), "slack": ("team",)}  # site: the bot or app
# (version, first day it served, counted from the oldest day); the newest one also gets a canary share
VERSIONS = (("base", 0), ("v1", 30), ("v2", 55), ("v3", 75))
PENDING_RATERS = 25
RATED_SHARE = 0.30
CORRECTED_SHARE = 0.02
RARE_SHARE = 0.02  # messages that carry one rare word
COMMON_WORD = "order"
TWO_WORDS = "password reset"
PREFIX = "warrant"
NO_MATCH = "xylophonequartz"

PRODUCTS = (
    "blender", "kettle", "toaster", "coffee grinder", "desk lamp", "backpack", "rain jacket", "yoga mat",
    "water bottle", "headphones", "phone case", "office chair", "air fryer", "vacuum cleaner", "duvet cover",
    "running shoes", "wall clock", "picture frame", "cast iron pan", "electric toothbrush",
)  # fmt: skip
CITIES = (
    "Lisbon", "Toronto", "Oslo", "Denver", "Melbourne", "Lyon", "Osaka", "Dublin", "Austin", "Krakow",
    "Nairobi", "Bogota", "Tallinn", "Porto", "Seattle", "Vienna",
)  # fmt: skip
OPENERS = ("", "", "Hi, ", "Hello, ", "Hey there. ", "Good morning! ", "Quick question: ", "Sorry to bother you, ")
CLOSERS = ("", "", "", " Thanks!", " Thank you.", " Please help.", " Cheers.", " This is urgent.")
REPLY_OPENERS = ("", "", "Thanks for reaching out. ", "Happy to help! ", "I understand. ", "Sorry about that. ")
REPLY_CLOSERS = ("", "", " Anything else I can do?", " Let me know if that helps.", " Have a great day!")

# topic: (customer phrasings, assistant phrasings); {p} product, {o} order number, {c} city, {d} days
TOPICS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "refund": (
        ("How do I get a refund for my {p}?", "I want my money back for the {p} from order {o}.",
         "Can I still get a refund on order {o}? The {p} broke after {d} days."),
        ("You can request a refund within 30 days of delivery from your order page.",
         "Refunds go back to the original payment method within 5 business days.",
         "I have started a refund for order {o}; you will get an email when it is processed."),
    ),
    "shipping_time": (
        ("How long does shipping take to {c}?", "When will my {p} arrive?", "Order {o} still has not shipped."),
        ("Standard shipping takes 3 to 5 business days, express takes 1 to 2.",
         "Your order {o} left our warehouse and should arrive in {d} days.",
         "Deliveries to {c} usually take about a week."),
    ),
    "shipping_cost": (
        ("How much is shipping to {c}?", "Is shipping free on orders over 50 dollars?", "Why was I charged for shipping?"),
        ("Shipping is free on orders over 50 dollars; below that it is a flat 4.99.",
         "Express shipping costs 12 dollars and is charged per order."),
    ),
    "tracking": (
        ("Where is my package?", "The tracking link for order {o} does not work.", "Can you track my {p}?"),
        ("Your tracking number is in the shipping confirmation email.",
         "Order {o} is with the carrier in {c}; tracking updates every few hours."),
    ),
    "password_reset": (
        ("I forgot my password, how do I reset it?", "The password reset email never arrived.",
         "My password reset link expired."),
        ("Use Forgot password on the login page and we will email you a reset link.",
         "Reset links expire after one hour; please request a new password reset.",
         "Check your spam folder for the password reset email, it comes from no-reply."),
    ),
    "account_locked": (
        ("My account is locked.", "I cannot log in after too many attempts.", "Why was my account suspended?"),
        ("Accounts unlock automatically after 30 minutes.", "I have unlocked your account; please log in again."),
    ),
    "warranty": (
        ("Is my {p} still under warranty?", "How do I make a warranty claim?", "What does the warranty cover?"),
        ("Every product comes with a 2-year warranty against defects.",
         "Send us a photo of the fault and your order number {o} to start a warranty claim."),
    ),
    "return_label": (
        ("How do I return my {p}?", "I need a return label for order {o}.", "Can I return an opened item?"),
        ("You can print a prepaid return label from your order page.",
         "Opened items can be returned within 30 days if they are undamaged."),
    ),
    "exchange": (
        ("Can I exchange the {p} for another colour?", "I got the wrong size, can I swap it?"),
        ("Exchanges are free: start a return and choose exchange instead of refund.",),
    ),
    "damaged_item": (
        ("My {p} arrived damaged.", "The box was crushed and the {p} is broken.", "Order {o} came in pieces."),
        ("I am sorry it arrived damaged; I have sent a replacement at no cost.",
         "Please send a photo of the damage and we will replace it right away."),
    ),
    "missing_item": (
        ("An item is missing from order {o}.", "I only got one {p} but ordered two."),
        ("I have checked order {o} and will ship the missing item today.",),
    ),
    "wrong_item": (
        ("I received the wrong item.", "This is not the {p} I ordered."),
        ("Sorry for the mix-up; keep it and we will send the right {p}.",),
    ),
    "cancel_order": (
        ("How can I cancel order {o}?", "Please cancel my order, I ordered by mistake."),
        ("Orders can be cancelled until they ship; I have cancelled order {o}.",
         "Your order already shipped, so please return it once it arrives."),
    ),
    "change_address": (
        ("Can I change the delivery address for order {o}?", "I moved to {c}, please update my address."),
        ("I have updated the delivery address on order {o}.", "Addresses can be changed until the order ships."),
    ),
    "payment_declined": (
        ("My card was declined.", "Payment failed but money left my account.", "Why did my payment fail?"),
        ("Declined payments are never charged; the hold disappears within 3 days.",
         "Please check the card details or try another payment method."),
    ),
    "payment_methods": (
        ("Do you accept PayPal?", "Can I pay with Apple Pay?", "Which payment methods do you take?"),
        ("We accept cards, PayPal, Apple Pay and Google Pay.",),
    ),
    "invoice": (
        ("I need an invoice for order {o}.", "Can you send a VAT invoice?"),
        ("Invoices are in your account under Orders; I have also emailed order {o}'s invoice.",),
    ),
    "discount_code": (
        ("My discount code does not work.", "The promo code was rejected at checkout."),
        ("Codes cannot be combined with sale items; the code is valid until the end of the month.",),
    ),
    "price_match": (
        ("Do you price match?", "The {p} is cheaper elsewhere."),
        ("We match the price of major retailers within 14 days of purchase.",),
    ),
    "gift_card": (
        ("How do I use a gift card?", "My gift card balance is wrong."),
        ("Enter the gift card code at checkout; the balance shows in your account.",),
    ),
    "gift_wrap": (
        ("Can you gift wrap the {p}?", "Do you offer gift wrapping?"),
        ("Gift wrapping is available at checkout for 3 dollars.",),
    ),
    "store_hours": (
        ("What are your opening hours in {c}?", "Are you open on Sunday?"),
        ("Our {c} store is open 9 to 6 on weekdays and 10 to 4 on Saturday.",),
    ),
    "store_location": (
        ("Is there a store in {c}?", "Where is your nearest shop?"),
        ("We have a store in {c} on the main square; the store finder lists them all.",),
    ),
    "stock": (
        ("When will the {p} be back in stock?", "Is the {p} available?"),
        ("The {p} is expected back in stock in about {d} days; sign up for an alert.",),
    ),
    "preorder": (
        ("Can I preorder the new {p}?", "When do preorders ship?"),
        ("Preorders ship on the release date and are charged when they ship.",),
    ),
    "size_guide": (
        ("Which size should I pick?", "Do the running shoes run small?"),
        ("Our size guide is on every product page; most customers take their usual size.",),
    ),
    "product_info": (
        ("Is the {p} dishwasher safe?", "What is the {p} made of?", "How heavy is the {p}?"),
        ("The full specifications of the {p} are on its product page under Details.",),
    ),
    "assembly": (
        ("How do I assemble the {p}?", "The instructions for the {p} are missing."),
        ("Assembly instructions can be downloaded from the product page.",),
    ),
    "subscription": (
        ("How do I cancel my subscription?", "I was charged for a subscription I cancelled."),
        ("You can cancel the subscription any time under Account, Subscriptions.",),
    ),
    "newsletter": (
        ("Please unsubscribe me from the newsletter.", "I get too many emails."),
        ("I have unsubscribed you; it can take 48 hours to take effect.",),
    ),
    "privacy": (
        ("Please delete my personal data.", "What do you do with my data?"),
        ("You can request deletion under Account, Privacy; we confirm by email.",),
    ),
    "loyalty": (
        ("How do loyalty points work?", "My points did not show up after order {o}."),
        ("You earn one point per dollar; points appear 14 days after delivery.",),
    ),
    "international": (
        ("Do you ship to {c}?", "Will I pay customs fees?"),
        ("We ship to {c}; customs fees are included at checkout.",),
    ),
    "bulk_order": (
        ("Do you offer discounts for bulk orders?", "I want to order 50 of the {p} for my company."),
        ("Business orders over 20 units get a volume discount; our sales team will contact you.",),
    ),
    "repair": (
        ("Can you repair my {p}?", "Is there a repair service?"),
        ("Out-of-warranty repairs are available; send us the {p} with a description of the fault.",),
    ),
    "app_bug": (
        ("The app crashes when I open my orders.", "I cannot add the {p} to my cart."),
        ("Please update the app to the latest version and try again.",),
    ),
    "login_2fa": (
        ("I lost my phone and cannot get the two-factor code.", "The verification code never arrives."),
        ("We can reset two-factor login after verifying your identity by email.",),
    ),
    "complaint": (
        ("I am very unhappy with your service.", "This is the third time order {o} is late."),
        ("I am truly sorry; I have added a 10 dollar credit to your account.",),
    ),
    "feedback_praise": (
        ("Just wanted to say the {p} is great.", "Thanks, your team was very helpful."),
        ("Thank you, we will pass that on to the team!",),
    ),
    "delivery_slot": (
        ("Can I choose a delivery time?", "Nobody was home for the delivery of order {o}."),
        ("The carrier will try again tomorrow, or you can pick the parcel up in {c}.",),
    ),
}  # fmt: skip

FOLLOW_UPS = (
    "Okay, and what about order {o}?", "That did not help, the {p} still does not work.", "Thanks, that worked.",
    "Can I talk to a human?", "How long will that take?", "I already tried that.", "Great, one more question.",
    "Could you check again please?", "And can you also update my address to {c}?",
)  # fmt: skip
DOWN_REASONS = ("wrong", "unhelpful", "rude", "incomplete")
SYLLABLES = ("ka", "lo", "mi", "zu", "ter", "van", "qui", "rho", "bex", "nol", "ust", "fy", "gri", "dam", "osk")


def rare_words(rng: random.Random, n: int) -> list[str]:
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(3, 4))))
    return sorted(words)


def new_id(rng: random.Random) -> str:
    return f"{rng.getrandbits(128):032x}"


@dataclass
class Seeded:
    conversations: int = 0
    messages: int = 0
    ratings: int = 0
    corrections: int = 0
    pending_raters: int = 0
    seed_s: float = 0.0
    now: float = 0.0
    rare_word: str = ""
    rare_messages: int = 0
    rare_counts: dict[str, int] = field(default_factory=dict)
    sample_conversation: str = ""


class _PgBulk:
    """The few calls ``seed`` makes, on PostgreSQL (psycopg's executemany pipelines the rows)."""

    def __init__(self, url: str) -> None:
        import psycopg

        from feedback.postgres import translate

        self._translate = translate
        self.conn = psycopg.connect(url, autocommit=True)
        self.conn.execute("SET synchronous_commit = off")  # a bulk load, as SQLite's synchronous=OFF

    def execute(self, sql: str, params: Any = ()) -> Any:
        if sql.startswith("PRAGMA"):
            return None
        return self.conn.execute(self._translate(sql), params)

    def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        if rows:
            with self.conn.cursor() as cursor:
                cursor.executemany(self._translate(sql), rows)

    def close(self) -> None:
        self.conn.close()


def seed(path: Path | str, n: int, *, rng: random.Random, now: float) -> Seeded:
    """Bulk-insert ``n`` synthetic conversations into a store (a SQLite file, or a PostgreSQL URL)
    that already has the schema."""
    started = time.perf_counter()
    out = Seeded(now=now)
    rare = rare_words(rng, max(50, n // 20))
    users = [f"cust-{i:06d}" for i in range(max(10, int(n * 0.4)))]
    pending = rng.sample(users, PENDING_RATERS)
    topics = list(TOPICS.items())
    topic_weights = [rng.uniform(0.3, 3.0) for _ in topics]  # some topics far more common than others
    oldest = now - SPAN_DAYS * DAY
    starts = sorted(oldest + rng.random() * SPAN_DAYS * DAY for _ in range(n))  # insertion follows time

    def fill(template: str) -> str:
        return template.format(
            p=rng.choice(PRODUCTS), o=f"#{rng.choice('ABCDEFGH')}{rng.randint(10000, 99999)}",
            c=rng.choice(CITIES), d=rng.randint(2, 21),
        )  # fmt: skip

    def with_rare(text: str) -> str:
        if rng.random() < RARE_SHARE:
            word = rng.choice(rare)
            out.rare_counts[word] = out.rare_counts.get(word, 0) + 1
            text += f" (ref {word})" if rng.random() < 0.5 else f" My note says {word}."
        return text

    def version_at(day: float) -> str:
        current = [name for name, first in VERSIONS if day >= first][-1]
        upcoming = [(name, first) for name, first in VERSIONS if first > day]
        if upcoming and day >= upcoming[0][1] - 7 and rng.random() < 0.1:
            return upcoming[0][0]  # the next version as a canary in the week before its release
        return current

    conversations: list[tuple[Any, ...]] = []
    messages: list[tuple[Any, ...]] = []
    ratings: list[tuple[Any, ...]] = []
    corrections: list[tuple[Any, ...]] = []
    conn: Any = _PgBulk(path) if isinstance(path, str) else sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-262144")
    conn.execute("BEGIN")

    def flush() -> None:
        conn.executemany(
            "INSERT INTO conversations (id, user_id, channel, created_at, tenant, model_version, site)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            conversations,
        )
        conn.executemany(
            "INSERT INTO messages (id, conversation_id, seq, role, text, parent_id, regenerated_from,"
            " model_version, latency_ms, finish_reason, n_tokens, created_at, author)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            messages,
        )
        conn.executemany(
            "INSERT INTO ratings (message_id, value, reason, comment, rater, client_id, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            ratings,
        )
        conn.executemany(
            "INSERT INTO corrections (message_id, text, operator, created_at, reason) VALUES (?, ?, ?, ?, ?)",
            corrections,
        )
        out.messages += len(messages)
        out.ratings += len(ratings)
        out.corrections += len(corrections)
        for rows in (conversations, messages, ratings, corrections):
            rows.clear()

    channels = [name for name, _ in CHANNELS]
    channel_weights = [weight for _, weight in CHANNELS]
    for i, created in enumerate(starts):
        cid = new_id(rng)
        user = rng.choice(users)
        version = version_at((created - oldest) / DAY)
        channel = rng.choices(channels, channel_weights)[0]
        pinned = version if rng.random() < 0.1 else None
        conversations.append((cid, user, channel, created, None, pinned, rng.choice(SITES[channel])))
        (asks, answers) = rng.choices(topics, topic_weights)[0][1]
        at, parent = created, None
        for seq in range(1, rng.randint(2, 6) + 1):
            mid = new_id(rng)
            at += rng.uniform(2.0, 90.0)
            if seq % 2:  # the customer
                template = rng.choice(asks) if seq == 1 else rng.choice(FOLLOW_UPS)
                text = with_rare(rng.choice(OPENERS) + fill(template) + rng.choice(CLOSERS))
                messages.append((mid, cid, seq, "user", text, parent, None, None, None, None, None, at, None))
            else:
                text = with_rare(rng.choice(REPLY_OPENERS) + fill(rng.choice(answers)) + rng.choice(REPLY_CLOSERS))
                latency = round(rng.lognormvariate(6.0, 0.4), 1)
                n_tokens = len(text.split()) + rng.randint(2, 12)
                messages.append(
                    (mid, cid, seq, "assistant", text, parent, None, version, latency, "stop", n_tokens, at, None)
                )
                if rng.random() < RATED_SHARE:
                    value = 1 if rng.random() < 0.8 else -1
                    rater = rng.choice(pending) if rng.random() < 0.003 else user
                    reason = rng.choice(DOWN_REASONS) if value < 0 and rng.random() < 0.6 else None
                    comment = "It did not answer my question." if value < 0 and rng.random() < 0.2 else None
                    rated_at = min(now, at + rng.uniform(1, 60))
                    ratings.append((mid, value, reason, comment, rater, f"c{i}-{seq}", rated_at))
                if rng.random() < CORRECTED_SHARE:
                    better = fill(rng.choice(answers)) + " I have also noted this on your account."
                    corrected_at = min(now, at + rng.uniform(600, 7 * DAY))
                    corrections.append((mid, better, "alice", corrected_at, "wrong facts"))
            parent = mid
        if i == n // 2:
            out.sample_conversation = cid
        if len(conversations) >= 5000:
            flush()
    flush()
    conn.executemany(
        "INSERT INTO rater_reviews (rater, state, reasons, reviewer, updated_at) VALUES (?, 'pending', ?, NULL, ?)",
        [(r, json.dumps(["burst"]), now - rng.uniform(0, 5 * DAY)) for r in pending],
    )
    # the versions' registry (the Versions page lists each with its stats): the newest is live
    conn.executemany(
        "INSERT INTO model_versions (name, seq, state, base_model, replaced, created_at, updated_at)"
        " VALUES (?, ?, ?, 'bench', ?, ?, ?)",
        [
            (name, seq, "live" if seq == len(VERSIONS) - 1 else "retired", VERSIONS[seq - 1][0] if seq else None,
             oldest + first * DAY, oldest + first * DAY)
            for seq, (name, first) in enumerate(VERSIONS)
        ],
    )  # fmt: skip
    conn.execute("COMMIT")
    conn.close()
    out.conversations = n
    out.pending_raters = len(pending)
    # a rare word found in a handful of messages
    few = sorted(w for w, k in out.rare_counts.items() if 2 <= k <= 5) or sorted(out.rare_counts)
    out.rare_word = few[len(few) // 2] if few else rare[0]
    out.rare_messages = out.rare_counts.get(out.rare_word, 0)
    out.seed_s = time.perf_counter() - started
    return out


@dataclass
class Kind:
    name: str
    group: str  # "list", "search", "transcript", "aggregate" (whole-history tables) or "floor"
    params: dict[str, Any]
    path: str = "/api/v1/conversations"
    times: list[float] = field(default_factory=list)
    store_times: list[float] = field(default_factory=list)
    items: int = 0


def kinds(s: Seeded, cursor: str | None) -> list[Kind]:
    week_until = s.now - 40 * DAY
    return [
        Kind("first page", "list", {"limit": 50}),
        Kind("page 2 (cursor)", "list", {"limit": 50, "cursor": cursor}),
        Kind("rating=up", "list", {"rating": "up"}),
        Kind("rating=down", "list", {"rating": "down"}),
        Kind("rating=none", "list", {"rating": "none"}),
        Kind("version=v2", "list", {"version": "v2"}),
        Kind("channel=telegram", "list", {"channel": "telegram"}),
        Kind("site=sales", "list", {"site": "sales"}),
        Kind("channel=telegram&site=sales", "list", {"channel": "telegram", "site": "sales"}),
        Kind("since/until (1 week)", "list", {"since": week_until - 7 * DAY, "until": week_until}),
        Kind("has_correction=true", "list", {"has_correction": "true"}),
        Kind("has_correction=false", "list", {"has_correction": "false"}),
        Kind("flagged=true", "list", {"flagged": "true"}),
        Kind("down+v1+slack", "list", {"rating": "down", "version": "v1", "channel": "slack"}),
        Kind(f"q={COMMON_WORD} (common)", "search", {"q": COMMON_WORD}),
        Kind(f"q={s.rare_word} (rare)", "search", {"q": s.rare_word}),
        Kind(f"q={TWO_WORDS} (two words)", "search", {"q": TWO_WORDS}),
        Kind(f"q={PREFIX} (prefix)", "search", {"q": PREFIX}),
        Kind(f"q={NO_MATCH} (no match)", "search", {"q": NO_MATCH}),
        Kind("transcript", "transcript", {}, path=f"/api/v1/conversations/{s.sample_conversation}"),
        # the Charts page's thumbs per channel and version, and the Versions page (stats of every version)
        Kind("stats/channels", "aggregate", {}, path="/api/v1/stats/channels"),
        Kind("versions (with stats)", "aggregate", {}, path="/api/v1/versions"),
        Kind("GET /me (HTTP floor)", "floor", {}, path="/api/v1/me"),  # auth and HTTP, no query to speak of
    ]


def as_filter(params: dict[str, Any]) -> ConversationFilter:
    flag = {"true": True, "false": False}
    return ConversationFilter(
        rating=params.get("rating"),
        version=params.get("version"),
        channel=params.get("channel"),
        since=params.get("since"),
        until=params.get("until"),
        has_correction=flag.get(params.get("has_correction", "")),
        flagged=flag.get(params.get("flagged", "")),
        q=params.get("q"),
        site=params.get("site"),
    )


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(path: Path | str, s: Seeded, reps: int, tombstones: Path) -> list[Kind]:
    store = await FeedbackStore.open(path, tombstone_path=tombstones)
    try:
        await store.accounts.add_operator("bench", "bench-password-1", "reviewer", actor="bench")  # q needs it
        token = await store.accounts.create_token("bench", label="bench", actor="bench")
        console = await start_console(ConsoleConfig(port=0), store=store, presence=Presence(store))
        try:
            base = f"http://127.0.0.1:{console.port}"
            async with httpx.AsyncClient(
                base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60
            ) as client:
                first = (await client.get("/api/v1/conversations", params={"limit": 50})).json()
                all_kinds = kinds(s, first["next_cursor"])
                for kind in all_kinds:
                    for rep in range(reps + 1):  # the first one warms up and is not counted
                        started = time.perf_counter()
                        r = await client.get(kind.path, params=kind.params)
                        elapsed = (time.perf_counter() - started) * 1000
                        r.raise_for_status()
                        if rep:
                            kind.times.append(elapsed)
                        body = r.json()
                        kind.items = len(body.get("items", body.get("messages", [])))
                    if kind.group == "floor":
                        continue
                    f = as_filter(kind.params)
                    for rep in range(reps + 1):  # the same read, called on the store directly
                        started = time.perf_counter()
                        if kind.group == "transcript":
                            await store.browse.transcript(s.sample_conversation)
                        elif kind.path.endswith("/stats/channels"):
                            await store.browse.channel_stats()
                        elif kind.group == "aggregate":
                            await store.versions.all_stats()
                        else:
                            await store.browse.list_conversations(
                                f, limit=kind.params.get("limit", 50), cursor=kind.params.get("cursor")
                            )
                        if rep:
                            kind.store_times.append((time.perf_counter() - started) * 1000)
        finally:
            await console.stop()
    finally:
        await store.close()
    return all_kinds


def report(s: Seeded, results: list[Kind], reps: int) -> dict[str, Any]:
    width = max(len(k.name) for k in results)
    print(f"\n{reps} timed requests per kind after one warm-up, in ms (store: the same read called on the store)")
    print(f"{'kind':<{width}}  {'items':>5}  {'HTTP p50':>8}  {'p95':>7}  {'max':>7}  {'store p50':>9}  {'p95':>7}")
    for k in results:
        store = (
            f"{pct(k.store_times, 0.5):9.1f}  {pct(k.store_times, 0.95):7.1f}"
            if k.store_times
            else f"{'-':>9}  {'-':>7}"
        )
        print(
            f"{k.name:<{width}}  {k.items:>5}  {pct(k.times, 0.5):8.1f}  {pct(k.times, 0.95):7.1f}"
            f"  {max(k.times):7.1f}  {store}"
        )

    def worst(group: str, store: bool = False) -> float:
        return round(max(pct(k.store_times if store else k.times, 0.95) for k in results if k.group == group), 1)

    summary: dict[str, Any] = {
        "conversations": s.conversations,
        "messages": s.messages,
        "ratings": s.ratings,
        "corrections": s.corrections,
        "seed_s": round(s.seed_s, 1),
        "reps": reps,
        "list_p95_ms": worst("list"),
        "search_p95_ms": worst("search"),
        "transcript_p95_ms": worst("transcript"),
        "aggregate_p95_ms": worst("aggregate"),
        "store_aggregate_p95_ms": worst("aggregate", store=True),
        "http_floor_p50_ms": round(pct(results[-1].times, 0.5), 1),
        "store_list_p95_ms": worst("list", store=True),
        "store_search_p95_ms": worst("search", store=True),
        "target_ms": TARGET_MS,
    }
    summary["ok"] = max(summary["list_p95_ms"], summary["search_p95_ms"]) < TARGET_MS
    return summary


def _bench_schema(url: str) -> str:
    """A fresh schema ``console_bench`` in ``url``'s database; the store URL that uses it."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS console_bench CASCADE")
        conn.execute("CREATE SCHEMA console_bench")
    joiner = "&" if "?" in url else "?"
    return url + joiner + "options=" + urllib.parse.quote("-csearch_path=console_bench")


async def run_postgres(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    import psycopg

    url = _bench_schema(args.store_url)
    try:
        store = await FeedbackStore.open(url, tombstone_path=data_dir / "erasures")  # the real schema
        await store.close()
        s = seed(url, args.conversations, rng=random.Random(20261129), now=time.time())
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ANALYZE")
            size = conn.execute(
                "SELECT SUM(pg_total_relation_size(c.oid)) FROM pg_class c"
                " WHERE c.relnamespace = 'console_bench'::regnamespace AND c.relkind = 'r'"
            ).fetchone()
            terms = [COMMON_WORD, s.rare_word, TWO_WORDS, PREFIX, NO_MATCH]
            counts = [
                conn.execute("SELECT COUNT(*) FROM messages WHERE to_tsvector('simple', text) @@ to_tsquery('simple', %s)",
                             (tsquery(t),)).fetchone()[0]
                for t in terms
            ]  # fmt: skip
        print(
            f"seeded {s.conversations} conversations, {s.messages} messages, {s.ratings} ratings, "
            f"{s.corrections} corrections, {s.pending_raters} raters held for review in {s.seed_s:.1f} s "
            f"(PostgreSQL, {(size[0] if size else 0) / 2**20:.0f} MiB with indexes)"
        )
        print("messages matching each search: " + ", ".join(f"{t!r} {k}" for t, k in zip(terms, counts, strict=True)))
        results = await measure(url, s, args.reps, data_dir / "erasures")
        return report(s, results, args.reps) | {"backend": "postgresql"}
    finally:
        if not args.keep:
            with psycopg.connect(args.store_url, autocommit=True) as conn:
                conn.execute("DROP SCHEMA IF EXISTS console_bench CASCADE")


async def run(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    if args.store_url:
        return await run_postgres(args, data_dir)
    path = data_dir / "console-bench.sqlite3"
    for stale in data_dir.glob("console-bench.sqlite3*"):
        stale.unlink()
    store = await FeedbackStore.open(path)  # the real schema and migrations
    await store.close()
    s = seed(path, args.conversations, rng=random.Random(20261129), now=time.time())
    print(
        f"seeded {s.conversations} conversations, {s.messages} messages, {s.ratings} ratings, "
        f"{s.corrections} corrections, {s.pending_raters} raters held for review in {s.seed_s:.1f} s "
        f"({path.stat().st_size / 2**20:.0f} MiB)"
    )
    conn = sqlite3.connect(path)
    terms = [COMMON_WORD, s.rare_word, TWO_WORDS, PREFIX, NO_MATCH]
    counts = [
        conn.execute("SELECT COUNT(*) FROM messages_fts WHERE messages_fts MATCH ?", (fts_query(t),)).fetchone()[0]
        for t in terms
    ]
    conn.close()
    print("messages matching each search: " + ", ".join(f"{t!r} {k}" for t, k in zip(terms, counts, strict=True)))
    results = await measure(path, s, args.reps, path.with_name(path.name + ".erasures"))
    return report(s, results, args.reps) | {"backend": "sqlite"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=20, help="timed requests per kind (after one warm-up)")
    parser.add_argument(
        "--data-dir", type=Path, help="where the store file goes (made afresh, and kept; default: a temporary folder)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and print its path")
    parser.add_argument(
        "--store-url", help="measure PostgreSQL: a postgresql:// URL of a database the bench may add a schema to"
    )
    args = parser.parse_args()
    if args.data_dir is not None:
        args.data_dir.mkdir(parents=True, exist_ok=True)
        summary = asyncio.run(run(args, args.data_dir))
    else:
        tmp = Path(tempfile.mkdtemp(prefix="console-bench-"))
        try:
            summary = asyncio.run(run(args, tmp))
        finally:
            if args.keep:
                print(f"kept {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
