"""A real aggregator process whose ClickHouse refuses some valid events (for the crash test of
tests/integration/test_hardening_poison.py).

``run DSN BOOTSTRAP TOPIC GROUP``: like ``aggregator_proc run``, on a database where
``usage_15m.value_max`` is narrowed to ``NARROW`` (see ``narrow``), so that an event that passes
validation is refused by a derived-table statement, as the issue-7 event was.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

#: The narrowed type: holds values up to 21.47483647 (ClickHouse checks a Decimal(9, 8) against the
#: Int32 under it), where every per-event bound of the event models is far larger, so a valid
#: event can exceed it.
NARROW = "SimpleAggregateFunction(max, Decimal(9, 8))"


def narrow(client: Any, database: str) -> None:
    """A test-only schema change: ``usage_15m.value_max`` narrower than the values validation
    accepts. A valid event with a larger value then fails in ClickHouse (DECIMAL_OVERFLOW, in the
    period statement that runs after the raw insert), whatever bounds the event models set."""
    client.command(f"ALTER TABLE {database}.usage_15m MODIFY COLUMN value_max {NARROW}")


async def run(dsn: str, bootstrap: str, topic: str, group: str) -> None:
    from schemas.clickhouse import connect
    from schemas.migrate import migrate
    from tests.integration import aggregator_proc

    client = connect(dsn, "metering")  # the client aggregator_proc.run gets back (cached per DSN)
    migrate(client, "metering")
    narrow(client, "metering")
    await aggregator_proc.run(dsn, bootstrap, topic, group)


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd != "run":
        raise SystemExit(f"unknown command {cmd}")
    asyncio.run(run(*args))
