"""Exactly once across a broker crash and restart, and across rebalances between aggregators."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
from decimal import Decimal
from pathlib import Path

import pytest

from aggregators.direct import make_processor
from deploy.kafka import local_broker
from deploy.settings import AggregatorSettings
from tests.integration.helpers import egress_events, produce_batches, running_faust, until

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.slow]


def _events(prefix: str, n: int, tenants: int = 6) -> list[dict]:
    return egress_events(prefix, n, tenants)


def _settings(topic: str, group: str) -> AggregatorSettings:
    return AggregatorSettings(
        topic_events=topic,
        topic_dead_letter=f"{topic}.dlq",
        consumer_group=group,
        batch_max_messages=5,
        batch_within_s=0.1,
        faust_data_dir=Path(tempfile.mkdtemp()),
        consumer_session_timeout_s=6,
        clickhouse_retry_max_s=1,
    )


async def _until(pred, timeout: float = 120.0) -> bool:
    return await until(pred, timeout)


def _totals(client, db: str) -> tuple:
    return client.query(
        f"SELECT sum(value_sum), sum(value_count) FROM {db}.usage_1d WHERE meter = 'egress_bytes'"
    ).result_rows[0]


def _expected(evs: list[dict]) -> tuple:
    return Decimal(sum(e["data"]["bytes"] for e in evs)), len(evs)


def test_broker_killed_and_restarted_mid_stream(clickhouse) -> None:
    client, db = clickhouse
    data_dir = Path(tempfile.mkdtemp(prefix="broker-restart-"))
    port = local_broker.find_free_port()
    bootstrap = local_broker.start(port=port, data_dir=data_dir)
    topic = "restart-events"
    first, second = _events("a", 2000), _events("b", 2000)
    try:
        from ingest.kafka_config import ensure_topics

        ensure_topics(
            _settings(topic, "g").model_copy(update={"kafka_bootstrap_servers": bootstrap}), bootstrap
        )
        produce_batches(bootstrap, topic, first, per_message=50)
        processor = make_processor(client, db)
        count = lambda: int(client.command(f"SELECT count() FROM {db}.events_raw"))  # noqa: E731

        async def scenario() -> None:
            async with running_faust(_settings(topic, "restart"), bootstrap, processor):
                assert await _until(lambda: count() >= 1000)
                # the broker dies without warning, in the middle of the stream
                os.kill(local_broker.status(data_dir).pid, signal.SIGKILL)
                await asyncio.sleep(3)
                assert local_broker.start(port=port, data_dir=data_dir) == bootstrap
                await asyncio.to_thread(produce_batches, bootstrap, topic, second, 50)
                assert await _until(lambda: _totals(client, db)[1] == 4000, timeout=180)
                await asyncio.sleep(2)  # anything counted twice would show up now

        asyncio.run(scenario())
        assert count() == 4000
        assert _totals(client, db) == _expected(first + second)
    finally:
        local_broker.stop(data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)


def test_rebalances_between_two_aggregators(kafka_bootstrap: str, topic: str, clickhouse) -> None:
    """Two aggregators in one consumer group: a second one joins (partitions move to it), then
    the first leaves (they move back). Every event is counted once."""
    client, db = clickhouse
    parts = [_events(p, 1500) for p in ("x", "y", "z")]
    group = f"rebalance-{topic}"
    done = lambda n: _totals(client, db)[1] == n  # noqa: E731
    raw_count = lambda: int(client.command(f"SELECT count() FROM {db}.events_raw"))  # noqa: E731

    async def scenario() -> None:
        produce_batches(kafka_bootstrap, topic, parts[0], per_message=30)
        async with running_faust(_settings(topic, group), kafka_bootstrap, make_processor(client, db)):
            assert await _until(lambda: _totals(client, db)[1] or 0)
            proc2 = make_processor(client, db)
            second = running_faust(_settings(topic, group), kafka_bootstrap, proc2)
            await second.__aenter__()
            try:
                # the rebalance really happens: the newcomer is given partitions (wait for it, or
                # the first aggregator may have consumed everything before the group settles)
                assert await _until(lambda: bool(proc2.owned), timeout=60)
                await asyncio.to_thread(produce_batches, kafka_bootstrap, topic, parts[1], 30)
                assert await _until(lambda: done(3000))
            finally:
                await second.__aexit__(None, None, None)
            await asyncio.to_thread(produce_batches, kafka_bootstrap, topic, parts[2], 30)
            converged = await _until(lambda: raw_count() == 4500 and done(4500))
            if not converged:
                await asyncio.sleep(3)
            # Never counted twice, converged or not: the period tables hold at most what the raw
            # table holds (before the ownership rules in aggregators/app.py, two owners of one
            # partition rolled the same raw rows up twice: 5,000-5,550 against 4,500).
            assert _totals(client, db)[1] <= raw_count()
            # And the partitions handed back are resumed (issue 8: faust dropped the messages
            # re-read after a partition was sought back; docs/exactly-once.md, "Liveness").
            assert converged, "partitions handed back after a member left were not resumed in 120 s"
            await asyncio.sleep(2)

    asyncio.run(scenario())
    assert int(client.command(f"SELECT count() FROM {db}.events_raw")) == 4500
    assert _totals(client, db) == _expected(parts[0] + parts[1] + parts[2])
