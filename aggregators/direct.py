"""Apply events to ClickHouse through the real processing path, without Kafka.

For tests that concern storage and queries, and for loading benchmark data: events are packed
into messages exactly as the SDK packs them (one tenant per message) and handed to the same
``BatchProcessor`` the faust agent uses, with offsets continuing after the table's watermark.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from clickhouse_connect.driver.client import Client

from aggregators.decode import SourceMessage
from aggregators.processor import BatchProcessor, BatchStats, ListSink
from aggregators.writer import ClickHouseWriter
from schemas.clickhouse import Table
from schemas.events import LIFECYCLE_TYPES
from schemas.meters import Catalog, default_catalog
from schemas.wire import batch_headers, control_lane, encode_batch


def make_processor(client: Client, database: str, catalog: Catalog | None = None) -> BatchProcessor:
    writer = ClickHouseWriter(client, database, catalog or default_catalog())
    return BatchProcessor(writer, ListSink())


def pack(
    events: Iterable[Mapping[str, Any]],
    partition: int,
    start_offset: int,
    per_message: int = 500,
    received_at: datetime | None = None,
    backfill: bool = False,
) -> list[SourceMessage]:
    """Group events by tenant into messages of at most ``per_message`` events."""
    by_tenant: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for e in events:
        by_tenant[str(e.get("tenant", ""))].append(e)
    ts = int((received_at or datetime.now(UTC)).timestamp() * 1000)
    out, offset = [], start_offset
    for tenant, evs in by_tenant.items():
        for i in range(0, len(evs), per_message):
            out.append(
                SourceMessage(
                    partition,
                    offset,
                    ts,
                    tenant.encode() or None,
                    encode_batch(evs[i : i + per_message]),
                    batch_headers(backfill),
                )
            )
            offset += 1
    return out


def apply_events(
    client: Client,
    database: str,
    events: Iterable[Mapping[str, Any]],
    partition: int = 0,
    processor: BatchProcessor | None = None,
    received_at: datetime | None = None,
    backfill: bool = False,
) -> BatchStats:
    """Apply ``events`` as the aggregator would receive them: lifecycle events as messages of the
    control topic's partition 0, usage events (and anything unparseable) as messages of usage
    ``partition``."""
    proc = processor or make_processor(client, database)
    control = control_lane(0)
    by_lane: dict[int, list[Mapping[str, Any]]] = {partition: [], control: []}
    for e in events:
        by_lane[control if e.get("type") in _LIFECYCLE else partition].append(e)
    lanes = [lane for lane, evs in by_lane.items() if evs]
    wm = proc.writer.watermarks(Table.EVENTS_RAW, lanes)
    messages = [
        m
        for lane in lanes
        for m in pack(by_lane[lane], lane, wm[lane] + 1, received_at=received_at, backfill=backfill)
    ]
    return proc.process(messages)


_LIFECYCLE = frozenset(t.value for t in LIFECYCLE_TYPES)
