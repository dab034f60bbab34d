DROP TABLE IF EXISTS {db}.events_raw {on_cluster} SYNC
