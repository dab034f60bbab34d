"""Dedupe against a large raw table (issue 11, item 1): what finding a batch's new events costs
when ``events_raw`` already holds 10M or 100M events spread over 35 days.

    PYTHONPATH=. .venv/bin/python -m bench.dedupe [STORED ...] [--batch EVENTS] [--runs N]
        [--structures | --keys-only GRANULARITY:BLOCK] [--bloom-bits N]

For each size (default 0, 10,000,000 and 100,000,000), a fresh database of the embedded engine
is filled with STORED events of the same 20 tenants as the batches (ids of their own, times over
the last 35 days, the partitions and offsets a log would give them), merged as the engine would
merge them at rest (OPTIMIZE … FINAL). Then, alternately, N batches of EVENTS new events
(``BatchProcessor.process``, what the aggregator does with a Kafka batch) and the same batch sent
again (every event a duplicate: a producer's retry storm), and one batch whose events are copies
of events stored 30 days ago (a replayed month). Printed per size: the dedupe stage's wall µs per
event (the anti-join: ``stage.new_insert``, and the rollup stage filled from the new rows), the
process's CPU µs per event over the whole batch, and a check that each batch was counted exactly
(new: all written; duplicates: none written, all recorded as copies).

``--structures``: the lookup statement alone, today's anti-join against events_raw beside a
key-only table ordered by a hash of (tenant, event_id) (default and small compressed blocks) and
an EmbeddedRocksDB table keyed by tenant and id, on the same stored events, for a batch of new
ids and a batch of ids stored anywhere in the 35 days (``_structures``).

``--keys-only 256:4096``: the lookup alone on a MergeTree key-only table ordered by a hash (what
event_keys was before it moved to RocksDB; no events_raw), its index granularity and compressed
block size as given (``d``: the engine's default), ``_keys_only``.

``--bloom-bits N``: the engine's RocksDB Bloom filter, bits per key (default the product's,
``EngineCaps``; 0: none, as before it was configured).

The whole-batch run fills event_keys as migrations 0007 and 0008 do (the keys, their watermarks) and
compacts RocksDB as at rest; it prints the keys insert alone (``keys_insert_new_us_per_event``)
and the backfill's seconds (``keys_fill_s``).
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from aggregators.direct import make_processor, pack
from aggregators.stage import KEY_COLUMNS, key_of
from bench.batch import _events
from schemas.clickhouse import EngineCaps, connect
from schemas.migrate import migrate

_CHUNK = 10_000_000  # rows per filling statement: bounded memory


def _fill(client: Any, db: str, tenants: list[str], stored: int, partitions: int) -> tuple[float, float]:
    """``stored`` events of ``tenants`` into events_raw, as the log would have given them, and
    their keys; the seconds it took, and the seconds of the keys (the migrations' backfill)."""
    started = time.perf_counter()
    tlist = "[" + ",".join(f"'{t}'" for t in tenants) + "]"
    span_ms = 35 * 86_400_000
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    for lo in range(0, stored, _CHUNK):
        n = min(_CHUNK, stored - lo)
        client.command(
            f"""
INSERT INTO {db}.events_raw
    (tenant, event_id, type, source, subject, time, data, src_partition, src_offset, ingested_at)
SELECT
    {tlist}[1 + (number % {len(tenants)})],
    concat('stored-', toString(number)),
    'egress.bytes',
    'bench',
    concat('svc-', toString(number % 50)),
    fromUnixTimestamp64Milli(toInt64({now_ms} - {span_ms} + intDiv(number * {span_ms}, {stored}))),
    concat('{{"bytes":', toString(number % 100000), '}}'),
    toInt32(number % {partitions}),
    toInt64(intDiv(number, {partitions})),
    fromUnixTimestamp64Milli(toInt64({now_ms} - {span_ms} + intDiv(number * {span_ms}, {stored})))
FROM numbers({lo}, {n})
"""
        )
    client.command(f"OPTIMIZE TABLE {db}.events_raw FINAL")
    # their keys and watermarks, as migrations 0007 and 0008 fill them for an existing deployment
    keys_started = time.perf_counter()
    client.command(
        f"INSERT INTO {db}.event_keys ({KEY_COLUMNS}) "
        f"SELECT {key_of()}, tenant, event_id, src_partition, src_offset, ingested_at FROM {db}.events_raw"
    )
    client.command(
        f"INSERT INTO {db}.event_key_watermarks (src_partition, src_offset) "
        f"SELECT src_partition, max(src_offset) FROM {db}.events_raw GROUP BY src_partition"
    )
    # RocksDB compacted as at rest (OPTIMIZE: a full compaction), like events_raw's OPTIMIZE FINAL;
    # else its background compaction of the fill runs during the batches, on the process's CPU
    client.command(f"OPTIMIZE TABLE {db}.event_keys")
    return time.perf_counter() - started, time.perf_counter() - keys_started


def _run(path: str, stored: int, batch: int, runs: int) -> dict[str, Any]:
    db = f"dd_{uuid.uuid4().hex[:8]}"  # one engine per process: a database per size
    client = connect(f"chdb://{path}", db)
    try:
        migrate(client, db)
        events = _events(batch * (runs + 1))
        tenants = sorted({e["tenant"] for e in events})
        partitions = 8
        fill_s, keys_fill_s = _fill(client, db, tenants, stored, partitions) if stored else (0.0, 0.0)
        proc = make_processor(client, db)
        keys_s = [0.0]  # the keys insert alone (writer.insert_keys: the keys, then the watermarks)
        insert_keys = proc.writer.insert_keys

        def timed_insert_keys(now: datetime) -> None:
            t0 = time.perf_counter()
            insert_keys(now)
            keys_s[0] += time.perf_counter() - t0

        proc.writer.insert_keys = timed_insert_keys  # type: ignore[method-assign,assignment]
        offset = stored // partitions + 1  # above every stored offset: nothing skipped as applied
        new_us, dup_us, cpu_new, cpu_dup, insert_us, keys_us = [], [], [], [], [], []
        exact = True
        for r in range(runs):
            evs = events[r * batch : (r + 1) * batch]
            for phase in ("new", "duplicates"):
                msgs = pack(evs, 0, offset)
                offset += len(msgs)
                before = proc.timings["dedupe_stage"]
                raw_before = proc.timings["raw_insert"]
                keys_before = keys_s[0]
                cpu0 = time.process_time()
                stats = proc.process(msgs)
                cpu = (time.process_time() - cpu0) * 1e6 / len(evs)
                stage = (proc.timings["dedupe_stage"] - before) * 1e6 / len(evs)
                if phase == "new":
                    # the raw insert and, since event_keys, the keys insert after it
                    insert_us.append((proc.timings["raw_insert"] - raw_before) * 1e6 / len(evs))
                    keys_us.append((keys_s[0] - keys_before) * 1e6 / len(evs))
                    new_us.append(stage)
                    cpu_new.append(cpu)
                    exact &= stats.written == len(evs)
                else:
                    dup_us.append(stage)
                    cpu_dup.append(cpu)
                    exact &= stats.written == 0 and stats.duplicates == len(evs)
                if not exact:
                    print(phase, stats, file=sys.stderr)
        # a replayed month: copies of events stored 30 days ago (ids the batch cannot know)
        replay_us = None
        if stored:
            rows = client.query(
                f"SELECT tenant, event_id, time FROM {db}.events_raw "
                f"WHERE time < now64(3) - INTERVAL 29 DAY ORDER BY time DESC LIMIT {batch}"
            ).result_rows
            old = events[runs * batch : runs * batch + len(rows)]
            replayed = [
                {
                    **e,
                    "tenant": t,
                    "id": i,
                    "time": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z",
                }
                for e, (t, i, ts) in zip(old, rows, strict=True)
            ]
            msgs = pack(replayed, 1, offset)
            before = proc.timings["dedupe_stage"]
            stats = proc.process(msgs)
            replay_us = (proc.timings["dedupe_stage"] - before) * 1e6 / len(replayed)
            exact &= stats.written == 0 and stats.duplicates == len(replayed)
            if not exact:
                print("replayed month:", stats, file=sys.stderr)
        proc.close()
        return {
            "stored": stored,
            "fill_s": round(fill_s, 1),
            "keys_fill_s": round(keys_fill_s, 1),
            "dedupe_new_us_per_event": round(statistics.median(new_us), 2),
            "dedupe_duplicates_us_per_event": round(statistics.median(dup_us), 2),
            "dedupe_replayed_month_us_per_event": None if replay_us is None else round(replay_us, 2),
            "raw_and_keys_insert_new_us_per_event": round(statistics.median(insert_us), 2),
            "keys_insert_new_us_per_event": round(statistics.median(keys_us), 2),
            "cpu_new_us_per_event": round(statistics.median(cpu_new), 2),
            "cpu_duplicates_us_per_event": round(statistics.median(cpu_dup), 2),
            "exact": exact,
        }
    finally:
        client.command(f"DROP DATABASE IF EXISTS {db} SYNC")


def main(argv: list[str]) -> None:
    args = list(argv)
    batch, runs = 20_000, 3
    if "--batch" in args:
        i = args.index("--batch")
        batch = int(args[i + 1])
        del args[i : i + 2]
    if "--runs" in args:
        i = args.index("--runs")
        runs = int(args[i + 1])
        del args[i : i + 2]
    structures = "--structures" in args
    if structures:
        args.remove("--structures")
    keys_only = None
    if "--keys-only" in args:
        i = args.index("--keys-only")
        keys_only = args[i + 1]
        del args[i : i + 2]
    bits = EngineCaps.rocksdb_bloom_bits_per_key
    if "--bloom-bits" in args:
        i = args.index("--bloom-bits")
        bits = int(args[i + 1])
        del args[i : i + 2]
    sizes = [int(a) for a in args] or [0, 10_000_000, 100_000_000]
    path = tempfile.mkdtemp(prefix="bench-dedupe-")
    try:
        # the first chdb connection of the process starts the engine, with these options; the
        # runs' connections below share it
        connect(f"chdb://{path}", "default", engine=EngineCaps(rocksdb_bloom_bits_per_key=bits))
        for stored in sizes:
            if keys_only:
                print(_keys_only(path, stored, batch, runs, keys_only), flush=True)
            elif structures:
                print(_structures(path, stored, batch, runs), flush=True)
            else:
                print(_run(path, stored, batch, runs), flush=True)
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ---- which structure finds a batch's copies cheapest (``--structures``) -----------------------


def _structures(path: str, stored: int, batch: int, runs: int) -> dict[str, Any]:
    """The lookup alone, on the same stored events: the anti-join the aggregator runs today
    (events_raw, its tenant prefix and Bloom-filter index on event_id) against a key-only table
    ordered by a 64-bit hash of (tenant, event_id) with small granules (a batch reads at most one
    granule per key, whatever the size; matches checked on the key itself, so exact)."""
    db = f"ds_{uuid.uuid4().hex[:8]}"
    client = connect(f"chdb://{path}", db)
    try:
        migrate(client, db)
        events = _events(1000)
        tenants = sorted({e["tenant"] for e in events})
        fill_s, _ = _fill(client, db, tenants, stored, 8)
        started = time.perf_counter()
        client.command(
            f"CREATE TABLE {db}.event_keys_s (h UInt64, tenant LowCardinality(String), event_id String) "
            "ENGINE = MergeTree ORDER BY h SETTINGS index_granularity = 256"
        )
        client.command(
            f"INSERT INTO {db}.event_keys_s SELECT sipHash64(tenant, event_id), tenant, event_id FROM {db}.events_raw"
        )
        client.command(f"OPTIMIZE TABLE {db}.event_keys_s FINAL")
        keys_s = time.perf_counter() - started
        # the same keys in small compressed blocks, and in RocksDB (point gets, Bloom filters)
        client.command(
            f"CREATE TABLE {db}.event_keys_small (h UInt64, tenant LowCardinality(String), event_id String) "
            "ENGINE = MergeTree ORDER BY h SETTINGS index_granularity = 256, "
            "min_compress_block_size = 1024, max_compress_block_size = 4096"
        )
        client.command(f"INSERT INTO {db}.event_keys_small SELECT * FROM {db}.event_keys_s")
        client.command(f"OPTIMIZE TABLE {db}.event_keys_small FINAL")
        client.command(f"CREATE TABLE {db}.event_keys_kv (k String) ENGINE = EmbeddedRocksDB PRIMARY KEY k")
        client.command(
            f"INSERT INTO {db}.event_keys_kv SELECT concat(tenant, char(0), event_id) FROM {db}.events_raw"
        )
        client.command(f"CREATE TABLE {db}.b (tenant String, event_id String) ENGINE = Memory")
        raw = f"{db}.events_raw"
        queries = {
            "anti_join_raw": (
                f"SELECT count() FROM {db}.b WHERE (tenant, event_id) IN (SELECT tenant, event_id FROM {raw} "
                f"WHERE tenant IN (SELECT DISTINCT tenant FROM {db}.b) AND event_id IN (SELECT event_id FROM {db}.b))"
            ),
            "hash_keys": (
                f"SELECT count() FROM {db}.b WHERE (tenant, event_id) IN (SELECT tenant, event_id FROM "
                f"{db}.event_keys_s WHERE h IN (SELECT sipHash64(tenant, event_id) FROM {db}.b))"
            ),
            "hash_keys_small_blocks": (
                f"SELECT count() FROM {db}.b WHERE (tenant, event_id) IN (SELECT tenant, event_id FROM "
                f"{db}.event_keys_small WHERE h IN (SELECT sipHash64(tenant, event_id) FROM {db}.b))"
            ),
            "rocksdb": (
                f"SELECT count() FROM {db}.b WHERE concat(tenant, char(0), event_id) IN (SELECT k FROM "
                f"{db}.event_keys_kv WHERE k IN (SELECT concat(tenant, char(0), event_id) FROM {db}.b))"
            ),
        }
        out: dict[str, Any] = {"stored": stored, "fill_s": round(fill_s, 1), "keys_fill_s": round(keys_s, 1)}
        for kind in ("new", "copies"):
            for name, sql in queries.items():
                walls, cpus = [], []
                for r in range(runs):
                    client.command(f"TRUNCATE TABLE {db}.b")
                    if kind == "new":
                        client.command(
                            f"INSERT INTO {db}.b SELECT {_tenant_of(tenants)}, toString(generateUUIDv4()) "
                            f"FROM numbers({batch})"
                        )
                    else:  # ids stored anywhere in the 35 days
                        client.command(
                            f"INSERT INTO {db}.b SELECT {_tenant_of(tenants, 'k')}, concat('stored-', toString(k)) "
                            f"FROM (SELECT (cityHash64(number, {r}) % {stored}) AS k FROM numbers({batch}))"
                        )
                    cpu0, wall0 = time.process_time(), time.perf_counter()
                    found = int(client.command(sql))
                    walls.append((time.perf_counter() - wall0) * 1e6 / batch)
                    cpus.append((time.process_time() - cpu0) * 1e6 / batch)
                    assert found == (0 if kind == "new" else batch), (name, kind, found)
                out[f"{name}_{kind}_wall_us"] = round(statistics.median(walls), 2)
                out[f"{name}_{kind}_cpu_us"] = round(statistics.median(cpus), 2)
        return out
    finally:
        client.command(f"DROP DATABASE IF EXISTS {db} SYNC")


def _keys_only(path: str, stored: int, batch: int, runs: int, variant: str) -> dict[str, Any]:
    """The event_keys lookup alone on a key-only table of ``stored`` keys (no events_raw: a
    fill several times cheaper), ``variant`` = "GRANULARITY:BLOCK" (index_granularity, and the
    compressed block size in bytes, "d" for the engine's default): what the granules and the
    compressed blocks cost a batch of new ids and a batch of stored ids (``--keys-only``)."""
    db = f"dk_{uuid.uuid4().hex[:8]}"
    client = connect(f"chdb://{path}", db)
    gran, block = variant.split(":")
    extra = (
        f", min_compress_block_size = {int(block)}, max_compress_block_size = {int(block)}"
        if block != "d"
        else ""
    )
    tl = "[" + ",".join(f"'tenant-{i}'" for i in range(20)) + "]"
    try:
        started = time.perf_counter()
        client.command(
            f"CREATE TABLE {db}.k (h UInt64, tenant LowCardinality(String), event_id String, src_partition Int32, "
            "src_offset Int64, ingested_at DateTime64(3, 'UTC')) ENGINE = MergeTree PARTITION BY toYYYYMM(ingested_at) "
            f"ORDER BY h SETTINGS index_granularity = {int(gran)}{extra}"
        )
        span_ms = 35 * 86_400_000
        now_ms = int(datetime.now(UTC).timestamp() * 1000)
        for lo in range(0, stored, _CHUNK):
            n = min(_CHUNK, stored - lo)
            client.command(
                f"INSERT INTO {db}.k SELECT sipHash64(t, e), t, e, toInt32(number % 8), toInt64(intDiv(number, 8)), "
                f"fromUnixTimestamp64Milli(toInt64({now_ms} - {span_ms} + intDiv(number * {span_ms}, {stored}))) "
                f"FROM (SELECT number, {tl}[1 + number % 20] AS t, concat('stored-', toString(number)) AS e "
                f"FROM numbers({lo}, {n}))"
            )
        client.command(f"OPTIMIZE TABLE {db}.k FINAL")
        out: dict[str, Any] = {
            "stored": stored,
            "variant": variant,
            "fill_s": round(time.perf_counter() - started, 1),
        }
        client.command(f"CREATE TABLE {db}.b (tenant String, event_id String, ok UInt8) ENGINE = Memory")
        sql = (
            f"SELECT count() FROM {db}.b WHERE ok AND (tenant, event_id) IN (SELECT tenant, event_id FROM {db}.k "
            f"WHERE h IN (SELECT sipHash64(tenant, event_id) FROM {db}.b WHERE ok))"
        )
        for kind in ("new", "copies"):
            walls, cpus = [], []
            for r in range(runs):
                client.command(f"TRUNCATE TABLE {db}.b")
                if kind == "new":
                    client.command(
                        f"INSERT INTO {db}.b SELECT {tl}[1 + number % 20], toString(generateUUIDv4()), 1 "
                        f"FROM numbers({batch})"
                    )
                else:
                    client.command(
                        f"INSERT INTO {db}.b SELECT {tl}[1 + k % 20], concat('stored-', toString(k)), 1 "
                        f"FROM (SELECT cityHash64(number, {r}) % {stored} AS k FROM numbers({batch}))"
                    )
                cpu0, wall0 = time.process_time(), time.perf_counter()
                found = int(str(client.command(sql)))
                walls.append((time.perf_counter() - wall0) * 1e6 / batch)
                cpus.append((time.process_time() - cpu0) * 1e6 / batch)
                assert found == (0 if kind == "new" else batch), (kind, found)
            out[f"{kind}_wall_us"] = round(statistics.median(walls), 2)
            out[f"{kind}_cpu_us"] = round(statistics.median(cpus), 2)
        return out
    finally:
        client.command(f"DROP DATABASE IF EXISTS {db} SYNC")


def _tenant_of(tenants: list[str], n: str = "number") -> str:
    """The tenant ``_fill`` gave the stored event numbered ``n``."""
    return "[" + ",".join(f"'{t}'" for t in tenants) + f"][1 + ({n} % {len(tenants)})]"


if __name__ == "__main__":
    main(sys.argv[1:])
