-- Period tables: one per window (15 minutes, hour, day, month, all in UTC). Each row holds every
-- aggregate of one meter for one tenant, window and group of dimensions; the meter's
-- aggregation says which column answers it. Rows are partial aggregates merged by
-- AggregatingMergeTree: read them with GROUP BY and the -Merge functions (docs/tables.md).
-- Values are Decimal128(9) so sums are exact and independent of order: a rebuild gives the
-- same numbers to the last digit.
-- src_partition/src_offset: the watermark of the last batch applied (docs/exactly-once.md).
CREATE TABLE IF NOT EXISTS {db}.usage_15m {on_cluster}
(
    tenant        LowCardinality(String),
    meter         LowCardinality(String),
    window_start  DateTime('UTC'),
    group_key     String,
    src_partition Int32,
    dims          SimpleAggregateFunction(any, Map(String, String)),
    value_sum     SimpleAggregateFunction(sum, Decimal128(9)),
    value_count   SimpleAggregateFunction(sum, UInt64),
    value_min     SimpleAggregateFunction(min, Decimal128(9)),
    value_max     SimpleAggregateFunction(max, Decimal128(9)),
    value_latest  AggregateFunction(argMax, Decimal128(9), Tuple(DateTime64(3, 'UTC'), Int64)),
    value_unique  AggregateFunction(uniqExact, String),
    src_offset    SimpleAggregateFunction(max, Int64),
    PROJECTION p_watermark (SELECT src_partition, max(src_offset) GROUP BY src_partition)
)
ENGINE = {{engine:AggregatingMergeTree}}
ORDER BY (tenant, meter, window_start, group_key, src_partition)
SETTINGS deduplicate_merge_projection_mode = 'rebuild', non_replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS {db}.usage_1h {on_cluster} AS {db}.usage_15m
ENGINE = {{engine:AggregatingMergeTree}}
ORDER BY (tenant, meter, window_start, group_key, src_partition)
SETTINGS deduplicate_merge_projection_mode = 'rebuild', non_replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS {db}.usage_1d {on_cluster} AS {db}.usage_15m
ENGINE = {{engine:AggregatingMergeTree}}
ORDER BY (tenant, meter, window_start, group_key, src_partition)
SETTINGS deduplicate_merge_projection_mode = 'rebuild', non_replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS {db}.usage_1mo {on_cluster} AS {db}.usage_15m
ENGINE = {{engine:AggregatingMergeTree}}
ORDER BY (tenant, meter, window_start, group_key, src_partition)
SETTINGS deduplicate_merge_projection_mode = 'rebuild', non_replicated_deduplication_window = 1000;

-- Gauge integrals (INTEGRAL meters) per 15 minutes and series (the event subject). A late or
-- new sample changes how long its neighbour held, so the touched windows of a series are
-- recomputed from raw samples and replace the old rows: read with FINAL. Hours, days and
-- months are sums of these rows.
CREATE TABLE IF NOT EXISTS {db}.gauge_15m {on_cluster}
(
    tenant        LowCardinality(String),
    meter         LowCardinality(String),
    window_start  DateTime('UTC'),
    group_key     String,
    series        String,
    dims          Map(String, String),
    integral      Decimal128(9),
    samples       UInt64,
    src_partition Int32,
    src_offset    Int64,
    version       UInt64
)
ENGINE = {{engine:ReplacingMergeTree(version)}}
ORDER BY (tenant, meter, window_start, group_key, series)
