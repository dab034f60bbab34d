"""The read path never answers 5xx for data it stored (issue 7, item 3).

Lifecycle events build one tenant's world through the real processing path; then extreme usage
is written straight into the period tables, ``gauge_15m`` and ``entities``, bypassing every
validation, the way data written before the per-field bounds, by an analyst or by a future bug
would sit there: values at the top of ``Decimal128(9)``, rows whose sum no longer fits it (the
read must still be exact), the wrapped negative sum an outside probe produced with two events of
9e28 CPU-seconds, 1e26 CPU-seconds at realistic prices, counts near ``UInt64``'s maximum, and
entity attributes that are not what the projection writes.

Every documented endpoint (000, 001 contract and workspace, 002, 003, 004) and the generic meter
query must answer 200 with a JSON body (no NaN or Infinity) whose numbers are exactly the ones
computed here, independently, with Python's Decimal in a wide context (docs/api.md, "Extreme
stored values": numbers are exact; negative stored values are reported as stored).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal, localcontext
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx import Response

from aggregators.direct import apply_events
from deploy.settings import QuerySettings
from query_api.app import create_app
from query_api.credentials import hash_secret, new_access_token, new_api_key
from schemas.plans import PLANS

pytestmark = pytest.mark.clickhouse

#: The largest value ``Decimal128(9)`` holds within its 38 digits.
D128_MAX = Decimal("99999999999999999999999999999.999999999")
D128_MIN = Decimal("-99999999999999999999999999999.999999999")
U64_MAX = 2**64 - 1
#: Wide enough for every product and quotient below to be exact before the one final rounding.
PREC = 400


def uid() -> str:
    return str(uuid.uuid4())


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def half_up(value: Decimal, places: int = 0) -> Decimal:
    with localcontext(prec=PREC):
        return value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)


def exact_sum(values: Sequence[Decimal | int | str]) -> Decimal:
    with localcontext(prec=PREC):
        return sum((Decimal(v) for v in values), Decimal(0))


def wrapped_decimal128(parts: Sequence[str]) -> Decimal:
    """What ClickHouse's ``sum`` over ``Decimal128(9)`` stores: the Int128 sum, wrapped."""
    with localcontext(prec=PREC):
        raw = sum(int(Decimal(p).scaleb(9)) for p in parts)
        raw = (raw + 2**127) % 2**128 - 2**127
        return Decimal(raw).scaleb(-9)


# ---- the world -----------------------------------------------------------------------------------


@dataclass
class World:
    tenant: str
    ids: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    def emit(self, type_: str, data: dict[str, Any]) -> None:
        self.events.append(
            {
                "specversion": "1.0",
                "id": uid(),
                "source": "test",
                "type": type_,
                "time": iso(datetime.now(UTC) - timedelta(days=3)),
                "tenant": self.tenant,
                "data": data,
            }
        )


RATES = {
    "ws_big": ("0.07", "2.49", "0.0125"),
    "ws_wrapped": ("0.1", "0", "0.01"),
    "ws_bad_rates": ("0.07", "2.49", "0.0125"),
    "ws_bad_json": ("0.07", "2.49", "0.0125"),
}


def build_world() -> World:
    w = World(f"hx-{uid()[:8]}")
    ids = w.ids
    for name in ("contract", "root", "odd", "alice", "ds1", *RATES):
        ids[name] = uid()
    w.emit("contract.created", {"contract_id": ids["contract"], "name": "c"})
    w.emit("workspace.created", {"workspace_id": ids["root"], "name": "root", "tier": "pro"})
    w.emit("workspace.created", {"workspace_id": ids["odd"], "name": "odd", "tier": "pro"})
    w.emit("contract.workspace_added", {"contract_id": ids["contract"], "workspace_id": ids["root"]})
    email = "alice@hx.example"
    for ws in ("root", "odd"):
        w.emit("member.joined", {"workspace_id": ids[ws], "member_id": ids["alice"], "email": email})
    token = new_access_token()
    w.secrets["token"] = token
    w.emit(
        "access_token.issued",
        {
            "token_id": uid(),
            "token_hash": hash_secret(token),
            "member_id": ids["alice"],
            "email": email,
            "expires_at": iso(datetime.now(UTC) + timedelta(days=1)),
        },
    )
    for name, scope, extra in (
        ("ws_key", "workspace", {"workspace_id": ids["root"]}),
        ("member_key", "member", {"member_id": ids["alice"], "email": email}),
    ):
        raw = new_api_key()
        w.secrets[name] = raw
        w.emit(
            "api_key.created",
            {"key_id": uid(), "key_hash": hash_secret(raw), "prefix": raw[:12], "scope": scope, **extra},
        )
    w.secrets["email"] = email
    for ws, (cpu, gpu, gb) in RATES.items():
        w.emit(
            "workstation.created",
            {
                "workstation_id": ids[ws],
                "name": ws,
                "usd_per_cpu_hour": float(cpu),
                "usd_per_gpu_hour": float(gpu),
                "usd_per_gb_hour": float(gb),
            },
        )
    w.emit("datastream.created", {"datastream_id": ids["ds1"], "workspace_id": ids["root"], "name": "ds1"})
    return w


# ---- writing straight into the tables (no validation on the way) ------------------------------------


class Store:
    def __init__(self, client: Any, database: str, tenant: str) -> None:
        self.client, self.db, self.tenant = client, database, tenant
        self._partition = 100

    def _next_partition(self) -> int:
        # A partition of its own per row: rows of one key would be merged (and their sum wrapped
        # by the engine) in the background; separate rows are summed only when read.
        self._partition += 1
        return self._partition

    def usage(
        self,
        table: str,
        meter: str,
        window_start: datetime,
        dims: dict[str, str],
        *,
        value_sum: Sequence[str] = ("0",),
        value_count: int = 0,
        value_min: str = "0",
        value_max: str = "0",
        latest: str = "0",
        unique: Sequence[str] = (),
    ) -> None:
        """One period-table row. ``value_sum`` is summed by the engine into the stored value, so
        a wrapped Decimal128 is stored exactly as a real overflow stores it."""
        self.client.command(
            f"INSERT INTO {self.db}.{table} (tenant, meter, window_start, group_key, src_partition, dims, "
            "value_sum, value_count, value_min, value_max, value_latest, value_unique, src_offset) "
            "SELECT {tenant:String}, {meter:String}, toDateTime({ws:String}, 'UTC'), {gk:String}, {p:Int32}, "
            "mapFromArrays({dk:Array(String)}, {dv:Array(String)}), "
            "(SELECT sum(v) FROM (SELECT arrayJoin(arrayMap(x -> toDecimal128(x, 9), {sums:Array(String)})) AS v)), "
            "{count:UInt64}, toDecimal128({vmin:String}, 9), toDecimal128({vmax:String}, 9), "
            "(SELECT argMaxState(toDecimal128({latest:String}, 9), "
            "  tuple(toDateTime64({ws:String}, 3, 'UTC'), toInt64({p:Int32})))), "
            "(SELECT uniqExactState(k) FROM (SELECT arrayJoin({keys:Array(String)}) AS k)), 0",
            parameters={
                "tenant": self.tenant,
                "meter": meter,
                "ws": window_start.strftime("%Y-%m-%d %H:%M:%S"),
                "gk": json.dumps(dims, sort_keys=True),
                "p": self._next_partition(),
                "dk": list(dims),
                "dv": list(dims.values()),
                "sums": list(value_sum),
                "count": value_count,
                "vmin": value_min,
                "vmax": value_max,
                "latest": latest,
                "keys": list(unique),
            },
        )

    def gauge(self, meter: str, window_start: datetime, dims: dict[str, str], integral: str) -> None:
        self.client.command(
            f"INSERT INTO {self.db}.gauge_15m (tenant, meter, window_start, group_key, series, dims, "
            "integral, samples, src_partition, src_offset, version) "
            "SELECT {tenant:String}, {meter:String}, toDateTime({ws:String}, 'UTC'), {gk:String}, {series:String}, "
            "mapFromArrays({dk:Array(String)}, {dv:Array(String)}), toDecimal128({v:String}, 9), 1, 0, 0, 1",
            parameters={
                "tenant": self.tenant,
                "meter": meter,
                "ws": window_start.strftime("%Y-%m-%d %H:%M:%S"),
                "gk": json.dumps(dims, sort_keys=True),
                "series": uid(),
                "dk": list(dims),
                "dv": list(dims.values()),
                "v": integral,
            },
        )

    def entity_attrs(self, kind: str, entity_id: str, attrs: str) -> None:
        """Replace an entity's ``attrs`` text (a newer version of the same row)."""
        self.client.command(
            f"INSERT INTO {self.db}.entities SELECT * REPLACE ({{attrs:String}} AS attrs, version + 1 AS version) "
            f"FROM {self.db}.entities FINAL "
            "WHERE tenant = {tenant:String} AND kind = {kind:String} AND entity_id = {id:String}",
            parameters={"tenant": self.tenant, "kind": kind, "id": entity_id, "attrs": attrs},
        )


# ---- the data, and what every endpoint must answer ------------------------------------------------


@dataclass
class Env:
    http: TestClient
    w: World
    now: datetime
    month_start: datetime
    next_month: datetime
    today: datetime
    yesterday: date


@pytest.fixture
def env(clickhouse: tuple[Any, str]) -> Iterator[Env]:
    client, database = clickhouse
    w = build_world()
    stats = apply_events(client, database, w.events, backfill=True)
    assert stats.rejected == 0, stats
    now = datetime.now(UTC)
    today = datetime(now.year, now.month, now.day, tzinfo=UTC)
    month_start = today.replace(day=1)
    next_month = (month_start + timedelta(days=32)).replace(day=1)
    env = Env(
        TestClient(create_app(_settings(database), client)),
        w,
        now,
        month_start,
        next_month,
        today,
        (today - timedelta(days=1)).date(),
    )
    _store_extremes(Store(client, database, w.tenant), env)
    with env.http:
        yield env


def _settings(database: str) -> QuerySettings:
    return QuerySettings(
        clickhouse_database=database, query_cache_ttl_s=0.0, query_rate_limit_per_minute=1_000_000
    )


#: Two rows each at the top of Decimal128(9): their sum (2e29) no longer fits the type.
TWO_MAX = (str(D128_MAX), str(D128_MAX))
#: Two events of 9e28 CPU-seconds summed into one row: the wrapped value the probe found.
WRAPPED_PARTS = ("90000000000000000000000000000", "90000000000000000000000000000")
WRAPPED = wrapped_decimal128(WRAPPED_PARTS)
BIG_GPU = "123456789012345678901.234567891"


def _store_extremes(s: Store, env: Env) -> None:
    ids = env.w.ids
    ci = {"contract_id": ids["contract"], "workspace_id": ids["root"]}
    root = {"workspace_id": ids["root"]}
    # 000: gateway logs today (in the billing period and the month), two rows near UInt64's max.
    for _ in range(2):
        s.usage("usage_1d", "gateway_requests", env.today, root, value_count=U64_MAX)
    # 001: CPU seconds of the contract's CI steps, month (usage_1mo) and week (usage_1d).
    for table, start in (("usage_1mo", env.month_start), ("usage_1d", env.today)):
        for part in (*TWO_MAX, "0.000000500"):
            s.usage(table, "ci_step_cpu_seconds", start, ci, value_sum=(part,))
    for part in (*TWO_MAX, "0.5"):
        s.gauge("ci_step_memory_mib_seconds", env.today, ci, part)
    # 002: 1e26 CPU-seconds at realistic prices; a wrapped sum; bad rate cards.
    ws = {name: {"workstation_id": ids[name]} for name in RATES}
    s.usage("usage_1mo", "workstation_cpu_seconds", env.month_start, ws["ws_big"], value_sum=("1e26",))
    s.usage("usage_1mo", "workstation_gpu_seconds", env.month_start, ws["ws_big"], value_sum=(BIG_GPU,))
    for part in TWO_MAX:
        s.gauge("workstation_memory_gb_seconds", env.today, ws["ws_big"], part)
    s.usage(
        "usage_1mo", "workstation_cpu_seconds", env.month_start, ws["ws_wrapped"], value_sum=WRAPPED_PARTS
    )
    for name in ("ws_bad_rates", "ws_bad_json"):
        s.usage("usage_1mo", "workstation_cpu_seconds", env.month_start, ws[name], value_sum=("3600.5",))
    s.entity_attrs(
        "workstation",
        ids["ws_bad_rates"],
        '{"usd_per_cpu_hour": "abc", "usd_per_gpu_hour": true, "usd_per_gb_hour": [1]}',
    )
    s.entity_attrs("workstation", ids["ws_bad_json"], "{not json")
    s.entity_attrs("workspace", ids["odd"], '{"billing_anchor_day": "soon", "extra_vks": 1e30}')
    # 003: render seconds, AI tasks and egress bytes of the month beyond what Decimal128 sums.
    for _ in range(2):
        s.usage("usage_1mo", "render_output_seconds", env.month_start, root, value_sum=(str(D128_MAX),))
        s.usage(
            "usage_1mo", "ai_tasks", env.month_start, {**root, "task_type": "transcribe"}, value_count=U64_MAX
        )
        s.usage(
            "usage_1mo", "egress_bytes", env.month_start, root, value_sum=("99999999999999999999999999999",)
        )
    # 004: rows of a datastream yesterday.
    day = datetime(env.yesterday.year, env.yesterday.month, env.yesterday.day, tzinfo=UTC)
    rows = {"workspace_id": ids["root"], "datastream_id": ids["ds1"]}
    for keys in (("a", "b", "c"), ("c", "d")):
        s.usage("usage_1d", "datastream_total_rows", day, rows, value_sum=("99999999999999999999999999999",))
        s.usage("usage_1d", "datastream_unique_rows", day, rows, unique=keys)
    # Meter query: MIN, MAX, LATEST and AVG of the workstation memory gauge's companions.
    for vmin, vmax, latest in ((str(D128_MIN), "1", "-1"), ("0", str(D128_MAX), str(D128_MIN))):
        for meter in (
            "workstation_memory_gb_max",
            "workstation_memory_gb_min",
            "workstation_memory_gb_latest",
        ):
            s.usage(
                "usage_1mo",
                meter,
                env.month_start,
                ws["ws_big"],
                value_min=vmin,
                value_max=vmax,
                latest=latest,
            )
    for _ in range(2):
        s.usage(
            "usage_1mo",
            "workstation_memory_gb_avg",
            env.month_start,
            ws["ws_big"],
            value_sum=(str(D128_MAX),),
            value_count=3,
        )


def ok(r: Response) -> Any:
    """A 200 whose body is JSON without NaN or Infinity; numbers with a fraction as Decimal."""
    assert r.status_code < 500, r.text
    assert r.status_code == 200, r.text

    def no_constant(name: str) -> Any:
        raise AssertionError(f"{name} in a JSON body: {r.text}")

    return json.loads(r.text, parse_float=Decimal, parse_constant=no_constant)


def bearer(raw: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {raw}"}


# ---- 000 ------------------------------------------------------------------------------------------


def test_000_workspace_stats_counts_beyond_uint64(env: Env) -> None:
    logs = 2 * U64_MAX
    pro = PLANS["pro"]
    with localcontext(prec=PREC):
        overage = (Decimal(logs - pro.log_limit) * pro.overage_cents_per_1000_logs / 1000).to_integral_value(
            ROUND_CEILING
        )
    data = ok(
        env.http.get(f"/api/v1/workspaces/{env.w.ids['root']}/stats", headers=bearer(env.w.secrets["token"]))
    )["data"]
    assert (data["currentPeriodLogCount"], data["logsThisMonth"]) == (logs, logs)
    assert data["overageCents"] == int(overage)


def test_000_workspace_stats_odd_attributes(env: Env) -> None:
    """A billing anchor that is not a number reads as the default (1); a count of extra virtual
    keys written as ``1e30`` is the integer its JSON text says."""
    data = ok(
        env.http.get(f"/api/v1/workspaces/{env.w.ids['odd']}/stats", headers=bearer(env.w.secrets["token"]))
    )["data"]
    assert data["extraVkCount"] == 10**30
    assert data["maxVks"] == PLANS["pro"].base_vk_limit + 10**30
    assert data["currentPeriodLogCount"] == 0


# ---- 001 ------------------------------------------------------------------------------------------


def test_001_quota_usages_beyond_decimal128(env: Env) -> None:
    import base64

    auth = {
        "Authorization": "Basic "
        + base64.b64encode(f"{env.w.secrets['email']}:{env.w.secrets['member_key']}".encode()).decode()
    }
    cpu = exact_sum([Decimal(p) for p in (*TWO_MAX, "0.000000500")])
    memory = exact_sum([Decimal(p) for p in (*TWO_MAX, "0.5")])
    with localcontext(prec=PREC):
        expected = {"memory": int(half_up(memory)), "cpu": int(half_up(cpu * 1000))}
    for period in ("week", f"{env.month_start:%Y-%m}"):
        for path in (f"contracts/{env.w.ids['contract']}", f"workspaces/{env.w.ids['root']}"):
            body = ok(env.http.get(f"/v2/quota-usages/{path}", params={"period": period}, headers=auth))
            assert body == {"data": expected}, (period, path)


# ---- 002 ------------------------------------------------------------------------------------------


def workstation_expected(
    cpu: Decimal, gpu: Decimal, mem: Decimal, rates: tuple[str, str, str]
) -> dict[str, Any]:
    with localcontext(prec=PREC):
        hours = [x / Decimal(3600) for x in (cpu, gpu, mem)]
        cost = sum((h * Decimal(r) for h, r in zip(hours, rates, strict=True)), Decimal(0))
    return {
        "cpuHours": half_up(hours[0], 6),
        "gpuHours": int(half_up(hours[1])),
        "memoryGBHours": int(half_up(hours[2])),
        "costUSD": half_up(cost, 2),
    }


def test_002_workstation_usage_extremes(env: Env) -> None:
    cases = {
        "ws_big": workstation_expected(
            Decimal("1e26"), Decimal(BIG_GPU), exact_sum(TWO_MAX), RATES["ws_big"]
        ),
        # Reported as stored: the wrapped, negative sum and the cost it prices.
        "ws_wrapped": workstation_expected(WRAPPED, Decimal(0), Decimal(0), RATES["ws_wrapped"]),
        # A rate that is not a finite number is read as 0; so is every rate of unreadable attrs.
        "ws_bad_rates": workstation_expected(Decimal("3600.5"), Decimal(0), Decimal(0), ("0", "0", "0")),
        "ws_bad_json": workstation_expected(Decimal("3600.5"), Decimal(0), Decimal(0), ("0", "0", "0")),
    }
    assert Decimal("-160282366920938463463374607431.768211456") == WRAPPED
    for name, expected in cases.items():
        r = env.http.get(f"/v1/workstations/{env.w.ids[name]}/usage", headers=bearer(env.w.secrets["token"]))
        body = ok(r)
        body.pop("lastUpdated")
        assert body == expected, name
        assert isinstance(body["gpuHours"], int) and isinstance(body["memoryGBHours"], int)
        # JSON numbers with a fraction (``number`` in the document), never strings.
        assert isinstance(body["cpuHours"], Decimal) and isinstance(body["costUSD"], Decimal)


# ---- 003 ------------------------------------------------------------------------------------------


def test_003_workspace_usage_beyond_decimal128(env: Env) -> None:
    body = ok(env.http.get("/v1/workspace/usage", headers=bearer(env.w.secrets["ws_key"])))
    with localcontext(prec=PREC):
        minutes = half_up(exact_sum(TWO_MAX) / 60, 6)
    assert body["render_minutes"] == minutes
    assert isinstance(body["render_minutes"], Decimal)
    assert body["task_count"] == 2 * U64_MAX
    assert body["egress_bytes"] == 2 * 99999999999999999999999999999


# ---- 004 ------------------------------------------------------------------------------------------


def test_004_row_usage_beyond_decimal128(env: Env) -> None:
    day = env.yesterday.isoformat()
    for granularity, bucket in (("daily", day), ("monthly", env.yesterday.replace(day=1).isoformat())):
        body = ok(
            env.http.get(
                "/api/v1/usage/",
                params={"granularity": granularity, "date_from": day, "date_to": day},
                headers={"Authorization": f"Token {env.w.secrets['ws_key']}"},
            )
        )
        assert body == {
            "count": 1,
            "items": [
                {
                    "date": bucket,
                    "workspace_id": env.w.ids["root"],
                    "workspace_name": "root",
                    "datastream_id": env.w.ids["ds1"],
                    "unique_rows": 4,
                    "total_rows": 2 * 99999999999999999999999999999,
                }
            ],
        }, granularity


# ---- generic meter query -----------------------------------------------------------------------------


def meter(env: Env, slug: str, **params: Any) -> dict[str, Decimal]:
    """The meter's values by workstation over the current month."""
    body = ok(
        env.http.get(
            f"/api/v1/meters/{slug}/query",
            params={"from": iso(env.month_start), "to": iso(env.next_month), **params},
            headers=bearer(env.w.secrets["ws_key"]),
        )
    )
    for row in body["data"]:
        assert isinstance(row["value"], Decimal), row
    return {
        row["group_by"].get("workstation_id") or row["group_by"].get("workspace_id", ""): row["value"]
        for row in body["data"]
    }


def test_meter_query_extremes(env: Env) -> None:
    ids = env.w.ids
    big = ids["ws_big"]
    assert meter(env, "workstation_cpu_seconds", group_by="workstation_id") == {
        big: Decimal("1e26"),
        ids["ws_wrapped"]: WRAPPED,
        ids["ws_bad_rates"]: Decimal("3600.5"),
        ids["ws_bad_json"]: Decimal("3600.5"),
    }
    assert meter(env, "workstation_memory_gb_seconds", group_by="workstation_id", window="MONTH") == {
        big: exact_sum(TWO_MAX)
    }
    assert meter(env, "egress_bytes", group_by="workspace_id") == {
        ids["root"]: Decimal(2 * 99999999999999999999999999999)
    }
    assert meter(env, "ai_tasks", group_by="workspace_id") == {ids["root"]: Decimal(2 * U64_MAX)}
    assert meter(env, "workstation_memory_gb_max", group_by="workstation_id") == {big: D128_MAX}
    assert meter(env, "workstation_memory_gb_min", group_by="workstation_id") == {big: D128_MIN}
    # LATEST: the later row (by its time, then offset) of the two written.
    assert meter(env, "workstation_memory_gb_latest", group_by="workstation_id") == {big: D128_MIN}
    # AVG: the exact mean, rounded half up to the tables' 9 decimal places.
    with localcontext(prec=PREC):
        mean = half_up(exact_sum(TWO_MAX) / 6, 9)
    assert meter(env, "workstation_memory_gb_avg", group_by="workstation_id") == {big: mean}


# ---- credentials ------------------------------------------------------------------------------------


def test_a_key_with_unreadable_attributes_is_refused_not_a_500(env: Env, clickhouse: tuple[Any, str]) -> None:
    """A key row whose ``attrs`` is not a JSON object (written by hand, or by a bug) reads as the
    narrowest key (member scope, no member): document 003 refuses it; nothing answers 5xx."""
    client, database = clickhouse
    key_hash = hash_secret(env.w.secrets["ws_key"])
    key_id = client.command(
        f"SELECT entity_id FROM {database}.entities FINAL WHERE kind = 'api_key' AND secret_hash = {{h:String}}",
        parameters={"h": key_hash},
    )
    assert ok(env.http.get("/v1/workspace/usage", headers=bearer(env.w.secrets["ws_key"])))  # before
    Store(client, database, env.w.tenant).entity_attrs("api_key", str(key_id), "{not json")
    r = env.http.get("/v1/workspace/usage", headers=bearer(env.w.secrets["ws_key"]))
    assert r.status_code in (401, 403), r.text
    r = env.http.get("/api/v1/usage/", headers={"Authorization": f"Token {env.w.secrets['ws_key']}"})
    assert r.status_code < 500, r.text
