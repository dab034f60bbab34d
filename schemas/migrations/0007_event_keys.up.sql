-- event_keys: the key (tenant, event_id) of every row of events_raw, in RocksDB (issue 11, item 1;
-- docs/exactly-once.md, "Deduplication"). The aggregator's dedupe looks a batch's keys up here with
-- `(tenant, event_id) IN (...)`: point gets on the primary key (RocksDB's own Bloom filters answer
-- a new key without reading a block), not a scan, so a lookup costs about the same whatever the
-- table's size (docs/performance.md). The key is the pair itself: exact, and a tenant's key never
-- matches another tenant's event with the same id. An insert of a key already there overwrites it
-- (an upsert): inserting the same rows again changes nothing.
-- No TTL: the dedupe is against every stored event (the backfill path too), so every key stays.
-- Invariant "keys within raw": a batch's keys are inserted right after its raw insert, from the
-- same rows, then event_key_watermarks moves to the batch's last offset of each partition; a
-- crash before that leaves the watermark behind events_raw's, and the next batch of the partition
-- inserts the keys of the raw rows above it before its lookup.
-- On a cluster ({on_cluster}) the engine is ReplicatedReplacingMergeTree with the same primary
-- key (schemas/migrate.py): a RocksDB table is not replicated (each replica would hold only the
-- keys inserted through it, and a lookup through another replica would miss them).
CREATE TABLE IF NOT EXISTS {db}.event_keys {on_cluster}
(
    tenant        String,
    event_id      String,
    src_partition Int32,
    src_offset    Int64,
    ingested_at   DateTime64(3, 'UTC')
)
ENGINE = {{engine:EmbeddedRocksDB}}
PRIMARY KEY (tenant, event_id);

-- Up to which offset of each partition event_keys holds every raw row's key (a scan of event_keys
-- for its max(src_offset) would read every key: RocksDB has no index but the primary key).
CREATE TABLE IF NOT EXISTS {db}.event_key_watermarks {on_cluster}
(
    src_partition Int32,
    src_offset    Int64
)
ENGINE = {{engine:EmbeddedRocksDB}}
PRIMARY KEY src_partition;

-- The keys of an existing deployment, from events_raw; then the watermarks (after the keys: a
-- migration interrupted between the two and run again inserts the same keys again, an upsert).
-- Run it with the aggregators stopped.
INSERT INTO {db}.event_keys (tenant, event_id, src_partition, src_offset, ingested_at)
SELECT tenant, event_id, src_partition, src_offset, ingested_at
FROM {db}.events_raw;

INSERT INTO {db}.event_key_watermarks (src_partition, src_offset)
SELECT src_partition, max(src_offset)
FROM {db}.events_raw
GROUP BY src_partition
