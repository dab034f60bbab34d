"""event_keys, the dedupe's lookup (issue 11, item 1; docs/exactly-once.md, "Deduplication"):
filled from events_raw by its migration, and caught up from it by the writer when a crash left it
behind, exactly once whatever is repeated. The crash itself: tests/integration/test_exactly_once.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from aggregators.writer import ClickHouseWriter
from schemas.meters import default_catalog
from schemas.migrate import migrate

pytestmark = pytest.mark.clickhouse


def _raw(client: Any, db: str, partition: int, offsets: range, ingested_at: str) -> None:
    """Raw rows of ``partition`` at ``offsets`` (two events per offset), ingested at ``ingested_at``."""
    client.command(
        f"INSERT INTO {db}.events_raw (tenant, event_id, type, source, subject, time, data, src_partition, "
        "src_offset, ingested_at) SELECT concat('t', toString(number % 3)), concat('e-', toString({p:Int32}), "
        "'-', toString(number)), 'egress.download', 's', 'w', now64(3), '{}', {p:Int32}, "
        "{lo:Int64} + intDiv(number, 2), toDateTime64({at:String}, 3, 'UTC') FROM numbers({n:UInt64})",
        parameters={"p": partition, "lo": offsets.start, "n": 2 * len(offsets), "at": ingested_at},
    )


def _keys(client: Any, db: str, table: str) -> list[tuple[Any, ...]]:
    return [
        tuple(r)
        for r in client.query(
            f"SELECT tenant, event_id, src_partition, src_offset, toString(ingested_at) FROM {db}.{table} "
            "ORDER BY src_partition, src_offset, event_id"
        ).result_rows
    ]


def test_the_migration_fills_event_keys_from_events_raw(clickhouse: tuple[Any, str]) -> None:
    client, db = clickhouse
    _raw(client, db, 0, range(0, 50), "2026-10-31 23:59:00")
    _raw(client, db, 1, range(0, 30), "2026-11-01 00:01:00")
    assert migrate(client, db, target=6) == ["rolled back 0007_event_keys"]
    assert migrate(client, db) == ["applied 0007_event_keys"]
    assert (
        _keys(client, db, "event_keys") == _keys(client, db, "events_raw")
        and len(_keys(client, db, "event_keys")) == 160
    )
    [(bad,)] = client.query(
        f"SELECT countIf(h != sipHash64(tenant, event_id)) FROM {db}.event_keys"
    ).result_rows
    assert bad == 0


def test_keys_catch_up_inserts_what_a_crash_left_out_once(clickhouse: tuple[Any, str]) -> None:
    """event_keys behind events_raw on two partitions, over two months of ingestion: the catch-up
    inserts exactly the missing keys (one statement per month of ingestion), and repeating it, with the
    watermarks cached or re-read, inserts nothing more."""
    client, db = clickhouse
    _raw(client, db, 0, range(0, 10), "2026-10-31 23:59:00")
    client.command(
        f"INSERT INTO {db}.event_keys SELECT sipHash64(tenant, event_id), tenant, event_id, src_partition, "
        f"src_offset, ingested_at FROM {db}.events_raw"
    )
    _raw(client, db, 0, range(10, 20), "2026-10-31 23:59:30")  # a crash left these keys out
    _raw(client, db, 0, range(20, 25), "2026-11-01 00:00:10")  # ...and these, next month
    _raw(client, db, 1, range(0, 7), "2026-11-01 00:00:20")  # a partition without any key
    writer = ClickHouseWriter(client, db, default_catalog())
    raw_wm = {0: 24, 1: 6, 2: -1}
    assert writer.keys_catch_up(raw_wm) == 2  # one per month of ingestion, both partitions in each
    assert _keys(client, db, "event_keys") == _keys(client, db, "events_raw")
    assert writer.keys_catch_up(raw_wm) == 0  # cached: one look-up, no statement
    writer.forget()
    assert writer.keys_catch_up(raw_wm) == 0  # re-read from the table: up to date
    assert _keys(client, db, "event_keys") == _keys(client, db, "events_raw")
