"""The SQL endpoint's judge of statements (query_api/sql_guard.py) and its off switch."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydantic import SecretStr

from deploy.settings import RunSettings
from query_api.analyst_keys import AnalystKeyStore, create_key
from query_api.sql_endpoint import open_endpoint
from query_api.sql_guard import READONLY, SYNTAX_ERROR, Refused, judge


@pytest.mark.parametrize(
    ("sql", "kind", "fmt"),
    [
        ("SELECT 1", "SELECT", None),
        ("  select 1 FORMAT JSON;", "SELECT", "JSON"),
        ("WITH 1 AS x SELECT x FORMAT `CSVWithNames`", "WITH", "CSVWithNames"),
        ("(SELECT 1) UNION ALL (SELECT 2)", "SELECT", None),
        ("SELECT format('{}', 1) AS s", "SELECT", None),
        ("SELECT 'FORMAT JSON', 'file(' -- FORMAT CSV\n", "SELECT", None),
        ("SELECT 1 /* ; KILL QUERY */", "SELECT", None),
        ("SHOW TABLES FORMAT TSV", "SHOW", "TSV"),
        ("DESCRIBE TABLE events_raw", "DESCRIBE", None),
        ("EXPLAIN SELECT 1", "EXPLAIN", None),
        ("SELECT profile FROM t WHERE x.file = 1", "SELECT", None),
        ("SELECT 1 SETTINGS max_threads = 1 FORMAT Native", "SELECT", "Native"),
    ],
)
def test_reads_pass(sql: str, kind: str, fmt: str | None) -> None:
    statement = judge(sql)
    assert (statement.kind, statement.format) == (kind, fmt)


@pytest.mark.parametrize(
    ("sql", "code"),
    [
        ("INSERT INTO t VALUES (1)", READONLY),
        ("KILL QUERY WHERE 1", READONLY),
        ("kill query where 1", READONLY),
        ("(KILL QUERY WHERE 1)", READONLY),
        ("SET readonly = 0", READONLY),
        ("USE other", READONLY),
        ("SYSTEM SHUTDOWN", READONLY),
        ("SELECT file('/etc/passwd')", READONLY),
        ("SELECT FILE ('/etc/passwd')", READONLY),
        ("SELECT \"file\"('/etc/passwd')", READONLY),
        ("SELECT file /* hidden */ ('/etc/passwd')", READONLY),
        ("SELECT * FROM file('x', 'CSV')", READONLY),
        ("SELECT catboostEvaluate('/m.bin', 1)", READONLY),
        ("SELECT 1 INTO OUTFILE '/tmp/x'", READONLY),
        ("SELECT 1; SELECT 2", SYNTAX_ERROR),
        ("SELECT 1;;KILL QUERY WHERE 1", SYNTAX_ERROR),
        ("", SYNTAX_ERROR),
        ("  ;  ", SYNTAX_ERROR),
        ("SELEC 1", SYNTAX_ERROR),
        ("SELECT 'unterminated", SYNTAX_ERROR),
        ("SELECT 1 /* unterminated", SYNTAX_ERROR),
    ],
)
def test_everything_else_is_refused(sql: str, code: int) -> None:
    with pytest.raises(Refused) as refused:
        judge(sql)
    assert refused.value.code == code


def test_off_by_setting_and_with_a_clickhouse_server(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    assert open_endpoint(RunSettings(sql_enabled=False)) is None
    assert "SQL endpoint off (METERING_SQL_ENABLED=false)" in caplog.text
    server = RunSettings(clickhouse_dsn=SecretStr("https://u:p@ch.example:8443"))
    assert open_endpoint(server) is None
    assert (
        "METERING_CLICKHOUSE_DSN is a ClickHouse server; analysts query that server directly" in caplog.text
    )


def test_analyst_key_store(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    store = AnalystKeyStore(path)
    assert not store.verify("analyst", "")  # no file: nothing opens
    _, raw = create_key(path, "bi")
    assert store.verify("analyst", raw) and not store.verify("default", raw)
    assert not store.verify("analyst", raw[:-1]) and not store.verify("analyst", "")
    assert raw not in path.read_text() and path.stat().st_mode & 0o777 == 0o600
    path.write_text("{not json")  # edited by hand into garbage: every key refused, no exception
    assert not store.verify("analyst", raw)
