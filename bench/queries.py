"""Query benchmark: >= 10M raw events, then p50/p99 latency of each documented endpoint over
real HTTP (uvicorn on loopback, one client, sequential requests).

Loading: a realistic synthetic world (ingest/synth.py) with one day of usage goes through the
real processing path (aggregators/direct.py); ClickHouse then copies those raw rows back in time,
one copy per earlier day (new ids, new offsets), and the aggregator's own catch-up statements
build the period tables from them, exactly as the live path would.
Runs in its own process (chdb allows one data directory per process).
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load(client: Any, db: str, target: int, say: Callable[[str], None]) -> Any:
    from aggregators.direct import apply_events, make_processor
    from aggregators.rollup import LIFECYCLE_TYPES
    from ingest.synth import World, usage_events, world_lifecycle_events

    now = datetime.now(UTC)
    world = World.generate(7, 20, created_at=now - timedelta(days=33))
    proc = make_processor(client, db)
    apply_events(client, db, world_lifecycle_events(world), processor=proc)
    day: list[dict[str, Any]] = []
    rng = random.Random(7)
    for ev in usage_events(world, now - timedelta(hours=6), now - timedelta(seconds=30), rng):
        day.append(ev)
        if len(day) >= 50_000:
            apply_events(client, db, day, processor=proc)
            day.clear()
    if day:
        apply_events(client, db, day, processor=proc)
    base = int(client.command(f"SELECT count() FROM {db}.events_raw"))
    copies = max(0, -(-(target - base) // max(base, 1)))
    say(f"  {base:,} raw events from the synthetic world; {copies} copies back in time")
    cols = "tenant, event_id, type, source, subject, time, data, src_partition, src_offset, ingested_at"
    top = int(client.command(f"SELECT max(src_offset) FROM {db}.events_raw"))
    for k in range(1, copies + 1):
        # one copy per earlier day (within the 32 days the documents look back), as new events
        client.command(
            f"INSERT INTO {db}.events_raw ({cols}) SELECT tenant, concat(event_id, '~', toString({k})), type, "
            f"source, subject, time - toIntervalDay({k}), data, src_partition, src_offset + {k} * ({top} + 1), "
            f"ingested_at FROM {db}.events_raw WHERE src_offset <= {top} AND type NOT IN {{lifecycle:Array(String)}}",
            parameters={"lifecycle": list(LIFECYCLE_TYPES)},
        )
    parts = [
        int(r[0]) for r in client.query(f"SELECT DISTINCT src_partition FROM {db}.events_raw").result_rows
    ]
    t = time.perf_counter()
    proc.writer.forget()
    proc.writer.catch_up(parts)
    say(f"  period tables built in {time.perf_counter() - t:.1f} s")
    return world, now


def run(events: int) -> dict[str, Any]:
    import httpx
    import uvicorn

    from deploy.settings import QuerySettings
    from ingest.demo import build_requests
    from query_api.app import create_app
    from schemas.clickhouse import connect
    from schemas.migrate import migrate

    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    dsn = f"chdb://{tempfile.mkdtemp(prefix='bench-q-')}"
    settings = QuerySettings(clickhouse_dsn=dsn, query_rate_limit_per_minute=10**9)
    client = connect(dsn, settings.clickhouse_database)
    migrate(client, settings.clickhouse_database)
    t = time.perf_counter()
    world, now = load(client, settings.clickhouse_database, events, say)
    total = int(client.command(f"SELECT count() FROM {settings.clickhouse_database}.events_raw"))
    say(f"  loaded {total:,} raw events in {time.perf_counter() - t:.0f} s")
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings, client), host="127.0.0.1", port=port, log_level="warning")
    )
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    requests = build_requests(world, f"http://127.0.0.1:{port}", now)
    p50: dict[str, float] = {}
    p99: dict[str, float] = {}
    with httpx.Client(timeout=30) as http:
        for name, req in requests.items():
            samples = []
            for i in range(330):
                t0 = time.perf_counter()
                r = http.request(req["method"], req["url"], headers=req["headers"])
                dt = (time.perf_counter() - t0) * 1000
                if r.status_code != 200:
                    raise RuntimeError(f"{name}: {r.status_code} {r.text[:200]}")
                if i >= 30:  # warm-up
                    samples.append(dt)
            samples.sort()
            p50[name] = round(samples[len(samples) // 2], 2)
            p99[name] = round(samples[int(len(samples) * 0.99)], 2)
            say(f"  {name:14s} p50 {p50[name]:7.2f} ms   p99 {p99[name]:7.2f} ms")
    server.should_exit = True
    return {"events": total, "p50": p50, "p99": p99}


def run_queries(events: int, say: Callable[[str], None]) -> dict[str, Any]:
    """Run in a child process and relay its figures."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.queries", str(events)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        check=True,
    )
    return dict(orjson.loads(proc.stdout.splitlines()[-1]))


if __name__ == "__main__":
    print(orjson.dumps(run(int(sys.argv[1]))).decode())
