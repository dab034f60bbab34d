"""End-to-end pipeline benchmark: throughput, freshness, memory, and a bare consumer for scale."""

from __future__ import annotations

import asyncio
import ctypes
import os
import re
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


def rss_parts(client: Any) -> dict[str, float]:
    """What this process's RSS is made of, MiB: anonymous memory (Python's heaps and the engine's
    jemalloc), file-backed pages (code of the engine's library touched so far: it grows as new
    code runs and is not an allocation), the engine's own tracked allocations
    (``MemoryTracking``: its tables in memory, caches, running statements), its jemalloc's
    resident pages, and glibc's heaps and separately mapped blocks (``glibc_heaps``)."""
    parts: dict[str, float] = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("RssAnon:", "RssFile:")):
                parts[line[3:7].lower()] = round(int(line.split()[1]) / 1024, 1)
    tracked = client.command("SELECT value FROM system.metrics WHERE metric = 'MemoryTracking'")
    parts["engine_tracked"] = round(int(tracked or 0) / 2**20, 1)
    # the engine's allocator: what its jemalloc keeps resident (live, and freed pages not yet
    # returned); the rest of the anonymous memory is glibc's (Python, librdkafka, aiokafka)
    try:
        stats = "\n".join(str(r[0]) for r in client.query("SELECT * FROM system.jemalloc_stats").result_rows)
        found = re.search(r"^Allocated: \d+, active: \d+, .*?resident: (\d+)", stats, re.M)
        if found:
            parts["engine_allocator_resident"] = round(int(found.group(1)) / 2**20, 1)
    except Exception:  # a breakdown, not the figure: an engine without the table
        pass
    heaps = glibc_heaps()
    if heaps:
        parts.update(heaps)
    return parts


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def glibc_heaps() -> dict[str, float]:
    """glibc's malloc, every arena (``mallinfo2``), MiB: its heaps (in use and free, kept) and its
    blocks mapped on their own. Empty on another C library."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return {}
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return {
        "glibc_heaps_in_use": round(info.uordblks / 2**20, 1),
        "glibc_heaps_free": round(info.fordblks / 2**20, 1),
        "glibc_mapped_blocks": round(info.hblkhd / 2**20, 1),
    }


def _producer(
    bootstrap: str, topic: str, count: int, rate: float, per_message: int, prefix: str
) -> subprocess.Popen[bytes]:
    child = subprocess.Popen(
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
    _producers.append(child)
    return child


_producers: list[subprocess.Popen[bytes]] = []


def stop_producers() -> None:
    """Kill the producer processes still running (a phase failed): each would keep logging
    "Connect ... failed" once the benchmark's broker stops."""
    while _producers:
        child = _producers.pop()
        if child.poll() is None:
            child.kill()
            child.wait()


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


def _close_kafka_clients(opened: list[Any], processor: Any) -> None:
    """Every Kafka client of the run closed: the benchmark stops its broker next, and an open
    client would keep logging "Connect ... failed" every second through the query benchmark."""
    for c in opened:
        if c is not None:
            c.close()  # a producer flushes first
    processor.dead_letters.close()
    processor.preflight.close()


class StageClock:
    """Where the aggregator's time goes over a phase, per event (``stage_us_per_event``).

    The processor's own stages come from ``BatchProcessor.timings`` (its keys read as they are:
    they change with the processor). Around them, without touching the agent's code:
    - ``fetch``: from one ``process_with_retry`` call's return to the next call, i.e. the agent
      acknowledging the batch, waiting on the stream and taking the next batch (the instance's
      method is wrapped: the agent looks it up for each batch);
    - ``other``: inside ``process_with_retry`` but in no timed stage (the watermarks, the retry);
    - ``commit``: faust committing offsets (``app.consumer.commit`` wrapped). It runs on the
      event loop while a batch is applied in a thread: the stages overlap, so they need not add
      up to the end-to-end time.
    All are wall seconds; the CPU figure is ``aggregator_cpu_us_per_event``."""

    def __init__(self, processor: Any, app: Any) -> None:
        self.processor = processor
        self.seconds: dict[str, float] = {"fetch": 0.0, "other": 0.0, "commit": 0.0}
        self._returned: float | None = None
        call = processor.process_with_retry

        def process_with_retry(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            if self._returned is not None:
                self.seconds["fetch"] += t0 - self._returned
            before = sum(processor.timings.values())
            try:
                return call(*args, **kwargs)
            finally:
                t1 = self._returned = time.perf_counter()
                self.seconds["other"] += max(0.0, t1 - t0 - (sum(processor.timings.values()) - before))

        processor.process_with_retry = process_with_retry
        consumer = app.consumer
        commit = consumer.commit

        async def timed_commit(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await commit(*args, **kwargs)
            finally:
                self.seconds["commit"] += time.perf_counter() - t0

        consumer.commit = timed_commit

    def snapshot(self) -> dict[str, float]:
        return {**self.processor.timings, **self.seconds}

    def idle(self) -> None:
        """Between phases: the wait for the next phase's first batch is not fetching."""
        self._returned = None

    @staticmethod
    def per_event(before: dict[str, float], after: dict[str, float], events: int) -> dict[str, float]:
        return {k: round((after[k] - before.get(k, 0.0)) / events * 1e6, 2) for k in after}


def cpu_seconds(proc: psutil.Process) -> float:
    """This process's user + system CPU seconds, all threads (the engine's too), children not."""
    t = proc.cpu_times()
    return float(t.user + t.system)


PERIOD_TABLES = ("usage_15m", "usage_1h", "usage_1d", "usage_1mo")


def period_fingerprint(client: Any, db: str) -> list[Any]:
    """What the period tables hold, independent of merges: per table the sums of its summed
    columns and the number of distinct keys; the raw table's row count."""
    out: list[Any] = []
    for table in PERIOD_TABLES:
        out.append(
            client.query(
                f"SELECT sum(value_count), sum(value_sum), uniqExact(tenant, meter, window_start, group_key) "
                f"FROM {db}.{table}"
            ).result_rows[0]
        )
    out.append(
        client.query(f"SELECT count(), sum(integral), sum(samples) FROM {db}.gauge_15m FINAL").result_rows[0]
    )
    out.append(client.command(f"SELECT count() FROM {db}.events_raw"))
    return out


class CommittedLag:
    """Messages of a topic past a group's committed offsets (0: everything consumed). One
    consumer that never joins the group, reused (each new client costs threads and CPU)."""

    def __init__(self, bootstrap: str, group: str, topic: str) -> None:
        from confluent_kafka import Consumer, TopicPartition

        self.consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False}
        )
        parts = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self.tps = [TopicPartition(topic, p) for p in parts]

    def __call__(self) -> int:
        committed = {tp.partition: tp.offset for tp in self.consumer.committed(self.tps, timeout=10)}
        lag = 0
        for tp in self.tps:
            low, high = self.consumer.get_watermark_offsets(tp, timeout=10)
            done = committed.get(tp.partition, -1)
            lag += high - (done if done >= 0 else low)
        return lag

    def close(self) -> None:
        self.consumer.close()


def bench_settings(bootstrap: str, topic: str, dsn: str, **more: Any) -> Any:
    """The benchmarks' aggregator: its own topic and group; everything else the product's
    defaults (batch size, fetch-ahead, engine caps), or the ``METERING_*`` variables set in the
    environment (e.g. ``METERING_BATCH_MAX_MESSAGES``), so that what is measured is what runs."""
    from deploy.settings import RunSettings

    return RunSettings(
        clickhouse_dsn=dsn,
        kafka_bootstrap_servers=bootstrap,
        topic_events=topic,
        topic_dead_letter=f"{topic}.dlq",
        consumer_group=f"bench-{topic}",
        faust_data_dir=Path(tempfile.mkdtemp(prefix="bench-faust-")),
        **more,
    )


async def run_pipeline(bootstrap: str, events: int, per_message: int = 500) -> dict[str, Any]:
    from aggregators import metrics
    from aggregators.app import build_app
    from deploy import collector
    from deploy.runner import build_processor
    from schemas.clickhouse import connect
    from schemas.migrate import migrate

    topic = f"bench-{uuid.uuid4().hex[:8]}"
    from ingest.kafka_config import ensure_topics

    settings = bench_settings(bootstrap, topic, f"chdb://{tempfile.mkdtemp(prefix='bench-chdb-')}")
    ensure_topics(settings, bootstrap)
    client = connect(settings.clickhouse_dsn.get_secret_value(), settings.clickhouse_database)
    migrate(client, settings.clickhouse_database)
    proc = psutil.Process()
    processor = build_processor(settings, client, bootstrap)
    app = build_app(settings, bootstrap, processor)
    await app.start()
    opened: list[Any] = [None]  # the probe producer, then the lag reader: closed whatever happens
    try:
        clock = StageClock(processor, app)
        await asyncio.sleep(3)  # group join
        collector.freeze_startup()  # as deploy/runner.py once the process serves
        rss_start = proc.memory_info().rss / 2**20
        rss_start_parts = rss_parts(client)
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
        # (a run too slow for that fails rather than report a rate of what was not counted)
        patience = max(900.0, events / 2000)
        clock.idle()
        stages_before, cpu_before = clock.snapshot(), cpu_seconds(proc)
        batches_before, ahead_before = metrics.BATCHES._value.get(), processor.prepared_ahead
        started = time.perf_counter()
        producer = _producer(bootstrap, topic, events, 0, per_message, "t")
        rss_samples = []
        while True:
            await asyncio.sleep(0.5)
            rss_samples.append(proc.memory_info().rss / 2**20)
            n = await asyncio.to_thread(visible)
            if n >= events:
                break
            if time.perf_counter() - started > patience:
                raise RuntimeError(f"only {n:,} of {events:,} events counted after {patience:.0f} s")
        e2e_seconds = time.perf_counter() - started
        cpu_e2e = cpu_seconds(proc) - cpu_before
        stages = StageClock.per_event(stages_before, clock.snapshot(), events)
        # batches applied, and of them those parsed and judged while the one before was applied
        batches = (
            int(metrics.BATCHES._value.get() - batches_before),
            processor.prepared_ahead - ahead_before,
        )
        producer.wait()
        produced = orjson.loads(producer.stdout.read() or b"{}") if producer.stdout else {}
        e2e_rate = events / e2e_seconds

        # 1b. the same events again (same ids, tenants and keys, later in the log: a producer's retry
        # storm). They add nothing to the period tables, so the time is until the aggregator's
        # committed offsets reach the log end; the period tables must not have changed (exactness).
        lag = CommittedLag(bootstrap, settings.consumer_group, topic)
        opened.append(lag)
        deadline = time.perf_counter() + 120
        while await asyncio.to_thread(lag):
            if time.perf_counter() > deadline:
                raise RuntimeError("the first phase's offsets were not all committed within 120 s")
            await asyncio.sleep(0.5)
        before = await asyncio.to_thread(period_fingerprint, client, db)
        clock.idle()
        stages_before, cpu_before = clock.snapshot(), cpu_seconds(proc)
        started = time.perf_counter()
        again = _producer(bootstrap, topic, events, 0, per_message, "t")
        while True:
            await asyncio.sleep(0.5)
            rss_samples.append(proc.memory_info().rss / 2**20)
            done = again.poll() is not None
            if done and not await asyncio.to_thread(lag):
                break
            if time.perf_counter() - started > patience:
                raise RuntimeError(f"the duplicates were not all consumed within {patience:.0f} s")
        duplicate_seconds = time.perf_counter() - started
        duplicate_cpu = cpu_seconds(proc) - cpu_before
        duplicate_stages = StageClock.per_event(stages_before, clock.snapshot(), events)
        after = await asyncio.to_thread(period_fingerprint, client, db)
        if after != before:
            raise RuntimeError(f"duplicates changed the period tables: {before} -> {after}")
        clock.idle()

        # 2. freshness at half the peak rate: a steady stream, and probes whose visibility we time.
        # The probe producer is long-lived, as a service's producer is: its first message (the
        # broker connection and the idempotent producer's id, ~0.5 s here) is sent and seen before
        # the stream starts, untimed. Probes sent in the stream's first BENCH_FRESHNESS_RAMP_S
        # seconds (the step from idle to half the peak, while the aggregator's batches grow to
        # the rate) are reported apart; the p50 and p99 are over the steady stream's probes.
        rate = e2e_rate / 2
        duration = 20.0
        ramp = float(os.environ.get("BENCH_FRESHNESS_RAMP_S", "3"))
        from datetime import UTC, datetime

        from confluent_kafka import Producer

        from schemas.wire import batch_headers, encode_batch

        probe = opened[0] = Producer(
            {"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all", "linger.ms": 0}
        )

        async def probed(k: int) -> tuple[float, float | None]:
            """Probe ``k`` (the k+1-th): (produce -> acknowledged, produce -> visible; None if
            not seen within 30 s)."""
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
            acked = time.perf_counter() - sent_at
            while time.perf_counter() - sent_at < 30:
                n = await asyncio.to_thread(
                    client.command,
                    f"SELECT sum(value_count) FROM {db}.usage_15m WHERE tenant = 'probe' AND meter = 'egress_bytes'",
                )
                if int(n or 0) >= k + 1:
                    return acked, time.perf_counter() - sent_at
                await asyncio.sleep(0.02)
            return acked, None

        warm_acked, warm_seen = await probed(0)
        if warm_seen is None:
            raise RuntimeError("the first probe was not counted within 30 s")
        stream = _producer(
            bootstrap,
            topic,
            int(rate * (ramp + duration)),
            rate,
            max(1, min(per_message, int(rate / 20))),
            "f",
        )
        stream_started = time.perf_counter()
        latencies: list[float] = []
        acked: list[float] = []  # produce -> acknowledged by the broker: Kafka's share of a probe
        ramp_latencies: list[float] = []
        k = 0
        while time.perf_counter() < stream_started + ramp + duration:
            k += 1
            in_ramp = time.perf_counter() - stream_started < ramp
            ack_s, seen_s = await probed(k)
            if seen_s is None:
                raise RuntimeError(f"probe {k} was not counted within 30 s")
            if in_ramp:
                ramp_latencies.append(seen_s)
            else:
                acked.append(ack_s)
                latencies.append(seen_s)
            rss_samples.append(proc.memory_info().rss / 2**20)
            await asyncio.sleep(0.2)
        stream.wait()
        rss_end = proc.memory_info().rss / 2**20
        rss_end_parts = rss_parts(client)
        # and once the aggregator has gone idle (every event counted, then 3 s: the engine's
        # allocator returns freed pages after 1 s), beside the busy figure above (the target's)
        counted_by = time.perf_counter() + 60
        everything = events + int(rate * (ramp + duration)) + k + 1  # the stream's and the probes'
        while await asyncio.to_thread(visible) < everything and time.perf_counter() < counted_by:
            await asyncio.sleep(0.2)
        await asyncio.sleep(3)
        rss_end_idle = proc.memory_info().rss / 2**20
    finally:
        stop_producers()
        app.metering_stopping.set()
        await app.stop()
        _close_kafka_clients(opened, processor)
    in_order = [round(x, 3) for x in latencies]
    latencies.sort()
    pct = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None  # noqa: E731
    return {
        "topic": topic,
        "events": events,
        "produce_seconds": produced.get("seconds"),
        "e2e_seconds": e2e_seconds,
        "e2e_events_per_s": e2e_rate,
        "aggregator_cpu_us_per_event": round(cpu_e2e / events * 1e6, 2),
        "stage_us_per_event": stages,
        "batches": batches[0],
        "batches_prepared_ahead": batches[1],
        "batch_max_messages": settings.batch_max_messages,
        "batch_within_s": settings.batch_within_s,
        "duplicate_events_per_s": events / duplicate_seconds,
        "duplicate_cpu_us_per_event": round(duplicate_cpu / events * 1e6, 2),
        "duplicate_stage_us_per_event": duplicate_stages,
        "freshness_rate_events_per_s": rate,
        "freshness_probes": len(latencies),
        # in the order sent: whether the slow ones are the first (work left by the phases before)
        "freshness_latencies_s": in_order,
        "freshness_acked_s": [round(x, 3) for x in acked],
        # the untimed first probe (the probe producer's start), and the probes of the stream's ramp
        "freshness_warm_probe_s": [round(warm_acked, 3), round(warm_seen, 3)],
        "freshness_ramp_s": ramp,
        "freshness_ramp_latencies_s": [round(x, 3) for x in ramp_latencies],
        "freshness_p50_s": pct(0.5),
        "freshness_p99_s": pct(0.99),
        "rss_mb_start": rss_start,
        "rss_mb_end": rss_end,
        "rss_mb_max": max(rss_samples) if rss_samples else rss_end,
        "rss_mb_start_parts": rss_start_parts,
        "rss_mb_end_parts": rss_end_parts,
        "rss_mb_end_idle": rss_end_idle,
        # RSS at each quarter of the run: flat means it stops growing, not that it never grew
        # (the embedded ClickHouse engine allocates its caches and arenas on first use).
        "rss_mb_quarters": [
            round(rss_samples[min(len(rss_samples) - 1, len(rss_samples) * q // 4)]) for q in (1, 2, 3, 4)
        ]
        if rss_samples
        else [],
    }
