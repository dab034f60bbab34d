"""The period tables from the batch's new rows (issue 11), and the recovery path from events_raw.

On the normal path the rollup stage is filled from the batch's new rows before the raw insert
(processor.py, step 4) and the period tables take it as it is, and the series the gauge samples
touch are read from those rows too: events_raw is not re-read for them. When a derived table is
behind (here: the derived statements of a batch fail after its raw insert, as a crash at
``after_raw_insert`` leaves them), the next batch must refill the stage from events_raw above
each table's own watermark. Either way the tables equal one clean pass over the same events.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from aggregators.direct import make_processor, pack
from aggregators.writer import ClickHouseWriter
from ingest.synth import World, usage_events
from schemas.meters import default_catalog
from schemas.migrate import migrate

pytestmark = pytest.mark.clickhouse


def synthetic(n: int) -> list[dict[str, Any]]:
    """Usage of every type (gauges included) for 3 tenants, in event time order."""
    now = datetime.now(UTC)
    world = World.generate(11, 3, created_at=now - timedelta(days=3))
    out: list[dict[str, Any]] = []
    for e in usage_events(world, now - timedelta(hours=6), now - timedelta(minutes=1), random.Random(11)):
        out.append(e)
        if len(out) == n:
            break
    return out


def tables(client: Any, db: str) -> dict[str, list[Any]]:
    out = {
        "raw": client.query(
            f"SELECT tenant, event_id, data FROM {db}.events_raw ORDER BY tenant, event_id"
        ).result_rows,
        "gauge_15m": client.query(
            f"SELECT tenant, meter, window_start, group_key, series, integral, samples FROM {db}.gauge_15m FINAL "
            "ORDER BY tenant, meter, window_start, group_key, series"
        ).result_rows,
    }
    for t in ("usage_15m", "usage_1h", "usage_1d", "usage_1mo"):
        out[t] = client.query(
            "SELECT tenant, meter, window_start, group_key, sum(value_sum), sum(value_count), min(value_min), "
            "max(value_max), argMaxMerge(value_latest), uniqExactMerge(value_unique) "
            f"FROM {db}.{t} GROUP BY tenant, meter, window_start, group_key "
            "ORDER BY tenant, meter, window_start, group_key"
        ).result_rows
    return out


def as_one_clean_pass(client: Any, db: str, events: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The tables of ``db``, checked equal to those of one clean pass over ``events`` (one batch,
    in a database of its own)."""
    clean_db = f"{db}_clean"
    client.command(f"CREATE DATABASE {clean_db}")
    try:
        migrate(client, clean_db)
        clean = make_processor(client, clean_db)
        try:
            clean.process(pack(events, 0, 0, per_message=40))
        finally:
            clean.close()
        got, want = tables(client, db), tables(client, clean_db)
        for name in want:
            assert got[name] == want[name], name
        return got
    finally:
        client.command(f"DROP DATABASE IF EXISTS {clean_db} SYNC")


def test_derived_tables_from_new_rows_then_from_events_raw_when_behind(
    clickhouse: tuple[Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, db = clickhouse
    events = synthetic(600)
    events[250:250] = events[100:110]  # producer retries: copies of stored events
    proc = make_processor(client, db)
    refills: list[int] = []
    real_fill = ClickHouseWriter._fill_stage

    def spy(self: ClickHouseWriter, *args: Any) -> None:
        refills.append(1)
        real_fill(self, *args)

    monkeypatch.setattr(ClickHouseWriter, "_fill_stage", spy)
    offset = 0

    def batch(part: list[dict[str, Any]]) -> None:
        nonlocal offset
        msgs = pack(part, 0, offset, per_message=40)
        offset += len(msgs)
        proc.process(msgs)

    try:
        # the normal path: the stage of the new rows serves every period table
        batch(events[:150])
        batch(events[150:300])
        assert refills == []
        assert set(proc.writer._touched_source.values()) == {proc.writer._new}

        # a batch whose raw rows land and whose derived statements do not (as after a crash)
        real_catch_up = proc.writer.catch_up

        def cut(partitions: Any) -> Any:
            raise RuntimeError("cut after the raw insert")

        monkeypatch.setattr(proc.writer, "catch_up", cut)
        with pytest.raises(RuntimeError):
            batch(events[300:420])
        monkeypatch.setattr(proc.writer, "catch_up", real_catch_up)
        proc.writer.forget()  # as after the error: watermarks re-read from the tables

        # behind: the stage and the touched series come from events_raw
        batch(events[420:520])
        assert refills == [1]
        assert set(proc.writer._touched_source.values()) == {f"{db}.events_raw"}

        # up to date again: back to the normal path
        batch(events[520:])
        assert refills == [1]

        got = as_one_clean_pass(client, db, events)
        assert len(got["raw"]) == 600 and got["gauge_15m"] and got["usage_15m"]
    finally:
        proc.close()


def test_gauges_of_several_partitions_rewritten_in_one_statement_tagged_per_partition(
    clickhouse: tuple[Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One batch over three partitions (a tenant each) rewrites every touched series' integrals
    in one statement; each series' rows carry its own partition and that partition's highest
    offset of a gauge sample, the gauge table's watermark there, and the integrals equal those
    of one partition a batch."""
    client, db = clickhouse
    events = synthetic(900)
    tenants = sorted({e["tenant"] for e in events})
    assert len(tenants) == 3
    gauge_types = {m.event_type.value for m in default_catalog().meters if m.is_gauge}
    messages = []
    for part, tenant in enumerate(tenants):
        messages += pack([e for e in events if e["tenant"] == tenant], part, 10 * part, per_message=40)
    top: dict[int, int] = {}
    for m in messages:
        if any(e["type"] in gauge_types for e in orjson.loads(m.value)):
            top[m.partition] = max(top.get(m.partition, -1), m.offset)
    assert sorted(top) == [0, 1, 2]

    proc = make_processor(client, db)
    statements: list[str] = []
    real_command = client.command

    def spy(cmd: str, *args: Any, **kwargs: Any) -> Any:
        statements.append(cmd)
        return real_command(cmd, *args, **kwargs)

    one_by_one = f"{db}_parts"
    try:
        with monkeypatch.context() as m:
            m.setattr(client, "command", spy)
            proc.process(messages)
        assert sum(1 for s in statements if s.lstrip().startswith(f"INSERT INTO {db}.gauge_15m")) == 1
        tags = client.query(
            f"SELECT tenant, groupUniqArray(src_partition), max(src_offset) FROM {db}.gauge_15m GROUP BY tenant"
        ).result_rows
        assert sorted((t, list(ps), int(o)) for t, ps, o in tags) == [
            (tenant, [part], top[part]) for part, tenant in enumerate(tenants)
        ]

        client.command(f"CREATE DATABASE {one_by_one}")
        migrate(client, one_by_one)
        each = make_processor(client, one_by_one)
        try:
            for part in range(3):
                each.process([m for m in messages if m.partition == part])
        finally:
            each.close()
        got, want = tables(client, db), tables(client, one_by_one)
        assert got["gauge_15m"]
        for name in want:
            assert got[name] == want[name], name
    finally:
        proc.close()
        client.command(f"DROP DATABASE IF EXISTS {one_by_one} SYNC")


def test_an_applied_batch_leaves_nothing_in_the_stage_tables(clickhouse: tuple[Any, str]) -> None:
    """Once a batch is applied, the process's stage tables (Memory tables: the parsed events,
    the judged rows, the new rows, the rollup stage) hold nothing: an aggregator gone idle after
    a burst does not keep the last batch's rows in memory (the rollup stage of a batch of 250,000
    events held ~150 MiB of the engine's memory, docs/performance.md); the next batch still rolls
    up exactly."""
    client, db = clickhouse
    events = synthetic(400)
    proc = make_processor(client, db)

    def held() -> dict[str, int]:
        rows = client.query(
            "SELECT name, total_rows FROM system.tables WHERE database = {db:String} AND engine = 'Memory'",
            parameters={"db": db},
        ).result_rows
        return {str(name): int(n or 0) for name, n in rows}

    try:
        first = pack(events[:200], 0, 0, per_message=40)
        proc.process(first)
        stages = held()
        assert any(name.startswith("usage_stage_") for name in stages), stages
        assert any(name.startswith("new_stage_") for name in stages), stages
        assert all(n == 0 for n in stages.values()), stages
        proc.process(pack(events[200:], 0, len(first), per_message=40))
        assert all(n == 0 for n in held().values())

        got = as_one_clean_pass(client, db, events)
        assert len(got["raw"]) == len(events) and got["usage_15m"] and got["gauge_15m"]
    finally:
        proc.close()


def test_the_stage_of_new_rows_holds_a_group_per_partition_not_per_message(
    clickhouse: tuple[Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the normal path the rollup stage groups the batch's new rows per partition, not per
    Kafka message (rollup.stage_insert, ``per_message=False``): 200 events of one workstation in
    one window, sent in 5 messages on each of 2 partitions, are 2 stage rows, not 10; the period
    tables get every event once and each partition's highest offset as their watermark."""
    client, db = clickhouse
    window = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)

    def event(i: int) -> dict[str, Any]:
        return {
            "specversion": "1.0",
            "id": f"e{i}",
            "source": "test",
            "type": "workstation.cpu",
            "time": (window + timedelta(seconds=i)).isoformat().replace("+00:00", "Z"),
            "tenant": "acme",
            "data": {"workstation_id": "ws1", "cpu_seconds": 1.5},
        }

    events = [event(i) for i in range(400)]
    proc = make_processor(client, db)
    staged: list[tuple[int, int, int]] = []  # per stage row: partition, offset, events
    real_release = proc.writer.release_batch

    def release() -> None:  # the stage as catch_up left it, before the batch lets it go
        rows = client.query(
            f"SELECT src_partition, src_offset, value_count FROM {proc.writer._stage} ORDER BY src_partition"
        ).result_rows
        staged.extend((int(p), int(o), int(n)) for p, o, n in rows)
        real_release()

    monkeypatch.setattr(proc.writer, "release_batch", release)
    try:
        proc.process([*pack(events[:200], 0, 0, per_message=40), *pack(events[200:], 1, 7, per_message=40)])
        # one row per partition (one meter reads the type, one group), tagged with its last
        # offset: messages 0-4 and 7-11; a group per message would be 10 rows
        assert staged == [(0, 4, 200), (1, 11, 200)]
        for table in ("usage_15m", "usage_1h", "usage_1d", "usage_1mo"):
            marks = client.query(
                f"SELECT src_partition, max(src_offset) FROM {db}.{table} GROUP BY src_partition ORDER BY 1"
            ).result_rows
            assert [tuple(map(int, r)) for r in marks] == [(0, 4), (1, 11)], table
        total = client.query(
            f"SELECT sum(value_sum), sum(value_count) FROM {db}.usage_1h WHERE tenant = 'acme'"
        ).result_rows[0]
        assert (float(total[0]), int(total[1])) == (600.0, 400)
    finally:
        proc.close()
