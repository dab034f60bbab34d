"""One batch through the aggregator alone (no Kafka): where its time goes (per stage, and CPU µs
per event of the process), and what the preflight trial (aggregators/preflight.py) costs.

    PYTHONPATH=. .venv/bin/python -m bench.batch [EVENTS] [RUNS] [--omit-optional] [--judge]

Synthetic usage events of every type for 20 tenants (ingest/synth.py), packed 500 per Kafka
message as the SDK packs them, handed to ``BatchProcessor.process`` in one call on a fresh
database of the embedded engine; each run is timed with the preflight trial and without it (a
stand-in that refuses nothing). Since the usage events' trial is the rollup stage filled from the
batch's new rows before the raw insert (processor.py, step 4), which cannot be switched off,
"without" leaves out only the probe trial (lifecycle events, changed tables: preflight.py).
Prints one line per run and, last, one JSON object. ``--omit-optional``: the events' optional
data fields (``gateway.request``'s ``model`` and ``status_code``) left out, as a producer other
than the SDK may send them (the SDK writes them out as null). ``--judge``: only the judging
statement (aggregators/stage.py, ``writer.judge``) over one staged batch, RUNS times, and over an
empty stage (what analysing the statement costs): CPU of the process, medians.
"""

from __future__ import annotations

import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from aggregators.direct import make_processor, pack
from aggregators.processor import STAGES
from aggregators.stage import Batch
from ingest.synth import World, usage_events
from schemas.clickhouse import connect
from schemas.events import DATA_MODELS, EventType
from schemas.migrate import migrate


class _NoTrial:
    """The processor's preflight, switched off: refuses nothing, costs nothing."""

    def staged_refusals(self, rows_table: str, ingested_at: datetime) -> list[tuple[tuple[int, int], str]]:
        return []

    def reset(self) -> None:
        return None

    def close(self) -> None:
        return None


def _events(n: int, omit_optional: bool = False) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    world = World.generate(7, 20, created_at=now - timedelta(days=3))
    out: list[dict[str, Any]] = []
    for e in usage_events(world, now - timedelta(days=2), now - timedelta(minutes=1), random.Random(7)):
        if omit_optional:
            fields = DATA_MODELS[EventType(e["type"])].model_fields
            e = {**e, "data": {k: v for k, v in e["data"].items() if fields[k].is_required()}}
        out.append(e)
        if len(out) == n:
            break
    return out


STAGE_SECONDS: dict[str, float] = dict.fromkeys(STAGES, 0.0)
CPU: list[float] = []
DUPLICATE_S: list[float] = []


def one_run(client: Any, events: list[dict[str, Any]], preflight: bool) -> float:
    db = f"bench_{uuid.uuid4().hex[:10]}"
    client.command(f"CREATE DATABASE {db}")
    migrate(client, db)
    processor = make_processor(client, db)
    if not preflight:
        processor.preflight = _NoTrial()  # type: ignore[assignment]
    messages = pack(events, 0, 0, per_message=500)
    started, cpu = time.perf_counter(), time.process_time()
    stats = processor.process(messages)
    elapsed = time.perf_counter() - started
    if preflight:
        CPU.append(time.process_time() - cpu)
        for k, v in processor.timings.items():
            STAGE_SECONDS[k] += v
    assert stats.written == len(events), stats
    if preflight:
        # the same events again, later in the log (a producer's retry storm): all duplicates
        again = pack(events, 0, len(messages), per_message=500)
        started = time.perf_counter()
        stats = processor.process(again)
        DUPLICATE_S.append(time.perf_counter() - started)
        assert stats.written == 0 and stats.duplicates == len(events), stats
    processor.writer.close()
    client.command(f"DROP DATABASE {db} SYNC")
    return elapsed


def judge_only(client: Any, events: list[dict[str, Any]], runs: int) -> None:
    db = f"bench_{uuid.uuid4().hex[:10]}"
    client.command(f"CREATE DATABASE {db}")
    migrate(client, db)
    processor = make_processor(client, db)
    messages = pack(events, 0, 0, per_message=500)
    assert not processor._stage(messages, list(range(len(messages))))
    batch = Batch.of(messages, [len(orjson.loads(m.value)) for m in messages])
    full, empty = [], []
    for _ in range(runs):
        cpu = time.process_time()
        flagged = processor.writer.judge(batch)
        full.append(time.process_time() - cpu)
    processor.writer.stage_events(b"")
    for _ in range(runs):
        cpu = time.process_time()
        processor.writer.judge(Batch.of([], []))
        empty.append(time.process_time() - cpu)
    processor.writer.close()
    client.command(f"DROP DATABASE {db} SYNC")
    print(
        orjson.dumps(
            {
                "events": len(events),
                "handed_to_pydantic": len(flagged),
                "judge_cpu_us_per_event": round(statistics.median(full) / len(events) * 1e6, 2),
                "judge_cpu_ms_empty_stage": round(statistics.median(empty) * 1e3, 1),
            }
        ).decode()
    )


def main(n: int = 50_000, runs: int = 3, omit_optional: bool = False, judge: bool = False) -> None:
    path = tempfile.mkdtemp(prefix="bench-batch-")
    try:
        client = connect(f"chdb://{path}", "default")
        events = _events(n, omit_optional)
        if judge:
            return judge_only(client, events, runs)
        one_run(client, events[:2000], True)  # warm up the engine
        CPU.clear()
        DUPLICATE_S.clear()
        STAGE_SECONDS.update(dict.fromkeys(STAGES, 0.0))
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
                    "duplicate_events_per_s": round(len(events) / statistics.median(DUPLICATE_S)),
                    "new_events_per_s": round(len(events) / with_),
                    "aggregator_cpu_us_per_event": round(statistics.median(CPU) / len(events) * 1e6, 2),
                    "stage_us_per_event": {
                        k: round(v / runs / len(events) * 1e6, 2) for k, v in STAGE_SECONDS.items()
                    },
                }
            ).decode()
        )
    finally:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:] if not a.startswith("--")]
    main(
        args[0] if args else 50_000,
        args[1] if len(args) > 1 else 3,
        omit_optional="--omit-optional" in sys.argv,
        judge="--judge" in sys.argv,
    )
