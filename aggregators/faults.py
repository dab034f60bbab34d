"""Crash points for the exactly-once tests (docs/exactly-once.md).

``METERING_CRASH_AT=<point>:<n>`` makes the process SIGKILL itself the n-th time it reaches
``<point>``: no cleanup, no flush, no commit, exactly like a machine losing power under it.
Unset (always, outside those tests) a checkpoint costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
from enum import StrEnum


class CrashPoint(StrEnum):
    ISOLATING = "isolating"  # between two trials of a bisect (preflight.py): nothing written yet
    BEFORE_RAW_INSERT = "before_raw_insert"
    # the raw rows written, their keys not yet (event_keys catches up at the next batch)
    RAW_BEFORE_KEYS = "raw_before_keys"
    AFTER_RAW_INSERT = "after_raw_insert"
    BETWEEN_DERIVED = "between_derived"
    AFTER_DERIVED = "after_derived"
    AFTER_BATCH = "after_batch"  # written, offsets not yet committed


_spec = os.environ.get("METERING_CRASH_AT", "")
_point, _, _nth = _spec.partition(":")
_remaining = int(_nth or "1") if _point else 0


def checkpoint(point: CrashPoint) -> None:
    global _remaining
    if _point != point.value:
        return
    _remaining -= 1
    if _remaining <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
