"""Every aggregation against hand-computed values, late events restating their periods,
and duplicates across retries counted once (real ClickHouse engine, no Kafka)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from aggregators.direct import apply_events, make_processor
from tests.integration.helpers import event

pytestmark = pytest.mark.clickhouse

DAY = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=3)


def mem(i: int, sec: int, gb: str, ws: str = "ws1", tenant: str = "t") -> dict:
    return event(
        f"m{i}",
        "workstation.memory",
        {"workstation_id": ws, "memory_gb": float(gb)},
        DAY + timedelta(hours=10, seconds=sec),
        tenant,
    )


def value(client, db: str, meter: str, table: str = "usage_1d", day: datetime = DAY) -> dict:
    row = client.query(
        f"SELECT sum(value_sum), sum(value_count), min(value_min), max(value_max), argMaxMerge(value_latest), "
        f"uniqExactMerge(value_unique) FROM {db}.{table} WHERE tenant = 't' AND meter = {{m:String}} "
        "AND window_start = {d:DateTime}",
        parameters={"m": meter, "d": day.replace(tzinfo=None)},
    ).result_rows[0]
    return dict(zip(["sum", "count", "min", "max", "latest", "unique"], row, strict=True))


def integral(client, db: str, meter: str) -> Decimal:
    return Decimal(
        str(
            client.command(
                f"SELECT sum(integral) FROM {db}.gauge_15m FINAL WHERE tenant = 't' AND meter = {{m:String}}",
                parameters={"m": meter},
            )
        )
    )


def test_each_aggregation_against_hand_computed_values(clickhouse) -> None:
    client, db = clickhouse
    proc = make_processor(client, db)
    # memory samples at t=0,30,100,460 s (GB): 4, 6.5, 2, 8 ; max gap 300 s
    samples = [mem(1, 0, "4"), mem(2, 30, "6.5"), mem(3, 100, "2"), mem(4, 460, "8")]
    # arrive out of order: the LATEST must follow event time, not arrival
    apply_events(client, db, [samples[3], samples[0]], processor=proc)
    apply_events(client, db, [samples[2], samples[1]], processor=proc)
    v = value(client, db, "workstation_memory_gb_max")
    assert v["max"] == Decimal("8") and v["min"] == Decimal("2")
    assert v["sum"] / v["count"] == Decimal("20.5") / 4  # AVG
    assert v["latest"] == Decimal("8")
    # INTEGRAL: 4*30 + 6.5*70 + 2*300 (gap caps 360 s to 300) + 8*300 (last sample holds the gap)
    assert integral(client, db, "workstation_memory_gb_seconds") == Decimal(
        4 * 30 + 6.5 * 70 + 2 * 300 + 8 * 300
    )

    tasks = [
        event(
            f"t{i}",
            "ai.task.submitted",
            {"workspace_id": "w", "task_id": f"k{i}", "task_type": typ},
            DAY + timedelta(hours=1),
            "t",
        )
        for i, typ in enumerate(["upscale", "transcribe", "upscale", "remove-bg", "upscale"])
    ]
    cpu = [
        event(
            f"c{i}",
            "workstation.cpu",
            {"workstation_id": "ws1", "cpu_seconds": s},
            DAY + timedelta(hours=2),
            "t",
        )
        for i, s in enumerate([0.1, 0.2, 0.3, 1e-05])
    ]
    apply_events(client, db, tasks + cpu, processor=proc)
    assert value(client, db, "ai_tasks")["count"] == 5  # COUNT
    assert value(client, db, "ai_task_types")["unique"] == 3  # UNIQUE_COUNT
    assert value(client, db, "workstation_cpu_seconds")["sum"] == Decimal("0.60001")  # SUM, exact decimals


def test_integral_splits_at_window_boundaries(clickhouse) -> None:
    client, db = clickhouse
    # 14:14:00 -> holds 120 s (gap) : 60 s in the 14:00 window, 60 s in the 14:15 window
    t = DAY + timedelta(hours=14, minutes=14)
    apply_events(
        client,
        db,
        [
            event(
                "g1",
                "ci.step.memory",
                {"contract_id": "c", "workspace_id": "w", "step_id": "s", "memory_mib": 100},
                t,
                "t",
            )
        ],
    )
    rows = client.query(
        f"SELECT window_start, integral FROM {db}.gauge_15m FINAL WHERE tenant = 't' ORDER BY window_start"
    ).result_rows
    # ci_step_memory gap is 60 s: the whole hold is in the 14:00 window
    assert [r[1] for r in rows] == [Decimal(6000)]
    apply_events(
        client,
        db,
        [
            event(
                "g2",
                "ci.step.memory",
                {"contract_id": "c", "workspace_id": "w", "step_id": "s", "memory_mib": 50},
                t + timedelta(seconds=30),
                "t",
            )
        ],
    )
    rows = client.query(
        f"SELECT window_start, integral FROM {db}.gauge_15m FINAL WHERE tenant = 't' ORDER BY window_start"
    ).result_rows
    # 100 MiB for 30 s, then 50 MiB for 60 s: 30 s in 14:00 (ends 14:15:00), 30 s in 14:15
    assert [r[1] for r in rows] == [Decimal(3000 + 50 * 30), Decimal(50 * 30)]


def test_late_events_restate_their_periods(clickhouse) -> None:
    client, db = clickhouse
    proc = make_processor(client, db)

    def e(i: int, day: datetime, b: int) -> dict:
        return event(
            f"e{i}", "egress.download", {"workspace_id": "w", "artifact_id": "a", "bytes": b}, day, "t"
        )

    apply_events(client, db, [e(1, DAY, 100), e(2, DAY + timedelta(days=1), 10)], processor=proc)
    assert value(client, db, "egress_bytes")["sum"] == 100
    # two days later an event from DAY arrives: DAY is restated, the next day is not touched
    apply_events(client, db, [e(3, DAY + timedelta(hours=5), 23)], processor=proc)
    assert value(client, db, "egress_bytes")["sum"] == 123
    assert value(client, db, "egress_bytes", day=DAY + timedelta(days=1))["sum"] == 10
    month_total = client.command(
        f"SELECT sum(value_sum) FROM {db}.usage_1mo WHERE tenant='t' AND meter='egress_bytes' "
        "AND window_start = toStartOfMonth({d:DateTime})",
        parameters={"d": DAY.replace(tzinfo=None)},
    )
    same_month = (DAY + timedelta(days=1)).month == DAY.month
    assert Decimal(str(month_total)) == (133 if same_month else 123)


def test_duplicates_across_retries_count_once(clickhouse) -> None:
    client, db = clickhouse
    proc = make_processor(client, db)
    evs = [
        event(
            f"d{i}",
            "render.completed",
            {"workspace_id": "w", "render_id": f"r{i}", "output_duration_seconds": 60},
            DAY,
            "t",
        )
        for i in range(50)
    ]
    apply_events(client, db, evs, processor=proc)
    apply_events(client, db, evs[10:30] + evs[:5], processor=proc)  # a client retry, and redelivery
    # a new processor (after a restart) has an empty memory but must still recognise them
    apply_events(client, db, evs, processor=make_processor(client, db))
    assert value(client, db, "render_output_seconds")["sum"] == 50 * 60
    assert int(client.command(f"SELECT count() FROM {db}.events_raw")) == 50


def test_same_id_in_two_tenants_is_two_events(clickhouse) -> None:
    client, db = clickhouse
    a = event("same", "egress.download", {"workspace_id": "w", "artifact_id": "a", "bytes": 1}, DAY, "t")
    b = event("same", "egress.download", {"workspace_id": "w", "artifact_id": "a", "bytes": 2}, DAY, "u")
    apply_events(client, db, [a, b])
    assert int(client.command(f"SELECT count() FROM {db}.events_raw")) == 2
