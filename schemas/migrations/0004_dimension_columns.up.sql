-- The dimensions the query API filters on, as columns of their own (docs/tables.md): a
-- LowCardinality column is read and compared far faster than a key of the dims Map, which every
-- filter otherwise decodes row by row. MATERIALIZED from dims, so the writer is unchanged (it
-- names its columns; SELECT * does not show these) and every row, old or new, agrees with dims:
-- '' where the meter has no such dimension. Existing parts are filled by MATERIALIZE COLUMN
-- (until then, reads compute them from dims). In AggregatingMergeTree a plain column keeps one
-- row's value on merge: all rows of a group_key have the same dims, so the same values.
ALTER TABLE {db}.usage_15m {on_cluster}
    ADD COLUMN IF NOT EXISTS workspace_id LowCardinality(String) MATERIALIZED dims['workspace_id'],
    ADD COLUMN IF NOT EXISTS contract_id LowCardinality(String) MATERIALIZED dims['contract_id'],
    ADD COLUMN IF NOT EXISTS workstation_id LowCardinality(String) MATERIALIZED dims['workstation_id'],
    ADD COLUMN IF NOT EXISTS datastream_id LowCardinality(String) MATERIALIZED dims['datastream_id'];

ALTER TABLE {db}.usage_15m {on_cluster}
    MATERIALIZE COLUMN workspace_id,
    MATERIALIZE COLUMN contract_id,
    MATERIALIZE COLUMN workstation_id,
    MATERIALIZE COLUMN datastream_id;

ALTER TABLE {db}.usage_1h {on_cluster}
    ADD COLUMN IF NOT EXISTS workspace_id LowCardinality(String) MATERIALIZED dims['workspace_id'],
    ADD COLUMN IF NOT EXISTS contract_id LowCardinality(String) MATERIALIZED dims['contract_id'],
    ADD COLUMN IF NOT EXISTS workstation_id LowCardinality(String) MATERIALIZED dims['workstation_id'],
    ADD COLUMN IF NOT EXISTS datastream_id LowCardinality(String) MATERIALIZED dims['datastream_id'];

ALTER TABLE {db}.usage_1h {on_cluster}
    MATERIALIZE COLUMN workspace_id,
    MATERIALIZE COLUMN contract_id,
    MATERIALIZE COLUMN workstation_id,
    MATERIALIZE COLUMN datastream_id;

ALTER TABLE {db}.usage_1d {on_cluster}
    ADD COLUMN IF NOT EXISTS workspace_id LowCardinality(String) MATERIALIZED dims['workspace_id'],
    ADD COLUMN IF NOT EXISTS contract_id LowCardinality(String) MATERIALIZED dims['contract_id'],
    ADD COLUMN IF NOT EXISTS workstation_id LowCardinality(String) MATERIALIZED dims['workstation_id'],
    ADD COLUMN IF NOT EXISTS datastream_id LowCardinality(String) MATERIALIZED dims['datastream_id'];

ALTER TABLE {db}.usage_1d {on_cluster}
    MATERIALIZE COLUMN workspace_id,
    MATERIALIZE COLUMN contract_id,
    MATERIALIZE COLUMN workstation_id,
    MATERIALIZE COLUMN datastream_id;

ALTER TABLE {db}.usage_1mo {on_cluster}
    ADD COLUMN IF NOT EXISTS workspace_id LowCardinality(String) MATERIALIZED dims['workspace_id'],
    ADD COLUMN IF NOT EXISTS contract_id LowCardinality(String) MATERIALIZED dims['contract_id'],
    ADD COLUMN IF NOT EXISTS workstation_id LowCardinality(String) MATERIALIZED dims['workstation_id'],
    ADD COLUMN IF NOT EXISTS datastream_id LowCardinality(String) MATERIALIZED dims['datastream_id'];

ALTER TABLE {db}.usage_1mo {on_cluster}
    MATERIALIZE COLUMN workspace_id,
    MATERIALIZE COLUMN contract_id,
    MATERIALIZE COLUMN workstation_id,
    MATERIALIZE COLUMN datastream_id;

ALTER TABLE {db}.gauge_15m {on_cluster}
    ADD COLUMN IF NOT EXISTS workspace_id LowCardinality(String) MATERIALIZED dims['workspace_id'],
    ADD COLUMN IF NOT EXISTS contract_id LowCardinality(String) MATERIALIZED dims['contract_id'],
    ADD COLUMN IF NOT EXISTS workstation_id LowCardinality(String) MATERIALIZED dims['workstation_id'];

ALTER TABLE {db}.gauge_15m {on_cluster}
    MATERIALIZE COLUMN workspace_id,
    MATERIALIZE COLUMN contract_id,
    MATERIALIZE COLUMN workstation_id
