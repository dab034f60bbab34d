DROP TABLE IF EXISTS {db}.tenant_freshness {on_cluster} SYNC;
DROP TABLE IF EXISTS {db}.entities {on_cluster} SYNC
