"""Poisoning: coordinated ratings among honest ones, through the real store and the cycle's data path."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from feedback import FeedbackStore, RaterState, Role
from tests.store_backends import StoreTarget
from training.config import CycleConfig
from training.cycle import prepare

N_REPLIES = 1000
HONEST_RATERS, HONEST_EACH = 1000, 10  # 10,000 honest ratings


async def seed(store: FeedbackStore, rng: random.Random) -> dict[str, bool]:
    good: dict[str, bool] = {}
    for i in range(N_REPLIES):
        await store.conversations.create(f"c{i}", user_id=f"customer{i}")
    await asyncio.gather(
        *(
            store.conversations.add_message(
                message_id=f"u{i}", conversation_id=f"c{i}", role=Role.USER, text=f"question {i}", parent_id=None
            )
            for i in range(N_REPLIES)
        )
    )
    await asyncio.gather(
        *(
            store.conversations.add_message(
                message_id=f"a{i}", conversation_id=f"c{i}", role=Role.ASSISTANT, text=f"answer {i}", parent_id=f"u{i}"
            )
            for i in range(N_REPLIES)
        )
    )
    for i in range(N_REPLIES):
        good[f"a{i}"] = rng.random() < 0.5
    honest = []
    for h in range(HONEST_RATERS):
        for k, reply in enumerate(rng.sample(sorted(good), HONEST_EACH)):
            value = (1 if good[reply] else -1) * (1 if rng.random() < 0.9 else -1)
            honest.append(
                store.conversations.add_rating(message_id=reply, value=value, rater=f"honest{h}", client_id=f"h{h}-{k}")
            )
    await asyncio.gather(*honest)
    return good


async def attack(store: FeedbackStore, good: dict[str, bool], identities: list[str], rng: random.Random) -> None:
    bad = [r for r, ok in good.items() if not ok]
    each = 5000 // len(identities)
    jobs = []
    for who in identities:
        for k in range(each):  # upvote bad replies, the same ones over and over
            jobs.append(
                store.conversations.add_rating(
                    message_id=bad[k % len(bad)] if len(identities) == 1 else rng.choice(bad),
                    value=1,
                    rater=who,
                    client_id=f"{who}-{k}",
                )
            )
    await asyncio.gather(*jobs)


@pytest.mark.parametrize("identities", [["mallory"], [f"sybil{i}" for i in range(20)]], ids=["one", "twenty"])
async def test_coordinated_ratings_are_held_and_capped(
    store_target: StoreTarget, tmp_path: Path, identities: list[str]
) -> None:
    rng = random.Random(1)
    async with await store_target.open() as store:
        good = await seed(store, rng)
        await attack(store, good, identities, rng)
        snapshot = await store.conversations.export_feedback()
        assert len(snapshot.ratings) == 15_000
        config = CycleConfig(base_model="unused", data_dir=tmp_path)
        prepared = prepare(snapshot, config)

        # every coordinated rating is held for review, and no honest rater is
        assert set(prepared.trust.held_raters) == set(identities)
        assert sum(prepared.trust.held_raters.values()) == 5000
        await store.raters.flag(prepared.trust.new_flags)
        reviews = {r["rater"]: r for r in await store.raters.reviews()}
        assert set(reviews) == set(identities) and all(r["state"] == RaterState.PENDING for r in reviews.values())

        # no identity supplies more than the configured share of what trains
        used = [r for r in snapshot.ratings if any(r.id in row.refs.ratings for row in prepared.data.kto)]
        per_rater: dict[str, int] = {}
        for r in used:
            per_rater[r.rater] = per_rater.get(r.rater, 0) + 1
        assert used and max(per_rater.values()) / len(used) <= config.trust.max_rater_share
        assert not set(per_rater) & set(identities)

        # the bad replies the attack upvoted still train as undesirable
        labels = {row.refs.messages[0]: row.label for row in prepared.data.kto}
        wrong = sum(1 for reply, label in labels.items() if label != good[reply])
        assert wrong / len(labels) < 0.1

        # once an operator clears them, their ratings count again, still under the caps: with 1,000
        # honest raters, no identity supplies more than 1% of the ratings that train
        for who in identities:
            await store.raters.review(who, RaterState.APPROVED, reviewer="op")
        again = prepare(await store.conversations.export_feedback(), config)
        assert identities[0] not in again.trust.held_raters
        used = [r for r in snapshot.ratings if any(r.id in row.refs.ratings for row in again.data.kto)]
        shares = {who: sum(1 for r in used if r.rater == who) / len(used) for who in {r.rater for r in used}}
        assert max(shares.values()) <= 0.01, max(shares.items(), key=lambda kv: kv[1])
        assert any(shares.get(who, 0) > 0 for who in identities)  # counted, not dropped
