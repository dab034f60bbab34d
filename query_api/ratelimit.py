"""Per-credential rate limit: a token bucket per key, in process memory.

A bucket holds ``per_minute`` tokens and refills continuously at ``per_minute / 60`` a second, so
a client may burst up to a minute's allowance and then proceeds at the steady rate. A refused
request learns how long to wait (``Retry-After``). The limiter is per process: with several query
processes behind a balancer the effective limit is per process, which the API docs say.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable


class RateLimiter:
    def __init__(
        self, per_minute: int, *, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000
    ) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be >= 1")
        self._capacity = float(per_minute)
        self._rate = per_minute / 60.0
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill time)
        self._lock = threading.Lock()

    def acquire(self, key: str) -> float | None:
        """Take one token for ``key``: None when allowed, else the seconds to wait."""
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(key, (self._capacity, now))
            tokens = min(self._capacity, tokens + (now - last) * self._rate)
            if tokens >= 1.0:
                self._store(key, tokens - 1.0, now)
                return None
            self._store(key, tokens, now)
            return (1.0 - tokens) / self._rate

    def _store(self, key: str, tokens: float, now: float) -> None:
        if key not in self._buckets and len(self._buckets) >= self._max_keys:
            # Forget buckets that have refilled completely: they hold no information.
            full_after = self._capacity / self._rate
            self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full_after}
            if len(self._buckets) >= self._max_keys:
                self._buckets.clear()
        self._buckets[key] = (tokens, now)


def retry_after_header(wait_s: float) -> str:
    """``Retry-After`` in whole seconds, at least 1."""
    return str(max(1, math.ceil(wait_s)))
