"""Python's cyclic garbage collector, set for a long-running server process.

With CPython's defaults (thresholds 700 / 10 / 10), the all-in-one process under HTTP ingest spent
about 3 s of a 20 s run in collections, every one with the GIL held (docs/performance.md, "HTTP
ingest on httptools and uvloop", GC part):

- ~3,300 young collections: a 100-event request allocates more than 700 container objects (the
  parsed body, pydantic's models, the answer) before it frees them, so every request paid one or
  two, though nearly all of it is freed by reference counting anyway;
- ~15 full collections of ~140 ms each, walking the ~200,000 objects the process holds from its
  start (faust, the routes, pydantic's validators), which never become garbage: a request that
  waited for one of them is the p99.

So:

- ``set_thresholds`` (at the start): a young collection after 10,000 objects allocated and not
  freed, not 700; then 20 and 20 (full collections rarer still). Cycles wait a little longer to be
  freed: at most some 10,000 objects, nothing next to the process's size.
- ``freeze_startup`` (once started): the objects alive then are moved out of the collector's
  generations (``gc.freeze``): a full collection walks only what was allocated after.
"""

from __future__ import annotations

import gc

THRESHOLDS = (10_000, 20, 20)


def set_thresholds() -> None:
    gc.set_threshold(*THRESHOLDS)


def freeze_startup() -> int:
    """Collect once, then freeze what is left: the number of objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
