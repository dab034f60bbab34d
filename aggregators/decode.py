"""Kafka messages -> validated raw rows and rejects (pure: no I/O).

A message is a batch of one tenant's events (schemas/wire.py). Each event is validated on its
own: one bad event never takes its neighbours down with it. What fails goes to the dead-letter
topic with a code, a message and the original bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import ValidationError

from schemas.events import EVENT_ADAPTER, Event, EventType
from schemas.validation import RejectCode, check_event_time
from schemas.wire import HEADER_BACKFILL, MAX_MESSAGE_BYTES, decode_value

MAX_EVENT_BYTES = 32 * 1024


@dataclass(frozen=True)
class SourceMessage:
    """One Kafka message as the processor sees it (independent of the client library)."""

    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes
    headers: Sequence[tuple[str, bytes]] = ()

    @property
    def backfill(self) -> bool:
        return any(k == HEADER_BACKFILL and v == b"1" for k, v in self.headers)


@dataclass(frozen=True)
class Reject:
    partition: int
    offset: int
    index: int  # position of the event in its message; -1 when the whole message is bad
    code: str
    message: str
    original: bytes


@dataclass(frozen=True)
class RawRow:
    tenant: str
    event_id: str
    type: EventType
    source: str
    subject: str
    time: datetime
    data: dict[str, Any]
    partition: int
    offset: int


@dataclass
class Decoded:
    rows: list[RawRow] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)


def _error_text(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts)


def _code_for(raw: Any, exc: ValidationError) -> str:
    known = {t.value for t in EventType}
    if isinstance(raw, dict) and "type" in raw and raw.get("type") not in known:
        return RejectCode.UNKNOWN_TYPE
    return RejectCode.INVALID_EVENT


def decode_message(msg: SourceMessage) -> Decoded:
    out = Decoded()
    if len(msg.value) > MAX_MESSAGE_BYTES * 2:
        out.rejects.append(
            Reject(msg.partition, msg.offset, -1, RejectCode.TOO_LARGE, "message too large", msg.value)
        )
        return out
    try:
        items = decode_value(msg.value)
    except orjson.JSONDecodeError as exc:
        out.rejects.append(
            Reject(msg.partition, msg.offset, -1, RejectCode.INVALID_JSON, str(exc), msg.value)
        )
        return out
    key_tenant = msg.key.decode("utf-8", "replace") if msg.key else None
    received = datetime.fromtimestamp(msg.timestamp_ms / 1000, UTC)
    for i, item in enumerate(items):
        original = orjson.dumps(item)

        def reject(code: str, text: str, i: int = i, original: bytes = original) -> None:
            out.rejects.append(Reject(msg.partition, msg.offset, i, code, text, original))

        if len(original) > MAX_EVENT_BYTES:
            reject(RejectCode.TOO_LARGE, f"event is {len(original)} bytes; the limit is {MAX_EVENT_BYTES}")
            continue
        try:
            event: Event = EVENT_ADAPTER.validate_python(item)
        except ValidationError as exc:
            reject(_code_for(item, exc), _error_text(exc))
            continue
        tenant = event.tenant or key_tenant
        if not tenant:
            reject(RejectCode.MISSING_TENANT, "the event names no tenant and the message has no key")
            continue
        if key_tenant is not None and tenant != key_tenant:
            # The key decides the partition; an event filed under another tenant's key would be
            # ordered and deduplicated in the wrong place.
            reject(RejectCode.TENANT_MISMATCH, "the event's tenant differs from the message key")
            continue
        bad_time = check_event_time(event.time, received, backfill=msg.backfill)
        if bad_time:
            reject(*bad_time)
            continue
        out.rows.append(
            RawRow(
                tenant=tenant,
                event_id=event.id,
                type=event.type,
                source=event.source,
                subject=event.subject or "",
                time=event.time.astimezone(UTC),
                data=event.data,
                partition=msg.partition,
                offset=msg.offset,
            )
        )
    return out


def decode_messages(messages: Iterable[SourceMessage]) -> Decoded:
    total = Decoded()
    for msg in messages:
        d = decode_message(msg)
        total.rows.extend(d.rows)
        total.rejects.extend(d.rejects)
    return total


def raw_row_json(row: RawRow, ingested_at: str) -> bytes:
    """One JSONEachRow line for ``events_raw``."""
    return orjson.dumps(
        {
            "tenant": row.tenant,
            "event_id": row.event_id,
            "type": row.type.value,
            "source": row.source,
            "subject": row.subject,
            "time": row.time.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
            "data": orjson.dumps(row.data).decode(),
            "src_partition": row.partition,
            "src_offset": row.offset,
            "ingested_at": ingested_at,
        }
    )
