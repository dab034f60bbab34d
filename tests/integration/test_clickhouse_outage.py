"""ClickHouse failing for a while: the batch waits, nothing is lost or doubled."""

from __future__ import annotations

import asyncio
import tempfile
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from aggregators import metrics
from aggregators.direct import make_processor
from deploy.settings import AggregatorSettings
from tests.integration.helpers import event, produce_batches, running_faust

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]


def test_outage_then_recovery_loses_and_doubles_nothing(kafka_bootstrap: str, topic: str, clickhouse) -> None:
    client, db = clickhouse
    now = datetime.now(UTC) - timedelta(minutes=10)
    first = [
        event(f"a{i}", "egress.download", {"workspace_id": "w", "artifact_id": f"x{i}", "bytes": i}, now, "t")
        for i in range(300)
    ]
    second = [
        event(f"b{i}", "egress.download", {"workspace_id": "w", "artifact_id": f"y{i}", "bytes": 7}, now, "t")
        for i in range(300)
    ]
    settings = AggregatorSettings(
        topic_events=topic,
        topic_dead_letter=f"{topic}.dlq",
        consumer_group=f"g-{topic}",
        batch_max_messages=10,
        batch_within_s=0.1,
        faust_data_dir=Path(tempfile.mkdtemp()),
        clickhouse_retry_max_s=0.5,
    )
    processor = make_processor(client, db)
    count = lambda: int(client.command(f"SELECT count() FROM {db}.events_raw"))  # noqa: E731
    errors_before = metrics.CLICKHOUSE_ERRORS._value.get()

    async def scenario() -> None:
        async with running_faust(settings, kafka_bootstrap, processor):
            produce_batches(kafka_bootstrap, topic, first, per_message=30)
            for _ in range(300):
                if count() == 300:
                    break
                await asyncio.sleep(0.1)
            # the outage: a derived table disappears, every batch fails at that step
            client.command(f"DETACH TABLE {db}.usage_1d")
            produce_batches(kafka_bootstrap, topic, second, per_message=30)
            await asyncio.sleep(4)
            assert metrics.CLICKHOUSE_ERRORS._value.get() > errors_before  # it really failed, and retried
            client.command(f"ATTACH TABLE {db}.usage_1d")
            for _ in range(300):
                if (
                    count() == 600
                    and client.command(
                        f"SELECT sum(value_count) FROM {db}.usage_1d WHERE meter = 'egress_bytes'"
                    )
                    == 600
                ):
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(1)

    asyncio.run(scenario())
    expected = Decimal(sum(range(300)) + 7 * 300)
    assert count() == 600
    for table in ("usage_15m", "usage_1h", "usage_1d", "usage_1mo"):
        got = client.query(
            f"SELECT sum(value_sum), sum(value_count) FROM {db}.{table} WHERE meter = 'egress_bytes'"
        ).result_rows[0]
        assert got == (expected, 600), table
