"""Replay: rebuild tables from the raw log (``metering replay``). Idempotent: running it twice
gives the same tables as running it once, and the same as the live pipeline.

- ``rebuild_from_raw``: recompute the period, gauge and entity tables of a tenant (or all) over
  a time range from ``events_raw``, with the same SQL the live path runs.
- from Kafka (``metering replay --from-offset/--from-time``, aggregators/replay_cli.py): the raw
  rows from an offset or a timestamp on deleted with their keys (``delete_raw_from``), the
  messages from there re-read and written again on the live aggregator's own path
  (``replay_messages``: the same statements, the same dedupe, the first occurrence in the log
  wins), then the derived tables rebuilt over the time span those events cover.

With the embedded engine, stop ``metering run`` first: chdb locks its data directory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aggregators import rollup
from aggregators.decode import SourceMessage
from aggregators.processor import BatchProcessor
from aggregators.projection import LifecycleEvent, fold
from aggregators.rollup import Grain
from aggregators.writer import ClickHouseWriter, fmt_time
from schemas.clickhouse import Table
from schemas.events import LIFECYCLE_KIND, EventType

Progress = Callable[[str, int, int], None]


def _noop(_step: str, _done: int, _total: int) -> None:
    return None


def month_floor(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def month_ceil(t: datetime) -> datetime:
    f = month_floor(t)
    if f == t.astimezone(UTC):
        return f
    return f.replace(year=f.year + 1, month=1) if f.month == 12 else f.replace(month=f.month + 1)


@dataclass
class RebuildReport:
    tenant: str | None
    since: datetime
    until: datetime
    statements: dict[str, int] = field(default_factory=dict)


def rebuild_from_raw(
    writer: ClickHouseWriter,
    tenant: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    progress: Progress = _noop,
) -> RebuildReport:
    c, db = writer.client, writer.db
    # Everything else must be current first: rebuilt gauge rows claim the raw watermark.
    parts = [
        int(r[0]) for r in c.query(f"SELECT DISTINCT src_partition FROM {db}.{Table.EVENTS_RAW}").result_rows
    ]
    writer.catch_up(parts)
    lo = month_floor(since or datetime(1970, 1, 1, tzinfo=UTC))
    hi = month_ceil(until or datetime(2100, 1, 1, tzinfo=UTC))
    report = RebuildReport(tenant, lo, hi)
    scope = "tenant = {tenant:String} AND " if tenant else ""
    params: dict[str, Any] = {"lo": fmt_time(lo), "hi": fmt_time(hi)}
    if tenant:
        params["tenant"] = tenant
    # Literal times, not parameters, in mutations: ClickHouse re-parses a mutation's text later
    # and mangles DateTime64 parameters there. They come from datetime objects, never from text.
    window = f"window_start >= toDateTime('{lo:%Y-%m-%d %H:%M:%S}', 'UTC') AND window_start < toDateTime('{hi:%Y-%m-%d %H:%M:%S}', 'UTC')"
    raw_where = f"{scope}time >= {{lo:DateTime64(3, 'UTC')}} AND time < {{hi:DateTime64(3, 'UTC')}}"
    steps = [*rollup.GRAIN_TABLE.items()]
    total = len(steps) + 2
    for i, (grain, table) in enumerate(steps):
        progress(f"rebuilding {table}", i, total)
        c.command(
            f"ALTER TABLE {db}.{table} DELETE WHERE {scope}{window}",
            parameters=params,
            settings={"mutations_sync": 2},
        )
        sql = rollup.period_insert(writer.catalog, Grain(grain), db, raw_where)
        if sql:
            c.command(sql, parameters=params)
            report.statements[table.value] = 1
    progress(f"rebuilding {Table.GAUGE_15M}", len(steps), total)
    report.statements[Table.GAUGE_15M.value] = _rebuild_gauges(writer, tenant, lo, hi, scope, params)
    progress(f"rebuilding {Table.ENTITIES}", len(steps) + 1, total)
    report.statements[Table.ENTITIES.value] = _rebuild_entities(writer, tenant)
    progress("done", total, total)
    writer.forget()
    return report


def _rebuild_gauges(
    writer: ClickHouseWriter,
    tenant: str | None,
    lo: datetime,
    hi: datetime,
    scope: str,
    params: dict[str, Any],
) -> int:
    c, db = writer.client, writer.db
    c.command(
        f"ALTER TABLE {db}.{Table.GAUGE_15M} DELETE WHERE {scope}"
        f"window_start >= toDateTime('{lo:%Y-%m-%d %H:%M:%S}', 'UTC') AND window_start < toDateTime('{hi:%Y-%m-%d %H:%M:%S}', 'UTC')",
        parameters=params,
        settings={"mutations_sync": 2},
    )
    statements = 0
    raw_wm: dict[int, int] = {
        int(p): int(o)
        for p, o in c.query(
            f"SELECT src_partition, max(src_offset) FROM {db}.{Table.EVENTS_RAW} GROUP BY src_partition"
        ).result_rows
    }
    for meter in (m for m in writer.catalog.meters if m.is_gauge):
        series = c.query(
            f"SELECT src_partition, tenant, subject FROM {db}.{Table.EVENTS_RAW} WHERE type = '{meter.event_type.value}' "
            f"AND {scope}time >= {{lo:DateTime64(3, 'UTC')}} AND time < {{hi:DateTime64(3, 'UTC')}} "
            "GROUP BY src_partition, tenant, subject",
            parameters=params,
        ).result_rows
        by_part: dict[int, list[tuple[str, str]]] = {}
        for p, t, s in series:
            by_part.setdefault(int(p), []).append((str(t), str(s)))
        for p, pairs in sorted(by_part.items()):
            c.command(
                f"INSERT INTO {db}.{Table.GAUGE_15M} ({rollup.GAUGE_COLUMNS}) "
                + rollup.gauge_select(meter, db, "g_"),
                parameters={
                    "g_tenants": [t for t, _ in pairs],
                    "g_series": [s for _, s in pairs],
                    "g_w_lo": int(lo.timestamp() * 1000),
                    "g_w_hi": int(hi.timestamp() * 1000),
                    "src_partition": p,
                    "src_offset": int(raw_wm.get(p, 0)),
                },
            )
            statements += 1
    return statements


def _rebuild_entities(writer: ClickHouseWriter, tenant: str | None) -> int:
    c, db = writer.client, writer.db
    types = sorted(t.value for t in LIFECYCLE_KIND)
    rows = c.query(
        f"SELECT tenant, type, subject, time, data, src_partition, src_offset FROM {db}.{Table.EVENTS_RAW} "
        "WHERE type IN {types:Array(String)}" + (" AND tenant = {tenant:String}" if tenant else ""),
        parameters={"types": types, **({"tenant": tenant} if tenant else {})},
    ).result_rows
    import orjson

    grouped: dict[tuple[str, Any, str], list[LifecycleEvent]] = {}
    for t, type_, subject, time, data, p, o in rows:
        et = EventType(type_)
        ts = time.replace(tzinfo=UTC) if time.tzinfo is None else time
        grouped.setdefault((str(t), LIFECYCLE_KIND[et], str(subject)), []).append(
            LifecycleEvent(et, ts, orjson.loads(data), int(p), int(o))
        )
    out = []
    for (t, kind, subject), evs in grouped.items():
        state = fold(t, kind, subject, evs)
        if state is not None:
            out.append(orjson.dumps(state.row()))
    if out:
        c.raw_insert(f"{db}.{Table.ENTITIES}", None, b"\n".join(out), fmt="JSONEachRow")
    return 1 if out else 0


@dataclass
class KafkaReplayReport:
    messages: int = 0
    events_written: int = 0
    rejected: int = 0
    duplicates: int = 0
    first_event: datetime | None = None
    last_event: datetime | None = None


def replay_messages(
    processor: BatchProcessor,
    messages: list[SourceMessage],
    tenant: str | None,
    report: KafkaReplayReport,
) -> None:
    """Write ``messages`` (re-read from ``start`` on, after ``delete_raw_from``) to events_raw
    again on the live aggregator's own path (``BatchProcessor.rewrite``: parsed and judged by the
    engine, pydantic for what the SQL flags, the same trial, the same dedupe against event_keys),
    so a replay writes the rows the live pipeline wrote: the first occurrence of an event wins,
    whether it is before ``start`` or earlier in the replay, and the events the engine refuses
    are left out. Running it twice changes nothing: ``delete_raw_from`` deletes first."""
    msgs = [m for m in messages if tenant is None or (m.key or b"").decode() == tenant]
    report.messages += len(msgs)
    stats, span = processor.rewrite(msgs)
    report.rejected += stats.rejected + stats.refused
    report.duplicates += stats.duplicates
    report.events_written += stats.written
    if span is not None:
        lo, hi = span
        report.first_event = min(lo, report.first_event) if report.first_event else lo
        report.last_event = max(hi, report.last_event) if report.last_event else hi


def delete_raw_from(
    writer: ClickHouseWriter, start: dict[int, int], tenant: str | None
) -> tuple[datetime, datetime] | None:
    """Delete raw rows from ``start`` on; returns the event-time span they covered. Derived rows
    are left alone: the rebuild that follows recomputes that span from the rewritten raw rows."""
    span = None
    for p, off in start.items():
        row = writer.client.query(
            f"SELECT min(time), max(time), count() FROM {writer.db}.{Table.EVENTS_RAW} WHERE src_partition = {{p:Int32}} "
            "AND src_offset >= {o:Int64}" + (" AND tenant = {t:String}" if tenant else ""),
            parameters={"p": p, "o": off, **({"t": tenant} if tenant else {})},
        ).result_rows[0]
        if int(row[2]):
            lo, hi = (x.replace(tzinfo=UTC) if x.tzinfo is None else x for x in row[:2])
            span = (min(lo, span[0]), max(hi, span[1])) if span else (lo, hi)
    # their keys too, first (keys within raw: docs/exactly-once.md): the keys watermark lowered
    # to the start, then the keys deleted in one statement (a RocksDB delete reads every key: no
    # index but the key), then the raw rows. The aggregator's next batch of the partition inserts
    # the keys of the rewritten rows (ClickHouseWriter.keys_catch_up, from the lowered watermark)
    writer.keys_watermarks_lower(start)
    parts = list(start.items())
    if parts:
        where = " OR ".join(
            f"(src_partition = {{p{i}:Int32}} AND src_offset >= {{o{i}:Int64}})" for i in range(len(parts))
        )
        params: dict[str, Any] = {f"p{i}": p for i, (p, _) in enumerate(parts)}
        params.update({f"o{i}": off for i, (_, off) in enumerate(parts)})
        writer.client.command(
            f"ALTER TABLE {writer.db}.{Table.EVENT_KEYS} DELETE WHERE ({where})"
            + (" AND tenant = {t:String}" if tenant else ""),
            parameters={**params, **({"t": tenant} if tenant else {})},
            settings={"mutations_sync": 2},
        )
    for p, off in start.items():
        writer.client.command(
            f"ALTER TABLE {writer.db}.{Table.EVENTS_RAW} DELETE WHERE src_partition = {{p:Int32}} AND src_offset >= {{o:Int64}}"
            + (" AND tenant = {t:String}" if tenant else ""),
            parameters={"p": p, "o": off, **({"t": tenant} if tenant else {})},
            settings={"mutations_sync": 2},
        )
    writer.forget()
    return span
