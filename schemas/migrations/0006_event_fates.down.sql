DROP TABLE IF EXISTS {db}.event_duplicates {on_cluster};
DROP TABLE IF EXISTS {db}.rejections {on_cluster}
