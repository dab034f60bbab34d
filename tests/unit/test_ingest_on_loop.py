"""Where the HTTP ingest judges a request (ingest/http.py, ``on_loop``): on the event loop when
nothing of it can block (the key's scope kept, the producer's queue far from full, a request of
at most ``ON_LOOP_MAX_EVENTS``), else in the thread pool; the answers are the same either way."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from fastapi import FastAPI
from fastapi.testclient import TestClient

from deploy.settings import CommonSettings, IngestSettings
from ingest.http import EVENTS_PATH, ON_LOOP_MAX_EVENTS, ON_LOOP_MAX_PENDING, build_ingest_router
from ingest.scope import KeyScope
from ingest.sdk import UsageProducer
from query_api.credentials import Principal
from schemas import wire
from tests.integration.test_http_request_rules import AUTH, Keys, Scopes, event
from tests.unit.test_sdk_batching import FakeKafka


class KeptScopes(Scopes):
    """A store that has the key's scope kept: ``key_scope`` (a read) is never needed."""

    reads: ClassVar[list[str]] = []

    def cached_key_scope(self, principal: Principal) -> KeyScope | None:
        return Scopes.key_scope(self, principal)

    def key_scope(self, principal: Principal) -> KeyScope:
        KeptScopes.reads.append(principal.tenant)
        return Scopes.key_scope(self, principal)


class ColdScopes(KeptScopes):
    """Nothing kept yet: the scope must be read (blocking), so not on the loop."""

    def cached_key_scope(self, principal: Principal) -> KeyScope | None:
        return None


class Where(UsageProducer):
    """Records whether each hand-over ran on an event loop's thread (a running loop there) or in
    a worker thread (none)."""

    def __init__(self, fake: FakeKafka, pending: int | None = None) -> None:
        UsageProducer.__init__(self, "unused:0", settings=CommonSettings(), topic="events", producer=fake)
        self.on_loop: list[bool] = []
        self._pending_override = pending

    @property
    def pending(self) -> int:
        return self._pending_override if self._pending_override is not None else super().pending

    def submit_batch(self, *args: Any, **kwargs: Any) -> Any:
        try:
            asyncio.get_running_loop()
            self.on_loop.append(True)
        except RuntimeError:
            self.on_loop.append(False)
        return super().submit_batch(*args, **kwargs)


def _post(p: UsageProducer, scopes: type[Scopes], events: list[dict[str, Any]], max_events: int = 100) -> Any:
    settings = IngestSettings(ingest_rate_limit_per_minute=100_000, ingest_max_events_per_request=max_events)
    app = FastAPI()
    app.include_router(build_ingest_router(lambda: p, Keys, settings, get_scopes=scopes))
    with TestClient(app) as http:
        return http.post(EVENTS_PATH, json=events, headers=AUTH)


def _run(
    scopes: type[Scopes], n: int = 3, pending: int | None = None, max_events: int = 100
) -> tuple[Any, Where, FakeKafka]:
    KeptScopes.reads = []
    fake = FakeKafka()
    p = Where(fake, pending)
    try:
        answer = _post(p, scopes, [event(f"e-{i}") for i in range(n)], max_events)
    finally:
        p.close(timeout=1)
    return answer, p, fake


def _sent(fake: FakeKafka) -> list[str]:
    return [e["id"] for m in fake.messages for e in wire.decode_value(m["value"])]


def test_a_request_whose_scope_is_kept_is_judged_on_the_loop() -> None:
    answer, p, fake = _run(KeptScopes)
    assert answer.status_code == 202 and answer.json()["accepted"] == 3
    assert p.on_loop == [True]
    assert KeptScopes.reads == []  # the kept scope, no read
    assert _sent(fake) == ["e-0", "e-1", "e-2"]


def test_a_scope_to_read_sends_the_request_to_the_pool() -> None:
    answer, p, fake = _run(ColdScopes)
    assert answer.status_code == 202 and answer.json()["accepted"] == 3
    assert p.on_loop == [False]
    assert KeptScopes.reads == ["acme"]  # read, in the pool
    assert _sent(fake) == ["e-0", "e-1", "e-2"]


def test_a_store_without_a_kept_scope_lookup_sends_the_request_to_the_pool() -> None:
    answer, p, _ = _run(Scopes)
    assert answer.status_code == 202 and p.on_loop == [False]


def test_a_producer_with_a_long_queue_sends_the_request_to_the_pool() -> None:
    answer, p, _ = _run(KeptScopes, pending=ON_LOOP_MAX_PENDING + 1)
    assert answer.status_code == 202 and p.on_loop == [False]
    answer, p, _ = _run(KeptScopes, pending=ON_LOOP_MAX_PENDING)
    assert answer.status_code == 202 and p.on_loop == [True]


class BrokenScopes(KeptScopes):
    """Its kept-scope lookup fails: the request is judged in the pool, where failures are answered."""

    def cached_key_scope(self, principal: Principal) -> KeyScope | None:
        raise RuntimeError("the cache is broken")


def test_a_failing_kept_scope_lookup_sends_the_request_to_the_pool() -> None:
    answer, p, _ = _run(BrokenScopes)
    assert answer.status_code == 202 and p.on_loop == [False]


def test_a_request_larger_than_the_loops_share_goes_to_the_pool() -> None:
    answer, p, fake = _run(KeptScopes, n=ON_LOOP_MAX_EVENTS + 1, max_events=ON_LOOP_MAX_EVENTS + 1)
    assert answer.status_code == 202 and answer.json()["accepted"] == ON_LOOP_MAX_EVENTS + 1
    assert all(where is False for where in p.on_loop) and p.on_loop
    assert len(_sent(fake)) == ON_LOOP_MAX_EVENTS + 1
    answer, p, _ = _run(KeptScopes, n=ON_LOOP_MAX_EVENTS, max_events=ON_LOOP_MAX_EVENTS + 1)
    assert p.on_loop == [True]


def test_the_answers_are_the_same_on_the_loop_and_in_the_pool() -> None:
    events = [event("a"), event("b"), event("a"), {**event("c"), "type": "no.such"}, {"id": "d"}]
    answers = {}
    for scopes in (KeptScopes, ColdScopes):
        KeptScopes.reads = []
        fake = FakeKafka()
        p = Where(fake)
        try:
            answers[scopes.__name__] = (_post(p, scopes, events).json(), p.on_loop, _sent(fake))
        finally:
            p.close(timeout=1)
    (on_loop, loop_where, loop_sent), (in_pool, pool_where, pool_sent) = answers.values()
    assert loop_where == [True] and pool_where == [False]
    assert on_loop == in_pool
    assert [r["status"] for r in on_loop["results"]] == [
        "accepted",
        "accepted",
        "duplicate",
        "rejected",
        "rejected",
    ]
    assert loop_sent == pool_sent == ["a", "b"]
