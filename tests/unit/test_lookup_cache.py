"""query_api/lookup_cache.py: a value is served only while younger than ttl_s (from when its load
began), reloaded in the background past refresh_after of its life, never on the caller's thread
while a young enough value is kept."""

from __future__ import annotations

import threading

from query_api.lookup_cache import MISS, LookupCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Source:
    """A loader that records which thread ran it and can be held back."""

    def __init__(self) -> None:
        self.value = "v1"
        self.calls: list[str] = []
        self.done = threading.Event()

    def __call__(self) -> str:
        self.calls.append(threading.current_thread().name)
        self.done.set()
        return self.value


def test_young_value_served_without_loading() -> None:
    clock, source = Clock(), Source()
    cache = LookupCache(2.0, clock=clock)
    assert cache.get("k", source) == "v1"
    source.value = "v2"
    clock.now += 0.9  # under refresh_after (half of 2 s): nothing reloads
    assert cache.get("k", source) == "v1"
    assert len(source.calls) == 1


def test_past_refresh_after_reloaded_in_background_then_served() -> None:
    clock, source = Clock(), Source()
    cache = LookupCache(2.0, clock=clock, name="test-refresh")
    cache.get("k", source)
    source.value, source.done = "v2", threading.Event()
    clock.now += 1.5  # past half its life, still younger than the ttl
    assert cache.get("k", source) == "v1"  # the kept value, at once
    assert source.done.wait(10), "no background reload"
    assert source.calls[1].startswith("test-refresh")  # not the caller's thread
    for _ in range(100):  # the reload keeps its value just after calling the loader
        if cache.peek("k", source) == "v2":
            break
        threading.Event().wait(0.01)
    assert cache.get("k", source) == "v2"
    clock.now += 0.9  # the reloaded value's age counts from its own load
    assert cache.get("k", source) == "v2"
    assert len(source.calls) == 2


def test_expired_value_never_served() -> None:
    clock, source = Clock(), Source()
    cache = LookupCache(2.0, clock=clock)
    cache.get("k", source)
    source.value = "v2"
    clock.now += 2.0  # exactly the ttl: too old
    assert cache.peek("k", source) is MISS
    assert cache.get("k", source) == "v2"
    assert source.calls == [threading.current_thread().name] * 2


def test_zero_ttl_always_loads() -> None:
    source = Source()
    cache = LookupCache(0.0)
    for value in ("a", "b", "c"):
        source.value = value
        assert cache.get("k", source) == value
    assert len(source.calls) == 3


def test_none_is_kept_and_keys_are_separate() -> None:
    clock = Clock()
    cache = LookupCache(2.0, clock=clock)
    assert cache.get(("t1", "x"), lambda: None) is None
    assert cache.get(("t1", "x"), lambda: "other") is None  # a miss is remembered as a miss
    assert cache.get(("t2", "x"), lambda: "t2's") == "t2's"  # another tenant's key: its own value


def test_older_load_never_replaces_newer() -> None:
    clock = Clock()
    cache = LookupCache(2.0, clock=clock)
    cache.get("k", lambda: "old")
    clock.now += 2.5
    began_early = clock.now
    assert cache.get("k", lambda: "new") == "new"  # loaded at began_early
    cache._keep("k", began_early - 1.0, "stale")  # a slower load that began earlier ends later
    assert cache.get("k", lambda: "x") == "new"
