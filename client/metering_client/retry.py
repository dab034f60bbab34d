"""When to send a request again: exponential backoff with full jitter, ``Retry-After`` first.

Retrying is always safe: an event keeps the id it was given when it was queued, and the pipeline
counts an id once per tenant, so an attempt that reached Kafka before its answer was lost is not
counted twice (the retry is answered ``duplicate`` or ``accepted``, never counted again).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


@dataclass(frozen=True)
class Backoff:
    """Delays between attempts of one request.

    Attempt ``n`` (1 for the first retry) waits a random time in ``[0, min(cap_s, base_s *
    2**(n-1))]`` ("full jitter": clients that failed together do not retry together). A
    ``Retry-After`` from the server is honoured: the wait is at least that, plus up to 10 %.
    A request is given up once ``max_retry_s`` have passed since its first attempt; its events
    are then reported ``delivery_failed``."""

    base_s: float = 0.2
    cap_s: float = 30.0
    max_retry_s: float = 300.0
    #: A ``Retry-After`` longer than this is taken as this (a misconfigured server must not park
    #: the client for hours).
    max_retry_after_s: float = 120.0

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        ceiling = min(self.cap_s, self.base_s * 2 ** max(attempt - 1, 0))
        jittered = rng.uniform(0.0, ceiling)
        if retry_after is None:
            return jittered
        wait = min(max(retry_after, 0.0), self.max_retry_after_s)
        return max(wait + rng.uniform(0.0, wait * 0.1), jittered)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delay-seconds or an HTTP date; None if
    absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - (now or datetime.now(UTC))).total_seconds(), 0.0)
