"""Shared helpers for integration tests: event factories and running the faust app in-process."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from schemas.wire import batch_headers, encode_batch


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def event(eid: str, type_: str, data: dict[str, Any], t: datetime, tenant: str) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": eid,
        "source": "test",
        "type": type_,
        "time": iso(t),
        "tenant": tenant,
        "data": data,
    }


def produce_batches(
    bootstrap: str, topic: str, events: Iterable[Mapping[str, Any]], per_message: int = 200
) -> int:
    """Produce events the way the SDK does (one tenant per message), idempotent, acks=all."""
    from confluent_kafka import Producer

    producer = Producer(
        {"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all", "linger.ms": 5}
    )
    failures: list[str] = []
    by_tenant: dict[str, list[Mapping[str, Any]]] = {}
    for e in events:
        by_tenant.setdefault(str(e["tenant"]), []).append(e)
    sent = 0
    for tenant, evs in by_tenant.items():
        for i in range(0, len(evs), per_message):
            producer.produce(
                topic,
                key=tenant.encode(),
                value=encode_batch(evs[i : i + per_message]),
                headers=batch_headers(),
                on_delivery=lambda err, _m: failures.append(str(err)) if err else None,
            )
            producer.poll(0)
            sent += 1
    assert producer.flush(30) == 0
    assert not failures, failures
    return sent


def wait_until(predicate: Callable[[], bool], timeout_s: float = 60.0, interval_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


@contextlib.asynccontextmanager
async def running_faust(settings: Any, bootstrap: str, processor: Any) -> AsyncIterator[Any]:
    from aggregators.app import build_app

    app = build_app(settings, bootstrap, processor)
    await app.start()
    try:
        yield app
    finally:
        app.metering_stopping.set()
        await app.stop()
        await asyncio.sleep(0)


def consume_all(bootstrap: str, topic: str, timeout_s: float = 60.0) -> list[Any]:
    """Every message of ``topic`` as SourceMessages (a plain consumer, no group commits)."""
    from confluent_kafka import Consumer, TopicPartition

    from aggregators.decode import SourceMessage

    c = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"read-{time.time_ns()}", "enable.auto.commit": False}
    )
    md = c.list_topics(topic, timeout=10)
    parts = sorted(md.topics[topic].partitions)
    ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
    c.assign([TopicPartition(topic, p, 0) for p in parts if ends[p] > 0])
    out: list[Any] = []
    want = sum(ends.values())
    deadline = time.monotonic() + timeout_s
    while len(out) < want and time.monotonic() < deadline:
        for m in c.consume(500, timeout=0.5):
            if m.error():
                continue
            out.append(
                SourceMessage(
                    m.partition(), m.offset(), m.timestamp()[1], m.key(), m.value(), m.headers() or []
                )
            )
    c.close()
    return out
