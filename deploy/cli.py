"""The ``metering`` command line (typer)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from deploy import collector, event_loop
from deploy.logging import setup_logging
from deploy.settings import (
    AggregatorSettings,
    CommonSettings,
    IngestSettings,
    QuerySettings,
    RunSettings,
    masked,
)

app = typer.Typer(
    help="Event-sourced usage metering: Kafka -> faust -> ClickHouse -> FastAPI.", no_args_is_help=True
)


def _run(parts: set[str], settings: RunSettings, start_local_kafka: bool) -> None:
    from deploy.runner import Part, serve

    setup_logging(settings.log_level, settings.log_json)
    collector.set_thresholds()  # a server's settings for Python's cyclic GC (deploy/collector.py)
    try:
        event_loop.run(serve(settings, {Part(p) for p in parts}, start_local_kafka), settings.event_loop)
    except Exception as exc:  # a clear one-line reason, not a traceback, for start-up failures
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from exc


@app.command()
def run() -> None:
    """All in one process: local Kafka (unless KAFKA_BOOTSTRAP_SERVERS is set), migrations,
    HTTP ingest, the aggregator and the query API on http://127.0.0.1:8080."""
    _run({"ingest", "aggregator", "query"}, RunSettings(), start_local_kafka=True)


@app.command("ingest-api")
def ingest_api() -> None:
    """Only the HTTP ingest API (scale-out; needs a ClickHouse server for API keys)."""
    _run({"ingest"}, RunSettings(**IngestSettings().model_dump()), start_local_kafka=False)


@app.command()
def aggregator() -> None:
    """Only the faust stream processor (scale-out; needs a ClickHouse server)."""
    _run({"aggregator"}, RunSettings(**AggregatorSettings().model_dump()), start_local_kafka=False)


@app.command("query-api")
def query_api() -> None:
    """Only the query API (scale-out; needs a ClickHouse server)."""
    _run({"query"}, RunSettings(**QuerySettings().model_dump()), start_local_kafka=False)


@app.command()
def migrate(
    target: Annotated[int | None, typer.Option(help="Migrate up or down to this version.")] = None,
) -> None:
    """Apply (or roll back to --target) the ClickHouse migrations."""
    from schemas.clickhouse import connect
    from schemas.migrate import applied_versions
    from schemas.migrate import migrate as do_migrate

    s = CommonSettings()
    client = connect(s.clickhouse_dsn.get_secret_value(), s.clickhouse_database, engine=s.engine_caps())
    for line in do_migrate(client, s.clickhouse_database, s.clickhouse_cluster, target):
        typer.echo(line)
    typer.echo(
        f"schema at version {max(applied_versions(client, s.clickhouse_database, s.clickhouse_cluster), default=0)}"
    )


@app.command()
def config(
    process: Annotated[str, typer.Option(help="run | ingest-api | aggregator | query-api")] = "run",
) -> None:
    """Print the effective settings of a process, secrets masked."""
    classes = {
        "run": RunSettings,
        "ingest-api": IngestSettings,
        "aggregator": AggregatorSettings,
        "query-api": QuerySettings,
    }
    if process not in classes:
        raise typer.BadParameter(f"one of {', '.join(classes)}")
    typer.echo(json.dumps(masked(classes[process]()), indent=2, default=str))


def _register_optional() -> None:
    """Commands implemented in the other packages."""
    from aggregators.replay_cli import replay

    app.command()(replay)
    from ingest.cli import admin_app, emit, load
    from ingest.demo import demo

    app.command()(emit)
    app.command()(load)
    app.command()(demo)
    app.add_typer(admin_app, name="admin")  # its help: ingest/cli.py
    from deploy.sql_cli import analyst_key_app, sql

    app.command()(sql)
    admin_app.add_typer(analyst_key_app, name="analyst-key")
    from ingest.events_cli import dlq_app, events_app

    app.add_typer(events_app, name="events")  # trace, rejected, summary: ingest/events_cli.py
    app.add_typer(dlq_app, name="dlq")


_register_optional()
