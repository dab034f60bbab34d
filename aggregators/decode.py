"""Kafka messages -> validated raw rows and rejects, decided by pydantic (pure: no I/O).

A message is a batch of one tenant's events (schemas/wire.py). Each event is validated on its
own: one bad event never takes its neighbours down with it. What fails goes to the dead-letter
topic with a code, a message and the original bytes.

The hot path validates in ClickHouse (stage.py); this module decides only what the SQL does not
accept (invalid events, whose reject it words, and valid events in a form the SQL leaves to
pydantic), and the messages the engine cannot stage at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import msgspec
import orjson
from pydantic import ValidationError

from schemas.events import EVENT_ADAPTER, Event, EventType, Plane, plane_of
from schemas.validation import RejectCode, above_maximum, check_event_time, kafka_time
from schemas.wire import HEADER_BACKFILL, MAX_MESSAGE_BYTES, is_control_lane

MAX_EVENT_BYTES = 32 * 1024


@dataclass(frozen=True)
class SourceMessage:
    """One Kafka message as the processor sees it (independent of the client library).

    ``partition`` is the message's *lane* (schemas/wire.py): the partition for the usage topic,
    ``-1 - partition`` for the control topic."""

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


class RawRow(NamedTuple):
    tenant: str
    event_id: str
    type: EventType
    source: str
    subject: str
    time: datetime
    data: bytes  # the normalized JSON of the event's data object
    partition: int
    offset: int
    position: int = 0  # of the event in its message


@dataclass
class Decoded:
    rows: list[RawRow] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)


_ENVELOPE_FIELDS = frozenset(Event.model_fields)


def _error_text(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        path = tuple(str(x) for x in err.get("loc", ()))
        if path and path[0] not in _ENVELOPE_FIELDS:
            # pydantic reports errors inside ``data`` relative to the data model; say where they
            # are, as the ingest does (``data.cpu_seconds``). No data field is named like one of
            # the envelope.
            path = ("data", *path)
        loc = ".".join(path)
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts)


_ITEMS = msgspec.json.Decoder(list[msgspec.Raw])


def split(value: bytes) -> list[msgspec.Raw] | None:
    """The items of a batch message, each still raw; None if the value is not a JSON array."""
    try:
        return _ITEMS.decode(value)
    except msgspec.DecodeError:  # also malformed JSON ("[1,"), not only a non-array: no crash
        return None


_KNOWN_TYPES = frozenset(t.value for t in EventType)


def _code_for(raw: Any, exc: ValidationError) -> tuple[str, str]:
    """(code, message) for an event pydantic rejected. Numbers above their maximum, and nothing
    else wrong: ``value_out_of_range``, worded by ``above_maximum`` exactly as the ingest words it
    (ingest/sdk.py ``describe_validation_error``)."""
    # `type` may be anything a producer sent (a list, an object): only a string can be a type.
    if isinstance(raw, dict) and isinstance(raw.get("type"), str) and raw["type"] not in _KNOWN_TYPES:
        return RejectCode.UNKNOWN_TYPE, _error_text(exc)
    above = above_maximum(exc)
    if above is not None:
        return RejectCode.OUT_OF_RANGE, above
    return RejectCode.INVALID_EVENT, _error_text(exc)


_encode = msgspec.json.Encoder().encode


def _slow(item: bytes) -> Event | tuple[str, str]:
    """pydantic decides (and words the error) whatever the SQL path (stage.py) did not accept."""
    try:
        obj = orjson.loads(item)
    except orjson.JSONDecodeError as exc:
        return RejectCode.INVALID_JSON, str(exc)
    try:
        return EVENT_ADAPTER.validate_python(obj)
    except ValidationError as exc:
        return _code_for(obj, exc)


#: one event of a message: its raw bytes, or a ``msgspec.Raw`` slice of the message's value (no
#: copy: a batch's events would otherwise be held twice in memory while it is applied)
Item = bytes | msgspec.Raw


def message_items(msg: SourceMessage) -> list[Item] | Reject:
    """The events of a message, each as its raw bytes (a view of the message's value), or the
    reject of the whole message (too large, not JSON). A value holding a single JSON object is
    one event."""
    if len(msg.value) > MAX_MESSAGE_BYTES * 2:
        return Reject(msg.partition, msg.offset, -1, RejectCode.TOO_LARGE, "message too large", msg.value)
    items: list[Any] | None = split(msg.value)
    if items is None:  # not a JSON array: a single structured-mode event, or garbage
        try:
            msgspec.json.decode(msg.value)
        except msgspec.DecodeError as exc:
            return Reject(msg.partition, msg.offset, -1, RejectCode.INVALID_JSON, str(exc), msg.value)
        return [msg.value]
    return items


def decode_message(msg: SourceMessage) -> Decoded:
    """Every event of ``msg`` decided by pydantic (the fallback of the SQL path, stage.py)."""
    items = message_items(msg)
    if isinstance(items, Reject):
        return Decoded(rejects=[items])
    return decode_items(msg, items, range(len(items)))


def decode_items(msg: SourceMessage, items: Sequence[Item], positions: Iterable[int]) -> Decoded:
    """The events at ``positions`` of ``msg`` (``items``: its events), decided by pydantic."""
    out = Decoded()
    key_tenant = msg.key.decode("utf-8", "replace") if msg.key else None
    received = kafka_time(msg.timestamp_ms)
    backfill = msg.backfill
    control = is_control_lane(msg.partition)
    for i in positions:
        item = bytes(items[i])  # a copy only for the few events pydantic decides
        if len(item) > MAX_EVENT_BYTES:
            out.rejects.append(
                Reject(
                    msg.partition,
                    msg.offset,
                    i,
                    RejectCode.TOO_LARGE,
                    f"event is {len(item)} bytes; the limit is {MAX_EVENT_BYTES}",
                    item,
                )
            )
            continue
        slow = _slow(item)
        if isinstance(slow, tuple):
            out.rejects.append(Reject(msg.partition, msg.offset, i, slow[0], slow[1], item))
            continue
        tenant, event_id, etype, source = slow.tenant, slow.id, slow.type, slow.source
        subject, time, data = slow.subject or "", slow.time, _encode(slow.data)
        reject = _check(tenant, key_tenant, etype, control, time, received, backfill)
        if reject is not None:
            out.rejects.append(Reject(msg.partition, msg.offset, i, reject[0], reject[1], item))
            continue
        out.rows.append(
            RawRow(
                tenant or key_tenant or "",
                event_id,
                etype,
                source,
                subject,
                time.astimezone(UTC),
                data,
                msg.partition,
                msg.offset,
                i,
            )
        )
    return out


_WRONG_TOPIC = {
    # (arrived on the control topic, the type's plane) -> why it is refused
    (False, Plane.CONTROL): "a lifecycle event on the usage topic: lifecycle events are accepted "
    "only from the control topic, which administrators write",
    (True, Plane.USAGE): "a usage event on the control topic: usage events are accepted only from "
    "the usage topic",
}


def _check(
    tenant: str | None,
    key_tenant: str | None,
    etype: EventType,
    control: bool,
    time: datetime,
    received: datetime,
    backfill: bool,
) -> tuple[str, str] | None:
    # First: a usage producer must never reach the control plane, whatever else is wrong.
    wrong = _WRONG_TOPIC.get((control, plane_of(etype)))
    if wrong is not None:
        return RejectCode.WRONG_TOPIC, wrong
    if not (tenant or key_tenant):
        return RejectCode.MISSING_TENANT, "the event names no tenant and the message has no key"
    if key_tenant is not None and tenant is not None and tenant != key_tenant:
        # The key decides the partition; an event filed under another tenant's key would be
        # ordered and deduplicated in the wrong place.
        return RejectCode.TENANT_MISMATCH, "the event's tenant differs from the message key"
    return check_event_time(time, received, backfill=backfill)


_lines = msgspec.json.Encoder().encode_lines

#: ClickHouse settings the raw rows need: ISO-8601 times as written by msgspec; ``data`` is a
#: JSON object stored as its text (input_format_json_read_objects_as_strings, on by default).
RAW_INSERT_SETTINGS = {
    "date_time_input_format": "best_effort",
    "input_format_json_read_objects_as_strings": 1,
}


class _StagedOut(msgspec.Struct, array_like=False):
    ok: int
    msg: int
    pos: int
    tenant: str
    event_id: str
    type: str
    source: str
    subject: str
    time: datetime
    data: msgspec.Raw
    src_partition: int
    src_offset: int


def staged_rows_json(rows: Iterable[tuple[int, RawRow]]) -> bytes:
    """JSONEachRow for the batch's rows table (stage.py): (message index, row) pairs."""
    return _lines(
        [
            _StagedOut(
                1,
                m,
                r.position,
                r.tenant,
                r.event_id,
                r.type.value,
                r.source,
                r.subject,
                r.time,
                msgspec.Raw(r.data),
                r.partition,
                r.offset,
            )
            for m, r in rows
        ]
    )
