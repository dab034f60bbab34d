"""Prometheus metrics of the pipeline (exposed at /metrics by every HTTP process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_IN = Counter("metering_events_in_total", "Events read from Kafka")
EVENTS_WRITTEN = Counter("metering_events_written_total", "Events written to events_raw")
DUPLICATES = Counter("metering_duplicates_total", "Events dropped as duplicates of an earlier event")
REJECTED = Counter("metering_rejected_total", "Events rejected as invalid", ["code"])
DEAD_LETTERED = Counter("metering_dead_lettered_total", "Rejected events sent to the dead-letter topic")
ROWS_WRITTEN = Counter("metering_rows_written_total", "Statements applied to derived tables", ["table"])
FLUSH_SECONDS = Histogram(
    "metering_flush_seconds",
    "Time to apply one batch to ClickHouse",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CLICKHOUSE_ERRORS = Counter("metering_clickhouse_errors_total", "Failed attempts to apply a batch")
CONSUMER_LAG = Gauge("metering_consumer_lag", "Messages behind the log end", ["partition"])
BATCHES = Counter("metering_batches_total", "Batches processed")
INGEST_REQUESTS = Counter("metering_ingest_requests_total", "HTTP ingest requests", ["status"])
