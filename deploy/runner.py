"""Starting the processes: the all-in-one ``metering run`` and the separate parts.

``metering run`` = HTTP ingest + the faust aggregator + the query API in ONE process, which the
embedded engine requires (chdb locks its data directory to one process). Each part has a
ClickHouse client of its own on that engine (``PartClients``): one client runs one statement at a
time, so with a shared one the query API and ``/readyz`` waited behind the aggregator's
statements; handles of their own run concurrently, and the aggregator's is bounded
(``max_threads``, ``max_memory_usage``) so reads keep a share of the engine. With a ClickHouse
server the same parts start separately (``ingest-api``, ``aggregator``, ``query-api``) and scale
out.

Shutdown order on Ctrl-C / SIGTERM: stop accepting HTTP, stop the aggregator (its current batch
finishes and is committed, or is retried by whoever consumes next), flush producers, then stop
the broker if this process started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI

from aggregators.dead_letter import KafkaDeadLetterSink
from aggregators.metrics import watch_stages
from aggregators.processor import BatchProcessor
from aggregators.supervisor import AggregatorPart
from aggregators.watchdog import Watchdog, describe, describe_troubles
from aggregators.writer import ClickHouseWriter
from deploy import collector
from deploy.allocator import set_mmap_threshold
from deploy.http_server import server_config
from deploy.settings import CommonSettings, RunSettings
from query_api.admin_token import ensure_admin_token
from query_api.health import Status, build_health_router, clickhouse_check, kafka_check
from schemas.clickhouse import chdb_path, connect, connect_part
from schemas.meters import default_catalog
from schemas.migrate import migrate

log = logging.getLogger(__name__)


class Part(StrEnum):
    INGEST = "ingest"
    AGGREGATOR = "aggregator"
    QUERY = "query"


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: this module owns shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.contextmanager
def kafka_bootstrap(settings: CommonSettings, start_local: bool) -> Iterator[str]:
    """The bootstrap address: the configured cluster, or the project's local broker (started
    here, and stopped on exit, only when ``start_local`` and it was not already running). A
    broker left running by a run that was killed (SIGKILL: the broker has a session of its own)
    is taken over, or replaced if on another port, and stopped on exit like one started here."""
    if settings.kafka_bootstrap_servers:
        yield settings.kafka_bootstrap_servers
        return
    from deploy.kafka import local_broker

    if not start_local:
        yield local_broker.bootstrap_for(settings.kafka_port)
        return
    with local_broker.running_broker(
        port=settings.kafka_port, data_dir=settings.kafka_data_dir, version=settings.kafka_version
    ) as bootstrap:
        yield bootstrap


def open_clickhouse(settings: CommonSettings, apply_migrations: bool = True) -> Any:
    client = connect(
        settings.clickhouse_dsn.get_secret_value(),
        settings.clickhouse_database,
        engine=settings.engine_caps(),
    )
    if apply_migrations:
        for line in migrate(client, settings.clickhouse_database, settings.clickhouse_cluster):
            log.info("migration: %s", line)
    return client


@dataclass(frozen=True)
class PartClients:
    """A ClickHouse client per part of the process, all on the same engine (or server).

    ``api``: HTTP ingest and the query API (credentials, the documented endpoints); ``aggregator``:
    the batch writer, with the aggregator's bounded share of the engine; ``health``: the
    ``/readyz`` check, so readiness answers while the others are busy.
    """

    api: Any
    aggregator: Any
    health: Any

    def close(self) -> None:
        for client in (self.api, self.aggregator, self.health):
            with contextlib.suppress(Exception):
                client.close()


def open_part_clients(settings: RunSettings | Any, apply_migrations: bool = True) -> PartClients:
    """The migrations, then one client per part (``connect_part``): see ``PartClients``."""
    dsn, database = settings.clickhouse_dsn.get_secret_value(), settings.clickhouse_database
    # The first chdb connection starts the engine: every one carries the same bounds.
    caps = settings.engine_caps()
    api = connect_part(dsn, database, engine=caps)
    if apply_migrations:
        for line in migrate(api, database, settings.clickhouse_cluster):
            log.info("migration: %s", line)
    aggregator_settings = (
        settings.aggregator_engine_settings() if hasattr(settings, "aggregator_engine_settings") else {}
    )
    return PartClients(
        api=api,
        aggregator=connect_part(dsn, database, aggregator_settings, engine=caps),
        health=connect_part(dsn, database, engine=caps),
    )


def build_processor(settings: RunSettings | Any, client: Any, bootstrap: str) -> BatchProcessor:
    # the process's allocator, for batches of Kafka messages (deploy/allocator.py)
    set_mmap_threshold(getattr(settings, "malloc_mmap_threshold", 0))
    embedded = chdb_path(client) is not None
    writer = ClickHouseWriter(
        client,
        settings.clickhouse_database,
        default_catalog(),
        # the embedded engine only: a server's memory is its own
        purge_after_batch=embedded and bool(getattr(settings, "chdb_purge_after_batch", False)),
    )
    dlq = KafkaDeadLetterSink(
        settings.kafka_client_config(bootstrap),
        settings.topic_dead_letter,
        settings.topic_events,
        settings.topic_control,
    )
    processor = BatchProcessor(writer, dlq)
    if getattr(settings, "prepare_ahead", False) and hasattr(settings, "clickhouse_dsn"):
        # the stagers that prepare the next batch while one is applied: clients of their own,
        # with the aggregator's share of the engine (on a server too, unlike the default)
        engine = (
            settings.aggregator_engine_settings() if hasattr(settings, "aggregator_engine_settings") else {}
        )
        caps = settings.engine_caps() if hasattr(settings, "engine_caps") else None
        connect = None  # a chdb client: more connections to the engine it is on (one per process)
        if not embedded:
            dsn, database = settings.clickhouse_dsn.get_secret_value(), settings.clickhouse_database
            connect = lambda: connect_part(dsn, database, engine, engine=caps)  # noqa: E731
        processor.open_stagers(connect, engine, caps)
    watch_stages(processor)  # metering_aggregator_stage_seconds_total{stage}
    return processor


def aggregator_check(faust_app: Any, processor: BatchProcessor | None = None) -> Any:
    """Down when the faust app stopped (a crashed consumer must not look healthy); degraded while
    the processor retries a batch ClickHouse does not take, with how long and the engine's error,
    and while the watchdog finds partitions stalled (``faust_app.metering_watchdog``: the faust
    app or the AggregatorPart running it), naming them (query_api/health.py: degraded shows in
    /readyz but does not make it 503)."""

    def check() -> tuple[bool | Status, str]:
        if getattr(faust_app, "crashed", False) or faust_app.should_stop:
            return False, f"stopped: {getattr(faust_app, 'crash_reason', None)!r}"
        since = processor.stalled_since if processor is not None else None
        if processor is not None and since is not None:
            return Status.DEGRADED, (
                f"stalled for {processor.stalled_seconds():.0f}s (since {since.isoformat(timespec='seconds')}), "
                f"retrying: {processor.last_error}"
            )
        restarting = getattr(faust_app, "restarting", "")
        if isinstance(restarting, str) and restarting:
            return Status.DEGRADED, f"restarting the aggregator: {restarting}"
        dog = getattr(faust_app, "metering_watchdog", None)
        stalls = dog.stalls() if isinstance(dog, Watchdog) else []
        if stalls:
            return Status.DEGRADED, f"{describe(stalls)}; the watchdog is healing them"
        troubles = dog.troubles() if isinstance(dog, Watchdog) else {}
        if troubles:
            return Status.DEGRADED, f"{describe_troubles(troubles)} (aggregators/watchdog.py)"
        return True, "consuming"

    return check


def build_http_app(
    settings: Any,
    client: Any,
    bootstrap: str,
    parts: set[Part],
    faust_app: Any = None,
    processor: BatchProcessor | None = None,
    health_client: Any = None,
) -> tuple[FastAPI, list[Any]]:
    """The FastAPI app of this process and the things to close when it stops. ``client`` serves
    ingest and the query API; ``health_client`` (default: ``client``) the ClickHouse check."""
    checks = {
        "kafka": kafka_check(settings.kafka_client_config(bootstrap)),
        "clickhouse": clickhouse_check(health_client if health_client is not None else client),
    }
    if faust_app is not None:
        checks["aggregator"] = aggregator_check(faust_app, processor)
    routers: list[APIRouter] = [build_health_router(checks)]
    closers: list[Any] = []
    if Part.INGEST in parts:
        from ingest.http import ingest_router

        router, producer = ingest_router(settings, client, bootstrap)
        routers.append(router)
        closers.append(producer)
    from query_api.app import create_app

    app = create_app(settings, client, extra_routers=routers, include_query=Part.QUERY in parts)
    return app, closers


async def serve(settings: RunSettings, parts: set[Part], start_local_kafka: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    with kafka_bootstrap(settings, start_local_kafka) as bootstrap:
        clients = await asyncio.to_thread(open_part_clients, settings)
        from ingest.kafka_config import ensure_topics

        await asyncio.to_thread(ensure_topics, settings, bootstrap)
        faust_app: AggregatorPart | None = None
        processor: BatchProcessor | None = None
        closers: list[Any] = []
        if Part.AGGREGATOR in parts:
            processor = build_processor(settings, clients.aggregator, bootstrap)
            closers.extend([processor.dead_letters, processor])
            # the faust app, restarted when its watchdog finds a stall a reseek did not heal
            faust_app = AggregatorPart(settings, bootstrap, processor)
            await faust_app.start()
        admin_token = ""
        if Part.QUERY in parts:
            # The admin API's credential: METERING_ADMIN_TOKEN, or one generated for this run.
            settings, admin_token = ensure_admin_token(settings)
        server = None
        # Every process serves HTTP: an aggregator alone serves /healthz, /readyz and /metrics only.
        if parts & {Part.INGEST, Part.QUERY, Part.AGGREGATOR}:
            app, http_closers = build_http_app(
                settings, clients.api, bootstrap, parts, faust_app, processor, health_client=clients.health
            )
            closers.extend(http_closers)
            # Timeouts and a concurrency limit from the settings: slow clients cannot hold it.
            server = _Server(server_config(app, settings))
            server_task = asyncio.create_task(server.serve())
        # The SQL endpoint for analysts, when this process holds the embedded engine (issue 9).
        sql_server, sql_task, sql_line = await _start_sql_endpoint(settings, parts, closers)
        print(_banner(settings, bootstrap, parts, admin_token) + sql_line, flush=True)
        # what start-up built stays for the process's life: out of the collector's walks
        log.debug("objects frozen after start-up: %d", collector.freeze_startup())
        await stop.wait()
        print("stopping…", flush=True)
        if sql_server is not None:
            sql_server.should_exit = True
            await sql_task
        if server is not None:
            server.should_exit = True
            await server_task
        if faust_app is not None:
            await faust_app.stop()
        for closer in closers:
            with contextlib.suppress(Exception):
                closer.close()
        clients.close()  # last: the aggregator and the HTTP parts have stopped using them
    print("stopped.", flush=True)


async def _start_sql_endpoint(settings: Any, parts: set[Part], closers: list[Any]) -> tuple[Any, Any, str]:
    """The SQL endpoint's server and task, and a banner line. It is an analysts' convenience: when
    it is off (by setting, with a ClickHouse server, or its port is taken) the pipeline still
    starts, and the log and the banner say why."""
    if Part.QUERY not in parts:
        return None, None, ""
    from query_api import sql_endpoint as sql

    if not settings.sql_enabled:
        return None, None, "\n  SQL endpoint  off (METERING_SQL_ENABLED=false)"
    if not settings.embedded_clickhouse:
        await asyncio.to_thread(sql.open_endpoint, settings)  # logs why it is off
        return None, None, "\n  SQL endpoint  off: analysts query the ClickHouse server itself"
    try:
        sock = sql.bind_socket(settings)
    except sql.SqlPortTaken as exc:
        log.warning("SQL endpoint off: %s", exc)
        return None, None, f"\n  SQL endpoint  off: {exc}"
    endpoint = await asyncio.to_thread(sql.open_endpoint, settings)
    assert endpoint is not None
    closers.append(endpoint)
    server = _Server(sql.sql_server_config(sql.build_sql_app(endpoint), settings))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    where = f"http://{settings.sql_host}:{sock.getsockname()[1]}"
    how = "ClickHouse HTTP, read-only; user analyst, key from `metering admin analyst-key create`"
    return server, task, f"\n  SQL endpoint  {where}  ({how})"


def _banner(settings: Any, bootstrap: str, parts: set[Part], admin_token: str = "") -> str:
    lines = [f"metering: {', '.join(sorted(p.value for p in parts))} running"]
    if parts & {Part.INGEST, Part.QUERY}:
        base = f"http://{settings.http_host}:{settings.http_port}"
        lines.append(f"  HTTP API      {base}  (docs {base}/docs, readiness {base}/readyz)")
    else:
        base = f"http://{settings.http_host}:{settings.http_port}"
        lines.append(f"  Health        {base}/readyz  metrics {base}/metrics")
    if admin_token:
        lines.append(f"  Admin API     {base}/admin/v1  token {admin_token}")
    lines.append(
        f"  Kafka         {bootstrap}  usage topic {settings.topic_events}, "
        f"control topic {settings.topic_control} (administrators only)"
    )
    dsn = settings.clickhouse_dsn.get_secret_value()
    shown = dsn if dsn.startswith("chdb://") else dsn.split("@")[-1]
    lines.append(f"  ClickHouse    {shown}  database {settings.clickhouse_database}")
    lines.append("  Ctrl-C stops everything this process started.")
    return "\n".join(lines)
