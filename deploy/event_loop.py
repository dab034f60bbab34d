"""The process's event loop, as ``METERING_EVENT_LOOP`` names it: uvloop (the default, cheaper per
HTTP request: docs/performance.md, "HTTP ingest on httptools and uvloop") or Python's asyncio.

Every command of ``metering`` runs its parts here, and the benchmarks run theirs here too, so
that they measure the loop the product runs on."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], event_loop: Literal["uvloop", "asyncio"]) -> T:
    """``main`` run to its end on a new loop of the kind named."""
    if event_loop == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
