"""Rules that depend on when an event was received, not only on its shape.

They are checked against the time the event reached Kafka (the message timestamp), not the
time it is processed, so a replay months later takes the same decisions as the first pass.
"""

from __future__ import annotations

from datetime import datetime, timedelta

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
