"""One client, two transports: ``MeteringClient`` over the Kafka producer (the client's
``KafkaProducer``, which the server uses as ``ingest.sdk.UsageProducer``; a fake librdkafka), and
``connect`` choosing the transport from a URL. The producer's wire format and guarantees agree
with the server's (schemas/wire.py, ingest/kafka_config.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from confluent_kafka import KafkaError

from deploy.settings import CommonSettings
from ingest import kafka_config, sdk
from metering_client import (
    DeliveryFailed,
    HttpTransport,
    KafkaTransport,
    MeteringClient,
    RejectCode,
    connect,
    kafka_producer,
)
from tests.unit.test_client import cpu_event
from tests.unit.test_sdk_batching import FakeKafka


class FailOnce(FakeKafka):
    """The first message is not acknowledged (a broker timeout); later ones are."""

    def poll(self, timeout: float) -> int:
        with self._lock:
            pending, self._pending = self._pending, []
        for cb in pending:
            err, self.fail = self.fail, None
            cb(err, None)
        return len(pending)


def kafka_client(fake: FakeKafka, tenant: str = "acme") -> MeteringClient:
    producer = sdk.UsageProducer(
        "unused:0", settings=CommonSettings(), topic="events", producer=fake, delivery_timeout_s=1.0
    )
    return MeteringClient(transport=KafkaTransport(producer, tenant), linger_s=5.0, sleep=lambda _s: None)


def test_the_client_over_kafka_produces_one_batch_keyed_by_tenant_judged_once() -> None:
    fake = FakeKafka()
    client = kafka_client(fake)
    client.emit(cpu_event(1))
    client.emit(cpu_event(2))
    client.emit({**cpu_event(3), "tenant": "globex"})  # not this producer's tenant
    with pytest.raises(DeliveryFailed) as raised:
        client.close()
    assert [(f.id, f.code) for f in raised.value.failures] == [("e-3", RejectCode.TENANT_MISMATCH)]
    [message] = fake.messages
    assert message["key"] == b"acme" and message["timestamp"] > 0
    events = json.loads(message["value"])
    assert [(e["id"], e["tenant"]) for e in events] == [("e-1", "acme"), ("e-2", "acme")]
    assert client.metrics.sent == 2


def test_a_batch_kafka_did_not_acknowledge_is_sent_again_with_the_same_ids() -> None:
    fake = FailOnce(fail=KafkaError(KafkaError._MSG_TIMED_OUT))
    client = kafka_client(fake)
    for i in range(5):
        client.emit(cpu_event(i))
    client.close()
    assert len(fake.messages) == 2
    first, second = (json.loads(m["value"]) for m in fake.messages)
    assert [e["id"] for e in first] == [e["id"] for e in second] == [f"e-{i}" for i in range(5)]
    assert client.metrics.sent == 5 and client.metrics.retried == 1


def test_connect_chooses_the_transport_from_the_url(monkeypatch: pytest.MonkeyPatch) -> None:
    client = connect("https://metering.example.com", api_key="fl_test_x")
    assert isinstance(client.transport, HttpTransport)
    client.close()

    made: dict[str, Any] = {}
    real = kafka_producer.KafkaProducer

    def fake_producer(bootstrap: str, *, topic: str | None = None) -> kafka_producer.KafkaProducer:
        made.update(bootstrap=bootstrap, topic=topic)
        return real(bootstrap, topic=topic, producer=FakeKafka())

    monkeypatch.setattr(kafka_producer, "KafkaProducer", fake_producer)
    client = connect("kafka://k1:9092,k2:9092?topic=metering.events", tenant="acme")
    assert isinstance(client.transport, KafkaTransport) and client.transport.tenant == "acme"
    assert made == {"bootstrap": "k1:9092,k2:9092", "topic": "metering.events"}
    client.close()

    with pytest.raises(ValueError, match="API key"):
        connect("http://x")
    with pytest.raises(ValueError, match="tenant"):
        connect("kafka://k1:9092")
    with pytest.raises(ValueError, match="unknown transport"):
        connect("ftp://x")


def test_the_client_producer_speaks_the_servers_wire_format_with_its_guarantees() -> None:
    from schemas import wire

    assert kafka_producer.MAX_MESSAGE_BYTES == wire.MAX_MESSAGE_BYTES
    assert kafka_producer.batch_headers(True) == wire.batch_headers(True)
    assert kafka_producer.batch_headers(False) == wire.batch_headers(False)
    settings = CommonSettings()
    assert settings.topic_events == kafka_producer.DEFAULT_TOPIC_EVENTS
    assert settings.topic_control == kafka_producer.DEFAULT_TOPIC_CONTROL
    server = kafka_config.producer_config(settings, "h:1", delivery_timeout_s=7)
    client = kafka_producer.producer_config("h:1", delivery_timeout_s=7)
    guarantees = [
        "enable.idempotence",
        "acks",
        "max.in.flight.requests.per.connection",
        "compression.type",
        "linger.ms",
        "message.max.bytes",
        "batch.size",
        "delivery.timeout.ms",
    ]
    assert {k: client[k] for k in guarantees} == {k: server[k] for k in guarantees}
    assert issubclass(sdk.UsageProducer, kafka_producer.KafkaProducer)
