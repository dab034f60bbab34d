"""``metering events trace|rejected|summary`` and ``metering dlq redrive`` (issue 10).

Operator tools, by tenant (no API key: the tenant's own view is ``GET /api/v1/events/{id}``).
They read ClickHouse with the process settings (``METERING_CLICKHOUSE_DSN``): a server, or the
embedded engine when ``metering run`` is stopped (chdb locks its directory to one process), and
Kafka for what is still in flight.

``redrive`` re-submits the tenant's rejected events (from the ``rejections`` table, which keeps
the bytes each arrived as) through the ingest's validation, judged now: an event whose id is
already counted is skipped ("already counted"); one older than the 35-day window says it needs
the backfill path (``metering load --backfill``); one refused again is counted by its code; the
others are sent through the SDK (``acks=all``) and counted by the aggregator, which deduplicates
by id, so a second re-drive counts nothing twice. ``--dry-run`` sends nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ingest.scope import KeyScope, TenantScope, judge
from ingest.sdk import InvalidEvent, prepare_event
from query_api.event_trace import KafkaScanner, Tracer
from schemas.validation import RejectCode

events_app = typer.Typer(
    help="Trace events, list rejections, reconcile counts (issue 10).", no_args_is_help=True
)
dlq_app = typer.Typer(help="The dead letters: re-drive them after a fix.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)

NEEDS_BACKFILL = "needs_backfill"
ALREADY_COUNTED = "already_counted"
OUT_OF_SCOPE = "out_of_scope"


def _time(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(f"{name}: not an ISO 8601 time: {value!r}") from None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _open(kafka: bool = True) -> tuple[Tracer, Any]:
    from deploy.runner import open_clickhouse
    from deploy.settings import CommonSettings
    from ingest.kafka_config import resolve_bootstrap
    from schemas.meters import default_catalog

    settings = CommonSettings()
    try:
        client = open_clickhouse(settings)
    except Exception as exc:
        err.print(
            f"[red]error:[/red] cannot open ClickHouse ({type(exc).__name__}: {exc}). "
            "With the embedded engine, stop `metering run` first."
        )
        raise typer.Exit(1) from None
    scanner = (
        KafkaScanner(settings.kafka_client_config(resolve_bootstrap(settings)), settings.topic_events)
        if kafka
        else None
    )
    return Tracer(client, settings.clickhouse_database, default_catalog(), scanner), settings


def _everyone(_data: Any, _key: str) -> bool:
    return True


@events_app.command("trace")
def trace(
    event_id: Annotated[str, typer.Argument(help="The event's id.")],
    tenant: Annotated[str, typer.Option(help="The tenant that sent it.")],
    as_json: Annotated[bool, typer.Option("--json", help="The API's answer, as JSON.")] = False,
) -> None:
    """What became of one event: received, counted, duplicate, rejected or unknown."""
    tracer, _ = _open()
    answer = tracer.trace(tenant, event_id, _everyone)
    if as_json:
        typer.echo(orjson.dumps(answer, option=orjson.OPT_INDENT_2).decode())
        return
    out.print(trace_panel(answer))


def trace_panel(answer: dict[str, Any]) -> Panel:
    status = answer["status"]
    colour = {"counted": "green", "duplicate": "yellow", "rejected": "red", "received": "cyan"}.get(
        status, "white"
    )
    lines = [f"[bold {colour}]{status}[/]"]
    body = answer.get("counted_instead", answer)
    if status == "rejected":
        lines.append(f"code: {answer['code']}  from: {answer['origin']}  at: {answer['rejected_at']}")
        lines.append(f"message: {answer['message']}")
        if len(answer.get("rejections", [])) > 1:
            lines.append(f"rejected {len(answer['rejections'])} times")
    elif status == "received":
        k = answer["kafka"]
        lines.append(f"in Kafka: partition {k['partition']} offset {k['offset']} at {answer['received_at']}")
        lines.append(f"not applied yet: {answer['partition_lag']} message(s) to apply on the partition")
    elif status in ("counted", "duplicate"):
        k = body["kafka"]
        lines.append(f"{body['type']} at {body['time']}, applied {body['applied_at']}")
        lines.append(f"from {k['topic']} partition {k['partition']} offset {k['offset']}")
        for m in body["meters"]:
            lines.append(
                f"  {m['meter']}: {m['contribution']} {m['unit']} ({m['how']}) in hour {m['windows']['1h'][0]}"
            )
        for d in answer.get("dropped", []):
            lines.append(
                f"[yellow]dropped copy[/]: partition {d['kafka']['partition']} offset {d['kafka']['offset']} "
                f"received {d['received_at']}; the copy above was counted instead"
            )
    else:
        lines.append("never seen for this tenant (or not yet in Kafka)")
    return Panel("\n".join(lines), title=f"event {answer['id']}", expand=False)


@events_app.command("rejected")
def rejected(
    tenant: Annotated[str, typer.Option(help="The tenant.")],
    code: Annotated[str | None, typer.Option(help="Only this code.")] = None,
    since: Annotated[str | None, typer.Option("--from", help="Rejected at or after (ISO 8601).")] = None,
    limit: Annotated[int, typer.Option(help="Latest rejections listed.")] = 20,
) -> None:
    """The tenant's rejections: counts by code, then the latest ones."""
    tracer, _ = _open(kafka=False)
    start = _time(since, "--from")
    counts = tracer.rejected_counts(tenant, start, code)
    table = Table("code", "events", title=f"rejections of {tenant}")
    for c, n in counts.items():
        table.add_row(c, str(n))
    out.print(table)
    latest = Table("rejected at", "id", "type", "code", "from", "message", title="latest")
    for r in tracer.rejections(tenant, since=start, code=code, limit=limit):
        latest.add_row(r["rejected_at"], r["id"], r["type"], r["code"], r["origin"], r["message"][:80])
    out.print(latest)


@events_app.command("summary")
def summary(
    tenant: Annotated[str, typer.Option(help="The tenant.")],
    since: Annotated[str, typer.Option("--from", help="Start, inclusive (ISO 8601).")],
    until: Annotated[str, typer.Option("--to", help="End, exclusive (ISO 8601).")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """received = counted + duplicates + rejected + in flight, for events decided in the range."""
    tracer, _ = _open()
    start, end = _time(since, "--from"), _time(until, "--to")
    assert start is not None and end is not None
    report = reconcile(tracer, tenant, start, end)
    if as_json:
        typer.echo(orjson.dumps(report).decode())
        return
    table = Table("", "events", title=f"{tenant}: {since} to {until}")
    for k, v in report.items():
        table.add_row(k.replace("_", " "), str(v))
    out.print(table)


def reconcile(tracer: Tracer, tenant: str, start: datetime, end: datetime) -> dict[str, int]:
    counts = tracer.summary(tenant, start, end)
    scanner = tracer.in_flight
    in_flight = len(scanner.in_flight(tenant, tracer.applied())) if isinstance(scanner, KafkaScanner) else 0
    rejected_total = counts["rejected_by_aggregator"] + counts["rejected_by_ingest"]
    return {
        "received": counts["counted"] + counts["duplicates"] + rejected_total + in_flight,
        "counted": counts["counted"],
        "duplicates": counts["duplicates"],
        "rejected": rejected_total,
        "rejected_by_ingest": counts["rejected_by_ingest"],
        "rejected_by_aggregator": counts["rejected_by_aggregator"],
        "in_flight": in_flight,
    }


# ---- re-drive ----------------------------------------------------------------------------------


@dataclass
class RedriveReport:
    selected: int = 0
    accepted: list[dict[str, Any]] = field(default_factory=list)
    rejected_again: Counter[str] = field(default_factory=Counter)
    already_counted: int = 0
    needs_backfill: int = 0


def whole_tenant(scope: TenantScope) -> KeyScope:
    """The scope of the whole tenant (an operator re-drives for every workspace)."""
    workspaces = frozenset(scope.parents)
    contracts = frozenset(
        c for w in workspaces if (c := scope.contract_of.get(w, "")) and c in scope.contracts
    )
    return KeyScope(scope, workspaces, True, contracts)


def plan_redrive(
    tracer: Tracer,
    scope: TenantScope,
    tenant: str,
    *,
    code: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    now: datetime | None = None,
    step: Callable[[int, int], None] = lambda done, total: None,
) -> RedriveReport:
    """Judge the tenant's rejected events again, as the ingest would now (pure but for reads)."""
    now = now or datetime.now(UTC)
    rows = tracer.rejections(tenant, code=code, since=since, until=until, limit=1_000_000, with_original=True)
    report = RedriveReport(selected=len(rows))
    key = whole_tenant(scope)
    seen: set[str] = set()
    for done, r in enumerate(rows, 1):
        step(done, len(rows))
        eid = r["id"]
        if eid and eid in seen:
            continue  # rejected several times: re-driven once
        seen.add(eid)
        try:
            item = orjson.loads(r["original"])
        except orjson.JSONDecodeError:
            report.rejected_again[RejectCode.INVALID_JSON] += 1
            continue
        if eid and tracer.is_counted(tenant, eid):
            report.already_counted += 1
            continue
        if not isinstance(item, dict):
            report.rejected_again[RejectCode.INVALID_EVENT] += 1
            continue
        item.pop("tenant", None)
        try:
            event = prepare_event(item, tenant, received_at=now)
        except InvalidEvent as exc:
            if exc.code == RejectCode.TOO_OLD:
                report.needs_backfill += 1
            else:
                report.rejected_again[exc.code] += 1
            continue
        data = event.get("data")
        if isinstance(data, dict) and judge(key, data) is not None:
            report.rejected_again[OUT_OF_SCOPE] += 1
            continue
        report.accepted.append(event)
    return report


def send_redrive(producer: Any, tenant: str, events: Sequence[dict[str, Any]], judged_at_ms: int) -> None:
    if events:
        producer.send_batch(events, tenant, validated=True, judged_at_ms=judged_at_ms)  # blocks until acked


@dlq_app.command("redrive")
def redrive(
    tenant: Annotated[str, typer.Option(help="The tenant whose dead letters are re-driven.")],
    code: Annotated[str | None, typer.Option(help="Only events rejected with this code.")] = None,
    since: Annotated[str | None, typer.Option("--from", help="Rejected at or after (ISO 8601).")] = None,
    until: Annotated[str | None, typer.Option("--until", help="Rejected before (ISO 8601).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Judge only; send nothing.")] = False,
) -> None:
    """Re-submit the tenant's rejected events through the normal validation (see the module doc)."""
    from ingest.scope import ScopeStore
    from ingest.sdk import UsageProducer
    from schemas.validation import now_ms

    tracer, settings = _open(kafka=False)
    scope = ScopeStore(tracer.client, tracer.database, ttl_s=0).tenant_scope(tenant)
    judged_at_ms = now_ms()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err) as bar:
        task = bar.add_task("judging", total=None)
        report = plan_redrive(
            tracer,
            scope,
            tenant,
            code=code,
            since=_time(since, "--from"),
            until=_time(until, "--until"),
            now=datetime.fromtimestamp(judged_at_ms / 1000, UTC),
            step=lambda done, total: bar.update(task, completed=done, total=total),
        )
        if report.accepted and not dry_run:
            from ingest.kafka_config import resolve_bootstrap

            bar.update(task, description="sending")
            with UsageProducer(resolve_bootstrap(settings), settings=settings) as producer:
                send_redrive(producer, tenant, report.accepted, judged_at_ms)
    print_redrive(report, dry_run)


def print_redrive(report: RedriveReport, dry_run: bool) -> None:
    table = Table("", "events", title="re-drive" + (" (dry run: nothing sent)" if dry_run else ""))
    table.add_row("selected", str(report.selected))
    table.add_row("re-accepted" + (" (would be)" if dry_run else ""), str(len(report.accepted)))
    table.add_row("already counted", str(report.already_counted))
    for c, n in report.rejected_again.most_common():
        table.add_row(f"rejected again: {c}", str(n))
    if report.needs_backfill:
        table.add_row("older than 35 days: send with `metering load --backfill`", str(report.needs_backfill))
    out.print(table)
