"""Trying a batch's rows before anything is written: which events would ClickHouse refuse?

Why before: the derived-table statements run *after* the raw insert (writer.py). An event whose
value the engine refuses there (issue 7: ``cpu_seconds = 1e29`` passes validation, is stored in
``events_raw`` as text, then ``toDecimal128(…, 9)`` in the rollup stage fails with
ARGUMENT_OUT_OF_BOUND) would already be in the raw table: every retry skips the raw insert by
watermark and fails on the same derived statement again, forever, and every tenant waits.

So the new rows of a batch first go through a *trial*: the real writer's own statements (the
same ``ClickHouseWriter`` code: raw insert, stage, every period table, gauges, entities) pointed
at a per-process probe database whose tables have the real tables' structure and keep nothing
anyone reads: ``events_raw`` is a Memory table emptied before each trial, every derived table a
Null table. A trial commits nothing, so it can be repeated at will and a crash during one
changes nothing.

Since issue 11 the processor's batches (``staged_refusals``) try here only what the batch's own
statements cannot try before the raw insert: the lifecycle events (the entities statement), and
every row when an operator changed a period table's or ``gauge_15m``'s value types. The usage
events' conversions are tried by the statement that fills the rollup stage from the batch's new
rows, run before the raw insert (processor.py, step 4; ``isolate`` bisects there too). A replay
writes its rows on the same path (``BatchProcessor.rewrite``), so it is tried the same way.

When a trial fails with a data error (errors.py), ``isolate`` bisects the rows with further
trials down to the events that fail on their own. The caller dead-letters those, with the
engine's words as the reason, and writes the rest. A failure is blamed on the data only when it
is reproducible: the statements must run without any data (an analysis error is not the data's),
each refused event must fail alone twice, and the events left must pass together; otherwise
``NotTheData`` is raised and the batch is retried like any outage.

What a trial cannot see, and why it does not matter: rows of earlier batches that a derived
statement reads again (they passed their own trial when they were written); sums that leave the
range of Decimal128 (ClickHouse wraps them without an error; the per-field bounds of the event
models prevent them); a table whose type an operator changes while the aggregator runs (the
probes are cloned at first use: a data error of a real statement drops them, so the next trial
clones the changed tables).
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import TypeVar

from aggregators import rollup, stage
from aggregators.errors import NotTheData, is_data_error, reason
from aggregators.faults import CrashPoint, checkpoint
from aggregators.rollup import Ranges
from aggregators.writer import DERIVED, NO_OFFSET, ClickHouseWriter, fmt_time
from schemas.clickhouse import Table
from schemas.events import LIFECYCLE_TYPES, EventType

log = logging.getLogger(__name__)

T = TypeVar("T")
Trial = Callable[[Sequence[T]], BaseException | None]


def isolate(
    rows: Sequence[T], trial: Trial[T], dry: Callable[[], BaseException | None]
) -> list[tuple[T, BaseException]]:
    """The rows that fail ``trial`` on their own, each with its error; [] when all pass.

    ``trial(rows)`` returns the data error the rows cause, None when they pass, and raises
    anything else (an outage ends the search). ``dry()`` runs the statements without rows.
    Raises ``NotTheData`` when the failure does not come from individual rows (see the module
    docstring). Costs one trial when nothing fails, about 2·k·log2(n) with k refused rows."""
    first = trial(rows)
    if first is None:
        return []
    err = dry()
    if err is not None:
        raise NotTheData("the statements fail without any data", err)
    refused: list[tuple[int, BaseException]] = []

    def search(lo: int, hi: int) -> None:  # rows[lo:hi] fails together
        if hi - lo == 1:
            checkpoint(CrashPoint.ISOLATING)
            again = trial(rows[lo:hi])
            if again is None:
                raise NotTheData("an event failed once, then passed", first)
            refused.append((lo, again))
            return
        mid = (lo + hi) // 2
        found = len(refused)
        for a, b in ((lo, mid), (mid, hi)):
            checkpoint(CrashPoint.ISOLATING)
            if trial(rows[a:b]) is not None:
                search(a, b)
        if len(refused) == found:
            raise NotTheData("no part of the failing rows fails on its own", first)

    search(0, len(rows))
    bad = {i for i, _ in refused}
    rest = [r for i, r in enumerate(rows) if i not in bad]
    if rest:
        checkpoint(CrashPoint.ISOLATING)
        err = trial(rest)
        if err is not None:
            raise NotTheData("the events left still fail together", err)
    return [(rows[i], e) for i, e in refused]


class _TrialWriter(ClickHouseWriter):
    """The real writer over the probe database: derived tables are Null (their watermark is
    always "nothing yet", so every statement covers exactly the trial's rows) and no crash
    point is reached."""

    #: set by ``prepare``: the period tables take the stage's columns with the stage's types, so
    #: their statements convert nothing that could fail (and are left out of trials)
    periods_convert = True
    #: likewise for ``gauge_15m`` (set by ``prepare``)
    gauges_convert = True

    def prepare(self, source_db: str) -> None:
        """Clone the real tables' structure into the probe database."""
        self.client.command(f"CREATE DATABASE IF NOT EXISTS {self.db}")
        raw = Table.EVENTS_RAW
        self.client.command(
            f"CREATE TABLE IF NOT EXISTS {self.db}.{raw} AS {source_db}.{raw} ENGINE = Memory"
        )
        for table in DERIVED:
            self.client.command(
                f"CREATE TABLE IF NOT EXISTS {self.db}.{table} AS {source_db}.{table} ENGINE = Null"
            )
        self.client.command(rollup.stage_create(self._stage))
        self._stage_ready = True
        self.periods_convert = self._periods_convert()
        self.gauges_convert = self._gauges_convert()

    def _gauges_convert(self) -> bool:
        """Whether ``gauge_15m`` stores its integral in another type than the gauge statement
        computes (an operator changed it): then gauges are tried here, as before."""
        rows = self.client.query(
            "SELECT type FROM system.columns WHERE database = {db:String} AND table = {t:String} "
            "AND name = 'integral'",
            parameters={"db": self.db, "t": Table.GAUGE_15M.value},
        ).result_rows
        return any(_plain(str(t)) != "Decimal(38, 9)" for (t,) in rows)

    def _periods_convert(self) -> bool:
        stage_db, stage_name = self._stage.split(".", 1)
        rows = self.client.query(
            "SELECT database, table, name, type FROM system.columns "
            "WHERE (database = {db:String} AND table IN {periods:Array(String)}) "
            "OR (database = {sdb:String} AND table = {stage:String})",
            parameters={
                "db": self.db,
                "periods": [t.value for t in rollup.GRAIN_TABLE.values()],
                "sdb": stage_db,
                "stage": stage_name,
            },
        ).result_rows
        stage = {str(n): _plain(str(t)) for d, tb, n, t in rows if d == stage_db and tb == stage_name}
        return any(
            str(n) in stage and _plain(str(t)) != stage[str(n)]
            for d, tb, n, t in rows
            if not (d == stage_db and tb == stage_name)
        )

    def watermarks(self, table: Table, partitions: Iterable[int]) -> dict[int, int]:
        if table is Table.EVENTS_RAW:
            return super().watermarks(table, partitions)
        return {p: NO_OFFSET for p in partitions}

    #: the event types of the rows under trial: statements that read none of them are skipped
    types: frozenset[EventType] = frozenset()

    def _apply(self, table: Table, ranges: Ranges) -> int:
        if table in _PERIODS and not self.periods_convert:
            return 0
        if table is Table.GAUGE_15M and self.staged_only and not self.gauges_convert:
            return 0  # the batch's gauge values are converted in its trial (writer.stage_new)
        if table is Table.GAUGE_15M and not self.types & {
            m.event_type for m in self.catalog.meters if m.is_gauge
        }:
            return 0
        if table is Table.ENTITIES and not self.types & LIFECYCLE_TYPES:
            return 0
        return super()._apply(table, ranges)

    def _checkpoint(self, point: CrashPoint) -> None:
        return None

    #: set by ``attempt_staged``: the rollup stage is left out of the trial (the processor fills
    #: the real stage from the batch's new rows before the raw insert: that is its trial)
    staged_only = False

    def _fill_stage(self, periods: list[Table], pending: dict[Table, Ranges]) -> None:
        if not self.staged_only:
            super()._fill_stage(periods, pending)

    def attempt_staged(
        self, rows_table: str, keys: Sequence[tuple[int, int]] | None, ingested_at: datetime
    ) -> None:
        """The statements the real writer would run for the batch's judged rows (``rows_table``,
        stage.py), or for those of them at ``keys`` (message, position); raises what they raise.

        Not the rollup stage nor the gauge values: the processor fills the stage from the batch's
        new rows before the raw insert, and converts their gauge values, which is their trial
        (``ClickHouseWriter.stage_new``); so unless a period table converts the stage's values
        (``periods_convert``), only the lifecycle events (the entities statement) are tried
        here, and the gauge events if ``gauge_15m`` was changed (``gauges_convert``)."""
        self.forget()
        self.staged_only = not self.periods_convert
        self.client.command(f"TRUNCATE TABLE {self.db}.{Table.EVENTS_RAW}")
        where = self.trial_filter(keys)
        self.client.command(
            f"INSERT INTO {self.db}.{Table.EVENTS_RAW} ({stage.RAW_COLUMNS}, ingested_at) "
            f"SELECT {stage.RAW_COLUMNS}, {{now:DateTime64(3, 'UTC')}} FROM {rows_table} WHERE {where}",
            parameters={"now": fmt_time(ingested_at), **self.trial_parameters(keys)},
        )
        found = self.client.query(
            f"SELECT DISTINCT type, src_partition FROM {self.db}.{Table.EVENTS_RAW}"
        ).result_rows
        self.types = frozenset(EventType(str(t)) for t, _ in found if str(t) in _KNOWN)
        self.catch_up(sorted({int(p) for _, p in found}))

    def trial_filter(self, keys: Sequence[tuple[int, int]] | None) -> str:
        """The judged rows a staged trial takes (see ``attempt_staged``)."""
        where = "ok"
        if not self.periods_convert:
            where += " AND type IN {trial_types:Array(String)}"
        if keys is not None:
            where += " AND (msg, pos) IN {keys:Array(Tuple(UInt32, UInt32))}"
        return where

    def trial_parameters(self, keys: Sequence[tuple[int, int]] | None) -> dict[str, object]:
        out: dict[str, object] = {} if keys is None else {"keys": list(keys)}
        if not self.periods_convert:
            types = {t.value for t in LIFECYCLE_TYPES}
            if self.gauges_convert:
                types |= {m.event_type.value for m in self.catalog.meters if m.is_gauge}
            out["trial_types"] = sorted(types)
        return out

    def attempt_empty(self) -> None:
        """The derived statements over no rows at all."""
        self.forget()
        self.types = frozenset()
        self.client.command(f"TRUNCATE TABLE {self.db}.{Table.EVENTS_RAW}")
        # claim a raw row that is not there: every derived statement runs, over nothing
        self._wm[Table.EVENTS_RAW][0] = 0
        try:
            self.catch_up([0])
        finally:
            self.forget()


_PERIODS = frozenset(rollup.GRAIN_TABLE.values())
_KNOWN = frozenset(t.value for t in EventType)
_WRAPPER = re.compile(r"^(?:SimpleAggregateFunction\(\w+, (.*)\)|LowCardinality\((.*)\))$")


def _plain(type_: str) -> str:
    """A column type without what does not change its values' range: ``SimpleAggregateFunction``
    and ``LowCardinality`` wrappers."""
    while m := _WRAPPER.match(type_):
        type_ = m.group(1) or m.group(2)
    return type_


class Preflight:
    """The probe database of one process, and trials of rows against it."""

    def __init__(self, writer: ClickHouseWriter) -> None:
        self.client = writer.client
        self.source_db = writer.db
        # a name of our own, like the stage: several aggregators may share one server
        self.db = f"{writer.db}_probe_{uuid.uuid4().hex[:12]}"
        self._probe = _TrialWriter(writer.client, self.db, writer.catalog)
        self._ready = False

    def staged_refusals(self, rows_table: str, ingested_at: datetime) -> list[tuple[tuple[int, int], str]]:
        """The (message, position) of the judged rows of a batch (stage.py) that ClickHouse would
        refuse, with the engine's reason: one trial when there are none, then a bisect."""
        first = self._data_error(lambda: self._probe.attempt_staged(rows_table, None, ingested_at))
        if first is None:
            return []
        keys = [
            (int(m), int(p))
            for m, p in self.client.query(
                f"SELECT msg, pos FROM {rows_table} WHERE {self._probe.trial_filter(None)} ORDER BY msg, pos",
                parameters=self._probe.trial_parameters(None),
            ).result_rows
        ]
        found = isolate(
            keys,
            lambda part: self._data_error(lambda: self._probe.attempt_staged(rows_table, part, ingested_at)),
            self._dry,
        )
        return [(key, reason(exc)) for key, exc in found]

    def _dry(self) -> BaseException | None:
        """A failure without rows is the query's (or the schema's), not the data's."""
        return self._data_error(self._probe.attempt_empty)

    def _data_error(self, run: Callable[[], None]) -> BaseException | None:
        self._ensure()
        try:
            run()
        except Exception as exc:
            if is_data_error(exc):
                return exc
            raise
        return None

    def _ensure(self) -> None:
        if not self._ready:
            self._probe.prepare(self.source_db)
            self._ready = True

    def reset(self) -> None:
        """Drop the probes: the next trial clones the real tables again (after a real statement
        failed with a data error the trial did not foresee: a table may have changed)."""
        self._ready = False
        self._probe.close()
        self.client.command(f"DROP DATABASE IF EXISTS {self.db} SYNC")

    def close(self) -> None:
        if self._ready:
            self.reset()
