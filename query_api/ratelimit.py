"""Rate limits per credential (and per client address for failed authentications), for the
ingest and the query API alike, built on the ``limits`` library.

Each limit allows ``per_minute`` requests per key in any 60 seconds, exactly: ``limits``' moving
window, which remembers when each of the last ``per_minute`` requests was made. A client may
send a minute's allowance at once and then waits until the oldest of them is a minute old; a
refused request learns how long that is (``Retry-After``). (The cheaper window *counters*
approximate: near a minute's boundary they admit a request or two more, which a small limit on
failed authentications must not.) Memory is one timestamp per request of the last minute of
each active key.

Where the counts live is the storage URI (``METERING_RATE_LIMIT_STORAGE``): ``memory://`` (the
default) keeps them in this process, so with several processes behind a balancer each allows the
full limit; ``redis://host:6379/0`` (or ``rediss://``, ``redis+sentinel://``, ``redis+cluster://``)
keeps them in Redis, so all the processes using it share one limit (deploy/README.md, "Rate
limits"). Counts in Redis expire by themselves a minute after the last request.

When the shared storage cannot be reached, requests are *admitted*: refusing every request (or
answering 500) because Redis is down would turn a limiter outage into an ingest outage, and
usage must keep flowing. ``metering_rate_limit_storage_errors_total`` counts those requests and
the log says so (at most every 30 s). Redis calls are bounded by short socket timeouts, and
after a failure the storage is left alone for ``RETRY_STORAGE_AFTER_S`` (requests are admitted
meanwhile), so an unreachable Redis costs one timeout per few seconds, not one per request.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Final

from limits import RateLimitItemPerMinute
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter
from prometheus_client import Counter

log = logging.getLogger(__name__)

MEMORY: Final = "memory://"
STORAGE_SCHEMES: Final = ("memory", "redis", "rediss", "redis+unix", "redis+sentinel", "redis+cluster")
REDIS_TIMEOUT_S: Final = 0.5  # connect and per-call: a request never waits long on the limiter
RETRY_STORAGE_AFTER_S: Final = 5.0
_LOG_EVERY_S: Final = 30.0

STORAGE_ERRORS = Counter(
    "metering_rate_limit_storage_errors_total",
    "Requests admitted without a rate-limit check because the limit's storage failed",
    ["limit"],
)


def storage_scheme(uri: str) -> str:
    """The URI's scheme if ``limits`` can use it here, else ValueError."""
    scheme = uri.partition("://")[0].lower()
    if "://" not in uri or scheme not in STORAGE_SCHEMES:
        raise ValueError(
            f"rate-limit storage must start with one of {', '.join(s + '://' for s in STORAGE_SCHEMES)}"
        )
    return scheme


class RateLimiter:
    """``per_minute`` requests per key. ``name`` tells this limit's counts from other limits' in a
    shared storage (``ingest``, ``query``, ``query-auth-failures``...)."""

    def __init__(self, per_minute: int, *, storage: str = MEMORY, name: str = "requests") -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be >= 1")
        scheme = storage_scheme(storage)
        options: dict[str, float | str | bool] = {"wrap_exceptions": True}
        if scheme != "memory":
            options |= {"socket_timeout": REDIS_TIMEOUT_S, "socket_connect_timeout": REDIS_TIMEOUT_S}
        # memory://: a storage of this limiter's own (two apps in one process never share counts)
        self._storage = storage_from_string(storage, **options)
        #: counts kept in this process: ``acquire`` does no I/O (it may run on the event loop)
        self.in_memory = scheme == "memory"
        self._limiter = MovingWindowRateLimiter(self._storage)
        self._item = RateLimitItemPerMinute(per_minute)
        self._name = name
        self.per_minute = per_minute
        self._logged_at = -math.inf
        self._down_until = -math.inf  # monotonic: the storage failed; admit until then
        self._log_lock = threading.Lock()

    def acquire(self, key: str) -> float | None:
        """Count one request for ``key``: None when allowed, else the seconds to wait."""
        if time.monotonic() < self._down_until:
            STORAGE_ERRORS.labels(self._name).inc()
            return None
        try:
            if self._limiter.hit(self._item, self._name, key):
                return None
            reset_at = self._limiter.get_window_stats(self._item, self._name, key).reset_time
        except Exception as exc:  # the shared storage is unreachable: admit (module doc)
            self._storage_failed(exc)
            return None
        return max(0.0, reset_at - time.time())

    def _storage_failed(self, exc: Exception) -> None:
        STORAGE_ERRORS.labels(self._name).inc()
        now = time.monotonic()
        self._down_until = now + RETRY_STORAGE_AFTER_S
        with self._log_lock:
            if now - self._logged_at < _LOG_EVERY_S:
                return
            self._logged_at = now
        log.warning(
            "rate limit %s: storage unreachable (%s: %s); requests are admitted unchecked until it answers",
            self._name,
            type(exc).__name__,
            str(exc)[:200],
        )


def retry_after_header(wait_s: float) -> str:
    """``Retry-After`` in whole seconds, at least 1."""
    return str(max(1, math.ceil(wait_s)))
