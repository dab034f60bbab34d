"""The SDK's pure parts and its batching, with a fake Kafka client (no broker)."""

from __future__ import annotations

import itertools
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from confluent_kafka import KafkaError

from deploy.settings import CommonSettings
from ingest.kafka_config import (
    BROKER_DEFAULT_MESSAGE_MAX_BYTES,
    PRODUCER_MESSAGE_MAX_BYTES,
    producer_config,
    resolve_bootstrap,
)
from ingest.sdk import (
    Batcher,
    DeliveryError,
    InvalidEvent,
    ProducerClosed,
    UsageProducer,
    encoded_size,
    format_time,
    new_event,
    pack,
    prepare_event,
)
from schemas import wire
from schemas.events import Event
from schemas.validation import RejectCode

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def cpu_event(
    i: int = 0, tenant: str | None = "acme", at: datetime | None = None, **extra: Any
) -> dict[str, Any]:
    event = new_event(
        "ci.step.cpu",
        {"contract_id": "c1", "workspace_id": "w1", "step_id": f"step-{i % 3}", "cpu_seconds": 1.5},
        tenant=tenant or "",
        source="test",
        time=at or datetime.now(UTC),
        id=f"e-{i}",
    )
    if tenant is None:
        del event["tenant"]
    event.update(extra)
    return event


# ---- prepare_event ----------------------------------------------------------------------------


def test_prepare_sets_tenant_and_subject_and_normalizes() -> None:
    event = cpu_event(tenant=None, at=NOW)
    out = prepare_event(event, "acme", received_at=NOW)
    assert out["tenant"] == "acme"
    assert out["subject"] == "step-0"
    assert out["data"]["cpu_seconds"] == 1.5
    assert Event.model_validate(out).tenant == "acme"
    assert "tenant" not in event  # the caller's dict is not changed


def test_prepare_accepts_an_event_model() -> None:
    model = Event.model_validate(cpu_event(tenant=None, at=NOW))
    assert prepare_event(model, "acme", received_at=NOW)["tenant"] == "acme"
    with pytest.raises(InvalidEvent) as exc:
        prepare_event(model.model_copy(update={"tenant": "other"}), "acme", received_at=NOW)
    assert exc.value.code == RejectCode.TENANT_MISMATCH


def test_prepare_rejects_tenant_mismatch() -> None:
    with pytest.raises(InvalidEvent) as exc:
        prepare_event(cpu_event(tenant="globex", at=NOW), "acme", received_at=NOW)
    assert exc.value.code == RejectCode.TENANT_MISMATCH
    assert exc.value.event_id == "e-0"


def test_prepare_rejects_unknown_type_with_short_message() -> None:
    with pytest.raises(InvalidEvent) as exc:
        prepare_event(cpu_event(at=NOW, type="ci.step.gpu"), "acme", received_at=NOW)
    assert exc.value.code == RejectCode.UNKNOWN_TYPE
    assert "ci.step.gpu" in exc.value.message
    assert len(exc.value.message) < 100


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, "lots"])
def test_prepare_rejects_bad_numbers_naming_the_data_field(bad: Any) -> None:
    event = cpu_event(at=NOW)
    event["data"]["cpu_seconds"] = bad
    with pytest.raises(InvalidEvent) as exc:
        prepare_event(event, "acme", received_at=NOW)
    assert exc.value.code == RejectCode.INVALID_EVENT
    assert "data.cpu_seconds" in exc.value.message


def test_prepare_reports_envelope_errors() -> None:
    event = cpu_event(at=NOW)
    del event["source"]
    with pytest.raises(InvalidEvent) as exc:
        prepare_event(event, "acme", received_at=NOW)
    assert exc.value.message.startswith("source:")
    with pytest.raises(InvalidEvent) as exc:
        prepare_event(cpu_event(at=NOW, subject="not-the-step"), "acme", received_at=NOW)
    assert "subject must be" in exc.value.message


def test_prepare_checks_the_time_window() -> None:
    old = cpu_event(at=NOW - timedelta(days=36))
    with pytest.raises(InvalidEvent) as exc:
        prepare_event(old, "acme", received_at=NOW)
    assert exc.value.code == RejectCode.TOO_OLD
    assert prepare_event(old, "acme", received_at=NOW, backfill=True)["id"] == "e-0"
    future = cpu_event(at=NOW + timedelta(minutes=6))
    for backfill in (False, True):
        with pytest.raises(InvalidEvent) as exc:
            prepare_event(future, "acme", received_at=NOW, backfill=backfill)
        assert exc.value.code == RejectCode.IN_FUTURE


def test_prepare_rejects_missing_tenant_and_non_objects() -> None:
    with pytest.raises(InvalidEvent) as exc:
        prepare_event(cpu_event(tenant=None, at=NOW), "", received_at=NOW)
    assert exc.value.code == RejectCode.MISSING_TENANT
    with pytest.raises(InvalidEvent) as exc:
        prepare_event([1, 2], "acme", received_at=NOW)  # type: ignore[arg-type]
    assert exc.value.code == RejectCode.INVALID_EVENT


def test_format_time_is_utc_with_z() -> None:
    assert format_time(datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)) == "2026-01-02T03:04:05.678Z"
    with pytest.raises(ValueError):
        format_time(datetime(2026, 1, 2))


# ---- Batcher ----------------------------------------------------------------------------------


def test_batcher_keeps_tenants_apart_and_cuts_at_max_events() -> None:
    b = Batcher(max_events=3, linger_s=10)
    closed = []
    for i in range(7):
        for tenant in ("a", "b"):
            ev = {"id": f"{tenant}{i}"}
            closed += b.add(tenant, ev, encoded_size(ev), backfill=False, now=0.0)
    assert [(x.tenant, x.ids) for x in closed] == [
        ("a", ("a0", "a1", "a2")),
        ("b", ("b0", "b1", "b2")),
        ("a", ("a3", "a4", "a5")),
        ("b", ("b3", "b4", "b5")),
    ]
    rest = b.drain()
    assert sorted((x.tenant, x.ids) for x in rest) == [("a", ("a6",)), ("b", ("b6",))]
    assert b.pending_events == 0


def test_batcher_cuts_by_bytes_and_size_is_exact() -> None:
    events = [{"id": f"e{i}", "pad": "x" * 100} for i in range(50)]
    batches = pack(events, "acme", max_events=1000, max_bytes=1000)
    assert len(batches) > 1
    assert [e for b in batches for e in b.events] == events  # order kept, nothing lost
    for b in batches:
        encoded = b.encode()
        assert encoded == wire.encode_batch(b.events)
        assert len(encoded) == b.size <= 1000
    # each batch was cut because the next event would not fit
    for b, nxt in itertools.pairwise(batches):
        assert b.size + 1 + encoded_size(nxt.events[0]) > 1000


def test_batcher_cuts_when_backfill_changes() -> None:
    b = Batcher(max_events=10, linger_s=10)
    assert b.add("a", {"id": "1"}, 10, backfill=False, now=0) == []
    closed = b.add("a", {"id": "2"}, 10, backfill=True, now=0)
    assert [(x.ids, x.backfill) for x in closed] == [(("1",), False)]
    assert [(x.ids, x.backfill) for x in b.drain()] == [(("2",), True)]


def test_batcher_due_after_linger() -> None:
    b = Batcher(max_events=10, linger_s=0.5)
    b.add("a", {"id": "1"}, 10, backfill=False, now=100.0)
    b.add("b", {"id": "2"}, 10, backfill=False, now=100.4)
    assert b.due(100.3) == []
    assert [x.tenant for x in b.due(100.5)] == ["a"]
    assert [x.tenant for x in b.due(101.0)] == ["b"]


def test_batcher_refuses_an_event_that_cannot_fit() -> None:
    b = Batcher(max_events=10, max_bytes=100)
    with pytest.raises(ValueError):
        b.add("a", {"id": "1"}, 99, backfill=False, now=0)


# ---- kafka_config -----------------------------------------------------------------------------


def test_producer_config_guarantees() -> None:
    conf = producer_config(CommonSettings(), "h:1", delivery_timeout_s=7)
    assert conf["enable.idempotence"] is True
    assert conf["acks"] == "all"
    assert conf["compression.type"] == "lz4"
    assert conf["delivery.timeout.ms"] == 7000
    assert conf["bootstrap.servers"] == "h:1"
    assert wire.MAX_MESSAGE_BYTES < PRODUCER_MESSAGE_MAX_BYTES == conf["message.max.bytes"]
    assert PRODUCER_MESSAGE_MAX_BYTES < BROKER_DEFAULT_MESSAGE_MAX_BYTES


def test_resolve_bootstrap() -> None:
    assert (
        resolve_bootstrap(CommonSettings(kafka_bootstrap_servers=None, kafka_port=19999)) == "127.0.0.1:19999"
    )
    assert resolve_bootstrap(CommonSettings(kafka_bootstrap_servers="k:9092")) == "k:9092"


# ---- UsageProducer with a fake Kafka client ---------------------------------------------------


class FakeKafka:
    """Records produced messages; delivers them (or fails them) when polled or flushed."""

    def __init__(self, fail: KafkaError | None = None, deliver: bool = True) -> None:
        self.messages: list[dict[str, Any]] = []
        self._pending: list[Any] = []
        self.fail = fail
        self.deliver = deliver
        self._lock = threading.Lock()

    def produce(
        self, topic: str, *, value: bytes, key: bytes, headers: Any, on_delivery: Any, timestamp: int = 0
    ) -> None:
        with self._lock:
            self.messages.append(
                {"topic": topic, "value": value, "key": key, "headers": headers, "timestamp": timestamp}
            )
            self._pending.append(on_delivery)

    def poll(self, timeout: float) -> int:
        if not self.deliver:
            return 0
        with self._lock:
            pending, self._pending = self._pending, []
        for cb in pending:
            cb(self.fail, None)
        return len(pending)

    def flush(self, timeout: float) -> int:
        self.poll(0)
        return len(self._pending)

    def events_of(self, tenant: str) -> list[dict[str, Any]]:
        return [
            e for m in self.messages if m["key"] == tenant.encode() for e in wire.decode_value(m["value"])
        ]


def make_producer(fake: FakeKafka, **kwargs: Any) -> UsageProducer:
    kwargs.setdefault("linger_s", 3600.0)  # nothing leaves by time: the tests decide when
    return UsageProducer("unused:0", settings=CommonSettings(), topic="events", producer=fake, **kwargs)


def test_emit_batches_per_tenant_in_order_with_key_and_headers() -> None:
    fake = FakeKafka()
    producer = make_producer(fake, max_batch_events=4)
    tenants = ["acme", "globex", "initech"]
    for i in range(30):
        producer.emit(cpu_event(i, tenant=None), tenants[i % 3])
    # full batches of 4 went out at once; the rest waits for flush or linger
    assert len(fake.messages) == 6
    producer.flush(timeout=1)
    producer.close()
    for tenant in tenants:
        ids = [e["id"] for e in fake.events_of(tenant)]
        assert ids == [f"e-{i}" for i in range(30) if tenants[i % 3] == tenant]
        assert all(e["tenant"] == tenant for e in fake.events_of(tenant))
    for m in fake.messages:
        assert m["topic"] == "events"
        assert len(wire.decode_value(m["value"])) <= 4
        assert (wire.HEADER_CONTENT_TYPE, wire.CONTENT_TYPE_BATCH.encode()) in m["headers"]
        assert all(h[0] != wire.HEADER_BACKFILL for h in m["headers"])
    assert producer.stats.delivered_events == 30


def test_backfill_messages_carry_the_header() -> None:
    fake = FakeKafka()
    with make_producer(fake) as producer:
        producer.emit(cpu_event(1, at=datetime.now(UTC) - timedelta(days=40)), "acme", backfill=True)
    assert fake.messages[0]["headers"] == wire.batch_headers(backfill=True)


def test_invalid_event_raises_before_anything_is_sent() -> None:
    fake = FakeKafka()
    producer = make_producer(fake)
    bad = cpu_event(1)
    bad["data"]["cpu_seconds"] = float("nan")
    with pytest.raises(InvalidEvent):
        producer.emit(bad, "acme")
    with pytest.raises(InvalidEvent):
        producer.send_batch([cpu_event(2), bad], "acme")
    producer.flush(timeout=1)
    assert fake.messages == []
    assert producer.stats.queued_events == 0


def test_event_too_large_for_one_message() -> None:
    fake = FakeKafka()
    producer = make_producer(fake, max_batch_bytes=400)
    big = new_event(
        "datastream.rows",
        {"workspace_id": "w", "total_rows": 100, "row_keys": [f"row-{i}" for i in range(100)]},
        tenant="acme",
        source="t",
    )
    with pytest.raises(InvalidEvent) as exc:
        producer.emit(big, "acme")
    assert exc.value.code == RejectCode.TOO_LARGE
    assert fake.messages == []


def test_flush_raises_delivery_error_with_failed_ids() -> None:
    fake = FakeKafka(fail=KafkaError(KafkaError._MSG_TIMED_OUT))
    producer = make_producer(fake, max_batch_events=2)
    for i in range(5):
        producer.emit(cpu_event(i), "acme")
    with pytest.raises(DeliveryError) as exc:
        producer.flush(timeout=1)
    assert sorted(exc.value.failed_ids) == [f"e-{i}" for i in range(5)]
    assert "_MSG_TIMED_OUT" in str(exc.value)
    producer.flush(timeout=1)  # reported once, not again
    assert producer.stats.failed_events == 5


def test_flush_reports_unacknowledged_events() -> None:
    fake = FakeKafka(deliver=False)
    producer = make_producer(fake)
    producer.emit(cpu_event(1), "acme")
    with pytest.raises(DeliveryError) as exc:
        producer.flush(timeout=0.01)
    assert exc.value.failed_ids == ["e-1"]
    assert "not acknowledged" in str(exc.value)


def test_send_batch_waits_and_keeps_order_after_earlier_emits() -> None:
    fake = FakeKafka()
    producer = make_producer(fake)
    producer.emit(cpu_event(1), "acme")
    producer.emit(cpu_event(2, tenant="globex"), "globex")
    producer.send_batch([cpu_event(3), cpu_event(4)], "acme")
    # acme's earlier emit went out before the batch; globex's is still queued
    assert [e["id"] for e in fake.events_of("acme")] == ["e-1", "e-3", "e-4"]
    assert fake.events_of("globex") == []
    assert producer.pending == 1
    producer.close()
    assert [e["id"] for e in fake.events_of("globex")] == ["e-2"]


def test_send_batch_raises_for_its_own_failures() -> None:
    fake = FakeKafka(fail=KafkaError(KafkaError._ALL_BROKERS_DOWN))
    producer = make_producer(fake)
    with pytest.raises(DeliveryError) as exc:
        producer.send_batch([cpu_event(1), cpu_event(2)], "acme", timeout=1)
    assert exc.value.failed_ids == ["e-1", "e-2"]


def test_send_batch_times_out_when_not_acknowledged() -> None:
    fake = FakeKafka(deliver=False)
    producer = make_producer(fake)
    with pytest.raises(DeliveryError) as exc:
        producer.send_batch([cpu_event(1)], "acme", timeout=0.05)
    assert exc.value.failed_ids == ["e-1"]


def test_send_batch_splits_large_requests_into_messages() -> None:
    fake = FakeKafka()
    producer = make_producer(fake, max_batch_events=500, max_batch_bytes=2000)
    producer.send_batch([cpu_event(i) for i in range(40)], "acme")
    assert len(fake.messages) > 1
    assert all(len(m["value"]) <= 2000 for m in fake.messages)
    assert [e["id"] for e in fake.events_of("acme")] == [f"e-{i}" for i in range(40)]


def test_closed_producer_refuses() -> None:
    fake = FakeKafka()
    producer = make_producer(fake)
    producer.close()
    producer.close()  # idempotent
    with pytest.raises(ProducerClosed):
        producer.emit(cpu_event(1), "acme")


def test_encoded_values_are_the_wire_format() -> None:
    fake = FakeKafka()
    with make_producer(fake) as producer:
        producer.emit(cpu_event(1), "acme")
    value = fake.messages[0]["value"]
    assert value.startswith(b"[") and orjson.loads(value)[0]["id"] == "e-1"
    assert Event.model_validate(wire.decode_value(value)[0]).tenant == "acme"


def test_leaving_with_an_exception_still_flushes_but_keeps_the_exception() -> None:
    fake = FakeKafka(fail=KafkaError(KafkaError._MSG_TIMED_OUT))
    with pytest.raises(KeyError), make_producer(fake) as producer:
        producer.emit(cpu_event(1), "acme")
        raise KeyError("the caller's own error")
    assert len(fake.messages) == 1  # flushed on the way out
    with (
        pytest.raises(DeliveryError),
        make_producer(FakeKafka(fail=KafkaError(KafkaError._MSG_TIMED_OUT))) as p2,
    ):
        p2.emit(cpu_event(2), "acme")
