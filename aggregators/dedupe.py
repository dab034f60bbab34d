"""Deduplication within one batch (pure): the first occurrence of each (tenant, event id).

Deduplication against what is already stored is done by the engine, inside the raw insert (an
exact anti-join on ``events_raw``: aggregators/stage.py, docs/exactly-once.md); replay uses this
for the events it re-reads.
"""

from __future__ import annotations

from collections.abc import Iterable


def first_occurrences(keys: Iterable[tuple[str, str]]) -> list[int]:
    """Indexes of the first occurrence of each key, in order (duplicates within one batch)."""
    seen: set[tuple[str, str]] = set()
    keep = []
    for i, key in enumerate(keys):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep
