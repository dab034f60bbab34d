"""All ClickHouse I/O of the aggregator: watermarks, the raw insert, and the derived tables.

Ordering is what makes a batch exactly-once (docs/exactly-once.md):
1. raw rows are inserted in ONE statement (one part: all or nothing), tagged with their Kafka
   partition and offset;
2. every derived table is brought up to the raw table from its own watermark, each in ONE
   statement per table (and partition, where rows are recomputed), tagged likewise;
3. only then does the caller let Kafka offsets be committed.
A watermark is ``max(src_offset)`` of a table for a partition, read back from the table itself,
so a table and its watermark can never disagree, whatever crashed in between.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from clickhouse_connect.driver.client import Client

from aggregators import insert_token, rollup, stage
from aggregators.decode import RAW_INSERT_SETTINGS, RawRow, staged_rows_json
from aggregators.faults import CrashPoint, checkpoint
from aggregators.projection import LifecycleEvent, fold
from aggregators.rollup import Ranges
from schemas.clickhouse import Table
from schemas.events import LIFECYCLE_KIND, EntityKind, EventType
from schemas.meters import Catalog

log = logging.getLogger(__name__)

DERIVED: tuple[Table, ...] = (
    Table.USAGE_15M,
    Table.USAGE_1H,
    Table.USAGE_1D,
    Table.USAGE_1MO,
    Table.GAUGE_15M,
    Table.ENTITIES,
)
_GRAIN_OF = {t: g for g, t in rollup.GRAIN_TABLE.items()}
_TYPES_OF_KIND: dict[EntityKind, list[str]] = defaultdict(list)
for _t, _k in LIFECYCLE_KIND.items():
    _TYPES_OF_KIND[_k].append(_t.value)

NO_OFFSET = -1


def fmt_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


class ClickHouseWriter:
    def __init__(
        self, client: Client, database: str, catalog: Catalog, purge_after_batch: bool = False
    ) -> None:
        self.client = client
        # the embedded engine's freed pages returned to the system once a batch is applied
        # (``release_batch``); off for a ClickHouse server, whose memory is not this process's
        self.purge_after_batch = purge_after_batch
        self.db = database
        self.catalog = catalog
        self._wm: dict[Table, dict[int, int]] = defaultdict(dict)
        # per-process stage (see rollup.py); a name of our own so several aggregators can share
        # one ClickHouse server
        self._stage = f"{database}.usage_stage_{uuid.uuid4().hex[:12]}"
        self._stage_ready = False
        # the batch's events as they arrive, and the rows judged valid (stage.py)
        self._events = f"{database}.events_stage_{uuid.uuid4().hex[:12]}"
        self._own_rows = f"{database}.rows_stage_{uuid.uuid4().hex[:12]}"
        # the rows table the batch being applied reads: this writer's own, or the one of the
        # writer that prepared the batch ahead (processor.prepare, ``read_rows_from``)
        self._rows = self._own_rows
        self._new = f"{database}.new_stage_{uuid.uuid4().hex[:12]}"
        # the batch's copies (record_duplicates): staged once and inserted from there
        self._copies = f"{database}.copies_stage_{uuid.uuid4().hex[:12]}"
        self._events_ready = False
        # per partition, the raw watermark the rollup stage was filled from the batch's new rows
        # above (``stage_new``); None when the stage holds anything else
        self._staged_since: dict[int, int] | None = None
        # where ``_apply_gauges``/``_apply_entities`` find what a batch touches (set by ``catch_up``)
        self._touched_source: dict[Table, str] = {}

    # ---- the batch's stage (stage.py) -----------------------------------------------------------

    def _ensure_events(self) -> None:
        if not self._events_ready:
            self.client.command(stage.stage_create(self._events))
            self.client.command(stage.rows_create(self._own_rows))
            self.client.command(stage.new_create(self._new))
            self.client.command(stage.duplicates_create(self._copies))
            self._events_ready = True

    def stage_events(self, body: bytes) -> None:
        """Parse the batch's events (``body``: one JSON array of them; empty: none) into the
        stage, replacing what it held; raises the engine's error for a value it cannot read."""
        self._ensure_events()
        self.client.command(f"TRUNCATE TABLE {self._events}")
        if body:
            self.client.raw_insert(self._events, None, body, fmt="JSONEachRow", settings=stage.STAGE_SETTINGS)

    def judge(self, batch: stage.Batch) -> list[tuple[int, int]]:
        """Move the staged events the SQL accepts into the rows table (emptied first); returns
        the (message, position) of every other staged event, for pydantic to decide."""
        self._ensure_events()
        params = batch.parameters()
        self.client.command(f"TRUNCATE TABLE {self._own_rows}")
        self.client.command(
            stage.with_settings(stage.rows_insert(self._own_rows, self._events), stage.ONE_BLOCK),
            parameters=params,
        )
        flagged = self.client.query(stage.flagged_select(self._own_rows)).result_rows
        # the parsed events are in the rows table now: not kept in memory until the next batch
        self.client.command(f"TRUNCATE TABLE {self._events}")
        return [(int(m), int(p)) for m, p in flagged]

    def release_batch(self) -> None:
        """The batch is applied: its rows, new rows and rollup stage are not kept in memory until
        the next (with a batch prepared ahead, two batches' tables would be held otherwise; the
        rollup stage of a batch of 250,000 events held ~70 MiB, ~150 MiB of the engine's
        tracked memory, when it grouped per message, as the recovery path's still does; an
        idle aggregator kept it after a burst: docs/performance.md).
        ``catch_up`` has used the stage by now and refills it before it reads it again."""
        if self._events_ready:
            self.client.command(f"TRUNCATE TABLE {self._rows}")
            self.client.command(f"TRUNCATE TABLE {self._new}")
        if self._stage_ready:
            self._staged_since = None
            self.client.command(f"TRUNCATE TABLE {self._stage}")
        if self.purge_after_batch:
            self._purge()

    def _purge(self) -> None:
        """The engine's jemalloc returns its freed pages to the system now, instead of over
        ``dirty_decay_ms`` (1 s) while the next batch runs. At the end of the pipeline
        benchmark (batches of 250,000 events) the engine's allocator held 179–259 MiB without
        it, 132–138 with, and the RSS was 590–663 against 544–580 MiB (docs/performance.md,
        "Freed pages returned after each batch"). It costs ~30 ms after such a batch, and the
        next batch's first touch of its pages. A purge that fails (an engine built without
        jemalloc) is not the batch's failure: it is logged once and not tried again."""
        try:
            self.client.command("SYSTEM JEMALLOC PURGE")
        except Exception as exc:  # the batch is applied; only the purge failed
            log.warning("the engine's allocator cannot be purged (%s): not tried again", exc)
            self.purge_after_batch = False

    def add_rows(self, rows: Sequence[tuple[int, RawRow]], probe: bool = False) -> None:
        """Rows pydantic accepted (message index, row) into the rows table, or with ``probe``
        into a scratch copy emptied first (a trial that keeps nothing); raises the engine's
        error if it cannot store one of them."""
        self._ensure_events()
        table = self._rows
        if probe:
            table = f"{self._own_rows}_probe"
            self.client.command(stage.rows_create(table))
            self.client.command(f"TRUNCATE TABLE {table}")
        if rows:
            self.client.raw_insert(
                table, None, staged_rows_json(rows), fmt="JSONEachRow", settings=RAW_INSERT_SETTINGS
            )

    @property
    def rows_table(self) -> str:
        """The rows table of the batch being applied (``read_rows_from``)."""
        self._ensure_events()
        return self._rows

    @property
    def own_rows_table(self) -> str:
        """This writer's rows table, which ``judge`` fills."""
        self._ensure_events()
        return self._own_rows

    def read_rows_from(self, table: str) -> None:
        """The batch to apply was judged into ``table`` (this writer's or a stager's): the
        statements that follow (``add_rows``, ``select_new``, ``record_duplicates``) read it."""
        self._ensure_events()
        self._rows = table

    def select_new(self, excluded: Sequence[tuple[int, int]] = ()) -> None:
        """The batch's new events (deduplicated, stage.new_insert) into the ``new`` table;
        ``excluded``: (message, position) of rows left out (refused by the engine)."""
        self._ensure_events()
        self._staged_since = None
        self.client.command(f"TRUNCATE TABLE {self._new}")
        direct = self._keys_in_rocksdb()
        self.client.command(
            stage.with_settings(
                stage.new_insert(self.db, self._rows, self._new, direct),
                {**stage.ONE_BLOCK, **(stage.DIRECT_JOIN if direct else {})},
            ),
            parameters={"excluded": list(excluded)},
        )

    def _keys_in_rocksdb(self) -> bool:
        """Whether event_keys is a RocksDB table (the embedded engine; a cluster's is a
        ReplacingMergeTree, looked up another way: stage.new_insert)."""
        return insert_token.engine(self.client, self.db, Table.EVENT_KEYS) == "EmbeddedRocksDB"

    def new_keys(self) -> list[tuple[int, int]]:
        """(message, position) of the batch's new events."""
        rows = self.client.query(f"SELECT msg, pos FROM {self._new} ORDER BY msg, pos").result_rows
        return [(int(m), int(p)) for m, p in rows]

    def stage_new(self, since: dict[int, int], keys: Sequence[tuple[int, int]] | None = None) -> None:
        """The rollup stage filled from the batch's new events (those at ``keys`` only, for a
        trial), before the raw insert: the same statement ``catch_up`` runs on events_raw, so an
        event whose value it refuses (a data error) is found before anything is written; and
        the gauge values converted as the gauge statement converts them (rollup.gauge_values_check).
        ``since``: the raw watermark per partition before the batch; ``catch_up`` then takes the
        stage as it is for a period table whose pending range starts there."""
        self._staged_since = None
        if not self._stage_ready:
            self.client.command(rollup.stage_create(self._stage))
            self._stage_ready = True
        self.client.command(f"TRUNCATE TABLE {self._stage}")
        where, params = "1", {}
        if keys is not None:
            where, params = "(msg, pos) IN {keys:Array(Tuple(UInt32, UInt32))}", {"keys": list(keys)}
        self.client.command(
            rollup.stage_insert(self.catalog, self._new, self._stage, where, per_message=False),
            parameters=params,
        )
        check = rollup.gauge_values_check(self.catalog, self._new, where)
        if check is not None:
            self.client.query(check, parameters=params)
        if keys is None:
            self._staged_since = dict(since)

    def new_span(self) -> tuple[int, tuple[datetime, datetime] | None]:
        """How many new events ``select_new`` chose, and the span of their event times."""
        n, lo, hi = self.client.query(f"SELECT count(), min(time), max(time) FROM {self._new}").result_rows[0]
        if not int(n):
            return 0, None
        lo, hi = (t.replace(tzinfo=UTC) if t.tzinfo is None else t for t in (lo, hi))
        return int(n), (lo, hi)

    def insert_new(self, ingested_at: datetime) -> None:
        """The batch's new events (``select_new``) into events_raw: one INSERT, one part, all
        rows or none; without deduplication on a non-replicated table (its ``ingested_at`` makes
        every insert's rows differ from an earlier one's: nothing to drop, and no block id to
        keep apart from its part, insert_token.insert_settings without a token)."""
        settings = {
            **stage.ONE_BLOCK,
            **insert_token.insert_settings(self.client, self.db, Table.EVENTS_RAW, None),
        }
        self.client.command(
            stage.with_settings(stage.raw_insert_select(self.db, self._new), settings),
            parameters={"now": fmt_time(ingested_at)},
        )

    def insert_keys(self, ingested_at: datetime) -> None:
        """The keys of the batch's new events (``select_new``) into event_keys, right after the
        raw insert (``insert_new``), from the same rows; then event_key_watermarks moved to the
        batch's last offset of each partition. A crash before the watermark moves leaves it
        behind events_raw's, which ``keys_catch_up`` mends (the keys inserted again: an upsert)."""
        self.client.command(
            stage.with_settings(stage.keys_insert_select(self.db, self._new), stage.ONE_BLOCK),
            parameters={"now": fmt_time(ingested_at)},
        )
        self.client.command(stage.keys_watermarks_insert(self.db, self._new))
        cache = self._wm[Table.EVENT_KEY_WATERMARKS]
        for p, hi in self.client.query(
            f"SELECT src_partition, max(src_offset) FROM {self._new} GROUP BY src_partition"
        ).result_rows:
            if int(p) in cache and int(hi) > cache[int(p)]:
                cache[int(p)] = int(hi)

    def keys_catch_up(self, raw_wm: dict[int, int]) -> int:
        """Bring event_keys up to events_raw for the partitions of ``raw_wm`` (their raw
        watermarks), before the batch's lookup: the keys of the raw rows above the keys
        watermark (event_key_watermarks), which only a crash between the raw insert and the keys
        watermark (or a replay) leaves behind. Idempotent: the keys are upserted, then the
        watermarks; after any error both are re-read. Returns the number of statements run (0
        on the normal path: one cached look-up)."""
        keys_wm = self.watermarks(Table.EVENT_KEY_WATERMARKS, raw_wm)
        behind = Ranges({p: (keys_wm[p], raw_wm[p]) for p in raw_wm}).nonempty()
        if not behind:
            return 0
        where, params = behind.sql()
        log.info("event_keys behind events_raw: %s", behind.by_partition)
        self.client.command(stage.keys_catch_up(self.db, where), parameters=params)
        self.client.command(
            stage.keys_watermarks_insert(self.db, f"{self.db}.{Table.EVENTS_RAW}", where),
            parameters=params,
        )
        for p, (_, hi) in behind.by_partition.items():
            self._wm[Table.EVENT_KEY_WATERMARKS][p] = hi
        return 2

    def keys_watermarks_lower(self, start: dict[int, int]) -> None:
        """A replay deletes raw rows (and their keys) from ``start`` on: the keys watermark of each
        partition goes back to ``start - 1`` if it was above, so that the aggregator's next batch
        inserts the keys of the rewritten rows (``keys_catch_up``). Before the deletes: a crash
        after this leaves the watermark low, and a low watermark only costs keys inserted again.
        The old value is deleted before the new one is inserted (on a cluster the table is a
        ReplacingMergeTree, where a max over rows not merged yet would still see the old one); a
        crash between the two leaves no watermark, which the catch-up reads as "no key yet"."""
        table = f"{self.db}.{Table.EVENT_KEY_WATERMARKS}"
        for p, off in start.items():
            [(count, old)] = self.client.query(
                f"SELECT count(), max(src_offset) FROM {table} WHERE src_partition = {{p:Int32}}",
                parameters={"p": p},
            ).result_rows
            if not int(count) or int(old) < off:
                continue
            self.client.command(
                f"ALTER TABLE {table} DELETE WHERE src_partition = {{p:Int32}}",
                parameters={"p": p},
                settings={"mutations_sync": 2},
            )
            self.client.command(
                f"INSERT INTO {table} (src_partition, src_offset) VALUES ({{p:Int32}}, {{o:Int64}})",
                parameters={"p": p, "o": off - 1},
            )
        self.forget()

    def record_duplicates(
        self, now: datetime, excluded: Sequence[tuple[int, int]], timestamps_ms: Sequence[int]
    ) -> None:
        """The judged rows the raw insert will drop as duplicates, into ``event_duplicates``,
        those already recorded left out (looked up by position: a batch read again after a
        crash). A batch without copies (new rows = judged rows) runs one count only.

        No insert deduplication token: a non-replicated MergeTree logs the token *before* it
        renames the part into place, so a SIGKILL between the two keeps the token and loses the
        part, and the batch read again, with the same copies hence the same token, would be
        dropped for good (docs/exactly-once.md, building block 5). The lookup by position
        is what writes each copy once."""
        self._ensure_events()
        params = {"now": fmt_time(now), "excluded": list(excluded), "ts": list(timestamps_ms)}
        [(copies,)] = self.client.query(
            stage.copies_count_select(self._rows, self._new), parameters=params
        ).result_rows
        if not int(copies):
            return
        self.client.command(f"TRUNCATE TABLE {self._copies}")
        self.client.command(
            stage.with_settings(
                stage.duplicates_stage(self.db, self._rows, self._new, self._copies), {"max_threads": 1}
            ),
            parameters=params,
        )
        self.client.command(
            stage.with_settings(
                stage.duplicates_insert(self.db, self._copies),
                {**stage.ONE_BLOCK, **insert_token.no_deduplication(self.client)},
            )
        )
        self.client.command(f"TRUNCATE TABLE {self._copies}")

    def written(self, ranges: Ranges) -> list[tuple[str, int, datetime, int, int, int]]:
        """(tenant, partition, last event time, min offset, max offset, rows) of what
        ``events_raw`` holds in ``ranges``; updates the cached raw watermarks."""
        where, params = ranges.sql()
        out = []
        cache = self._wm[Table.EVENTS_RAW]
        for tenant, part, last, lo, hi, n in self.client.query(
            stage.written_select(self.db, where), parameters=params
        ).result_rows:
            t = last.replace(tzinfo=UTC) if last.tzinfo is None else last
            out.append((str(tenant), int(part), t, int(lo), int(hi), int(n)))
            if int(hi) > cache.get(int(part), NO_OFFSET) and int(part) in cache:
                cache[int(part)] = int(hi)
        return out

    # ---- watermarks ---------------------------------------------------------------------------

    def watermarks(self, table: Table, partitions: Iterable[int]) -> dict[int, int]:
        cache = self._wm[table]
        missing = sorted(set(partitions) - set(cache))
        if missing:
            found = self._read_watermarks(table, missing)
            for p in missing:
                cache[p] = found.get(p, NO_OFFSET)
        return {p: cache[p] for p in partitions}

    def _read_watermarks(self, table: Table, partitions: list[int]) -> dict[int, int]:
        """The highest offset ``table`` holds per partition of ``partitions`` (those it holds any
        of), read from the table (its ``p_watermark`` projection), never the cache."""
        rows = self.client.query(
            f"SELECT src_partition, max(src_offset) FROM {self.db}.{table} "
            "WHERE src_partition IN {ps:Array(Int32)} GROUP BY src_partition",
            parameters={"ps": partitions},
        ).result_rows
        return {int(p): int(o) for p, o in rows}

    def raw_moved(self, since: dict[int, int]) -> list[int]:
        """The partitions of ``since`` (raw watermark per partition, as a batch began) whose
        watermark in events_raw is another now: read from the table, never the cache. Nobody but
        this process writes them while it owns them, so a move means it lost them without knowing
        (processor.py, the fence); their cached watermarks are dropped."""
        if not since:
            return []
        now = self._read_watermarks(Table.EVENTS_RAW, sorted(since))
        moved = sorted(p for p, wm in since.items() if now.get(p, NO_OFFSET) != wm)
        if moved:  # (forget drops the stage of the new rows too: only when the batch stops here)
            self.forget(moved)
        return moved

    def forget(self, partitions: Iterable[int] | None = None) -> None:
        """Drop cached watermarks (after an error or when partitions move to another process)."""
        self._staged_since = None
        for cache in self._wm.values():
            if partitions is None:
                cache.clear()
            else:
                for p in partitions:
                    cache.pop(p, None)

    # ---- derived tables -----------------------------------------------------------------------

    def catch_up(self, partitions: Iterable[int]) -> dict[Table, int]:
        """Bring every derived table up to the raw table for ``partitions``; returns the number of
        statements run per table."""
        parts = sorted(set(partitions))
        raw_wm = self.watermarks(Table.EVENTS_RAW, parts)
        pending: dict[Table, Ranges] = {}
        for table in DERIVED:
            wm = self.watermarks(table, parts)
            ranges = Ranges({p: (wm[p], raw_wm[p]) for p in parts}).nonempty()
            if ranges:
                pending[table] = ranges
        done: dict[Table, int] = {}
        periods = [t for t in pending if t in _GRAIN_OF]
        staged, self._staged_since = self._staged_since, None
        # The stage filled from the batch's new rows (stage_new) holds exactly the raw rows above
        # the raw watermark it was filled at, a group per partition (not per message); it serves
        # a period table whose pending range starts there (the normal path: the table was up to
        # date before the batch), which takes all of its rows. A table behind (a crash, an
        # outage: the recovery path) needs the stage from events_raw, a group per message.
        if periods and not (
            staged is not None
            and all(
                p in staged and lo == staged[p]
                for t in periods
                for p, (lo, _) in pending[t].by_partition.items()
            )
        ):
            self._fill_stage(periods, pending)
        # likewise, the series (entities) the batch's gauge samples (lifecycle events) touch are
        # read from its new rows when gauge_15m (entities) was up to date before the batch; the
        # integrals (states) themselves read events_raw: they need the events of earlier batches
        self._touched_source = {
            table: self._new
            if staged is not None
            and all(p in staged and lo >= staged[p] for p, (lo, _) in pending[table].by_partition.items())
            else f"{self.db}.{Table.EVENTS_RAW}"
            for table in (Table.GAUGE_15M, Table.ENTITIES)
            if table in pending
        }
        for table, ranges in pending.items():
            done[table] = self._apply(table, ranges)
            self._checkpoint(CrashPoint.BETWEEN_DERIVED)
            for p, (_, hi) in ranges.by_partition.items():
                self._wm[table][p] = hi
        return done

    def _checkpoint(self, point: CrashPoint) -> None:
        # a method, so that the preflight's trial writer (preflight.py) is no crash point
        checkpoint(point)

    def _fill_stage(self, periods: list[Table], pending: dict[Table, Ranges]) -> None:
        """Stage the raw rows every pending period table needs: from the lowest watermark."""
        union: dict[int, tuple[int, int]] = {}
        for t in periods:
            for p, (lo, hi) in pending[t].by_partition.items():
                old = union.get(p)
                union[p] = (min(lo, old[0]), max(hi, old[1])) if old else (lo, hi)
        if not self._stage_ready:
            self.client.command(rollup.stage_create(self._stage))
            self._stage_ready = True
        self.client.command(f"TRUNCATE TABLE {self._stage}")
        where, params = Ranges(union).sql()
        source = f"{self.db}.{Table.EVENTS_RAW}"
        self.client.command(rollup.stage_insert(self.catalog, source, self._stage, where), parameters=params)

    def _token(self, table: Table, ranges: Ranges) -> dict[str, Any]:
        return insert_token.insert_settings(self.client, self.db, table, f"{table.value}:{_spans(ranges)}")

    def _apply(self, table: Table, ranges: Ranges) -> int:
        if table in _GRAIN_OF:
            where, params = ranges.sql()
            sql = rollup.period_from_stage(_GRAIN_OF[table], self.db, self._stage, where)
            # optimize_on_insert = 0: the statement groups by the table's whole sorting key, so
            # the block holds no two rows to merge; the part written is the same, without the
            # merging pass (about a fifth of the insert's CPU, docs/performance.md)
            # the token only on a Replicated table (aggregators/insert_token.py): on any other a
            # SIGKILL can keep it and lose the part, and the span rolled up again would be dropped
            settings = {**self._token(table, ranges), "optimize_on_insert": 0}
            self.client.command(stage.with_settings(sql, settings), parameters=params)
            return 1
        if table is Table.GAUGE_15M:
            return self._apply_gauges(ranges)
        return self._apply_entities(ranges)

    def close(self) -> None:
        if self._stage_ready:
            self.client.command(f"DROP TABLE IF EXISTS {self._stage}")
            self._stage_ready = False
        if self._events_ready:
            self.client.command(f"DROP TABLE IF EXISTS {self._events}")
            self.client.command(f"DROP TABLE IF EXISTS {self._own_rows}")
            self.client.command(f"DROP TABLE IF EXISTS {self._own_rows}_probe")
            self.client.command(f"DROP TABLE IF EXISTS {self._new}")
            self.client.command(f"DROP TABLE IF EXISTS {self._copies}")
            self._events_ready = False

    def _apply_gauges(self, ranges: Ranges) -> int:
        """The 15-minute integrals of every series the raw rows in ``ranges`` touch, rewritten
        in one INSERT for all the partitions (one per partition before: 4 statements a batch on
        the default topic, each with its fixed cost, docs/performance.md). Each series' rows are
        tagged with its own partition and that partition's highest offset in ``ranges`` (the
        gauge table's watermark there), as the statement per partition tagged them."""
        gauges = [m for m in self.catalog.meters if m.is_gauge]
        if not gauges:
            return 0
        where, wparams = ranges.sql()
        # the series every gauge meter touches, with the partition each sample came from
        by_type: dict[str, list[Any]] = defaultdict(list)
        top: dict[int, int] = {}
        for row in self.client.query(
            rollup.gauges_touched(gauges, self._touched_source[Table.GAUGE_15M], where),
            parameters=wparams,
        ).result_rows:
            by_type[str(row[0])].append(row[1:])
            p = int(row[6])
            top[p] = max(top.get(p, NO_OFFSET), int(row[5]))
        selects: list[str] = []
        params: dict[str, Any] = {}
        for i, meter in enumerate(gauges):
            touched = by_type.get(meter.event_type.value)
            if not touched:
                continue
            # A series is in one partition (its tenant's); should it be in two (partitions added
            # to the topic move keys), its rows carry the later one's tag. The other partition's
            # watermark then moves with its other rows, or is recomputed from events_raw after a
            # restart: a rewrite of the same integrals.
            series: dict[tuple[str, str], int] = {}
            for tenant, subject, _lo, _hi, _off, p in touched:
                key = (str(tenant), str(subject))
                series[key] = max(series.get(key, int(p)), int(p))
            gap = meter.max_gap_seconds * 1000 if meter.max_gap_seconds else 0
            lo = min(int(r[2]) for r in touched) - gap
            hi = max(int(r[3]) for r in touched) + gap
            prefix = f"g{i}_"
            params.update(
                {
                    f"{prefix}tenants": [t for t, _ in series],
                    f"{prefix}series": [s for _, s in series],
                    f"{prefix}w_lo": lo // 900_000 * 900_000,
                    f"{prefix}w_hi": (hi // 900_000 + 1) * 900_000,
                    f"{prefix}keys": [rollup.series_key(t, s) for t, s in series],
                    f"{prefix}parts": list(series.values()),
                }
            )
            selects.append(rollup.gauge_select(meter, self.db, prefix, rollup.SERIES_TAG))
        if not selects:
            return 0
        params.update(top_parts=list(top), top_offsets=list(top.values()))
        self.client.command(
            f"INSERT INTO {self.db}.{Table.GAUGE_15M} ({rollup.GAUGE_COLUMNS}) "
            + " UNION ALL ".join(selects),
            parameters=params,
        )
        return 1

    def _apply_entities(self, ranges: Ranges) -> int:
        where, params = ranges.sql()
        touched = self.client.query(
            rollup.lifecycle_touched(self._touched_source[Table.ENTITIES], where), parameters=params
        ).result_rows
        if not touched:
            return 0
        # entity -> partition it lives in (a tenant's events are all in one partition)
        by_entity: dict[tuple[str, EntityKind, str], None] = {}
        for tenant, type_, subject in touched:
            by_entity[(str(tenant), LIFECYCLE_KIND[EventType(type_)], str(subject))] = None
        groups: dict[tuple[str, EntityKind], list[str]] = defaultdict(list)
        for tenant, kind, subject in by_entity:
            groups[(tenant, kind)].append(subject)
        rows_by_partition: dict[int, list[bytes]] = defaultdict(list)
        for (tenant, kind), subjects in groups.items():
            events: dict[str, list[LifecycleEvent]] = defaultdict(list)
            result = self.client.query(
                rollup.lifecycle_events(self.db),
                parameters={"tenant": tenant, "types": _TYPES_OF_KIND[kind], "subjects": subjects},
            ).result_rows
            for type_, subject, time, data, part, offset in result:
                events[str(subject)].append(
                    LifecycleEvent(
                        EventType(type_),
                        time.replace(tzinfo=UTC) if time.tzinfo is None else time,
                        orjson.loads(data),
                        int(part),
                        int(offset),
                    )
                )
            for subject in subjects:
                state = fold(tenant, kind, subject, events.get(subject, ()))
                if state is not None:
                    rows_by_partition[state.src_partition].append(orjson.dumps(state.row()))
        for _p, rows in sorted(rows_by_partition.items()):
            self.client.raw_insert(f"{self.db}.{Table.ENTITIES}", None, b"\n".join(rows), fmt="JSONEachRow")
        return len(rows_by_partition)

    def touch_freshness(self, last_event_time: dict[str, datetime], now: datetime) -> None:
        if not last_event_time:
            return
        stamp = fmt_time(now)
        body = b"\n".join(
            orjson.dumps({"tenant": t, "refreshed_at": stamp, "last_event_time": fmt_time(ts)})
            for t, ts in sorted(last_event_time.items())
        )
        self.client.raw_insert(f"{self.db}.{Table.TENANT_FRESHNESS}", None, body, fmt="JSONEachRow")

    # ---- rebuild ------------------------------------------------------------------------------

    def truncate_derived(self) -> None:
        for table in DERIVED:
            self.client.command(f"TRUNCATE TABLE {self.db}.{table}")
        self.forget()


def _spans(ranges: Ranges) -> str:
    return ",".join(f"{p}:{lo}-{hi}" for p, (lo, hi) in sorted(ranges.by_partition.items()))
