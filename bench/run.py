"""``make bench``: pipeline and query benchmarks on this machine. Prints figures as it goes; the
last line is one JSON object (docs/performance.md lists the keys and the recorded results).

Environment: BENCH_EVENTS (default 1,000,000), BENCH_QUERY_EVENTS (default 10,000,000),
BENCH_SKIP_QUERY=1, BENCH_SKIP_UNDER_INGEST=1, BENCH_UNDER_INGEST_SECONDS (default 20),
BENCH_UNDER_INGEST_PATIENCE_S (default 300), BENCH_SKIP_HTTP=1 (and BENCH_HTTP_CLIENTS, BENCH_HTTP_SECONDS:
bench/http_ingest.py),
KAFKA_BOOTSTRAP_SERVERS (else a local broker is started on a free port). The broker stops only
after the query benchmarks: the queries are timed again while the pipeline ingests.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson


@contextmanager
def broker() -> Iterator[str]:
    env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if env:
        yield env
        return
    from deploy.kafka import local_broker

    data = Path(tempfile.mkdtemp(prefix="bench-kafka-"))
    bootstrap = local_broker.start(port=local_broker.find_free_port(), data_dir=data)
    try:
        warm_up(bootstrap)
        yield bootstrap
    finally:
        local_broker.stop(data)
        shutil.rmtree(data, ignore_errors=True)


def warm_up(bootstrap: str, timeout_s: float = 60.0) -> None:
    """Wait until a new broker's group coordinator has loaded its offsets topic and it hands
    out producer ids: else every client of the first run logs "Coordinator load in progress",
    "Marking the coordinator dead"… while it waits (quietly here)."""
    import contextlib
    import logging
    import time

    from confluent_kafka import KafkaException, Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    quiet = logging.getLogger("bench.warm_up")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    admin = AdminClient({"bootstrap.servers": bootstrap, "logger": quiet})
    topic = "bench-warm-up"
    for f in admin.create_topics([NewTopic(topic, num_partitions=1)]).values():
        with contextlib.suppress(KafkaException):  # exists already
            f.result(30)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            admin.describe_consumer_groups(["bench-warm-up"], request_timeout=5)["bench-warm-up"].result()
            break
        except KafkaException:
            time.sleep(0.5)  # the coordinator is still loading
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "logger": quiet})
    producer.produce(topic, b"warm")
    producer.flush(timeout_s)
    producer.close()


def say(msg: str) -> None:
    print(msg, flush=True)


def stages_line(label: str, stages: dict[str, float]) -> str:
    return f"  {label}: " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items())


def main() -> None:
    from bench.pipeline import bare_consumer_rate, run_pipeline
    from deploy import collector, event_loop
    from deploy.settings import HttpSettings

    events = int(os.environ.get("BENCH_EVENTS", "1000000"))
    result: dict[str, Any] = {
        "machine": f"{os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}"
    }
    with broker() as bootstrap:
        say(f"pipeline: {events:,} events through Kafka ({bootstrap}) -> faust -> ClickHouse (embedded)…")
        # the aggregator's process as `metering run` sets it up: the loop METERING_EVENT_LOOP
        # names (uvloop by default) and Python's collector for a server (deploy/collector.py;
        # the freeze once the aggregator runs, in run_pipeline)
        collector.set_thresholds()
        p = event_loop.run(run_pipeline(bootstrap, events), HttpSettings().event_loop)
        say(
            f"  end to end: {p['e2e_events_per_s']:,.0f} events/s ({p['e2e_seconds']:.1f} s; producer alone {p['produce_seconds']:.1f} s)"
        )
        say(
            f"  aggregator CPU (user+system, all threads of the process): {p['aggregator_cpu_us_per_event']:.2f} µs per event"
        )
        say(stages_line("where the time goes (wall µs per event)", p["stage_us_per_event"]))
        say(
            f"  batches: {p['batches']:,} (at most {p['batch_max_messages']:,} messages or "
            f"{p['batch_within_s']} s each: METERING_BATCH_MAX_MESSAGES, METERING_BATCH_WITHIN_S), of which "
            f"{p['batches_prepared_ahead']:,} prepared while the one before was applied (METERING_PREPARE_AHEAD)"
        )
        say(
            f"  the same events again (duplicates): {p['duplicate_events_per_s']:,.0f} events/s, "
            f"{p['duplicate_cpu_us_per_event']:.2f} µs CPU per event; period tables unchanged"
        )
        say(stages_line("duplicates, wall µs per event", p["duplicate_stage_us_per_event"]))
        say(
            f"  freshness at {p['freshness_rate_events_per_s']:,.0f} events/s: p50 {p['freshness_p50_s']:.3f} s, p99 {p['freshness_p99_s']:.3f} s ({p['freshness_probes']} probes)"
        )
        say(
            f"    the stream's first {p['freshness_ramp_s']:g} s (idle to half the peak), reported apart: "
            + ", ".join(f"{x:.2f}" for x in p["freshness_ramp_latencies_s"])
            + f" s; the probe producer's first message (untimed) acknowledged in {p['freshness_warm_probe_s'][0]:.2f} s"
        )
        say(
            f"  aggregator RSS: start {p['rss_mb_start']:.0f} MiB, end {p['rss_mb_end']:.0f} MiB, max {p['rss_mb_max']:.0f} MiB; "
            f"{p['rss_mb_end_idle']:.0f} MiB once idle"
        )
        for when in ("start", "end"):
            say(
                f"    at the {when}, MiB: "
                + ", ".join(f"{k} {v:.0f}" for k, v in p[f"rss_mb_{when}_parts"].items())
            )
        say("bare confluent-kafka consumer on the same topic…")
        bare = bare_consumer_rate(bootstrap, p["topic"], events)
        say(f"  bare consumer: {bare:,.0f} events/s")
        result.update({k: v for k, v in p.items() if k != "topic"})
        result["bare_consumer_events_per_s"] = bare
        result["ratio"] = p["e2e_events_per_s"] / bare if bare else None
        say(f"  ratio end-to-end / bare: {result['ratio']:.2f}")

        # HTTP ingest (issue 11 item 5): 8 clients against `metering run`, every accepted event
        # verified counted (bench/http_ingest.py)
        if os.environ.get("BENCH_SKIP_HTTP") != "1":
            from bench.http_ingest import run_http_ingest

            result.update(run_http_ingest(say, bootstrap))

        if os.environ.get("BENCH_SKIP_QUERY") != "1":
            from bench.queries import run_queries
            from bench.under_ingest import report

            q_events = int(os.environ.get("BENCH_QUERY_EVENTS", "10000000"))
            # the same requests while the pipeline ingests at half its peak (bench/under_ingest.py)
            rate = 0.0 if os.environ.get("BENCH_SKIP_UNDER_INGEST") == "1" else p["e2e_events_per_s"] / 2
            say(f"queries: loading {q_events:,} raw events, then timing each documented endpoint…")
            q = run_queries(q_events, say, bootstrap, rate)
            result["query_events"] = q_events
            result["query_p50_ms"] = q["p50"]
            result["query_p99_ms"] = q["p99"]
            if "under_ingest" in q:
                report(q["under_ingest"], say)
                result.update(q["under_ingest"])
    print(orjson.dumps(result).decode(), flush=True)


if __name__ == "__main__":
    sys.exit(main())
