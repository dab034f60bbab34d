"""Rules that depend on when an event was received, not only on its shape.

They are checked against the Kafka message timestamp, not the time the event is processed, so a
replay months later takes the same decisions as the first pass. Producers (the SDK, the HTTP
ingest) set that timestamp to the instant they judged the event by, so the producer's answer and
the aggregator's decision are one decision: an event accepted with 202 is never dead-lettered for
its time later.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from pydantic import ValidationError

from metering_client.events import format_number

__all__ = [
    "MAX_AGE",
    "MAX_FUTURE",
    "RejectCode",
    "above_maximum",
    "check_event_time",
    "kafka_time",
    "now_ms",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def now_ms() -> int:
    """Now as a Kafka timestamp (Unix milliseconds): the resolution the judging instant has."""
    return time.time_ns() // 1_000_000


def kafka_time(timestamp_ms: int) -> datetime:
    """A Kafka timestamp as an aware datetime, exactly (no float rounding: the producer and the
    aggregator must judge an event by the very same instant)."""
    return _EPOCH + timedelta(milliseconds=timestamp_ms)


MAX_AGE = timedelta(days=35)
MAX_FUTURE = timedelta(minutes=5)


class RejectCode:
    INVALID_JSON = "invalid_json"
    INVALID_EVENT = "invalid_event"
    UNKNOWN_TYPE = "unknown_type"
    TOO_OLD = "event_too_old"
    IN_FUTURE = "event_in_future"
    TOO_LARGE = "event_too_large"
    TENANT_MISMATCH = "tenant_mismatch"
    MISSING_TENANT = "missing_tenant"
    #: A lifecycle event sent where only usage is accepted (HTTP ingest, a usage producer).
    FORBIDDEN_EVENT_TYPE = "forbidden_event_type"
    #: An event on the wrong Kafka topic: lifecycle on the usage topic, or usage on the control one.
    WRONG_TOPIC = "wrong_topic"
    #: A number above its field's maximum per event (schemas/events.py, "Bounds per field" in
    #: docs/api.md); a usage report that large is sent as several events.
    OUT_OF_RANGE = "value_out_of_range"
    #: A valid event ClickHouse refuses to store (a data error, not an outage); the reason is the
    #: engine's error (aggregators/preflight.py). Decided by the aggregator, after the 202.
    STORAGE_REJECTED = "storage_rejected"


def check_event_time(
    event_time: datetime, received_at: datetime, backfill: bool = False
) -> tuple[str, str] | None:
    """None when ``event_time`` is acceptable, else (code, message).

    Events older than 35 days are accepted only through the explicit backfill path."""
    if event_time > received_at + MAX_FUTURE:
        return (
            RejectCode.IN_FUTURE,
            f"event time {event_time.isoformat()} is more than 5 minutes in the future",
        )
    if not backfill and event_time < received_at - MAX_AGE:
        return (
            RejectCode.TOO_OLD,
            f"event time {event_time.isoformat()} is older than 35 days; use the backfill path",
        )
    return None


def above_maximum(exc: ValidationError) -> str | None:
    """The message of ``value_out_of_range`` when every fault pydantic found in an event is a
    number above its field's maximum; None when anything else is wrong too (``invalid_event``).

    ``exc`` is the error of validating the whole event (``Event``). The SDK, the HTTP ingest and
    the aggregator all word it here, so one event gets one code and one message on every path.
    Only fields of ``data`` have maxima; pydantic reports their paths relative to ``data``."""
    errors = exc.errors(include_url=False)
    if not errors or any(e["type"] != "less_than_equal" for e in errors):
        return None
    parts = []
    for e in errors:
        loc = tuple(str(x) for x in e["loc"])
        path = ".".join(loc if loc[:1] == ("data",) else ("data", *loc))
        parts.append(f"{path}: must be <= {format_number(e['ctx']['le'])} (the per-event maximum)")
    return "; ".join(parts)
