"""The watchdog heals a stall injected on purpose into the real faust consumer (real broker, real
engine): a partition whose fetch is paused is sought back and resumed within the timeout; one
that a reseek cannot resume gets the aggregator part restarted. Every event is counted once."""

from __future__ import annotations

import asyncio
import tempfile
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from faust.types import TP

from aggregators.direct import make_processor
from aggregators.supervisor import AggregatorPart
from aggregators.watchdog import STALLS, Action
from deploy.settings import AggregatorSettings
from tests.integration.helpers import egress_events, produce_batches, running_faust

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.slow]

TIMEOUT_S = 2.0


def _events(prefix: str, n: int, tenants: int = 8) -> list[dict]:
    return egress_events(prefix, n, tenants)


def _settings(topic: str) -> AggregatorSettings:
    return AggregatorSettings(
        topic_events=topic,
        topic_dead_letter=f"{topic}.dlq",
        consumer_group=f"watchdog-{topic}",
        batch_max_messages=5,
        batch_within_s=0.1,
        faust_data_dir=Path(tempfile.mkdtemp()),
        consumer_session_timeout_s=6,
        clickhouse_retry_max_s=1,
        stall_timeout_s=TIMEOUT_S,
    )


async def _until(pred: Any, timeout: float = 60.0) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if await asyncio.to_thread(pred):
            return True
        await asyncio.sleep(0.25)
    return bool(await asyncio.to_thread(pred))


def _totals(client: Any, db: str) -> tuple:
    return client.query(
        f"SELECT sum(value_sum), sum(value_count) FROM {db}.usage_1d WHERE meter = 'egress_bytes'"
    ).result_rows[0]


def _expected(evs: list[dict]) -> tuple:
    return Decimal(sum(e["data"]["bytes"] for e in evs)), len(evs)


def _busy_partition(client: Any, db: str) -> int:
    return int(
        client.command(
            f"SELECT src_partition FROM {db}.events_raw GROUP BY src_partition ORDER BY count() DESC LIMIT 1"
        )
    )


def _stalls(action: Action) -> float:
    return STALLS.labels(action.value)._value.get()


def test_a_paused_partition_is_sought_back_and_resumed_within_the_timeout(
    kafka_bootstrap: str, topic: str, clickhouse: Any
) -> None:
    client, db = clickhouse
    first, second = _events("a", 400), _events("b", 400)
    reseeks, restarts = _stalls(Action.RESEEK), _stalls(Action.RESTART)

    async def scenario() -> None:
        produce_batches(kafka_bootstrap, topic, first, per_message=20)
        async with running_faust(_settings(topic), kafka_bootstrap, make_processor(client, db)) as app:
            assert await _until(lambda: _totals(client, db)[1] == 400)
            # the injected stall: the consumer stops fetching one partition it owns
            tp = TP(topic, _busy_partition(client, db))
            app.consumer.pause_partitions([tp])
            paused_at = asyncio.get_running_loop().time()
            await asyncio.to_thread(produce_batches, kafka_bootstrap, topic, second, 20)
            # detected after TIMEOUT_S without progress, healed by the reseek (no restart here)
            assert await _until(lambda: _totals(client, db)[1] == 800, timeout=30)
            healed_in = asyncio.get_running_loop().time() - paused_at
            assert _stalls(Action.RESEEK) > reseeks
            assert _stalls(Action.RESTART) == restarts  # the first action healed it
            assert tp not in app.consumer._paused_partitions
            assert healed_in < 10 * TIMEOUT_S, healed_in
            await asyncio.sleep(1)  # anything counted twice would show up now

    asyncio.run(scenario())
    assert int(client.command(f"SELECT count() FROM {db}.events_raw")) == 800
    assert _totals(client, db) == _expected(first + second)


def test_a_stall_a_reseek_cannot_heal_restarts_the_aggregator_part(
    kafka_bootstrap: str, topic: str, clickhouse: Any
) -> None:
    client, db = clickhouse
    first, second = _events("c", 400), _events("d", 400)
    restarts = _stalls(Action.RESTART)

    async def scenario() -> None:
        produce_batches(kafka_bootstrap, topic, first, per_message=20)
        part = AggregatorPart(_settings(topic), kafka_bootstrap, make_processor(client, db))
        await part.start()
        try:
            assert await _until(lambda: _totals(client, db)[1] == 400)
            stuck = part.app
            assert stuck is not None
            tp = TP(topic, _busy_partition(client, db))
            stuck.consumer.pause_partitions([tp])
            stuck.consumer.resume_partitions = lambda tps: None  # type: ignore[method-assign]
            await asyncio.to_thread(produce_batches, kafka_bootstrap, topic, second, 20)
            assert await _until(lambda: _totals(client, db)[1] == 800, timeout=60)
            assert part.restarts >= 1 and part.app is not stuck
            assert _stalls(Action.RESTART) > restarts
            await asyncio.sleep(1)
        finally:
            await part.stop()

    asyncio.run(scenario())
    assert int(client.command(f"SELECT count() FROM {db}.events_raw")) == 800
    assert _totals(client, db) == _expected(first + second)
