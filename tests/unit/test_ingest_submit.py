"""The HTTP ingest's non-blocking hand-over to Kafka (issue 11, item 5): ``submit_batch`` returns
a future the delivery reports resolve, and the endpoint awaits it: a 202 only after every accepted
event is acknowledged, a 503 when one is not, the same per-event answers (duplicates within a
request and across requests) as the blocking path."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from confluent_kafka import KafkaError
from fastapi import FastAPI
from fastapi.testclient import TestClient

from deploy.settings import CommonSettings, IngestSettings
from ingest.http import EVENTS_PATH, build_ingest_router
from ingest.sdk import DeliveryError, InvalidEvent, UsageProducer, encoded_size, pack
from schemas import wire
from schemas.validation import kafka_time, now_ms
from tests.integration.test_http_request_rules import AUTH, Keys, Scopes, event
from tests.unit.test_sdk_batching import FakeKafka


class HeldKafka(FakeKafka):
    """Delivers only once ``release`` is set: a request must not be answered before that."""

    def __init__(self, fail: KafkaError | None = None) -> None:
        super().__init__(fail)
        self.release = threading.Event()

    def poll(self, timeout: float) -> int:
        if not self.release.is_set():
            return 0
        return super().poll(timeout)


def producer(fake: FakeKafka, **kwargs: Any) -> UsageProducer:
    return UsageProducer("unused:0", settings=CommonSettings(), topic="events", producer=fake, **kwargs)


def prepared(n: int, judged: int) -> list[dict[str, Any]]:
    from ingest.sdk import prepare_event

    return [prepare_event(event(f"e-{i}"), "acme", received_at=kafka_time(judged)) for i in range(n)]


def test_submit_batch_resolves_when_every_message_is_acknowledged() -> None:
    fake = HeldKafka()
    p = producer(fake, max_batch_events=3)
    judged = now_ms()
    future = p.submit_batch(prepared(7, judged), "acme", validated=True, judged_at_ms=judged)
    assert len(fake.messages) == 3  # cut and handed over at once: 3 + 3 + 1
    assert not future.done()
    fake.release.set()
    assert future.result(timeout=5) is None
    assert [m["timestamp"] for m in fake.messages] == [judged] * 3
    assert [e["id"] for m in fake.messages for e in wire.decode_value(m["value"])] == [
        f"e-{i}" for i in range(7)
    ]
    p.close(timeout=1)


def test_submit_batch_fails_with_the_ids_kafka_did_not_take() -> None:
    fake = FakeKafka(fail=KafkaError(KafkaError._MSG_TIMED_OUT))
    p = producer(fake)
    judged = now_ms()
    future = p.submit_batch(prepared(2, judged), "acme", validated=True, judged_at_ms=judged)
    with pytest.raises(DeliveryError) as failed:
        future.result(timeout=5)
    assert failed.value.failed_ids == ["e-0", "e-1"]
    # unvalidated input is judged first: nothing is handed over for an invalid event
    with pytest.raises(InvalidEvent):
        p.submit_batch([{**event("bad"), "type": "no.such"}], "acme")
    assert len(fake.messages) == 1


def test_pack_with_known_sizes_cuts_as_without() -> None:
    events = prepared(9, now_ms())
    sizes = [encoded_size(e) for e in events]
    limit = sum(sizes[:3]) + 4  # three events and their brackets and commas per message
    with_sizes = pack(events, "acme", max_bytes=limit, sizes=sizes)
    assert [b.ids for b in with_sizes] == [b.ids for b in pack(events, "acme", max_bytes=limit)]
    assert [len(b.events) for b in with_sizes] == [3, 3, 3]


def app_with(p: UsageProducer, delivery_timeout_s: float = 2.0) -> FastAPI:
    settings = IngestSettings(
        ingest_rate_limit_per_minute=100_000, ingest_delivery_timeout_s=delivery_timeout_s
    )
    app = FastAPI()
    app.include_router(build_ingest_router(lambda: p, Keys, settings, get_scopes=Scopes))
    return app


def test_the_endpoint_answers_202_after_the_acknowledgement_and_remembers_the_ids() -> None:
    fake = HeldKafka()
    p = producer(fake)
    answers: list[Any] = []
    with TestClient(app_with(p)) as http:
        first = threading.Thread(
            target=lambda: answers.append(
                http.post(EVENTS_PATH, json=[event("a"), event("b"), event("a")], headers=AUTH)
            )
        )
        first.start()
        first.join(timeout=0.5)
        assert first.is_alive() and not answers  # no answer before Kafka acknowledged
        fake.release.set()
        first.join(timeout=5)
        body = answers[0].json()
        assert answers[0].status_code == 202
        assert [r["status"] for r in body["results"]] == ["accepted", "accepted", "duplicate"]
        again = http.post(EVENTS_PATH, json=[event("b"), event("c")], headers=AUTH).json()
        assert [r["status"] for r in again["results"]] == ["duplicate", "accepted"]
    sent = [e["id"] for m in fake.messages for e in wire.decode_value(m["value"])]
    assert sent == ["a", "b", "c"]
    p.close(timeout=1)


def test_the_endpoint_answers_503_when_kafka_does_not_acknowledge() -> None:
    fake = HeldKafka()  # not released: no acknowledgement within the delivery timeout
    p = producer(fake)
    with TestClient(app_with(p, delivery_timeout_s=0.5)) as http:
        r = http.post(EVENTS_PATH, json=event("late"), headers=AUTH)
        assert r.status_code == 503 and r.json()["error"]["code"] == "kafka_unavailable"
        assert r.headers["Retry-After"] == "5"
        fake.release.set()
        # not remembered as delivered: the client's retry with the same id is accepted
        retry = http.post(EVENTS_PATH, json=event("late"), headers=AUTH).json()
        assert retry["results"][0]["status"] == "accepted"
    p.close(timeout=1)
