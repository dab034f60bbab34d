"""The embedded engine's freed pages go back to the system once a batch is applied
(``ClickHouseWriter.purge_after_batch``, ``METERING_CHDB_PURGE_AFTER_BATCH``): without it the
engine's jemalloc keeps them for ``dirty_decay_ms``, and the aggregator's RSS with them."""

from __future__ import annotations

import re
from typing import Any

import pytest

from aggregators.direct import pack
from aggregators.processor import BatchProcessor, ListSink
from aggregators.writer import ClickHouseWriter
from schemas.meters import default_catalog
from tests.integration.test_rollup_from_new_rows import synthetic

pytestmark = pytest.mark.clickhouse


def dirty_pages(client: Any) -> int:
    """Pages the engine's jemalloc holds freed and not yet returned (all arenas)."""
    text = "\n".join(str(r[0]) for r in client.query("SELECT * FROM system.jemalloc_stats").result_rows)
    merged = text.split("Merged arenas stats:", 1)[1]
    found = re.search(r"^\s*dirty:\s+\S+\s+(\d+)", merged, re.M)
    assert found, merged[:400]
    return int(found.group(1))


def test_the_engine_keeps_no_freed_pages_after_a_batch(clickhouse: tuple[Any, str]) -> None:
    client, db = clickhouse
    events = synthetic(12_000)
    writer = ClickHouseWriter(client, db, default_catalog(), purge_after_batch=False)
    proc = BatchProcessor(writer, ListSink())
    try:
        first = pack(events[:6_000], 0, 0, per_message=500)
        proc.process(first)
        kept = dirty_pages(client)

        writer.purge_after_batch = True
        proc.process(pack(events[6_000:], 0, len(first), per_message=500))
        after_purge = dirty_pages(client)
    finally:
        proc.close()
    # what a batch leaves behind, without the purge: MiBs of freed pages (a statement's
    # reading of the stats allocates a few pages of its own, hence not zero after it)
    assert kept >= 256, kept
    assert after_purge * 8 < kept, (after_purge, kept)
    assert writer.purge_after_batch  # the purge worked: it was not switched off after a failure
    assert client.query(f"SELECT count() FROM {db}.events_raw").result_rows[0][0] == len(events)


@pytest.mark.kafka
def test_the_aggregator_purges_the_embedded_engine_only(
    clickhouse: tuple[Any, str], kafka_bootstrap: str
) -> None:
    """``build_processor`` turns the purge on for the embedded engine (a chdb client) unless
    ``METERING_CHDB_PURGE_AFTER_BATCH`` is off, and never for a server's client."""
    from deploy.runner import build_processor
    from deploy.settings import AggregatorSettings

    client, db = clickhouse

    class ServerClient:  # what the runner sees of a server's client: no data directory
        path = None

    def purges(settings: AggregatorSettings, on: Any) -> bool:
        processor = build_processor(settings, on, kafka_bootstrap)  # its dead-letter producer
        try:
            return processor.writer.purge_after_batch
        finally:
            processor.preflight.close()
            processor.dead_letters.close()

    base: dict[str, Any] = {"clickhouse_database": db, "prepare_ahead": False}
    assert purges(AggregatorSettings(**base), client)
    assert not purges(AggregatorSettings(**base, chdb_purge_after_batch=False), client)
    assert not purges(AggregatorSettings(**base), ServerClient())
