"""Bounds per field and strict numbers (issue 7, items 2 and 6), pure: the event models, the
reject codes, and one decision on every path -- the SDK and the HTTP ingest (``prepare_event``)
and the aggregator's pydantic decisions (``decode_message``; the SQL path is held to them by
tests/unit/test_stage_sql.py)."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest

from aggregators.decode import SourceMessage, decode_message
from ingest.sdk import InvalidEvent, prepare_event
from schemas.events import (
    DATA_MODELS,
    EVENT_ADAPTER,
    MAX_SUM_PER_EVENT,
    USAGE_TYPES,
    Event,
    EventType,
    format_number,
)
from schemas.generate import OUT_DIR
from schemas.meters import Aggregation, default_catalog
from schemas.validation import RejectCode

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)
TENANT = "t1"

#: Decimal128(9) holds 38 digits, 9 after the point (schemas/migrations/0002_usage_periods.up.sql).
CAPACITY = Decimal(10) ** 29
#: The horizon the bounds are sized for: 1e6 events/s, all tenants together, for 100 years.
HORIZON_EVENTS = 10**6 * 100 * 365.25 * 86400
MARGIN = 30


def _numeric_fields(model: type[Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, prop in model.model_json_schema()["properties"].items():
        schema = next((s for s in prop.get("anyOf", [prop]) if s.get("type") != "null"), prop)
        if schema.get("type") in ("number", "integer"):
            out[name] = schema
    return out


#: (event type, field, its JSON schema) for every number a usage event carries.
USAGE_NUMBERS = [
    (t, name, schema) for t in sorted(USAGE_TYPES) for name, schema in _numeric_fields(DATA_MODELS[t]).items()
]
_MINIMAL: dict[str, Any] = {"string": "x", "number": 1.5, "integer": 7, "array": []}


def data_for(etype: EventType, **over: Any) -> dict[str, Any]:
    model = DATA_MODELS[etype]
    schema = model.model_json_schema()
    data = {
        name: _MINIMAL[next(s for s in p.get("anyOf", [p]) if s.get("type") != "null")["type"]]
        for name, p in schema["properties"].items()
        if name in schema.get("required", [])
    }
    return data | over


def event(etype: EventType, **data: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": "e1",
        "source": "s",
        "type": etype.value,
        "time": "2026-11-22T10:00:00Z",
        "data": data_for(etype, **data),
    }


def ingest_verdict(ev: dict[str, Any]) -> tuple[str, str | Any]:
    """("accepted", the stored value of every data field) or (code, message), as the HTTP
    ingest and the SDK decide (both call prepare_event)."""
    try:
        out = prepare_event(ev, TENANT, received_at=NOW)
    except InvalidEvent as exc:
        return exc.code, exc.message
    return "accepted", out["data"]


def aggregator_verdict(raw: bytes) -> tuple[str, str | Any]:
    """The same, as the aggregator decides a raw Kafka message holding the event twice (the
    whole-message fast path, then event by event) and once (the single-event path)."""
    verdicts = []
    for value in (b"[" + raw + b"," + raw + b"]", b"[" + raw + b"]"):
        d = decode_message(SourceMessage(0, 7, NOW_MS, TENANT.encode(), value))
        assert len(d.rows) + len(d.rejects) == value.count(b'"specversion"')
        verdicts += [("accepted", orjson.loads(r.data)) for r in d.rows]
        verdicts += [(r.code, r.message) for r in d.rejects]
    assert all(v == verdicts[0] for v in verdicts), verdicts
    return verdicts[0]


def verdicts(ev: dict[str, Any], raw: bytes | None = None) -> tuple[str, str | Any]:
    """One decision on every path: the ingest and the aggregator agree on the code, the message
    and (accepted) the stored values; the SQL path (tests/unit/test_stage_sql.py) is held to pydantic separately."""
    raw = raw if raw is not None else orjson.dumps(ev)
    ingest = ingest_verdict(orjson.loads(raw))
    aggregator = aggregator_verdict(raw)
    assert aggregator == ingest, raw
    return ingest


def accepted_as(verdict: tuple[str, Any], name: str) -> tuple[Any, type]:
    """The stored value of field ``name`` of an accepted event, and its JSON type."""
    assert verdict[0] == "accepted", verdict
    return verdict[1][name], type(verdict[1][name])


# ---- the models -------------------------------------------------------------------------------


def test_every_number_of_a_usage_event_has_a_maximum() -> None:
    assert {name for _, name, _ in USAGE_NUMBERS} == {
        "cpu_seconds",
        "memory_mib",
        "gpu_seconds",
        "memory_gb",
        "output_duration_seconds",
        "bytes",
        "total_rows",
        "status_code",
    }
    for etype, name, schema in USAGE_NUMBERS:
        assert "maximum" in schema, (etype, name)
        assert schema["minimum"] >= 0, (etype, name)


def test_every_number_of_a_lifecycle_event_has_a_maximum_too() -> None:
    for etype in sorted(set(EventType) - USAGE_TYPES):
        for name, schema in _numeric_fields(DATA_MODELS[etype]).items():
            assert "maximum" in schema, (etype, name)


def test_the_checked_in_json_schemas_carry_the_maxima() -> None:
    for etype, name, schema in USAGE_NUMBERS:
        published = json.loads((OUT_DIR / f"{etype.value}.json").read_text())
        prop = published["properties"]["data"]["properties"][name]
        prop = next((s for s in prop.get("anyOf", [prop]) if s.get("type") != "null"), prop)
        assert prop["maximum"] == schema["maximum"], (etype, name)


def test_no_period_sum_can_overflow_within_the_horizon() -> None:
    """The reasoning next to the bounds (schemas/events.py), recomputed from the meter catalog:
    a meter added with a larger bound or a longer gap fails here."""
    catalog = default_catalog()
    worst: dict[str, Decimal] = {}
    for meter in catalog.meters:
        if meter.value is None or meter.aggregation in (Aggregation.COUNT, Aggregation.UNIQUE_COUNT):
            continue
        schema = _numeric_fields(DATA_MODELS[meter.event_type])[meter.value]
        per_event = Decimal(schema["maximum"])
        if meter.aggregation is Aggregation.INTEGRAL:
            assert meter.max_gap_seconds is not None
            per_event *= meter.max_gap_seconds  # value x seconds held
            # the rollup multiplies the value by a window piece in milliseconds
            assert Decimal(schema["maximum"]) * meter.max_gap_seconds * 1000 < CAPACITY
        total = per_event * Decimal(HORIZON_EVENTS)
        worst[meter.slug] = total
        assert total * MARGIN < CAPACITY, (meter.slug, total)
    assert worst["workstation_cpu_seconds"] == Decimal(MAX_SUM_PER_EVENT) * Decimal(HORIZON_EVENTS)


def test_no_data_field_is_named_like_an_envelope_field() -> None:
    """The aggregator's dead-letter reasons prefix ``data.`` to paths that are not envelope
    fields (pydantic reports data errors relative to the data model)."""
    for model in DATA_MODELS.values():
        assert not set(model.model_fields) & set(Event.model_fields), model


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (10**12, "1e12"),
        (1e12, "1e12"),
        (10**6, "1e6"),
        (10**9, "1e9"),
        (599, "599"),
        (28, "28"),
        (2.5e9, "2.5e9"),
    ],
)
def test_bounds_are_written_as_people_write_them(value: float, text: str) -> None:
    assert format_number(value) == text


# ---- one decision on every path, at every bound -----------------------------------------------


def _ids(case: tuple[EventType, str, dict[str, Any]]) -> str:
    return f"{case[0].value}.{case[1]}"


@pytest.mark.parametrize("case", USAGE_NUMBERS, ids=_ids)
def test_at_the_maximum_is_accepted_above_it_is_out_of_range(
    case: tuple[EventType, str, dict[str, Any]],
) -> None:
    etype, name, schema = case
    hi = schema["maximum"]
    integer = schema["type"] == "integer"
    stored = hi if integer else float(hi)
    for at in (hi, float(hi)):
        assert accepted_as(verdicts(event(etype, **{name: at})), name) == (stored, type(stored))
    below = hi - 1 if integer else math.nextafter(float(hi), 0)
    assert verdicts(event(etype, **{name: below}))[0] == "accepted"
    want = (RejectCode.OUT_OF_RANGE, f"data.{name}: must be <= {format_number(hi)} (the per-event maximum)")
    above = [hi + 1, hi * 10, 1e29, 9e28, 1e308]
    if not integer:
        above += [math.nextafter(float(hi), math.inf), hi + 0.001]
    for value in above:
        assert verdicts(event(etype, **{name: value})) == want, value
    for token in (
        b"1e29",
        b"1E+29",
        b"100000000000000000000000000000",
        str(2**127).encode(),
        str(hi + 1).encode(),
    ):
        raw = orjson.dumps(event(etype, **{name: 123})).replace(b":123", b":" + token)
        assert verdicts({}, raw) == want, token


@pytest.mark.parametrize("case", USAGE_NUMBERS, ids=_ids)
def test_numbers_are_json_numbers_only(case: tuple[EventType, str, dict[str, Any]]) -> None:
    """No string, no boolean: "12" is not 12 and true is not 1 (they were, before)."""
    etype, name, schema = case
    ok = schema["minimum"] + 1
    nullable = not DATA_MODELS[etype].model_fields[name].is_required()  # status_code: null is "none"
    for value in (str(ok), "1e12", True, False, "", *([] if nullable else [None]), [ok], {"v": ok}):
        code, message = verdicts(event(etype, **{name: value}))
        assert code == RejectCode.INVALID_EVENT, value
        assert message.startswith(f"data.{name}: Input should be a valid "), message


@pytest.mark.parametrize("case", [c for c in USAGE_NUMBERS if c[2]["type"] == "integer"], ids=_ids)
def test_an_integer_field_takes_an_integral_number_only(case: tuple[EventType, str, dict[str, Any]]) -> None:
    """JSON has one number type (and JSON Schema's integer is a number with a zero fractional
    part): 12.0 is the integer 12, stored as 12; 12.5 is rejected."""
    etype, name, schema = case
    ok = schema["minimum"] + 1
    assert accepted_as(verdicts(event(etype, **{name: float(ok)})), name) == (ok, int)
    for token in (f"{ok}.0", f"{ok}e0", f"{ok}.000"):
        raw = orjson.dumps(event(etype, **{name: 123})).replace(b":123", b":" + token.encode())
        assert accepted_as(verdicts({}, raw), name) == (ok, int), token
    code, message = verdicts(event(etype, **{name: ok + 0.5}))
    assert code == RejectCode.INVALID_EVENT and "fractional part" in message


def test_a_float_field_takes_an_integer_as_the_same_number() -> None:
    ev = event(EventType.WORKSTATION_CPU, cpu_seconds=12)
    assert accepted_as(verdicts(ev), "cpu_seconds") == (12.0, float)


def test_an_event_wrong_in_another_way_too_is_invalid_not_out_of_range() -> None:
    ev = event(EventType.WORKSTATION_CPU, cpu_seconds=1e29, extra="x")
    code, message = verdicts(ev)
    assert code == RejectCode.INVALID_EVENT
    assert "data.cpu_seconds" in message and "data.extra" in message
    ev = event(EventType.WORKSTATION_CPU, cpu_seconds=1e29) | {"id": ""}
    assert verdicts(ev)[0] == RejectCode.INVALID_EVENT


def test_several_fields_above_their_maxima_are_all_named() -> None:
    ev = event(EventType.DATASTREAM_ROWS, total_rows=10**13)
    assert verdicts(ev) == (
        RejectCode.OUT_OF_RANGE,
        "data.total_rows: must be <= 1e12 (the per-event maximum)",
    )
    ev = event(EventType.WORKSTATION_MEMORY, memory_gb=1e29)
    assert verdicts(ev) == (RejectCode.OUT_OF_RANGE, "data.memory_gb: must be <= 1e6 (the per-event maximum)")


def test_negative_and_non_finite_numbers_stay_invalid_events() -> None:
    """``value_out_of_range`` means "too large for one event: report it as several"; a negative
    or non-finite number is not usage at all."""
    assert verdicts(event(EventType.WORKSTATION_CPU, cpu_seconds=-1))[0] == RejectCode.INVALID_EVENT
    with pytest.raises(InvalidEvent) as exc:
        prepare_event(event(EventType.WORKSTATION_CPU, cpu_seconds=math.inf), TENANT, received_at=NOW)
    assert exc.value.code == RejectCode.INVALID_EVENT


@pytest.mark.parametrize(
    ("etype", "data"),
    [
        (EventType.WORKSTATION_CREATED, {"usd_per_cpu_hour": "0.07"}),
        (EventType.WORKSTATION_CREATED, {"usd_per_cpu_hour": True}),
        (EventType.VIRTUAL_KEY_EXTRA_PURCHASED, {"count": "2"}),
        (EventType.VIRTUAL_KEY_EXTRA_PURCHASED, {"count": True}),
        (EventType.WORKSPACE_CREATED, {"billing_anchor_day": "15"}),
    ],
)
def test_lifecycle_numbers_are_json_numbers_only_too(etype: EventType, data: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="Input should be a valid"):
        EVENT_ADAPTER.validate_python(event(etype, **data))


def test_lifecycle_number_above_its_maximum_is_out_of_range() -> None:
    ev = event(EventType.VIRTUAL_KEY_EXTRA_PURCHASED, count=1_000_001) | {"tenant": TENANT}
    with pytest.raises(InvalidEvent) as exc:
        prepare_event(ev, TENANT, received_at=NOW, plane=None)
    assert (exc.value.code, exc.value.message) == (
        RejectCode.OUT_OF_RANGE,
        "data.count: must be <= 1e6 (the per-event maximum)",
    )
