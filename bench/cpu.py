"""CPU per event of one 50,000-event batch, then of the same events again (all duplicates), for
comparing two trees of the code on a loaded machine (process CPU time, all threads)::

    PYTHONPATH=<tree> .venv/bin/python bench/cpu.py <label>
"""

import random
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta

from aggregators.direct import make_processor, pack
from ingest.synth import World, usage_events
from schemas.clickhouse import connect
from schemas.migrate import migrate

c = connect(f"chdb://{tempfile.mkdtemp()}", "default")
now = datetime.now(UTC)
world = World.generate(7, 20, created_at=now - timedelta(days=3))
evs = []
for e in usage_events(world, now - timedelta(days=2), now - timedelta(minutes=1), random.Random(7)):
    evs.append(e)
    if len(evs) == 50000:
        break
res = []
for run in range(3):
    c.command(f"CREATE DATABASE d{run}")
    migrate(c, f"d{run}")
    p = make_processor(c, f"d{run}")
    if run == 0:
        p.process(pack(evs[:2000], 0, 0))
        c.command("DROP DATABASE d0 SYNC")
        c.command("CREATE DATABASE d0")
        migrate(c, "d0")
        p = make_processor(c, "d0")
    msgs = pack(evs, 0, 0)
    c0 = time.process_time()
    t = time.perf_counter()
    st = p.process(msgs)
    new_cpu, new_wall = time.process_time() - c0, time.perf_counter() - t
    msgs2 = pack(evs, 0, len(msgs))
    c0 = time.process_time()
    t = time.perf_counter()
    st2 = p.process(msgs2)
    dup_cpu, dup_wall = time.process_time() - c0, time.perf_counter() - t
    assert st.written == 50000 and st2.written == 0 and st2.duplicates == 50000, (st, st2)
    res.append((new_cpu / 5e4 * 1e6, new_wall, dup_cpu / 5e4 * 1e6, dup_wall))
    print(
        sys.argv[1] if len(sys.argv) > 1 else "run",
        "new: {:.1f} us cpu/event, {:.2f} s wall; duplicates: {:.1f} us cpu/event, {:.2f} s wall".format(
            *res[-1]
        ),
        flush=True,
    )
