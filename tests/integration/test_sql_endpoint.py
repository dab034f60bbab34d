"""The SQL endpoint (issue 9, item 1) with the real clients: clickhouse-connect's HTTP client and
curl, against the real engine (the test session's embedded one) with a loaded database."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import clickhouse_connect
import httpx
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError, ProgrammingError
from prometheus_client import REGISTRY

from aggregators.direct import apply_events
from query_api.admin_token import new_admin_token
from query_api.analyst_keys import revoke_key
from query_api.credentials import new_access_token, new_api_key
from tests.integration.helpers import event
from tests.integration.sql_endpoint_helpers import Served, serve_sql

pytestmark = pytest.mark.clickhouse

TENANT = "acme"
WS = "6f1c1a4e-0000-4000-8000-0000000000aa"


def renders(n: int, at: datetime, prefix: str = "r") -> list[dict[str, Any]]:
    return [
        event(
            f"{prefix}-{i}",
            "render.completed",
            {"workspace_id": WS, "render_id": f"{prefix}-{i}", "output_duration_seconds": 60},
            at,
            TENANT,
        )
        for i in range(n)
    ]


@pytest.fixture
def served(clickhouse: tuple[Any, str], clickhouse_dsn: str, tmp_path: Path) -> Iterator[tuple[Served, Any]]:
    client, db = clickhouse
    at = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    ws = event("w-1", "workspace.created", {"workspace_id": WS, "name": "Acme", "tier": "pro"}, at, TENANT)
    apply_events(client, db, [ws, *renders(30, at)])
    with serve_sql(clickhouse_dsn, db, tmp_path / "analyst-keys.json") as s:
        yield s, client


def connect(s: Served, password: str | None = None, **kw: Any) -> Any:
    return clickhouse_connect.get_client(
        host="127.0.0.1",
        port=s.port,
        username="analyst",
        password=s.key if password is None else password,
        **kw,
    )


def curl(*args: str) -> tuple[int, dict[str, str], str]:
    """(status, headers with lower-case names, body) of a curl call."""
    out = subprocess.run(
        ["curl", "-s", "-i", *args], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    head, _, body = out.replace("\r\n", "\n").partition("\n\n")
    lines = head.split("\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def test_clickhouse_connect_reads_like_a_server(served: tuple[Served, Any]) -> None:
    s, pipeline_client = served
    ch = connect(s)
    # the same rows as the pipeline's own client
    sql = "SELECT event_id, type FROM events_raw WHERE tenant = {t:String} ORDER BY event_id"
    assert (
        ch.query(sql, parameters={"t": TENANT}).result_rows
        == pipeline_client.query(
            f"SELECT event_id, type FROM {s.database}.events_raw WHERE tenant = {{t:String}} ORDER BY event_id",
            parameters={"t": TENANT},
        ).result_rows
    )
    assert len(ch.query(sql, parameters={"t": TENANT}).result_rows) == 31
    # parameters of several types, and a string with what must be escaped
    row = ch.query(
        "SELECT {s:String}, {n:UInt32}, {d:DateTime}",
        parameters={"s": "a\tb'c\\", "n": 7, "d": datetime(2026, 11, 1)},
    ).result_rows[0]
    assert row[:2] == ("a\tb'c\\", 7)
    df = ch.query_df(
        "SELECT type, count() AS n FROM events_raw WHERE tenant = {t:String} GROUP BY type ORDER BY type",
        parameters={"t": TENANT},
    )
    assert df.to_dict("records") == [
        {"type": "render.completed", "n": 30},
        {"type": "workspace.created", "n": 1},
    ]
    table = ch.query_arrow("SELECT number, toString(number) AS s FROM numbers(5)")
    assert table.column("s").to_pylist() == ["0", "1", "2", "3", "4"]
    # a large result, streamed block by block
    seen = 0
    with ch.query_row_block_stream("SELECT number FROM numbers(3000000)") as stream:
        for block in stream:
            seen += len(block)
    assert seen == 3_000_000
    assert ch.command("SELECT count() FROM system.tables WHERE database = currentDatabase()") >= 8
    # an error after the first blocks were sent: the client raises, not a short result
    stream_sql = "SELECT number, throwIf(number = 150000) FROM numbers(200000)"
    with (
        pytest.raises(DatabaseError, match="FUNCTION_THROW_IF_VALUE_IS_NON_ZERO"),
        ch.query_row_block_stream(stream_sql) as stream,
    ):
        for _ in stream:
            pass
    # the client cannot raise a limit: it knows the settings are read-only and refuses to send
    with pytest.raises(ProgrammingError, match="readonly"):
        ch.query("SELECT 1", settings={"max_threads": 8})
    # a write is refused with ClickHouse's read-only error
    with pytest.raises(DatabaseError) as refused:
        ch.command("INSERT INTO events_raw (tenant, event_id) VALUES ('acme', 'x')")
    assert refused.value.code == 164
    with pytest.raises(DatabaseError) as refused:
        ch.insert("events_raw", [["acme", "x"]], column_names=["tenant", "event_id"])
    assert refused.value.code == 164
    # statements chdb does not stream (SHOW, DESCRIBE…) are answered whole
    assert "events_raw" in ch.command("SHOW TABLES")
    assert ch.query("DESCRIBE TABLE events_raw").result_rows[0][:2] == ("tenant", "LowCardinality(String)")


def test_curl_get_post_format_and_headers(served: tuple[Served, Any]) -> None:
    s, _ = served
    auth = ["-u", f"analyst:{s.key}"]
    status, headers, body = curl(f"{s.url}/ping")
    assert (status, body) == (200, "Ok.\n")
    status, headers, body = curl(*auth, f"{s.url}/?query=SELECT%20count()%20FROM%20events_raw")
    assert (status, body) == (200, "31\n")
    assert headers["x-clickhouse-format"] == "TabSeparated"
    for name in (
        "x-clickhouse-query-id",
        "x-clickhouse-timezone",
        "x-clickhouse-server-display-name",
        "x-clickhouse-summary",
    ):
        assert headers[name], name
    # POST body, a FORMAT clause, headers for the credentials, a query id
    status, headers, body = curl(
        "-H",
        "X-ClickHouse-User: analyst",
        "-H",
        f"X-ClickHouse-Key: {s.key}",
        f"{s.url}/?query_id=q-1",
        "--data-binary",
        "SELECT 1 AS a, 'x' AS b FORMAT JSONEachRow",
    )
    assert (status, body) == (200, '{"a":1,"b":"x"}\n')
    assert (headers["x-clickhouse-format"], headers["x-clickhouse-query-id"]) == ("JSONEachRow", "q-1")
    # the query in the URL and in the body; default_format; database; parameters
    status, headers, body = curl(
        *auth,
        f"{s.url}/?query=SELECT%20count()%2C&default_format=CSVWithNames&database=system&param_t=acme",
        "--data-binary",
        "{t:String} AS t FROM one",
    )
    assert (status, body) == (200, '"count()","t"\n1,"acme"\n')
    assert headers["x-clickhouse-format"] == "CSVWithNames"
    # a streamed result with a header: chdb repeats it in every block, the answer has it once
    for fmt, header in (("CSVWithNames", ['"n"']), ("TSVWithNamesAndTypes", ["n", "UInt64"])):
        status, _, body = curl(
            *auth, f"{s.url}/", "--data-binary", f"SELECT number AS n FROM numbers(200000) FORMAT {fmt}"
        )
        lines = body.splitlines()
        assert (status, lines[: len(header)], len(lines)) == (200, header, 200000 + len(header)), fmt
        assert lines[len(header) :] == [str(i) for i in range(200000)]
    # a whole result when the client waits for the end of the query: the summary is filled in
    status, headers, body = curl(
        *auth, f"{s.url}/?wait_end_of_query=1&query=SELECT%20sum(number)%20FROM%20numbers(1000)"
    )
    assert (status, body) == (200, "499500\n")
    assert '"read_rows":"1000"' in headers["x-clickhouse-summary"]


REFUSED = [
    ("INSERT INTO events_raw (tenant) VALUES ('x')", 164),
    ("ALTER TABLE events_raw DELETE WHERE 1", 164),
    ("DROP TABLE events_raw", 164),
    ("CREATE TABLE t (a Int8) ENGINE = Memory", 164),
    ("SYSTEM FLUSH LOGS", 164),
    ("KILL QUERY WHERE 1", 164),
    ("SET max_threads = 8", 164),
    ("SELECT * FROM file('/etc/hostname', 'LineAsString')", 164),
    ("SELECT file('/etc/hostname')", 164),
    ("SELECT `file`('/etc/hostname')", 164),
    ("SELECT * FROM url('http://127.0.0.1:1/', 'LineAsString')", 164),
    ("SELECT * FROM s3('http://127.0.0.1:1/bucket/x.csv', 'LineAsString')", 164),
    ("SELECT * FROM remote('127.0.0.1', system.one)", 164),
    ("SELECT * FROM numbers(3) INTO OUTFILE '/tmp/metering-outfile.tsv'", 164),
    ("SELECT 1 SETTINGS max_threads = 8", 164),
    ("SELECT 1 SETTINGS readonly = 0", 164),
    ("SELECT 1; SELECT 2", 62),
    ("SELEC 1", 62),
    ("SELECT * FROM no_such_table", 60),
]


def test_refused_with_clickhouse_errors(served: tuple[Served, Any]) -> None:
    s, _ = served
    refused_before = REGISTRY.get_sample_value("metering_sql_requests_total", {"code": "164"}) or 0
    for sql, code in REFUSED:
        status, headers, body = curl("-u", f"analyst:{s.key}", f"{s.url}/", "--data-binary", sql)
        assert headers.get("x-clickhouse-exception-code") == str(code), (sql, body)
        assert body.startswith(f"Code: {code}. DB::Exception: "), body
        assert status >= 400
    assert not Path("/tmp/metering-outfile.tsv").exists()
    refused = sum(1 for _, code in REFUSED if code == 164)
    assert (
        REGISTRY.get_sample_value("metering_sql_requests_total", {"code": "164"}) == refused_before + refused
    )


def test_client_settings_cannot_raise_limits(served: tuple[Served, Any]) -> None:
    s, _ = served
    auth = ["-u", f"analyst:{s.key}"]
    for setting in ("max_threads=8", "readonly=0", "max_result_rows=0", "max_memory_usage=0"):
        status, headers, body = curl(*auth, f"{s.url}/?{setting}&query=SELECT%201")
        assert headers.get("x-clickhouse-exception-code") == "164", (setting, body)
        assert "in readonly mode" in body
    # restating the current value is accepted, as by ClickHouse
    status, _, body = curl(*auth, f"{s.url}/?max_threads=1&query=SELECT%20getSetting('max_threads')")
    assert (status, body) == (200, "1\n")
    status, _, body = curl(*auth, f"{s.url}/?query=SELECT%20getSetting('readonly')")
    assert (status, body) == (200, "1\n")
    status, headers, body = curl(*auth, f"{s.url}/?compress=1&query=SELECT%201")
    assert headers.get("x-clickhouse-exception-code") == "48" and "compression" in body
    # Grafana sends max_execution_time with every query: accepted, and the endpoint's limit stays
    status, _, body = curl(
        *auth, f"{s.url}/?max_execution_time=3600&query=SELECT%20getSetting('max_execution_time')"
    )
    assert (status, body) == (200, "60\n")


def test_only_analyst_keys_open_it(served: tuple[Served, Any]) -> None:
    s, _ = served
    for user, password in [
        ("analyst", ""),
        ("analyst", s.key + "x"),
        ("default", s.key),
        ("analyst", new_api_key()),
        ("analyst", new_access_token()),
        ("analyst", new_admin_token()),
    ]:
        status, headers, body = curl("-u", f"{user}:{password}", f"{s.url}/?query=SELECT%201")
        assert (status, headers.get("x-clickhouse-exception-code")) == (403, "516"), (user, body)
        assert "Authentication failed" in body
    status, _, _ = curl(f"{s.url}/?query=SELECT%201")
    assert status == 403
    status, _, body = curl(f"{s.url}/?user=analyst&password={s.key}&query=SELECT%201")
    assert (status, body) == (200, "1\n")
    with pytest.raises(DatabaseError) as failed:
        connect(s, password="wrong")
    assert failed.value.code == 516
    # failed logins are limited per address: then 429, and the right key waits its turn too
    with httpx.Client() as http:
        answers = [http.get(s.url, params={"query": "SELECT 1"}, auth=("analyst", "nope")) for _ in range(30)]
    assert answers[-1].status_code == 429 and "too many failed attempts" in answers[-1].text
    assert answers[-1].headers["x-clickhouse-exception-code"] == "516"
    s.endpoint.failures = type(s.endpoint.failures)(30, name="sql-auth-failures")  # a fresh minute
    # a revoked key is refused from the next request on
    from query_api.analyst_keys import load_keys

    revoke_key(s.keys_file, load_keys(s.keys_file)[0].id)
    status, headers, _ = curl("-u", f"analyst:{s.key}", f"{s.url}/?query=SELECT%201")
    assert headers.get("x-clickhouse-exception-code") == "516"


def test_limits_hold_and_errors_in_a_stream_reach_the_client(
    clickhouse: tuple[Any, str], clickhouse_dsn: str, tmp_path: Path
) -> None:
    _, db = clickhouse
    with serve_sql(
        clickhouse_dsn, db, tmp_path / "k.json", sql_max_result_rows=1000, sql_max_execution_time_s=1
    ) as s:
        auth = ["-u", f"analyst:{s.key}"]
        _, headers, body = curl(
            *auth, f"{s.url}/?wait_end_of_query=1", "--data-binary", "SELECT number FROM numbers(100000)"
        )
        assert headers.get("x-clickhouse-exception-code") == "396", body  # TOO_MANY_ROWS_OR_BYTES
        _, headers, body = curl(
            *auth,
            f"{s.url}/",
            "--data-binary",
            "SELECT count() FROM numbers(100000000000) WHERE sipHash64(number) % 10 = 11 FORMAT JSON",
        )
        assert headers.get("x-clickhouse-exception-code") == "159", body  # TIMEOUT_EXCEEDED


def test_a_long_analyst_query_does_not_stop_the_pipeline(
    clickhouse: tuple[Any, str], clickhouse_dsn: str, tmp_path: Path
) -> None:
    """The aggregator's writes go through the pipeline's client while an analyst's query runs
    on the endpoint's handle: batches are committed during the query, not after it."""
    client, db = clickhouse
    at = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    with serve_sql(clickhouse_dsn, db, tmp_path / "k.json", sql_max_execution_time_s=10) as s:
        outcome: dict[str, Any] = {}

        def heavy() -> None:
            outcome["answer"] = curl(
                "-u",
                f"analyst:{s.key}",
                f"{s.url}/",
                "--data-binary",
                "SELECT count() FROM numbers(100000000000) WHERE sipHash64(number) % 1000 = 1001",
            )
            outcome["ended"] = time.monotonic()

        worker = threading.Thread(target=heavy)
        worker.start()
        time.sleep(0.5)
        committed = []
        for i in range(3):
            apply_events(client, db, renders(50, at, prefix=f"b{i}"))
            committed.append(time.monotonic())
        n = client.command(f"SELECT count() FROM {db}.events_raw WHERE tenant = 'acme'")
        worker.join(timeout=60)
    assert n == 150
    # Committed while the query ran: had writes queued behind it, even the first batch would have
    # waited for its end (a batch takes well under a second here, the query 10 s).
    assert committed[0] < outcome["ended"] - 1, "the batches waited for the analyst's query"
    _, headers, _ = outcome["answer"]
    assert headers.get("x-clickhouse-exception-code") == "159"  # and the query was stopped at its limit


def test_a_client_gone_mid_stream_gives_its_handle_back(
    clickhouse: tuple[Any, str], clickhouse_dsn: str, tmp_path: Path
) -> None:
    _, db = clickhouse
    with serve_sql(
        clickhouse_dsn,
        db,
        tmp_path / "k.json",
        sql_max_concurrent_queries=1,
        sql_queue_timeout_s=4,
        sql_max_result_rows=10**10,
        sql_max_result_bytes=10**12,
    ) as s:
        for _ in range(3):  # with one handle, a leaked one would make the next query wait, then fail
            with (
                httpx.Client(auth=("analyst", s.key)) as http,
                http.stream("POST", s.url, content=b"SELECT number FROM numbers(1000000000)") as r,
            ):
                assert r.status_code == 200
                next(r.iter_bytes())  # one block, then the client leaves
        status, _, body = curl("-u", f"analyst:{s.key}", f"{s.url}/?query=SELECT%2042")
        assert (status, body) == (200, "42\n")
        # and a query waiting longer than the queue timeout for the one handle gets code 202
        with (
            httpx.Client(auth=("analyst", s.key)) as http,
            http.stream("POST", s.url, content=b"SELECT number FROM numbers(1000000000)") as r,
        ):
            chunks = r.iter_bytes()  # held: a dropped iterator closes the response
            next(chunks)
            t = time.monotonic()
            _, headers, _ = curl("-u", f"analyst:{s.key}", f"{s.url}/?query=SELECT%201")
            assert headers.get("x-clickhouse-exception-code") == "202"
            assert time.monotonic() - t >= 3.5
