"""Short-lived lookups (credentials, entities, freshness): kept ``ttl_s`` seconds, reloaded ahead.

A value is served only while it is younger than ``ttl_s``, its age counted from the moment its
load *began*: a revocation or any other change reaches every request within ``ttl_s``, as with a
plain TTL cache. What differs is who waits for the reload: once a value has lived
``refresh_after`` of its life, the next request still gets it (it is younger than ``ttl_s``) and
one background thread reloads it. A caller that keeps asking never runs the lookup statement on
its own request; a key nobody asks for again is not reloaded and expires.

Why (issue 11, item 6): under ingest a request that also ran its credential, entity and freshness
lookups (every ``ttl_s``, per credential) ran two to four statements instead of one, each waiting
for a core, and made most of the slow tail (docs/performance.md, "Queries while ingesting").

Only lookups go here; usage is never cached.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from cachetools import TTLCache

T = TypeVar("T")

log = logging.getLogger(__name__)

#: What ``peek`` answers when it has no value young enough.
MISS: Any = object()


class LookupCache:
    """Values loaded by ``get(key, load)``; ``ttl_s <= 0`` keeps nothing (every call loads)."""

    def __init__(
        self,
        ttl_s: float,
        *,
        max_items: int = 50_000,
        refresh_after: float = 0.5,
        name: str = "lookup-refresh",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._ttl = ttl_s
        self._refresh_at = ttl_s * refresh_after
        # (load began, value); cachetools bounds the size and drops what has expired
        self._items: TTLCache[Hashable, tuple[float, Any]] | None = (
            TTLCache(maxsize=max_items, ttl=ttl_s, timer=clock) if ttl_s > 0 else None
        )
        self._lock = threading.Lock()
        self._reloading: set[Hashable] = set()
        self._name = name
        self._pool: ThreadPoolExecutor | None = None

    def get(self, key: Hashable, load: Callable[[], T]) -> T:
        """The value of ``key``: the kept one while it is young enough, else ``load()``'s."""
        kept = self.peek(key, load)
        if kept is not MISS:
            return kept  # type: ignore[no-any-return]
        began = self._clock()
        value = load()
        self._keep(key, began, value)
        return value

    def peek(self, key: Hashable, load: Callable[[], Any]) -> Any:
        """The kept value of ``key`` if it is younger than ``ttl_s`` (a reload by ``load`` is
        started in the background when it is past ``refresh_after`` of its life), else ``MISS``.
        Never runs ``load`` on the calling thread."""
        if self._items is None:
            return MISS
        with self._lock:
            hit = self._items.get(key)
        if hit is None:
            return MISS
        began, value = hit
        age = self._clock() - began
        if age >= self._ttl:
            return MISS
        if age >= self._refresh_at:
            self._reload(key, load)
        return value

    def clear(self) -> None:
        with self._lock:
            if self._items is not None:
                self._items.clear()

    def _keep(self, key: Hashable, began: float, value: Any) -> None:
        if self._items is None:
            return
        with self._lock:
            kept = self._items.get(key)
            if kept is None or kept[0] < began:  # never replace a newer load with an older one
                self._items[key] = (began, value)

    def _reload(self, key: Hashable, load: Callable[[], Any]) -> None:
        with self._lock:
            if key in self._reloading:
                return
            self._reloading.add(key)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
            pool = self._pool

        def reload() -> None:
            try:
                began = self._clock()
                self._keep(key, began, load())
            except Exception as exc:
                # the kept value expires as usual; the request that then loads it sees the error
                log.debug("background reload of a lookup failed: %s", type(exc).__name__)
            finally:
                with self._lock:
                    self._reloading.discard(key)

        try:
            pool.submit(reload)
        except RuntimeError:  # the interpreter is shutting down
            with self._lock:
                self._reloading.discard(key)
