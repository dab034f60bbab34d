"""event_keys, the dedupe's lookup (issue 11, item 1; docs/exactly-once.md, "Deduplication"): an
EmbeddedRocksDB table keyed by one string made of the tenant and the event id (stage.key_of),
filled from events_raw by its migration, caught
up from it by the writer when a crash left it behind, exactly once whatever is repeated; a key of
one tenant never matches another tenant's event; the keys outlive the process. The crash itself:
tests/integration/test_exactly_once.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from aggregators.direct import make_processor, pack
from aggregators.stage import key_of
from aggregators.writer import ClickHouseWriter
from bench.batch import _events
from schemas.meters import default_catalog
from schemas.migrate import migrate, render

pytestmark = pytest.mark.clickhouse


def _raw(client: Any, db: str, partition: int, offsets: range, ingested_at: str) -> None:
    """Raw rows of ``partition`` at ``offsets`` (two events per offset, ids of their own: raw holds
    a key once), ingested at ``ingested_at``."""
    client.command(
        f"INSERT INTO {db}.events_raw (tenant, event_id, type, source, subject, time, data, src_partition, "
        "src_offset, ingested_at) SELECT concat('t', toString(number % 3)), concat('e-', toString({p:Int32}), "
        "'-', toString(2 * {lo:Int64} + number)), 'egress.download', 's', 'w', now64(3), '{}', {p:Int32}, "
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


def _key_wm(client: Any, db: str) -> dict[int, int]:
    rows = client.query(f"SELECT src_partition, src_offset FROM {db}.event_key_watermarks").result_rows
    return {int(p): int(o) for p, o in rows}


def test_the_migration_fills_event_keys_from_events_raw(clickhouse: tuple[Any, str]) -> None:
    client, db = clickhouse
    _raw(client, db, 0, range(0, 50), "2026-10-31 23:59:00")
    _raw(client, db, 1, range(0, 30), "2026-11-01 00:01:00")
    assert migrate(client, db, target=6) == [
        "rolled back 0008_event_keys_one_key",
        "rolled back 0007_event_keys",
    ]
    assert migrate(client, db, target=7) == ["applied 0007_event_keys"]
    assert _keys(client, db, "event_keys") == _keys(client, db, "events_raw")
    assert migrate(client, db) == ["applied 0008_event_keys_one_key"]
    [(engine, key)] = client.query(
        "SELECT engine, primary_key FROM system.tables WHERE database = {d:String} AND name = 'event_keys'",
        parameters={"d": db},
    ).result_rows
    assert (engine, key) == ("EmbeddedRocksDB", "key")
    keys = _keys(client, db, "event_keys")
    assert keys == _keys(client, db, "events_raw") and len(keys) == 160
    # the migration's key is the writer's (stage.key_of)
    assert int(client.command(f"SELECT countIf(key != {key_of()}) FROM {db}.event_keys")) == 0
    assert _key_wm(client, db) == {0: 49, 1: 29}
    # and back: the pair as the key again, the same keys
    assert migrate(client, db, target=7) == ["rolled back 0008_event_keys_one_key"]
    assert _keys(client, db, "event_keys") == keys
    assert migrate(client, db) == ["applied 0008_event_keys_one_key"]


def test_keys_catch_up_inserts_what_a_crash_left_out_once(clickhouse: tuple[Any, str]) -> None:
    """event_keys behind events_raw on two partitions (one partly: a crash after the keys insert,
    before the watermark moved): the catch-up inserts exactly the missing keys, moves the
    watermarks, and repeating it, with the watermarks cached or re-read, runs nothing more."""
    client, db = clickhouse
    _raw(client, db, 0, range(0, 10), "2026-10-31 23:59:00")
    client.command(
        f"INSERT INTO {db}.event_keys SELECT {key_of()}, tenant, event_id, src_partition, src_offset, ingested_at "
        f"FROM {db}.events_raw"
    )
    client.command(f"INSERT INTO {db}.event_key_watermarks VALUES (0, 9)")
    _raw(client, db, 0, range(10, 20), "2026-10-31 23:59:30")  # a crash left these keys out
    _raw(client, db, 0, range(20, 25), "2026-11-01 00:00:10")  # these keys in, the watermark not
    client.command(
        f"INSERT INTO {db}.event_keys SELECT {key_of()}, tenant, event_id, src_partition, src_offset, ingested_at "
        f"FROM {db}.events_raw WHERE src_offset >= 20"
    )
    _raw(client, db, 1, range(0, 7), "2026-11-01 00:00:20")  # a partition without any key
    writer = ClickHouseWriter(client, db, default_catalog())
    raw_wm = {0: 24, 1: 6, 2: -1}
    assert writer.keys_catch_up(raw_wm) == 2  # the keys, then the watermarks
    assert _keys(client, db, "event_keys") == _keys(client, db, "events_raw")  # an upsert: no copy
    assert _key_wm(client, db) == {0: 24, 1: 6}
    assert writer.keys_catch_up(raw_wm) == 0  # cached: one look-up, no statement
    writer.forget()
    assert writer.keys_catch_up(raw_wm) == 0  # re-read from the table: up to date
    assert _keys(client, db, "event_keys") == _keys(client, db, "events_raw")


def _same_id_and_joined_text(client: Any, db: str) -> None:
    """The same event id sent by two tenants is two events; so are two events whose tenant and
    id joined give the same text (``tenant-a`` + ``b-1`` and ``tenant-ab`` + ``-1``); sent
    again by any of them, a copy of that tenant's own."""
    proc = make_processor(client, db)
    try:
        base = _events(1)[0]
        a = {**base, "tenant": "tenant-a", "id": "same-id"}
        b = {**base, "tenant": "tenant-b", "id": "same-id"}
        c = {**base, "tenant": "tenant-a", "id": "b-1"}
        d = {**base, "tenant": "tenant-ab", "id": "-1"}
        assert proc.process(pack([a, c], 0, 0)).written == 2
        stats = proc.process(pack([b, d], 0, 2))
        assert (stats.written, stats.duplicates) == (2, 0)
        stats = proc.process(pack([b, a, d, c], 0, 4))
        assert (stats.written, stats.duplicates) == (0, 4)
    finally:
        proc.close()
    stored = sorted((r[0], r[1]) for r in _keys(client, db, "event_keys"))
    assert stored == [
        ("tenant-a", "b-1"),
        ("tenant-a", "same-id"),
        ("tenant-ab", "-1"),
        ("tenant-b", "same-id"),
    ]


def test_a_key_of_one_tenant_never_matches_another_tenants_event(clickhouse: tuple[Any, str]) -> None:
    _same_id_and_joined_text(clickhouse[0], clickhouse[1])


def test_a_key_table_the_engine_cannot_join_is_looked_up_by_key(clickhouse: tuple[Any, str]) -> None:
    """On a cluster event_keys is a ReplicatedReplacingMergeTree, which the engine cannot read by
    a direct join: the writer looks the keys up with ``key IN (...)`` there. The same decisions,
    here on a (non-replicated) ReplacingMergeTree of the same columns and key."""
    client, db = clickhouse
    client.command(f"DROP TABLE {db}.event_keys SYNC")
    client.command(
        f"CREATE TABLE {db}.event_keys (key String, tenant String, event_id String, src_partition Int32, "
        "src_offset Int64, ingested_at DateTime64(3, 'UTC')) ENGINE = ReplacingMergeTree PRIMARY KEY key"
    )
    writer = ClickHouseWriter(client, db, default_catalog())
    assert not writer._keys_in_rocksdb()
    _same_id_and_joined_text(client, db)


_REOPEN = """
import sys
from schemas.clickhouse import connect
from schemas.migrate import migrate
client = connect("chdb://" + sys.argv[1], "metering")
if sys.argv[2] == "write":
    migrate(client, "metering")
    client.command("INSERT INTO metering.event_keys VALUES ('1:te-1', 't', 'e-1', 0, 1, now64(3)), "
                   "('1:ue-1', 'u', 'e-1', 0, 2, now64(3))")
    client.command("INSERT INTO metering.event_key_watermarks VALUES (0, 2)")
else:
    print(client.query("SELECT tenant, event_id FROM metering.event_keys WHERE key IN "
                       "('1:te-1', '1:ue-1', '1:te-2') ORDER BY tenant").result_rows,
          client.query("SELECT * FROM metering.event_key_watermarks").result_rows)
"""


def test_the_keys_outlive_the_process(tmp_path: Path) -> None:
    """RocksDB keeps its files under the engine's data path: a process that opens the same path
    later finds every key and watermark (the crash test does it after a SIGKILL)."""
    run = [sys.executable, "-c", textwrap.dedent(_REOPEN), str(tmp_path / "ch")]
    subprocess.run([*run, "write"], check=True, timeout=120)
    out = subprocess.run([*run, "read"], check=True, timeout=120, capture_output=True, text=True).stdout
    assert out.strip() == "[('t', 'e-1'), ('u', 'e-1')] [(0, 2)]"


def test_on_a_cluster_the_key_tables_are_replicated() -> None:
    """RocksDB has no replicated form: on a cluster the migration makes the key tables
    ReplicatedReplacingMergeTree with the same primary key (the same statements work on both)."""
    sql = Path("schemas/migrations/0007_event_keys.up.sql").read_text()
    single = render(sql, "metering", None)
    cluster = render(sql, "metering", "main")
    assert sum("ENGINE = EmbeddedRocksDB" in s for s in single) == 2
    assert sum("ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/" in s for s in cluster) == 2
    assert all("ON CLUSTER 'main'" in s for s in cluster if s.startswith("CREATE"))
    assert sum("PRIMARY KEY (tenant, event_id)" in s for s in cluster) == 1
    sql = Path("schemas/migrations/0008_event_keys_one_key.up.sql").read_text()
    single = render(sql, "metering", None)
    cluster = render(sql, "metering", "main")
    assert sum("ENGINE = EmbeddedRocksDB" in s for s in single) == 1
    assert sum("ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/" in s for s in cluster) == 1
    assert all("ON CLUSTER 'main'" in s for s in cluster if s.startswith(("CREATE", "DROP")))
    assert sum("PRIMARY KEY key" in s for s in cluster) == 1


def test_a_replay_lowers_the_keys_watermark_to_its_start(clickhouse: tuple[Any, str]) -> None:
    """A replay from offset 20 of partition 0: the keys watermark goes back to 19 (the keys of
    the rewritten rows are caught up from there); never up, and a partition without one stays
    without."""
    client, db = clickhouse
    client.command(f"INSERT INTO {db}.event_key_watermarks VALUES (0, 24), (1, 6)")
    writer = ClickHouseWriter(client, db, default_catalog())
    writer.keys_watermarks_lower({0: 20, 1: 30, 2: 5})
    assert _key_wm(client, db) == {0: 19, 1: 6}
    writer.keys_watermarks_lower({0: 0})
    assert _key_wm(client, db) == {0: -1, 1: 6}
