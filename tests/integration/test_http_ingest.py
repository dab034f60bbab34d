"""``POST /api/v1/events`` with a real producer, a real broker and API keys in the real
ClickHouse engine: what is answered, and what does (and does not) reach Kafka."""

from __future__ import annotations

import contextlib
import logging
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer
from fastapi import FastAPI
from fastapi.testclient import TestClient

from aggregators.direct import apply_events
from deploy.settings import IngestSettings
from ingest.http import (
    EVENTS_PATH,
    RecentIds,
    build_ingest_router,
    ingest_router,
    parse_body,
)
from ingest.scope import WORKSPACE_SCOPE, KeyScope, ScopeStore, build_tenant_scope
from ingest.sdk import DeliveryError, DeliveryFailure, UsageProducer, new_event
from query_api.credentials import CredentialStore, Principal, display_prefix, hash_secret, new_api_key
from schemas import wire
from schemas.events import EntityKind

needs_broker_and_clickhouse = [pytest.mark.kafka, pytest.mark.clickhouse]
TENANT = "acme"


# ---- pure parts -------------------------------------------------------------------------------


def test_recent_ids_are_bounded() -> None:
    recent = RecentIds(capacity=3)
    recent.add_all([("t", "1"), ("t", "2"), ("t", "3"), ("t", "4")])
    assert ("t", "1") not in recent
    assert ("t", "4") in recent and ("u", "4") not in recent


def test_parse_body_keeps_non_finite_numbers_for_per_event_rejection() -> None:
    assert parse_body(b'{"a": 1}') == {"a": 1}
    assert parse_body(b'{"a": 1e400}')["a"] == float("inf")
    value = parse_body(b'{"a": NaN}')["a"]
    assert value != value
    with pytest.raises(ValueError):
        parse_body(b"{nope")


class FakeStore:
    """Principals by raw key; ``broken`` simulates ClickHouse being unreachable."""

    def __init__(self, broken: bool = False) -> None:
        self.broken = broken

    def lookup(self, raw: str, kind: EntityKind) -> Principal | None:
        if self.broken:
            raise ConnectionError("clickhouse down")
        status = {"good": "active", "revoked": "revoked"}.get(raw)
        return Principal(TENANT, kind, raw, "workspace", "w1", "", "", status, None) if status else None


class FakeScopes:
    """Every key opens workspace w1, the one the test events report for."""

    def key_scope(self, principal: Principal) -> KeyScope:
        world = build_tenant_scope([(EntityKind.WORKSPACE.value, "w1", "", "", "", "")])
        return world.for_key(WORKSPACE_SCOPE, "w1", "")


class FakeSender:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.sent: list[list[dict[str, Any]]] = []

    def send_batch(self, events: Any, tenant: str, **_: Any) -> None:
        if self.error is not None:
            raise self.error
        self.sent.append(list(events))


def fake_app(sender: FakeSender, store: FakeStore | None = None) -> TestClient:
    app = FastAPI()
    app.include_router(
        build_ingest_router(
            lambda: sender, lambda: store or FakeStore(), IngestSettings(), get_scopes=FakeScopes
        )
    )
    return TestClient(app, raise_server_exceptions=False, headers={"Content-Type": "application/json"})


NESTED = b"[" * 5000 + b"]" * 5000
EVENT_HEAD = (
    b'{"specversion":"1.0","id":"x","source":"s","type":"egress.download","time":"2026-11-22T00:00:00Z",'
)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (NESTED, 400),
        (EVENT_HEAD + b'"data":' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}", 400),
        (b"[" + b"[" * 900 + b"]" * 900 + b"]", 202),
        (EVENT_HEAD + b'"data":{"workspace_id":"w","artifact_id":"a","bytes":' + b"9" * 30 + b"}}", 202),
        (EVENT_HEAD + b'"data":{"workspace_id":"w","artifact_id":"a","bytes":' + b"9" * 5000 + b"}}", 400),
        (b'{"id":"\\ud800","specversion":"1.0"}', 202),  # a lone surrogate
        (b'[{"id":5},{"id":["x"]},{"tenant":{"a":1}},{}]', 202),
        ('{"a":1}'.encode("utf-16"), 400),  # JSON is UTF-8 (test_http_request_rules.py)
        (b"NaN", 422),
        (b"", 400),
    ],
)
def test_no_malformed_body_gets_a_5xx(body: bytes, status: int) -> None:
    sender = FakeSender()
    r = fake_app(sender).post(EVENTS_PATH, content=body, headers={"Authorization": "Bearer good"})
    assert r.status_code == status, r.text
    if status == 202:
        assert r.json()["rejected"] == len(r.json()["results"]) >= 1
    assert sender.sent == []


def test_storage_failures_are_503_with_retry_after() -> None:
    body = orjson.dumps(event("e"))
    r = fake_app(FakeSender(), FakeStore(broken=True)).post(
        EVENTS_PATH, content=body, headers={"Authorization": "Bearer good"}
    )
    assert (r.status_code, r.json()["error"]["code"]) == (503, "credentials_unavailable")
    assert r.headers["Retry-After"] == "5"
    for error in (DeliveryError([DeliveryFailure(("e",), "boom")]), RuntimeError("no producer")):
        r = fake_app(FakeSender(error)).post(
            EVENTS_PATH, content=body, headers={"Authorization": "Bearer good"}
        )
        assert (r.status_code, r.json()["error"]["code"]) == (503, "kafka_unavailable")


def test_a_revoked_principal_is_401() -> None:
    r = fake_app(FakeSender()).post(
        EVENTS_PATH, content=orjson.dumps(event("e")), headers={"Authorization": "Bearer revoked"}
    )
    assert r.status_code == 401


# ---- the endpoint -----------------------------------------------------------------------------


def consume_ids(
    bootstrap: str, topic: str, expected: int, give_up_s: float = 60.0
) -> list[tuple[bytes, str]]:
    """(key, event id) of every event in ``topic`` once ``expected`` arrived (plus 1 s to catch
    extras). ``give_up_s`` only bounds a broken run."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4().hex}", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic])
    out: list[tuple[bytes, str]] = []
    deadline = time.monotonic() + give_up_s
    stop_at: float | None = None
    try:
        while time.monotonic() < deadline and (stop_at is None or time.monotonic() < stop_at):
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            assert msg.error() is None
            for event in wire.decode_value(msg.value() or b""):
                assert event["tenant"] == TENANT
                out.append((msg.key() or b"", event["id"]))
            if len(out) >= expected and stop_at is None:
                stop_at = time.monotonic() + 1.0
    finally:
        consumer.close()
    return out


def event(
    id_: str | None = None, at: datetime | None = None, type_: str = "render.completed", **data: Any
) -> dict[str, Any]:
    body = {"workspace_id": "w1", "render_id": "r1", "output_duration_seconds": 42.0} | data
    ev = new_event(type_, body, tenant=TENANT, source="test", time=at, id=id_ or str(uuid.uuid4()))
    del ev["tenant"]  # over HTTP the tenant comes from the key
    return ev


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Ingest:
    http: TestClient
    key: str
    bootstrap: str
    topic: str
    clickhouse: tuple[Any, str]
    producers: dict[str, UsageProducer] = field(default_factory=dict)

    def post(self, body: Any, key: str | None = None, raw: bytes | None = None) -> Any:
        return self.http.post(
            EVENTS_PATH,
            content=raw if raw is not None else orjson.dumps(body),
            headers={"Authorization": f"Bearer {key or self.key}", "Content-Type": "application/json"},
        )

    def received(self, expected: int) -> list[tuple[bytes, str]]:
        return consume_ids(self.bootstrap, self.topic, expected)


def create_key(clickhouse: tuple[Any, str], tenant: str = TENANT) -> tuple[str, str]:
    """A key of workspace w1 (created too: the events report for it, and a key reports only
    for its own workspaces)."""
    client, db = clickhouse
    raw = new_api_key(live=False)
    key_id = f"key-{uuid.uuid4().hex[:8]}"
    data = {
        "key_id": key_id,
        "key_hash": hash_secret(raw),
        "prefix": display_prefix(raw),
        "scope": "workspace",
        "workspace_id": "w1",
    }
    workspace = new_event(
        "workspace.created", {"workspace_id": "w1", "name": "W1"}, tenant=tenant, source="test"
    )
    lifecycle = new_event("api_key.created", data, tenant=tenant, source="test")
    apply_events(client, db, [workspace, lifecycle])
    return raw, key_id


@pytest.fixture
def make_ingest(
    kafka_bootstrap: str, topic: str, clickhouse: tuple[Any, str]
) -> Iterator[Callable[..., Ingest]]:
    made: list[Ingest] = []

    def make(failed_auth_per_minute: int = 60, **settings: Any) -> Ingest:
        s = IngestSettings(
            **{"ingest_rate_limit_per_minute": 1000, "ingest_delivery_timeout_s": 20.0} | settings
        )
        client, db = clickhouse
        store = CredentialStore(client, db, ttl_s=0)  # no cache: a revocation counts at once
        scopes = ScopeStore(client, db, ttl_s=0)
        raw, _ = create_key(clickhouse)
        producers = {"current": UsageProducer(kafka_bootstrap, topic=topic, delivery_timeout_s=20.0)}
        app = FastAPI()
        router = build_ingest_router(
            lambda: producers["current"],
            lambda: store,
            s,
            get_scopes=lambda: scopes,
            failed_auth_per_minute=failed_auth_per_minute,
        )
        app.include_router(router)
        harness = Ingest(TestClient(app), raw, kafka_bootstrap, topic, clickhouse, producers)
        made.append(harness)
        return harness

    yield make
    for h in made:
        h.http.close()
        for p in h.producers.values():
            with contextlib.suppress(Exception):  # the deliberately broken producer fails to flush
                p.close(timeout=5)


@pytest.mark.kafka
@pytest.mark.clickhouse
def test_one_event_is_accepted_after_it_reached_kafka(make_ingest: Callable[..., Ingest]) -> None:
    ingest = make_ingest()
    r = ingest.post(event("e-1"))
    assert r.status_code == 202, r.text
    assert r.json() == {
        "results": [{"index": 0, "id": "e-1", "status": "accepted"}],
        "accepted": 1,
        "duplicates": 0,
        "rejected": 0,
    }
    assert ingest.received(1) == [(TENANT.encode(), "e-1")]


@pytest.mark.kafka
@pytest.mark.clickhouse
def test_each_event_gets_its_verdict(make_ingest: Callable[..., Ingest]) -> None:
    ingest = make_ingest()
    now = datetime.now(UTC)
    items = [
        event("ok-1"),
        event("ok-1"),  # same id again in the request
        event("nan", output_duration_seconds="@NAN@"),
        event("huge", output_duration_seconds="@HUGE@"),
        event("unknown", type_="render.started"),
        event("old", at=now - timedelta(days=36)),
        event("future", at=now + timedelta(minutes=10)),
        event("big", render_id="r" * 40_000),
        event("mismatch") | {"tenant": "globex"},
        event("same-tenant") | {"tenant": TENANT},
        5,
        event("negative", output_duration_seconds=-1),
        event("ok-2"),
    ]
    body = orjson.dumps(items).replace(b'"@NAN@"', b"NaN").replace(b'"@HUGE@"', b"1e400")
    r = ingest.post(None, raw=body)
    assert r.status_code == 202, r.text
    out = r.json()
    verdicts = [(x["index"], x["id"], x["status"], x.get("code")) for x in out["results"]]
    assert verdicts == [
        (0, "ok-1", "accepted", None),
        (1, "ok-1", "duplicate", None),
        (2, "nan", "rejected", "invalid_event"),
        (3, "huge", "rejected", "invalid_event"),
        (4, "unknown", "rejected", "unknown_type"),
        (5, "old", "rejected", "event_too_old"),
        (6, "future", "rejected", "event_in_future"),
        (7, "big", "rejected", "event_too_large"),
        (8, "mismatch", "rejected", "tenant_mismatch"),
        (9, "same-tenant", "accepted", None),
        (10, None, "rejected", "invalid_event"),
        (11, "negative", "rejected", "invalid_event"),
        (12, "ok-2", "accepted", None),
    ]
    assert (out["accepted"], out["duplicates"], out["rejected"]) == (3, 1, 9)
    assert all(x["message"] for x in out["results"] if x["status"] == "rejected")
    assert "data.output_duration_seconds" in out["results"][2]["message"]
    assert sorted(i for _, i in ingest.received(3)) == ["ok-1", "ok-2", "same-tenant"]


@pytest.mark.kafka
@pytest.mark.clickhouse
def test_a_retried_event_is_a_duplicate_and_sent_once(make_ingest: Callable[..., Ingest]) -> None:
    ingest = make_ingest()
    first = ingest.post([event("retry-me")])
    again = ingest.post([event("retry-me"), event("fresh")])
    assert first.json()["accepted"] == 1
    assert [x["status"] for x in again.json()["results"]] == ["duplicate", "accepted"]
    assert sorted(i for _, i in ingest.received(2)) == ["fresh", "retry-me"]


@pytest.mark.kafka
@pytest.mark.clickhouse
def test_authentication(make_ingest: Callable[..., Ingest], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    ingest = make_ingest()
    body = orjson.dumps(event("x"))
    for headers in ({}, {"Authorization": f"Basic {ingest.key}"}, {"Authorization": "Bearer fl_test_nope"}):
        r = ingest.http.post(EVENTS_PATH, content=body, headers=headers)
        assert r.status_code == 401
        assert r.headers["WWW-Authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "unauthorized"
    # a revoked key stops working
    client, db = ingest.clickhouse
    other, key_id = create_key(ingest.clickhouse)
    assert ingest.post(event("before-revoke"), key=other).status_code == 202
    apply_events(client, db, [new_event("api_key.revoked", {"key_id": key_id}, tenant=TENANT, source="test")])
    assert ingest.post(event("after-revoke"), key=other).status_code == 401
    assert ingest.key not in caplog.text and other not in caplog.text


@pytest.mark.kafka
@pytest.mark.clickhouse
def test_guessing_keys_is_throttled(make_ingest: Callable[..., Ingest]) -> None:
    ingest = make_ingest(failed_auth_per_minute=2)
    codes = [ingest.post(event(), key=f"fl_live_guess{i}").status_code for i in range(3)]
    assert codes == [401, 401, 429]
    assert ingest.post(event("real")).status_code == 202  # a valid key is not locked out


@pytest.mark.kafka
@pytest.mark.clickhouse
def test_malformed_requests_are_4xx_and_send_nothing(make_ingest: Callable[..., Ingest]) -> None:
    ingest = make_ingest()
    cases: list[tuple[bytes, int, str]] = [
        (b"{not json", 400, "invalid_json"),
        (b"\xff\xfe", 400, "invalid_encoding"),
        (b"42", 422, "invalid_body"),
        (b'"an event"', 422, "invalid_body"),
        (b"null", 422, "invalid_body"),
        (b"[]", 422, "empty_batch"),
        (orjson.dumps([event() for _ in range(101)]), 413, "too_many_events"),
        (b"[" + b" " * (1024 * 1024) + b"]", 413, "payload_too_large"),
    ]
    for raw, status, code in cases:
        r = ingest.post(None, raw=raw)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), raw[:20]
        assert set(r.json()["error"]) == {"code", "message", "details"}
    # without Content-Length (chunked), the limit holds while reading
    chunks = (b" " * 65536 for _ in range(20))
    headers = {"Authorization": f"Bearer {ingest.key}", "Content-Type": "application/json"}
    r = ingest.http.post(EVENTS_PATH, content=chunks, headers=headers)
    assert (r.status_code, r.json()["error"]["code"]) == (413, "payload_too_large")
    # nothing of the above reached Kafka: the sentinel is all there is
    assert ingest.post(event("sentinel")).status_code == 202
    assert [i for _, i in ingest.received(1)] == ["sentinel"]


@pytest.mark.kafka
@pytest.mark.clickhouse
def test_rate_limit_per_key(make_ingest: Callable[..., Ingest]) -> None:
    ingest = make_ingest(ingest_rate_limit_per_minute=3)
    codes = [ingest.post(None, raw=b"[]").status_code for _ in range(3)]
    assert codes == [422, 422, 422]  # counted, then rejected for their body
    r = ingest.post(event("one-too-many"))
    assert r.status_code == 429
    assert int(r.headers["Retry-After"]) >= 1
    assert r.json()["error"]["code"] == "rate_limited"


@pytest.mark.kafka
@pytest.mark.clickhouse
def test_kafka_outage_is_503_and_the_retry_is_not_a_duplicate(
    make_ingest: Callable[..., Ingest], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ingest = make_ingest()
    working = ingest.producers["current"]
    ingest.producers["down"] = UsageProducer(
        f"127.0.0.1:{closed_port()}", topic=ingest.topic, delivery_timeout_s=1.0
    )
    ingest.producers["current"] = ingest.producers["down"]
    r = ingest.post([event("during-outage")])
    assert r.status_code == 503
    assert r.headers["Retry-After"] == "5"
    assert r.json()["error"]["code"] == "kafka_unavailable"
    # the broker is back: the client's retry with the same id is accepted, not a "duplicate"
    ingest.producers["current"] = working
    retry = ingest.post([event("during-outage")])
    assert retry.status_code == 202
    assert retry.json()["results"][0]["status"] == "accepted"
    assert [i for _, i in ingest.received(1)] == ["during-outage"]
    assert ingest.key not in caplog.text


@pytest.mark.kafka
@pytest.mark.clickhouse
def test_ingest_router_wires_a_process(kafka_bootstrap: str, topic: str, clickhouse: tuple[Any, str]) -> None:
    client, db = clickhouse
    raw, _ = create_key(clickhouse)
    settings = IngestSettings(topic_events=topic, clickhouse_database=db, ingest_delivery_timeout_s=20)
    router, producer = ingest_router(settings, client, kafka_bootstrap)
    app = FastAPI()
    app.include_router(router)
    try:
        r = TestClient(app).post(
            EVENTS_PATH,
            content=orjson.dumps(event("wired")),
            headers={"Authorization": f"Bearer {raw}", "Content-Type": "application/json"},
        )
        assert r.status_code == 202 and r.json()["accepted"] == 1
    finally:
        producer.close()
    assert consume_ids(kafka_bootstrap, topic, 1) == [(TENANT.encode(), "wired")]
