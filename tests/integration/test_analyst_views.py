"""The analyst views (issue 9, item 3, migration 0005) and every SQL example of docs/tables.md,
run through the SQL endpoint against a database loaded with synthetic usage of every meter."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import clickhouse_connect
import pytest
from fastapi.testclient import TestClient

from aggregators.direct import apply_events
from deploy.settings import QuerySettings
from ingest.synth import World, usage_events, world_lifecycle_events
from query_api.app import create_app
from schemas.meters import default_catalog
from schemas.migrate import migrate
from tests.integration.sql_endpoint_helpers import serve_sql

pytestmark = pytest.mark.clickhouse

DOC = Path(__file__).resolve().parents[2] / "docs" / "tables.md"


def sql_examples() -> list[str]:
    return re.findall(r"```sql\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.fixture
def analyst(
    clickhouse: tuple[Any, str], clickhouse_dsn: str, tmp_path: Path
) -> Iterator[tuple[Any, Any, str, str]]:
    """(analyst's clickhouse-connect client on the endpoint, pipeline client, database, a
    workspace API key of the tenant for the query API): one
    tenant, ``acme``, with two hours of every kind of usage up to now."""
    client, db = clickhouse
    now = datetime.now(UTC).replace(microsecond=0)
    world = World.generate(seed=9, tenants=1, created_at=now - timedelta(days=1))
    events = [
        *world_lifecycle_events(world),
        *usage_events(world, now - timedelta(hours=2), now, random.Random(9)),
    ]
    for e in events:
        e["tenant"] = "acme"
    apply_events(client, db, events)
    with serve_sql(clickhouse_dsn, db, tmp_path / "keys.json") as s:
        ch = clickhouse_connect.get_client(host="127.0.0.1", port=s.port, username="analyst", password=s.key)
        key = next(k.raw for k in world.tenants[0].api_keys if k.scope == "workspace")
        yield ch, client, db, key


def test_every_sql_example_in_the_tables_doc_runs(analyst: tuple[Any, Any, str, str]) -> None:
    ch, _, db, _ = analyst
    examples = sql_examples()
    assert len(examples) >= 6
    early_in_the_day = datetime.now(UTC) - datetime.now(UTC).replace(hour=0, minute=0, second=0) < timedelta(
        minutes=20
    )
    for sql in examples:
        rows = ch.query(sql.replace("metering.", f"{db}.")).result_rows
        if "usage_daily" in sql or "usage_monthly" in sql:
            assert rows or early_in_the_day, sql  # the views' examples find today's usage


def test_the_views_agree_with_the_raw_events(analyst: tuple[Any, Any, str, str]) -> None:
    ch, client, db, _ = analyst
    # SUM: render seconds per day, from the view and straight from the raw events
    view = dict(
        ch.query(
            "SELECT day, sum(value) FROM usage_daily WHERE tenant = 'acme' AND meter = 'render_output_seconds' GROUP BY day"
        ).result_rows
    )
    raw = dict(
        client.query(
            f"SELECT toDate(time), sum(toDecimal128(JSONExtractString(data, 'output_duration_seconds'), 9)) "
            f"FROM {db}.events_raw WHERE tenant = 'acme' AND type = 'render.completed' GROUP BY 1"
        ).result_rows
    )
    assert view and view == raw
    # COUNT: gateway requests per hour
    view_h = dict(
        ch.query(
            "SELECT hour, sum(value) FROM usage_hourly WHERE tenant = 'acme' AND meter = 'gateway_requests' GROUP BY hour"
        ).result_rows
    )
    raw_h = {
        k: Decimal(v)
        for k, v in client.query(
            f"SELECT toStartOfHour(time), count() FROM {db}.events_raw WHERE tenant = 'acme' AND type = 'gateway.request' GROUP BY 1"
        ).result_rows
    }
    assert view_h and {k.replace(tzinfo=None): v for k, v in view_h.items()} == {
        k.replace(tzinfo=None): v for k, v in raw_h.items()
    }
    # INTEGRAL: from gauge_15m FINAL; MAX and units from the catalog
    integral = ch.query(
        "SELECT sum(value) FROM usage_monthly WHERE tenant = 'acme' AND meter = 'workstation_memory_gb_seconds'"
    ).result_rows[0][0]
    gauge = client.query(
        f"SELECT sum(integral) FROM {db}.gauge_15m FINAL WHERE tenant = 'acme' AND meter = 'workstation_memory_gb_seconds'"
    ).result_rows[0][0]
    assert integral == gauge and integral > 0
    units = dict(ch.query("SELECT DISTINCT meter, unit FROM usage_daily WHERE tenant = 'acme'").result_rows)
    assert units["workstation_memory_gb_max"] == "GB" and units["egress_bytes"] == "bytes"


def test_meter_catalog_is_the_yaml_and_the_migration_reverses(clickhouse: tuple[Any, str]) -> None:
    client, db = clickhouse
    rows = client.query(
        f"SELECT meter, event_type, aggregation, unit, dimensions, description FROM {db}.meter_catalog"
    ).result_rows
    expected = [
        (m.slug, m.event_type.value, m.aggregation.value, m.unit, list(m.group_by), m.description)
        for m in default_catalog().meters
    ]
    assert rows == expected, "schemas/meters.yaml changed: a migration must replace meter_catalog"
    assert migrate(client, db, target=4)[-1] == "rolled back 0005_analyst_views"
    views = {"meter_catalog", "usage_hourly", "usage_daily", "usage_monthly"}
    tables = {
        r[0] for r in client.query(f"SELECT name FROM system.tables WHERE database = '{db}'").result_rows
    }
    assert not views & tables
    assert migrate(client, db)[0] == "applied 0005_analyst_views"


def test_the_views_give_the_query_apis_numbers(analyst: tuple[Any, Any, str, str]) -> None:
    """What an analyst reads through the endpoint equals what the generic meter query answers."""
    ch, client, db, key = analyst
    api = TestClient(
        create_app(
            QuerySettings(clickhouse_database=db, query_rate_limit_per_minute=100_000, query_cache_ttl_s=0),
            client,
        )
    )
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    # two days ahead: a run just before midnight has gauge integrals in the next day's first hour;
    # and the views are read over the API's window, whatever the time of day
    start, end = today - timedelta(days=1), today + timedelta(days=2)
    span = {"from": start.isoformat(), "to": end.isoformat()}
    cases = [  # meter, API window and group_by, the view and how it combines rows of a period
        ("render_output_seconds", "DAY", [], "usage_daily", "day", "sum(value)"),
        ("workstation_memory_gb_max", "DAY", [], "usage_daily", "day", "max(value)"),
        ("workstation_memory_gb_seconds", "HOUR", [], "usage_hourly", "hour", "sum(value)"),
        ("ai_task_types", "DAY", ["workspace_id"], "usage_daily", "day", "sum(value)"),
    ]
    for meter, window, group_by, view, period, combine in cases:
        r = api.get(
            f"/api/v1/meters/{meter}/query",
            params={**span, "window": window, "group_by": group_by},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert r.status_code == 200, r.text
        from_api = {
            (row["window_start"][:19].replace("T", " "), *row["group_by"].values()): Decimal(
                str(row["value"])
            )
            for row in r.json()["data"]
            if row["value"] not in (None, 0)
        }
        keys = ", ".join(["toString(toDateTime(" + period + "))", *group_by])
        rows = ch.query(
            f"SELECT {keys}, {combine} FROM {view} WHERE tenant = 'acme' AND meter = {{m:String}} "
            f"AND toDateTime({period}) >= {{f:DateTime}} AND toDateTime({period}) < {{t:DateTime}} "
            f"GROUP BY {keys} HAVING {combine} != 0",
            parameters={"m": meter, "f": start.replace(tzinfo=None), "t": end.replace(tzinfo=None)},
        ).result_rows
        from_view = {tuple(row[:-1]): Decimal(row[-1]) for row in rows}
        assert from_view and from_view == from_api, meter
