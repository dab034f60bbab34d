-- The raw event table: one row per deduplicated event. A public interface for analysts
-- (docs/tables.md). Every row remembers the Kafka partition and offset it came from; the
-- aggregator reads max(src_offset) per partition back as its watermark (docs/exactly-once.md).
-- Partitioned by the month of ingestion: one batch is written with one ingested_at, so one
-- INSERT is one part, which ClickHouse commits atomically.
CREATE TABLE IF NOT EXISTS {db}.events_raw {on_cluster}
(
    tenant        LowCardinality(String),
    event_id      String,
    type          LowCardinality(String),
    source        String,
    subject       String,
    time          DateTime64(3, 'UTC'),
    data          String CODEC(ZSTD(3)),
    src_partition Int32,
    src_offset    Int64,
    ingested_at   DateTime64(3, 'UTC'),
    INDEX idx_event_id event_id TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_src_offset src_offset TYPE minmax GRANULARITY 1,
    PROJECTION p_watermark (SELECT src_partition, max(src_offset) GROUP BY src_partition)
)
ENGINE = {{engine:MergeTree}}
PARTITION BY toYYYYMM(ingested_at)
ORDER BY (tenant, type, subject, time)
SETTINGS non_replicated_deduplication_window = 1000
