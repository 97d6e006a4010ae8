"""Per-client rate limiting: a token bucket per client, bounded in number.

Each client has a bucket of `burst` tokens that refills at `rate` tokens per second; a request takes one token,
and a request that finds less than one is refused at once with RESOURCE_EXHAUSTED and the time until a token is
back as its retry hint. A bucket left alone long enough to refill is the same as no bucket, so idle clients'
buckets are dropped (oldest first) as new clients come; past `max_clients` the least recently seen client's bucket
is dropped even if not full, so memory stays bounded whatever clients claim to be.

Nothing here imports grpc; the interceptor that applies it to calls is `tensorgate.server.overload.interceptor`.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from tensorgate.server.batching.clock import Clock, MonotonicClock
from tensorgate.server.errors import ResourceExhaustedError

__all__ = ["DEFAULT_MAX_CLIENTS", "RateLimiter"]

#: Buckets kept at most (a bucket is two floats in a list, about 150 bytes with its key).
DEFAULT_MAX_CLIENTS = 10_000


class RateLimiter:
    """Token buckets by client key: `rate` requests per second each, `burst` at once (0: `rate`'s, at least 1).

    Used on the event loop only (no locks).
    """

    def __init__(
        self, rate: float, burst: int = 0, *, clock: Clock | None = None, max_clients: int = DEFAULT_MAX_CLIENTS
    ) -> None:
        if not rate > 0 or math.isinf(rate):
            raise ValueError(f"rate_limit must be a positive number of requests per second, got {rate}")
        if burst < 0:
            raise ValueError(f"rate_limit_burst must be >= 0, got {burst}")
        if max_clients < 1:
            raise ValueError(f"max_clients must be >= 1, got {max_clients}")
        self.rate = float(rate)
        self.burst = float(burst or max(1, math.ceil(rate)))
        self.max_clients = max_clients
        self._clock: Clock = clock if clock is not None else MonotonicClock()
        # A bucket left alone this long is full again: dropping it changes nothing.
        self._refill_time = self.burst / self.rate
        # key -> [tokens, when they were counted], least recently seen first.
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def acquire(self, key: str) -> float:
        """Take a token for client `key`: 0.0 when it had one, else the seconds until it will (nothing taken)."""
        now = self._clock.now()
        bucket = self._buckets.get(key)
        if bucket is None:
            self._make_room(now)
            bucket = self._buckets[key] = [self.burst, now]
            tokens = self.burst
        else:
            self._buckets.move_to_end(key)
            tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return 0.0
        bucket[0] = tokens
        return (1.0 - tokens) / self.rate

    def check(self, key: str) -> None:
        """Take a token for client `key`, or raise ResourceExhaustedError with the wait as its retry hint."""
        wait = self.acquire(key)
        if wait > 0.0:
            raise ResourceExhaustedError(
                f"rate limit: client {key!r} is over {self.rate:g} requests per second (burst {self.burst:g}); "
                f"retry in {wait:.3g} s",
                retry_after=wait,
            )

    def _make_room(self, now: float) -> None:
        buckets = self._buckets
        # Full-again buckets first (each is dropped once, so this is O(1) amortized), then the least recent.
        while buckets:
            oldest = next(iter(buckets.values()))
            if now - oldest[1] < self._refill_time:
                break
            buckets.popitem(last=False)
        while len(buckets) >= self.max_clients:
            buckets.popitem(last=False)
