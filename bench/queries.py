"""Query benchmark: >= 10M raw events, then p50/p99 latency of each documented endpoint over
real HTTP (uvicorn on loopback, one client, sequential requests).

Loading (see ``load``): a realistic synthetic world (ingest/synth.py) with 6 hours of usage goes
through the real processing path (aggregators/direct.py); ClickHouse then copies raw rows back in
time (new ids, new offsets) so that the tenant the requests are made as has every hour of the
33 days the documents look back, and the aggregator's own catch-up statements build the period
tables from them, exactly as the live path would. Before timing: what each request reads (rows of
the period tables and the raw events behind them, on stderr), and a wait for the merges of the
bulk load. The data directory is removed at the end (``BENCH_KEEP_DATA=1`` keeps it).
Runs in its own process (chdb allows one data directory per process).
"""

from __future__ import annotations

import os
import random
import shutil
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


#: How far back the documents read: 004 defaults to 28 days and accepts any range, a billing
#: period (000) starts up to 31 days ago, a month (001, 003) up to 30 days ago, 002 is lifetime.
LOOKBACK = timedelta(days=33)
#: Usage generated through the real processing path, for every tenant of the world.
BASE = timedelta(hours=6)
#: The lane (Kafka partition) the world's usage is written as: none of a real topic's, so that
#: an aggregator consuming a topic in the same database (bench/under_ingest.py) does not find
#: its partitions' watermarks at the world's offsets and skip its messages as applied.
WORLD_LANE = 10_000


def load(client: Any, db: str, target: int, say: Callable[[str], None]) -> Any:
    """Load the world; returns it and ``now``.

    1. ``BASE`` (6 hours) of usage for all 20 tenants through the real processing path.
    2. The tenant the requests are made as (tenant 0) gets its whole ``LOOKBACK`` filled at its
       own rate, every hour of every day: copies of its base shifted by 6 h, 12 h, ... So each
       endpoint reads what a real tenant of that size has: a contract's month of CI gauges (001),
       a subtree's 28 days of datastream rows (004), a workstation's whole life (002), ...
    3. If the total is still under ``target``: copies of the other tenants' base, one per
       earlier day, as background.
    """
    from aggregators.direct import apply_events, make_processor
    from aggregators.rollup import LIFECYCLE_TYPES
    from ingest.synth import World, usage_events, world_lifecycle_events

    now = datetime.now(UTC)
    world = World.generate(7, 20, created_at=now - LOOKBACK - timedelta(days=1))
    proc = make_processor(client, db)
    apply_events(client, db, world_lifecycle_events(world), processor=proc)
    day: list[dict[str, Any]] = []
    rng = random.Random(7)
    for ev in usage_events(world, now - BASE, now - timedelta(seconds=30), rng):
        day.append(ev)
        if len(day) >= 50_000:
            apply_events(client, db, day, partition=WORLD_LANE, processor=proc)
            day.clear()
    if day:
        apply_events(client, db, day, partition=WORLD_LANE, processor=proc)
    base = int(client.command(f"SELECT count() FROM {db}.events_raw"))
    top = int(client.command(f"SELECT max(src_offset) FROM {db}.events_raw"))
    cols = "tenant, event_id, type, source, subject, time, data, src_partition, src_offset, ingested_at"
    usage = f"src_offset <= {top} AND type NOT IN {{lifecycle:Array(String)}}"
    lifecycle = {"lifecycle": list(LIFECYCLE_TYPES)}
    copy_no = 0

    def copy(tenants: str, shift_s: int) -> None:
        # as new events: new ids, new offsets (above every earlier copy's), earlier times
        nonlocal copy_no
        copy_no += 1
        client.command(
            f"INSERT INTO {db}.events_raw ({cols}) SELECT tenant, concat(event_id, '~', toString({copy_no})), "
            f"type, source, subject, time - toIntervalSecond({shift_s}), data, src_partition, "
            f"src_offset + {copy_no} * ({top} + 1), ingested_at FROM {db}.events_raw "
            f"WHERE {usage} AND {tenants}",
            parameters={**lifecycle, "t0": world.tenants[0].id},
        )

    shifts = int(LOOKBACK / BASE)
    for j in range(1, shifts):
        copy("tenant = {t0:String}", int((BASE * j).total_seconds()))
    total = int(client.command(f"SELECT count() FROM {db}.events_raw"))
    others = int(
        client.command(
            f"SELECT count() FROM {db}.events_raw WHERE {usage} AND tenant != {{t0:String}}",
            parameters={**lifecycle, "t0": world.tenants[0].id},
        )
    )
    days = min(LOOKBACK.days - 1, max(0, -(-(target - total) // max(others, 1))))
    for k in range(1, days + 1):
        copy("tenant != {t0:String}", k * 86_400)
    say(
        f"  {base:,} raw events from the synthetic world ({BASE} of usage); tenant 0's copied "
        f"{shifts - 1} times to fill {LOOKBACK.days} days; the others' copied to {days} earlier days"
    )
    parts = [
        int(r[0]) for r in client.query(f"SELECT DISTINCT src_partition FROM {db}.events_raw").result_rows
    ]
    t = time.perf_counter()
    proc.writer.forget()
    proc.writer.catch_up(parts)
    say(f"  period tables built in {time.perf_counter() - t:.1f} s")
    return world, now


def volumes(client: Any, db: str, world: Any, now: datetime) -> dict[str, dict[str, int]]:
    """What each timed request reads: rows of the period tables in the key range its query scans,
    the rows of those matching its filters, and the raw events they summarize."""
    from ingest.demo import _member_key, _token_workspace
    from query_api.periods import billing_period, calendar_month
    from query_api.reader import Reader
    from query_api.routers.row_usage import subtree

    t = world.tenants[0]
    _token, token_ws = _token_workspace(t)
    _key, contract, contract_ws = _member_key(t)
    ws_key = next(
        k for k in t.api_keys if k.scope == "workspace" and t.workspace(k.workspace_id).parent_id is None
    )
    reader = Reader(client, db, cache_ttl_s=0)
    workspace = reader.workspace(t.id, token_ws)
    assert workspace is not None
    billing, month = billing_period(now, workspace.billing_anchor_day), calendar_month(now)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    since = day - timedelta(days=28)
    subtree_ids = sorted(subtree(reader.workspaces(t.id), ws_key.workspace_id))

    def ts(d: datetime) -> str:
        return d.strftime("%Y-%m-%d %H:%M:%S")

    def n(sql: str, **params: Any) -> int:
        return int(client.query(sql, parameters={"t": t.id, **params}).result_rows[0][0])

    def span(
        table: str, meters: str, lo: datetime | None, hi: datetime | None, where: str = "", **p: Any
    ) -> int:
        window = (
            ""
            if lo is None or hi is None
            else f" AND window_start >= '{ts(lo)}' AND window_start < '{ts(hi)}'"
        )
        final = " FINAL" if table == "gauge_15m" and where else ""
        return n(
            f"SELECT count() FROM {db}.{table}{final} WHERE tenant = {{t:String}} AND meter IN ({meters}){window}{where}",
            **p,
        )

    def raw(types: str, lo: datetime, hi: datetime, where: str, **p: Any) -> int:
        return n(
            f"SELECT count() FROM {db}.events_raw WHERE tenant = {{t:String}} AND type IN ({types}) "
            f"AND time >= '{ts(lo)}' AND time < '{ts(hi)}' AND {where}",
            **p,
        )

    lo, hi = min(billing.start, month.start), max(billing.end, month.end)
    out = {
        "000": {
            "usage_1d_scanned": span("usage_1d", "'gateway_requests'", lo, hi),
            "usage_1d_matching": span(
                "usage_1d", "'gateway_requests'", lo, hi, " AND dims['workspace_id'] = {w:String}", w=token_ws
            ),
            "entities_matching": n(
                f"SELECT count() FROM {db}.entities FINAL WHERE tenant = {{t:String}} "
                "AND kind IN ('virtual_key', 'agent', 'member') AND workspace_id = {w:String}",
                w=token_ws,
            ),
            "raw_events_billing_period": raw(
                "'gateway.request'",
                billing.start,
                billing.end,
                "JSONExtractString(data, 'workspace_id') = {w:String}",
                w=token_ws,
            ),
        }
    }
    for name, dim, value in (
        ("001-contract", "contract_id", contract),
        ("001-workspace", "workspace_id", contract_ws),
    ):
        out[name] = {
            "gauge_15m_scanned": span("gauge_15m", "'ci_step_memory_mib_seconds'", month.start, month.end),
            "gauge_15m_matching": span(
                "gauge_15m",
                "'ci_step_memory_mib_seconds'",
                month.start,
                month.end,
                f" AND dims['{dim}'] = {{v:String}}",
                v=value,
            ),
            "usage_1mo_matching": span(
                "usage_1mo",
                "'ci_step_cpu_seconds'",
                month.start,
                month.end,
                f" AND dims['{dim}'] = {{v:String}}",
                v=value,
            ),
            "raw_events_month": raw(
                "'ci.step.cpu', 'ci.step.memory'",
                month.start,
                month.end,
                f"JSONExtractString(data, '{dim}') = {{v:String}}",
                v=value,
            ),
        }
    station = t.workstations[0].id
    out["002"] = {
        "gauge_15m_scanned": span("gauge_15m", "'workstation_memory_gb_seconds'", None, None),
        "gauge_15m_matching": span(
            "gauge_15m",
            "'workstation_memory_gb_seconds'",
            None,
            None,
            " AND dims['workstation_id'] = {w:String}",
            w=station,
        ),
        "usage_1mo_matching": span(
            "usage_1mo",
            "'workstation_cpu_seconds', 'workstation_gpu_seconds'",
            None,
            None,
            " AND dims['workstation_id'] = {w:String}",
            w=station,
        ),
        "raw_events_lifetime": raw(
            "'workstation.cpu', 'workstation.gpu', 'workstation.memory'",
            world.created_at,
            now,
            "subject = {w:String}",
            w=station,
        ),
    }
    out["003"] = {
        "usage_1mo_matching": span(
            "usage_1mo",
            "'render_output_seconds', 'ai_tasks', 'egress_bytes'",
            month.start,
            month.end,
            " AND dims['workspace_id'] = {w:String}",
            w=ws_key.workspace_id,
        ),
        "raw_events_month": raw(
            "'render.completed', 'ai.task.submitted', 'egress.download'",
            month.start,
            month.end,
            "JSONExtractString(data, 'workspace_id') = {w:String}",
            w=ws_key.workspace_id,
        ),
    }
    in_scope = " AND dims['workspace_id'] IN {w:Array(String)}"
    out["004"] = {
        "subtree_workspaces": len(subtree_ids),
        "usage_1d_matching": span(
            "usage_1d",
            "'datastream_unique_rows', 'datastream_total_rows'",
            since,
            day,
            in_scope,
            w=subtree_ids,
        ),
        "buckets": n(
            f"SELECT uniqExact(window_start, dims['workspace_id'], dims['datastream_id']) FROM {db}.usage_1d WHERE tenant = {{t:String}} "
            f"AND meter = 'datastream_total_rows' AND window_start >= '{ts(since)}' AND window_start < '{ts(day)}'{in_scope}",
            w=subtree_ids,
        ),
        "raw_events": raw(
            "'datastream.rows'",
            since,
            day,
            "JSONExtractString(data, 'workspace_id') IN {w:Array(String)}",
            w=subtree_ids,
        ),
    }
    return out


def settle(client: Any, db: str, say: Callable[[str], None], limit_s: float = 300.0) -> None:
    """Wait for the merges the bulk load left behind (every copy above is a part of its own).

    A live system merges its small inserts as they come; a backlog of 130 bulk parts is an
    artifact of loading, and merging it takes the CPU the timed requests need (2 cores)."""
    t = time.perf_counter()
    sql = f"SELECT count() FROM system.merges WHERE database = '{db}'"
    quiet = 0.0  # merges are scheduled a moment apart: settled = none for a few seconds
    while quiet < 5.0 and time.perf_counter() - t < limit_s:
        quiet = quiet + 0.5 if int(client.command(sql)) == 0 else 0.0
        time.sleep(0.5)
    parts = client.query(
        f"SELECT table, count() FROM system.parts WHERE database = '{db}' AND active GROUP BY table ORDER BY table"
    ).result_rows
    say(
        f"  merges settled in {time.perf_counter() - t:.0f} s; active parts: "
        + ", ".join(f"{table} {n}" for table, n in parts)
    )


def run(events: int, bootstrap: str | None = None, ingest_rate: float = 0.0) -> dict[str, Any]:
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    data_dir = tempfile.mkdtemp(prefix="bench-q-")
    try:
        return _run(events, data_dir, say, bootstrap, ingest_rate)
    finally:
        if os.environ.get("BENCH_KEEP_DATA") == "1":
            say(f"  data kept in {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)


def _run(
    events: int, data_dir: str, say: Callable[[str], None], bootstrap: str | None, ingest_rate: float
) -> dict[str, Any]:
    import uvicorn

    from bench import timed_client
    from deploy import collector
    from deploy.settings import QuerySettings
    from ingest.demo import build_requests
    from query_api.app import create_app
    from schemas.clickhouse import connect
    from schemas.migrate import migrate

    # Python's collector as `metering run` sets it (deploy/collector.py): the thresholds now, the
    # world and the server frozen once built (below)
    collector.set_thresholds()
    dsn = f"chdb://{data_dir}"
    settings = QuerySettings(clickhouse_dsn=dsn, query_rate_limit_per_minute=10**9)
    client = connect(dsn, settings.clickhouse_database)
    migrate(client, settings.clickhouse_database)
    t = time.perf_counter()
    world, now = load(client, settings.clickhouse_database, events, say)
    total = int(client.command(f"SELECT count() FROM {settings.clickhouse_database}.events_raw"))
    say(f"  loaded {total:,} raw events in {time.perf_counter() - t:.0f} s")
    for name, counts in volumes(client, settings.clickhouse_database, world, now).items():
        say(f"  {name:14s} reads " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    settle(client, settings.clickhouse_database, say)
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings, client), host="127.0.0.1", port=port, log_level="warning")
    )
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    requests = build_requests(world, f"http://127.0.0.1:{port}", now)
    collector.freeze_startup()
    p50: dict[str, float] = {}
    p99: dict[str, float] = {}
    # timed from a process of its own, as a user's client is (bench/timed_client.py): 330
    # requests to each endpoint in turn, the first 30 a warm-up
    for name, samples in timed_client.collect(timed_client.start(requests, 330, warmup=30)).items():
        samples.sort()
        p50[name] = round(samples[len(samples) // 2], 2)
        p99[name] = round(samples[int(len(samples) * 0.99)], 2)
        say(f"  {name:14s} p50 {p50[name]:7.2f} ms   p99 {p99[name]:7.2f} ms")
    out: dict[str, Any] = {"events": total, "p50": p50, "p99": p99}
    if bootstrap and ingest_rate > 0:
        # the same requests to the same server, while an aggregator of this process ingests
        from bench.under_ingest import measure

        say(f"queries while ingesting {ingest_rate:,.0f} events/s (half the peak), all parts in one process…")
        from deploy import event_loop

        # on the loop `metering run` runs on (METERING_EVENT_LOOP, uvloop by default)
        out["under_ingest"] = event_loop.run(
            measure(dsn, settings.clickhouse_database, requests, bootstrap, ingest_rate, say),
            settings.event_loop,
        )
    server.should_exit = True
    return out


def run_queries(
    events: int, say: Callable[[str], None], bootstrap: str | None = None, ingest_rate: float = 0.0
) -> dict[str, Any]:
    """Run in a child process and relay its figures. With ``bootstrap`` and ``ingest_rate``, the
    requests are timed again while the process ingests that rate (bench/under_ingest.py)."""
    extra = [bootstrap, str(ingest_rate)] if bootstrap and ingest_rate > 0 else []
    proc = subprocess.run(
        [sys.executable, "-m", "bench.queries", str(events), *extra],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        check=True,
    )
    return dict(orjson.loads(proc.stdout.splitlines()[-1]))


if __name__ == "__main__":
    a = sys.argv[1:]
    print(
        orjson.dumps(
            run(int(a[0]), a[1] if len(a) > 1 else None, float(a[2]) if len(a) > 2 else 0.0)
        ).decode()
    )
