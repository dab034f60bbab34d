"""One batch of Kafka messages, applied to ClickHouse exactly once.

The steps, in this order (why each is safe after a crash: docs/exactly-once.md):
1. skip messages already in ``events_raw`` (offset <= its watermark for the partition);
2. decode and validate; rejects go to the dead-letter topic, flushed *before* anything is
   written, so a rejected event is never lost, then to the ``rejections`` table (once per
   source position: aggregators/rejections.py);
3. drop duplicates: within the batch, then against earlier batches (Bloom filter, checked
   exactly in ``events_raw``); the dropped copies are recorded in ``event_duplicates``;
3b. try the new rows on probe tables that keep nothing (preflight.py): events ClickHouse would
   refuse (a data error, not an outage) are dead-lettered, flushed before anything is written;
   a trial writes nothing, so a crash during it is a crash before the raw insert;
4. insert the new raw rows (one statement);
5. bring every derived table up to the raw table (one statement per table);
6. record freshness. Only after ``process`` returns may the offsets be committed.

``process_with_retry`` retries a batch that fails for any other reason (an outage), with
backoff, for as long as it takes; meanwhile ``stalled_since`` and ``last_error`` say so (the
aggregator health check reads them) and ``metering_aggregator_stalled_seconds_total`` counts.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

from aggregators import metrics, rejections
from aggregators.decode import (
    Decoded,
    RawRow,
    Reject,
    SourceMessage,
    decode_message,
    decode_messages,
    raw_rows_json,
)
from aggregators.dedupe import BloomFilter, first_occurrences, key_hash
from aggregators.errors import is_data_error, reason
from aggregators.fastpath import split
from aggregators.faults import CrashPoint, checkpoint
from aggregators.preflight import Preflight, Refusal
from aggregators.writer import ClickHouseWriter, fmt_time
from schemas.clickhouse import Table
from schemas.validation import MAX_AGE, RejectCode

log = logging.getLogger(__name__)


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
    rejected: int = 0  # invalid events (decode), dead-lettered
    refused: int = 0  # valid events ClickHouse refuses (preflight.py), dead-lettered
    tenants: set[str] = field(default_factory=set)


class BatchProcessor:
    def __init__(
        self,
        writer: ClickHouseWriter,
        dead_letters: DeadLetterSink,
        bloom: BloomFilter,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        preflight: Preflight | None = None,
    ) -> None:
        self.writer = writer
        self.dead_letters = dead_letters
        self.bloom = bloom
        self.clock = clock
        self.preflight = preflight or Preflight(writer)
        self._bloom_partitions: set[int] = set()
        # A batch ClickHouse does not take: since when (UTC; None while batches flow) and why.
        # Read by the aggregator health check (deploy/runner.py) from another thread.
        self.stalled_since: datetime | None = None
        self.last_error: str | None = None
        self._stall_started: float | None = None  # monotonic
        self._stall_counted: float = 0.0  # monotonic: stalled seconds counted up to here
        metrics.watch_stall(self)

    # ---- partition ownership ------------------------------------------------------------------

    def assign(self, partitions: Sequence[int]) -> None:
        """Load what the Bloom filter must know about partitions this process now owns."""
        new = sorted(set(partitions) - self._bloom_partitions)
        if not new:
            return
        since = self.clock() - MAX_AGE - timedelta(days=1)
        hashes = self.writer.key_hashes(new, since)
        self.bloom.add(hashes)
        self._bloom_partitions.update(new)
        log.info("dedupe filter loaded %d ids for partitions %s", len(hashes), new)

    def acquire(self, partitions: Sequence[int]) -> None:
        """Partitions (lanes) this process owns from now on: another process may have written
        them since this one last did, so their cached watermarks are dropped and re-read; their
        ids are loaded into the Bloom filter."""
        self.writer.forget(partitions)
        self.assign(partitions)

    def revoke(self, partitions: Sequence[int]) -> None:
        # Another process may write these partitions now: our cached watermarks would go stale.
        # The Bloom filter may keep their ids: extra entries only cost an exact check.
        self.writer.forget(partitions)
        self._bloom_partitions.difference_update(partitions)
        metrics.forget_lag(list(partitions))

    # ---- the batch ----------------------------------------------------------------------------

    def process(self, messages: Sequence[SourceMessage]) -> BatchStats:
        stats = BatchStats(messages=len(messages))
        if not messages:
            return stats
        started = time.perf_counter()
        partitions = sorted({m.partition for m in messages})
        self.assign(partitions)
        raw_wm = self.writer.watermarks(Table.EVENTS_RAW, partitions)
        fresh = [m for m in messages if m.offset > raw_wm[m.partition]]
        stats.skipped_messages = len(messages) - len(fresh)

        decoded = decode_messages(fresh)
        stats.events = len(decoded.rows) + len(decoded.rejects)
        stats.rejected = len(decoded.rejects)
        if decoded.rejects:  # each once, also in the rejections table (aggregators/rejections.py)
            rejections.dead_letter(self.dead_letters, self.writer, decoded.rejects, fresh, self.clock())

        rows, hashes = self._new_rows(decoded)
        rejections.record_duplicates(self.writer, decoded.rows, rows, fresh, self.clock())
        stats.duplicates = len(decoded.rows) - len(rows)
        now = self.clock()
        refused = self.preflight.refusals(rows, now)
        storage_rejects: list[Reject] = []
        if refused:
            out = {(f.row.tenant, f.row.event_id) for f in refused}
            kept = [(r, h) for r, h in zip(rows, hashes, strict=True) if (r.tenant, r.event_id) not in out]
            rows, hashes = [r for r, _ in kept], [h for _, h in kept]
            storage_rejects = _storage_rejects(refused, fresh, now)
            rejections.dead_letter(self.dead_letters, self.writer, storage_rejects, fresh, now)
            stats.refused = len(storage_rejects)
        checkpoint(CrashPoint.BEFORE_RAW_INSERT)
        self.writer.insert_raw(rows, now)
        checkpoint(CrashPoint.AFTER_RAW_INSERT)
        stats.written = len(rows)
        applied = self.writer.catch_up(partitions)
        checkpoint(CrashPoint.AFTER_DERIVED)

        last_time: dict[str, datetime] = {}
        for r in rows:
            if r.time > last_time.get(r.tenant, datetime.min.replace(tzinfo=UTC)):
                last_time[r.tenant] = r.time
        refreshed = self.clock()
        self.writer.touch_freshness(last_time, refreshed)
        self.bloom.add(hashes)  # hashed once, in _new_rows
        stats.tenants = set(last_time)

        metrics.BATCHES.inc()
        metrics.EVENTS_IN.inc(stats.events)
        metrics.EVENTS_WRITTEN.inc(stats.written)
        metrics.DUPLICATES.inc(stats.duplicates)
        for rej in (*decoded.rejects, *storage_rejects):
            metrics.REJECTED.labels(rej.code).inc()
        metrics.DEAD_LETTERED.inc(len(decoded.rejects) + len(storage_rejects))
        for table, n in applied.items():
            metrics.ROWS_WRITTEN.labels(table.value).inc(n)
        metrics.FLUSH_SECONDS.observe(time.perf_counter() - started)
        _record_freshness(rows, fresh, refreshed)
        checkpoint(CrashPoint.AFTER_BATCH)
        return stats

    def _new_rows(self, decoded: Decoded) -> tuple[list[RawRow], list[int]]:
        """The first occurrences among ``decoded`` and their dedupe-key hashes (computed once:
        the Bloom filter is checked with them now and fed with them after the insert)."""
        rows = decoded.rows
        keep = first_occurrences((r.tenant, r.event_id) for r in rows)
        rows = [rows[i] for i in keep]
        if not rows:
            return rows, []
        hashes = [key_hash(r.tenant, r.event_id) for r in rows]
        maybe = self.bloom.maybe_contains(hashes)
        # Events older than the filter's window are not in it: always check them exactly.
        horizon = self.clock() - MAX_AGE - timedelta(hours=1)
        suspects: dict[str, list[str]] = defaultdict(list)
        for r, m in zip(rows, maybe, strict=True):
            if m or r.time < horizon:
                suspects[r.tenant].append(r.event_id)
        if not suspects:
            return rows, hashes
        seen: set[tuple[str, str]] = set()
        for tenant, ids in suspects.items():
            seen.update((tenant, i) for i in self.writer.existing_ids(tenant, ids))
        kept = [(r, h) for r, h in zip(rows, hashes, strict=True) if (r.tenant, r.event_id) not in seen]
        return [r for r, _ in kept], [h for _, h in kept]

    def process_with_retry(
        self,
        messages: Sequence[SourceMessage],
        should_stop: Callable[[], bool] = lambda: False,
        max_backoff_s: float = 30.0,
    ) -> BatchStats | None:
        """``process`` until it succeeds; None if and only if the batch was NOT applied (a stop
        was asked while it was failing), so its offsets must not be committed.

        A ClickHouse outage stalls the batch (and so the commit of its offsets) instead of
        losing it; each retry starts from the watermarks re-read from ClickHouse, so a statement
        that landed before the error is not repeated. Events ClickHouse refuses because of their
        data never get here: ``process`` dead-letters them (preflight.py). While a batch is
        stalled, ``stalled_since``/``last_error`` say so and the stall metrics count."""
        delay = 0.2
        while True:
            try:
                stats = self.process(messages)
            except Exception as exc:  # the engine's and the driver's errors have no common base
                metrics.CLICKHOUSE_ERRORS.inc()
                self._stalled(exc)
                log.warning("applying batch failed (%s); retrying in %.1fs", self.last_error, delay)
                self.writer.forget()
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
            # The trial let through rows a real statement refuses: the rows may be in events_raw
            # already (written before this version, or a table changed since the probes were
            # cloned). Fresh probes make the next trial see the tables as they are now.
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


def _record_freshness(rows: Sequence[RawRow], messages: Sequence[SourceMessage], refreshed: datetime) -> None:
    """``metering_tenant_freshness_seconds`` of every tenant written: from the ingest accepting
    the tenant's oldest event of the batch (its Kafka message's timestamp, the instant the ingest
    judged it by) to ``refreshed``, when the tenant's tables were refreshed with it."""
    accepted = {(m.partition, m.offset): m.timestamp_ms for m in messages}
    oldest: dict[str, int] = {}
    for r in rows:
        ts = accepted.get((r.partition, r.offset))
        if ts is not None and ts < oldest.get(r.tenant, ts + 1):
            oldest[r.tenant] = ts
    refreshed_ms = refreshed.timestamp() * 1000
    metrics.record_tenant_freshness({t: max(0.0, (refreshed_ms - ts) / 1000) for t, ts in oldest.items()})


def _storage_rejects(
    refused: Sequence[Refusal], messages: Sequence[SourceMessage], now: datetime
) -> list[Reject]:
    """Dead letters for refused events, each with the bytes it arrived as (its item of the
    Kafka message) and its position, like the rejects of decoding."""
    by_source = {(m.partition, m.offset): m for m in messages}
    items: dict[tuple[int, int], list[tuple[int, bytes, RawRow]]] = {}
    out: list[Reject] = []
    for f in refused:
        key = (f.row.partition, f.row.offset)
        if key not in items:
            msg = by_source.get(key)
            items[key] = _rows_with_items(msg) if msg is not None else []
        found = next(((i, b) for i, b, r in items[key] if r == f.row), None)
        index, original = found if found is not None else (-1, raw_rows_json([f.row], fmt_time(now)))
        out.append(
            Reject(f.row.partition, f.row.offset, index, RejectCode.STORAGE_REJECTED, f.reason, original)
        )
    return out


def _rows_with_items(msg: SourceMessage) -> list[tuple[int, bytes, RawRow]]:
    """The rows decoded from ``msg`` with the index and bytes of the item each came from.

    Decoding turns every item of a message into a row or a reject that names its index, in
    order; so the rows' items are the items no reject names."""
    decoded = decode_message(msg)
    raw_items = split(msg.value)
    items = [bytes(x) for x in raw_items] if raw_items is not None else [msg.value]
    rejected = {r.index for r in decoded.rejects}
    if -1 in rejected:
        return []
    indexes = [i for i in range(len(items)) if i not in rejected]
    if len(indexes) != len(decoded.rows):
        return []
    return [(i, items[i], row) for i, row in zip(indexes, decoded.rows, strict=True)]
