"""``make bench``: pipeline and query benchmarks on this machine. Prints figures as it goes; the
last line is one JSON object (docs/performance.md lists the keys and the recorded results).

Environment: BENCH_EVENTS (default 1,000,000), BENCH_QUERY_EVENTS (default 10,000,000),
BENCH_SKIP_QUERY=1, KAFKA_BOOTSTRAP_SERVERS (else a local broker is started on a free port).
"""

from __future__ import annotations

import asyncio
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
        yield bootstrap
    finally:
        local_broker.stop(data)
        shutil.rmtree(data, ignore_errors=True)


def say(msg: str) -> None:
    print(msg, flush=True)


def main() -> None:
    from bench.pipeline import bare_consumer_rate, run_pipeline

    events = int(os.environ.get("BENCH_EVENTS", "1000000"))
    result: dict[str, Any] = {
        "machine": f"{os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}"
    }
    with broker() as bootstrap:
        say(f"pipeline: {events:,} events through Kafka ({bootstrap}) -> faust -> ClickHouse (embedded)…")
        p = asyncio.run(run_pipeline(bootstrap, events))
        say(
            f"  end to end: {p['e2e_events_per_s']:,.0f} events/s ({p['e2e_seconds']:.1f} s; producer alone {p['produce_seconds']:.1f} s)"
        )
        say(
            f"  freshness at {p['freshness_rate_events_per_s']:,.0f} events/s: p50 {p['freshness_p50_s']:.3f} s, p99 {p['freshness_p99_s']:.3f} s ({p['freshness_probes']} probes)"
        )
        say(
            f"  aggregator RSS: start {p['rss_mb_start']:.0f} MiB, end {p['rss_mb_end']:.0f} MiB, max {p['rss_mb_max']:.0f} MiB"
        )
        say("bare confluent-kafka consumer on the same topic…")
        bare = bare_consumer_rate(bootstrap, p["topic"], events)
        say(f"  bare consumer: {bare:,.0f} events/s")
        result.update({k: v for k, v in p.items() if k != "topic"})
        result["bare_consumer_events_per_s"] = bare
        result["ratio"] = p["e2e_events_per_s"] / bare if bare else None
        say(f"  ratio end-to-end / bare: {result['ratio']:.2f}")
    if os.environ.get("BENCH_SKIP_QUERY") != "1":
        from bench.queries import run_queries

        q_events = int(os.environ.get("BENCH_QUERY_EVENTS", "10000000"))
        say(f"queries: loading {q_events:,} raw events, then timing each documented endpoint…")
        q = run_queries(q_events, say)
        result["query_events"] = q_events
        result["query_p50_ms"] = q["p50"]
        result["query_p99_ms"] = q["p99"]
    print(orjson.dumps(result).decode(), flush=True)


if __name__ == "__main__":
    sys.exit(main())
