"""Every SQL query of the query API, and only SQL: routers call these methods with validated
values and turn the results into the documents' shapes.

Rules every query here follows:
- parameterized (``{name:Type}``); the only interpolated pieces are the database name (validated
  by settings) and fragments chosen from fixed tables below by enums, never user input;
- filtered by ``tenant = {tenant:String}`` first (it leads every ORDER BY key);
- usage from the period tables (``usage_*`` merged with GROUP BY or plain sums; ``gauge_15m`` and
  ``entities`` with FINAL), raw events only for MINUTE windows and ranges the tables cannot tile;
- sums are read wider than they are stored (``Decimal256(9)``, ``UInt128``): rows that each fit
  ``Decimal128(9)`` may not fit it once summed, and the engine's ``sum`` wraps silently;
- the documents' queries filter and group by the dimension columns of migration 0004
  (``workspace_id``, ``contract_id``, ``workstation_id``, ``datastream_id``: ``dims[...]``
  materialized), one query per request, with the settings of ``_SMALL_READ``: in embedded
  ClickHouse every table read costs a few milliseconds of fixed work, whatever it reads.

Entity lookups are cached for ``cache_ttl_s`` (the same short lifetime as credentials) and
reloaded in the background before they expire (``lookup_cache.py``): they change rarely and a
request needs several of them; usage is never cached.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

import orjson
from clickhouse_connect.driver.client import Client

from query_api.errors import StorageError
from query_api.exact import finite_number, half_up, half_up_int, ratio
from query_api.lookup_cache import LookupCache
from query_api.periods import DateRange, Granularity, Period, Window, clamp_to_sql, split_months
from schemas.clickhouse import Table
from schemas.events import DATA_MODELS, EntityKind, membership_id
from schemas.meters import Aggregation, Meter, default_catalog

log = logging.getLogger(__name__)


class DocMeter(StrEnum):
    """The catalog meters the documents are answered from (checked against the catalog below)."""

    GATEWAY_REQUESTS = "gateway_requests"
    CI_CPU = "ci_step_cpu_seconds"
    CI_MEMORY = "ci_step_memory_mib_seconds"
    WS_CPU = "workstation_cpu_seconds"
    WS_GPU = "workstation_gpu_seconds"
    WS_MEMORY = "workstation_memory_gb_seconds"
    RENDER_SECONDS = "render_output_seconds"
    AI_TASKS = "ai_tasks"
    EGRESS_BYTES = "egress_bytes"
    ROWS_UNIQUE = "datastream_unique_rows"
    ROWS_TOTAL = "datastream_total_rows"


_EXPECTED = {
    DocMeter.GATEWAY_REQUESTS: Aggregation.COUNT,
    DocMeter.CI_CPU: Aggregation.SUM,
    DocMeter.CI_MEMORY: Aggregation.INTEGRAL,
    DocMeter.WS_CPU: Aggregation.SUM,
    DocMeter.WS_GPU: Aggregation.SUM,
    DocMeter.WS_MEMORY: Aggregation.INTEGRAL,
    DocMeter.RENDER_SECONDS: Aggregation.SUM,
    DocMeter.AI_TASKS: Aggregation.COUNT,
    DocMeter.EGRESS_BYTES: Aggregation.SUM,
    DocMeter.ROWS_UNIQUE: Aggregation.UNIQUE_COUNT,
    DocMeter.ROWS_TOTAL: Aggregation.SUM,
}


def check_catalog() -> None:
    """Fail at start, not at the first request, if the catalog no longer has what we read."""
    catalog = default_catalog()
    for slug, aggregation in _EXPECTED.items():
        meter = catalog.get(slug.value)
        if meter is None or meter.aggregation is not aggregation:
            raise RuntimeError(f"meter catalog lacks {slug.value} ({aggregation})")


# ---- rows -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workspace:
    id: str
    name: str
    parent_id: str
    tier: str
    contract_id: str
    billing_anchor_day: int
    extra_vks: int


@dataclass(frozen=True)
class Workstation:
    id: str
    name: str
    usd_per_cpu_hour: Decimal
    usd_per_gpu_hour: Decimal
    usd_per_gb_hour: Decimal
    updated_at: datetime


@dataclass(frozen=True)
class WorkspaceCounts:
    active_vks: int
    active_agents: int
    total_agents: int
    active_members: int
    total_members: int
    period_logs: int
    month_logs: int


@dataclass(frozen=True)
class RowUsage:
    day: date
    workspace_id: str
    datastream_id: str
    unique_rows: int
    total_rows: int


@dataclass(frozen=True)
class SeriesPoint:
    bucket: datetime | None  # None: the whole range (no window)
    group: tuple[str, ...]
    value: Decimal | None


def _ts(t: datetime) -> str:
    """A ``DateTime('UTC')`` parameter value, clamped to what the type holds."""
    return clamp_to_sql(t).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _ts64(t: datetime) -> str:
    """A ``DateTime64(3, 'UTC')`` parameter value (milliseconds kept), clamped like ``_ts``."""
    t = clamp_to_sql(t).astimezone(UTC)
    return t.strftime("%Y-%m-%d %H:%M:%S.") + f"{t.microsecond // 1000:03d}"


def _dec(v: Any) -> Decimal:
    if v is None:
        return Decimal(0)
    return v if isinstance(v, Decimal) else Decimal(str(v))


def _from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _attrs(text: str, what: str) -> dict[str, Any]:
    """An entity's ``attrs``: a JSON object, as the projection writes it. Anything else (written
    by hand, or by a bug) reads as no attributes at all, so the entity's defaults apply."""
    if not text:
        return {}
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        log.warning("unreadable attrs of %s: not a JSON object; defaults apply", what)
        return {}
    return value


def _int_attr(attrs: dict[str, Any], name: str, default: int, what: str) -> int:
    """A whole-number attribute; a value that is not a finite number reads as ``default``."""
    number = finite_number(attrs.get(name, default))
    if number is None:
        log.warning("attribute %s of %s is not a number; %s applies", name, what, default)
        return default
    return int(number)


def _rate(attrs: dict[str, Any], name: str, what: str) -> Decimal:
    """A price of a rate card; one that is not a finite number reads as 0 (and is logged)."""
    number = finite_number(attrs.get(name, 0))
    if number is None:
        log.warning("rate %s of %s is not a number; 0 applies", name, what)
        return Decimal(0)
    return number


# ---- SQL fragments chosen by enums (never by user input) ------------------------------------------

_PERIOD_VALUE = {
    Aggregation.SUM: "sum(toDecimal256(value_sum, 9))",
    Aggregation.COUNT: "sum(toUInt128(value_count))",
    Aggregation.MIN: "min(value_min)",
    Aggregation.MAX: "max(value_max)",
    Aggregation.LATEST: "argMaxMerge(value_latest)",
    Aggregation.UNIQUE_COUNT: "uniqExactMerge(value_unique)",
    # AVG: a (sum, count) pair, divided in Python.
    Aggregation.AVG: "tuple(sum(toDecimal256(value_sum, 9)), sum(toUInt128(value_count)))",
    Aggregation.INTEGRAL: "sum(toDecimal256(integral, 9))",
}

#: The number as the aggregator reads it (from its JSON text, so 0.1 stays exactly 0.1).
_RAW_NUMBER = "toDecimal128OrZero(JSONExtractRaw(data, {vf:String}), 9)"
_RAW_VALUE = {
    Aggregation.SUM: f"sum(toDecimal256({_RAW_NUMBER}, 9))",
    Aggregation.COUNT: "toUInt64(count())",
    Aggregation.MIN: f"min({_RAW_NUMBER})",
    Aggregation.MAX: f"max({_RAW_NUMBER})",
    Aggregation.LATEST: f"argMax({_RAW_NUMBER}, (time, src_offset))",
    Aggregation.UNIQUE_COUNT: (
        "uniqExactArray(if(JSONType(data, {vf:String}) = 'Array', "
        "JSONExtract(data, {vf:String}, 'Array(String)'), [JSONExtractString(data, {vf:String})]))"
    ),
    Aggregation.AVG: f"tuple(sum(toDecimal256({_RAW_NUMBER}, 9)), toUInt64(count()))",
}

#: Window start of a row as a Unix timestamp; ``{col}`` is the table's time column. Local
#: windows use ClickHouse's own time zone functions with the zone as a (validated) parameter.
_BUCKET = {
    None: "toUInt32(0)",
    Window.MINUTE: "toUnixTimestamp(toStartOfMinute({col}))",
    Window.FIFTEEN_MINUTES: "toUnixTimestamp(toStartOfFifteenMinutes({col}))",
    Window.HOUR: "toUnixTimestamp(toStartOfHour({col}, {{tz:String}}))",
    Window.DAY: "toUnixTimestamp(toStartOfDay({col}, {{tz:String}}))",
    Window.MONTH: "toUnixTimestamp(toDateTime(toStartOfMonth({col}, {{tz:String}}), {{tz:String}}))",
}


#: Settings of the documented endpoints' queries. Each reads one tenant's rows of small tables
#: (a tenant's month is a few thousand period rows), where ClickHouse's fixed cost per query
#: outweighs the reading; measured on chdb, these take 15-25% off every endpoint:
#: - one thread: no hand-off between threads for a few granules;
#: - no PREWHERE: its read steps cost more than they save on so few rows;
#: - no projection analysis: the tables' only projection is the writer's watermark
#:   (p_watermark), which never answers a query of the API;
#: - the statement's threads at nice -5 (``os_thread_priority``, the old name of
#:   ``os_threads_nice_value_query``; the aggregator's run at 19): under ingest a read spends most
#:   of its time waiting for a core, behind the aggregator's Python threads, the merges and, on
#:   one machine, the broker; at -5 it is served first (docs/performance.md, "Queries while
#:   ingesting"). The engine needs CAP_SYS_NICE for it and runs the statement at nice 0 without
#:   (checked: no error). The API's reads are few and short, so the aggregator keeps the rest.
#: All four exist in every ClickHouse the project runs on (chdb, server 25.8): an unknown
#: setting would fail the query.
_SMALL_READ: dict[str, Any] = {
    "max_threads": 1,
    "optimize_move_to_prewhere": 0,
    "optimize_use_projections": 0,
    "os_thread_priority": -5,
}


class Reader:
    def __init__(
        self, client: Client, database: str, cache_ttl_s: float = 2.0, lookup_client: Client | None = None
    ) -> None:
        check_catalog()
        self._client = client
        # entity and freshness lookups (mostly reloaded in the background: lookup_cache.py) on a
        # client of their own, so a reload never holds the lock the usage statements wait on
        self._lookups = lookup_client or client
        self._db = database
        self._cache = LookupCache(cache_ttl_s, name="reader-refresh")
        self._cache_forever = LookupCache(float("inf"))

    # ---- plumbing ------------------------------------------------------------------------------

    def _rows(
        self,
        sql: str,
        params: dict[str, Any],
        settings: dict[str, Any] | None = None,
        client: Client | None = None,
    ) -> Sequence[Sequence[Any]]:
        try:
            result = (client or self._client).query(sql, parameters=params, settings=settings)
        except Exception as exc:  # any driver/engine failure is a storage failure to the caller
            raise StorageError(type(exc).__name__) from exc
        return result.result_rows

    def _small(self, sql: str, params: dict[str, Any]) -> Sequence[Sequence[Any]]:
        return self._rows(sql, params, _SMALL_READ)

    def _lookup(self, sql: str, params: dict[str, Any]) -> Sequence[Sequence[Any]]:
        return self._rows(sql, params, _SMALL_READ, self._lookups)

    def time_zones(self) -> frozenset[str]:
        """Zones the engine knows (it computes local windows); read once per process."""
        return self._cache_forever.get(
            ("time_zones",),
            lambda: frozenset(
                str(r[0])
                for r in self._rows("SELECT time_zone FROM system.time_zones", {}, None, self._lookups)
            ),
        )

    # ---- entities (cached) ---------------------------------------------------------------------

    def freshness(self, tenant: str) -> datetime | None:
        """When the aggregator last refreshed this tenant's tables. Read before the usage it
        describes, so the stated time is never later than the data (the data may be newer)."""

        def load() -> datetime | None:
            rows = self._lookup(
                f"SELECT toUnixTimestamp64Milli(refreshed_at) FROM {self._db}.{Table.TENANT_FRESHNESS} FINAL "
                "WHERE tenant = {tenant:String} ORDER BY refreshed_at DESC LIMIT 1",
                {"tenant": tenant},
            )
            return _from_ms(int(rows[0][0])) if rows else None

        return self._cache.get(("freshness", tenant), load)

    def _workspace_rows(self, tenant: str, entity_id: str | None) -> list[Workspace]:
        where = " AND entity_id = {id:String}" if entity_id is not None else ""
        rows = self._lookup(
            f"SELECT entity_id, name, parent_id, tier, contract_id, attrs FROM {self._db}.{Table.ENTITIES} FINAL "
            "WHERE tenant = {tenant:String} AND kind = {kind:String}" + where,
            {"tenant": tenant, "kind": EntityKind.WORKSPACE.value, "id": entity_id or ""},
        )
        out = []
        for eid, name, parent, tier, contract, attrs in rows:
            what = f"workspace {eid}"
            extra = _attrs(attrs, what)
            out.append(
                Workspace(
                    id=str(eid),
                    name=str(name),
                    parent_id=str(parent),
                    tier=str(tier),
                    contract_id=str(contract),
                    # 1-28 by the event schema; clamped so bad data cannot break a period.
                    billing_anchor_day=min(28, max(1, _int_attr(extra, "billing_anchor_day", 1, what))),
                    extra_vks=_int_attr(extra, "extra_vks", 0, what),
                )
            )
        return out

    def workspace(self, tenant: str, workspace_id: str) -> Workspace | None:
        def load() -> Workspace | None:
            rows = self._workspace_rows(tenant, workspace_id)
            return rows[0] if rows else None

        return self._cache.get(("workspace", tenant, workspace_id), load)

    def workspaces(self, tenant: str) -> dict[str, Workspace]:
        """Every workspace of the tenant (for subtrees and names)."""
        return self._cache.get(
            ("workspaces", tenant), lambda: {w.id: w for w in self._workspace_rows(tenant, None)}
        )

    def contract_exists(self, tenant: str, contract_id: str) -> bool:
        def load() -> bool:
            rows = self._lookup(
                f"SELECT count() FROM {self._db}.{Table.ENTITIES} FINAL "
                "WHERE tenant = {tenant:String} AND kind = {kind:String} AND entity_id = {id:String}",
                {"tenant": tenant, "kind": EntityKind.CONTRACT.value, "id": contract_id},
            )
            return bool(rows and int(rows[0][0]) > 0)

        return self._cache.get(("contract", tenant, contract_id), load)

    def is_active_member(self, tenant: str, workspace_id: str, member_id: str) -> bool:
        def load() -> bool:
            rows = self._lookup(
                f"SELECT status FROM {self._db}.{Table.ENTITIES} FINAL "
                "WHERE tenant = {tenant:String} AND kind = {kind:String} AND entity_id = {id:String}",
                {
                    "tenant": tenant,
                    "kind": EntityKind.MEMBER.value,
                    "id": membership_id(workspace_id, member_id),
                },
            )
            return bool(rows) and rows[0][0] == "active"

        if not member_id:
            return False
        return self._cache.get(("member", tenant, workspace_id, member_id), load)

    def is_contract_member(self, tenant: str, contract_id: str, member_id: str) -> bool:
        """Active member of any workspace of the contract."""

        def load() -> bool:
            rows = self._lookup(
                f"SELECT count() FROM {self._db}.{Table.ENTITIES} FINAL "
                "WHERE tenant = {tenant:String} AND kind = {member:String} AND status = 'active' "
                "AND entity_id IN ("
                f"  SELECT concat(entity_id, '/', {{mid:String}}) FROM {self._db}.{Table.ENTITIES} FINAL "
                "  WHERE tenant = {tenant:String} AND kind = {workspace:String} AND contract_id = {cid:String})",
                {
                    "tenant": tenant,
                    "member": EntityKind.MEMBER.value,
                    "workspace": EntityKind.WORKSPACE.value,
                    "mid": member_id,
                    "cid": contract_id,
                },
            )
            return bool(rows and int(rows[0][0]) > 0)

        if not member_id:
            return False
        return self._cache.get(("contract_member", tenant, contract_id, member_id), load)

    def workstation(self, tenant: str, workstation_id: str) -> Workstation | None:
        def load() -> Workstation | None:
            rows = self._lookup(
                f"SELECT entity_id, name, attrs, toUnixTimestamp64Milli(updated_at) FROM {self._db}.{Table.ENTITIES} FINAL "
                "WHERE tenant = {tenant:String} AND kind = {kind:String} AND entity_id = {id:String}",
                {"tenant": tenant, "kind": EntityKind.WORKSTATION.value, "id": workstation_id},
            )
            if not rows:
                return None
            eid, name, attrs, updated = rows[0]
            what = f"workstation {eid}"
            rates = _attrs(attrs, what)
            return Workstation(
                id=str(eid),
                name=str(name),
                usd_per_cpu_hour=_rate(rates, "usd_per_cpu_hour", what),
                usd_per_gpu_hour=_rate(rates, "usd_per_gpu_hour", what),
                usd_per_gb_hour=_rate(rates, "usd_per_gb_hour", what),
                updated_at=_from_ms(int(updated)),
            )

        return self._cache.get(("workstation", tenant, workstation_id), load)

    # ---- usage (never cached) -------------------------------------------------------------------

    def workspace_counts(
        self, tenant: str, workspace_id: str, billing: Period, month: Period
    ) -> WorkspaceCounts:
        """Document 000 in one query: entity counts plus gateway logs in the billing period and the
        calendar month (both day-aligned, so ``usage_1d`` answers them exactly)."""
        db = self._db
        rows = self._small(
            "SELECT "
            "countIf(kind = {vk:String} AND status = 'active'), "
            "countIf(kind = {agent:String} AND status = 'active'), "
            "countIf(kind = {agent:String}), "
            "countIf(kind = {member:String} AND status = 'active'), "
            "countIf(kind = {member:String} AND status != 'left'), "
            "(SELECT tuple("
            "   sumIf(toUInt128(value_count), window_start >= {ps:DateTime('UTC')} AND window_start < {pe:DateTime('UTC')}),"
            "   sumIf(toUInt128(value_count), window_start >= {ms:DateTime('UTC')} AND window_start < {me:DateTime('UTC')}))"
            f" FROM {db}.{Table.USAGE_1D} WHERE tenant = {{tenant:String}} AND meter = {{meter:String}}"
            "   AND window_start >= {lo:DateTime('UTC')} AND window_start < {hi:DateTime('UTC')}"
            "   AND workspace_id = {ws:String}) "
            f"FROM {db}.{Table.ENTITIES} FINAL "
            "WHERE tenant = {tenant:String} AND kind IN ({vk:String}, {agent:String}, {member:String}) "
            "AND workspace_id = {ws:String}",
            {
                "tenant": tenant,
                "ws": workspace_id,
                "vk": EntityKind.VIRTUAL_KEY.value,
                "agent": EntityKind.AGENT.value,
                "member": EntityKind.MEMBER.value,
                "meter": DocMeter.GATEWAY_REQUESTS.value,
                "ps": _ts(billing.start),
                "pe": _ts(billing.end),
                "ms": _ts(month.start),
                "me": _ts(month.end),
                "lo": _ts(min(billing.start, month.start)),
                "hi": _ts(max(billing.end, month.end)),
            },
        )
        vks, agents_on, agents, members_on, members, logs = rows[0]
        period_logs, month_logs = logs if logs is not None else (0, 0)
        return WorkspaceCounts(
            active_vks=int(vks),
            active_agents=int(agents_on),
            total_agents=int(agents),
            active_members=int(members_on),
            total_members=int(members),
            period_logs=int(period_logs or 0),
            month_logs=int(month_logs or 0),
        )

    def quota_usage(
        self, tenant: str, dimension: str, value: str, period: Period, table: Table
    ) -> tuple[Decimal, Decimal]:
        """Document 001: (MiB-seconds of CI steps' memory, CPU seconds) for a contract or a
        workspace (``dimension`` is ``contract_id`` or ``workspace_id``) over ``period``."""
        if dimension not in ("contract_id", "workspace_id"):
            raise ValueError(dimension)
        # ``dimension`` is one of two fixed names, each a column of its own (migration 0004).
        db = self._db
        window = "window_start >= {s:DateTime('UTC')} AND window_start < {e:DateTime('UTC')}"
        rows = self._small(
            f"SELECT (SELECT sum(toDecimal256(integral, 9)) FROM {db}.{Table.GAUGE_15M} FINAL "
            f"  WHERE tenant = {{tenant:String}} AND meter = {{mem:String}} AND {window} AND {dimension} = {{id:String}}),"
            f" (SELECT sum(toDecimal256(value_sum, 9)) FROM {db}.{table} "
            f"  WHERE tenant = {{tenant:String}} AND meter = {{cpu:String}} AND {window} AND {dimension} = {{id:String}})",
            {
                "tenant": tenant,
                "mem": DocMeter.CI_MEMORY.value,
                "cpu": DocMeter.CI_CPU.value,
                "id": value,
                "s": _ts(period.start),
                "e": _ts(period.end),
            },
        )
        memory, cpu = rows[0]
        return _dec(memory), _dec(cpu)

    def workstation_usage(self, tenant: str, workstation_id: str) -> tuple[Decimal, Decimal, Decimal]:
        """Document 002, lifetime totals: (CPU seconds, GPU seconds, memory GB-seconds)."""
        db = self._db
        # All time: usage_1mo has the fewest rows; gauges exist only per 15 minutes.
        rows = self._small(
            "SELECT sumIf(toDecimal256(value_sum, 9), meter = {cpu:String}), "
            "sumIf(toDecimal256(value_sum, 9), meter = {gpu:String}), "
            f"(SELECT sum(toDecimal256(integral, 9)) FROM {db}.{Table.GAUGE_15M} FINAL WHERE tenant = {{tenant:String}} "
            "  AND meter = {mem:String} AND workstation_id = {id:String}) "
            f"FROM {db}.{Table.USAGE_1MO} WHERE tenant = {{tenant:String}} "
            "AND meter IN ({cpu:String}, {gpu:String}) AND workstation_id = {id:String}",
            {
                "tenant": tenant,
                "id": workstation_id,
                "cpu": DocMeter.WS_CPU.value,
                "gpu": DocMeter.WS_GPU.value,
                "mem": DocMeter.WS_MEMORY.value,
            },
        )
        cpu, gpu, mem = rows[0]
        return _dec(cpu), _dec(gpu), _dec(mem)

    def workspace_usage(
        self, tenant: str, workspace_id: str, period: Period, table: Table
    ) -> tuple[Decimal, int, int]:
        """Document 003: (render output seconds, AI tasks, egress bytes) of one workspace."""
        rows = self._small(
            "SELECT sumIf(toDecimal256(value_sum, 9), meter = {render:String}), "
            "sumIf(toUInt128(value_count), meter = {tasks:String}), "
            "sumIf(toDecimal256(value_sum, 9), meter = {egress:String}) "
            f"FROM {self._db}.{table} WHERE tenant = {{tenant:String}} "
            "AND meter IN ({render:String}, {tasks:String}, {egress:String}) "
            "AND window_start >= {s:DateTime('UTC')} AND window_start < {e:DateTime('UTC')} "
            "AND workspace_id = {ws:String}",
            {
                "tenant": tenant,
                "ws": workspace_id,
                "render": DocMeter.RENDER_SECONDS.value,
                "tasks": DocMeter.AI_TASKS.value,
                "egress": DocMeter.EGRESS_BYTES.value,
                "s": _ts(period.start),
                "e": _ts(period.end),
            },
        )
        render, tasks, egress = rows[0]
        return _dec(render), int(tasks or 0), half_up_int(_dec(egress))

    def row_usage(
        self,
        tenant: str,
        workspace_ids: Sequence[str],
        datastream_ids: Sequence[str] | None,
        dates: DateRange,
        granularity: Granularity,
        limit: int,
        offset: int,
    ) -> tuple[int, list[RowUsage]]:
        """Document 004: one page of (date, workspace, datastream) buckets and the number of them.

        Daily buckets come from ``usage_1d``. Monthly buckets: whole months from ``usage_1mo``,
        partial months at the edges by merging the ``usage_1d`` states of their days; the unique
        count is a merge of states over the bucket, never a sum of daily counts."""
        if dates.empty or not workspace_ids or (datastream_ids is not None and not datastream_ids):
            return 0, []
        db = self._db
        scope = (
            "tenant = {tenant:String} AND meter IN ({mu:String}, {mt:String}) "
            "AND workspace_id IN {ws:Array(String)}"
            + (" AND datastream_id IN {ds:Array(String)}" if datastream_ids is not None else "")
        )
        cols = "window_start, workspace_id, datastream_id, meter, value_unique, value_sum"
        params: dict[str, Any] = {
            "tenant": tenant,
            "mu": DocMeter.ROWS_UNIQUE.value,
            "mt": DocMeter.ROWS_TOTAL.value,
            "ws": list(workspace_ids),
            "ds": list(datastream_ids or []),
            "limit": limit,
            "offset": offset,
        }
        if granularity is Granularity.DAILY:
            period = dates.as_period()
            # One table: read it directly (a subquery would only add a step to the plan).
            source = (
                f"{db}.{Table.USAGE_1D} WHERE {scope} "
                "AND window_start >= {s:DateTime('UTC')} AND window_start < {e:DateTime('UTC')}"
            )
            params.update(s=_ts(period.start), e=_ts(period.end))
            bucket = "toDate(window_start)"
        else:
            split = split_months(dates)
            empty = Period(datetime(1970, 1, 1, tzinfo=UTC), datetime(1970, 1, 1, tzinfo=UTC))
            full = split.full or empty
            edges = [*split.partial, empty, empty][:2]
            source = (
                f"(SELECT {cols} FROM {db}.{Table.USAGE_1MO} WHERE {scope} "
                "AND window_start >= {fs:DateTime('UTC')} AND window_start < {fe:DateTime('UTC')} "
                f"UNION ALL SELECT {cols} FROM {db}.{Table.USAGE_1D} WHERE {scope} "
                "AND ((window_start >= {p1s:DateTime('UTC')} AND window_start < {p1e:DateTime('UTC')}) "
                "  OR (window_start >= {p2s:DateTime('UTC')} AND window_start < {p2e:DateTime('UTC')})))"
            )
            params.update(
                fs=_ts(full.start),
                fe=_ts(full.end),
                p1s=_ts(edges[0].start),
                p1e=_ts(edges[0].end),
                p2s=_ts(edges[1].start),
                p2e=_ts(edges[1].end),
            )
            bucket = "toStartOfMonth(window_start)"
        sql = (
            f"SELECT {bucket} AS d, workspace_id AS w, datastream_id AS ds, "
            "uniqExactMergeIf(value_unique, meter = {mu:String}), "
            "sumIf(toDecimal256(value_sum, 9), meter = {mt:String}), "
            "count() OVER () "
            f"FROM {source} GROUP BY d, w, ds ORDER BY d, w, ds "
            "LIMIT {limit:UInt32} OFFSET {offset:UInt64}"
        )
        rows = self._small(sql, params)
        if not rows and offset > 0:
            # Past the last page: the window count came back with no row; ask for it alone.
            counted = self._small(sql, {**params, "limit": 1, "offset": 0})
            return (int(counted[0][5]) if counted else 0), []
        total = int(rows[0][5]) if rows else 0
        out = [
            RowUsage(
                day=d if isinstance(d, date) else date.fromisoformat(str(d)),
                workspace_id=str(w),
                datastream_id=str(ds),
                unique_rows=int(u or 0),
                total_rows=half_up_int(_dec(t)),
            )
            for d, w, ds, u, t, _ in rows
        ]
        return total, out

    def meter_series(
        self,
        tenant: str,
        meter: Meter,
        source: Table | None,
        window: Window | None,
        tz: str,
        period: Period,
        group_by: Sequence[str],
        subjects: Sequence[str] | None,
        max_rows: int,
    ) -> list[SeriesPoint]:
        """The generic meter query. ``source`` is the period table to read (``gauge_15m`` for a
        gauge) or None for raw events. ``group_by`` must be dimensions of the meter (checked by
        the caller); they travel as parameters, like everything else."""
        params: dict[str, Any] = {
            "tenant": tenant,
            "meter": meter.slug,
            "tz": tz,
            "s": _ts(period.start),
            "e": _ts(period.end),
            "subjects": list(subjects or []),
            "max_rows": max_rows,
        }
        dims_sql: list[str] = []
        for i, name in enumerate(group_by):
            params[f"g{i}"] = name
        subject_field = DATA_MODELS[meter.event_type].SUBJECT_FIELD
        if source is None:
            if meter.aggregation is Aggregation.INTEGRAL:
                raise ValueError("gauge meters are not answered from raw events")
            params.update(type=meter.event_type.value, vf=meter.value or "")
            dims_sql = [f"JSONExtractString(data, {{g{i}:String}})" for i in range(len(group_by))]
            value = _RAW_VALUE[meter.aggregation]
            bucket = _BUCKET[window].format(col="time")
            # Raw event times have milliseconds: so do the bounds here.
            params.update(s64=_ts64(period.start), e64=_ts64(period.end))
            where = (
                "tenant = {tenant:String} AND type = {type:String} "
                "AND time >= {s64:DateTime64(3, 'UTC')} AND time < {e64:DateTime64(3, 'UTC')}"
            )
            if subjects is not None:
                where += " AND subject IN {subjects:Array(String)}"
            table_sql = f"{self._db}.{Table.EVENTS_RAW}"
        else:
            dims_sql = [f"dims[{{g{i}:String}}]" for i in range(len(group_by))]
            value = _PERIOD_VALUE[meter.aggregation]
            bucket = _BUCKET[window].format(col="window_start")
            where = (
                "tenant = {tenant:String} AND meter = {meter:String} "
                "AND window_start >= {s:DateTime('UTC')} AND window_start < {e:DateTime('UTC')}"
            )
            if subjects is not None:
                if source is Table.GAUGE_15M:
                    where += " AND series IN {subjects:Array(String)}"
                else:
                    params["sf"] = subject_field
                    where += " AND dims[{sf:String}] IN {subjects:Array(String)}"
            table_sql = f"{self._db}.{source}" + (" FINAL" if source is Table.GAUGE_15M else "")
        group_cols = ", ".join(f"{d} AS g{i}" for i, d in enumerate(dims_sql))
        keys = ", ".join(["b", *[f"g{i}" for i in range(len(dims_sql))]])
        sql = (
            f"SELECT {bucket} AS b{', ' + group_cols if group_cols else ''}, {value} "
            f"FROM {table_sql} WHERE {where} GROUP BY {keys} ORDER BY {keys} LIMIT {{max_rows:UInt32}}"
        )
        out = []
        for row in self._rows(sql, params):
            raw_value = row[-1]
            if meter.aggregation is Aggregation.AVG:
                total, count = raw_value
                # The exact mean, rounded half up to the tables' 9 decimal places.
                val: Decimal | None = half_up(ratio(_dec(total), int(count)), 9) if count else None
            else:
                val = _dec(raw_value)
            bucket_ts = int(row[0])
            out.append(
                SeriesPoint(
                    bucket=datetime.fromtimestamp(bucket_ts, UTC) if window is not None else None,
                    group=tuple(str(g) for g in row[1:-1]),
                    value=val,
                )
            )
        return out
