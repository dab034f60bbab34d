"""A fast decoder for usage events, generated from the pydantic models (which stay the one
definition of an event).

pydantic validates ~80k events/s on one core; the hot path needs several times that. Here each
usage ``data`` model is translated field by field into a ``msgspec.Struct`` with the same types
and constraints (lengths, patterns, bounds, no unknown fields, finite numbers). The contract:
the fast path may be *stricter* than pydantic, never more lenient. Whatever it does not accept
is handed to pydantic, which decides and words the error. Models with their own validators
(e.g. DatastreamRows' row-count rule) are re-checked by pydantic after a fast decode.
A property test (tests/unit/test_fastpath.py) holds the two paths to that contract.
"""

from __future__ import annotations

import functools
import operator
import sys
import types
import typing
from datetime import datetime
from functools import cache
from typing import Annotated, Any, Literal

import annotated_types as at
import msgspec

from schemas.events import DATA_MODELS, JSON_INTEGER, USAGE_TYPES, Data, EventType

_MAX_FLOAT = sys.float_info.max


def _pattern(pattern: str) -> str:
    # pydantic (Rust regex) reads a final `$` as the end of the text; Python's re, which msgspec
    # runs, also matches it before a trailing newline, so "id\n" passed here and failed there.
    # \Z is the end of the text in re.
    return pattern[:-1] + r"\Z" if pattern.endswith("$") and not pattern.endswith(r"\$") else pattern


def _meta(metadata: list[Any], base: Any, patterns: bool = True) -> msgspec.Meta | None:
    kw: dict[str, Any] = {}
    flat: list[Any] = []
    for m in metadata:  # Field(...) inside Annotated carries its constraints in .metadata
        flat.extend(m.metadata if type(m).__name__ == "FieldInfo" else [m])
    for m in flat:
        if isinstance(m, at.MinLen):
            kw["min_length"] = m.min_length
        elif isinstance(m, at.MaxLen):
            kw["max_length"] = m.max_length
        elif isinstance(m, at.Ge):
            kw["ge"] = m.ge
        elif isinstance(m, at.Le):
            kw["le"] = m.le
        elif isinstance(m, at.Gt):
            kw["gt"] = m.gt
        elif isinstance(m, at.Lt):
            kw["lt"] = m.lt
        elif getattr(m, "pattern", None) is not None:
            if patterns:
                kw["pattern"] = _pattern(m.pattern)
        elif hasattr(m, "allow_inf_nan"):
            pass  # handled below for every float
        elif m is JSON_INTEGER:
            # JSON numbers only: msgspec's int takes JSON integer tokens only (no strings, no
            # booleans, not even 12.0, which pydantic takes as 12: left to it, stricter here).
            pass
        # Strict (numbers only, no strings or booleans) is what msgspec's decoders always do.
        elif type(m).__name__ not in ("Strict",):
            raise TypeError(f"no msgspec equivalent for constraint {m!r}")
    if base is float:
        # JSON has no NaN; 1e400 decodes to inf: a bound rejects it, as pydantic does.
        kw.setdefault("le", _MAX_FLOAT)
        kw.setdefault("ge", -_MAX_FLOAT)
    return msgspec.Meta(**kw) if kw else None


def _translate(annotation: Any, metadata: list[Any], patterns: bool = True) -> Any:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        inner, *extra = typing.get_args(annotation)
        return _translate(inner, [*extra, *metadata], patterns)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported union {annotation!r}")
        return _translate(args[0], metadata, patterns) | None
    if origin is list:
        (item,) = typing.get_args(annotation)
        inner = _translate(item, [], patterns)
        meta = _meta(metadata, list, patterns)
        return Annotated[list[inner], meta] if meta else list[inner]  # type: ignore[valid-type]
    if origin is Literal:
        return annotation
    if annotation in (str, int, float, bool):
        meta = _meta(metadata, annotation, patterns)
        return Annotated[annotation, meta] if meta else annotation
    raise TypeError(f"unsupported annotation {annotation!r}")


@cache
def struct_for(model: type[Data], patterns: bool = True) -> type[msgspec.Struct]:
    """``patterns=False`` leaves out regular expressions; see ``decode_batch`` for when that is
    exactly as strict."""
    fields: list[Any] = []
    for name, info in model.model_fields.items():
        typ = _translate(info.annotation, list(info.metadata), patterns)
        fields.append((name, typ) if info.is_required() else (name, typ, info.default))
    # kw_only keeps the model's field order (it decides the JSON written to events_raw)
    # whatever the mix of required and optional fields.
    return msgspec.defstruct(
        f"Fast{model.__name__}{'' if patterns else 'NoPattern'}",
        fields,
        forbid_unknown_fields=True,
        frozen=True,
        kw_only=True,
    )


Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=_pattern(r"^[^\x00-\x1f]+$"))]


class Envelope(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    specversion: Literal["1.0"]
    id: Id
    source: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    type: str
    time: Annotated[datetime, msgspec.Meta(tz=True)]
    data: msgspec.Raw
    subject: Id | None = None
    tenant: Id | None = None
    datacontenttype: Literal["application/json"] | None = None


_ENVELOPE = msgspec.json.Decoder(Envelope)
_ITEMS = msgspec.json.Decoder(list[msgspec.Raw])
_DATA: dict[str, tuple[EventType, msgspec.json.Decoder[Any], type[Data], bool]] = {}
for _t in USAGE_TYPES:
    _model = DATA_MODELS[_t]
    _DATA[_t.value] = (
        _t,
        msgspec.json.Decoder(struct_for(_model)),
        _model,
        bool(_model.__pydantic_decorators__.model_validators),
    )


class Fast(typing.NamedTuple):
    envelope: Envelope
    type: EventType
    subject: str
    data: msgspec.Raw  # normalized JSON of the data object


_encode = msgspec.json.Encoder().encode
_DATETIME: msgspec.json.Decoder[datetime] = msgspec.json.Decoder(Annotated[datetime, msgspec.Meta(tz=True)])


class _RawTime(msgspec.Struct):
    time: msgspec.Raw


_RAW_TIME = msgspec.json.Decoder(_RawTime).decode


def _time(raw: msgspec.Raw) -> datetime | None:
    """The event time, or None: let pydantic decide. msgspec *rounds* digits beyond the
    microsecond where pydantic truncates them (…00.9999995Z: 10:00:01 here, 10:00:00.999999
    there), which moves events across the 5-minute and 35-day limits and period boundaries.
    Such times have 7+ digits, so 30+ bytes with the quotes (escapes only lengthen them); they
    and escaped times (escapes could spell digits) are left to pydantic. Unescaped, the
    fraction's "." of a time msgspec reads is at [20]: a quote and YYYY-MM-DDTHH:MM:SS."""
    if len(raw) >= 30:
        b = bytes(raw)
        if b"\\" in b or b[21:28].isdigit():
            return None
    try:
        return _DATETIME.decode(raw)
    except msgspec.DecodeError:
        return None


def split(value: bytes) -> list[msgspec.Raw] | None:
    """The items of a batch message, each still raw; None if the value is not a JSON array."""
    try:
        return _ITEMS.decode(value)
    except msgspec.DecodeError:  # also malformed JSON ("[1,"), not only a non-array: no crash
        return None


def decode_fast(item: bytes | msgspec.Raw) -> Fast | None:
    """A fully validated usage event, or None: let pydantic decide."""
    try:
        env = _ENVELOPE.decode(item)
        spec = _DATA.get(env.type)
        if spec is None or _time(_RAW_TIME(item).time) is None:  # see _time
            return None
        etype, decoder, model, needs_model_check = spec
        data = decoder.decode(env.data)
        if needs_model_check:
            model.model_validate(msgspec.structs.asdict(data))
        subject = getattr(data, model.SUBJECT_FIELD)
        if env.subject is not None and env.subject != subject:
            return None
        return Fast(env, etype, str(subject), msgspec.Raw(_encode(data)))
    except (msgspec.ValidationError, msgspec.DecodeError, ValueError):
        return None


# ---- whole messages ---------------------------------------------------------------------------
# One decode call per Kafka message: a list of a tagged union (tag = the event type) whose
# members carry their typed data. Any invalid event makes the whole call fail; the caller then
# falls back to event-by-event decoding, which isolates the bad one.


IdNoPattern = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


def _typed_envelope(
    etype: EventType, data_struct: type[msgspec.Struct], patterns: bool
) -> type[msgspec.Struct]:
    ident: Any = Id if patterns else IdNoPattern
    return msgspec.defstruct(
        f"Typed_{etype.name}{'' if patterns else '_NoPattern'}",
        [
            ("specversion", Literal["1.0"]),
            ("id", ident),
            ("source", Annotated[str, msgspec.Meta(min_length=1, max_length=256)]),
            ("time", msgspec.Raw),  # parsed by _time
            ("data", data_struct),
            ("subject", ident | None, None),
            ("tenant", ident | None, None),
            ("datacontenttype", Literal["application/json"] | None, None),
        ],
        tag_field="type",
        tag=etype.value,
        forbid_unknown_fields=True,
        frozen=True,
        kw_only=True,
    )


_TYPED: dict[type[msgspec.Struct], tuple[EventType, type[Data]]] = {}
_members: dict[bool, list[type[msgspec.Struct]]] = {True: [], False: []}
for _t in USAGE_TYPES:
    _model = DATA_MODELS[_t]
    if _model.__pydantic_decorators__.model_validators:
        continue  # these need pydantic's own checks: event-by-event path
    for _p in (True, False):
        _cls = _typed_envelope(_t, struct_for(_model, _p), _p)
        _TYPED[_cls] = (_t, _model)
        _members[_p].append(_cls)
_BATCH = {p: msgspec.json.Decoder(list[functools.reduce(operator.or_, m)]) for p, m in _members.items()}  # type: ignore[misc]


class Row(typing.NamedTuple):
    """A validated event as the raw table needs it."""

    type: EventType
    id: str
    source: str
    time: datetime
    tenant: str | None
    subject: str
    data: bytes  # normalized JSON of the data object


def decode_batch(value: bytes) -> list[Row] | None:
    """Every event of a message, validated, or None when any one of them needs a closer look."""
    # The only patterns are "no control characters". A raw control character is invalid JSON,
    # so a decoded string can hold one only through a backslash escape: without any backslash
    # in the message, the decoder without patterns is exactly as strict, and much faster
    # (msgspec runs patterns through Python's re).
    try:
        items = _BATCH[b"\\" in value].decode(value)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    out = []
    typed = _TYPED
    for ev in items:
        etype, model = typed[type(ev)]
        data = ev.data
        subject = str(getattr(data, model.SUBJECT_FIELD))
        claimed = ev.subject
        if claimed is not None and claimed != subject:
            return None
        time = _time(ev.time)
        if time is None:
            return None
        out.append(Row(etype, ev.id, ev.source, time, ev.tenant, subject, _encode(data)))
    return out
