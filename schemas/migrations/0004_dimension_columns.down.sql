ALTER TABLE {db}.usage_15m {on_cluster}
    DROP COLUMN IF EXISTS workspace_id,
    DROP COLUMN IF EXISTS contract_id,
    DROP COLUMN IF EXISTS workstation_id,
    DROP COLUMN IF EXISTS datastream_id;

ALTER TABLE {db}.usage_1h {on_cluster}
    DROP COLUMN IF EXISTS workspace_id,
    DROP COLUMN IF EXISTS contract_id,
    DROP COLUMN IF EXISTS workstation_id,
    DROP COLUMN IF EXISTS datastream_id;

ALTER TABLE {db}.usage_1d {on_cluster}
    DROP COLUMN IF EXISTS workspace_id,
    DROP COLUMN IF EXISTS contract_id,
    DROP COLUMN IF EXISTS workstation_id,
    DROP COLUMN IF EXISTS datastream_id;

ALTER TABLE {db}.usage_1mo {on_cluster}
    DROP COLUMN IF EXISTS workspace_id,
    DROP COLUMN IF EXISTS contract_id,
    DROP COLUMN IF EXISTS workstation_id,
    DROP COLUMN IF EXISTS datastream_id;

ALTER TABLE {db}.gauge_15m {on_cluster}
    DROP COLUMN IF EXISTS workspace_id,
    DROP COLUMN IF EXISTS contract_id,
    DROP COLUMN IF EXISTS workstation_id
