-- event_keys keyed by one string (issue 11, item 1; docs/performance.md, "Where the lookup's time
-- goes"): the engine reads a RocksDB table by a join (join_algorithm = 'direct', a multi-get per
-- block, 2.3 us per key against 5.1 for the IN look-up on the (tenant, event_id) pair) only on a
-- single scalar key column. The key is the tenant's length in bytes, a colon, the tenant and the
-- event id (aggregators/stage.py, key_of: the same expression): injective, so a key of one tenant
-- never matches another tenant's event. tenant, event_id and the source position stay columns
-- of their own (a replay deletes keys by them; analysts read them).
-- The table is dropped and made again, then filled from events_raw (the keys of every raw row:
-- never ahead of raw, and at least up to event_key_watermarks, which stays as it is). Each
-- statement can be run again: a migration interrupted anywhere and re-run ends the same. Run it
-- with the aggregators stopped (between the drop and the fill a batch would find no key).
-- On a cluster ({on_cluster}) the engine is ReplicatedReplacingMergeTree with the same primary
-- key (schemas/migrate.py), looked up with key IN (...) (no direct join there).
DROP TABLE IF EXISTS {db}.event_keys {on_cluster} SYNC;

CREATE TABLE IF NOT EXISTS {db}.event_keys {on_cluster}
(
    key           String,
    tenant        String,
    event_id      String,
    src_partition Int32,
    src_offset    Int64,
    ingested_at   DateTime64(3, 'UTC')
)
ENGINE = {{engine:EmbeddedRocksDB}}
PRIMARY KEY key;

INSERT INTO {db}.event_keys (key, tenant, event_id, src_partition, src_offset, ingested_at)
SELECT concat(toString(length(tenant)), ':', tenant, event_id), tenant, event_id, src_partition, src_offset, ingested_at
FROM {db}.events_raw
