"""SQL that turns raw rows into period rows, generated from the meter catalog (pure).

Every statement reads ``events_raw`` rows of a set of offset ranges, one per Kafka partition, and
is one INSERT: ClickHouse writes it as one part, so a statement is applied completely or not at
all. The same statements with a time filter instead of offsets rebuild the tables from raw
(``metering replay --from-raw``), which is why a rebuild gives the same numbers.

Meter slugs, event types and field names are validated identifiers (schemas/meters.py); they are
the only things written into the SQL text. Offsets and times are query parameters.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from aggregators.stage import key_of
from schemas.clickhouse import Table
from schemas.events import DATA_MODELS, LIFECYCLE_KIND
from schemas.meters import Aggregation, Catalog, Meter


class Grain(StrEnum):
    FIFTEEN_MINUTES = "15m"
    HOUR = "1h"
    DAY = "1d"
    MONTH = "1mo"


GRAIN_TABLE: dict[Grain, Table] = {
    Grain.FIFTEEN_MINUTES: Table.USAGE_15M,
    Grain.HOUR: Table.USAGE_1H,
    Grain.DAY: Table.USAGE_1D,
    Grain.MONTH: Table.USAGE_1MO,
}
GRAIN_FN: dict[Grain, str] = {
    Grain.FIFTEEN_MINUTES: "toStartOfFifteenMinutes",
    Grain.HOUR: "toStartOfHour",
    Grain.DAY: "toStartOfDay",
    Grain.MONTH: "toStartOfMonth",
}


@dataclass(frozen=True)
class Ranges:
    """Offsets (lo, hi] per partition: the raw rows a statement reads."""

    by_partition: Mapping[int, tuple[int, int]]

    def nonempty(self) -> Ranges:
        return Ranges({p: r for p, r in self.by_partition.items() if r[1] > r[0]})

    def __bool__(self) -> bool:
        return any(hi > lo for lo, hi in self.by_partition.values())

    def sql(self) -> tuple[str, dict[str, Any]]:
        parts, params = [], {}
        for i, (p, (lo, hi)) in enumerate(sorted(self.by_partition.items())):
            parts.append(
                f"(src_partition = {{p{i}:Int32}} AND src_offset > {{lo{i}:Int64}} AND src_offset <= {{hi{i}:Int64}})"
            )
            params.update({f"p{i}": p, f"lo{i}": lo, f"hi{i}": hi})
        return "(" + " OR ".join(parts or ["0"]) + ")", params


def _is_list_field(meter: Meter) -> bool:
    assert meter.value is not None
    annotation = DATA_MODELS[meter.event_type].model_fields[meter.value].annotation
    return typing.get_origin(annotation) is list


def _dims_sql(meter: Meter) -> str:
    if not meter.group_by:
        return "map()"
    return "map(" + ", ".join(f"'{f}', JSONExtractString(data, '{f}')" for f in meter.group_by) + ")"


def _value_sql(meter: Meter) -> str:
    if meter.aggregation in (Aggregation.COUNT, Aggregation.UNIQUE_COUNT):
        return "toDecimal128(0, 9)"
    # From the JSON text of the number, not a Float64, so 0.1 is exactly 0.1.
    return f"toDecimal128(JSONExtractRaw(data, '{meter.value}'), 9)"


def _unique_sql(meter: Meter) -> str:
    if meter.aggregation is not Aggregation.UNIQUE_COUNT:
        return "CAST([], 'Array(String)')"
    if _is_list_field(meter):
        return f"JSONExtract(data, '{meter.value}', 'Array(String)')"
    return f"[JSONExtractString(data, '{meter.value}')]"


#: The distinct keys of a group's rows (``ukeys``: an array per row) as the state the period
#: tables store (``AggregateFunction(uniqExact, String)``). ``-Array`` adds every row's keys to
#: the group's one state; the state is the same as ``uniqExact``'s, byte for byte, so the CAST
#: only renames its type (tests/integration/test_unique_state.py). The form before it,
#: ``uniqExactMergeState(arrayReduce('uniqExactState', ukeys))``, built a state per row and
#: merged it: 1.79 against 1.50 µs CPU per event for the rollup stage (docs/performance.md).
UNIQUE_STATE = "CAST(uniqExactArrayState(ukeys) AS AggregateFunction(uniqExact, String))"


def _meter_rows(catalog: Catalog, source: str, where: str) -> str:
    """Raw rows (of ``source``: ``events_raw``, or the batch's new rows) matching ``where``, one output row per (event, meter reading it): a single scan
    of events_raw whatever the number of meters (``arrayJoin`` over the meters of its type)."""
    by_type: dict[str, list[str]] = {}
    for m in catalog.meters:
        if not m.is_gauge:
            by_type.setdefault(m.event_type.value, []).append(
                f"tuple('{m.slug}', {_dims_sql(m)}, {_value_sql(m)}, {_unique_sql(m)})"
            )
    cases = ", ".join(f"type = '{t}', [{', '.join(ts)}]" for t, ts in sorted(by_type.items()))
    types = ", ".join(f"'{t}'" for t in sorted(by_type))
    return (
        "SELECT tenant, time, src_partition, src_offset, m.1 AS meter, m.2 AS dims, m.3 AS v, m.4 AS ukeys "
        f"FROM {source} ARRAY JOIN multiIf({cases}, []) AS m "
        f"WHERE type IN ({types}) AND {where}"
    )


_PERIOD_COLUMNS = (
    "tenant, meter, window_start, group_key, src_partition, dims, value_sum, value_count, value_min, "
    "value_max, value_latest, value_unique, src_offset"
)


def period_insert(catalog: Catalog, grain: Grain, database: str, where: str) -> str | None:
    """One INSERT into the period table of ``grain`` for every non-gauge meter, straight from the
    raw rows that match ``where`` (used by rebuilds)."""
    if not any(not m.is_gauge for m in catalog.meters):
        return None
    return (
        f"INSERT INTO {database}.{GRAIN_TABLE[grain]} ({_PERIOD_COLUMNS}) "
        f"SELECT tenant, meter, {GRAIN_FN[grain]}(time) AS w, toJSONString(d) AS group_key, src_partition, "
        "d, sum(v), count(), min(v), max(v), argMaxState(v, (time, src_offset)), "
        f"{UNIQUE_STATE}, max(src_offset) "
        f"FROM ({_meter_rows(catalog, f'{database}.{Table.EVENTS_RAW}', where)}) "
        "GROUP BY tenant, meter, w, dims AS d, src_partition"
    )


# ---- the live path: stage once, then every grain from the stage ---------------------------------
# Parsing JSON is the expensive part. The live path aggregates a batch's raw rows once, at 15
# minutes, into a small per-process Memory table; each period table is then one INSERT from it.
# Filled from the batch's new rows (the normal path), the stage holds a group per partition;
# filled from events_raw (the recovery path), a group per Kafka message (src_offset stays a key,
# so each period table can take exactly the offsets above its own watermark): stage_insert.
# The stage is a cache: it is emptied and rebuilt for every batch, so a crash leaves nothing in
# it that matters. On the normal path it is filled from the batch's new rows before the raw
# insert (the trial of the conversions, processor.py); whenever a period table is behind (after
# a crash, an outage), from events_raw.


def stage_create(stage: str) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {stage} (tenant String, meter String, window_start DateTime('UTC'), "
        "group_key String, src_partition Int32, src_offset Int64, dims Map(String, String), "
        "value_sum Decimal128(9), value_count UInt64, value_min Decimal128(9), value_max Decimal128(9), "
        "value_latest AggregateFunction(argMax, Decimal128(9), Tuple(DateTime64(3, 'UTC'), Int64)), "
        "value_unique AggregateFunction(uniqExact, String)) ENGINE = Memory"
    )


def stage_insert(catalog: Catalog, source: str, stage: str, where: str, per_message: bool = True) -> str:
    """The rows of ``source`` (``events_raw``, or the batch's new rows before the raw insert,
    which have its columns) matching ``where``, aggregated into the stage. Grouped by the
    dimensions map itself and its JSON text (``group_key``) written once per group, not once per
    row (the same groups and text; −15 % CPU of the statement, docs/performance.md).

    ``per_message``: a group per Kafka message (``src_offset`` a key), so that a period table
    can take exactly the offsets above its own watermark (the recovery path, where the tables
    may be at different offsets). Without it, a group per partition tagged with its highest
    offset: a stage only a period table whose pending range holds all of its rows may take (the
    normal path, every table up to date before the batch). The period rows are the same (sums,
    counts, extremes, states and the highest offset merge the same); the stage holds a row per
    group and partition instead of per group and message, and the four period inserts read that
    many. In the benchmark's mix, where a message's events of one type rarely share their
    dimensions, the stage per message held about a row per event (docs/performance.md, "The
    rollup stage per partition")."""
    offset = "src_offset" if per_message else "max(src_offset)"
    by_offset = ", src_offset" if per_message else ""
    return (
        f"INSERT INTO {stage} (tenant, meter, window_start, group_key, src_partition, src_offset, dims, value_sum, "
        "value_count, value_min, value_max, value_latest, value_unique) "
        "SELECT tenant, meter, toStartOfFifteenMinutes(time) AS w, toJSONString(d) AS group_key, src_partition, "
        f"{offset}, d, sum(v), count(), min(v), max(v), argMaxState(v, (time, src_offset)), "
        f"{UNIQUE_STATE} "
        f"FROM ({_meter_rows(catalog, source, where)}) "
        f"GROUP BY tenant, meter, w, dims AS d, src_partition{by_offset}"
    )


def period_from_stage(grain: Grain, database: str, stage: str, where: str) -> str:
    """One INSERT into the period table of ``grain`` from the stage rows matching ``where``."""
    return (
        f"INSERT INTO {database}.{GRAIN_TABLE[grain]} ({_PERIOD_COLUMNS}) "
        f"SELECT tenant, meter, {GRAIN_FN[grain]}(window_start) AS w, group_key, src_partition, any(dims), "
        "sum(value_sum), sum(value_count), min(value_min), max(value_max), argMaxMergeState(value_latest), "
        f"uniqExactMergeState(value_unique), max(src_offset) FROM {stage} WHERE {where} "
        "GROUP BY tenant, meter, w, group_key, src_partition"
    )


def gauge_values_check(catalog: Catalog, source: str, where: str) -> str | None:
    """A query that converts every gauge value of the rows of ``source`` matching ``where`` as
    ``gauge_select`` does: raises the engine's error for a value ``gauge_select`` would refuse
    (the trial of the batch's new rows, processor.py). Its arithmetic after the conversion (value
    times milliseconds) wraps without an error, like the sums. None without gauges."""
    gauges = [m for m in catalog.meters if m.is_gauge]
    if not gauges:
        return None
    # one column per meter (a type may have several gauges), each converting only its type's rows
    checks = ", ".join(
        f"max(if(type = '{m.event_type.value}', {_value_sql(m)}, toDecimal128(0, 9)))" for m in gauges
    )
    types = ", ".join(sorted({f"'{m.event_type.value}'" for m in gauges}))
    return f"SELECT count(), {checks} FROM {source} WHERE type IN ({types}) AND {where}"


def gauges_touched(meters: list[Meter], source: str, where: str) -> str:
    """The series (tenant, subject) a set of raw rows (of ``source``: ``events_raw``, or the
    batch's new rows) touches for each of the gauge ``meters``, and the time span of their
    samples, in one statement: (type, tenant, subject, min time ms, max time ms, max offset,
    partition)."""
    types = ", ".join(sorted({f"'{m.event_type.value}'" for m in meters}))
    return (
        f"SELECT type, tenant, subject, toUnixTimestamp64Milli(min(time)), toUnixTimestamp64Milli(max(time)), "
        f"max(src_offset), src_partition FROM {source} "
        f"WHERE type IN ({types}) AND {where} GROUP BY type, tenant, subject, src_partition"
    )


#: ``gauge_select``'s source tag when one statement rewrites the series of several partitions:
#: each series' partition, looked up by its key (``series_key``) in the parallel arrays
#: ``keys``/``parts`` (named with the prefix), and that partition's offset in the shared
#: ``top_parts``/``top_offsets`` (``transform`` builds a hash table of each once per block).
SERIES_TAG = (
    f"transform({key_of('tenant', 'series')}, {{{{{{p}}keys:Array(String)}}}}, {{{{{{p}}parts:Array(Int32)}}}}, "
    "toInt32(-1)) AS {p}src_partition, "
    "transform({p}src_partition, {{top_parts:Array(Int32)}}, {{top_offsets:Array(Int64)}}, toInt64(-1))"
)


def series_key(tenant: str, series: str) -> str:
    """A series' key as ``SERIES_TAG`` computes it in SQL (``stage.key_of``'s form: the tenant's
    length in bytes, a colon, the tenant, the series), so that two series never share one."""
    return f"{len(tenant.encode())}:{tenant}{series}"


def gauge_select(meter: Meter, database: str, prefix: str, tag: str | None = None) -> str:
    """The 15-minute integrals of some series over a window span, as rows of ``gauge_15m``.

    Parameters (named with ``prefix``): ``tenants``/``series`` (parallel arrays naming the
    series), ``w_lo``/``w_hi`` (window span to rewrite, ms, multiples of 15 minutes); and, shared,
    ``src_partition``, ``src_offset``: the rows' source tag; or, with ``tag=SERIES_TAG``, each
    series' own (see there). A series is a subject *with* the meter's dimensions: a
    step id reused in two contracts is two steps, each its own series. Each sample holds its
    value from its time until the series' next sample, at most ``max_gap_seconds``; that
    interval is cut at 15-minute boundaries. (Keeping one label per series is also what makes
    recomputing safe: the windows a series covers can only grow as samples arrive, so a
    recompute replaces every row it ever wrote.) Samples are read from one gap before the span (an earlier sample still holding
    into it) to one gap after (the next sample that ends the hold of the last one).
    """
    assert meter.max_gap_seconds is not None and meter.value is not None
    gap = meter.max_gap_seconds * 1000
    lo, hi = f"{{{prefix}w_lo:Int64}}", f"{{{prefix}w_hi:Int64}}"
    source_tag = "{src_partition:Int32}, {src_offset:Int64}" if tag is None else tag.format(p=prefix)
    return f"""
SELECT tenant, '{meter.slug}' AS meter, toDateTime(intDiv(ws, 1000), 'UTC') AS window_start, group_key,
       series, any(dims), sum(piece), sum(starts_here), {source_tag},
       toUnixTimestamp64Nano(now64(9))
FROM (
    SELECT tenant, series, dims, toJSONString(dims) AS group_key, v, t0, t1,
           arrayJoin(range(intDiv(t0, 900000) * 900000, t1, 900000)) AS ws,
           toDecimal128(v * toDecimal128(least(t1, ws + 900000) - greatest(t0, ws), 0), 9) / 1000 AS piece,
           toUInt64(t0 >= ws AND t0 < ws + 900000) AS starts_here
    FROM (
        SELECT tenant, series, dims, v, t0, if(nxt = 0 OR nxt - t0 > {gap}, t0 + {gap}, nxt) AS t1
        FROM (
            SELECT tenant, subject AS series, {_dims_sql(meter)} AS dims, {_value_sql(meter)} AS v,
                   toUnixTimestamp64Milli(time) AS t0,
                   leadInFrame(toUnixTimestamp64Milli(time), 1, toInt64(0)) OVER (
                       PARTITION BY tenant, subject, dims ORDER BY time, src_offset
                       ROWS BETWEEN CURRENT ROW AND 1 FOLLOWING) AS nxt
            FROM {database}.{Table.EVENTS_RAW}
            WHERE type = '{meter.event_type.value}'
              AND (tenant, subject) IN (
                  SELECT arrayJoin(arrayZip({{{prefix}tenants:Array(String)}}, {{{prefix}series:Array(String)}})))
              AND time >= fromUnixTimestamp64Milli({lo} - {gap}, 'UTC')
              AND time < fromUnixTimestamp64Milli({hi} + {gap}, 'UTC')
        )
    )
    WHERE t1 > t0
)
WHERE ws >= {lo} AND ws < {hi}
GROUP BY tenant, series, group_key, ws
"""


GAUGE_COLUMNS = "tenant, meter, window_start, group_key, series, dims, integral, samples, src_partition, src_offset, version"


LIFECYCLE_TYPES: tuple[str, ...] = tuple(sorted(t.value for t in LIFECYCLE_KIND))


def lifecycle_touched(source: str, where: str) -> str:
    """The entities the lifecycle events of ``source`` (``events_raw``, or the batch's new rows)
    matching ``where`` touch."""
    types = ", ".join(f"'{t}'" for t in LIFECYCLE_TYPES)
    return f"SELECT DISTINCT tenant, type, subject FROM {source} WHERE type IN ({types}) AND {where}"


def lifecycle_events(database: str) -> str:
    """All lifecycle events of some entities (parameters: tenant, subjects, types)."""
    return (
        f"SELECT type, subject, time, data, src_partition, src_offset FROM {database}.{Table.EVENTS_RAW} "
        "WHERE tenant = {tenant:String} AND type IN {types:Array(String)} AND subject IN {subjects:Array(String)} "
        "ORDER BY time, src_offset"
    )
