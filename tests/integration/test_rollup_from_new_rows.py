"""The period tables from the batch's new rows (issue 11), and the recovery path from events_raw.

On the normal path the rollup stage is filled from the batch's new rows before the raw insert
(processor.py, step 4) and the period tables take it as it is: events_raw is not re-read. When a
period table is behind (here: the derived statements of a batch fail after its raw insert, as a
crash at ``after_raw_insert`` leaves them), the next batch must refill the stage from events_raw
above each table's own watermark; either way every event is counted once.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from aggregators.direct import make_processor, pack
from aggregators.writer import ClickHouseWriter
from tests.integration.helpers import event

pytestmark = pytest.mark.clickhouse
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)


def cpu(eid: str, seconds: float) -> dict[str, Any]:
    return event(eid, "workstation.cpu", {"workstation_id": "ws-1", "cpu_seconds": seconds}, T0, "A")


def totals(client: Any, db: str) -> set[tuple[Any, Any]]:
    """(sum, count) of the CPU meter in each period table."""
    out = set()
    for table in ("usage_15m", "usage_1h", "usage_1d", "usage_1mo"):
        out.add(
            tuple(
                client.query(
                    f"SELECT sum(value_sum), sum(value_count) FROM {db}.{table} "
                    "WHERE meter = 'workstation_cpu_seconds'"
                ).result_rows[0]
            )
        )
    return out


def test_period_tables_from_new_rows_then_from_events_raw_when_behind(
    clickhouse: tuple[Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, db = clickhouse
    proc = make_processor(client, db)
    refills: list[int] = []
    real_fill = ClickHouseWriter._fill_stage

    def spy(self: ClickHouseWriter, *args: Any) -> None:
        refills.append(1)
        real_fill(self, *args)

    monkeypatch.setattr(ClickHouseWriter, "_fill_stage", spy)
    try:
        # batch 1 and 2: the normal path, the stage of the new rows serves every period table
        proc.process(pack([cpu(f"a-{i}", 1.5) for i in range(10)], 0, 0, per_message=5))
        proc.process(pack([cpu(f"b-{i}", 0.5) for i in range(10)] + [cpu("a-1", 1.5)], 0, 2, per_message=5))
        assert refills == []
        assert totals(client, db) == {(Decimal("20"), 20)}

        # batch 3: its raw rows land, its derived statements do not (as after a crash there)
        real_catch_up = proc.writer.catch_up
        monkeypatch.setattr(proc.writer, "catch_up", lambda parts: (_ for _ in ()).throw(RuntimeError("cut")))
        with pytest.raises(RuntimeError):
            proc.process(pack([cpu(f"c-{i}", 2) for i in range(5)], 0, 5, per_message=5))
        monkeypatch.setattr(proc.writer, "catch_up", real_catch_up)
        proc.writer.forget()  # as after the error: watermarks re-read from the tables
        assert totals(client, db) == {(Decimal("20"), 20)}

        # batch 4: the period tables are behind batch 3: the stage comes from events_raw
        proc.process(pack([cpu(f"d-{i}", 1) for i in range(5)], 0, 6, per_message=5))
        assert refills == [1]
        assert totals(client, db) == {(Decimal("35"), 30)}

        # batch 5: up to date again, back to the normal path
        proc.process(pack([cpu(f"e-{i}", 1) for i in range(5)] + [cpu("c-0", 2)], 0, 7, per_message=6))
        assert refills == [1]
        assert totals(client, db) == {(Decimal("40"), 35)}
        assert client.command(f"SELECT count() FROM {db}.events_raw") == 35
    finally:
        proc.close()
