-- Current state of every entity named by lifecycle events (workspaces, contracts, members,
-- virtual keys, agents, workstations, datastreams, API keys, access tokens). Each row is the
-- fold of all lifecycle events of one entity in event-time order, recomputed from events_raw
-- whenever one of them arrives, so it is replayable. Read with FINAL.
CREATE TABLE IF NOT EXISTS {db}.entities {on_cluster}
(
    tenant        LowCardinality(String),
    kind          LowCardinality(String),
    entity_id     String,
    workspace_id  String,
    parent_id     String,
    contract_id   String,
    name          String,
    email         String,
    tier          LowCardinality(String),
    status        LowCardinality(String),
    secret_hash   String,
    expires_at    Nullable(DateTime64(3, 'UTC')),
    attrs         String,
    created_at    DateTime64(3, 'UTC'),
    updated_at    DateTime64(3, 'UTC'),
    src_partition Int32,
    src_offset    Int64,
    version       UInt64,
    INDEX idx_secret secret_hash TYPE bloom_filter(0.01) GRANULARITY 1
)
ENGINE = {{engine:ReplacingMergeTree(version)}}
ORDER BY (tenant, kind, entity_id);

-- When each tenant's tables were last refreshed by the aggregator (reported by the APIs).
CREATE TABLE IF NOT EXISTS {db}.tenant_freshness {on_cluster}
(
    tenant       LowCardinality(String),
    refreshed_at DateTime64(3, 'UTC'),
    last_event_time DateTime64(3, 'UTC')
)
ENGINE = {{engine:ReplacingMergeTree(refreshed_at)}}
ORDER BY tenant
