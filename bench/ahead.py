"""Preparing ahead (issue 11, item 2) on and off, the processor alone (no Kafka), in pairs.

    PYTHONPATH=. .venv/bin/python -m bench.ahead [EVENTS] [PER_BATCH] [ROUNDS]

Synthetic usage events (bench.batch's), cut into batches of PER_BATCH on one partition, applied
to a fresh database of the embedded engine: one after another (``process``), then as the
aggregator does it (aggregators/app.py), each batch parsed and judged (``prepare``) in a thread
of its own while the one before is applied. Prints wall seconds, CPU seconds and events/s per
run, alternating, and the medians. Defaults: 200,000 events, 20,000 per batch, 3 rounds.
"""

from __future__ import annotations

import resource
import statistics
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

from aggregators.direct import make_processor, pack
from bench.batch import _events
from schemas.clickhouse import connect
from schemas.migrate import migrate


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _run(client: Any, batches: list[Any], ahead: bool) -> tuple[float, float, int]:
    db = f"ahead_{uuid.uuid4().hex[:8]}"
    client.command(f"CREATE DATABASE {db}")
    migrate(client, db)
    proc = make_processor(client, db)
    proc.open_stagers()
    t0, c0 = time.perf_counter(), _cpu()
    if not ahead:
        for b in batches:
            proc.process(b)
    else:
        prepared = proc.prepare(batches[0], proc.next_stager())
        for k, b in enumerate(batches):
            thread, out = None, []
            if k + 1 < len(batches):

                def prepare(
                    following: Any = batches[k + 1], stager: Any = proc.next_stager(), out: Any = out
                ) -> None:
                    out.append(proc.prepare(following, stager))

                thread = threading.Thread(target=prepare)
                thread.start()
            proc.process(b, prepared)
            if thread is not None:
                thread.join()
                prepared = out[0]
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    n = int(client.command(f"SELECT count() FROM {db}.events_raw"))
    proc.close()
    client.command(f"DROP DATABASE {db} SYNC")
    return wall, cpu, n


def main() -> None:
    args = [int(a) for a in sys.argv[1:]]
    events_n, per_batch, rounds = (args + [200_000, 20_000, 3][len(args) :])[:3]
    events = _events(events_n)
    batches, offset = [], 0
    for i in range(0, events_n, per_batch):
        batches.append(pack(events[i : i + per_batch], 0, offset, per_message=500))
        offset += len(batches[-1])
    client = connect(f"chdb://{tempfile.mkdtemp(prefix='bench-ahead-')}", "default")
    walls: dict[bool, list[float]] = {False: [], True: []}
    cpus: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for ahead in (False, True):
            wall, cpu, n = _run(client, batches, ahead)
            walls[ahead].append(wall)
            cpus[ahead].append(cpu)
            print(
                f"ahead={ahead!s:5} wall {wall:.2f} s, cpu {cpu:.2f} s, {n:,} events: {n / wall:,.0f} events/s",
                flush=True,
            )
    for ahead in (False, True):
        print(
            f"ahead={ahead!s:5} median wall {statistics.median(walls[ahead]):.2f} s, cpu {statistics.median(cpus[ahead]):.2f} s"
        )


if __name__ == "__main__":
    main()
