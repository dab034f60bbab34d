"""`metering replay --from-offset/--from-time` rebuilds raw and period tables from Kafka:
identical tables, and running it twice changes nothing."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from aggregators.direct import make_processor
from deploy.cli import app
from tests.integration.helpers import consume_all, event, produce_batches
from tests.integration.test_replay import snapshot

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]


def raw(client, db: str) -> list:
    return client.query(
        f"SELECT tenant, event_id, type, subject, time, data, src_partition, src_offset FROM {db}.events_raw "
        "ORDER BY tenant, event_id"
    ).result_rows


def test_replay_from_kafka_gives_identical_tables_twice(
    kafka_bootstrap, topic, clickhouse, clickhouse_dsn, monkeypatch
) -> None:
    client, db = clickhouse
    rng = random.Random(9)
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(days=3)
    evs = []
    for tenant in ("a", "b", "c"):
        evs.append(
            event(
                f"{tenant}-w",
                "workspace.created",
                {"workspace_id": "w", "name": "W", "tier": "pro"},
                base,
                tenant,
            )
        )
        for i in range(300):
            at = base + timedelta(minutes=rng.randint(0, 3 * 24 * 60))
            evs.append(
                event(
                    f"{tenant}-m{i}",
                    "ci.step.memory",
                    {
                        "contract_id": "c",
                        "workspace_id": "w",
                        "step_id": f"s{i % 4}",
                        "memory_mib": rng.randint(1, 512),
                    },
                    at,
                    tenant,
                )
            )
            evs.append(
                event(
                    f"{tenant}-r{i}",
                    "datastream.rows",
                    {
                        "workspace_id": "w",
                        "datastream_id": "d",
                        "total_rows": 5,
                        "row_keys": [f"k{rng.randint(0, 50)}" for _ in range(3)],
                    },
                    at,
                    tenant,
                )
            )
    evs += rng.sample(evs, 60)  # duplicates later in the log
    produce_batches(kafka_bootstrap, topic, evs, per_message=40)
    proc = make_processor(client, db)
    messages = consume_all(kafka_bootstrap, topic)
    for i in range(0, len(messages), 7):
        proc.process(messages[i : i + 7])
    before_raw, before = raw(client, db), snapshot(client, db)
    assert len(before_raw) == 3 * 601

    env = {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "METERING_TOPIC_EVENTS": topic,
        "METERING_CLICKHOUSE_DSN": clickhouse_dsn,
        "METERING_CLICKHOUSE_DATABASE": db,
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    runner = CliRunner()
    for _ in range(2):
        stamp = client.command(f"SELECT max(ingested_at) FROM {db}.events_raw")
        result = runner.invoke(app, ["replay", "--from-offset", "0"])
        assert result.exit_code == 0, result.output
        # it really rewrote the rows: every event again, the duplicates dropped again
        assert f"{3 * 601} events written, 60 duplicates" in result.output
        assert client.command(f"SELECT min(ingested_at) FROM {db}.events_raw") > stamp
        assert raw(client, db) == before_raw
        assert snapshot(client, db) == before

    # one tenant from a point in time: the others are untouched, the result identical
    result = runner.invoke(
        app, ["replay", "--from-time", (base + timedelta(days=1)).isoformat(), "--tenant", "b"]
    )
    assert result.exit_code == 0, result.output
    assert raw(client, db) == before_raw
    assert snapshot(client, db) == before


def test_replay_of_one_lane_finds_a_copy_in_a_later_chunk(
    kafka_bootstrap, topic, clickhouse, clickhouse_dsn, monkeypatch
) -> None:
    """A replay re-reads the log in chunks (at most 500 messages each). A copy of an event in a
    later chunk than its first occurrence is left out, as the live aggregator left it out, also
    when every message re-read is on one lane (one tenant: one partition)."""
    client, db = clickhouse
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)
    evs = [
        event(
            f"solo-{i}",
            "render.completed",
            {"workspace_id": "w", "render_id": f"r{i}", "output_duration_seconds": 1.5},
            base + timedelta(seconds=i),
            "solo",
        )
        for i in range(520)
    ]
    evs.append(evs[3])  # the same event again, 517 messages later
    produce_batches(kafka_bootstrap, topic, evs, per_message=1)
    proc = make_processor(client, db)
    messages = consume_all(kafka_bootstrap, topic)
    assert len({m.partition for m in messages}) == 1
    proc.process(messages)
    before_raw, before = raw(client, db), snapshot(client, db)
    assert len(before_raw) == 520

    for k, v in {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "METERING_TOPIC_EVENTS": topic,
        "METERING_CLICKHOUSE_DSN": clickhouse_dsn,
        "METERING_CLICKHOUSE_DATABASE": db,
    }.items():
        monkeypatch.setenv(k, v)
    result = CliRunner().invoke(app, ["replay", "--from-offset", "0"])
    assert result.exit_code == 0, result.output
    assert "replayed 521 messages: 520 events written, 1 duplicates" in result.output
    assert raw(client, db) == before_raw
    assert snapshot(client, db) == before
    # the period tables rebuilt from the raw table: the same again
    result = CliRunner().invoke(app, ["replay", "--from-raw", "--tenant", "solo"])
    assert result.exit_code == 0, result.output
    assert "rebuilt usage_15m" in result.output and "for solo" in result.output
    assert snapshot(client, db) == before
    # the replay's stage tables and probe database are its process's scratch: none is left
    # behind in the tables analysts read (the live processor's own dropped first)
    proc.close()
    left = client.query(
        "SELECT database, name FROM system.tables WHERE database LIKE {db:String} AND name LIKE '%stage%'",
        parameters={"db": f"{db}%"},
    ).result_rows
    assert left == []
