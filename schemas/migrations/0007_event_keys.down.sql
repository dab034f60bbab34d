DROP TABLE IF EXISTS {db}.event_key_watermarks {on_cluster} SYNC;
DROP TABLE IF EXISTS {db}.event_keys {on_cluster} SYNC
