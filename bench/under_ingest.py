"""Query latency while the pipeline ingests (issue 11 item 6): ``query_p99_under_ingest_ms``.

Runs inside the query benchmark's process (bench/queries.py), right after the idle timings, on
the same world and the same HTTP server: so the two figures differ only by the ingest. That
process then has the all-in-one shape of ``metering run`` (one embedded engine, a client per
part, ``schemas.clickhouse.connect_part``), with every part kept off the others' way:
- the faust aggregator on this process's main event loop, its batches applied in a thread
  (aggregators/app.py), with the aggregator's engine settings (``aggregator_engine_settings``);
- the query API's HTTP server (uvicorn) in a thread with an event loop of its own (queries.py);
- the timed client in a process of its own (bench/timed_client.py: sequential requests over real
  HTTP, each documented endpoint in turn), as a user's client is: no request waits for this
  process's GIL to be sent or to be read, nor the aggregator for the client's work.
A producer process sends synthetic usage (bench/produce.py, tenants the requests do not read) at
the given rate, half the pipeline's measured peak, for ``BENCH_UNDER_INGEST_SECONDS`` (default
20); requests are timed while it sends. Every event it sent must be counted in ``usage_15m`` by
the end, or the figure is refused. Every Kafka client opened here is closed before returning.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson

#: what bench/produce.py sends, as usage_15m counts it
METERS = (
    "'workstation_cpu_seconds','workstation_gpu_seconds','render_output_seconds',"
    "'egress_bytes','ai_tasks','gateway_requests','ci_step_cpu_seconds'"
)
#: the query API's p99 target while ingesting at half the peak rate (issue 11)
TARGET_P99_MS = 50.0


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


async def measure(
    dsn: str,
    db: str,
    requests: dict[str, dict[str, Any]],
    bootstrap: str,
    rate: float,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """The documented endpoints' latency (``requests``: bench/queries.py's, against its running
    server) while an aggregator of this process ingests ``rate`` events/s from ``bootstrap``."""
    from aggregators.app import build_app
    from bench import timed_client
    from bench.pipeline import _producer, bench_settings
    from deploy.runner import build_processor
    from ingest.kafka_config import ensure_topics
    from schemas.clickhouse import connect_part

    topic = f"bench-ui-{uuid.uuid4().hex[:8]}"
    settings = bench_settings(bootstrap, topic, dsn, clickhouse_database=db)
    await asyncio.to_thread(ensure_topics, settings, bootstrap)
    engine = settings.aggregator_engine_settings()
    aggregator_client = connect_part(dsn, db, engine)
    counter = connect_part(dsn, db)

    def counted() -> int:
        sql = f"SELECT sum(value_count) FROM {db}.usage_15m WHERE meter IN ({METERS}) AND tenant LIKE 'tenant-%'"
        return int(counter.command(sql) or 0)

    if counted():
        # An earlier run's rows are in this database: its partitions' watermarks (each table's
        # max(src_offset) per partition) would make the aggregator skip the new topic's messages,
        # whose offsets start at 0 again, as applied: the figure would be taken without ingest.
        raise RuntimeError(
            "measure() runs once per database: remove the 'tenant-%' rows of the last run first"
        )

    processor = build_processor(settings, aggregator_client, bootstrap)
    app = build_app(settings, bootstrap, processor)
    seconds = float(os.environ.get("BENCH_UNDER_INGEST_SECONDS", "20"))
    samples: dict[str, list[float]] = {}
    timer: Any = None  # the timed client's process

    producer: Any = None
    await app.start()
    try:
        deadline = time.perf_counter() + 60
        while not processor.owned and time.perf_counter() < deadline:
            await asyncio.sleep(0.2)  # the group join
        if not processor.owned:
            raise RuntimeError("the aggregator was given no partition within 60 s")
        producer = _producer(
            bootstrap, topic, int(rate * seconds), rate, max(1, min(500, int(rate / 20))), "u"
        )

        # timed from a process of its own (bench/timed_client.py) for as long as the producer sends
        began = time.perf_counter()
        timer = timed_client.start(requests, None)
        await asyncio.to_thread(producer.wait)
        sent_at = time.perf_counter()
        samples = await asyncio.to_thread(timed_client.collect, timer)
        timer = None
        sending_s = sent_at - began
        sent = int(orjson.loads((producer.stdout.read() if producer.stdout else b"") or b"{}").get("sent", 0))
        n = counted_when_sent = await asyncio.to_thread(counted)
        # every event counted in the end, however long the aggregator takes, as long as it moves
        # (one batch may take minutes on a loaded machine: BENCH_UNDER_INGEST_PATIENCE_S)
        patience = float(os.environ.get("BENCH_UNDER_INGEST_PATIENCE_S", "300"))
        progressed = told = time.perf_counter()
        while n < sent and time.perf_counter() - progressed < patience:
            await asyncio.sleep(0.5)
            if (now := await asyncio.to_thread(counted)) > n:
                n, progressed = now, time.perf_counter()
            if time.perf_counter() - told >= 30:
                told = time.perf_counter()
                say(f"  waiting for the aggregator: {n:,} of the {sent:,} events sent counted")
        catch_up_s = time.perf_counter() - sent_at
    finally:
        if timer is not None and timer.poll() is None:
            timer.kill()
            timer.wait()
        if producer is not None and producer.poll() is None:
            producer.kill()  # (a request failed): it would keep reconnecting once the broker stops
            producer.wait()
        app.metering_stopping.set()
        await app.stop()
        dead_letters: Any = processor.dead_letters
        dead_letters.close()  # closed, or it keeps reconnecting once the broker stops
        processor.close()  # (the engine's clients stay: the process ends with the benchmark)
        shutil.rmtree(settings.faust_data_dir, ignore_errors=True)
    if n != sent:
        raise RuntimeError(
            f"{n:,} events counted of the {sent:,} sent during the timed requests (none more for "
            f"{patience:.0f} s); the aggregator's stage seconds: {processor.timings}, "
            f"stalled since {processor.stalled_since}: {processor.last_error}"
        )
    every = [ms for values in samples.values() for ms in values]
    if not every:
        raise RuntimeError("no request was timed")
    return {
        "query_p50_under_ingest_ms": percentile(every, 0.5),
        "query_p99_under_ingest_ms": percentile(every, 0.99),
        "query_p99_under_ingest_by_endpoint_ms": {
            name: percentile(v, 0.99) for name, v in samples.items() if v
        },
        "under_ingest_requests": len(every),
        "under_ingest_events_per_s": round(sent / sending_s) if sending_s else 0,
        # the aggregator's lag when the requests stopped, and how long it took to count the rest
        "under_ingest_lag_events": sent - counted_when_sent,
        "under_ingest_catch_up_s": round(catch_up_s, 1) if counted_when_sent < sent else 0.0,
    }


def report(result: dict[str, Any], say: Callable[[str], None]) -> None:
    """The figures' lines (bench/run.py prints them)."""
    p99 = result["query_p99_under_ingest_ms"]
    met = "met" if p99 <= TARGET_P99_MS else "NOT met"
    say(
        f"  documented endpoints while ingesting {result['under_ingest_events_per_s']:,} events/s: "
        f"p50 {result['query_p50_under_ingest_ms']:.2f} ms, p99 {p99:.2f} ms "
        f"({result['under_ingest_requests']} requests; target p99 <= {TARGET_P99_MS:.0f} ms: {met})"
    )
    if result["under_ingest_lag_events"]:
        say(
            f"  the aggregator did not keep up: {result['under_ingest_lag_events']:,} events behind when the "
            f"requests stopped, all counted {result['under_ingest_catch_up_s']:.1f} s later"
        )
    for name, ms in result["query_p99_under_ingest_by_endpoint_ms"].items():
        say(f"    {name:14s} p99 {ms:7.2f} ms")


def main(argv: list[str]) -> None:
    """``python -m bench.under_ingest [WORLD_EVENTS] [RATE]``: this benchmark alone (with the idle
    timings before it), on a world of ``WORLD_EVENTS`` raw events (default 2,000,000; 0 is the
    smallest: tenant 0's 33 days and 6 hours of the others) at ``RATE`` events/s (default 13,000,
    half the peak ``make bench`` measured); a broker of its own unless KAFKA_BOOTSTRAP_SERVERS."""
    import sys

    from bench.queries import run_queries
    from bench.run import broker

    events = int(argv[0]) if argv else 2_000_000
    rate = float(argv[1]) if len(argv) > 1 else 13_000.0
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    with broker() as bootstrap:
        q = run_queries(events, say, bootstrap, rate)
    report(q["under_ingest"], say)
    print(orjson.dumps({"idle_p50": q["p50"], "idle_p99": q["p99"], **q["under_ingest"]}).decode())


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
