-- event_keys: the key of every row of events_raw, ordered by a 64-bit hash of it (issue 11,
-- item 1; docs/exactly-once.md, "Deduplication"). The aggregator's dedupe looks a batch's
-- (tenant, event_id) up here: a batch reads at most one small granule per key whatever the
-- table's size (events_raw's Bloom-filter index was checked granule by granule, so its cost grew
-- with the table). A hash match is checked on the key itself, so the lookup is exact.
-- Invariant "keys within raw": a batch's keys are inserted right after its raw insert, from the
-- same rows; a crash between the two leaves this table behind events_raw for a partition, and the
-- next batch of that partition inserts the missing keys from events_raw (src_offset above this
-- table's watermark, up to the raw one) before its lookup. Partitioned like events_raw (month of
-- ingestion: one batch, one part); a projection answers the watermark as events_raw's does.
-- Compressed blocks of 4 KiB (64 KiB to 1 MiB by default): a key's look-up decompresses about
-- its own granule, not a 64 KiB block around it (at 100M keys: 53 -> 32 us per new id, 176 ->
-- 101 per copy; docs/performance.md).
CREATE TABLE IF NOT EXISTS {db}.event_keys {on_cluster}
(
    h             UInt64,
    tenant        LowCardinality(String),
    event_id      String,
    src_partition Int32,
    src_offset    Int64,
    ingested_at   DateTime64(3, 'UTC'),
    PROJECTION p_watermark (SELECT src_partition, max(src_offset) GROUP BY src_partition)
)
ENGINE = {{engine:MergeTree}}
PARTITION BY toYYYYMM(ingested_at)
ORDER BY h
SETTINGS index_granularity = 256, min_compress_block_size = 4096, max_compress_block_size = 4096,
    non_replicated_deduplication_window = 1000;

-- The keys of an existing deployment, from events_raw (emptied first: a migration interrupted
-- here and run again does not leave two copies). Run it with the aggregators stopped.
TRUNCATE TABLE {db}.event_keys {on_cluster};

INSERT INTO {db}.event_keys (h, tenant, event_id, src_partition, src_offset, ingested_at)
SELECT sipHash64(tenant, event_id), tenant, event_id, src_partition, src_offset, ingested_at
FROM {db}.events_raw
