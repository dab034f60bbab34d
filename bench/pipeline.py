"""End-to-end pipeline benchmark: throughput, freshness, memory, and a bare consumer for scale."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import psutil

ROOT = Path(__file__).resolve().parents[1]


def _producer(
    bootstrap: str, topic: str, count: int, rate: float, per_message: int, prefix: str
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.produce",
            bootstrap,
            topic,
            str(count),
            str(rate),
            "20",
            str(per_message),
            prefix,
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
    )


def bare_consumer_rate(bootstrap: str, topic: str, events: int) -> float:
    """A plain confluent-kafka consumer reading every message of the topic (no decoding)."""
    from confluent_kafka import Consumer

    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bare-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    c.subscribe([topic])
    md = c.list_topics(topic, timeout=10)
    from confluent_kafka import TopicPartition

    ends = {
        p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
        for p in md.topics[topic].partitions
    }
    target = sum(ends.values())
    got, start, first = 0, time.perf_counter(), None
    while got < target:
        for m in c.consume(1000, timeout=1.0):
            if m.error():
                continue
            first = first or time.perf_counter()
            got += 1
        if time.perf_counter() - start > 300:
            break
    elapsed = time.perf_counter() - (first or start)
    c.close()
    return events / elapsed if elapsed > 0 else 0.0


def _close_kafka_clients(probe: Any, processor: Any) -> None:
    """Every Kafka client of the run closed: the benchmark stops its broker next, and an open
    client would keep logging "Connect ... failed" every second through the query benchmark."""
    probe.close()  # flushes first
    processor.dead_letters.close()
    processor.preflight.close()


async def run_pipeline(bootstrap: str, events: int, per_message: int = 500) -> dict[str, Any]:
    from aggregators.app import build_app
    from deploy.runner import build_processor
    from deploy.settings import RunSettings
    from schemas.clickhouse import connect
    from schemas.migrate import migrate

    topic = f"bench-{uuid.uuid4().hex[:8]}"
    from ingest.kafka_config import ensure_topics

    settings = RunSettings(
        clickhouse_dsn=f"chdb://{tempfile.mkdtemp(prefix='bench-chdb-')}",
        kafka_bootstrap_servers=bootstrap,
        topic_events=topic,
        topic_dead_letter=f"{topic}.dlq",
        consumer_group=f"bench-{topic}",
        batch_max_messages=100,
        batch_within_s=0.2,
        faust_data_dir=Path(tempfile.mkdtemp()),
    )
    ensure_topics(settings, bootstrap)
    client = connect(settings.clickhouse_dsn.get_secret_value(), settings.clickhouse_database)
    migrate(client, settings.clickhouse_database)
    proc = psutil.Process()
    processor = build_processor(settings, client, bootstrap)
    app = build_app(settings, bootstrap, processor)
    await app.start()
    await asyncio.sleep(3)  # group join
    rss_start = proc.memory_info().rss / 2**20
    db = settings.clickhouse_database

    def visible() -> int:
        return int(
            client.command(
                f"SELECT sum(value_count) FROM {db}.usage_15m WHERE meter IN "
                "('workstation_cpu_seconds','workstation_gpu_seconds','render_output_seconds',"
                "'egress_bytes','ai_tasks','gateway_requests','ci_step_cpu_seconds')"
            )
            or 0
        )

    # 1. throughput: produce as fast as possible; time until every event is in the period tables
    started = time.perf_counter()
    producer = _producer(bootstrap, topic, events, 0, per_message, "t")
    rss_samples = []
    while True:
        await asyncio.sleep(0.5)
        rss_samples.append(proc.memory_info().rss / 2**20)
        n = await asyncio.to_thread(visible)
        if n >= events or time.perf_counter() - started > 900:
            break
    e2e_seconds = time.perf_counter() - started
    producer.wait()
    produced = orjson.loads(producer.stdout.read() or b"{}") if producer.stdout else {}
    e2e_rate = events / e2e_seconds

    # 2. freshness at half the peak rate: a steady stream, and probes whose visibility we time
    rate = e2e_rate / 2
    duration = 20.0
    stream = _producer(
        bootstrap, topic, int(rate * duration), rate, max(1, min(per_message, int(rate / 20))), "f"
    )
    latencies = []
    from confluent_kafka import Producer

    probe = Producer(
        {"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all", "linger.ms": 0}
    )
    from datetime import UTC, datetime

    from schemas.wire import batch_headers, encode_batch

    t_end = time.perf_counter() + duration
    k = 0
    while time.perf_counter() < t_end:
        k += 1
        eid = f"probe-{k}"
        ev = {
            "specversion": "1.0",
            "id": eid,
            "source": "bench",
            "type": "egress.download",
            "tenant": "probe",
            "time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "data": {"workspace_id": "probe", "artifact_id": eid, "bytes": 1},
        }
        sent_at = time.perf_counter()
        probe.produce(topic, key=b"probe", value=encode_batch([ev]), headers=batch_headers())
        probe.flush(10)
        while time.perf_counter() - sent_at < 30:
            n = await asyncio.to_thread(
                client.command,
                f"SELECT sum(value_count) FROM {db}.usage_15m WHERE tenant = 'probe' AND meter = 'egress_bytes'",
            )
            if int(n or 0) >= k:
                latencies.append(time.perf_counter() - sent_at)
                break
            await asyncio.sleep(0.02)
        rss_samples.append(proc.memory_info().rss / 2**20)
        await asyncio.sleep(0.2)
    stream.wait()
    rss_end = proc.memory_info().rss / 2**20
    app.metering_stopping.set()
    await app.stop()
    _close_kafka_clients(probe, processor)
    latencies.sort()
    pct = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None  # noqa: E731
    return {
        "topic": topic,
        "events": events,
        "produce_seconds": produced.get("seconds"),
        "e2e_seconds": e2e_seconds,
        "e2e_events_per_s": e2e_rate,
        "freshness_rate_events_per_s": rate,
        "freshness_probes": len(latencies),
        "freshness_p50_s": pct(0.5),
        "freshness_p99_s": pct(0.99),
        "rss_mb_start": rss_start,
        "rss_mb_end": rss_end,
        "rss_mb_max": max(rss_samples) if rss_samples else rss_end,
        # RSS at each quarter of the run: flat means it stops growing, not that it never grew
        # (the embedded ClickHouse engine allocates its caches and arenas on first use).
        "rss_mb_quarters": [
            round(rss_samples[min(len(rss_samples) - 1, len(rss_samples) * q // 4)]) for q in (1, 2, 3, 4)
        ]
        if rss_samples
        else [],
    }
