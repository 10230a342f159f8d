"""Token buckets: one rule for every rate limit in the server.

Pure: the clock is passed in (``now``, seconds from any monotonic origin), nothing sleeps.
A bucket holds up to ``burst`` tokens and refills at ``rate`` tokens a second; a request
takes one token or is told how long until one is there. Users: frames per connection
(``server.protocol.ChatSession``), ratings per rater identity across connections (the
gateway), login attempts per name and per address (the console), requests per client on
the channels listener.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    """``burst`` tokens at most, refilled at ``rate`` a second; starts full."""

    rate: float
    burst: float
    tokens: float = -1.0  # -1: full at the first take
    updated: float | None = None

    def refilled(self, now: float) -> float:
        """Tokens there would be at ``now`` (nothing is taken)."""
        if self.updated is None or self.tokens < 0:
            return self.burst
        return min(self.burst, self.tokens + (now - self.updated) * self.rate)

    def take(self, now: float) -> float | None:
        """Take one token: None when allowed, else the seconds until a token is there (nothing taken)."""
        self.tokens = self.refilled(now)
        self.updated = now
        if self.tokens < 1.0:
            return (1.0 - self.tokens) / self.rate
        self.tokens -= 1.0
        return None


@dataclass
class KeyedRateLimiter:
    """A token bucket per key (a rater identity, a login name, a client address).

    ``per_minute`` None disables the limit. Past ``max_keys`` keys, the keys whose buckets
    have refilled are forgotten (they would start full anyway), so memory stays bounded.
    """

    per_minute: float | None
    burst: int = 30
    max_keys: int = 100_000
    _buckets: dict[str, TokenBucket] = field(default_factory=dict)

    def check(self, key: str, now: float) -> float | None:
        """None if allowed (and counted), else seconds until it would be."""
        if self.per_minute is None:
            return None
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.per_minute / 60.0, float(self.burst))
        retry_after = bucket.take(now)
        if retry_after is None and len(self._buckets) > self.max_keys:
            for k in [k for k, b in self._buckets.items() if b.refilled(now) >= b.burst]:
                del self._buckets[k]
        return retry_after
