"""``metering sql`` (issue 9, item 2) and ``metering admin analyst-key``: through the SQL endpoint
and directly on the engine; CSV and Parquet read back with pandas and pyarrow."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from aggregators.direct import apply_events
from deploy.cli import app
from deploy.kafka.local_broker import find_free_port
from tests.integration.sql_endpoint_helpers import Served, serve_sql
from tests.integration.test_sql_endpoint import TENANT, WS, renders

pytestmark = pytest.mark.clickhouse

QUERY = "SELECT event_id, type, subject FROM events_raw WHERE tenant = 'acme' ORDER BY event_id"


@pytest.fixture
def loaded(clickhouse: tuple[Any, str], clickhouse_dsn: str) -> tuple[str, str]:
    client, db = clickhouse
    at = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    ws = {
        "specversion": "1.0",
        "id": "w-1",
        "source": "t",
        "type": "workspace.created",
        "time": at.isoformat(),
        "tenant": TENANT,
        "data": {"workspace_id": WS, "name": 'Acme, "the" one', "tier": "pro"},
    }
    apply_events(client, db, [ws, *renders(12, at)])
    return clickhouse_dsn, db


@pytest.fixture
def served(loaded: tuple[str, str], tmp_path: Path) -> Iterator[Served]:
    dsn, db = loaded
    with serve_sql(dsn, db, tmp_path / "analyst-keys.json") as s:
        yield s


def env_for(s: Served, dsn: str) -> dict[str, str]:
    return {
        "METERING_CLICKHOUSE_DSN": dsn,
        "METERING_CLICKHOUSE_DATABASE": s.database,
        "METERING_SQL_PORT": str(s.port),
        "METERING_SQL_KEY": s.key,
        "METERING_SQL_KEYS_FILE": str(s.keys_file),
    }


def run(env: dict[str, str], *args: str, stdin: str | None = None) -> Any:
    return CliRunner().invoke(app, list(args), env=env, input=stdin, catch_exceptions=False)


def test_sql_through_the_endpoint_writes_csv_parquet_jsonl_and_a_table(
    served: Served, loaded: tuple[str, str], tmp_path: Path
) -> None:
    env = env_for(served, loaded[0])
    csv, parquet = tmp_path / "out.csv", tmp_path / "out.parquet"
    r = run(env, "sql", QUERY, "--format", "csv", "--output", str(csv))
    assert r.exit_code == 0, r.output
    assert f"wrote {csv}" in r.output  # the closing summary (a progress line too, on a terminal)
    df = pd.read_csv(csv)
    assert list(df.columns) == ["event_id", "type", "subject"]
    assert len(df) == 13 and df["type"].value_counts()["render.completed"] == 12
    r = run(env, "sql", "--format", "parquet", "-o", str(parquet), "-f", "-", stdin=QUERY)
    assert r.exit_code == 0, r.output
    table = pq.read_table(parquet)
    assert table.num_rows == 13 and table.column_names == ["event_id", "type", "subject"]
    assert table.column("event_id").to_pylist() == df["event_id"].tolist()
    r = run(env, "sql", QUERY, "--format", "jsonl")
    assert r.exit_code == 0, r.output
    rows = [orjson.loads(line) for line in r.stdout.splitlines()]
    assert [x["event_id"] for x in rows] == df["event_id"].tolist()
    r = run(env, "sql", "SELECT type, count() AS n FROM events_raw GROUP BY type ORDER BY type")
    assert r.exit_code == 0, r.output
    assert "render.completed" in r.stdout and "12" in r.stdout and "2 rows" in r.output
    tsv = run(env, "sql", "SELECT 1 AS a, 'x' AS b", "--format", "tsv")
    assert tsv.stdout == "a\tb\n1\tx\n"


def test_sql_errors_and_refusals(served: Served, loaded: tuple[str, str]) -> None:
    env = env_for(served, loaded[0])
    r = run(env, "sql", "INSERT INTO events_raw (tenant) VALUES ('x')")
    assert r.exit_code == 1 and "Code: 164" in r.output
    r = run(env, "sql", "SELECT * FROM nothing_here")
    assert r.exit_code == 1 and "Code: 60" in r.output
    r = run({**env, "METERING_SQL_KEY": "wrong"}, "sql", "SELECT 1")
    assert r.exit_code == 1 and "Code: 516" in r.output
    r = run({**env, "METERING_SQL_KEY": ""}, "sql", "SELECT 1")
    assert r.exit_code == 2 and "analyst key" in r.output
    r = run(env, "sql", "  ")
    assert r.exit_code == 2
    # an error in a streamed result (after the first blocks, or before them when the engine ran
    # ahead): exit 1 with the engine's error
    sql = "SELECT number, throwIf(number = 150000) AS t FROM numbers(200000)"
    r = run(env, "sql", sql, "--format", "jsonl")
    assert r.exit_code == 1 and "FUNCTION_THROW_IF_VALUE_IS_NON_ZERO" in r.output


def test_sql_directly_on_the_engine_when_no_endpoint_answers(loaded: tuple[str, str], tmp_path: Path) -> None:
    dsn, db = loaded
    env = {
        "METERING_CLICKHOUSE_DSN": dsn,
        "METERING_CLICKHOUSE_DATABASE": db,
        "METERING_SQL_PORT": str(find_free_port()),
        "METERING_SQL_KEY": "",
    }
    out = tmp_path / "direct.csv"
    r = run(env, "sql", QUERY, "--format", "csv", "--output", str(out))
    assert r.exit_code == 0, r.output
    assert len(pd.read_csv(out)) == 13
    assert run(env, "sql", "KILL QUERY WHERE 1").exit_code == 1
    r = run(env, "sql", "SELECT count() FROM events_raw", "--format", "tsv")
    assert r.stdout == "count()\n13\n"


def test_analyst_keys_are_printed_once_and_revoked(tmp_path: Path) -> None:
    env = {"METERING_SQL_KEYS_FILE": str(tmp_path / "keys.json")}
    r = run(env, "admin", "analyst-key", "create", "--name", "bi", "--json")
    assert r.exit_code == 0, r.output
    created = orjson.loads(r.stdout)
    assert created["key"].startswith("mt_sql_") and created["user"] == "analyst"
    stored = (tmp_path / "keys.json").read_text()
    assert created["key"] not in stored and created["key_id"] in stored
    assert (tmp_path / "keys.json").stat().st_mode & 0o777 == 0o600
    listed = run(env, "admin", "analyst-key", "list", "--json").stdout
    assert created["key"] not in listed and '"revoked_at":null' in listed
    assert run(env, "admin", "analyst-key", "revoke", "--id", created["key_id"]).exit_code == 0
    assert '"revoked_at":null' not in run(env, "admin", "analyst-key", "list", "--json").stdout
    assert run(env, "admin", "analyst-key", "revoke", "--id", "ak_nope").exit_code == 1
    plain = run(env, "admin", "analyst-key", "create")
    assert "analyst_key: mt_sql_" in plain.stdout and "not shown again" in plain.output
