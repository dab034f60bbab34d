DROP TABLE IF EXISTS {db}.event_keys {on_cluster} SYNC
