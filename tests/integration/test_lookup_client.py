"""Issue 11 item 6: the query API's lookups (credentials, entities, freshness), which are reloaded
in the background before they expire (query_api/lookup_cache.py), run on a client of their own,
so that a reload never holds the lock the usage statements queue on, nor waits behind them: with
the embedded engine, a second connection handle on the same engine and the same data."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from query_api.app import lookup_client_for
from query_api.reader import Reader
from schemas.clickhouse import connect
from schemas.migrate import migrate

pytestmark = [pytest.mark.clickhouse]

# ~3 s on the API's client: 30 one-row blocks of 0.1 s each
LONG_STATEMENT = "SELECT sum(sleepEachRow(0.1)) FROM numbers(30) SETTINGS max_block_size = 1"


def test_lookups_answer_while_the_api_client_is_busy(clickhouse_dsn: str) -> None:
    database = f"t_{uuid.uuid4().hex[:12]}"
    client = connect(clickhouse_dsn, database)
    migrate(client, database)
    lookups = lookup_client_for(client, database)
    assert lookups is not client  # a handle of its own on the one engine
    client.command(
        f"INSERT INTO {database}.tenant_freshness (tenant, refreshed_at) VALUES ('t1', '2026-11-30 08:00:00.250')"
    )
    reader = Reader(client, database, cache_ttl_s=0, lookup_client=lookups)

    busy = threading.Thread(target=client.command, args=(LONG_STATEMENT,))
    busy.start()
    try:
        time.sleep(0.3)  # the API's client is inside its statement
        assert busy.is_alive()
        refreshed = reader.freshness("t1")  # the same data, through the other handle
        assert busy.is_alive(), "the lookup waited for the API client's statement"
    finally:
        busy.join()
    assert refreshed is not None and refreshed.isoformat() == "2026-11-30T08:00:00.250000+00:00"
