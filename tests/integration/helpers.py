"""Shared helpers for integration tests: event factories and running the faust app in-process."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from schemas.events import LIFECYCLE_TYPES
from schemas.wire import batch_headers, control_lane, encode_batch

LIFECYCLE = frozenset(t.value for t in LIFECYCLE_TYPES)


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
    bootstrap: str,
    topic: str,
    events: Iterable[Mapping[str, Any]],
    per_message: int = 200,
    route_lifecycle: bool = True,
) -> int:
    """Produce events the way the SDK and ``metering admin`` do (one tenant per message),
    idempotent, acks=all: usage events to ``topic``, lifecycle events to its control topic
    ``<topic>.control`` (``route_lifecycle=False`` sends everything to ``topic``, as an attacker
    with access to the usage topic would)."""
    from confluent_kafka import Producer

    producer = Producer(
        {"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all", "linger.ms": 5}
    )
    failures: list[str] = []
    by_tenant: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for e in events:
        lifecycle = route_lifecycle and e.get("type") in LIFECYCLE
        by_tenant.setdefault((f"{topic}.control" if lifecycle else topic, str(e["tenant"])), []).append(e)
    sent = 0
    for (to, tenant), evs in by_tenant.items():
        for i in range(0, len(evs), per_message):
            producer.produce(
                to,
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


async def until(predicate: Callable[[], Any], timeout_s: float) -> bool:
    """``wait_until`` for a test's event loop: the predicate (which may block) runs in a thread."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while loop.time() < end:
        if await asyncio.to_thread(predicate):
            return True
        await asyncio.sleep(0.25)
    return bool(await asyncio.to_thread(predicate))


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


@contextlib.asynccontextmanager
async def running_part(settings: Any, bootstrap: str, processor: Any) -> AsyncIterator[Any]:
    """The aggregator as ``metering run`` runs it: the faust app inside an ``AggregatorPart``,
    which replaces the app when its watchdog or a dead agent asks (``part.app`` is the current
    one). ``running_faust`` is the bare app, which nothing restarts."""
    from aggregators.supervisor import AggregatorPart

    part = AggregatorPart(settings, bootstrap, processor)
    await part.start()
    try:
        yield part
    finally:
        await part.stop()
        await asyncio.sleep(0)


def describe_part(part: Any) -> str:
    """What a failing liveness test should show of a member: its restarts and their cause, a
    crash, its watchdog's troubles and stalls, whether it is rebalancing, what it owns."""
    app = part.app
    assignment = sorted(f"{tp.topic[-8:]}[{tp.partition}]" for tp in app.consumer.assignment()) if app else []
    dog = part.metering_watchdog
    return (
        f"restarts={part.restarts} restarting={part.restarting!r} crashed={part.crashed} "
        f"crash_reason={part.crash_reason!r} troubles={ {str(t): round(s, 1) for t, s in dog.troubles().items()} } "
        f"stalls={[(s.lane, s.lag, round(s.stalled_s)) for s in dog.stalls()]} "
        f"rebalancing={getattr(app, 'rebalancing', None)} assignment={assignment}"
    )


def consume_all(bootstrap: str, topic: str, timeout_s: float = 60.0) -> list[Any]:
    """Every message of ``topic`` and of its control topic as SourceMessages, each with its lane
    (control partitions as negative lanes, schemas/wire.py); a plain consumer, no group commits.
    Control messages come first, as the aggregator would most likely see them."""
    from confluent_kafka import Consumer, TopicPartition

    from aggregators.decode import SourceMessage

    c = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"read-{time.time_ns()}", "enable.auto.commit": False}
    )
    control = f"{topic}.control"
    ends: dict[tuple[str, int], int] = {}
    for name in (control, topic):
        md = c.list_topics(name, timeout=10)
        if name not in md.topics or md.topics[name].error is not None:
            continue
        for p in sorted(md.topics[name].partitions):
            ends[(name, p)] = c.get_watermark_offsets(TopicPartition(name, p), timeout=10)[1]
    c.assign([TopicPartition(t, p, 0) for (t, p), end in ends.items() if end > 0])
    got: dict[str, list[Any]] = {control: [], topic: []}
    want = sum(ends.values())
    deadline = time.monotonic() + timeout_s
    while sum(map(len, got.values())) < want and time.monotonic() < deadline:
        for m in c.consume(500, timeout=0.5):
            if m.error():
                continue
            name, p = m.topic(), m.partition()
            lane = control_lane(p) if name == control else p
            got[name].append(
                SourceMessage(lane, m.offset(), m.timestamp()[1], m.key(), m.value(), m.headers() or [])
            )
    c.close()
    return got[control] + got[topic]


def egress_events(prefix: str, n: int, tenants: int = 6) -> list[dict[str, Any]]:
    """``n`` egress downloads 20 minutes ago, 1 ms apart, spread over ``tenants`` tenants (so over
    the partitions): ids ``<prefix><i>``, ``bytes`` 1..97 (the rebalance and liveness tests)."""
    at = datetime.now(UTC) - timedelta(minutes=20)
    return [
        event(
            f"{prefix}{i}",
            "egress.download",
            {"workspace_id": "w", "artifact_id": f"{prefix}{i}", "bytes": 1 + i % 97},
            at + timedelta(milliseconds=i),
            f"t{i % tenants}",
        )
        for i in range(n)
    ]
