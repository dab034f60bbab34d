"""The hand-back stall of issue 8, made deterministic (docs/exactly-once.md, "Liveness").

A skips events of partitions that went to B (its take buffer still held them when they were
revoked) and must read them again from the first one skipped if it owns those partitions again.
B applies them and commits past that offset, then leaves; A is given the partitions back. A seeks
them back to the first offset it skipped; faust, resuming the streams after the rebalance, seeks
every partition to its committed offset. If faust's seek came second, A read from B's committed
offset, which is past the offset A waits for: every event was left for later, forever. Here
faust's seek is delayed so that it always comes second; the watchdog is kept out of the way.

Liveness is judged by progress, not by a deadline: the test fails when the applied count stops
moving (a stall), not when a loaded machine applies slowly (under load a batch of this test takes
over a second of ClickHouse work, and a fixed minute for the last phase failed with batches still
being applied).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from aggregators.direct import make_processor
from deploy.settings import AggregatorSettings
from tests.integration.helpers import consume_all, egress_events, produce_batches, running_faust, until

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.slow]


def _events(prefix: str, n: int, tenants: int = 12) -> list[dict]:
    return egress_events(prefix, n, tenants)


def _settings(topic: str) -> AggregatorSettings:
    return AggregatorSettings(
        topic_events=topic,
        topic_dead_letter=f"{topic}.dlq",
        consumer_group=f"handback-{topic}",
        batch_max_messages=5,
        batch_within_s=0.1,
        faust_data_dir=Path(tempfile.mkdtemp()),
        consumer_session_timeout_s=6,
        clickhouse_retry_max_s=1,
        stall_timeout_s=3600,  # the watchdog would heal the stall: out of the way
    )


async def _until(pred: Any, timeout: float = 60.0) -> bool:
    return await until(pred, timeout)


async def _until_all_applied(
    client: Any, db: str, want: int, still_s: float = 30.0, cap_s: float = 300.0
) -> bool:
    """Until ``want`` events are counted; False as soon as the count has not moved for ``still_s``
    (a stall: nothing applied), or after ``cap_s`` in all."""
    loop = asyncio.get_running_loop()
    start = moved = loop.time()
    last = -1
    while loop.time() - start < cap_s:
        n = int((await asyncio.to_thread(_totals, client, db))[1] or 0)
        if n == want:
            return True
        if n != last:
            last, moved = n, loop.time()
        elif loop.time() - moved > still_s:
            return False
        await asyncio.sleep(0.5)
    return False


def _per_lane(client: Any, db: str) -> dict[int, int]:
    rows = client.query(
        f"SELECT src_partition, count() FROM {db}.events_raw GROUP BY src_partition"
    ).result_rows
    return {int(p): int(n) for p, n in rows}


def _totals(client: Any, db: str) -> tuple:
    return client.query(
        f"SELECT sum(value_sum), sum(value_count) FROM {db}.usage_1d WHERE meter = 'egress_bytes'"
    ).result_rows[0]


def test_partitions_handed_back_are_resumed_when_faust_seeks_to_committed_offsets_last(
    kafka_bootstrap: str, topic: str, clickhouse: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aggregators.app")
    client, db = clickhouse
    evs, later = _events("h", 1200), _events("k", 600)
    produce_batches(kafka_bootstrap, topic, evs, per_message=10)
    produced: dict[int, int] = {}
    for m in consume_all(kafka_bootstrap, topic):
        produced[m.partition] = produced.get(m.partition, 0) + len(m.value.split(b'"specversion"')) - 1
    assert sum(produced.values()) == 1200 and len(produced) >= 3

    slow = {"on": True}
    held = threading.Event()  # A's second batch is waiting: B may join
    proc_a = make_processor(client, db)
    apply = proc_a.process_with_retry
    batches = {"a": 0}

    def slow_apply(messages: Any, give_up: Any, max_backoff_s: float, *ahead: Any) -> Any:
        # After its first batch, A's batches wait (as if ClickHouse were down) until their
        # partitions are revoked when B joins (the batch is given up: A will read it again from
        # its first offset) or until the test lets them through.
        while batches["a"] and slow["on"]:
            held.set()
            if give_up():
                return None
            time.sleep(0.05)
        batches["a"] += 1
        return apply(messages, give_up, max_backoff_s, *ahead)

    proc_a.process_with_retry = slow_apply  # type: ignore[method-assign]
    proc_b = make_processor(client, db)

    async def scenario() -> None:
        async with running_faust(_settings(topic), kafka_bootstrap, proc_a) as a:
            assert await _until(lambda: sum(_per_lane(client, db).values()) > 0)
            # B joins while A's second batch is held, so that A gives it up (not before it began)
            assert await _until(held.is_set)
            b = running_faust(_settings(topic), kafka_bootstrap, proc_b)
            await b.__aenter__()
            try:
                assert await _until(lambda: bool(proc_b.owned), timeout=60)
                gone = set(proc_b.owned)
                # B applies its partitions to the end and commits
                done_b = lambda: all(_per_lane(client, db).get(p, 0) == produced.get(p, 0) for p in gone)  # noqa: E731
                assert await _until(done_b, timeout=90)
                await asyncio.sleep(2.5)  # B's commit interval is 1 s
                slow["on"] = False
                # faust's own seek to the committed offsets comes after A's rewind
                consumer: Any = a.consumer
                seek_to_committed = consumer.perform_seek

                async def late_perform_seek() -> None:
                    await asyncio.sleep(2.0)
                    await seek_to_committed()

                consumer.perform_seek = late_perform_seek
            finally:
                await b.__aexit__(None, None, None)  # B leaves: its partitions go back to A
            # new events on every partition, B's included: offsets past B's committed ones
            await asyncio.to_thread(produce_batches, kafka_bootstrap, topic, later, 10)
            assert await _until_all_applied(client, db, 1800), (
                f"partitions handed back not resumed: {_per_lane(client, db)}"
            )
            await asyncio.sleep(1)

    asyncio.run(scenario())
    said = caplog.text
    # the scenario happened: A gave a batch up and sought partitions back to where it began
    assert "given up: its partitions were reassigned" in said and "rewinding" in said
    assert int(client.command(f"SELECT count() FROM {db}.events_raw")) == 1800
    assert _totals(client, db) == (Decimal(sum(e["data"]["bytes"] for e in evs + later)), 1800)


def test_stopping_waits_for_the_batch_being_applied_before_the_processor_can_be_closed(
    kafka_bootstrap: str, topic: str, clickhouse: Any
) -> None:
    """The app stops while a batch is applied in its thread: faust cancels the agent, but the
    thread goes on, and the stop returns only once it has ended. Closing the processor right after
    the stop (what ``metering run`` and the bench do) then drops no table under a batch (before:
    UNKNOWN_TABLE half-way through it, raw rows written and period rows not). Once the stop
    has returned, every event of the batch is counted in the period tables too."""
    client, db = clickhouse
    events = _events("s", 100)
    processor = make_processor(client, db)
    apply = processor.process_with_retry
    started, ended = threading.Event(), threading.Event()

    def slow_apply(*args: Any, **kwargs: Any) -> Any:
        started.set()
        time.sleep(3)  # the stop comes meanwhile
        try:
            return apply(*args, **kwargs)
        finally:
            ended.set()

    processor.process_with_retry = slow_apply  # type: ignore[method-assign]

    async def scenario() -> None:
        produce_batches(kafka_bootstrap, topic, events, per_message=20)
        async with running_faust(_settings(topic), kafka_bootstrap, processor):
            assert await _until(started.is_set, 60)
        assert ended.is_set(), "the stop returned while the batch was still being applied"
        processor.close()

    asyncio.run(scenario())
    raw = int(client.command(f"SELECT count() FROM {db}.events_raw"))
    assert raw > 0
    assert _totals(client, db)[1] == raw  # what was written raw is in the period tables too
