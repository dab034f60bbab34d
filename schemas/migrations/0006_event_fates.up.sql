-- What became of events that were not counted (issue 10; docs/tables.md, "rejections" and
-- "event_duplicates"). Both tables are written exactly once per source position, whatever
-- crashed: the ORDER BY key is the event's deterministic position (Kafka lane, offset and
-- index in the message; or the ingest's request and index), so a batch re-processed after a
-- crash writes rows with the same key, which ReplacingMergeTree collapses (read them with
-- FINAL) and which an insert deduplication token usually drops at once.
--
-- rejections: every event the HTTP ingest refused (origin 'ingest') or the aggregator
-- dead-lettered (origin 'aggregator'), with the code and message, and the bytes it arrived as.
-- src_partition is the lane, as in events_raw (a control-topic partition p is -1 - p).
CREATE TABLE IF NOT EXISTS {db}.rejections {on_cluster}
(
    tenant        LowCardinality(String),
    event_id      String,
    type          LowCardinality(String),
    code          LowCardinality(String),
    message       String,
    origin        LowCardinality(String),
    src_partition Int32,
    src_offset    Int64,
    src_index     Int32,
    request_id    String,
    key_id        String,
    received_at   DateTime64(3, 'UTC'),
    rejected_at   DateTime64(3, 'UTC'),
    original      String CODEC(ZSTD(3)),
    INDEX idx_event_id event_id TYPE bloom_filter(0.01) GRANULARITY 1
)
ENGINE = {{engine:ReplacingMergeTree}}
PARTITION BY toYYYYMM(received_at)
ORDER BY (tenant, origin, request_id, src_partition, src_offset, src_index)
SETTINGS non_replicated_deduplication_window = 1000;

-- event_duplicates: every later copy of an already counted (tenant, id) that the aggregator
-- dropped; nth tells apart copies of one id inside one Kafka message.
CREATE TABLE IF NOT EXISTS {db}.event_duplicates {on_cluster}
(
    tenant        LowCardinality(String),
    event_id      String,
    src_partition Int32,
    src_offset    Int64,
    nth           UInt32,
    received_at   DateTime64(3, 'UTC'),
    dropped_at    DateTime64(3, 'UTC')
)
ENGINE = {{engine:ReplacingMergeTree}}
PARTITION BY toYYYYMM(received_at)
ORDER BY (tenant, event_id, src_partition, src_offset, nth)
SETTINGS non_replicated_deduplication_window = 1000
