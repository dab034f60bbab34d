"""HTTP ingest benchmark (issue 11, item 5): ``POST /api/v1/events`` against the all-in-one process.

``metering run`` (ingest + aggregator + query API in one process, embedded chdb) is started as
a subprocess on a temporary data directory and a free port, with a broker of its own (bench/run.py's
``broker()``: the local one, or ``KAFKA_BOOTSTRAP_SERVERS``). A workspace and a usage key are
created the way the README does it (``metering admin workspace create`` / ``api-key create
--wait``). Then ``BENCH_HTTP_CLIENTS`` (8) concurrent clients (bench/http_client.py: async, one
kept-alive connection each) send 100-event batches for ``BENCH_HTTP_SECONDS`` (20) seconds; the
aggregator keeps consuming meanwhile. Every request's latency is recorded (send to answer read).

At the end the bench waits until the aggregator committed every message of the usage topic,
stops the process (SIGTERM: it flushes and closes its engine), opens its chdb directory and
checks that every accepted event is counted exactly: ``events_raw`` holds each accepted id once
and ``usage_daily`` sums the meter to the expected total. ``http_ingest_counted`` is that check.

The process is started with ``METERING_INGEST_RATE_LIMIT_PER_MINUTE`` raised: the default (6,000
requests a minute per key) is a per-key protection, not the ingest's capacity.

    python -m bench.http_ingest          # progress lines, then one JSON line
    python -m bench.http_ingest --wire   # item 4: JSON vs MessagePack, CPU per event
    python -m bench.http_ingest --route  # the route alone in process (no broker): CPU per event
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
import uvloop

from bench.http_client import Connection, HttpClientError

ROOT = Path(__file__).resolve().parents[1]
TENANT = "bench-http"
METER = "render_output_seconds"
SECONDS_PER_RENDER = 30
BATCH = 100


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _env(tmp: Path, bootstrap: str, port: int, topic: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERING_")}
    env |= {
        "PYTHONPATH": str(ROOT),
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "METERING_TOPIC_EVENTS": topic,
        "METERING_TOPIC_CONTROL": f"{topic}.control",
        "METERING_TOPIC_DEAD_LETTER": f"{topic}.dlq",
        "METERING_CONSUMER_GROUP": f"g-{topic}",
        "METERING_HTTP_PORT": str(port),
        "METERING_SQL_ENABLED": "false",
        "METERING_CLICKHOUSE_DSN": f"chdb://{tmp / 'chdb'}",
        "METERING_FAUST_DATA_DIR": str(tmp / "faust"),
        "METERING_ADMIN_TOKEN_FILE": str(tmp / "admin-token"),
        "METERING_INGEST_RATE_LIMIT_PER_MINUTE": "100000000",
    }
    return env


def _admin(env: dict[str, str], *args: str) -> dict[str, Any]:
    """``metering admin … --json --wait``: its JSON result."""
    out = subprocess.run(
        [sys.executable, "-c", "from deploy.cli import app; app()", "admin", *args, "--json", "--wait"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=120,
    )
    if out.returncode != 0:
        raise RuntimeError(f"metering admin {' '.join(args)} failed: {out.stdout!r} {out.stderr!r}")
    return dict(orjson.loads(out.stdout.strip().splitlines()[-1]))


def _ready(url: str, log: Path) -> bool:
    try:
        up = httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
    return up and "Admin API" in log.read_text(errors="replace")


async def _drive(
    url: str, key: str, workspace: str, clients: int, seconds: float
) -> tuple[list[float], int, int, list[str]]:
    """(latencies in s, accepted, requests, errors) of ``clients`` loops sending for ``seconds``."""
    at = (datetime.now(UTC) - timedelta(minutes=5)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    latencies: list[float] = []
    errors: list[str] = []
    accepted = 0
    requests = 0
    stop_at = time.monotonic() + seconds
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/cloudevents-batch+json"}

    async def one(n: int) -> None:
        nonlocal accepted, requests
        async with Connection(url, headers) as client:
            i = 0
            while time.monotonic() < stop_at:
                prefix = f"c{n}-{i}"
                body = orjson.dumps(
                    [
                        {
                            "specversion": "1.0",
                            "id": f"{prefix}-{j}",
                            "source": "bench",
                            "type": "render.completed",
                            "time": at,
                            "data": {
                                "workspace_id": workspace,
                                "render_id": f"{prefix}-{j}",
                                "output_duration_seconds": SECONDS_PER_RENDER,
                            },
                        }
                        for j in range(BATCH)
                    ]
                )
                i += 1
                t0 = time.perf_counter()
                try:
                    status, answer = await client.post("/api/v1/events", body)
                except (HttpClientError, OSError, TimeoutError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                latencies.append(time.perf_counter() - t0)
                requests += 1
                if status == 202:
                    accepted += int(orjson.loads(answer)["accepted"])
                else:
                    errors.append(f"{status}: {answer[:200].decode(errors='replace')}")

    await asyncio.gather(*(one(n) for n in range(clients)))
    return latencies, accepted, requests, errors


def _thread_cpu(pid: int) -> dict[str, tuple[str, float]]:
    """OS thread id -> (its name, CPU seconds so far), from /proc (Linux; empty elsewhere)."""
    out: dict[str, tuple[str, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[task.name] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def _cpu_by_thread(pid: int, before: dict[str, tuple[str, float]], events: int) -> dict[str, float]:
    """With ``BENCH_HTTP_PROFILE``: CPU µs per event of each group of threads while driven, named
    by Python thread names (``py-spy dump``; the engine's and librdkafka's threads by their own)."""
    if not os.environ.get("BENCH_HTTP_PROFILE"):
        return {}
    import re
    from collections import Counter

    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
    dump = subprocess.run([spy, "dump", "-p", str(pid)], capture_output=True, text=True, timeout=60).stdout
    python_names = {m[1]: m[2] for m in re.finditer(r'Thread (\d+) \(\w+\): "([^"]+)"', dump)}
    groups: Counter[str] = Counter()
    for tid, (name, cpu) in _thread_cpu(pid).items():
        name = re.sub(r"(_\d+|-\d+)$", "", python_names.get(tid, name))  # asyncio_0, Thread-7: one group
        groups[name] += (cpu - before.get(tid, (name, 0.0))[1]) / events * 1e6
    return {n: v for n, v in groups.most_common() if v >= 0.5}


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _drained(bootstrap: str, topic: str, group: str) -> bool:
    """Has ``group`` committed the end offset of every partition of ``topic``?"""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        parts = [TopicPartition(topic, p) for p in c.list_topics(topic, timeout=10).topics[topic].partitions]
        committed = {tp.partition: tp.offset for tp in c.committed(parts, timeout=10)}
        for tp in parts:
            low, high = c.get_watermark_offsets(tp, timeout=10)
            if high > low and committed.get(tp.partition, -1) < high:
                return False
        return True
    finally:
        c.close()


def _count(tmp: Path) -> tuple[int, int, float]:
    """(rows, distinct ids, meter total) of the bench tenant, read from the stopped process's engine."""
    from schemas.clickhouse import connect

    client = connect(f"chdb://{tmp / 'chdb'}", "metering")
    try:
        rows, ids = client.query(
            "SELECT count(), uniqExact(event_id) FROM metering.events_raw WHERE tenant = {t:String} AND type = 'render.completed'",
            parameters={"t": TENANT},
        ).result_rows[0]
        total = client.query(
            "SELECT sum(value) FROM metering.usage_daily WHERE tenant = {t:String} AND meter = {m:String}",
            parameters={"t": TENANT, "m": METER},
        ).result_rows[0][0]
        return int(rows), int(ids), float(total or 0)
    finally:
        client.close()


def _profile(pid: int, seconds: float) -> subprocess.Popen[bytes] | None:
    """``BENCH_HTTP_PROFILE=<file>``: py-spy (dev extra) samples the process while it is driven
    and writes collapsed stacks there: only the thread holding the GIL is sampled, which is what
    the all-in-one process's parts compete for."""
    out = os.environ.get("BENCH_HTTP_PROFILE")
    if not out:
        return None
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
    return subprocess.Popen(
        [
            spy,
            "record",
            "-p",
            str(pid),
            "-d",
            str(int(seconds)),
            "-r",
            "100",
            "--nonblocking",
            "--gil",
            "--threads",
            "-f",
            "raw",
            "-o",
            out,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def run_http_ingest(say: Callable[[str], None], bootstrap: str | None = None) -> dict[str, Any]:
    """``bootstrap``: a running broker to use (``make bench`` passes its own); else one is started."""
    from contextlib import nullcontext

    from bench.run import broker
    from deploy.kafka.local_broker import find_free_port

    clients = int(os.environ.get("BENCH_HTTP_CLIENTS", "8"))
    seconds = float(os.environ.get("BENCH_HTTP_SECONDS", "20"))
    tmp = Path(tempfile.mkdtemp(prefix="bench-http-"))
    topic = f"bench-http-{uuid.uuid4().hex[:8]}"
    port = find_free_port()
    url = f"http://127.0.0.1:{port}"
    with nullcontext(bootstrap) if bootstrap else broker() as bootstrap:
        env = _env(tmp, bootstrap, port, topic)
        log = tmp / "run.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", "from deploy.cli import app; app()", "run"],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + 180
            while not _ready(url, log):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"metering run did not become ready:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
            ws = _admin(env, "workspace", "create", "--tenant", TENANT, "--name", "bench")["workspace_id"]
            key = _admin(env, "api-key", "create", "--tenant", TENANT, "--workspace-id", ws)["api_key"]
            say(f"http ingest: {clients} clients, {BATCH}-event batches, {seconds:g} s against metering run…")
            spy = _profile(proc.pid, seconds)
            server = psutil.Process(proc.pid)
            cpu_before = _cpu_s(server)
            threads_before = _thread_cpu(proc.pid)
            started = time.monotonic()
            own_before = _cpu_s(psutil.Process())
            # the clients on uvloop, as the server: on a 2-core machine the load generator's own
            # CPU is taken from the server's (http_ingest_client_cpu_us_per_event says how much)
            latencies, accepted, requests, errors = uvloop.run(_drive(url, key, ws, clients, seconds))
            elapsed = time.monotonic() - started
            cpu_us = (_cpu_s(server) - cpu_before) / max(accepted, 1) * 1e6
            # the clients' own CPU: on a 2-core machine they compete with the server for it
            client_us = (_cpu_s(psutil.Process()) - own_before) / max(accepted, 1) * 1e6
            if spy is not None:
                spy.wait(timeout=60)
            by_thread = _cpu_by_thread(proc.pid, threads_before, max(accepted, 1))
            if errors:
                say(f"  {len(errors)} failed request(s), first: {errors[0]}")
            rate = accepted / elapsed
            p50, p99 = _percentile(latencies, 0.5) * 1000, _percentile(latencies, 0.99) * 1000
            say(f"  accepted {accepted:,} events in {requests:,} requests: {rate:,.0f} events/s")
            say(
                f"  latency p50 {p50:.0f} ms, p99 {p99:.0f} ms; the process's CPU {cpu_us:.0f} µs per event"
                f" (the clients' {client_us:.0f})"
            )
            if by_thread:
                say(
                    "  CPU µs per event by thread: " + ", ".join(f"{n} {v:.0f}" for n, v in by_thread.items())
                )
            t0 = time.monotonic()
            while not _drained(bootstrap, topic, f"g-{topic}"):
                if time.monotonic() - t0 > 300:
                    raise RuntimeError("the aggregator did not commit every message within 300 s")
                time.sleep(1)
            say(f"  aggregator caught up {time.monotonic() - t0:.1f} s after the last request")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    # in a process of its own: the embedded engine opens one data directory per process, and the
    # caller (make bench) has its own open already
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        rows, ids, total = pool.apply(_count, (tmp,))
    counted = accepted > 0 and rows == ids == accepted and total == accepted * SECONDS_PER_RENDER
    say(
        f"  counted: {rows:,} rows, {ids:,} ids, {METER} {total:,.0f} "
        f"(expected {accepted:,} and {accepted * SECONDS_PER_RENDER:,}): {'exact' if counted else 'MISMATCH'}"
    )
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "http_ingest_events_per_s": rate,
        "http_ingest_p50_ms": p50,
        "http_ingest_p99_ms": p99,
        "http_ingest_counted": counted,
        # user+system CPU of the whole process (ingest and aggregator, every thread) while driven
        "http_ingest_cpu_us_per_event": cpu_us,
        "http_ingest_client_cpu_us_per_event": client_us,  # the benchmark's clients, this process
        "http_ingest_cpu_us_per_event_by_thread": by_thread,
        "http_ingest_events": accepted,
        "http_ingest_failed_requests": len(errors),
    }


def wire_formats(say: Callable[[str], None], events: int = 100_000) -> dict[str, float]:
    """Item 4: CPU per event of JSON vs MessagePack where the wire format is decoded: the HTTP
    ingest's body decode (beside its pydantic validation, for scale) and the aggregator's hand-over
    to ClickHouse (one ``raw_insert`` of every event into a Memory stage; MessagePack needs a fixed
    row schema, so ``data`` travels as a JSON string inside it). Best of 3, CPU of this process
    (every thread: the embedded engine's too)."""
    import resource

    import msgspec

    from ingest.sdk import prepare_event
    from schemas.clickhouse import connect
    from schemas.validation import kafka_time, now_ms

    at = (datetime.now(UTC) - timedelta(minutes=5)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    ws = str(uuid.uuid4())
    evs = [
        {
            "specversion": "1.0",
            "id": f"e-{i}",
            "source": "bench",
            "type": "render.completed",
            "subject": f"r-{i}",
            "time": at,
            "tenant": "acme",
            "data": {"workspace_id": ws, "render_id": f"r-{i}", "output_duration_seconds": 30.0},
        }
        for i in range(events)
    ]
    as_json = [orjson.dumps(evs[i : i + BATCH]) for i in range(0, events, BATCH)]
    as_msgpack = [msgspec.msgpack.encode(evs[i : i + BATCH]) for i in range(0, events, BATCH)]
    now = kafka_time(now_ms())

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def per_event(work: Callable[[], object]) -> float:
        best = float("inf")
        for _ in range(3):
            c0 = cpu()
            work()
            best = min(best, cpu() - c0)
        return best / events * 1e6

    out = {
        "wire_json_bytes_per_event": sum(map(len, as_json)) / events,
        "wire_msgpack_bytes_per_event": sum(map(len, as_msgpack)) / events,
        "ingest_decode_orjson_us": per_event(lambda: [orjson.loads(b) for b in as_json]),
        "ingest_decode_msgspec_json_us": per_event(lambda: [msgspec.json.decode(b) for b in as_json]),
        "ingest_decode_msgpack_us": per_event(lambda: [msgspec.msgpack.decode(b) for b in as_msgpack]),
        "ingest_validate_us": per_event(lambda: [prepare_event(e, "acme", received_at=now) for e in evs]),
    }
    names = ["tenant", "id", "source", "type", "subject", "time", "data"]
    client = connect(f"chdb://{tempfile.mkdtemp(prefix='bench-wire-')}", "default")
    columns = ", ".join(f"{n} String" for n in names)
    client.command(f"CREATE TABLE stage_json ({columns}) ENGINE = Memory")
    client.command(f"CREATE TABLE stage_msgpack ({columns}) ENGINE = Memory")
    json_block = b"[" + b",".join(b[1:-1] for b in as_json) + b"]"  # the messages joined, no decode
    pack = msgspec.msgpack.encode
    msgpack_block = b"".join(
        b"".join(pack(e[n]) for n in names[:-1]) + pack(orjson.dumps(e["data"]).decode()) for e in evs
    )

    def insert(table: str, block: bytes, fmt: str, settings: dict[str, Any]) -> None:
        client.command(f"TRUNCATE TABLE {table}")
        client.raw_insert(table, names, insert_block=block, fmt=fmt, settings=settings)

    out["clickhouse_jsoneachrow_us"] = per_event(
        lambda: insert(
            "stage_json", json_block, "JSONEachRow", {"input_format_json_read_objects_as_strings": 1}
        )
    )
    out["clickhouse_msgpack_us"] = per_event(lambda: insert("stage_msgpack", msgpack_block, "MsgPack", {}))
    for table in ("stage_json", "stage_msgpack"):
        assert int(client.command(f"SELECT count() FROM {table}")) == events
    client.close()
    for name, value in out.items():
        say(f"  {name}: {value:.2f}")
    return out


class _AckingKafka:
    """Stands in for librdkafka in ``route_cpu``: takes every message and acknowledges it at the
    next ``poll`` (which waits for work, as librdkafka's does, instead of spinning)."""

    def __init__(self) -> None:
        import threading

        self._pending: list[Any] = []
        self._ready = threading.Condition()
        self.values: list[bytes] = []

    def produce(
        self, topic: str, *, value: bytes, key: bytes, headers: Any, on_delivery: Any, timestamp: int = 0
    ) -> None:
        with self._ready:
            self.values.append(value)
            self._pending.append(on_delivery)
            self._ready.notify()

    def poll(self, timeout: float) -> int:
        with self._ready:
            if not self._pending:
                self._ready.wait(timeout)
            pending, self._pending = self._pending, []
        for callback in pending:
            callback(None, None)
        return len(pending)

    def flush(self, timeout: float) -> int:
        self.poll(0)
        return 0


def route_cpu(say: Callable[[str], None], requests: int = 2000) -> dict[str, float]:
    """CPU µs per event of ``POST /api/v1/events`` alone, in this process: the ingest router in a
    bare FastAPI app driven through ASGI (no sockets, no HTTP parser), the real producer code
    handing messages to a stand-in for librdkafka that acknowledges at once, keys and scopes from
    memory. Sequential 100-event requests; user+system CPU of the process (every thread): a figure
    other load on the machine disturbs little, unlike the rate of ``run_http_ingest``. Best of 3."""
    import resource

    from fastapi import FastAPI

    from deploy.settings import CommonSettings, IngestSettings
    from ingest.http import EVENTS_PATH, build_ingest_router
    from ingest.scope import WORKSPACE_SCOPE, build_tenant_scope
    from ingest.sdk import UsageProducer
    from query_api.credentials import Principal
    from schemas.events import EntityKind

    class Keys:
        def lookup(self, raw: str, kind: EntityKind) -> Principal | None:
            return Principal(TENANT, kind, raw, "workspace", "w1", "", "", "active", None)

    class Scopes:
        def key_scope(self, principal: Principal) -> Any:
            tenant = build_tenant_scope([(EntityKind.WORKSPACE.value, "w1", "", "", "", "")])
            return tenant.for_key(WORKSPACE_SCOPE, "w1", "")

        # kept, as the product's store keeps it after a tenant's first request: the checks on the loop
        cached_key_scope = key_scope

    kafka = _AckingKafka()
    producer = UsageProducer("unused:0", settings=CommonSettings(), topic="events", producer=kafka)
    settings = IngestSettings(ingest_rate_limit_per_minute=100_000_000)
    app = FastAPI()
    app.include_router(
        build_ingest_router(lambda: producer, lambda: Keys(), settings, get_scopes=lambda: Scopes())
    )
    at = (datetime.now(UTC) - timedelta(minutes=5)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    headers = {"Authorization": "Bearer k", "Content-Type": "application/cloudevents-batch+json"}

    def body(i: int) -> bytes:
        return orjson.dumps(
            [
                {
                    "specversion": "1.0",
                    "id": f"r{i}-{j}",
                    "source": "bench",
                    "type": "render.completed",
                    "time": at,
                    "data": {"workspace_id": "w1", "render_id": f"r{i}-{j}", "output_duration_seconds": 30},
                }
                for j in range(BATCH)
            ]
        )

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    async def drive(first: int) -> float:
        bodies = [body(first + i) for i in range(requests)]  # built before the clock starts
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", headers=headers) as client:
            c0 = cpu()
            for b in bodies:
                r = await client.post(EVENTS_PATH, content=b)
                if r.status_code != 202 or r.json()["accepted"] != BATCH:
                    raise RuntimeError(f"not all accepted: {r.status_code} {r.text[:300]}")
            return cpu() - c0

    try:
        best = min(asyncio.run(drive(n * requests)) for n in range(3))
    finally:
        producer.close(timeout=5)
    out = {"http_ingest_route_cpu_us_per_event": best / (requests * BATCH) * 1e6}
    say(f"  the route alone: {out['http_ingest_route_cpu_us_per_event']:.1f} µs CPU per event (best of 3)")
    return out


def main() -> None:
    from bench.run import say

    if "--route" in sys.argv[1:]:
        say("the ingest route alone, in process: CPU per event…")
        print(orjson.dumps(route_cpu(say)).decode(), flush=True)
        return
    if "--wire" in sys.argv[1:]:
        say("wire formats: CPU per event, JSON vs MessagePack…")
        print(orjson.dumps(wire_formats(say)).decode(), flush=True)
        return
    print(orjson.dumps(run_http_ingest(say)).decode(), flush=True)


if __name__ == "__main__":
    main()
