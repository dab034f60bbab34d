"""Building and validating events before they are sent: one decision on every path.

The HTTP ingest, the Kafka producer SDK and the client all judge an event here, with the models
of ``metering_client.events``, so an event gets the same code and message whichever way it goes.
Pure: no I/O. Imports pydantic only (orjson is used when it is installed, as on the server).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from metering_client.events import DATA_MODELS, Event, EventType, Plane, plane_of
from metering_client.validation import RejectCode, above_maximum, check_event_time

try:  # the server has orjson; the client does without it (same verdict, slower)
    import orjson

    def _dumps(value: Any) -> bytes:
        return orjson.dumps(value)

except ImportError:  # pragma: no cover - exercised in the client's own virtualenv

    def _dumps(value: Any) -> bytes:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


MAX_MESSAGE_CHARS = 1000  # of one rejection message

# ---- errors -----------------------------------------------------------------------------------


class IngestError(Exception):
    """Base of the SDK's errors."""


class InvalidEvent(IngestError, ValueError):
    """An event that cannot be sent; nothing was queued. ``code`` is a ``RejectCode`` value."""

    def __init__(self, code: str, message: str, event_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}" + (f" (event {event_id})" if event_id else ""))
        self.code = code
        self.message = message
        self.event_id = event_id


# ---- building and validating events (pure) ------------------------------------------------------


def format_time(t: datetime) -> str:
    """ISO-8601 in UTC with a ``Z``, millisecond precision (what ClickHouse keeps)."""
    if t.tzinfo is None:
        raise ValueError("event times must be timezone-aware")
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_event(
    type: EventType | str,
    data: Mapping[str, Any],
    tenant: str,
    source: str,
    time: datetime | str | None = None,
    id: str | None = None,
    subject: str | None = None,
) -> dict[str, Any]:
    """A CloudEvent dict (unvalidated: ``emit`` validates). ``id`` defaults to a random UUID,
    ``time`` to now. Give a stable ``id`` when the same usage may be reported twice (a retry
    after a crash): the pipeline counts an id once per tenant."""
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": id or str(uuid.uuid4()),
        "source": source,
        "type": str(type),
        "time": time if isinstance(time, str) else format_time(time or datetime.now(UTC)),
        "tenant": tenant,
        "data": dict(data),
    }
    if subject is not None:
        event["subject"] = subject
    return event


def prepare_event(
    event: Event | Mapping[str, Any],
    tenant: str,
    *,
    received_at: datetime | None = None,
    backfill: bool = False,
    plane: Plane | None = Plane.USAGE,
) -> dict[str, Any]:
    """Validate ``event`` for ``tenant`` and return the dict to send (``tenant`` and ``subject``
    set, ``data`` normalized). Raises ``InvalidEvent``.

    A ``tenant`` already in the event must equal ``tenant``: an event never changes owner.
    The time window is checked against ``received_at`` (default: now); older than 35 days
    needs ``backfill``. ``plane``: the event's type must belong to it (``forbidden_event_type``
    otherwise): usage by default, ``Plane.CONTROL`` for administrators' lifecycle events,
    ``None`` for either (validation only, nothing is sent).
    """
    now = received_at or datetime.now(UTC)
    if plane is not None:
        _check_plane(event, plane)
    if isinstance(event, Event):
        if event.tenant is not None and event.tenant != tenant:
            raise InvalidEvent(RejectCode.TENANT_MISMATCH, _mismatch(event.tenant, tenant), event.id)
        model = event.model_copy(update={"tenant": tenant}) if event.tenant != tenant else event
        if not tenant:
            raise InvalidEvent(RejectCode.MISSING_TENANT, "a tenant is required", event.id)
    elif type(event) is dict or isinstance(event, Mapping):  # type() first: the ABC check is dearer
        raw_id = event.get("id")
        event_id = raw_id if isinstance(raw_id, str) else None
        claimed = event.get("tenant")
        if claimed is not None and claimed != tenant:
            raise InvalidEvent(RejectCode.TENANT_MISMATCH, _mismatch(claimed, tenant), event_id)
        if not tenant:
            raise InvalidEvent(RejectCode.MISSING_TENANT, "a tenant is required", event_id)
        try:
            model = Event.model_validate({**event, "tenant": tenant})
        except ValidationError as exc:
            code, message = describe_validation_error(event, exc)
            raise InvalidEvent(code, message, event_id) from None
    else:
        raise InvalidEvent(RejectCode.INVALID_EVENT, f"an event is a JSON object, not {type(event).__name__}")
    window = check_event_time(model.time, now, backfill)
    if window is not None:
        raise InvalidEvent(window[0], window[1], model.id)
    out = model.model_dump(mode="json", exclude_none=True)
    try:
        _dumps(out)  # what cannot be encoded must fail here, not when the batch is sent
    except (TypeError, ValueError) as exc:  # orjson.JSONEncodeError is a TypeError
        raise InvalidEvent(
            RejectCode.INVALID_EVENT, f"the event cannot be encoded as JSON: {exc}", model.id
        ) from None
    return out


#: ``EventType(value)`` as a lookup (a string's type, or nothing for an unknown one)
_EVENT_TYPES: dict[str, EventType] = {t.value: t for t in EventType}


def _check_plane(event: Event | Mapping[str, Any], plane: Plane) -> None:
    raw_type = (
        event.type if isinstance(event, Event) else event.get("type") if isinstance(event, Mapping) else None
    )
    event_type = _EVENT_TYPES.get(raw_type) if isinstance(raw_type, str) else None
    # None: not a string, or an unknown type, which validation rejects with its own code
    if event_type is None or plane_of(event_type) is plane:
        return
    raw_id = event.id if isinstance(event, Event) else event.get("id")
    event_id = raw_id if isinstance(raw_id, str) else None
    if plane is Plane.USAGE:
        message = (
            f"{event_type.value} is a lifecycle event: the control plane (tenants, workspaces, "
            "members, contracts, workstations, datastreams, keys, tokens) is written by "
            "administrators only (`metering admin`); a usage key sends usage events"
        )
    else:
        message = f"{event_type.value} is a usage event: the control topic carries lifecycle events only"
    raise InvalidEvent(RejectCode.FORBIDDEN_EVENT_TYPE, message, event_id)


def describe_validation_error(raw: Mapping[str, Any], exc: ValidationError) -> tuple[str, str]:
    """(reject code, one-line message) for a failed ``Event`` validation, with ``data.``-prefixed
    paths for errors inside ``data`` (pydantic reports those relative to the data model).
    Numbers above their maximum, and nothing else wrong: ``value_out_of_range``, worded by
    ``schemas.validation.above_maximum`` as the aggregator words it."""
    errors = exc.errors(include_url=False)
    for err in errors:
        if err["loc"] == ("type",) and err["type"] in ("enum", "literal_error"):
            return RejectCode.UNKNOWN_TYPE, f"unknown event type {_short(raw.get('type'))}"
    above = above_maximum(exc)
    if above is not None:
        return RejectCode.OUT_OF_RANGE, above
    envelope_fields = set(Event.model_fields)
    if all(not err["loc"] or str(err["loc"][0]) in envelope_fields for err in errors):
        return RejectCode.INVALID_EVENT, _join_errors(errors)
    # Errors from inside ``data``: validate it alone to get paths we can prefix.
    data = raw.get("data")
    try:
        model = DATA_MODELS[EventType(raw["type"])]
        model.model_validate(data)
    except ValidationError as inner:
        return RejectCode.INVALID_EVENT, _join_errors(inner.errors(include_url=False), prefix="data")
    except (KeyError, ValueError, TypeError):
        pass
    return RejectCode.INVALID_EVENT, _join_errors(errors)


def _join_errors(errors: Iterable[Any], prefix: str = "") -> str:
    parts = []
    for err in errors:
        path = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{path}: {msg}" if path else msg)
    joined = "; ".join(parts)
    # Field names come from the input: bound what is echoed back.
    return joined if len(joined) <= MAX_MESSAGE_CHARS else joined[: MAX_MESSAGE_CHARS - 1] + "…"


def _short(value: object, limit: int = 64) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _mismatch(claimed: object, tenant: str) -> str:
    return f"the event names tenant {_short(claimed)} but is sent for tenant {tenant!r}"


def check_event(event: Event | Mapping[str, Any], *, plane: Plane | None = Plane.USAGE) -> dict[str, Any]:
    """Validate ``event`` as a client does before queueing it, and return the dict to send.

    The shape, the type, the numbers and the plane are judged as the ingest judges them (same
    codes and messages); the time window is not, because the receiver judges it by its own clock.
    The tenant is left as the event has it: over HTTP it comes from the API key. Raises
    ``InvalidEvent``."""
    if plane is not None:
        _check_plane(event, plane)
    if isinstance(event, Event):
        model = event
    elif isinstance(event, Mapping):
        raw_id = event.get("id")
        try:
            model = Event.model_validate(dict(event))
        except ValidationError as exc:
            code, message = describe_validation_error(event, exc)
            raise InvalidEvent(code, message, raw_id if isinstance(raw_id, str) else None) from None
    else:
        raise InvalidEvent(RejectCode.INVALID_EVENT, f"an event is a JSON object, not {type(event).__name__}")
    out = model.model_dump(mode="json", exclude_none=True)
    try:
        _dumps(out)
    except (TypeError, ValueError) as exc:
        raise InvalidEvent(
            RejectCode.INVALID_EVENT, f"the event cannot be encoded as JSON: {exc}", model.id
        ) from None
    return out


def encoded_json(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON (what the HTTP transport sends)."""
    return _dumps(value)
