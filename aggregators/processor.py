"""One batch of Kafka messages, applied to ClickHouse exactly once.

Python handles Kafka messages; ClickHouse handles events (stage.py). The steps, in this order
(why each is safe after a crash: docs/exactly-once.md):
1. skip messages already in ``events_raw`` (offset <= its watermark for the partition);
2. per message, in Python: its syntax and size (a message that is not JSON, or too large, is
   rejected whole), no per-event work; the control topic's messages (lifecycle events: few,
   written by administrators, folded into ``entities``) are left to pydantic whole;
3. the messages' values, joined, parsed by ClickHouse into a stage table (one insert; a message
   the engine cannot read is found by bisecting and left to pydantic), then judged by SQL
   generated from the pydantic models; pydantic decides (and words the reject of) every event
   the SQL does not accept. Rejects go to the dead-letter topic, flushed *before* anything is
   written, so a rejected event is never lost, then to the ``rejections`` table (once per
   source position: aggregators/rejections.py).
   The stage tables are Memory tables of this process: nothing anyone reads;
3b. the judged lifecycle events tried on probe tables that keep nothing (preflight.py, copied
   inside the engine; every judged row when an operator changed a derived table's types):
   events ClickHouse would refuse in a derived statement (a data error, not an outage) are
   dead-lettered, flushed before anything is written;
4. the batch's new events selected (dedupe: within the batch, then a lookup of their keys in
   ``event_keys``, brought up to ``events_raw`` first if a crash left it behind) into a Memory table of this process, and the rollup stage filled from them,
   with their gauge values converted: the derived statements' conversions, run *before* the raw
   insert, are the trial of the usage events (an event they refuse is isolated and
   dead-lettered like in 3b); then the copies dedupe drops recorded in ``event_duplicates``, and
   the new rows inserted into ``events_raw`` in one statement, one part, and their keys into
   ``event_keys`` (RocksDB: an upsert) right after, then ``event_key_watermarks`` moved;
5. bring every derived table up to the raw table (one statement per table): the period tables
   from the stage of step 4 when each was up to date before the batch, else (a crash, an
   outage left one behind) from ``events_raw`` above its own watermark;
6. record freshness. Only after ``process`` returns may the offsets be committed.

Steps 2 and 3 write only this process's stage tables and depend on nothing stored, so the
aggregator runs them for the next batch while this one is applied (``prepare``, on a stager of
its own; aggregators/app.py): the engine's calls release the GIL, so both cores work.

``process_with_retry`` retries a batch that fails for any other reason (an outage), with
backoff, for as long as it takes; meanwhile ``stalled_since`` and ``last_error`` say so (the
aggregator health check reads them) and ``metering_aggregator_stalled_seconds_total`` counts.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from aggregators import metrics, rejections
from aggregators.decode import (
    MAX_EVENT_BYTES,
    Decoded,
    Item,
    RawRow,
    Reject,
    SourceMessage,
    decode_items,
    message_items,
)
from aggregators.errors import NotTheData, is_data_error, reason
from aggregators.faults import CrashPoint, checkpoint
from aggregators.preflight import Preflight, isolate
from aggregators.rollup import Ranges
from aggregators.stage import Batch
from aggregators.writer import ClickHouseWriter
from schemas.clickhouse import Table, chdb_path
from schemas.validation import RejectCode
from schemas.wire import is_control_lane

log = logging.getLogger(__name__)

#: the stages of a batch, as ``BatchProcessor.timings`` sums their seconds
STAGES = (
    "prepare",
    "parse_validate",
    "fallback",
    "trial",
    "dedupe_stage",
    "raw_insert",
    "rollups",
    "freshness",
)


class DeadLetterSink(Protocol):
    def send(self, rejects: Sequence[Reject]) -> None: ...
    def flush(self) -> None: ...


class ListSink:
    """Keeps rejects in memory (tests, replay, direct application)."""

    def __init__(self) -> None:
        self.rejects: list[Reject] = []

    def send(self, rejects: Sequence[Reject]) -> None:
        self.rejects.extend(rejects)

    def flush(self) -> None:
        return None


@dataclass
class BatchStats:
    messages: int = 0
    skipped_messages: int = 0
    events: int = 0
    written: int = 0
    duplicates: int = 0
    rejected: int = 0  # invalid events, dead-lettered
    refused: int = 0  # valid events ClickHouse refuses to store, dead-lettered
    tenants: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Prepared:
    """A batch parsed and judged (steps 2 and 3), nothing written: what ``process`` goes on from."""

    messages: Sequence[SourceMessage]  # the batch, every message still to be applied when prepared
    items: list[list[Item]]  # per message, its events' raw bytes (views of the message's value)
    rejects: list[Reject]  # messages rejected whole
    python: list[int]  # messages pydantic decides whole
    flagged: list[tuple[int, int]]  # (message, position) of the events the SQL did not accept
    events: int
    rows_table: str  # where the accepted events wait (the stager's rows table)


class WrittenMeanwhile(Exception):
    """Another process wrote partitions of the batch while it was being applied (the fence,
    ``process`` step 4a): nothing of it was written; it is applied again from the watermarks."""

    def __init__(self, partitions: Sequence[int]) -> None:
        super().__init__(f"partitions {list(partitions)} were written by another process during the batch")
        self.partitions = list(partitions)


class BatchProcessor:
    def __init__(
        self,
        writer: ClickHouseWriter,
        dead_letters: DeadLetterSink,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        preflight: Preflight | None = None,
        stagers: Sequence[ClickHouseWriter] = (),
    ) -> None:
        self.writer = writer
        # writers of their own (each with its own client and stage tables) that prepare the
        # next batches while ``writer`` applies one: ``prepare``
        self._stagers = list(stagers)
        self._next_stager = 0
        # held by a preparation on a stager: an agent that crashed may leave one running, and the
        # agent started after it waits for it (open_stagers) before preparing on the same tables
        self._preparing = threading.Lock()
        #: batches applied from a preparation made ahead (``prepare``)
        self.prepared_ahead = 0
        self.dead_letters = dead_letters
        self.clock = clock
        self.preflight = preflight or Preflight(writer)
        #: seconds spent per stage (``STAGES``) since start, summed over batches (the bench)
        self.timings: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        #: the lanes acquired and not revoked since (what the tests wait on after a rebalance)
        self.owned: set[int] = set()
        # A batch ClickHouse does not take: since when (UTC; None while batches flow) and why.
        # Read by the aggregator health check (deploy/runner.py) from another thread.
        self.stalled_since: datetime | None = None
        self.last_error: str | None = None
        self._stall_started: float | None = None  # monotonic
        self._stall_counted: float = 0.0  # monotonic: stalled seconds counted up to here
        metrics.watch_stall(self)

    # ---- partition ownership ------------------------------------------------------------------

    def acquire(self, partitions: Sequence[int]) -> None:
        """Partitions (lanes) this process owns from now on: another process may have written
        them since this one last did, so their cached watermarks are dropped and re-read."""
        self.writer.forget(partitions)
        self.owned.update(partitions)

    def revoke(self, partitions: Sequence[int]) -> None:
        # Another process may write these partitions now: our cached watermarks would go stale.
        self.writer.forget(partitions)
        self.owned.difference_update(partitions)
        metrics.forget_lag(list(partitions))

    def close(self) -> None:
        self.preflight.close()
        self.writer.close()
        for stager in self._stagers:  # their clients are theirs alone
            with contextlib.suppress(Exception):
                stager.close()
            with contextlib.suppress(Exception):
                stager.client.close()
        self._stagers = []

    # ---- the batch ----------------------------------------------------------------------------

    def process(self, messages: Sequence[SourceMessage], ahead: Prepared | None = None) -> BatchStats:
        """Apply ``messages``; ``ahead``: their preparation (``prepare``), used when it
        still holds (every message of it is still to be applied), else prepared again here."""
        stats = BatchStats(messages=len(messages))
        if not messages:
            return stats
        started = time.perf_counter()
        partitions = sorted({m.partition for m in messages})
        raw_wm = self.writer.watermarks(Table.EVENTS_RAW, partitions)
        # event_keys (the dedupe's lookup) up to events_raw: behind only after a crash between the
        # raw insert and the keys insert (step 4b). Every lane owned, not only the batch's: a
        # tenant's lifecycle events are in a control lane, its usage events in a usage lane, and
        # the lookup is by (tenant, event id) across lanes (cached watermarks: no query when up
        # to date)
        lanes = sorted(self.owned.union(partitions))
        self.writer.keys_catch_up(self.writer.watermarks(Table.EVENTS_RAW, lanes))
        fresh: Sequence[SourceMessage] = [m for m in messages if m.offset > raw_wm[m.partition]]
        stats.skipped_messages = len(messages) - len(fresh)
        timings = self.timings
        if ahead is None or ahead.messages is not messages or len(fresh) != len(messages):
            ahead = self.prepare(fresh, self.writer)  # its own stage tables
        else:
            self.prepared_ahead += 1
            metrics.BATCHES_PREPARED_AHEAD.inc()
        stats.events = ahead.events
        fresh = ahead.messages
        rejects, storage_rejects = self._write_new(ahead, stats, raw_wm, fence=True)
        t4 = time.perf_counter()
        ranges: dict[int, tuple[int, int]] = {}
        for m in fresh:
            lo, hi = ranges.get(m.partition, (m.offset - 1, m.offset))
            ranges[m.partition] = (min(lo, m.offset - 1), max(hi, m.offset))
        written = self.writer.written(Ranges(ranges)) if ranges else []
        stats.written = sum(w[5] for w in written)
        accepted_events = stats.events - stats.rejected - stats.refused
        stats.duplicates = max(0, accepted_events - stats.written)

        # 5. every derived table up to the raw table
        applied = self.writer.catch_up(partitions)
        checkpoint(CrashPoint.AFTER_DERIVED)
        t5 = time.perf_counter()
        timings["rollups"] += t5 - t4

        last_time: dict[str, datetime] = {}
        for tenant, _p, last, _lo, _hi, _n in written:
            if last > last_time.get(tenant, datetime.min.replace(tzinfo=UTC)):
                last_time[tenant] = last
        refreshed = self.clock()
        self.writer.touch_freshness(last_time, refreshed)
        stats.tenants = set(last_time)
        self.writer.release_batch()
        timings["freshness"] += time.perf_counter() - t5

        metrics.BATCHES.inc()
        metrics.EVENTS_IN.inc(stats.events)
        metrics.EVENTS_WRITTEN.inc(stats.written)
        metrics.DUPLICATES.inc(stats.duplicates)
        for rej in (*rejects, *storage_rejects):
            metrics.REJECTED.labels(rej.code).inc()
        metrics.DEAD_LETTERED.inc(len(rejects) + len(storage_rejects))
        for table, n in applied.items():
            metrics.ROWS_WRITTEN.labels(table.value).inc(n)
        metrics.FLUSH_SECONDS.observe(time.perf_counter() - started)
        _record_freshness(written, fresh, refreshed)
        checkpoint(CrashPoint.AFTER_BATCH)
        return stats

    def rewrite(
        self, messages: Sequence[SourceMessage]
    ) -> tuple[BatchStats, tuple[datetime, datetime] | None]:
        """Write ``messages`` to events_raw again, on the batch's own path (steps 2 to 4b): what
        ``metering replay`` does with the messages it re-reads (aggregators/replay.py), after it
        deleted their raw rows and their keys (``replay.delete_raw_from``). So nothing is skipped
        by the raw watermark (a replay of one tenant leaves the others' rows above it), there is
        no fence (a replay is the only writer) and the derived tables are left to the rebuild
        that follows (``replay.rebuild_from_raw``). The dedupe is the live one: a copy of an
        event counted earlier in the log, or earlier in the replay, is left out (its key is in
        event_keys). Returns the stats and the event-time span of the rows written."""
        stats = BatchStats(messages=len(messages))
        if not messages:
            return stats, None
        lanes = sorted({m.partition for m in messages})
        raw_wm = self.writer.watermarks(Table.EVENTS_RAW, lanes)
        self.writer.keys_catch_up(raw_wm)
        ahead = self.prepare(messages, self.writer)
        stats.events = ahead.events
        self._write_new(ahead, stats, raw_wm, fence=False)
        stats.written, span = self.writer.new_span()
        stats.duplicates = max(0, stats.events - stats.rejected - stats.refused - stats.written)
        self.writer.forget()  # the raw watermarks: a replay's rows may sit below them
        self.writer.release_batch()
        return stats, span

    def _write_new(
        self, ahead: Prepared, stats: BatchStats, raw_wm: dict[int, int], fence: bool
    ) -> tuple[list[Reject], list[Reject]]:
        """Steps 3 (pydantic's part) to 4b of a prepared batch: the events the SQL did not accept
        decided by pydantic and the rejects dead-lettered, the trial, the new rows selected and
        inserted into events_raw and their keys into event_keys. ``fence``: check first that
        nobody else wrote the batch's partitions since ``raw_wm`` was read (``process``).
        Returns the rejects and the events the engine refused (both dead-lettered)."""
        timings = self.timings
        self.writer.read_rows_from(ahead.rows_table)
        fresh = ahead.messages
        items, python, flagged = ahead.items, ahead.python, ahead.flagged
        decoded = Decoded(rejects=list(ahead.rejects))
        t2 = time.perf_counter()
        positions: dict[int, list[int]] = defaultdict(list)
        for mi, pos in flagged:
            positions[mi].append(pos)
        for mi in sorted(python):
            positions[mi] = list(range(len(items[mi])))
        accepted: list[tuple[int, RawRow]] = []
        for mi, ps in sorted(positions.items()):
            d = decode_items(fresh[mi], items[mi], ps)
            decoded.rejects.extend(d.rejects)
            accepted.extend((mi, r) for r in d.rows)
        stats.rejected = len(decoded.rejects)
        if decoded.rejects:  # each once, also in the rejections table (aggregators/rejections.py)
            rejections.dead_letter(self.dead_letters, self.writer, decoded.rejects, fresh, self.clock())
        storage_rejects = self._add_rows(accepted, fresh)
        t3 = time.perf_counter()
        timings["fallback"] += t3 - t2

        # 3b. the judged rows tried on probe tables that keep nothing (preflight.py): events the
        # engine would refuse in a derived statement are dead-lettered before anything is written
        now = self.clock()
        excluded: list[tuple[int, int]] = []
        refusals = self.preflight.staged_refusals(self.writer.rows_table, now)
        t3b = time.perf_counter()
        timings["trial"] += t3b - t3

        # 4. the new events (deduplicated: stage.new_insert), and the rollup stage filled from
        # them: the statement catch_up would run on them after the raw insert, run before it
        # instead, so it is their trial (refused events are isolated and left out, below)
        excluded.extend(k for k, _ in refusals)
        refusals.extend(self._new_rows(excluded, raw_wm))
        t3c = time.perf_counter()
        timings["dedupe_stage"] += t3c - t3b
        if refusals:
            refused_rejects = []
            for (mi, pos), why in refusals:
                m = fresh[mi]
                log.warning(
                    "event %d of message %d/%d refused by ClickHouse: %s", pos, m.partition, m.offset, why
                )
                refused_rejects.append(
                    Reject(
                        m.partition, m.offset, pos, RejectCode.STORAGE_REJECTED, why, bytes(items[mi][pos])
                    )
                )
            rejections.dead_letter(self.dead_letters, self.writer, refused_rejects, fresh, now)
            storage_rejects.extend(refused_rejects)
        stats.refused = len(storage_rejects)

        # 4a. The fence: nobody else wrote the batch's partitions since it began. The ownership
        # rules (aggregators/app.py) give a live member its partitions alone; a member frozen longer
        # than its session timeout (SIGSTOP, a long VM or GC pause) lost them without knowing and,
        # resumed, goes on with its batch, its watermarks and its new rows judged before the new
        # owner wrote the same offsets: both would insert them (the chaos suite's SIGSTOP
        # scenario, docs/exactly-once.md). Found here, nothing of the batch is written yet: it is
        # applied again from the watermarks as they are (process_with_retry).
        moved = self.writer.raw_moved(raw_wm) if fence else []
        if moved:
            raise WrittenMeanwhile(moved)

        # 4b. the copies dedupe drops, recorded; then the new events into events_raw: one statement
        self.writer.record_duplicates(now, excluded, [m.timestamp_ms for m in fresh])
        checkpoint(CrashPoint.BEFORE_RAW_INSERT)
        self.writer.insert_new(now)
        checkpoint(CrashPoint.RAW_BEFORE_KEYS)
        self.writer.insert_keys(now)
        checkpoint(CrashPoint.AFTER_RAW_INSERT)
        timings["raw_insert"] += time.perf_counter() - t3c
        return decoded.rejects, storage_rejects

    # ---- preparing a batch (steps 2 and 3): its own tables, no side effect -------------------

    def open_stagers(
        self,
        connect: Callable[[], Any] | None = None,
        settings: dict[str, Any] | None = None,
        caps: Any = None,
    ) -> bool:
        """Give this processor the two stagers ``prepare`` needs, each a writer with a client of
        its own: from ``connect`` (a ClickHouse server), by default another connection to the
        writer's embedded engine, with ``settings`` on every statement and the engine's ``caps``
        (schemas.clickhouse.connect_part). False when none can be made (an engine in memory):
        batches are then prepared by ``process`` itself, one after another. Called when an
        agent starts: a preparation the agent before it left running is waited for first."""
        with self._preparing:
            pass
        if self.prepares_ahead:
            return True
        if connect is None:
            path = chdb_path(self.writer.client)
            if not path or path == ":memory:":
                return False
            database = self.writer.db

            def connect() -> Any:
                from schemas.clickhouse import connect_part

                return connect_part(f"chdb://{path}", database, settings, engine=caps)

        self._stagers = [ClickHouseWriter(connect(), self.writer.db, self.writer.catalog) for _ in range(2)]
        return True

    @property
    def prepares_ahead(self) -> bool:
        """Whether ``prepare`` can run beside ``process`` (stagers of their own)."""
        return len(self._stagers) >= 2

    def next_stager(self) -> ClickHouseWriter:
        """The stager to prepare the next batch ahead with (``prepare``). The caller takes them in
        the order it applies the batches, and applies (or drops) each batch before preparing the
        one two after it: a batch's rows are read from its stager's tables until it is applied."""
        stager = self._stagers[self._next_stager % len(self._stagers)]
        self._next_stager += 1
        return stager

    def prepare(self, fresh: Sequence[SourceMessage], stager: ClickHouseWriter) -> Prepared:
        """Steps 2 and 3 of ``fresh`` on ``stager``: ``self.writer`` when ``process`` prepares
        its batch itself, else a stager (``next_stager``) preparing the batch after the one
        ``process`` may be applying meanwhile, in another thread with another client (the
        engine's calls release the GIL, so both cores work). Writes only the stager's tables of
        this process; ``process(messages, ahead=...)`` goes on from it if every message is still
        to be applied then."""
        if stager is self.writer:
            return self._prepare(fresh, stager)
        with self._preparing:
            return self._prepare(fresh, stager)

    def _prepare(self, fresh: Sequence[SourceMessage], stager: ClickHouseWriter) -> Prepared:
        timings = self.timings
        # 2. per message (Python): its events as raw bytes, or the reject of the whole message
        t0 = time.perf_counter()
        items: list[list[Item]] = []
        decoded = Decoded()
        staged: list[int] = []  # indexes (in fresh) of the messages the engine parses
        python: list[int] = []  # indexes of the messages pydantic decides whole
        for i, m in enumerate(fresh):
            its = message_items(m)
            if isinstance(its, Reject):
                decoded.rejects.append(its)
                items.append([])
                continue
            items.append(its)
            if is_control_lane(m.partition) or not _stageable(m.value, its):
                python.append(i)
            elif its:
                staged.append(i)
        events = sum(len(x) for x in items) + sum(1 for r in decoded.rejects if r.index < 0)
        t1 = time.perf_counter()
        timings["prepare"] += t1 - t0

        # 3. ClickHouse parses and judges the staged messages; what it refuses to read, or does
        # not accept, pydantic decides (and words the reject)
        refused = self._stage(fresh, staged, stager)
        python.extend(refused)
        counts = [0] * len(fresh)
        refused_set = set(refused)
        for i in staged:
            if i not in refused_set:
                counts[i] = len(items[i])
        flagged = stager.judge(Batch.of(fresh, counts))
        timings["parse_validate"] += time.perf_counter() - t1
        return Prepared(fresh, items, decoded.rejects, python, flagged, events, stager.own_rows_table)

    def _new_rows(
        self, excluded: list[tuple[int, int]], since: dict[int, int]
    ) -> list[tuple[tuple[int, int], str]]:
        """The batch's new events selected (``excluded`` left out) and the rollup stage filled
        from them; returns the (message, position) of the events the stage's statement refuses
        (a data error: a value ``toDecimal128`` cannot hold), with the engine's reason, after
        leaving them out too (appended to ``excluded``).

        Why this is a safe trial: it is the very statement (rollup.stage_insert) that fills the
        stage from events_raw, over the very rows the raw insert then writes (``new``), and its
        conversions are row by row (its sums wrap without an error); the period statements read
        the stage's typed values and convert nothing (unless an operator changed a period table:
        then the preflight tries them, preflight.py). So a refusal shows here, before anything
        is written, and the stage it leaves serves the period tables (writer.catch_up)."""

        def trial(keys: Sequence[tuple[int, int]] | None) -> BaseException | None:
            try:
                self.writer.stage_new(since, keys)
            except Exception as exc:
                if is_data_error(exc):
                    return exc
                raise
            return None

        refused: list[tuple[tuple[int, int], str]] = []
        self.writer.select_new(excluded)
        # Until the new rows pass: leaving a refused event out can make a later copy of it (same
        # id, later in the batch) the first occurrence, which the next round refuses in turn.
        while (first := trial(None)) is not None:
            found = isolate(self.writer.new_keys(), trial, lambda: trial([]))
            if not found:
                raise NotTheData("the new events failed once, then passed", first)
            refused.extend((key, reason(exc)) for key, exc in found)
            excluded.extend(key for key, _ in found)
            self.writer.select_new(excluded)
        return refused

    def _stage(
        self, fresh: Sequence[SourceMessage], staged: list[int], stager: ClickHouseWriter | None = None
    ) -> list[int]:
        """Parse the ``staged`` messages into the stage of ``stager`` (default: the writer's);
        returns those the engine cannot read (found by bisecting: a data error that an event of
        one message reproduces on its own), which are left out of the stage."""
        into = stager or self.writer

        def body(idx: Sequence[int]) -> bytes:
            # one JSON array of the messages' events, built in one copy (empty: no messages)
            parts: list[bytes | memoryview] = []
            for i in idx:
                parts += (b",", _inner(fresh[i].value))
            if not parts:
                return b""
            parts[0] = b"["
            parts.append(b"]")
            return b"".join(parts)

        def trial(idx: Sequence[int]) -> BaseException | None:
            try:
                into.stage_events(body(idx))
            except Exception as exc:
                if is_data_error(exc):
                    return exc
                raise
            return None

        bad = isolate(staged, trial, lambda: None)
        if not bad:
            return []
        out = [i for i, _ in bad]
        for i, exc in bad:
            log.info("message %d/%d left to pydantic: %s", fresh[i].partition, fresh[i].offset, reason(exc))
        rest = [i for i in staged if i not in set(out)]
        into.stage_events(body(rest))
        return out

    def _add_rows(self, accepted: list[tuple[int, RawRow]], fresh: Sequence[SourceMessage]) -> list[Reject]:
        """Rows pydantic accepted into the rows table. Rows the engine refuses to store (a data
        error, not an outage) are isolated and dead-lettered as ``storage_rejected``, flushed
        before anything is written."""
        if not accepted:
            return []

        def trial(part: Sequence[tuple[int, RawRow]]) -> BaseException | None:
            try:
                self.writer.add_rows(part, probe=True)  # a scratch copy: keeps nothing
            except Exception as exc:
                if is_data_error(exc):
                    return exc
                raise
            return None

        bad = isolate(accepted, trial, lambda: None)
        out: list[Reject] = []
        if bad:
            refused = {id(r) for r, _ in bad}
            by_source = {(m.partition, m.offset): m for m in fresh}
            for (_mi, row), exc in bad:
                log.warning(
                    "event %s/%s (partition %d offset %d) refused by ClickHouse: %s",
                    row.tenant,
                    row.event_id,
                    row.partition,
                    row.offset,
                    reason(exc),
                )
                msg = by_source[(row.partition, row.offset)]
                items = message_items(msg)
                original = bytes(items[row.position]) if not isinstance(items, Reject) else msg.value
                out.append(
                    Reject(
                        row.partition,
                        row.offset,
                        row.position,
                        RejectCode.STORAGE_REJECTED,
                        reason(exc),
                        original,
                    )
                )
            accepted = [x for x in accepted if id(x) not in refused]
            rejections.dead_letter(self.dead_letters, self.writer, out, fresh, self.clock())
        self.writer.add_rows(accepted)
        return out

    def process_with_retry(
        self,
        messages: Sequence[SourceMessage],
        should_stop: Callable[[], bool] = lambda: False,
        max_backoff_s: float = 30.0,
        ahead: Prepared | None = None,
    ) -> BatchStats | None:
        """``process`` until it succeeds; None if and only if the batch was NOT applied (a stop
        was asked while it was failing), so its offsets must not be committed.

        A ClickHouse outage stalls the batch (and so the commit of its offsets) instead of
        losing it; each retry starts from the watermarks re-read from ClickHouse, so a statement
        that landed before the error is not repeated. Events ClickHouse refuses because of their
        data never get here: ``process`` dead-letters them (``_add_rows``). While a batch is
        stalled, ``stalled_since``/``last_error`` say so and the stall metrics count.
        ``ahead``: the batch's preparation (``prepare``), for the first try only."""
        delay = 0.2
        while True:
            try:
                stats = self.process(messages, ahead)
            except WrittenMeanwhile as exc:
                # Not an outage: the partitions moved on under this batch. Applied again at once
                # from the watermarks as they are now (what another process wrote is skipped by
                # offset, or dropped by the dedupe); unless the caller gives up (a revocation,
                # which is what usually follows).
                log.warning("%s; applying it again from their watermarks", exc)
                self.writer.forget()
                ahead = None
                if should_stop():
                    return None
                continue
            except Exception as exc:  # the engine's and the driver's errors have no common base
                metrics.CLICKHOUSE_ERRORS.inc()
                self._stalled(exc)
                log.warning("applying batch failed (%s); retrying in %.1fs", self.last_error, delay)
                self.writer.forget()
                ahead = None  # prepared again from the watermarks the retry reads
                if self._wait(delay, should_stop):
                    # Given up (a stop, or the batch's partitions went to another process): this
                    # processor no longer waits on anything, so it reports no stall.
                    self._end_stall()
                    return None
                delay = min(max_backoff_s, delay * 2)
                continue
            self._flowing()
            return stats

    # ---- stalls -------------------------------------------------------------------------------

    def stalled_seconds(self) -> float:
        """How long the current batch has been failing; 0 while batches flow."""
        started = self._stall_started
        return 0.0 if started is None else time.monotonic() - started

    def _stalled(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self._stall_started is None:
            self._stall_started = self._stall_counted = now
            self.stalled_since = datetime.now(UTC)
        if is_data_error(exc):
            # Validation let through rows a derived statement refuses: the rows may be in
            # events_raw already (see docs/exactly-once.md).
            self.last_error = (
                f"ClickHouse refuses data the preflight did not foresee, {reason(exc)} "
                "(if the rows are already in events_raw, see docs/exactly-once.md)"
            )
            try:
                self.preflight.reset()
            except Exception as reset_exc:  # an outage on top: the next trial retries it
                log.warning("could not drop the probe tables: %s", reset_exc)
        else:
            self.last_error = reason(exc)
        self._count_stall(now)

    def _count_stall(self, now: float) -> None:
        metrics.STALLED_SECONDS.inc(max(0.0, now - self._stall_counted))
        self._stall_counted = now

    def _wait(self, delay: float, should_stop: Callable[[], bool]) -> bool:
        """Sleep ``delay`` seconds in short steps, counting the stall as it goes; True as soon
        as a stop is asked."""
        deadline = time.monotonic() + delay
        while True:
            now = time.monotonic()
            self._count_stall(now)
            if should_stop():
                return True
            if now >= deadline:
                return False
            time.sleep(min(0.5, deadline - now))

    def _flowing(self) -> None:
        if self._stall_started is not None:
            log.info("batches flow again after a stall of %.1fs", self.stalled_seconds())
        self._end_stall()

    def _end_stall(self) -> None:
        if self._stall_started is not None:
            self._count_stall(time.monotonic())
        self._stall_started = None
        self.stalled_since = None
        self.last_error = None


def _record_freshness(
    written: Sequence[tuple[str, int, datetime, int, int, int]],
    messages: Sequence[SourceMessage],
    refreshed: datetime,
) -> None:
    """``metering_tenant_freshness_seconds`` of every tenant written: from the ingest accepting
    the tenant's oldest event of the batch (the timestamp of the first Kafka message it was
    written from, the instant the ingest judged it by) to ``refreshed``, when the tenant's
    tables were refreshed with it."""
    accepted = {(m.partition, m.offset): m.timestamp_ms for m in messages}
    oldest: dict[str, int] = {}
    for tenant, part, _last, lo, _hi, _n in written:
        ts = accepted.get((part, lo))
        if ts is not None and ts < oldest.get(tenant, ts + 1):
            oldest[tenant] = ts
    refreshed_ms = refreshed.timestamp() * 1000
    metrics.record_tenant_freshness({t: max(0.0, (refreshed_ms - ts) / 1000) for t, ts in oldest.items()})


def _inner(value: bytes) -> memoryview:
    """A JSON array's items, still joined by their commas: the array without its brackets (a
    view, not a copy: the batch's body is the one copy the engine is handed)."""
    start, end = len(value) - len(value.lstrip()), len(value.rstrip())
    return memoryview(value)[start + 1 : end - 1]


def _stageable(value: bytes, items: Sequence[Item]) -> bool:
    """A message the engine may parse: a JSON array (``message_items`` checked its syntax)
    whose events are all within the size limit (which pydantic's path words)."""
    return value.lstrip()[:1] == b"[" and all(len(x) <= MAX_EVENT_BYTES for x in items)
