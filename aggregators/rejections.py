"""What became of the events the aggregator did not count: the ``rejections`` and
``event_duplicates`` tables (migration 0006, docs/tables.md), each row written exactly once per
source position.

A rejected event's position is its lane, offset and index in the Kafka message: the same after a
crash and a re-processing of the batch. So:

1. the rejects of a batch already recorded (a batch re-processed after a crash) are found in
   ``rejections`` and *not* sent to the dead-letter topic again;
2. the others are sent to the dead-letter topic and flushed (a rejected event is never lost);
3. only then are they inserted into ``rejections``, with an insert deduplication token made of
   their positions on a Replicated table, none elsewhere (aggregators/insert_token.py: a SIGKILL
   could keep the token and lose the part); ReplacingMergeTree keyed on the position collapses
   any copy left (reads use ``FINAL``).

A crash between 2 and 3 is the one case where an event reaches the dead-letter topic twice: a
dead-letter consumer dedupes by the ``metering-dlq-source`` header (``dedupe_dead_letters``);
``rejections`` is the exactly-once record (docs/exactly-once.md, "Dead letters").

Duplicates the aggregator drops (a later copy of a counted id) are recorded in
``event_duplicates`` before the raw insert (``ClickHouseWriter.record_duplicates``), keyed the same way, so ``GET /api/v1/events/{id}``
can say which copy was counted instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import orjson
from clickhouse_connect.driver.client import Client

from aggregators import insert_token
from aggregators.decode import Reject, SourceMessage
from schemas.clickhouse import Table
from schemas.validation import kafka_time
from schemas.wire import HEADER_DLQ_SOURCE

ORIGIN_AGGREGATOR = "aggregator"
ORIGIN_INGEST = "ingest"

REJECTION_COLUMNS = (
    "tenant",
    "event_id",
    "type",
    "code",
    "message",
    "origin",
    "src_partition",
    "src_offset",
    "src_index",
    "request_id",
    "key_id",
    "received_at",
    "rejected_at",
    "original",
)


class Sink(Protocol):
    def send(self, rejects: Sequence[Reject]) -> None: ...
    def flush(self) -> None: ...


class Target(Protocol):
    """What is needed of ``aggregators.writer.ClickHouseWriter``."""

    client: Client
    db: str


@dataclass(frozen=True)
class Rejection:
    """One row of ``rejections``."""

    tenant: str
    event_id: str
    type: str
    code: str
    message: str
    origin: str
    src_partition: int
    src_offset: int
    src_index: int
    request_id: str
    key_id: str
    received_at: datetime
    rejected_at: datetime
    original: bytes

    @property
    def key(self) -> tuple[str, str, str, int, int, int]:
        return (
            self.tenant,
            self.origin,
            self.request_id,
            self.src_partition,
            self.src_offset,
            self.src_index,
        )

    def row(self) -> list[Any]:
        return [getattr(self, c) for c in REJECTION_COLUMNS]


def event_fields(original: bytes) -> tuple[str, str, str]:
    """(tenant, id, type) as far as the bytes say (empty strings where they don't)."""
    try:
        parsed = orjson.loads(original)
    except orjson.JSONDecodeError:
        return "", "", ""
    if not isinstance(parsed, dict):
        return "", "", ""

    def text(name: str) -> str:
        value = parsed.get(name)
        return value[:256] if isinstance(value, str) else ""

    # a CloudEvent; or, for a refused row whose item was not found, its events_raw row
    return text("tenant"), text("id") or text("event_id"), text("type")


def aggregator_rejections(
    rejects: Sequence[Reject], messages: Sequence[SourceMessage], now: datetime
) -> list[Rejection]:
    """The rows for ``rejects`` of ``messages``: the tenant is the message's key (the producer's
    tenant, the one the ingest authenticated), else the event's own attribute; received is the
    message timestamp (the instant the producer judged the event by)."""
    by_source = {(m.partition, m.offset): m for m in messages}
    out = []
    for r in rejects:
        msg = by_source.get((r.partition, r.offset))
        tenant, event_id, type_ = event_fields(r.original)
        key = msg.key.decode("utf-8", "replace") if msg is not None and msg.key else ""
        received = kafka_time(msg.timestamp_ms) if msg is not None else now
        out.append(
            Rejection(
                key or tenant,
                event_id,
                type_,
                r.code,
                r.message[:4000],
                ORIGIN_AGGREGATOR,
                r.partition,
                r.offset,
                r.index,
                "",
                "",
                received,
                now,
                r.original,
            )
        )
    return out


def insert_rejections(client: Client, database: str, rows: Sequence[Rejection]) -> None:
    if not rows:
        return
    client.insert(
        f"{database}.{Table.REJECTIONS}",
        [r.row() for r in rows],
        column_names=list(REJECTION_COLUMNS),
        settings=insert_token.insert_settings(
            client, database, Table.REJECTIONS, _token("rej", (r.key for r in rows))
        ),
    )


def recorded(
    client: Client, database: str, rows: Sequence[Rejection]
) -> set[tuple[str, str, str, int, int, int]]:
    """The keys of ``rows`` already in ``rejections`` (a batch seen before a crash)."""
    if not rows:
        return set()
    found = client.query(
        f"SELECT tenant, origin, request_id, src_partition, src_offset, src_index FROM {database}.{Table.REJECTIONS} "
        # tenant and origin first: the sort key's prefix, so a lookup reads few granules
        "WHERE tenant IN {ts:Array(String)} AND origin = {o:String} "
        "AND src_partition IN {ps:Array(Int32)} AND src_offset IN {os:Array(Int64)}",
        parameters={
            "ts": sorted({r.tenant for r in rows}),
            "o": rows[0].origin,
            "ps": sorted({r.src_partition for r in rows}),
            "os": sorted({r.src_offset for r in rows}),
        },
    ).result_rows
    return {(str(t), str(o), str(q), int(p), int(f), int(i)) for t, o, q, p, f, i in found}


def dead_letter(
    sink: Sink, target: Target, rejects: Sequence[Reject], messages: Sequence[SourceMessage], now: datetime
) -> int:
    """Dead-letter ``rejects`` and record them, each once (the module doc's steps 1-3); the
    number sent to the dead-letter topic (0 for a batch whose rejects were all recorded)."""
    rows = aggregator_rejections(rejects, messages, now)
    seen = recorded(target.client, target.db, rows)
    new = [(rej, row) for rej, row in zip(rejects, rows, strict=True) if row.key not in seen]
    if not new:
        return 0
    sink.send([rej for rej, _ in new])
    sink.flush()
    insert_rejections(target.client, target.db, [row for _, row in new])
    return len(new)


def dedupe_dead_letters(headers_of: Iterable[Sequence[tuple[str, bytes]]]) -> list[int]:
    """Positions (in the order given) of the dead-letter messages to keep: the first of each
    ``metering-dlq-source``. What a consumer of the dead-letter topic does to see each rejected
    event once (a crash between the dead-letter flush and the ``rejections`` insert re-sends)."""
    seen: set[bytes] = set()
    keep = []
    for i, headers in enumerate(headers_of):
        source = next((v for k, v in headers if k == HEADER_DLQ_SOURCE), None)
        if source is not None and source in seen:
            continue
        if source is not None:
            seen.add(source)
        keep.append(i)
    return keep


def _token(kind: str, keys: Iterable[tuple[Any, ...]]) -> str:
    h = hashlib.sha256(kind.encode())
    for k in sorted(keys):
        h.update(repr(k).encode())
    return f"{kind}-{h.hexdigest()}"
