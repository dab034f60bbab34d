"""A real aggregator process for the crash tests (``python -m tests.integration.aggregator_proc``).

``run DSN BOOTSTRAP TOPIC GROUP``: the faust agent on its own embedded ClickHouse directory,
until the group's committed offsets reach the end of every partition (exit 0), or until a
crash point kills it. ``dump DSN``: the content of every table as canonical JSON, for comparing
a crashed-and-restarted run with a clean one.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson


def caught_up(bootstrap: str, topic: str, group: str) -> bool:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        parts = []
        for name in (topic, f"{topic}.control"):  # the usage topic and its control topic
            md = c.list_topics(name, timeout=10)
            if name in md.topics and md.topics[name].error is None:
                parts += [TopicPartition(name, p) for p in md.topics[name].partitions]
        committed = {(tp.topic, tp.partition): tp.offset for tp in c.committed(parts, timeout=10)}
        for tp in parts:
            _lo, hi = c.get_watermark_offsets(tp, timeout=10)
            if hi > 0 and committed.get((tp.topic, tp.partition), -1) < hi:
                return False
        return True
    finally:
        c.close()


async def run(dsn: str, bootstrap: str, topic: str, group: str) -> None:
    from aggregators.app import build_app
    from deploy.runner import build_processor
    from deploy.settings import RunSettings
    from schemas.clickhouse import connect
    from schemas.migrate import migrate

    settings = RunSettings(
        clickhouse_dsn=dsn,
        kafka_bootstrap_servers=bootstrap,
        topic_events=topic,
        topic_dead_letter=f"{topic}.dlq",
        consumer_group=group,
        batch_max_messages=4,
        batch_within_s=0.1,
        faust_data_dir=Path(tempfile.mkdtemp()),
    )
    client = connect(dsn, settings.clickhouse_database)
    migrate(client, settings.clickhouse_database)
    app = build_app(settings, bootstrap, build_processor(settings, client, bootstrap))
    await app.start()
    try:
        idle = 0
        while idle < 3:
            await asyncio.sleep(1.0)
            idle = idle + 1 if await asyncio.to_thread(caught_up, bootstrap, topic, group) else 0
    finally:
        app.metering_stopping.set()
        await app.stop()


def dump(dsn: str) -> dict[str, Any]:
    from schemas.clickhouse import connect

    c = connect(dsn, "metering")
    q = lambda sql: [list(map(str, r)) for r in c.query(sql).result_rows]  # noqa: E731
    out: dict[str, Any] = {
        "raw": q(
            "SELECT tenant, event_id, type, subject, time, data, src_partition, src_offset "
            "FROM metering.events_raw ORDER BY tenant, event_id"
        ),
        "entities": q(
            "SELECT tenant, kind, entity_id, workspace_id, parent_id, contract_id, name, email, tier, "
            "status, secret_hash, expires_at, attrs, created_at, updated_at "
            "FROM metering.entities FINAL ORDER BY tenant, kind, entity_id"
        ),
        "gauge_15m": q(
            "SELECT tenant, meter, window_start, group_key, series, integral, samples "
            "FROM metering.gauge_15m FINAL ORDER BY tenant, meter, window_start, group_key, series"
        ),
        # without FINAL: written once per source position, whatever crashed (aggregators/rejections.py)
        "rejections": q(
            "SELECT tenant, event_id, code, origin, src_partition, src_offset, src_index, received_at "
            "FROM metering.rejections ORDER BY src_partition, src_offset, src_index"
        ),
        # the dedupe's lookup: one row per raw row (keys within raw), and up to which offset
        "event_keys": q(
            "SELECT tenant, event_id, src_partition, src_offset "
            "FROM metering.event_keys ORDER BY tenant, event_id, src_partition, src_offset"
        ),
        "event_key_watermarks": q(
            "SELECT src_partition, src_offset FROM metering.event_key_watermarks ORDER BY src_partition"
        ),
        "event_duplicates": q(
            "SELECT tenant, event_id, src_partition, src_offset, nth, received_at "
            "FROM metering.event_duplicates ORDER BY src_partition, src_offset, tenant, event_id, nth"
        ),
    }
    for t in ("usage_15m", "usage_1h", "usage_1d", "usage_1mo"):
        out[t] = q(
            "SELECT tenant, meter, window_start, group_key, sum(value_sum), sum(value_count), min(value_min), "
            "max(value_max), argMaxMerge(value_latest), uniqExactMerge(value_unique) "
            f"FROM metering.{t} GROUP BY tenant, meter, window_start, group_key "
            "ORDER BY tenant, meter, window_start, group_key"
        )
    return out


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "run":
        asyncio.run(run(*args))
    elif cmd == "dump":
        sys.stdout.write(orjson.dumps(dump(args[0])).decode())
    else:
        raise SystemExit(f"unknown command {cmd}")
