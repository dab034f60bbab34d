"""Issue 9's "done when", from outside: ``metering run`` serves the SQL endpoint on its own port;
clickhouse-connect (as user ``analyst``) and ``metering sql`` read the tables while events keep
being ingested and counted, a long analyst query included; a write through it is refused."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import clickhouse_connect
import httpx
import orjson
import pandas as pd
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError
from typer.testing import CliRunner

from deploy.cli import app as metering
from deploy.kafka.local_broker import find_free_port
from tests.integration.helpers import event, produce_batches, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
WS = "6f1c1a4e-0000-4000-8000-0000000000bb"


def renders(prefix: str, n: int, at: datetime) -> list[dict[str, Any]]:
    return [
        event(
            f"{prefix}-{i}",
            "render.completed",
            {"workspace_id": WS, "render_id": f"{prefix}-{i}", "output_duration_seconds": 30},
            at,
            "acme",
        )
        for i in range(n)
    ]


def test_metering_run_serves_sql_while_it_ingests(kafka_bootstrap: str) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="metering-sql-run-"))
    topic = f"test-sql-{uuid.uuid4().hex[:12]}"
    http_port = find_free_port()
    sql_port = find_free_port(exclude=frozenset({http_port}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERING_")}
    env |= {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "METERING_TOPIC_EVENTS": topic,
        "METERING_TOPIC_DEAD_LETTER": f"{topic}.dlq",
        "METERING_CONSUMER_GROUP": f"g-{topic}",
        "METERING_HTTP_PORT": str(http_port),
        "METERING_SQL_PORT": str(sql_port),
        "METERING_SQL_KEYS_FILE": str(tmp / "analyst-keys.json"),
        "METERING_SQL_MAX_EXECUTION_TIME_S": "15",
        "METERING_CLICKHOUSE_DSN": f"chdb://{tmp / 'chdb'}",
        "METERING_FAUST_DATA_DIR": str(tmp / "faust"),
        "METERING_ADMIN_TOKEN_FILE": str(tmp / "admin-token"),
        "METERING_BATCH_WITHIN_S": "0.05",
    }
    log = tmp / "run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from deploy.cli import app; app()", "run"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def ready() -> bool:
            try:
                up = httpx.get(f"http://127.0.0.1:{http_port}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
            return up and "SQL endpoint  http://127.0.0.1:" in log.read_text()

        assert wait_until(ready, 180, 0.5), log.read_text()[-3000:]
        assert httpx.get(f"http://127.0.0.1:{sql_port}/ping").text == "Ok.\n"
        created = CliRunner().invoke(metering, ["admin", "analyst-key", "create", "--json"], env=env)
        key = orjson.loads(created.stdout)["key"]
        ch = clickhouse_connect.get_client(host="127.0.0.1", port=sql_port, username="analyst", password=key)

        at = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)
        ws = event(
            "w-1", "workspace.created", {"workspace_id": WS, "name": "Acme", "tier": "pro"}, at, "acme"
        )
        produce_batches(kafka_bootstrap, topic, [ws, *renders("a", 20, at)])

        def counted() -> int:
            return int(
                ch.command(
                    "SELECT count() FROM events_raw WHERE tenant = 'acme' AND type = 'render.completed'"
                )
            )

        assert wait_until(lambda: counted() == 20, 60)

        # a long analyst query on one handle; ingestion goes on, and another analyst reads on the other
        outcome: dict[str, Any] = {}

        def heavy() -> None:
            try:
                other = clickhouse_connect.get_client(
                    host="127.0.0.1", port=sql_port, username="analyst", password=key
                )
                other.command("SELECT count() FROM numbers(100000000000) WHERE sipHash64(number) % 10 = 11")
            except DatabaseError as exc:
                outcome["code"] = exc.code
            outcome["ended"] = time.monotonic()

        worker = threading.Thread(target=heavy)
        worker.start()
        time.sleep(0.5)
        produce_batches(kafka_bootstrap, topic, renders("b", 30, at))
        assert wait_until(lambda: counted() == 50, 30)
        counted_at = time.monotonic()
        worker.join(timeout=60)
        assert counted_at < outcome["ended"], "ingestion waited for the analyst's query"
        assert outcome["code"] == 159  # and the query was stopped at METERING_SQL_MAX_EXECUTION_TIME_S

        # the same numbers from the views, and from metering sql; a write is refused
        total = ch.query(
            "SELECT sum(value) FROM usage_daily WHERE tenant = 'acme' AND meter = 'render_output_seconds'"
        ).result_rows[0][0]
        assert total == 50 * 30
        with pytest.raises(DatabaseError) as refused:
            ch.command("INSERT INTO events_raw (tenant, event_id) VALUES ('acme', 'x')")
        assert refused.value.code == 164
        csv = tmp / "out.csv"
        r = CliRunner().invoke(
            metering,
            [
                "sql",
                "SELECT event_id FROM events_raw WHERE tenant = 'acme'",
                "--format",
                "csv",
                "-o",
                str(csv),
            ],
            env=env | {"METERING_SQL_KEY": key},
        )
        assert r.exit_code == 0, r.output
        assert len(pd.read_csv(csv)) == 51
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
