-- Analyst views (docs/tables.md, "Views"): the period tables read with the right merge function
-- for each meter, one row per (tenant, period, meter, group of dimensions), with the meter's unit.
-- `value` is exact (Decimal128(9)): SUM, INTEGRAL (from gauge_15m FINAL), COUNT, MIN, MAX, AVG
-- (sum / count), LATEST and UNIQUE_COUNT (exact over the period of the view).
-- meter_catalog is schemas/meters.yaml as rows; a test keeps the two equal
-- (tests/integration/test_analyst_views.py): a new meter comes with a migration that replaces it.
CREATE VIEW IF NOT EXISTS {db}.meter_catalog {on_cluster} AS
SELECT * FROM values(
    'meter String, event_type String, aggregation String, unit String, dimensions Array(String), description String',
    ('ci_step_cpu_seconds', 'ci.step.cpu', 'SUM', 'cpu-seconds', ['contract_id', 'workspace_id'], 'CPU consumed by CI steps (document 001 reports it x1000 as milli-CPU).'),
    ('ci_step_memory_mib_seconds', 'ci.step.memory', 'INTEGRAL', 'MiB-seconds', ['contract_id', 'workspace_id'], 'Memory held by CI steps, each sample held until the step\'s next one (max 60 s).'),
    ('workstation_cpu_seconds', 'workstation.cpu', 'SUM', 'cpu-seconds', ['workstation_id'], ''),
    ('workstation_gpu_seconds', 'workstation.gpu', 'SUM', 'gpu-seconds', ['workstation_id'], ''),
    ('workstation_memory_gb_seconds', 'workstation.memory', 'INTEGRAL', 'GB-seconds', ['workstation_id'], ''),
    ('workstation_memory_gb_max', 'workstation.memory', 'MAX', 'GB', ['workstation_id'], ''),
    ('workstation_memory_gb_min', 'workstation.memory', 'MIN', 'GB', ['workstation_id'], ''),
    ('workstation_memory_gb_avg', 'workstation.memory', 'AVG', 'GB', ['workstation_id'], ''),
    ('workstation_memory_gb_latest', 'workstation.memory', 'LATEST', 'GB', ['workstation_id'], ''),
    ('render_output_seconds', 'render.completed', 'SUM', 'seconds', ['workspace_id'], ''),
    ('ai_tasks', 'ai.task.submitted', 'COUNT', 'tasks', ['workspace_id', 'task_type'], ''),
    ('ai_task_types', 'ai.task.submitted', 'UNIQUE_COUNT', 'task types', ['workspace_id'], ''),
    ('egress_bytes', 'egress.download', 'SUM', 'bytes', ['workspace_id'], ''),
    ('datastream_total_rows', 'datastream.rows', 'SUM', 'rows', ['workspace_id', 'datastream_id'], ''),
    ('datastream_unique_rows', 'datastream.rows', 'UNIQUE_COUNT', 'rows', ['workspace_id', 'datastream_id'], ''),
    ('gateway_requests', 'gateway.request', 'COUNT', 'requests', ['workspace_id'], '')
);

-- Per hour (UTC): `hour` is the start of the hour.
CREATE VIEW IF NOT EXISTS {db}.usage_hourly {on_cluster} AS
SELECT
    p.tenant AS tenant,
    p.period AS hour,
    p.meter AS meter,
    p.workspace_id AS workspace_id,
    p.contract_id AS contract_id,
    p.workstation_id AS workstation_id,
    p.datastream_id AS datastream_id,
    CAST(p.dims, 'Map(String, String)') AS dimensions,
    multiIf(
        c.aggregation = 'SUM', p.s,
        c.aggregation = 'COUNT', toDecimal128(p.n, 9),
        c.aggregation = 'MIN', p.lo,
        c.aggregation = 'MAX', p.hi,
        c.aggregation = 'AVG', if(p.n = 0, NULL, p.s / toDecimal128(p.n, 9)),
        c.aggregation = 'LATEST', p.latest,
        c.aggregation = 'UNIQUE_COUNT', toDecimal128(p.uniq, 9),
        c.aggregation = 'INTEGRAL', p.s,
        NULL
    ) AS value,
    c.unit AS unit,
    c.aggregation AS aggregation
FROM
(
    SELECT
        tenant, window_start AS period, meter, group_key,
        any(workspace_id) AS workspace_id, any(contract_id) AS contract_id,
        any(workstation_id) AS workstation_id, any(datastream_id) AS datastream_id, any(dims) AS dims,
        sum(value_sum) AS s, sum(value_count) AS n, min(value_min) AS lo, max(value_max) AS hi,
        argMaxMerge(value_latest) AS latest, uniqExactMerge(value_unique) AS uniq
    FROM {db}.usage_1h
    GROUP BY tenant, period, meter, group_key
    UNION ALL
    SELECT
        tenant, toStartOfHour(window_start) AS period, meter, group_key,
        any(workspace_id), any(contract_id), any(workstation_id), '', any(dims),
        sum(integral), sum(samples), toDecimal128(0, 9), toDecimal128(0, 9), toDecimal128(0, 9), toUInt64(0)
    FROM {db}.gauge_15m FINAL
    GROUP BY tenant, period, meter, group_key
) AS p
LEFT JOIN {db}.meter_catalog AS c ON c.meter = p.meter;

-- Per day (UTC): `day` is a Date.
CREATE VIEW IF NOT EXISTS {db}.usage_daily {on_cluster} AS
SELECT
    p.tenant AS tenant,
    p.period AS day,
    p.meter AS meter,
    p.workspace_id AS workspace_id,
    p.contract_id AS contract_id,
    p.workstation_id AS workstation_id,
    p.datastream_id AS datastream_id,
    CAST(p.dims, 'Map(String, String)') AS dimensions,
    multiIf(
        c.aggregation = 'SUM', p.s,
        c.aggregation = 'COUNT', toDecimal128(p.n, 9),
        c.aggregation = 'MIN', p.lo,
        c.aggregation = 'MAX', p.hi,
        c.aggregation = 'AVG', if(p.n = 0, NULL, p.s / toDecimal128(p.n, 9)),
        c.aggregation = 'LATEST', p.latest,
        c.aggregation = 'UNIQUE_COUNT', toDecimal128(p.uniq, 9),
        c.aggregation = 'INTEGRAL', p.s,
        NULL
    ) AS value,
    c.unit AS unit,
    c.aggregation AS aggregation
FROM
(
    SELECT
        tenant, toDate(window_start) AS period, meter, group_key,
        any(workspace_id) AS workspace_id, any(contract_id) AS contract_id,
        any(workstation_id) AS workstation_id, any(datastream_id) AS datastream_id, any(dims) AS dims,
        sum(value_sum) AS s, sum(value_count) AS n, min(value_min) AS lo, max(value_max) AS hi,
        argMaxMerge(value_latest) AS latest, uniqExactMerge(value_unique) AS uniq
    FROM {db}.usage_1d
    GROUP BY tenant, period, meter, group_key
    UNION ALL
    SELECT
        tenant, toDate(window_start) AS period, meter, group_key,
        any(workspace_id), any(contract_id), any(workstation_id), '', any(dims),
        sum(integral), sum(samples), toDecimal128(0, 9), toDecimal128(0, 9), toDecimal128(0, 9), toUInt64(0)
    FROM {db}.gauge_15m FINAL
    GROUP BY tenant, period, meter, group_key
) AS p
LEFT JOIN {db}.meter_catalog AS c ON c.meter = p.meter;

-- Per calendar month (UTC): `month` is the Date of its first day.
CREATE VIEW IF NOT EXISTS {db}.usage_monthly {on_cluster} AS
SELECT
    p.tenant AS tenant,
    p.period AS month,
    p.meter AS meter,
    p.workspace_id AS workspace_id,
    p.contract_id AS contract_id,
    p.workstation_id AS workstation_id,
    p.datastream_id AS datastream_id,
    CAST(p.dims, 'Map(String, String)') AS dimensions,
    multiIf(
        c.aggregation = 'SUM', p.s,
        c.aggregation = 'COUNT', toDecimal128(p.n, 9),
        c.aggregation = 'MIN', p.lo,
        c.aggregation = 'MAX', p.hi,
        c.aggregation = 'AVG', if(p.n = 0, NULL, p.s / toDecimal128(p.n, 9)),
        c.aggregation = 'LATEST', p.latest,
        c.aggregation = 'UNIQUE_COUNT', toDecimal128(p.uniq, 9),
        c.aggregation = 'INTEGRAL', p.s,
        NULL
    ) AS value,
    c.unit AS unit,
    c.aggregation AS aggregation
FROM
(
    SELECT
        tenant, toDate(window_start) AS period, meter, group_key,
        any(workspace_id) AS workspace_id, any(contract_id) AS contract_id,
        any(workstation_id) AS workstation_id, any(datastream_id) AS datastream_id, any(dims) AS dims,
        sum(value_sum) AS s, sum(value_count) AS n, min(value_min) AS lo, max(value_max) AS hi,
        argMaxMerge(value_latest) AS latest, uniqExactMerge(value_unique) AS uniq
    FROM {db}.usage_1mo
    GROUP BY tenant, period, meter, group_key
    UNION ALL
    SELECT
        tenant, toStartOfMonth(toDate(window_start)) AS period, meter, group_key,
        any(workspace_id), any(contract_id), any(workstation_id), '', any(dims),
        sum(integral), sum(samples), toDecimal128(0, 9), toDecimal128(0, 9), toDecimal128(0, 9), toUInt64(0)
    FROM {db}.gauge_15m FINAL
    GROUP BY tenant, period, meter, group_key
) AS p
LEFT JOIN {db}.meter_catalog AS c ON c.meter = p.meter;
