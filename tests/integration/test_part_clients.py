"""Issue 11 item 6: in ``metering run`` the query API never waits for the aggregator.

Each part of the all-in-one process has a ClickHouse client of its own on the one embedded engine
(``deploy.runner.open_part_clients``). A client runs one statement at a time, so while the
aggregator's client is inside a long statement, a request to the query API and ``/readyz`` must
still be answered at once, on the real engine, through the process's real HTTP app.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient

from deploy.runner import Part, build_http_app, open_part_clients
from deploy.settings import RunSettings
from query_api.credentials import new_access_token

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

# ~4 s on the aggregator's client: 40 one-row blocks of 0.1 s each (sleep is capped per block).
LONG_STATEMENT = "SELECT sum(sleepEachRow(0.1)) FROM numbers(40) SETTINGS max_block_size = 1"


def _running(client: Any, marker: str) -> bool:
    return bool(
        client.command(
            "SELECT count() FROM system.processes WHERE query LIKE {m:String} AND query NOT LIKE '%system.processes%'",
            parameters={"m": f"%{marker}%"},
        )
    )


def test_the_query_api_and_readyz_answer_while_the_aggregator_client_is_busy(
    kafka_bootstrap: str, clickhouse_dsn: str
) -> None:
    database = f"t_{uuid.uuid4().hex[:12]}"
    settings = RunSettings(
        clickhouse_dsn=clickhouse_dsn,
        clickhouse_database=database,
        aggregator_max_threads=1,
        aggregator_max_memory_usage=1 << 30,
        query_cache_ttl_s=0.0,  # every request looks its credential up in ClickHouse
        query_rate_limit_per_minute=1_000_000,
    )
    clients = open_part_clients(settings)
    try:
        # Three clients, and the aggregator's carries its bounded share with every statement.
        assert len({id(clients.api), id(clients.aggregator), id(clients.health)}) == 3
        assert int(clients.aggregator.command("SELECT getSetting('max_threads')")) == 1
        assert int(clients.aggregator.command("SELECT getSetting('max_memory_usage')")) == 1 << 30
        # the aggregator's engine threads yield the CPU to the reads (default nice 19)
        assert int(clients.aggregator.command("SELECT getSetting('os_thread_priority')")) == 19
        assert int(clients.api.command("SELECT getSetting('os_thread_priority')")) == 0
        app, closers = build_http_app(
            settings, clients.api, kafka_bootstrap, {Part.QUERY}, health_client=clients.health
        )
        marker = f"busy_{uuid.uuid4().hex[:8]}"
        done = threading.Event()

        def aggregator_statement() -> None:
            try:
                clients.aggregator.command(f"{LONG_STATEMENT} -- {marker}")
            finally:
                done.set()

        with TestClient(app) as api:
            # Warm the API's path once while idle (first-request costs are not the point here);
            # /readyz is not warmed: its results are cached for a second, and the one asked for
            # below must run its ClickHouse check during the aggregator's statement.
            cold = api.get(f"/api/v1/workspaces/{uuid.uuid4()}/stats", headers={"Authorization": "Bearer x"})
            assert cold.status_code == 401
            busy = threading.Thread(target=aggregator_statement, daemon=True)
            busy.start()
            deadline = time.monotonic() + 5
            while not _running(clients.health, marker):
                assert time.monotonic() < deadline and not done.is_set(), "the long statement never ran"
                time.sleep(0.05)

            began = time.monotonic()
            r = api.get(
                f"/api/v1/workspaces/{uuid.uuid4()}/stats",
                headers={"Authorization": f"Bearer {new_access_token()}"},
            )
            api_s = time.monotonic() - began
            assert r.status_code == 401, r.text  # a token looked up in ClickHouse and not found
            began = time.monotonic()
            ready = api.get("/readyz")
            ready_s = time.monotonic() - began
            assert ready.status_code == 200, ready.text
            assert ready.json()["checks"]["clickhouse"]["status"] == "ok", ready.json()
            # Both answered while the aggregator's statement (4 s) still ran, without waiting for
            # it. (No bound in seconds besides: /readyz took 1.8 s once at load ~10, still
            # well before the statement's end.)
            assert not done.is_set(), (
                f"the aggregator's statement ended before the requests were answered ({api_s:.2f} s, {ready_s:.2f} s)"
            )
            busy.join(timeout=30)
            assert done.is_set()
        for closer in closers:
            closer.close()
    finally:
        clients.api.command(f"DROP DATABASE IF EXISTS {database} SYNC")
        clients.close()
