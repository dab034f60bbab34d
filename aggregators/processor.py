"""One batch of Kafka messages, applied to ClickHouse exactly once.

The steps, in this order (why each is safe after a crash: docs/exactly-once.md):
1. skip messages already in ``events_raw`` (offset <= its watermark for the partition);
2. decode and validate; rejects go to the dead-letter topic, flushed *before* anything is
   written, so a rejected event is never lost (it may be dead-lettered twice after a crash);
3. drop duplicates: within the batch, then against earlier batches (Bloom filter, checked
   exactly in ``events_raw``);
4. insert the new raw rows (one statement);
5. bring every derived table up to the raw table (one statement per table);
6. record freshness. Only after ``process`` returns may the offsets be committed.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

from aggregators import metrics
from aggregators.decode import Decoded, RawRow, Reject, SourceMessage, decode_messages
from aggregators.dedupe import BloomFilter, first_occurrences, key_hash
from aggregators.faults import CrashPoint, checkpoint
from aggregators.writer import ClickHouseWriter
from schemas.clickhouse import Table
from schemas.validation import MAX_AGE

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
    rejected: int = 0
    tenants: set[str] = field(default_factory=set)


class BatchProcessor:
    def __init__(
        self,
        writer: ClickHouseWriter,
        dead_letters: DeadLetterSink,
        bloom: BloomFilter,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.writer = writer
        self.dead_letters = dead_letters
        self.bloom = bloom
        self.clock = clock
        self._bloom_partitions: set[int] = set()

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

    def revoke(self, partitions: Sequence[int]) -> None:
        # Another process may write these partitions now: our cached watermarks would go stale.
        # The Bloom filter may keep their ids: extra entries only cost an exact check.
        self.writer.forget(partitions)
        self._bloom_partitions.difference_update(partitions)

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
        if decoded.rejects:
            self.dead_letters.send(decoded.rejects)
            self.dead_letters.flush()

        rows, hashes = self._new_rows(decoded)
        stats.duplicates = len(decoded.rows) - len(rows)
        now = self.clock()
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
        self.writer.touch_freshness(last_time, self.clock())
        self.bloom.add(hashes)  # hashed once, in _new_rows
        stats.tenants = set(last_time)

        metrics.BATCHES.inc()
        metrics.EVENTS_IN.inc(stats.events)
        metrics.EVENTS_WRITTEN.inc(stats.written)
        metrics.DUPLICATES.inc(stats.duplicates)
        for rej in decoded.rejects:
            metrics.REJECTED.labels(rej.code).inc()
        metrics.DEAD_LETTERED.inc(len(decoded.rejects))
        for table, n in applied.items():
            metrics.ROWS_WRITTEN.labels(table.value).inc(n)
        metrics.FLUSH_SECONDS.observe(time.perf_counter() - started)
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
        """``process`` until it succeeds. A ClickHouse outage stalls the batch (and so the
        commit of its offsets) instead of losing it; each retry starts from the watermarks
        re-read from ClickHouse, so a statement that landed before the error is not repeated."""
        delay = 0.2
        while True:
            try:
                return self.process(messages)
            except Exception as exc:  # the engine's and the driver's errors have no common base
                metrics.CLICKHOUSE_ERRORS.inc()
                log.warning("applying batch failed (%s); retrying in %.1fs", exc, delay)
                self.writer.forget()
                if should_stop():
                    return None
                time.sleep(delay)
                delay = min(max_backoff_s, delay * 2)
