"""``metering_aggregator_stage_seconds_total{stage}`` (aggregators/metrics.py): what a scrape
reads is the watched processors' own ``timings``, under the stage names the processor gives
them, summed over the processors of the process; a processor gone is no longer counted."""

from __future__ import annotations

import gc
import weakref
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY

from aggregators import metrics
from aggregators.direct import make_processor, pack

NAME = "metering_aggregator_stage_seconds_total"


def scraped() -> dict[str, float]:
    return {
        s.labels["stage"]: s.value
        for family in REGISTRY.collect()
        if family.name == "metering_aggregator_stage_seconds"
        for s in family.samples
        if s.name == NAME
    }


def event(i: int) -> dict[str, Any]:
    t = (datetime.now(UTC) - timedelta(minutes=5)).isoformat().replace("+00:00", "Z")
    return {
        "specversion": "1.0",
        "id": f"e{i}",
        "source": "test",
        "type": "workstation.cpu",
        "time": t,
        "tenant": "acme",
        "data": {"workstation_id": "ws1", "cpu_seconds": 1.5},
    }


@pytest.mark.clickhouse
def test_a_scrape_reads_the_processors_stage_timings(
    clickhouse: tuple[Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, db = clickhouse
    # only this test's processors: others of the same worker process may still be alive
    monkeypatch.setattr(metrics, "_stage_sources", weakref.WeakSet())
    processor = make_processor(client, db)
    metrics.watch_stages(processor)
    stats = processor.process(pack([event(i) for i in range(20)], 0, 0, per_message=10))
    assert stats.written == 20
    timed = {k: v for k, v in processor.timings.items()}
    assert sum(timed.values()) > 0
    # another source in the same process (a restarted aggregator's new processor): summed
    other = type("Other", (), {})()
    other.timings = {stage: 1.0 for stage in timed} | {"elsewhere": 2.5}
    metrics.watch_stages(other)
    seen = scraped()
    for stage, seconds in timed.items():
        assert seen[stage] == pytest.approx(seconds + 1.0)
    assert seen["elsewhere"] == 2.5
    del other
    gc.collect()
    seen = scraped()
    assert "elsewhere" not in seen
    assert {k: seen[k] for k in timed} == pytest.approx(timed)
    processor.close()
