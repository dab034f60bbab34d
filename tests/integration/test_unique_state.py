"""The distinct-count state the rollups write (``rollup.UNIQUE_STATE``) is ``uniqExact``'s own.

The period tables keep ``AggregateFunction(uniqExact, String)`` states and merge every batch's
into those already stored (and a cluster's replicas merge them again). The rollup builds a
group's state with the ``-Array`` combinator and CASTs its type, so these tests hold, on the
real engine, that the result is the very state ``uniqExactState`` builds from the same keys
(byte for byte: mergeable with states written by the form before it), and that merging it
counts exactly, also across groups that share keys.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from aggregators.rollup import UNIQUE_STATE

pytestmark = pytest.mark.clickhouse


def test_unique_state_is_uniqexacts_state_and_counts_exactly(clickhouse: tuple[Any, str]) -> None:
    client, db = clickhouse
    rng = random.Random(7)
    # rows of (group, keys): empty arrays, repeated keys within a row and across rows and groups
    rows = [
        (rng.randrange(5), [f"k{rng.randrange(300)}" for _ in range(rng.randrange(6))]) for _ in range(2000)
    ]
    client.command(f"CREATE TABLE {db}.ukeys_src (g UInt8, ukeys Array(String)) ENGINE = Memory")
    client.insert(f"{db}.ukeys_src", rows, column_names=["g", "ukeys"])
    client.command(
        f"CREATE TABLE {db}.ukeys_states (g UInt8, s AggregateFunction(uniqExact, String)) ENGINE = Memory"
    )
    client.command(f"INSERT INTO {db}.ukeys_states SELECT g, {UNIQUE_STATE} FROM {db}.ukeys_src GROUP BY g")

    stored = dict(client.query(f"SELECT g, hex(s) FROM {db}.ukeys_states").result_rows)
    built = dict(
        client.query(
            f"SELECT g, hex(uniqExactState(k)) FROM {db}.ukeys_src ARRAY JOIN ukeys AS k GROUP BY g"
        ).result_rows
    )
    assert len(stored) == 5 and stored == built

    counted = dict(client.query(f"SELECT g, uniqExactMerge(s) FROM {db}.ukeys_states GROUP BY g").result_rows)
    expected: dict[int, set[str]] = {}
    for g, keys in rows:
        expected.setdefault(g, set()).update(keys)
    assert counted == {g: len(keys) for g, keys in expected.items()}
    every = client.command(f"SELECT uniqExactMerge(s) FROM {db}.ukeys_states")
    assert int(every) == len(set().union(*expected.values()))
