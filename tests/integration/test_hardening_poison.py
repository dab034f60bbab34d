"""Issue 7, item 2: data errors are not outages, and outages are visible.

One event that ClickHouse refuses must not stop anyone's counting: it is dead-lettered with the
engine's error (code ``storage_rejected``) and every other event is counted exactly once, crash
or no crash. A real outage still stalls the batch, and /readyz and the stall metrics say so.

Which poison, and why it stays honest. The issue's event (``cpu_seconds = 1e29``) passed
validation and failed in ClickHouse's rollup stage (``toDecimal128(…, 9)``: ARGUMENT_OUT_OF_BOUND)
*after* the raw insert had stored it. Since the per-field bounds landed, validation refuses it, so:

- ``test_the_issue_7_event_…`` crafts exactly that event as a decoded row past validation
  (``decode_items`` patched) and shows both the old failure (a processor without preflight
  stores the row, then fails forever) and the new behaviour, against the real engine;
- the Kafka and crash tests use a test-only schema change instead (tests/integration/
  poison_proc.py): ``usage_15m.value_max`` narrowed to Decimal(9, 8), so a *valid* event of
  150 CPU-seconds, which every bound accepts, is refused by ClickHouse in the period statement
  (DECIMAL_OVERFLOW) — the same shape as the incident: a derived-table statement that runs
  after the raw insert. The tests check the dead letter's code is ``storage_rejected``, so if a
  bound ever refused the poison first they would fail instead of passing vacuously.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

import aggregators.processor as processor_module
from aggregators import metrics
from aggregators.decode import Decoded
from aggregators.direct import make_processor, pack
from deploy.runner import aggregator_check, build_processor
from deploy.settings import AggregatorSettings
from query_api.health import build_health_router
from schemas import wire
from schemas.migrate import migrate
from tests.integration.helpers import event, produce_batches, running_faust, wait_until
from tests.integration.poison_proc import narrow

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]
ROOT = Path(__file__).resolve().parents[2]
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)
POISON_SECONDS = 150  # > 21.47483647 (the narrowed column), far below every per-event bound


def cpu(eid: str, tenant: str, seconds: float, at: datetime = T0) -> dict[str, Any]:
    return event(eid, "workstation.cpu", {"workstation_id": "ws-1", "cpu_seconds": seconds}, at, tenant)


def counted(client: Any, db: str, tenant: str, table: str = "usage_1mo") -> tuple[Any, Any]:
    row = client.query(
        f"SELECT sum(value_sum), sum(value_count) FROM {db}.{table} "
        "WHERE tenant = {t:String} AND meter = 'workstation_cpu_seconds'",
        parameters={"t": tenant},
    ).result_rows[0]
    return row[0], row[1]


def settings_for(topic: str, db: str = "metering") -> AggregatorSettings:
    return AggregatorSettings(
        clickhouse_database=db,
        topic_events=topic,
        topic_dead_letter=f"{topic}.dlq",
        consumer_group=f"g-{topic}",
        batch_max_messages=10,
        batch_within_s=0.1,
        faust_data_dir=Path(tempfile.mkdtemp()),
        clickhouse_retry_max_s=0.5,
    )


def create_topic(bootstrap: str, name: str) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)]).values():
        fut.result(timeout=30)


def dead_letters(bootstrap: str, topic: str, at_least: int, give_up_s: float = 60.0) -> list[Any]:
    """Every message of the dead-letter topic (waiting for ``at_least``, then a moment longer)."""
    from confluent_kafka import Consumer

    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"d-{uuid.uuid4().hex}", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic])
    out: list[Any] = []
    deadline = time.monotonic() + give_up_s
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                out.append(msg)
            elif len(out) >= at_least:
                break
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                out.append(msg)
    finally:
        consumer.close()
    return out


def headers_of(msg: Any) -> dict[str, str]:
    return {k: v.decode() for k, v in (msg.headers() or [])}


def rejected(code: str) -> float:
    return metrics.REJECTED.labels(code)._value.get()


# ---- the issue's own event, crafted past validation ---------------------------------------------

ISSUE_7_DATA = b'{"workstation_id":"ws-1","cpu_seconds":1e29}'


def craft(monkeypatch: pytest.MonkeyPatch, event_id: str, data: bytes) -> None:
    """What decoding gave before the bounds: ``event_id``'s data replaced by ``data`` as a producer
    wrote it. Only events pydantic decides (decode_items) go through here: the event must not be in
    the normalized form the SQL path takes (stage.py)."""
    real_decode = processor_module.decode_items

    def crafted(*args: Any) -> Decoded:
        decoded = real_decode(*args)
        decoded.rows = [r._replace(data=data) if r.event_id == event_id else r for r in decoded.rows]
        return decoded

    monkeypatch.setattr(processor_module, "decode_items", crafted)


@pytest.mark.clickhouse
def test_the_issue_7_event_is_refused_before_the_raw_insert(
    clickhouse: tuple[Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, db = clickhouse
    events = [cpu(f"a-{i}", "A", 1.5) for i in range(20)]
    # cpu_seconds 1 (an integer): valid, but not in the normalized form the SQL path takes
    # (stage.py), so pydantic decides it (decode_items), where the crafting happens
    events.insert(7, cpu("a-poison", "A", 1))
    craft(monkeypatch, "a-poison", ISSUE_7_DATA)

    # Before: without the preflight, the raw insert stores the row (data is text), then the
    # rollup stage refuses it, on every retry, forever.
    old_db = f"{db}_old"
    client.command(f"CREATE DATABASE {old_db}")
    try:
        migrate(client, old_db)
        old = make_processor(client, old_db)
        monkeypatch.setattr(old.preflight, "staged_refusals", lambda rows, at: [])
        # and no rollup stage from the new rows before the raw insert (its trial, processor.py):
        # the stage is then filled from events_raw after it, as before
        monkeypatch.setattr(old.writer, "stage_new", lambda since, keys=None: None)
        with pytest.raises(DatabaseError) as failure:
            old.process(pack(events, 0, 0, per_message=5))
        assert failure.value.code == 69 and "Decimal value is too big" in str(failure.value)
        assert client.command(f"SELECT count() FROM {old_db}.events_raw WHERE event_id = 'a-poison'") == 1
        # The operator's way out for such a stored row (docs/exactly-once.md): delete it; the
        # derived tables then catch up by their watermarks.
        client.command(
            f"ALTER TABLE {old_db}.events_raw DELETE WHERE tenant = 'A' AND event_id = 'a-poison'",
            settings={"mutations_sync": 2},
        )
        make_processor(client, old_db).process(pack(events, 0, 0, per_message=5))
        assert counted(client, old_db, "A", "usage_1d") == (Decimal("30"), 20)
    finally:
        client.command(f"DROP DATABASE IF EXISTS {old_db} SYNC")

    # Now: refused before anything is written, with the engine's words; the rest counted.
    proc = make_processor(client, db)
    before = rejected("storage_rejected")
    try:
        stats = proc.process(pack(events, 0, 0, per_message=5))
    finally:
        proc.preflight.close()
    assert (stats.written, stats.refused) == (20, 1)
    [dead] = proc.dead_letters.rejects  # type: ignore[attr-defined]
    assert dead.code == "storage_rejected"
    assert dead.message.startswith("ARGUMENT_OUT_OF_BOUND (69): Decimal value is too big")
    assert rejected("storage_rejected") == before + 1
    assert client.command(f"SELECT count() FROM {db}.events_raw WHERE event_id = 'a-poison'") == 0
    # recorded for the trace (GET /api/v1/events/{id}: rejected by the aggregator after a 202)
    recorded = client.query(f"SELECT tenant, event_id, code, origin FROM {db}.rejections").result_rows
    assert recorded == [("A", "a-poison", "storage_rejected", "aggregator")]
    for table in ("usage_15m", "usage_1h", "usage_1d", "usage_1mo"):
        assert counted(client, db, "A", table) == (Decimal("30"), 20), table


@pytest.mark.clickhouse
def test_a_refused_event_and_its_later_copy_are_both_refused(
    clickhouse: tuple[Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trial of the usage events runs on the batch's *new* rows (after dedupe): leaving the
    refused event out makes its later copy in the batch the first occurrence, which must be
    refused in turn (the trial repeats until the new rows pass), not stall the batch."""
    client, db = clickhouse
    events = [cpu(f"a-{i}", "A", 1.5) for i in range(20)]
    events.insert(3, cpu("a-poison", "A", 1))  # pydantic decides it (see the test above)
    events.insert(17, cpu("a-poison", "A", 1))  # a producer's retry, in a later message
    craft(monkeypatch, "a-poison", ISSUE_7_DATA)
    proc = make_processor(client, db)
    try:
        stats = proc.process(pack(events, 0, 0, per_message=5))
    finally:
        proc.close()
    assert (stats.written, stats.refused, stats.duplicates) == (20, 2, 0)
    dead = proc.dead_letters.rejects  # type: ignore[attr-defined]
    assert [(d.code, d.offset, d.index) for d in dead] == [
        ("storage_rejected", 0, 3),
        ("storage_rejected", 3, 2),
    ]
    assert client.command(f"SELECT count() FROM {db}.events_raw WHERE event_id = 'a-poison'") == 0
    for table in ("usage_15m", "usage_1h", "usage_1d", "usage_1mo"):
        assert counted(client, db, "A", table) == (Decimal("30"), 20), table


@pytest.mark.clickhouse
def test_a_gauge_value_the_gauge_statement_refuses_is_refused_before_the_raw_insert(
    clickhouse: tuple[Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A value of ``ci.step.memory`` (a gauge, and no other meter reads it) is converted only by
    the gauge statement, which reads events_raw after the raw insert; the trial of the new rows
    converts it first (rollup.gauge_values_check)."""
    client, db = clickhouse

    def mem(eid: str, i: int, mib: int, canonical: bool = True) -> dict[str, Any]:
        data = {"contract_id": "c1", "workspace_id": "w1", "step_id": "s1", "memory_mib": mib}
        if not canonical:  # fields out of order: pydantic decides it (see the first test)
            data = {"memory_mib": mib, **{k: v for k, v in data.items() if k != "memory_mib"}}
        return event(eid, "ci.step.memory", data, T0 + timedelta(seconds=10 * i), "A")

    events = [mem(f"m-{i}", i, 512) for i in range(6)]
    events[2] = mem("m-poison", 2, 512, canonical=False)
    craft(
        monkeypatch, "m-poison", b'{"contract_id":"c1","workspace_id":"w1","step_id":"s1","memory_mib":1e30}'
    )
    proc = make_processor(client, db)
    try:
        stats = proc.process(pack(events, 0, 0, per_message=3))
    finally:
        proc.close()
    assert (stats.written, stats.refused) == (5, 1)
    [dead] = proc.dead_letters.rejects  # type: ignore[attr-defined]
    assert (dead.code, dead.offset, dead.index) == ("storage_rejected", 0, 2)
    assert dead.message.startswith("ARGUMENT_OUT_OF_BOUND (69): Decimal value is too big")
    assert client.command(f"SELECT count() FROM {db}.events_raw WHERE event_id = 'm-poison'") == 0
    assert client.command(f"SELECT sum(samples) FROM {db}.gauge_15m FINAL") == 5


# ---- (a) through a raw Kafka producer and the real faust aggregator ------------------------------


def test_tenant_b_poison_is_dead_lettered_while_tenant_a_is_counted(
    kafka_bootstrap: str, topic: str, clickhouse: tuple[Any, str]
) -> None:
    client, db = clickhouse
    narrow(client, db)
    dlq = f"{topic}.dlq"
    create_topic(kafka_bootstrap, dlq)
    settings = settings_for(topic, db)
    processor = build_processor(settings, client, kafka_bootstrap)  # the real dead-letter producer
    b_events = [cpu("b-1", "B", 2.5), cpu("b-poison", "B", POISON_SECONDS), cpu("b-2", "B", 0.5)]
    a_events = [cpu(f"a-{i}", "A", (i % 9) / 4, T0 + timedelta(seconds=i)) for i in range(300)]
    a_expected = (sum(Decimal(i % 9) / 4 for i in range(300)), 300)
    before = rejected("storage_rejected"), metrics.DEAD_LETTERED._value.get()

    async def scenario() -> float:
        async with running_faust(settings, kafka_bootstrap, processor):
            produce_batches(kafka_bootstrap, topic, b_events, per_message=10)  # B's poison first
            sent = time.monotonic()
            produce_batches(kafka_bootstrap, topic, a_events, per_message=50)  # then A's usage
            counted_a = await asyncio.to_thread(
                wait_until, lambda: counted(client, db, "A") == a_expected, 60.0
            )
            assert counted_a, f"tenant A not counted: {counted(client, db, 'A')} != {a_expected}"
            return time.monotonic() - sent

    try:
        took = asyncio.run(scenario())
    finally:
        processor.dead_letters.close()  # type: ignore[attr-defined]
        processor.preflight.close()
    print(f"tenant A counted {took:.1f}s after it was sent, behind tenant B's poison")
    for table in ("usage_15m", "usage_1h", "usage_1d", "usage_1mo"):
        assert counted(client, db, "A", table) == a_expected, table
        assert counted(client, db, "B", table) == (Decimal("3"), 2), table
    raw = client.query(f"SELECT tenant, count() FROM {db}.events_raw GROUP BY tenant ORDER BY tenant")
    assert raw.result_rows == [("A", 300), ("B", 2)]

    [dead] = dead_letters(kafka_bootstrap, dlq, at_least=1)
    h = headers_of(dead)
    assert h[wire.HEADER_DLQ_CODE] == "storage_rejected"
    assert h[wire.HEADER_DLQ_REASON].startswith("DECIMAL_OVERFLOW (407): Decimal convert overflow"), h
    assert h[wire.HEADER_DLQ_SOURCE].endswith("/1"), h  # topic/partition/offset/index: B's 2nd event
    assert orjson.loads(dead.value()) == orjson.loads(orjson.dumps(b_events[1]))  # the bytes it came as
    assert rejected("storage_rejected") == before[0] + 1
    assert metrics.DEAD_LETTERED._value.get() == before[1] + 1
    assert processor.stalled_since is None  # never stalled: a data error is not an outage


# ---- (b) an outage is visible, and clears ---------------------------------------------------------


def stall_gauge() -> float:
    value = REGISTRY.get_sample_value("metering_aggregator_stall_seconds")
    assert value is not None
    return value


def test_an_outage_shows_in_readyz_and_the_stall_metrics_then_clears(
    kafka_bootstrap: str, topic: str, clickhouse: tuple[Any, str]
) -> None:
    client, db = clickhouse
    settings = settings_for(topic, db)
    processor = make_processor(client, db)
    first = [cpu(f"x-{i}", "T", 1) for i in range(100)]
    second = [cpu(f"y-{i}", "T", 2) for i in range(100)]
    stalled_before = metrics.STALLED_SECONDS._value.get()

    async def scenario() -> None:
        async with running_faust(settings, kafka_bootstrap, processor) as app:
            health = FastAPI()
            health.include_router(build_health_router({"aggregator": aggregator_check(app, processor)}, 0))
            http = TestClient(health)

            def readyz() -> tuple[int, dict[str, Any]]:
                r = http.get("/readyz")
                return r.status_code, r.json()

            produce_batches(kafka_bootstrap, topic, first, per_message=20)
            assert await asyncio.to_thread(wait_until, lambda: counted(client, db, "T")[1] == 100, 60.0)
            assert await asyncio.to_thread(readyz) == (
                200,
                {"status": "ok", "checks": {"aggregator": {"status": "ok", "detail": "consuming"}}},
            )
            # the outage: a derived table disappears (as in test_clickhouse_outage.py)
            client.command(f"DETACH TABLE {db}.usage_1d")
            produce_batches(kafka_bootstrap, topic, second, per_message=20)
            # this processor's stall (the gauge is the longest stall of the process's processors)
            assert await asyncio.to_thread(wait_until, lambda: processor.stalled_seconds() > 2.0, 60.0)
            assert stall_gauge() >= 2.0
            status, body = await asyncio.to_thread(readyz)
            check = body["checks"]["aggregator"]
            assert status == 200 and body["status"] == "degraded", body  # documented: not 503
            assert check["status"] == "degraded" and "UNKNOWN_TABLE (60)" in check["detail"], check
            assert "usage_1d" in check["detail"] and "stalled for" in check["detail"], check
            assert processor.stalled_since is not None
            assert metrics.STALLED_SECONDS._value.get() - stalled_before > 1.0
            client.command(f"ATTACH TABLE {db}.usage_1d")
            assert await asyncio.to_thread(
                wait_until, lambda: counted(client, db, "T", "usage_1d") == (Decimal(300), 200), 60.0
            )
            assert await asyncio.to_thread(wait_until, lambda: processor.stalled_since is None, 30.0)
            assert (await asyncio.to_thread(readyz))[1]["status"] == "ok"
            assert processor.stalled_seconds() == 0.0

    try:
        asyncio.run(scenario())
    finally:
        processor.preflight.close()
    for table in ("usage_15m", "usage_1h", "usage_1d", "usage_1mo"):
        assert counted(client, db, "T", table) == (Decimal(300), 200), table
    assert client.command(f"SELECT count() FROM {db}.events_raw") == 200


# ---- (c) a crash during the bisect, and right after it, then a restart ---------------------------


def _run(dsn: str, bootstrap: str, topic: str, group: str, crash_at: str | None) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("METERING_CRASH_AT", None)
    if crash_at:
        env["METERING_CRASH_AT"] = crash_at
    proc = subprocess.run(
        [sys.executable, "-m", "tests.integration.poison_proc", "run", dsn, bootstrap, topic, group],
        env=env,
        cwd=ROOT,
        timeout=240,
        capture_output=True,
        text=True,
    )
    return proc.returncode


def _dump(dsn: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "tests.integration.aggregator_proc", "dump", dsn],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=120,
    )
    return orjson.loads(out.stdout)


@pytest.mark.slow
def test_a_crash_during_the_bisect_then_a_restart_counts_every_event_once(
    kafka_bootstrap: str, topic: str
) -> None:
    events = []
    for t in ("A", "B", "C"):
        events += [cpu(f"{t}-{i}", t, (i % 5) / 2, T0 + timedelta(seconds=7 * i)) for i in range(120)]
    events.insert(200, cpu("B-poison", "B", POISON_SECONDS, T0))
    events += [cpu("A-3", "A", 1.5), cpu("C-10", "C", 0)]  # producer retries of earlier events
    produce_batches(kafka_bootstrap, topic, events, per_message=15)
    dlq = f"{topic}.dlq"

    clean_dsn = f"chdb://{tempfile.mkdtemp(prefix='poison-clean-')}"
    assert _run(clean_dsn, kafka_bootstrap, topic, f"clean-{topic}", None) == 0
    clean = _dump(clean_dsn)
    assert len(clean["raw"]) == 360 and not any(r[1] == "B-poison" for r in clean["raw"])

    dsn = f"chdb://{tempfile.mkdtemp(prefix='poison-crash-')}"
    group = f"crash-{topic}"
    # mid-bisect (a trial writes nothing); then the restarts crash again at their first raw
    # insert, before and after it (the redelivered batch: the poison is isolated again, its dead
    # letter flushed again before anything is written)
    assert _run(dsn, kafka_bootstrap, topic, group, "isolating:3") == -signal.SIGKILL
    for point in ("before_raw_insert:1", "after_raw_insert:1"):
        rc = _run(dsn, kafka_bootstrap, topic, group, point)
        print(f"{point}: exit {rc}")
        assert rc in (-signal.SIGKILL, 0), point
    assert _run(dsn, kafka_bootstrap, topic, group, None) == 0
    crashed = _dump(dsn)
    for table in clean:
        assert crashed[table] == clean[table], f"{table} differs from a clean pass"
    expected = {t: sum(Decimal(i % 5) / 2 for i in range(120)) for t in ("A", "B", "C")}
    sums: dict[str, Decimal] = {}
    for row in crashed["usage_1mo"]:
        if row[1] == "workstation_cpu_seconds":
            sums[row[0]] = sums.get(row[0], Decimal(0)) + Decimal(row[4])
    assert sums == expected

    dead = dead_letters(kafka_bootstrap, dlq, at_least=2)  # the clean run's, and the crashed runs'
    print(f"{len(dead)} dead letter(s)")
    assert len(dead) >= 2 and all(headers_of(m)[wire.HEADER_DLQ_CODE] == "storage_rejected" for m in dead)
    assert {orjson.loads(m.value())["id"] for m in dead} == {"B-poison"}
    assert len({headers_of(m)[wire.HEADER_DLQ_SOURCE] for m in dead}) == 1  # one event, maybe sent twice
