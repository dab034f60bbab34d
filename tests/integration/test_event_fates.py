"""Rejections and dropped duplicates are recorded once per source position (issue 10, item 1;
issue 8, item 4): a batch re-processed after a crash adds nothing to ``rejections``,
``event_duplicates`` or the dead-letter topic."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from aggregators.dead_letter import KafkaDeadLetterSink
from aggregators.direct import make_processor, pack
from aggregators.processor import BatchProcessor, ListSink
from aggregators.rejections import dedupe_dead_letters
from aggregators.replay import delete_raw_from
from aggregators.writer import ClickHouseWriter
from schemas.meters import default_catalog
from tests.integration.helpers import event

pytestmark = [pytest.mark.clickhouse]


def _batch(tenant: str) -> list[Any]:
    now = datetime.now(UTC) - timedelta(minutes=5)
    good = [
        event(f"g{i}", "egress.download", {"workspace_id": "w", "artifact_id": "a", "bytes": 10}, now, tenant)
        for i in range(3)
    ]
    bad = [
        event("b0", "egress.download", {"workspace_id": "w", "artifact_id": "a", "bytes": -1}, now, tenant),
        event("b1", "no.such.type", {}, now, tenant),
        event(
            "b2",
            "egress.download",
            {"workspace_id": "w", "artifact_id": "a", "bytes": 1},
            now - timedelta(days=60),
            tenant,
        ),
    ]
    dup = [
        event("g0", "egress.download", {"workspace_id": "w", "artifact_id": "a", "bytes": 99}, now, tenant)
    ]
    return good + bad + dup


def _count(client: Any, db: str, table: str, final: bool = False) -> int:
    return int(client.command(f"SELECT count() FROM {db}.{table}{' FINAL' if final else ''}"))


def test_a_batch_reprocessed_after_a_crash_records_its_rejections_once(clickhouse: tuple[Any, str]) -> None:
    client, db = clickhouse
    messages = pack(_batch("t1"), partition=0, start_offset=0, per_message=2)
    first = make_processor(client, db)
    stats = first.process(messages[:2])  # the crash: only part of the batch committed... then
    assert isinstance(first.dead_letters, ListSink)
    # ...a restarted processor gets the whole batch again from the last committed offset
    again = make_processor(client, db)
    again.process(messages)
    assert stats.rejected + len(again.dead_letters.rejects) == 3  # each reject dead-lettered once
    rows = client.query(
        f"SELECT event_id, code, origin, src_partition, src_offset FROM {db}.rejections FINAL ORDER BY event_id"
    ).result_rows
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("b0", "invalid_event", "aggregator"),
        ("b1", "unknown_type", "aggregator"),
        ("b2", "event_too_old", "aggregator"),
    ]
    assert _count(client, db, "rejections") == 3  # not only collapsed by FINAL: written once
    # a third pass from offset 0 (a replay) writes nothing more either
    third = make_processor(client, db)
    third.process(messages)
    assert third.dead_letters.rejects == [] and _count(client, db, "rejections") == 3
    dups = client.query(f"SELECT event_id, src_offset, nth FROM {db}.event_duplicates").result_rows
    assert dups == [("g0", messages[-1].offset, 0)]
    assert _count(client, db, "events_raw") == 3


class _Crash(Exception):
    pass


def test_copies_recorded_before_a_crash_are_not_recorded_again_by_a_batch_cut_otherwise(
    clickhouse: tuple[Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copies are recorded just before the raw insert; a crash in between leaves them, and
    the batch read again after the restart is cut differently (it starts at the committed
    offset, holds more messages): its insert token differs, yet no copy is recorded twice
    (seen as doubled rows read without FINAL in the exactly-once SIGKILL test)."""
    client, db = clickhouse
    now = datetime.now(UTC) - timedelta(minutes=5)
    evs = [
        event(
            f"e{i % 4}", "egress.download", {"workspace_id": "w", "artifact_id": "a", "bytes": i}, now, "t1"
        )
        for i in range(12)
    ]
    messages = pack(evs, partition=0, start_offset=0, per_message=3)
    first = make_processor(client, db)
    real_insert = ClickHouseWriter.insert_new

    def crash(self: ClickHouseWriter, *args: Any) -> None:
        raise _Crash("killed between the copies' record and the raw insert")

    monkeypatch.setattr(ClickHouseWriter, "insert_new", crash)
    with pytest.raises(_Crash):
        first.process(messages[:2])
    recorded = _count(client, db, "event_duplicates")
    assert recorded > 0 and _count(client, db, "events_raw") == 0
    monkeypatch.setattr(ClickHouseWriter, "insert_new", real_insert)
    again = make_processor(client, db)
    stats = again.process(messages)  # the whole batch: another cut, another token
    assert stats.written == 4 and stats.duplicates == 8
    assert _count(client, db, "event_duplicates") == 8  # not only collapsed by FINAL: once each
    assert _count(client, db, "event_duplicates", final=True) == 8


def test_copies_whose_part_a_crash_lost_are_recorded_by_the_batch_read_again(
    clickhouse: tuple[Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A non-replicated MergeTree writes an insert's deduplication token to its log *before* the
    part is renamed into place: a SIGKILL between the two loses the part and keeps the token
    (seen in the exactly-once SIGKILL test: event_duplicates' log named a part 2_2_1 absent from
    disk, and the 14 copies of the message it held were never recorded). Here the part's rows are
    deleted after the insert (the log keeps the token, like after that crash); the batch read
    again must record its copies, the same ones, so the same token would drop them."""
    client, db = clickhouse
    now = datetime.now(UTC) - timedelta(minutes=5)
    evs = [
        event(
            f"e{i % 3}", "egress.download", {"workspace_id": "w", "artifact_id": "a", "bytes": 1}, now, "t1"
        )
        for i in range(6)
    ]
    messages = pack(evs, partition=0, start_offset=0, per_message=3)  # originals, then their copies
    make_processor(client, db).process(messages[:1])
    real_insert = ClickHouseWriter.insert_new

    def crash(self: ClickHouseWriter, *args: Any) -> None:
        raise _Crash("killed after the copies' insert")

    monkeypatch.setattr(ClickHouseWriter, "insert_new", crash)
    with pytest.raises(_Crash):
        make_processor(client, db).process(messages[1:])
    assert _count(client, db, "event_duplicates") == 3
    client.command(f"ALTER TABLE {db}.event_duplicates DELETE WHERE 1", settings={"mutations_sync": 2})
    assert _count(client, db, "event_duplicates") == 0  # the part lost, its token still in the log
    monkeypatch.setattr(ClickHouseWriter, "insert_new", real_insert)
    stats = make_processor(client, db).process(messages[1:])  # the restart reads the message again
    assert stats.duplicates == 3
    rows = client.query(
        f"SELECT event_id, src_offset, nth FROM {db}.event_duplicates ORDER BY event_id"
    ).result_rows
    assert rows == [("e0", 1, 0), ("e1", 1, 0), ("e2", 1, 0)]


@pytest.mark.kafka
def test_dead_letter_consumer_dedupes_by_source_header(
    clickhouse: tuple[Any, str], kafka_bootstrap: str, topic: str
) -> None:
    """The one window left: a crash after the dead-letter flush and before the rejections
    insert sends the batch's rejects to the topic again; a consumer keeps each source once."""
    from confluent_kafka import Consumer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    client, db = clickhouse
    dlq = f"{topic}.dlq"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for fut in admin.create_topics([NewTopic(dlq, 1, 1)]).values():
        fut.result(timeout=30)
    messages = pack(_batch("t2"), partition=0, start_offset=0)
    for _ in range(2):  # the rejections table emptied between: as if the insert never ran
        sink = KafkaDeadLetterSink({"bootstrap.servers": kafka_bootstrap}, dlq, topic, f"{topic}.control")
        proc = BatchProcessor(ClickHouseWriter(client, db, default_catalog()), sink)
        proc.process(messages)
        sink.close()
        client.command(f"TRUNCATE TABLE {db}.rejections")
        client.command(f"TRUNCATE TABLE {db}.events_raw")
    c = Consumer(
        {"bootstrap.servers": kafka_bootstrap, "group.id": f"dlq-{topic}", "enable.auto.commit": False}
    )
    c.assign([TopicPartition(dlq, 0, 0)])
    got: list[Any] = []
    for _ in range(20):
        got.extend(m for m in c.consume(100, timeout=0.5) if not m.error())
        if len(got) >= 6:
            break
    c.close()
    assert len(got) == 6  # dead-lettered twice
    keep = dedupe_dead_letters(m.headers() or [] for m in got)
    assert sorted(got[i].headers()[2][1].decode().rsplit("/", 1)[1] for i in keep) == ["3", "4", "5"]


@pytest.mark.kafka
def test_the_cli_traces_lists_reconciles_and_dry_runs(
    clickhouse: tuple[Any, str],
    clickhouse_dsn: str,
    kafka_bootstrap: str,
    topic: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    from aggregators.direct import apply_events
    from deploy.cli import app

    client, db = clickhouse
    start = datetime.now(UTC)
    apply_events(client, db, _batch("cli"))
    for name, value in {
        "METERING_CLICKHOUSE_DSN": clickhouse_dsn,
        "METERING_CLICKHOUSE_DATABASE": db,
        "METERING_TOPIC_EVENTS": topic,
        "METERING_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
    }.items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(app, list(args))
        assert result.exit_code == 0, result.output
        return result.output

    traced = orjson.loads(run("events", "trace", "g0", "--tenant", "cli", "--json"))
    assert traced["status"] == "duplicate" and traced["counted_instead"]["meters"][0]["contribution"] == "10"
    assert "dropped copy" in run("events", "trace", "g0", "--tenant", "cli")
    assert orjson.loads(run("events", "trace", "g0", "--tenant", "other", "--json"))["status"] == "unknown"
    listed = run("events", "rejected", "--tenant", "cli")
    for code in ("invalid_event", "unknown_type", "event_too_old"):
        assert code in listed
    until = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    summary = orjson.loads(
        run("events", "summary", "--tenant", "cli", "--from", start.isoformat(), "--to", until, "--json")
    )
    assert summary == {
        "received": 7,
        "counted": 3,
        "duplicates": 1,
        "rejected": 3,
        "rejected_by_ingest": 0,
        "rejected_by_aggregator": 3,
        "in_flight": 0,
    }
    dry = run("dlq", "redrive", "--tenant", "cli", "--dry-run")
    assert "rejected again: unknown_type" in dry and "backfill" in dry


def test_a_period_insert_whose_part_a_crash_lost_is_written_by_the_batch_read_again(
    clickhouse: tuple[Any, str],
) -> None:
    """The same window for the period tables (their inserts carry a token made of the offset
    spans they roll up): the part lost after the insert, the batch redelivered after the restart
    is skipped by the raw watermark, and the catch-up rolls up the very same span again: the
    same token. The period table must get the span's rows all the same."""
    client, db = clickhouse
    now = datetime.now(UTC) - timedelta(minutes=5)
    evs = [
        event(f"u{i}", "egress.download", {"workspace_id": "w", "artifact_id": "a", "bytes": 10}, now, "t1")
        for i in range(6)
    ]
    messages = pack(evs, partition=0, start_offset=0, per_message=3)
    make_processor(client, db).process(messages)
    total = f"SELECT sum(value_sum) FROM {db}.usage_15m WHERE tenant = 't1'"
    assert int(client.command(total)) == 60
    client.command(f"ALTER TABLE {db}.usage_15m DELETE WHERE 1", settings={"mutations_sync": 2})
    assert int(client.command(f"SELECT count() FROM {db}.usage_15m")) == 0  # lost, token kept
    stats = make_processor(client, db).process(messages)  # redelivered: skipped, then the catch-up
    assert stats.skipped_messages == 2
    assert int(client.command(total)) == 60


def test_rejections_whose_part_a_crash_lost_are_recorded_by_the_batch_read_again(
    clickhouse: tuple[Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same window for ``rejections`` (its token is made of the rejects' positions): the part
    lost after the insert, the batch read again dead-letters its rejects again (none recorded)
    and must record them."""
    client, db = clickhouse
    messages = pack(_batch("t1"), partition=0, start_offset=0, per_message=7)
    monkeypatch.setattr(ClickHouseWriter, "insert_new", _raise)
    with pytest.raises(_Crash):
        make_processor(client, db).process(messages)
    assert _count(client, db, "rejections") == 3
    client.command(f"ALTER TABLE {db}.rejections DELETE WHERE 1", settings={"mutations_sync": 2})
    monkeypatch.undo()
    again = make_processor(client, db)
    again.process(messages)
    assert isinstance(again.dead_letters, ListSink) and len(again.dead_letters.rejects) == 3
    assert _count(client, db, "rejections") == 3


def _raise(self: ClickHouseWriter, *args: Any) -> None:
    raise _Crash("killed after the rejections' insert")


def test_a_raw_insert_whose_part_a_crash_lost_is_written_again_with_the_same_rows(
    clickhouse: tuple[Any, str],
) -> None:
    """The same window for ``events_raw``: its rows carry ``ingested_at``, so rows inserted again
    after a restart differ from the lost insert's, but only while the clock has moved. Here the
    same rows are inserted again at the same instant after their part was lost (its block id
    still in the log): they must be written all the same (no deduplication on a non-replicated
    table, aggregators/insert_token.py)."""
    client, db = clickhouse
    now = datetime.now(UTC) - timedelta(minutes=5)
    evs = [
        event(
            f"r{i}", "egress.download", {"workspace_id": "w", "artifact_id": f"a{i}", "bytes": 1}, now, "t1"
        )
        for i in range(4)
    ]
    messages = pack(evs, 0, 0, per_message=4)
    pinned = datetime.now(UTC)
    proc = BatchProcessor(ClickHouseWriter(client, db, default_catalog()), ListSink(), clock=lambda: pinned)
    proc.process(messages)
    assert _count(client, db, "events_raw") == 4
    # the part lost, its block id kept: its rows gone (with their keys, which a lost raw part
    # never had: the keys are inserted after it), the same batch applied again at the same instant
    delete_raw_from(proc.writer, {0: 0}, None)
    assert _count(client, db, "events_raw") == 0
    proc.process(messages)
    assert _count(client, db, "events_raw") == 4
