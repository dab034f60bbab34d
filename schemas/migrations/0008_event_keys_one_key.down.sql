-- Back to event_keys keyed by the (tenant, event_id) pair (migration 0007's table), filled
-- again from events_raw; event_key_watermarks stays as it is.
DROP TABLE IF EXISTS {db}.event_keys {on_cluster} SYNC;

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

INSERT INTO {db}.event_keys (tenant, event_id, src_partition, src_offset, ingested_at)
SELECT tenant, event_id, src_partition, src_offset, ingested_at
FROM {db}.events_raw
