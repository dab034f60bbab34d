DROP TABLE IF EXISTS {db}.gauge_15m {on_cluster} SYNC;
DROP TABLE IF EXISTS {db}.usage_1mo {on_cluster} SYNC;
DROP TABLE IF EXISTS {db}.usage_1d {on_cluster} SYNC;
DROP TABLE IF EXISTS {db}.usage_1h {on_cluster} SYNC;
DROP TABLE IF EXISTS {db}.usage_15m {on_cluster} SYNC
