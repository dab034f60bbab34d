"""Both cores busy (issue 11, item 2): a batch prepared while the one before it is applied.

The aggregator parses and judges batch N+1 (processor.prepare, on a stager: a client and stage
tables of its own) in one thread while batch N is applied in another (aggregators/app.py,
take.py). These tests drive the processor the way the aggregator's loop does, with real threads
on the real engine, and hold the result to one clean pass over the same events: the prepared
batch must be judged against nothing the batch before it writes (dedupe happens when it is
applied), and a preparation that no longer holds (messages applied meanwhile) is not used.
"""

from __future__ import annotations

import threading
from typing import Any

import orjson
import pytest

from aggregators.direct import make_processor, pack
from aggregators.processor import BatchProcessor, Prepared
from schemas.migrate import migrate
from tests.integration.test_rollup_from_new_rows import synthetic, tables

pytestmark = pytest.mark.clickhouse


def _in_thread(fn: Any, *args: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn(*args))
        except BaseException as exc:  # handed to the test
            out.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t, out


def _result(t: threading.Thread, out: list[Any]) -> Any:
    t.join(120)
    assert not t.is_alive()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def test_batches_prepared_while_the_one_before_is_applied_count_like_one_clean_pass(
    clickhouse: tuple[Any, str],
) -> None:
    client, db = clickhouse
    events = synthetic(900)
    events[450:450] = events[300:330]  # copies of events the batch before holds (retries)
    events[600:600] = [dict(events[500], id="")]  # rejected, dead-lettered
    batches, offset = [], 0
    for i in range(0, len(events), 150):  # one partition, offsets in order across batches
        batches.append(pack(events[i : i + 150], 0, offset, per_message=50))
        offset += len(batches[-1])

    proc = make_processor(client, db)
    assert proc.open_stagers(), "the test engine is a directory: stagers can be opened"
    assert proc.prepares_ahead
    stagers = []
    applied = 0
    try:
        first = proc.next_stager()
        stagers.append(first)
        ahead: Prepared = proc.prepare(batches[0], first)
        for k, batch in enumerate(batches):
            pending = None
            if k + 1 < len(batches):
                stager = proc.next_stager()
                stagers.append(stager)
                pending = _in_thread(proc.prepare, batches[k + 1], stager)
            stats = proc.process(batch, ahead)
            applied += stats.written
            if pending is not None:
                ahead = _result(*pending)
                assert ahead.messages is batches[k + 1]
    finally:
        rejects = list(proc.dead_letters.rejects)  # type: ignore[attr-defined]
        proc.close()

    # the stagers were taken in turn (a batch's rows stay until it is applied)
    assert stagers[0] is stagers[2] and stagers[1] is stagers[3] and stagers[0] is not stagers[1]
    assert len(rejects) == 1, rejects
    assert proc.prepared_ahead == len(batches)  # every batch applied from its preparation

    clean_db = f"{db}_clean"
    client.command(f"CREATE DATABASE {clean_db}")
    try:
        migrate(client, clean_db)
        clean = make_processor(client, clean_db)
        clean.process([m for b in batches for m in b])
        assert applied == 900  # the copies dropped, the bad event rejected
        assert tables(client, db) == tables(client, clean_db)
    finally:
        client.command(f"DROP DATABASE IF EXISTS {clean_db} SYNC")


def test_a_preparation_that_no_longer_holds_is_not_used(clickhouse: tuple[Any, str]) -> None:
    """A batch prepared ahead whose first messages were applied meanwhile (a redelivery after a
    rebalance): ``process`` prepares the messages still to apply again, on its own tables."""
    client, db = clickhouse
    events = synthetic(200)
    msgs = pack(events, 0, 0, per_message=50)
    later = sum(len(orjson.loads(m.value)) for m in msgs[2:])
    proc: BatchProcessor = make_processor(client, db)
    assert proc.open_stagers()
    try:
        stale = proc.prepare(msgs, proc.next_stager())  # all four messages, as fresh
        proc.process(msgs[:2])  # meanwhile the first two are applied
        stats = proc.process(msgs, stale)
        assert stats.skipped_messages == 2
        assert stats.written == later > 0
        assert proc.prepared_ahead == 0
        assert stats.duplicates == 0
    finally:
        proc.close()
    [(n,)] = client.query(f"SELECT count() FROM {db}.events_raw").result_rows
    assert n == 200


def test_an_agent_starting_waits_for_a_preparation_the_one_before_left_running(
    clickhouse: tuple[Any, str],
) -> None:
    """An agent that crashes may leave a preparation running in its thread; the agent faust
    starts instead (open_stagers, aggregators/app.py) waits for it before preparing on the same
    stage tables, so two preparations never write one stager's tables at once."""
    client, db = clickhouse
    msgs = pack(synthetic(100), 0, 0, per_message=50)
    proc: BatchProcessor = make_processor(client, db)
    assert proc.open_stagers()
    stager = proc.next_stager()
    judging, release = threading.Event(), threading.Event()
    judge = stager.judge

    def slow_judge(*args: Any) -> Any:
        judging.set()
        assert release.wait(60)
        return judge(*args)

    stager.judge = slow_judge  # type: ignore[method-assign]
    try:
        left, left_out = _in_thread(proc.prepare, msgs, stager)
        assert judging.wait(60)
        starting, started = _in_thread(proc.open_stagers)
        starting.join(1.0)
        assert starting.is_alive(), "the new agent did not wait for the preparation left running"
        release.set()
        assert _result(left, left_out).events == 100
        assert _result(starting, started) is True
    finally:
        release.set()
        proc.close()
