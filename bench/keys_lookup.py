"""The event_keys lookup alone, in the forms the embedded engine offers (issue 11, item 1): what a
batch's dedupe costs per key, and what a key table of another shape would cost.

    PYTHONPATH=. .venv/bin/python -m bench.keys_lookup [STORED] [--batch EVENTS] [--bloom-bits N]
        [--config-file XML]

A fresh database of the embedded engine gets STORED keys (default 0; 20 tenants, random ids,
inserted 50,000 at a time as the aggregator inserts a batch's keys) in a table shaped like
migration 0007's event_keys (EmbeddedRocksDB, primary key ``(tenant, event_id)``) and the same
keys in one keyed by a single string as migration 0008's (``aggregators.stage.key_of``). A batch of EVENTS rows (default 50,000) is
staged in a Memory table as the aggregator stages a judged batch, a fifth of them stored already.
Printed per form: CPU µs per key of the process (all threads) and wall µs, medians of 5, with
the number of keys found (the batch's new keys; for the lookup alone, its stored ones). The engine runs with the
product's ``EngineCaps`` (schemas/clickhouse.py), its RocksDB Bloom filter of ``--bloom-bits``
bits per key (default the product's; 0: none). ``--config-file``: a ClickHouse configuration of
your own instead (for example a ``<rocksdb>`` section with other RocksDB options).
"""

from __future__ import annotations

import resource
import shutil
import statistics
import sys
import tempfile
import time

import clickhouse_connect

from aggregators.stage import key_of
from schemas.clickhouse import EngineCaps

_BATCH = "(SELECT * FROM b.rows WHERE ok ORDER BY msg, pos LIMIT 1 BY tenant, event_id)"

#: form -> a query counting the batch's new keys
FORMS = {
    # migration 0007's dedupe statement, counting instead of inserting
    "composite key, IN (0007)": f"""SELECT count() FROM {_BATCH}
        WHERE (tenant, event_id) NOT IN (SELECT tenant, event_id FROM b.keys
            WHERE (tenant, event_id) IN (SELECT tenant, event_id FROM b.rows WHERE ok))""",
    "composite key, the IN lookup alone": """SELECT count() FROM b.keys
        WHERE (tenant, event_id) IN (SELECT tenant, event_id FROM b.rows WHERE ok)""",
    # the cluster's form of stage.new_insert
    "single string key, IN": f"""SELECT count() FROM {_BATCH}
        WHERE {key_of()} NOT IN (SELECT k FROM b.k1 WHERE k IN (SELECT {key_of()} FROM b.rows WHERE ok))""",
    # stage.new_insert on RocksDB (since migration 0008)
    "single string key, direct join (0008)": f"""SELECT countIf(empty(k1.k))
        FROM (SELECT *, {key_of()} AS kk FROM {_BATCH}) AS r
        LEFT JOIN b.k1 AS k1 ON r.kk = k1.k SETTINGS join_algorithm = 'direct'""",
}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv: list[str]) -> None:
    args = list(argv)
    batch = 50_000
    bits = EngineCaps.rocksdb_bloom_bits_per_key
    if "--bloom-bits" in args:
        i = args.index("--bloom-bits")
        bits = int(args[i + 1])
        del args[i : i + 2]
    options = EngineCaps(rocksdb_bloom_bits_per_key=bits).server_options()
    if "--config-file" in args:
        i = args.index("--config-file")
        options["config-file"] = args[i + 1]
        del args[i : i + 2]
    if "--batch" in args:
        i = args.index("--batch")
        batch = int(args[i + 1])
        del args[i : i + 2]
    stored = int(args[0]) if args else 0
    path = tempfile.mkdtemp(prefix="keys-lookup-")
    try:
        client = clickhouse_connect.get_client(dsn=f"chdb://{path}", chdb_options=options)
        client.command("CREATE DATABASE b")
        client.command(
            "CREATE TABLE b.keys (tenant String, event_id String, src_partition Int32, src_offset Int64, "
            "ingested_at DateTime64(3, 'UTC')) ENGINE = EmbeddedRocksDB PRIMARY KEY (tenant, event_id)"
        )
        client.command(
            "CREATE TABLE b.k1 (k String, src_partition Int32, src_offset Int64, "
            "ingested_at DateTime64(3, 'UTC')) ENGINE = EmbeddedRocksDB PRIMARY KEY k"
        )
        client.command(
            "CREATE TABLE b.rows (ok UInt8, msg UInt32, pos UInt32, tenant String, event_id String, "
            "src_partition Int32, src_offset Int64) ENGINE = Memory"
        )
        t0 = time.perf_counter()
        for start in range(0, stored, 50_000):
            n = min(50_000, stored - start)
            client.command(
                "INSERT INTO b.keys SELECT concat('tenant-', toString(number % 20)), toString(generateUUIDv4()), "
                f"0, {start} + number, now64(3) FROM numbers({n})"
            )
        client.command(f"INSERT INTO b.k1 SELECT {key_of()}, 0, src_offset, ingested_at FROM b.keys")
        client.command(
            "INSERT INTO b.rows SELECT 1, intDiv(number, 500), number % 500, concat('tenant-', toString(number % 20)), "
            f"toString(generateUUIDv4()), 0, number FROM numbers({batch})"
        )
        client.command(
            "INSERT INTO b.keys SELECT tenant, event_id, 0, 0, now64(3) FROM b.rows WHERE pos % 5 = 0"
        )
        client.command(f"INSERT INTO b.k1 SELECT {key_of()}, 0, 0, now64(3) FROM b.rows WHERE pos % 5 = 0")
        print(
            f"{stored:,} keys stored in {time.perf_counter() - t0:.1f} s; a batch of {batch:,}, a fifth stored"
        )
        for name, sql in FORMS.items():
            client.query(sql)  # warm: the first run pays the tables' opening
            cpu, wall, found = [], [], None
            for _ in range(5):
                c0, w0 = _cpu(), time.perf_counter()
                found = client.query(sql).result_rows[0][0]
                cpu.append(_cpu() - c0)
                wall.append(time.perf_counter() - w0)
            print(
                f"  {name:36s} CPU {statistics.median(cpu) * 1e6 / batch:6.2f} µs/key, "
                f"wall {statistics.median(wall) * 1e6 / batch:6.2f} µs/key; found {found:,}"
            )
        client.close()
    finally:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
