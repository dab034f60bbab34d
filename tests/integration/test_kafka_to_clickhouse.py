"""Kafka -> faust agent -> ClickHouse with the real broker and the real engine."""

from __future__ import annotations

import asyncio
import random
import tempfile
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from aggregators.direct import make_processor
from deploy.settings import AggregatorSettings
from tests.integration.helpers import event, produce_batches, running_faust

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]


def _settings(topic: str) -> AggregatorSettings:
    return AggregatorSettings(
        topic_events=topic,
        topic_dead_letter=f"{topic}.dlq",
        consumer_group=f"g-{topic}",
        batch_max_messages=50,
        batch_within_s=0.1,
        faust_data_dir=Path(tempfile.mkdtemp()),
    )


async def _wait_count(client, db: str, n: int, timeout: float = 90.0) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    count = -1
    while loop.time() < deadline:
        count = int(client.command(f"SELECT count() FROM {db}.events_raw"))
        if count >= n:
            # stay a moment longer: a duplicate write would show up now
            await asyncio.sleep(1.0)
            return int(client.command(f"SELECT count() FROM {db}.events_raw"))
        await asyncio.sleep(0.2)
    return count


def test_ten_thousand_events_exact_count_and_sum(kafka_bootstrap: str, topic: str, clickhouse) -> None:
    client, db = clickhouse
    rng = random.Random(7)
    now = datetime.now(UTC) - timedelta(minutes=30)
    events, expected = [], Decimal(0)
    for i in range(10_000):
        tenant = f"tenant-{i % 7}"
        secs = Decimal(rng.randint(1, 100_000)) / 1000  # exact decimal with 3 digits
        expected += secs
        events.append(
            event(
                f"ev-{i}",
                "workstation.cpu",
                {"workstation_id": f"ws-{i % 13}", "cpu_seconds": float(secs)},
                now + timedelta(milliseconds=i),
                tenant,
            )
        )
    # 500 messages: a backlog of full batches (50 messages), each prepared while the one before
    # is applied (processor.prepare: both cores busy)
    produce_batches(kafka_bootstrap, topic, events, per_message=20)
    processor = make_processor(client, db)

    async def scenario() -> int:
        async with running_faust(_settings(topic), kafka_bootstrap, processor):
            return await _wait_count(client, db, 10_000)

    assert asyncio.run(scenario()) == 10_000
    assert processor.prepared_ahead > 0
    total = client.query(
        f"SELECT sum(value_sum), sum(value_count) FROM {db}.usage_1mo WHERE meter = 'workstation_cpu_seconds'"
    ).result_rows[0]
    assert total[0] == expected
    assert total[1] == 10_000
    # every grain agrees with the others
    for table in ("usage_15m", "usage_1h", "usage_1d"):
        s = client.command(f"SELECT sum(value_sum) FROM {db}.{table} WHERE meter = 'workstation_cpu_seconds'")
        assert Decimal(str(s)) == expected, table


def test_redelivered_messages_are_counted_once(kafka_bootstrap: str, topic: str, clickhouse) -> None:
    """The same events produced twice (a producer retry after a lost ack) count once."""
    client, db = clickhouse
    now = datetime.now(UTC) - timedelta(minutes=5)
    events = [
        event(
            f"r-{i}",
            "egress.download",
            {"workspace_id": "w1", "artifact_id": f"a{i}", "bytes": 1000 + i},
            now,
            "t1",
        )
        for i in range(500)
    ]
    produce_batches(kafka_bootstrap, topic, events)
    produce_batches(kafka_bootstrap, topic, events, per_message=37)  # different batching, same events
    processor = make_processor(client, db)

    async def scenario() -> None:
        async with running_faust(_settings(topic), kafka_bootstrap, processor):
            await _wait_count(client, db, 500, timeout=60)
            # wait until every message is consumed: the raw watermark reaches the last offset
            for _ in range(100):
                if (
                    processor.writer.watermarks
                    and int(client.command(f"SELECT count() FROM {db}.events_raw")) == 500
                ):
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(2)

    asyncio.run(scenario())
    assert int(client.command(f"SELECT count() FROM {db}.events_raw")) == 500
    got = client.query(
        f"SELECT sum(value_sum), sum(value_count) FROM {db}.usage_1d WHERE meter='egress_bytes'"
    ).result_rows[0]
    assert got == (Decimal(sum(1000 + i for i in range(500))), 500)


def test_an_idle_aggregator_holds_none_of_the_messages_it_applied(
    kafka_bootstrap: str, topic: str, clickhouse
) -> None:
    """Once its batches are applied, the agent keeps no Kafka message of them while it waits for
    the next: neither the last batch nor a full batch prepared ahead earlier (which stayed
    referenced through every smaller batch after it, ~60 MiB of messages at the product's batch
    size, docs/performance.md)."""
    import gc

    from aggregators.decode import SourceMessage

    client, db = clickhouse
    now = datetime.now(UTC) - timedelta(minutes=30)
    # Only this test's messages are counted: the worker process runs other tests before it, and
    # a message one of them still holds (a thread of its own, a traceback) says nothing of this
    # aggregator. (A CI run counted 20 held messages, which 14 runs of this test alone never did.)
    mark = f"{topic}-idle-"

    def events(first: int, n: int) -> list[dict]:
        return [
            event(
                f"{mark}{i}",
                "workstation.cpu",
                {"workstation_id": "ws-1", "cpu_seconds": 1.0},
                now + timedelta(milliseconds=i),
                f"tenant-{i % 3}",
            )
            for i in range(first, first + n)
        ]

    def held() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) is SourceMessage and mark.encode() in o.value)

    processor = make_processor(client, db)

    async def scenario() -> tuple[int, int]:
        async with running_faust(_settings(topic), kafka_bootstrap, processor):
            # a backlog of full batches (50 messages), prepared ahead, then a few small ones
            await asyncio.to_thread(produce_batches, kafka_bootstrap, topic, events(0, 6_000), 20)
            assert await _wait_count(client, db, 6_000) == 6_000
            for k in range(3):
                await asyncio.to_thread(
                    produce_batches, kafka_bootstrap, topic, events(6_000 + 20 * k, 20), 20
                )
                assert await _wait_count(client, db, 6_020 + 20 * k) == 6_020 + 20 * k
            await asyncio.sleep(1.0)
            return held(), processor.prepared_ahead

    still_held, prepared_ahead = asyncio.run(scenario())
    assert prepared_ahead > 0  # the scenario did prepare full batches ahead
    assert still_held == 0
