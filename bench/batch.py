"""One batch through the aggregator alone (no Kafka): where its time goes (per stage, and CPU µs
per event of the process), and what the preflight trial (aggregators/preflight.py) costs.

    PYTHONPATH=. .venv/bin/python -m bench.batch [EVENTS] [RUNS] [--omit-optional] [--judge] [--statements] [--steady]

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
``--statements``: every engine call of the runs with the trial (new events, then the same again
as duplicates) timed on its own, CPU of the process (all threads: the engine's and Python's)
around the call, summed per statement kind over the runs, printed as µs per event (chdb keeps
no ``system.query_log``, so the call is the unit). ``--steady``: one processor and one database
for every batch, as the running aggregator has them (no first-batch costs: tables created,
watermarks read), 3 warm-up batches then RUNS batches of EVENTS new events each, background
merges running; prints the median CPU per batch and, with ``--statements``, the table.
"""

from __future__ import annotations

import random
import re
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
#: per statement kind: [calls, CPU s, wall s] (``--statements``), new events and duplicates apart
STATEMENTS: dict[str, dict[str, list[float]]] = {"new": {}, "duplicates": {}}
_PHASE = ["off"]


def statement_kind(method: str, sql: str) -> str:
    """A short name for a statement: its verb and the table it writes or reads, the per-process
    suffixes and database names left out."""
    text = " ".join(str(sql).split())
    text = re.sub(r"\bbench_[0-9a-f]{10}_probe_[0-9a-f]{12}\.(\w+)", r"probe \1", text)
    text = re.sub(r"\b(\w+?)_[0-9a-f]{12}(_probe)?\b", r"\1\2", text)  # rows_stage_<uuid> -> rows_stage
    text = re.sub(r"\bbench_[0-9a-f]{10}\.", "", text)
    if method == "raw_insert":
        return f"raw_insert {text}"
    m = re.match(r"(INSERT INTO (probe )?\S+|TRUNCATE TABLE (probe )?\S+|CREATE \w+|DROP \w+)", text)
    if m:
        return m.group(1)
    m = re.search(r"\bFROM ((probe )?[A-Za-z_][\w.]*)", text)
    return f"SELECT ... FROM {m.group(1) if m else '?'}" + (" (token)" if "sipHash128" in text else "")


def _instrument(client: Any) -> None:
    """Time every engine call of ``client`` into STATEMENTS (``--statements``)."""
    for method in ("command", "query", "raw_insert"):
        inner = getattr(client, method)

        def timed(*args: Any, _inner: Any = inner, _method: str = method, **kwargs: Any) -> Any:
            if _PHASE[0] == "off":
                return _inner(*args, **kwargs)
            cpu, wall = time.process_time(), time.perf_counter()
            try:
                return _inner(*args, **kwargs)
            finally:
                kind = statement_kind(
                    _method, args[0] if args else kwargs.get("cmd", kwargs.get("query", ""))
                )
                acc = STATEMENTS[_PHASE[0]].setdefault(kind, [0, 0.0, 0.0])
                acc[0] += 1
                acc[1] += time.process_time() - cpu
                acc[2] += time.perf_counter() - wall

        setattr(client, method, timed)


def one_run(client: Any, events: list[dict[str, Any]], preflight: bool) -> float:
    db = f"bench_{uuid.uuid4().hex[:10]}"
    client.command(f"CREATE DATABASE {db}")
    migrate(client, db)
    processor = make_processor(client, db)
    if not preflight:
        processor.preflight = _NoTrial()  # type: ignore[assignment]
    messages = pack(events, 0, 0, per_message=500)
    started, cpu = time.perf_counter(), time.process_time()
    if preflight:
        _PHASE[0] = "new"
    stats = processor.process(messages)
    _PHASE[0] = "off"
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
        _PHASE[0] = "duplicates"
        stats = processor.process(again)
        _PHASE[0] = "off"
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


def steady(client: Any, n: int, runs: int, omit_optional: bool) -> None:
    """``--steady``: batches of ``n`` new events through one processor, as a running aggregator
    applies them (the fixed cost of a batch without the first batch's set-up)."""
    warm = 3
    events = _events(n * (warm + runs), omit_optional)
    if len(events) < n * (warm + runs):
        raise SystemExit(f"the synthetic world holds {len(events):,} events: fewer batches or events")
    db = f"bench_{uuid.uuid4().hex[:10]}"
    client.command(f"CREATE DATABASE {db}")
    migrate(client, db)
    processor = make_processor(client, db)
    offset, cpu = 0, []
    for i in range(warm + runs):
        messages = pack(events[i * n : (i + 1) * n], 0, offset, per_message=500)
        offset += len(messages)
        started = time.process_time()
        _PHASE[0] = "new" if i >= warm else "off"
        stats = processor.process(messages)
        _PHASE[0] = "off"
        if i >= warm:
            cpu.append(time.process_time() - started)
        assert stats.written == n, stats
    processor.writer.close()
    client.command(f"DROP DATABASE {db} SYNC")
    batch_cpu = statistics.median(cpu)
    print(
        orjson.dumps(
            {
                "events": n,
                "batches": runs,
                "batch_cpu_ms": round(batch_cpu * 1e3, 1),
                "aggregator_cpu_us_per_event": round(batch_cpu / n * 1e6, 2),
            }
        ).decode()
    )


def print_statements(events: int, runs: int) -> None:
    """The per-statement table (``--statements``): CPU µs per event, calls per batch."""
    for phase, table in STATEMENTS.items():
        total = sum(v[1] for v in table.values())
        print(f"{phase}: engine calls, CPU µs per event (all threads), calls per batch, wall µs per event")
        for kind, (calls, cpu, wall) in sorted(table.items(), key=lambda kv: -kv[1][1]):
            print(
                f"  {cpu / runs / events * 1e6:7.2f}  {calls / runs:5.1f}  {wall / runs / events * 1e6:7.2f}  {kind}"
            )
        print(f"  {total / runs / events * 1e6:7.2f}  in all")


def main(
    n: int = 50_000,
    runs: int = 3,
    omit_optional: bool = False,
    judge: bool = False,
    statements: bool = False,
    steady_batches: bool = False,
) -> None:
    path = tempfile.mkdtemp(prefix="bench-batch-")
    try:
        client = connect(f"chdb://{path}", "default")
        if statements:
            _instrument(client)
        if steady_batches:
            STATEMENTS.pop("duplicates")
            steady(client, n, runs, omit_optional)
            if statements:
                print_statements(n, runs)
            return None
        events = _events(n, omit_optional)
        if judge:
            return judge_only(client, events, runs)
        one_run(client, events[:2000], True)  # warm up the engine
        CPU.clear()
        DUPLICATE_S.clear()
        STAGE_SECONDS.update(dict.fromkeys(STAGES, 0.0))
        for table in STATEMENTS.values():
            table.clear()
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
        if statements:
            print_statements(len(events), runs)
    finally:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:] if not a.startswith("--")]
    main(
        args[0] if args else 50_000,
        args[1] if len(args) > 1 else 3,
        omit_optional="--omit-optional" in sys.argv,
        judge="--judge" in sys.argv,
        statements="--statements" in sys.argv,
        steady_batches="--steady" in sys.argv,
    )
