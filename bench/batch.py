"""One batch through the aggregator alone (no Kafka): where its time goes, and what the preflight
trial (aggregators/preflight.py) costs.

    PYTHONPATH=. .venv/bin/python -m bench.batch [EVENTS] [RUNS]

Synthetic usage events of every type for 20 tenants (ingest/synth.py), packed 500 per Kafka
message as the SDK packs them, handed to ``BatchProcessor.process`` in one call on a fresh
database of the embedded engine; each run is timed with the preflight trial and without it (a
stand-in that refuses nothing). Prints one line per run and, last, one JSON object.
"""

from __future__ import annotations

import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from aggregators.decode import RawRow
from aggregators.direct import make_processor, pack
from aggregators.preflight import Refusal
from ingest.synth import World, usage_events
from schemas.clickhouse import connect
from schemas.migrate import migrate


class _NoTrial:
    """The processor's preflight, switched off: refuses nothing, costs nothing."""

    def refusals(self, rows: Sequence[RawRow], ingested_at: datetime) -> list[Refusal]:
        return []

    def reset(self) -> None:
        return None

    def close(self) -> None:
        return None


def _events(n: int) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    world = World.generate(7, 20, created_at=now - timedelta(days=3))
    out: list[dict[str, Any]] = []
    for e in usage_events(world, now - timedelta(days=2), now - timedelta(minutes=1), random.Random(7)):
        out.append(e)
        if len(out) == n:
            break
    return out


def one_run(client: Any, events: list[dict[str, Any]], preflight: bool) -> float:
    db = f"bench_{uuid.uuid4().hex[:10]}"
    client.command(f"CREATE DATABASE {db}")
    migrate(client, db)
    processor = make_processor(client, db)
    if not preflight:
        processor.preflight = _NoTrial()  # type: ignore[assignment]
    messages = pack(events, 0, 0, per_message=500)
    started = time.perf_counter()
    stats = processor.process(messages)
    elapsed = time.perf_counter() - started
    assert stats.written == len(events), stats
    processor.writer.close()
    client.command(f"DROP DATABASE {db} SYNC")
    return elapsed


def main(n: int = 50_000, runs: int = 3) -> None:
    path = tempfile.mkdtemp(prefix="bench-batch-")
    try:
        client = connect(f"chdb://{path}", "default")
        events = _events(n)
        one_run(client, events[:2000], True)  # warm up the engine
        times: dict[str, list[float]] = {"with_preflight": [], "without_preflight": []}
        for i in range(runs):
            for key, flag in (("without_preflight", False), ("with_preflight", True)):
                t = one_run(client, events, flag)
                times[key].append(t)
                print(f"run {i + 1}: {key:<18} {t:.3f} s ({t / len(events) * 1e6:.1f} µs/event)", flush=True)
        with_, without = (
            statistics.median(times["with_preflight"]),
            statistics.median(times["without_preflight"]),
        )
        print(
            orjson.dumps(
                {
                    "events": len(events),
                    "batch_s_with_preflight": round(with_, 3),
                    "batch_s_without_preflight": round(without, 3),
                    "preflight_overhead": round(with_ / without - 1, 3),
                }
            ).decode()
        )
    finally:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
