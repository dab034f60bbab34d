"""The SQL path (aggregators/stage.py) against pydantic, the one definition of an event.

Contract: the SQL generated from the models may be *stricter* than pydantic, never more lenient,
and whatever it accepts it stores exactly as the pydantic path stores it; whatever it does not
accept goes back to pydantic (which decides and words the reject), so the reject codes are
pydantic's by construction. The generators below (valid and mutated events of every usage type,
written as raw JSON bytes so that ``1e400``, ``-0``, ``\\u0001`` escapes and duplicate keys reach
the engine as a producer could send them) feed the real engine (chdb); the properties:

- every staged event is either accepted by the SQL or handed back to pydantic (none lost);
- an event the SQL accepts, pydantic accepts, and the stored row is equal field by field;
- real traffic (ingest/synth.py) takes the SQL path, so the properties do not hold vacuously.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from aggregators.decode import MAX_EVENT_BYTES, RawRow, Reject, SourceMessage
from aggregators.decode import message_items as frame_items
from aggregators.direct import make_processor, pack
from aggregators.stage import CHECKS, Batch
from schemas.events import DATA_MODELS, EVENT_ADAPTER, USAGE_TYPES, Event, EventType
from schemas.validation import MAX_AGE, MAX_FUTURE, RejectCode, check_event_time
from schemas.wire import HEADER_BACKFILL

SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

USAGE = sorted(USAGE_TYPES)
LIFECYCLE = sorted(set(EventType) - USAGE_TYPES)
KNOWN_TYPES = {t.value for t in EventType}
KEY_TENANT = "t1"

# ---- writing JSON by hand -----------------------------------------------------------------------
# Objects are lists of (key, value) pairs so that keys can repeat and come in any order.


@dataclass(frozen=True)
class Raw:
    """JSON text written as is (``1e400``, ``-0``, ``"\\ud800"``...)."""

    text: str


@dataclass(frozen=True)
class Escaped:
    """A string written with every character as a ``\\uXXXX`` escape."""

    value: str


def _text(v: Any) -> Any:
    return v.value if isinstance(v, Escaped) else v


@dataclass
class Obj:
    pairs: list[tuple[str, Any]]

    def get(self, key: str) -> Any:
        return next((v for k, v in reversed(self.pairs) if k == key), None)

    def set(self, key: str, value: Any) -> None:
        for i, (k, _) in enumerate(self.pairs):
            if k == key:
                self.pairs[i] = (key, value)
                return
        self.pairs.append((key, value))

    def drop(self, key: str) -> None:
        self.pairs = [(k, v) for k, v in self.pairs if k != key]


def _escape_all(s: str) -> str:
    out = []
    for c in s:
        n = ord(c)
        if n > 0xFFFF:
            n -= 0x10000
            out.append(f"\\u{0xD800 + (n >> 10):04x}\\u{0xDC00 + (n & 0x3FF):04x}")
        else:
            out.append(f"\\u{n:04x}")
    return '"' + "".join(out) + '"'


def dumps(v: Any) -> str:
    if isinstance(v, Raw):
        return v.text
    if isinstance(v, Escaped):
        return _escape_all(v.value)
    if isinstance(v, Obj):
        return "{" + ",".join(f"{orjson.dumps(k).decode()}:{dumps(x)}" for k, x in v.pairs) + "}"
    if isinstance(v, dict):
        return dumps(Obj(list(v.items())))
    if isinstance(v, list):
        return "[" + ",".join(dumps(x) for x in v) + "]"
    if isinstance(v, bool) or v is None:
        return orjson.dumps(v).decode()
    if isinstance(v, int):
        return str(v)  # orjson refuses ints beyond 64 bits
    if isinstance(v, float):
        assert math.isfinite(v)
        return orjson.dumps(v).decode()
    assert isinstance(v, str)
    return orjson.dumps(v).decode()


# ---- values -------------------------------------------------------------------------------------

# Everything pydantic's Id pattern allows (no C0 controls), surrogates excluded: orjson cannot
# write them and they are not str in JSON; \x7f, U+2028, quotes, backslashes and astral ones stay.
SAFE_CHARS = st.characters(min_codepoint=0x20, exclude_categories=("Cs",))
CONTROL = ["\x00", "\x01", "\t", "\n", "\r", "\x1f"]


def _schema(model: type[Any], name: str) -> tuple[dict[str, Any], bool]:
    """(JSON schema of the field's non-null form, whether null is allowed)."""
    prop = model.model_json_schema()["properties"][name]
    if "anyOf" in prop:
        (inner,) = [s for s in prop["anyOf"] if s.get("type") != "null"]
        return inner, True
    return prop, False


def valid_str(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    lo, hi = schema.get("minLength", 0), schema.get("maxLength", 300)
    plain = st.one_of(
        st.text(SAFE_CHARS, min_size=max(lo, 1), max_size=min(hi, 10)),
        st.sampled_from(["w1", "step-1", "a/b", "é", "\U0001f600", "x\x7f", "q\u2028", 'q"\\']),
        st.builds(lambda c, n: c * n, SAFE_CHARS, st.sampled_from(sorted({max(lo, 1), hi}))),
    )
    return st.one_of(plain, plain.map(Escaped)).filter(
        lambda s: lo <= len(s.value if isinstance(s, Escaped) else s) <= hi
    )


def bad_str(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    hi = schema.get("maxLength", 300)
    lengths = st.sampled_from(
        ["", "x" * (hi + 1), "\U0001f600" * (hi + 1), "x" * hi, "x" * (hi - 1) + "\U0001f600"]
    )
    return st.one_of(
        lengths,
        lengths,
        st.builds(
            lambda c, pos: ["ab" + c, c + "ab", "a" + c + "b", c][pos],
            st.sampled_from(CONTROL),
            st.integers(0, 3),
        ),
        valid_str(schema).map(lambda v: Escaped(_text(v) + "\n") if isinstance(v, Escaped) else v + "\n"),
        st.sampled_from(
            [
                Raw(r'"ab\n"'),
                Raw(r'"\u0001"'),
                Raw(r'"a\u001fb"'),
                Raw(r'"ab\u000a"'),
                Raw(r'"\ud800"'),
                Raw(r'"a\udc00"'),
                Raw(r'"\ud83d\ude00"'),
                Raw(r'"\u0061"'),
                Raw(r'"a\/b"'),
                Escaped("ab\n"),
            ]
        ),
        st.sampled_from([5, 1.5, True, None, [], ["x"], {"a": 1}, {}]),
    )


NUMBER_TOKENS = [
    "0",
    "-0",
    "-0.0",
    "0e0",
    "0.0",
    "1E2",
    "1.0e+2",
    "5e-324",
    "1e-400",
    "-1e-400",
    "1e308",
    "1.7976931348623157e308",
    "1.7976931348623158e308",
    "1.7976931348623159e308",
    "1e400",
    "-1e400",
    "12.34567890123456789",
    "100000000000000000000000",
    str(2**53),
    str(2**53 + 1),
    str(2**63),
    str(2**64),
    str(10**400),
    "-1",
    "-0.5",
    "0.5",
    "99",
    "100",
    "200.0",
    "599",
    "600",
]


def valid_number(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    if schema["type"] == "integer":
        lo, hi = schema.get("minimum", -(2**63)), schema.get("maximum", 2**63)
        return st.one_of(st.integers(lo, hi), st.sampled_from([lo, hi]))
    lo, hi = schema["minimum"], schema["maximum"]  # every number has a maximum per event
    return st.one_of(
        st.floats(min_value=lo, max_value=hi, allow_nan=False, allow_infinity=False),
        st.integers(lo, hi),
        st.sampled_from([0.0, 1.5, 5e-324, hi, float(hi), math.nextafter(float(hi), 0)]),
    )


# Numbers a producer could send near a field's bound, and far beyond it: just below, at and just
# above it (as integers, floats, the next float either side, tokens spelling it another way or
# rounding onto it), the overflow of the issue (1e29 and more), strings and booleans.
HUGE = [9e28, 1e29, 1.7e29, 1e30, 2**127, 10**29, 1e308]
HUGE_TOKENS = ["1e29", "1E+29", "100000000000000000000000000000", "170141183460469231731687303715884105727"]


def near_bound(b: float) -> list[Any]:
    f = float(b)
    return [
        b - 1,
        b,
        b + 1,
        b - 0.5,
        b + 0.5,
        f,
        -b,
        math.nextafter(f, -math.inf),
        math.nextafter(f, math.inf),
        b * 10,
        Raw(str(b)),
        Raw(f"{b}.0"),
        Raw(f"{b}.000001"),  # a token above the bound that rounds onto it (1e12 + 1e-6)
        Raw(f"{b}.001"),
        Raw(f"{f:e}"),
        Raw(f"{f:E}".replace("E+", "E")),
        str(b),
        f"{f:e}",
        Escaped(str(b)),
    ]


def bad_number(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    lo, hi = schema.get("minimum"), schema.get("maximum")
    return st.one_of(
        st.sampled_from(NUMBER_TOKENS).map(Raw),
        st.sampled_from([t for t in (lo, hi) if t is not None]).flatmap(
            lambda b: st.sampled_from(near_bound(b))
        ),
        st.sampled_from([*HUGE, *map(Raw, HUGE_TOKENS), "12", "1e29", True, False, Raw("true"), 12.0]),
        st.floats(allow_nan=False, allow_infinity=False),
        st.floats(max_value=-0.0, allow_nan=False, allow_infinity=False),
        st.integers(),
        st.sampled_from(["1.5", "5", "abc", "", True, False, None, [], [1], {"a": 1}, 5.0, 5.5]),
    )


def valid_value(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    t = schema["type"]
    if t == "string":
        return valid_str(schema)
    if t in ("number", "integer"):
        return valid_number(schema)
    assert t == "array", schema
    return st.lists(valid_str(schema["items"]), max_size=5)


def bad_value(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    t = schema["type"]
    if t == "string":
        return bad_str(schema)
    if t in ("number", "integer"):
        return bad_number(schema)
    assert t == "array", schema
    return st.one_of(
        st.lists(st.one_of(valid_str(schema["items"]), bad_str(schema["items"])), min_size=1, max_size=3),
        st.builds(lambda n: ["k"] * n, st.sampled_from([2000, 2001])),
        st.sampled_from([None, "k", {"k": 1}, [1], [None]]),
    )


def value(schema: dict[str, Any], nullable: bool, bad: bool) -> st.SearchStrategy[Any]:
    # built once per schema: building strategies on every draw makes generation 10x slower
    return _value(json.dumps(schema, sort_keys=True), nullable, bad)


@functools.cache
def _value(schema_json: str, nullable: bool, bad: bool) -> st.SearchStrategy[Any]:
    schema = json.loads(schema_json)
    strat = bad_value(schema) if bad else valid_value(schema)
    return st.one_of(strat, st.none()) if nullable and not bad else strat


# ---- times --------------------------------------------------------------------------------------

ODD_TIMES = [
    "2026-02-30T00:00:00Z",
    "2026-11-22T23:59:60Z",
    "2026-11-22T24:00:00Z",
    "0000-01-01T00:00:00Z",
    "9999-12-31T23:59:59.9999999Z",
    "2026-11-22T10:00Z",
    "2026-11-22",
    "2026-11-22T10:00:00+24:00",
    "2026-11-22T10:00:00.Z",
    "2026-11-22T10:00:00,5Z",
    "2026-11-22T10:00:00Z ",
    " 2026-11-22T10:00:00Z",
    "+2026-11-22T10:00:00Z",
    "2026-11-22T10:00:00+01",
    "20261122T100000Z",
    "now",
    "",
]


_KINDS = st.sampled_from(["text"] * 12 + ["escaped", "unix_int", "unix_float", "odd"])
_ODD = st.sampled_from(ODD_TIMES)
_ZONES = st.sampled_from(
    ["Z", "Z", "z", "+00:00", "-00:00", "offset", "offset", "offset", "offset_nocolon", "naive"]
)
_OFFSETS = st.integers(-(24 * 60 - 1), 24 * 60 - 1)
_SEPS = st.sampled_from(["T", "T", "t", " "])
_DIGITS = st.sampled_from([0, 3, 6, 6, 7, 9])
_EXTRA_DIGITS = {n: st.text("0123456789", min_size=n, max_size=n) for n in (1, 3)}
_INSTANTS = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)


_CANONICAL_ZONES = st.sampled_from(["Z", "+00:00", "offset"])
_CANONICAL_DIGITS = st.sampled_from([0, 3, 6])


def draw_time(draw: st.DrawFn, instant: datetime | None, canonical: bool = False) -> Any:
    """A JSON value for ``time``: mostly RFC 3339 text of ``instant`` in many spellings;
    ``canonical``: only as producers usually write it (what the fast paths are built for)."""
    # (Strategies are module constants throughout: building them on every draw makes data
    # generation several times slower.)
    if instant is None:
        instant = draw(_INSTANTS)
    kind = "text" if canonical else draw(_KINDS)
    if kind == "unix_int":
        return int(instant.timestamp())
    if kind == "unix_float":
        return instant.timestamp()
    if kind == "odd":
        return draw(_ODD)
    zone = draw(_CANONICAL_ZONES if canonical else _ZONES)
    minutes = draw(_OFFSETS) if zone.startswith("offset") else 0
    local = instant.astimezone(timezone(timedelta(minutes=minutes)))
    sign, m = ("-" if minutes < 0 else "+"), abs(minutes)
    suffix = {
        "offset": f"{sign}{m // 60:02d}:{m % 60:02d}",
        "offset_nocolon": f"{sign}{m // 60:02d}{m % 60:02d}",
        "naive": "",
    }.get(zone, zone)
    sep = "T" if canonical else draw(_SEPS)
    digits = draw(_CANONICAL_DIGITS if canonical else _DIGITS)
    frac = f"{local.microsecond:06d}"
    if digits > 6:  # digits finer than pydantic's microseconds (it truncates them)
        frac += draw(_EXTRA_DIGITS[digits - 6])
    frac = "." + frac[:digits] if digits else ""
    text = f"{local:%Y-%m-%d}{sep}{local:%H:%M:%S}{frac}{suffix}"
    return Escaped(text) if kind == "escaped" else text


ANY_TIME = st.composite(lambda draw: draw_time(draw, None))()

# ---- events -------------------------------------------------------------------------------------


def _data_fields(etype: EventType) -> list[tuple[str, dict[str, Any], bool, bool]]:
    model = DATA_MODELS[etype]
    required = set(model.model_json_schema().get("required", []))
    out = []
    for name in model.model_fields:
        schema, nullable = _schema(model, name)
        out.append((name, schema, nullable, name in required))
    return out


FIELDS = {t: _data_fields(t) for t in USAGE}
FIELD_PICK = {t: st.sampled_from(f) for t, f in FIELDS.items()}
ID_SCHEMA, _ = _schema(Event, "id")
SOURCE_SCHEMA, _ = _schema(Event, "source")
VALID_ID = value(ID_SCHEMA, False, False)
BAD_ID = value(ID_SCHEMA, False, True)
VALID_SOURCE = value(SOURCE_SCHEMA, False, False)
BAD_SOURCE = value(SOURCE_SCHEMA, False, True)
BOOL = st.booleans()
_ROWS_TOTAL = st.one_of(st.integers(0, 6), st.integers(5, 2**53))
_SUBJECT_MODE = st.sampled_from(["absent", "same", "same", "null"])
_TENANT_MODE = st.sampled_from(["absent", "key", "key", "null"])


def draw_data(draw: st.DrawFn, etype: EventType) -> Obj:
    data = Obj([])
    for name, schema, nullable, required in FIELDS[etype]:
        if required or draw(BOOL):
            data.set(name, draw(value(schema, nullable, bad=False)))
    if etype is EventType.DATASTREAM_ROWS and draw(BOOL):
        # about the model's own rule (distinct row_keys <= total_rows): either side of it
        data.set("total_rows", draw(_ROWS_TOTAL))
    return data


def draw_envelope(
    draw: st.DrawFn, etype: EventType, data: Obj, instant: datetime | None, canonical_time: bool
) -> Obj:
    env = Obj(
        [
            ("specversion", "1.0"),
            ("id", draw(VALID_ID)),
            ("source", draw(VALID_SOURCE)),
            ("type", etype.value),
            ("time", draw_time(draw, instant, canonical_time)),
            ("data", data),
        ]
    )
    subject = data.get(DATA_MODELS[etype].SUBJECT_FIELD)
    match draw(_SUBJECT_MODE):
        case "same":
            env.set("subject", subject)
        case "null":
            env.set("subject", None)
    match draw(_TENANT_MODE):
        case "key":
            env.set("tenant", KEY_TENANT)
        case "null":
            env.set("tenant", None)
    if draw(BOOL):
        env.set("datacontenttype", "application/json")
    return env


Mutation = Callable[[st.DrawFn, EventType, Obj, Obj], None]


def data_bad_field(draw: st.DrawFn, etype: EventType, env: Obj, data: Obj) -> None:
    name, schema, nullable, _ = draw(FIELD_PICK[etype])
    data.set(name, draw(value(schema, nullable, bad=True)))


NUMERIC_PICK = {
    t: st.sampled_from(nums)
    for t in USAGE
    if (nums := [f for f in FIELDS[t] if f[1]["type"] in ("number", "integer")])
}


@functools.cache
def _around_bounds(schema_json: str) -> st.SearchStrategy[Any]:
    schema = json.loads(schema_json)
    bounds = [b for b in (schema.get("minimum"), schema.get("maximum")) if b is not None]
    return st.sampled_from([x for b in bounds for x in near_bound(b)] + HUGE + [*map(Raw, HUGE_TOKENS)])


def data_number_near_bound(draw: st.DrawFn, etype: EventType, env: Obj, data: Obj) -> None:
    """A number field just below, at or above its bound, or far beyond (1e29)."""
    if etype not in NUMERIC_PICK:
        return data_bad_field(draw, etype, env, data)
    name, schema, _, _ = draw(NUMERIC_PICK[etype])
    data.set(name, draw(_around_bounds(json.dumps(schema, sort_keys=True))))
    return None


def data_missing(draw: st.DrawFn, etype: EventType, env: Obj, data: Obj) -> None:
    data.drop(draw(FIELD_PICK[etype])[0])


_EXTRA_KEYS = st.sampled_from(["extra", "Step_id", "", "subject"])
_EXTRA_VALUES = st.sampled_from([1, "x", None])


def data_extra(draw: st.DrawFn, etype: EventType, env: Obj, data: Obj) -> None:
    data.set(draw(_EXTRA_KEYS), draw(_EXTRA_VALUES))


def data_duplicate(draw: st.DrawFn, etype: EventType, env: Obj, data: Obj) -> None:
    name, schema, nullable, _ = draw(FIELD_PICK[etype])
    dup = draw(value(schema, nullable, bad=draw(BOOL)))
    data.pairs.insert(draw(st.integers(0, len(data.pairs))), (name, dup))


_NOT_OBJECT = st.sampled_from([None, [], "x", 1, "list"])


def data_not_object(draw: st.DrawFn, etype: EventType, env: Obj, data: Obj) -> None:
    v = draw(_NOT_OBJECT)
    env.set("data", [data] if v == "list" else v)


_OTHER_SUBJECT = st.one_of(VALID_ID, BAD_ID)
_SUBJECT_SPELLING = st.sampled_from(["escaped", "newline", "space"])


def subject_other(draw: st.DrawFn, etype: EventType, env: Obj, data: Obj) -> None:
    other = draw(_OTHER_SUBJECT)
    if other == data.get(DATA_MODELS[etype].SUBJECT_FIELD):
        other = _text(other) + "x"
    env.set("subject", other)


def subject_spelling(draw: st.DrawFn, etype: EventType, env: Obj, data: Obj) -> None:
    subject = _text(data.get(DATA_MODELS[etype].SUBJECT_FIELD))
    if isinstance(subject, str):
        how = draw(_SUBJECT_SPELLING)
        env.set(
            "subject", {"escaped": Escaped(subject), "newline": subject + "\n", "space": subject + " "}[how]
        )


_OTHER_TENANT = st.one_of(st.sampled_from(["t2", "T1", "t1\n", 1]), BAD_ID)


def tenant(draw: st.DrawFn, etype: EventType, env: Obj, data: Obj) -> None:
    env.set("tenant", draw(_OTHER_TENANT))


_ENV_STR = st.sampled_from(["id", "source", "datacontenttype"])


def envelope_bad_field(draw: st.DrawFn, etype: EventType, env: Obj, data: Obj) -> None:
    name = draw(_ENV_STR)
    env.set(name, draw(BAD_SOURCE if name == "source" else BAD_ID))


_SPECVERSIONS = st.sampled_from(["1", "1.0 ", "0.3", 1.0, Raw("1.0"), None, Escaped("1.0")])


def specversion(draw: st.DrawFn, etype: EventType, env: Obj, data: Obj) -> None:
    env.set("specversion", draw(_SPECVERSIONS))


_TYPES = st.one_of(
    st.sampled_from(["foo.bar", "", "CI.STEP.CPU", 5, None, Escaped("ci.step.cpu"), [], {}, ["ci.step.cpu"]]),
    st.sampled_from([t.value for t in USAGE + LIFECYCLE]),
)


def unknown_type(draw: st.DrawFn, etype: EventType, env: Obj, data: Obj) -> None:
    env.set("type", draw(_TYPES))


_BAD_TIMES = st.one_of(_ODD, st.sampled_from([None, 0, -1.5, "list", "dict"]))


def bad_time(draw: st.DrawFn, etype: EventType, env: Obj, data: Obj) -> None:
    t = draw(_BAD_TIMES)
    env.set("time", {"list": [], "dict": {}}.get(t, t) if isinstance(t, str) else t)


_REQUIRED_ENV = st.sampled_from(["specversion", "id", "source", "type", "time", "data"])


def envelope_missing(draw: st.DrawFn, etype: EventType, env: Obj, data: Obj) -> None:
    env.drop(draw(_REQUIRED_ENV))


_ENV_EXTRA = st.sampled_from(["extra", "Tenant", "dataschema", "data_base64"])


def envelope_extra(draw: st.DrawFn, etype: EventType, env: Obj, data: Obj) -> None:
    env.set(draw(_ENV_EXTRA), "x")


_DUP_KEYS = st.sampled_from(["id", "type", "tenant", "subject", "time", "specversion"])
_DUP_VALUES = st.one_of(VALID_ID, st.sampled_from([t.value for t in USAGE]), ANY_TIME, st.none())


def envelope_duplicate(draw: st.DrawFn, etype: EventType, env: Obj, data: Obj) -> None:
    name = draw(_DUP_KEYS)
    env.pairs.insert(draw(st.integers(0, len(env.pairs))), (name, draw(_DUP_VALUES)))


MUTATIONS = st.sampled_from(
    [
        *[data_bad_field] * 8,
        *[data_number_near_bound] * 4,
        data_missing,
        data_extra,
        data_duplicate,
        data_not_object,
        subject_other,
        subject_spelling,
        tenant,
        envelope_bad_field,
        specversion,
        unknown_type,
        bad_time,
        envelope_missing,
        envelope_extra,
        envelope_duplicate,
    ]
)
_SHUFFLE = st.integers(0, 4)


def draw_event(
    draw: st.DrawFn,
    instant: datetime | None,
    mutate: st.SearchStrategy[int],
    types: st.SearchStrategy[EventType],
    canonical_time: bool = False,
) -> bytes:
    """One event as JSON bytes: valid, or with a few mutations."""
    etype = draw(types)
    data = draw_data(draw, etype)
    env = draw_envelope(draw, etype, data, instant, canonical_time)
    for _ in range(draw(mutate)):
        draw(MUTATIONS)(draw, etype, env, data)
    if draw(_SHUFFLE) == 0:
        env.pairs = draw(st.permutations(env.pairs))
        data.pairs = draw(st.permutations(data.pairs))
    return dumps(env).encode()


ALL_USAGE = st.sampled_from(USAGE)


ONE_MUTATION = st.sampled_from([0, 1, 1, 1, 1, 2])
_NONE = st.just(0)


def event_json(
    mutate: st.SearchStrategy[int] = ONE_MUTATION,
    types: st.SearchStrategy[EventType] = ALL_USAGE,
    canonical_time: bool = False,
) -> st.SearchStrategy[bytes]:
    return st.composite(lambda draw: draw_event(draw, None, mutate, types, canonical_time))()


# ---- the pydantic reference ---------------------------------------------------------------------


def pydantic_event(item: bytes) -> Event:
    """What pydantic makes of one event; raises if it rejects it."""
    return EVENT_ADAPTER.validate_python(orjson.loads(item))


def normalized(ev: Event) -> tuple[Any, ...]:
    """type, id, source, tenant, subject, time (an aware datetime: == compares instants), data."""
    return (ev.type, ev.id, ev.source, ev.tenant, ev.subject, ev.time, msgspec.json.encode(ev.data))


def _accepted_by_pydantic(item: bytes) -> Event:
    try:
        return pydantic_event(item)
    except (orjson.JSONDecodeError, ValidationError) as exc:
        raise AssertionError(f"the SQL path accepted what pydantic rejects: {item!r}\n{exc}") from exc


def pydantic_code(exc: ValidationError) -> str:
    """``value_out_of_range`` when every fault is a number above its field's maximum (pydantic's
    error for ``le``), else ``invalid_event``."""
    above = all(e["type"] == "less_than_equal" for e in exc.errors())
    return RejectCode.OUT_OF_RANGE if above else RejectCode.INVALID_EVENT


def reference_decode(msg: SourceMessage, items: list[bytes]) -> tuple[list[RawRow], list[tuple[int, str]]]:
    """decode_message's decisions, by pydantic alone (``items``: the message's events)."""
    # Framing, not validation (msgspec's grammar, as in decode.py): a JSON array of events, or
    # one bare event; anything else is one reject for the whole message.
    try:
        msgspec.json.decode(msg.value, type=list[msgspec.Raw])
    except msgspec.ValidationError:  # JSON, not an array: a bare event if it decodes
        try:
            msgspec.json.decode(msg.value)
        except msgspec.DecodeError:
            return [], [(-1, RejectCode.INVALID_JSON)]
    except msgspec.DecodeError:  # malformed
        return [], [(-1, RejectCode.INVALID_JSON)]
    key = msg.key.decode("utf-8", "replace") if msg.key else None
    received = datetime.fromtimestamp(msg.timestamp_ms / 1000, UTC)
    backfill = (HEADER_BACKFILL, b"1") in msg.headers
    rows, rejects = [], []
    for i, item in enumerate(items):
        assert len(item) <= MAX_EVENT_BYTES
        try:
            obj = orjson.loads(item)
        except orjson.JSONDecodeError:
            rejects.append((i, RejectCode.INVALID_JSON))
            continue
        try:
            ev = EVENT_ADAPTER.validate_python(obj)
        except ValidationError as exc:
            # only a string can name a type: anything else there is an invalid event
            unknown = (
                isinstance(obj, dict) and isinstance(obj.get("type"), str) and obj["type"] not in KNOWN_TYPES
            )
            rejects.append((i, RejectCode.UNKNOWN_TYPE if unknown else pydantic_code(exc)))
            continue
        if not (ev.tenant or key):
            rejects.append((i, RejectCode.MISSING_TENANT))
            continue
        if key is not None and ev.tenant is not None and ev.tenant != key:
            rejects.append((i, RejectCode.TENANT_MISMATCH))
            continue
        late = check_event_time(ev.time, received, backfill=backfill)
        if late is not None:
            rejects.append((i, late[0]))
            continue
        data = msgspec.json.encode(ev.data)
        assert ev.subject is not None
        tenant = ev.tenant or key or ""
        rows.append(
            RawRow(tenant, ev.id, ev.type, ev.source, ev.subject, ev.time, data, msg.partition, msg.offset)
        )
    return rows, rejects


# ---- properties ---------------------------------------------------------------------------------

_FEW_MUTATIONS = st.sampled_from([0, 0, 0, 1, 2])
_DELTAS = st.one_of(
    st.sampled_from([timedelta(0), MAX_FUTURE, -MAX_AGE, timedelta(days=-400), timedelta(days=400)]).flatmap(
        lambda d: st.sampled_from([d, d + timedelta(microseconds=1), d - timedelta(microseconds=1)])
    ),
    st.floats(-40 * 86400, 600).map(lambda s: timedelta(seconds=s)),
)


@st.composite
def message_items(draw: st.DrawFn) -> tuple[int, bytes | None, bool, list[bytes]]:
    now = datetime.now(UTC)
    received = now.replace(microsecond=now.microsecond // 1000 * 1000)  # Kafka timestamps are ms
    canonical = draw(BOOL)
    n = draw(st.integers(1, 6))
    items = [
        draw_event(draw, received + draw(_DELTAS), _FEW_MUTATIONS, ALL_USAGE, canonical) for _ in range(n)
    ]
    key = draw(st.sampled_from([KEY_TENANT.encode(), KEY_TENANT.encode(), None]))
    return int(received.timestamp() * 1000), key, draw(st.integers(0, 4)) == 0, items


def _stored(client: Any, table: str) -> dict[tuple[int, int], tuple[Any, ...]]:
    rows = client.query(
        f"SELECT msg, pos, tenant, event_id, type, source, subject, time, data, src_partition, src_offset FROM {table} WHERE ok"
    ).result_rows
    out = {}
    for m, p, tenant, eid, typ, source, subject, t, data, part, off in rows:
        t = t.replace(tzinfo=UTC) if t.tzinfo is None else t
        out[(int(m), int(p))] = (tenant, eid, typ, source, subject, t, data.encode(), int(part), int(off))
    return out


def _ms(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(microsecond=t.microsecond // 1000 * 1000)


@pytest.mark.clickhouse
@settings(
    SETTINGS,
    max_examples=15,
    suppress_health_check=[*SETTINGS.suppress_health_check, HealthCheck.function_scoped_fixture],
)
@given(cases=st.lists(message_items(), min_size=1, max_size=4))
def test_the_sql_path_is_never_more_lenient_than_pydantic(
    clickhouse: tuple[Any, str], cases: list[tuple[int, bytes | None, bool, list[bytes]]]
) -> None:
    _holds_to_pydantic(*clickhouse, cases)


# The usage types the SQL judges whose data has optional fields: events that are mostly valid
# (plain ids, a recent time), each optional field absent, null, set or bad, the fields now and
# then in another order or repeated; the rest of the property's generators are wide, so few of
# their events with an absent field are ones the SQL accepts.
OPTIONAL = [t for t in USAGE if any(not f[3] for f in FIELDS[t]) and t in CHECKS]
_PLAIN = st.text("abcxyz019-_.", min_size=1, max_size=6)
_PRESENCE = st.sampled_from(["absent", "absent", "null", "set", "set", "bad"])


@st.composite
def optional_fields_message(draw: st.DrawFn) -> tuple[int, bytes | None, bool, list[bytes]]:
    now = datetime.now(UTC)
    received = now.replace(microsecond=now.microsecond // 1000 * 1000)
    items = []
    for _ in range(draw(st.integers(1, 6))):
        etype = draw(st.sampled_from(OPTIONAL))
        data = Obj([])
        for name, schema, nullable, required in FIELDS[etype]:
            plain = _PLAIN if schema["type"] == "string" else value(schema, False, bad=False)
            match "set" if required else draw(_PRESENCE):
                case "set":
                    data.set(name, draw(plain))
                case "null":
                    data.set(name, None)
                case "bad":
                    data.set(name, draw(value(schema, nullable, bad=True)))
        if draw(_SHUFFLE) == 0:
            data.pairs = draw(st.permutations(data.pairs))
        if draw(_SHUFFLE) == 0:
            data_duplicate(draw, etype, Obj([]), data)
        instant = received - timedelta(seconds=draw(st.integers(0, 3600)))
        env = draw_envelope(draw, etype, data, instant, True)
        items.append(dumps(env).encode())
    return int(received.timestamp() * 1000), KEY_TENANT.encode(), False, items


@pytest.mark.clickhouse
@settings(
    SETTINGS,
    max_examples=10,
    suppress_health_check=[*SETTINGS.suppress_health_check, HealthCheck.function_scoped_fixture],
)
@given(cases=st.lists(optional_fields_message(), min_size=1, max_size=3))
def test_optional_fields_absent_null_or_set_hold_to_pydantic(
    clickhouse: tuple[Any, str], cases: list[tuple[int, bytes | None, bool, list[bytes]]]
) -> None:
    """The same property on the types with optional fields only, so that an absent field, a
    null one and other field orders are drawn often (the stored text compared byte for byte)."""
    _holds_to_pydantic(*clickhouse, cases)


def _holds_to_pydantic(
    client: Any, db: str, cases: list[tuple[int, bytes | None, bool, list[bytes]]]
) -> None:
    proc = _processor(client, db)
    msgs = [
        SourceMessage(
            3, 40 + i, ts, key, b"[" + b",".join(items) + b"]", [(HEADER_BACKFILL, b"1")] if bf else []
        )
        for i, (ts, key, bf, items) in enumerate(cases)
    ]
    note(repr(msgs))
    # staged as the processor stages them: a message whose framing is malformed (a lone
    # surrogate escape, say) is rejected whole before (decode.message_items), as the reference does
    staged = [i for i, m in enumerate(msgs) if not isinstance(frame_items(m), Reject)]
    refused = proc._stage(msgs, staged)
    counts = [len(c[3]) if i in staged and i not in refused else 0 for i, c in enumerate(cases)]
    flagged = proc.writer.judge(Batch.of(msgs, counts))
    stored = _stored(client, proc.writer.rows_table)
    # none lost: every staged event is accepted or handed back, never both
    assert set(stored).isdisjoint(flagged)
    assert sorted([*stored, *flagged]) == [
        (i, p) for i in staged if i not in refused for p in range(counts[i])
    ]
    for (mi, pos), got in stored.items():
        msg = msgs[mi]
        item = cases[mi][3][pos]
        # this very event's decision (events are decided one by one; a message may hold copies
        # of one id with other times or data)
        want_rows, _ = reference_decode(msg, [item])
        want = want_rows[0] if want_rows else None
        assert want is not None, f"the SQL accepted what the pydantic path rejects (tenant or time): {item!r}"
        expected = (
            want.tenant,
            want.event_id,
            want.type.value,
            want.source,
            want.subject,
            _ms(want.time),
            want.data,
            msg.partition,
            msg.offset,
        )
        assert got == expected, item
    event(
        f"{len(stored)} accepted by SQL, {len(flagged)} handed to pydantic, {len(refused)} messages refused by the engine"
    )


_PROCESSORS: dict[str, Any] = {}


def _processor(client: Any, db: str) -> Any:
    if db not in _PROCESSORS:
        _PROCESSORS.clear()
        _PROCESSORS[db] = make_processor(client, db)
    return _PROCESSORS[db]


@pytest.mark.clickhouse
def test_real_traffic_takes_the_sql_path(clickhouse: tuple[Any, str]) -> None:
    """Without this the property above could hold by the SQL accepting nothing: every synthetic
    event of a type the SQL covers is accepted by it, and counted."""
    import random

    from aggregators.stage import CHECKS
    from ingest.synth import World, usage_events

    client, db = clickhouse
    now = datetime.now(UTC)
    world = World.generate(3, 5, created_at=now - timedelta(days=3))
    events = []
    for e in usage_events(world, now - timedelta(hours=6), now - timedelta(minutes=1), random.Random(3)):
        events.append(e)
        if len(events) == 3000:
            break
    proc = make_processor(client, db)
    stats = proc.process(pack(events, 0, 0))
    assert stats.written == len(events) and stats.rejected == 0
    covered = {t.value for t in CHECKS}
    assert len(covered) >= 9
    flagged_types = {e["type"] for e in events if e["type"] not in covered}
    assert flagged_types <= {EventType.DATASTREAM_ROWS.value}
    assert proc.timings["fallback"] < proc.timings["parse_validate"]


_GW = '"workspace_id":"w1","virtual_key_id":"vk1","request_id":"q1"'
# gateway.request's data as a producer may write it: (text, whether the SQL takes it itself).
# The optional fields ``model`` and ``status_code`` (default None) present, present as null or
# absent in the model's order: the SQL accepts and stores pydantic's text (``null`` for an absent
# field). Other orders, copies, extra or bad fields: pydantic decides (it accepts some of them).
GATEWAY_DATA = [
    ("{" + _GW + ',"model":"gpt","status_code":200}', True),
    ("{" + _GW + ',"model":null,"status_code":null}', True),
    ("{" + _GW + ',"status_code":429}', True),
    ("{" + _GW + ',"model":"gpt"}', True),
    ("{" + _GW + "}", True),
    ("{" + _GW + ',"model":null}', True),
    ("{" + _GW + ',"status_code":null}', True),
    ("{" + _GW + ',"status_code":200,"model":"gpt"}', False),  # pydantic reorders it
    ('{"request_id":"q1","virtual_key_id":"vk1","workspace_id":"w1"}', False),
    ('{"workspace_id":"w1","virtual_key_id":"vk1"}', False),  # a required field absent
    ('{"workspace_id":"w1","virtual_key_id":"vk1","model":"gpt"}', False),
    ("{" + _GW + ',"model":"a","model":"b"}', False),
    ("{" + _GW + ',"extra":1}', False),
    ("{" + _GW + ',"model":""}', False),
    ("{" + _GW + ',"status_code":99}', False),
    ("{" + _GW + ',"status_code":200.0}', False),  # pydantic takes it as 200
    ("{" + _GW + ',"status_code":"200"}', False),
    ("{" + _GW + ',"model":"gpt",}', False),
    ("{" + _GW + ',"model":"gpt","status_code":200,"model":null}', False),
    ('{"workspace_id":"w1","model":null,"virtual_key_id":"vk1","request_id":"q1"}', False),
]


def _judge_each(
    client: Any, db: str, etype: EventType, cases: list[tuple[str, bool]]
) -> list[tuple[bytes, tuple[Any, ...] | None]]:
    """Each (data text, whether the SQL takes it itself) as one event of its own message:
    (event, what the SQL stored or None). Asserts the SQL's decision and that none is lost."""
    now = datetime.now(UTC)
    time = (now - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    items = [
        f'{{"specversion":"1.0","id":"e{i}","source":"s","type":"{etype.value}","time":"{time}","data":{d}}}'.encode()
        for i, (d, _) in enumerate(cases)
    ]
    ts = int(now.timestamp() * 1000)
    proc = _processor(client, db)
    # one message per event: a message the engine cannot read is left out whole
    msgs = [
        SourceMessage(3, 7 + i, ts, KEY_TENANT.encode(), b"[" + it + b"]", []) for i, it in enumerate(items)
    ]
    refused = proc._stage(msgs, list(range(len(msgs))))
    counts = [0 if i in refused else 1 for i in range(len(msgs))]
    flagged = set(proc.writer.judge(Batch.of(msgs, counts)))
    stored = _stored(client, proc.writer.rows_table)
    out = []
    for i, ((text, sql_takes), item) in enumerate(zip(cases, items, strict=True)):
        in_sql = (i, 0) in stored
        assert in_sql == sql_takes, (text, in_sql)
        assert in_sql or i in refused or (i, 0) in flagged, text  # none lost
        if in_sql:  # pydantic accepts it, and stores the very same text
            assert stored[(i, 0)][6] == msgspec.json.encode(_accepted_by_pydantic(item).data), text
        out.append((item, stored.get((i, 0))))
    return out


@pytest.mark.clickhouse
def test_absent_optional_fields_are_judged_in_sql(clickhouse: tuple[Any, str]) -> None:
    """An optional field left out (pydantic: its default, None) is accepted by the SQL and
    stored as pydantic stores it, byte for byte; the SQL is never more lenient than pydantic."""
    judged = _judge_each(*clickhouse, EventType.GATEWAY_REQUEST, GATEWAY_DATA)
    for _, row in judged:
        if row is not None:
            assert b'"model":' in row[6] and b'"status_code":' in row[6]  # written out, null if absent
            assert row[4] == "w1"  # the subject
    assert sum(row is not None for _, row in judged) == sum(t for _, t in GATEWAY_DATA) == 7


# A float's text is taken by the SQL when it is Python's repr (what pydantic stores): no trailing
# zero in the fraction but the one of ``.0``; pydantic takes the others too (and normalizes them).
FLOAT_TEXTS = [
    ("1.0", True),
    ("0.0", True),
    ("10.0", True),
    ("1.5", True),
    ("0.25", True),
    ("100.01", True),
    ("1.50", False),
    ("1.00", False),
    ("0.00", False),
    ("0.10", False),
    ("10.010", False),
    ("1", False),
    ("1.", False),
    ("01.5", False),
]


@pytest.mark.clickhouse
def test_float_texts_the_sql_takes_are_pythons_repr(clickhouse: tuple[Any, str]) -> None:
    cases = [(f'{{"workstation_id":"ws1","cpu_seconds":{f}}}', ok) for f, ok in FLOAT_TEXTS]
    judged = _judge_each(*clickhouse, EventType.WORKSTATION_CPU, cases)
    assert sum(row is not None for _, row in judged) == 6
