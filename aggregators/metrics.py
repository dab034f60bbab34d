"""Prometheus metrics of the pipeline (exposed at /metrics by every HTTP process)."""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

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
STALLED_SECONDS = Counter(
    "metering_aggregator_stalled_seconds_total",
    "Seconds the aggregator spent retrying a batch ClickHouse did not take (an outage)",
)
STALLED = Gauge(  # (a counter named ..._stalled_seconds_total claims ..._stalled_seconds)
    "metering_aggregator_stall_seconds",
    "How long the current batch has been retried; 0 while batches flow",
)
CONSUMER_LAG = Gauge("metering_consumer_lag", "Messages behind the log end", ["partition"])
TENANT_FRESHNESS = Gauge(  # set where freshness is written: BatchProcessor.process, step 6
    "metering_tenant_freshness_seconds",
    "For the tenant's last applied batch: seconds from the ingest accepting its oldest event "
    "(the Kafka message timestamp) to the tenant's tables being refreshed with it",
    ["tenant"],
)
BATCHES = Counter("metering_batches_total", "Batches processed")
BATCHES_PREPARED_AHEAD = Counter(
    "metering_batches_prepared_ahead_total",
    "Batches applied from a preparation made while the batch before was applied (both cores busy)",
)
INGEST_REQUESTS = Counter("metering_ingest_requests_total", "HTTP ingest requests", ["status"])


class _Stalls(Protocol):
    def stalled_seconds(self) -> float: ...


_stall_sources: weakref.WeakSet[_Stalls] = weakref.WeakSet()


def watch_stall(source: _Stalls) -> None:
    """Report ``source``'s current stall in the STALLED gauge, computed when scraped (a stall
    grows while a statement blocks; the longest of this process's processors counts)."""
    _stall_sources.add(source)


STALLED.set_function(lambda: max((s.stalled_seconds() for s in list(_stall_sources)), default=0.0))


class _Stages(Protocol):
    timings: dict[str, float]


_stage_sources: weakref.WeakSet[_Stages] = weakref.WeakSet()


def watch_stages(source: _Stages) -> None:
    """Report ``source.timings`` (a processor's seconds per stage of its batches, summed since it
    started: aggregators/processor.py ``STAGES``) as ``metering_aggregator_stage_seconds_total``,
    read when scraped: where the aggregator's time goes, the stages as the processor names them."""
    _stage_sources.add(source)


class StageCollector(Collector):
    """``metering_aggregator_stage_seconds_total{stage}``: the watched processors' stage seconds,
    summed over the processors of this process (a restarted aggregator starts a new processor
    from 0: a counter reset, which Prometheus' rate() handles)."""

    NAME = "metering_aggregator_stage_seconds"
    HELP = "Seconds the aggregator spent in each stage of its batches (wall time)"

    def collect(self) -> Iterator[Metric]:
        totals: dict[str, float] = {}
        for source in list(_stage_sources):
            for stage, seconds in list(source.timings.items()):
                totals[stage] = totals.get(stage, 0.0) + seconds
        family = CounterMetricFamily(self.NAME, self.HELP, labels=["stage"])
        for stage, seconds in sorted(totals.items()):
            family.add_metric([stage], seconds)
        yield family

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.NAME, self.HELP, labels=["stage"])


REGISTRY.register(StageCollector())

FRESHNESS_FORGET_S = 300.0
_freshness_set_at: dict[str, float] = {}  # tenant -> monotonic time its freshness was last set
_freshness_lock = threading.Lock()


def record_tenant_freshness(seconds: dict[str, float], now: float | None = None) -> None:
    """Set TENANT_FRESHNESS for the tenants of a batch, and forget tenants no batch has refreshed
    for ``FRESHNESS_FORGET_S``: a tenant that stopped sending would otherwise keep its last value,
    and a slow last batch would hold the freshness alert firing forever."""
    now = time.monotonic() if now is None else now
    with _freshness_lock:
        for tenant, value in seconds.items():
            TENANT_FRESHNESS.labels(tenant).set(value)
            _freshness_set_at[tenant] = now
        for tenant, at in list(_freshness_set_at.items()):
            if now - at > FRESHNESS_FORGET_S:
                TENANT_FRESHNESS.remove(tenant)
                del _freshness_set_at[tenant]


def forget_lag(lanes: list[int]) -> None:
    """Drop the CONSUMER_LAG series of lanes this process no longer owns: their new owner reports
    them, and a frozen value left here would look like a partition that makes no progress."""
    for lane in lanes:
        CONSUMER_LAG.remove(str(lane))  # (a lane never reported here: nothing to remove)
