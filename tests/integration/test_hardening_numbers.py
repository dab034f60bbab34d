"""Issue 7, items 2a and 6, tried from outside: numbers above their per-event maximum, and
numbers that are not JSON numbers, through the public HTTP interface and through a raw Kafka
producer writing straight to the usage topic (real broker, real faust aggregator, real ClickHouse
engine). The bounds and the codes: schemas/events.py, docs/api.md "Bounds and strict numbers"."""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from aggregators.direct import apply_events
from deploy.settings import AggregatorSettings
from ingest.sdk import new_event
from schemas import wire
from schemas.validation import RejectCode
from tests.integration import test_http_ingest as http_tests
from tests.integration.helpers import iso, running_faust

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

# The HTTP harness of test_http_ingest.py: a real producer, a real broker, API keys in ClickHouse.
make_ingest = http_tests.make_ingest
TENANT = http_tests.TENANT

OUT_OF_RANGE = RejectCode.OUT_OF_RANGE
CPU_ABOVE = "data.cpu_seconds: must be <= 1e12 (the per-event maximum)"
BYTES_ABOVE = "data.bytes: must be <= 1e12 (the per-event maximum)"


def read_events(bootstrap: str, topic: str, expected: int, give_up_s: float = 60.0) -> list[dict[str, Any]]:
    """Every event of ``topic`` once ``expected`` arrived (plus 1 s to catch extras)."""
    from confluent_kafka import Consumer

    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4().hex}", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic])
    out: list[dict[str, Any]] = []
    deadline, stop_at = time.monotonic() + give_up_s, None
    try:
        while time.monotonic() < deadline and (stop_at is None or time.monotonic() < stop_at):
            msg = consumer.poll(0.2)
            if msg is None or msg.error() is not None:
                continue
            out.extend(wire.decode_value(msg.value() or b""))
            if len(out) >= expected and stop_at is None:
                stop_at = time.monotonic() + 1.0
    finally:
        consumer.close()
    return out


# ---- through HTTP ------------------------------------------------------------------------------


def usage(id_: str, type_: str, data: dict[str, Any]) -> dict[str, Any]:
    ev = new_event(type_, data, tenant=TENANT, source="probe", id=id_)
    del ev["tenant"]  # over HTTP the tenant comes from the key
    return ev


def cpu(id_: str, value: Any) -> dict[str, Any]:
    return usage(id_, "workstation.cpu", {"workstation_id": "ws-1", "cpu_seconds": value})


def egress(id_: str, value: Any) -> dict[str, Any]:
    return usage(id_, "egress.download", {"workspace_id": "w1", "artifact_id": "a1", "bytes": value})


def test_http_rejects_numbers_above_the_maximum_and_non_numbers(
    make_ingest: Callable[..., Any], clickhouse: tuple[Any, str]
) -> None:
    client, db = clickhouse
    ingest = make_ingest()
    # A workstation of the tenant's root, which the key (of root workspace w1) may report for.
    ws = {"workstation_id": "ws-1", "name": "WS 1", "usd_per_cpu_hour": 0.07, "usd_per_gpu_hour": 1.0}
    apply_events(
        client, db, [new_event("workstation.created", ws | {"usd_per_gb_hour": 0.01}, TENANT, "admin")]
    )
    items = [
        cpu("huge", 1e29),  # the probe's value: once accepted, then it stalled every tenant
        cpu("string", "12"),  # once counted as 12
        cpu("bool", True),  # once counted as 1
        cpu("above", 1_000_000_000_000.001),  # just above the bound
        cpu("above-int", 1_000_000_000_001),
        cpu("at", 1_000_000_000_000),  # at the bound
        cpu("at-float", 1e12),
        cpu("below", 999_999_999_999.999),
        egress("bytes-above", 10**12 + 1),
        egress("bytes-at", 10**12),
        egress("bytes-integral", 12.0),  # an integral number is an integer: stored as 12
        egress("bytes-fraction", 12.5),
        egress("bytes-string", "12"),
    ]
    r = ingest.post(items)
    assert r.status_code == 202, r.text
    out = r.json()
    verdicts = [(x["id"], x["status"], x.get("code"), x.get("message")) for x in out["results"]]
    assert verdicts[:5] == [
        ("huge", "rejected", OUT_OF_RANGE, CPU_ABOVE),
        ("string", "rejected", "invalid_event", "data.cpu_seconds: Input should be a valid number"),
        ("bool", "rejected", "invalid_event", "data.cpu_seconds: Input should be a valid number"),
        ("above", "rejected", OUT_OF_RANGE, CPU_ABOVE),
        ("above-int", "rejected", OUT_OF_RANGE, CPU_ABOVE),
    ]
    assert [v[:3] for v in verdicts[5:]] == [
        ("at", "accepted", None),
        ("at-float", "accepted", None),
        ("below", "accepted", None),
        ("bytes-above", "rejected", OUT_OF_RANGE),
        ("bytes-at", "accepted", None),
        ("bytes-integral", "accepted", None),
        ("bytes-fraction", "rejected", "invalid_event"),
        ("bytes-string", "rejected", "invalid_event"),
    ]
    assert verdicts[8][3] == BYTES_ABOVE
    assert (out["accepted"], out["rejected"]) == (5, 8)
    # What reached Kafka: the accepted events only, with the numbers they will be counted as.
    sent = {e["id"]: e["data"] for e in read_events(ingest.bootstrap, ingest.topic, 5)}
    assert sent == {
        "at": {"workstation_id": "ws-1", "cpu_seconds": 1e12},
        "at-float": {"workstation_id": "ws-1", "cpu_seconds": 1e12},
        "below": {"workstation_id": "ws-1", "cpu_seconds": 999_999_999_999.999},
        "bytes-at": {"workspace_id": "w1", "artifact_id": "a1", "bytes": 10**12},
        "bytes-integral": {"workspace_id": "w1", "artifact_id": "a1", "bytes": 12},
    }
    assert isinstance(sent["bytes-integral"]["bytes"], int)


# ---- through a raw Kafka producer -----------------------------------------------------------


def _settings(topic: str, db: str) -> AggregatorSettings:
    return AggregatorSettings(
        clickhouse_database=db,
        topic_events=topic,
        topic_dead_letter=f"{topic}.dlq",
        consumer_group=f"g-{topic}",
        batch_max_messages=50,
        batch_within_s=0.1,
        faust_data_dir=Path(tempfile.mkdtemp()),
    )


def _raw_event(id_: str, tenant: str, cpu_seconds: str, t: datetime) -> bytes:
    """One event as a producer could write it, the number as the JSON token ``cpu_seconds``."""
    head = orjson.dumps(
        {
            "specversion": "1.0",
            "id": id_,
            "source": "probe",
            "type": "workstation.cpu",
            "time": iso(t),
            "tenant": tenant,
            "data": {"workstation_id": "ws-1", "cpu_seconds": 0},
        }
    )
    return head.replace(b'"cpu_seconds":0}', b'"cpu_seconds":' + cpu_seconds.encode() + b"}")


def dead_letters(bootstrap: str, topic: str, expected: int, give_up_s: float = 90.0) -> list[Any]:
    from confluent_kafka import Consumer

    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"d-{uuid.uuid4().hex}", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic])
    out: list[Any] = []
    deadline = time.monotonic() + give_up_s
    try:
        while len(out) < expected and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                out.append(msg)
        end = time.monotonic() + 1.0  # a moment longer: nothing else may arrive
        while time.monotonic() < end:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                out.append(msg)
    finally:
        consumer.close()
    return out


def test_raw_kafka_1e29_of_tenant_b_is_dead_lettered_while_tenant_a_is_counted_exactly(
    kafka_bootstrap: str, topic: str, clickhouse: tuple[Any, str]
) -> None:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    from deploy.runner import build_processor

    client, db = clickhouse
    dlq = f"{topic}.dlq"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for fut in admin.create_topics([NewTopic(dlq, num_partitions=1, replication_factor=1)]).values():
        fut.result(timeout=30)
    t0 = datetime.now(UTC) - timedelta(minutes=10)
    # Tenant A: 300 valid events, in three messages around B's; one exactly at the bound.
    a_values = [Decimal(i % 997) + Decimal(i % 7) / 8 for i in range(299)] + [Decimal(10**12)]
    a_events = [
        _raw_event(f"a-{i}", "A", str(v), t0 + timedelta(milliseconds=i)) for i, v in enumerate(a_values)
    ]
    # Tenant B: the probe's 1e29, a value a hair above the bound, a string, a boolean, and one
    # valid event in the same message.
    b_bad = {
        "b-huge": ("1e29", OUT_OF_RANGE, CPU_ABOVE),
        "b-above": ("1000000000000.001", OUT_OF_RANGE, CPU_ABOVE),
        "b-string": ('"12"', "invalid_event", "data.cpu_seconds: Input should be a valid number"),
        "b-bool": ("true", "invalid_event", "data.cpu_seconds: Input should be a valid number"),
    }
    b_events = [_raw_event(i, "B", tok, t0) for i, (tok, _, _) in b_bad.items()]
    b_events.insert(1, _raw_event("b-ok", "B", "2.5", t0))
    messages = [
        (b"A", a_events[:100]),
        (b"B", b_events),
        (b"A", a_events[100:200]),
        (b"A", a_events[200:]),
    ]
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True, "acks": "all"})
    for key, events in messages:  # a raw producer: no SDK, no validation on the way in
        producer.produce(topic, key=key, value=b"[" + b",".join(events) + b"]", headers=wire.batch_headers())
    assert producer.flush(30) == 0

    settings = _settings(topic, db)
    processor = build_processor(settings, client, kafka_bootstrap)

    def counted(tenant: str) -> tuple[Any, Any]:
        row = client.query(
            f"SELECT sum(value_sum), sum(value_count) FROM {db}.usage_1mo "
            "WHERE tenant = {t:String} AND meter = 'workstation_cpu_seconds'",
            parameters={"t": tenant},
        ).result_rows[0]
        return row[0], row[1]

    async def scenario() -> list[Any]:
        async with running_faust(settings, kafka_bootstrap, processor):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 90
            while loop.time() < deadline and counted("A")[1] < len(a_values):
                await asyncio.sleep(0.2)
            return await asyncio.to_thread(dead_letters, kafka_bootstrap, dlq, len(b_bad))

    dead = asyncio.run(scenario())
    assert counted("A") == (sum(a_values), len(a_values))
    assert counted("B") == (Decimal("2.5"), 1)
    raw = client.query(f"SELECT tenant, count() FROM {db}.events_raw GROUP BY tenant ORDER BY tenant")
    assert raw.result_rows == [("A", len(a_values)), ("B", 1)]
    got = {}
    for msg in dead:
        headers = dict(msg.headers() or [])
        event = orjson.loads(msg.value())
        got[event["id"]] = (headers[wire.HEADER_DLQ_CODE].decode(), headers[wire.HEADER_DLQ_REASON].decode())
    assert got == {i: (code, reason) for i, (_, code, reason) in b_bad.items()}
