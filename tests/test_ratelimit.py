"""One token bucket serves every limit: frames per connection, ratings per rater, logins, channel requests."""

from __future__ import annotations

import pytest

from server.ratelimit import KeyedRateLimiter, TokenBucket


def test_bucket_starts_full_and_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3)
    assert [bucket.take(10.0) for _ in range(3)] == [None, None, None]
    assert bucket.take(10.0) == pytest.approx(0.5)  # one token takes half a second at 2/s
    assert bucket.take(10.25) == pytest.approx(0.25)  # a refused take costs nothing
    assert bucket.take(10.5) is None
    assert bucket.refilled(100.0) == 3  # never above the burst


def test_keys_are_limited_apart() -> None:
    limiter = KeyedRateLimiter(per_minute=60, burst=2)
    assert limiter.check("a", 0.0) is None and limiter.check("a", 0.0) is None
    assert limiter.check("a", 0.0) == pytest.approx(1.0)
    assert limiter.check("b", 0.0) is None  # another rater is not held back by the first
    assert limiter.check("a", 1.0) is None


def test_disabled_limiter_allows_everything() -> None:
    limiter = KeyedRateLimiter(per_minute=None, burst=1)
    assert all(limiter.check("a", 0.0) is None for _ in range(1000))


def test_full_buckets_are_forgotten_past_max_keys() -> None:
    limiter = KeyedRateLimiter(per_minute=60, burst=1, max_keys=10)
    for i in range(50):
        limiter.check(f"k{i}", float(i))  # each key's bucket refills within a second
    assert len(limiter._buckets) <= 11
    assert limiter.check("k49", 49.0) is not None  # a key still short of tokens is remembered
