DROP VIEW IF EXISTS {db}.usage_monthly {on_cluster};
DROP VIEW IF EXISTS {db}.usage_daily {on_cluster};
DROP VIEW IF EXISTS {db}.usage_hourly {on_cluster};
DROP VIEW IF EXISTS {db}.meter_catalog {on_cluster};
