"""What an aggregator holds once a burst is over: batches through the processor alone (no Kafka),
then the process's memory after the engine's allocator has had time to return freed pages.

    PYTHONPATH=. .venv/bin/python -m bench.idle_memory [BATCHES] [EVENTS_PER_BATCH]

The benchmark's events (bench/produce.py's mix, 500 a message, 20 tenants), ``BATCHES`` batches
of ``EVENTS_PER_BATCH`` (defaults 4 and 250,000: the product's batch of 500 messages) handed to
``BatchProcessor.process`` on a fresh database of the embedded engine, with the allocator set as
the aggregator sets it (deploy/allocator.py). Prints one line per batch and, last, one JSON
object: RSS and its parts (bench/pipeline.py ``rss_parts``) at the start, after the last batch,
and after ``BENCH_IDLE_S`` seconds idle (default 3: the engine's jemalloc returns freed pages
after 1 s), plus the engine's tables still holding rows in memory.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psutil

from aggregators.direct import make_processor, pack
from bench.pipeline import rss_parts
from bench.produce import make
from deploy.allocator import set_mmap_threshold
from deploy.settings import AggregatorSettings
from schemas.clickhouse import connect
from schemas.migrate import migrate


def _memory(client: Any) -> dict[str, Any]:
    return {"rss": round(psutil.Process().memory_info().rss / 2**20, 1), **rss_parts(client)}


def main(batches: int = 4, per_batch: int = 250_000) -> None:
    set_mmap_threshold(AggregatorSettings.model_fields["malloc_mmap_threshold"].default)
    path = tempfile.mkdtemp(prefix="bench-idle-")
    try:
        client = connect(f"chdb://{path}", "default")
        db = "idle"
        client.command(f"CREATE DATABASE {db}")
        migrate(client, db)
        processor = make_processor(client, db)
        start = _memory(client)
        at = datetime.now(UTC) - timedelta(minutes=1)
        offset = 0
        for b in range(batches):
            first = b * per_batch
            events = [
                make(i, f"tenant-{(i // 500) % 20}", at, "idle") for i in range(first, first + per_batch)
            ]
            messages = pack(events, 0, offset, per_message=500)
            offset += len(messages)
            del events
            stats = processor.process(messages)
            del messages
            print(
                f"batch {b + 1}: {stats.written:,} written, RSS {_memory(client)['rss']:.0f} MiB", flush=True
            )
        busy = _memory(client)
        time.sleep(float(os.environ.get("BENCH_IDLE_S", "3")))
        idle = _memory(client)
        held = client.query(
            "SELECT name, total_rows, round(total_bytes / 1048576, 1) FROM system.tables "
            "WHERE database = {db:String} AND engine = 'Memory' AND total_rows > 0",
            parameters={"db": db},
        ).result_rows
        processor.close()
        print(
            orjson.dumps(
                {
                    "batches": batches,
                    "events_per_batch": per_batch,
                    "start": start,
                    "after_last_batch": busy,
                    "idle": idle,
                    "memory_tables_holding_rows": [list(r) for r in held],
                }
            ).decode()
        )
    finally:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    main(*args)
