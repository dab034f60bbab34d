"""Replay gives identical tables: from the raw table, and twice in a row."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from aggregators.direct import apply_events, make_processor
from aggregators.replay import rebuild_from_raw
from tests.integration.helpers import event

pytestmark = pytest.mark.clickhouse

TABLES = ("usage_15m", "usage_1h", "usage_1d", "usage_1mo")


def snapshot(client, db: str) -> dict[str, list]:
    out = {}
    for t in TABLES:
        out[t] = client.query(
            "SELECT tenant, meter, window_start, group_key, sum(value_sum), sum(value_count), min(value_min), "
            f"max(value_max), argMaxMerge(value_latest), uniqExactMerge(value_unique) FROM {db}.{t} "
            "GROUP BY tenant, meter, window_start, group_key ORDER BY tenant, meter, window_start, group_key"
        ).result_rows
    out["gauge"] = client.query(
        f"SELECT tenant, meter, window_start, group_key, series, integral, samples FROM {db}.gauge_15m FINAL "
        "ORDER BY tenant, meter, window_start, group_key, series"
    ).result_rows
    out["entities"] = client.query(
        f"SELECT tenant, kind, entity_id, status, attrs, tier FROM {db}.entities FINAL ORDER BY tenant, kind, entity_id"
    ).result_rows
    return out


def workload() -> list[dict]:
    rng = random.Random(5)
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(days=20)
    evs = []
    for tenant in ("a", "b"):
        evs.append(
            event(
                f"{tenant}-w",
                "workspace.created",
                {"workspace_id": "w", "name": "W", "tier": "free"},
                base,
                tenant,
            )
        )
        evs.append(
            event(
                f"{tenant}-u",
                "workspace.updated",
                {"workspace_id": "w", "tier": "pro"},
                base + timedelta(days=1),
                tenant,
            )
        )
        for i in range(600):
            at = base + timedelta(minutes=rng.randint(0, 20 * 24 * 60))
            evs.append(
                event(
                    f"{tenant}-m{i}",
                    "workstation.memory",
                    {"workstation_id": f"ws{i % 3}", "memory_gb": rng.randint(1, 64) / 4},
                    at,
                    tenant,
                )
            )
            evs.append(
                event(
                    f"{tenant}-c{i}",
                    "workstation.cpu",
                    {"workstation_id": f"ws{i % 3}", "cpu_seconds": rng.randint(1, 999) / 10},
                    at,
                    tenant,
                )
            )
            evs.append(
                event(
                    f"{tenant}-t{i}",
                    "ai.task.submitted",
                    {"workspace_id": "w", "task_id": f"t{i}", "task_type": rng.choice(["a", "b", "c"])},
                    at,
                    tenant,
                )
            )
    return evs


def test_rebuild_from_raw_equals_live_tables_and_is_idempotent(clickhouse) -> None:
    client, db = clickhouse
    proc = make_processor(client, db)
    evs = workload()
    # live: in several batches, out of time order, so rows are partial aggregates
    for i in range(0, len(evs), 700):
        apply_events(client, db, evs[i : i + 700], processor=proc)
    live = snapshot(client, db)
    assert live["usage_1mo"] and live["gauge"] and live["entities"]
    rebuild_from_raw(proc.writer)
    once = snapshot(client, db)
    rebuild_from_raw(proc.writer)
    twice = snapshot(client, db)
    assert once == live
    assert twice == live


def test_rebuild_one_tenant_leaves_the_other_untouched(clickhouse) -> None:
    client, db = clickhouse
    proc = make_processor(client, db)
    apply_events(client, db, workload(), processor=proc)
    before = snapshot(client, db)
    # corrupt tenant a's monthly rows, then rebuild only tenant a
    client.command(f"ALTER TABLE {db}.usage_1mo DELETE WHERE tenant = 'a' SETTINGS mutations_sync = 2")
    assert snapshot(client, db)["usage_1mo"] != before["usage_1mo"]
    rebuild_from_raw(proc.writer, tenant="a")
    assert snapshot(client, db) == before
