"""A request's events prepared as ``prepare_event`` prepares each one, with fewer pydantic calls.

The HTTP ingest judges up to ``ingest_max_events_per_request`` events per request. Called per
event, ``prepare_event`` (metering_client/prepare.py) was about half of the ingest's CPU: per
event, ``Event`` validates ``data`` as a dict, its validator then validates it again with the
type's data model and dumps it, and the event is dumped once more. Here the request's usage
events are validated per type with one ``TypeAdapter(list[...])`` call over a model built from
``Event``'s own fields and configuration with ``data`` typed by that type's data model (so
validated once, inside pydantic-core), dumped with one call and encoded once: 10 -> 5-6 µs per
event on one core.

The decisions and the output are ``prepare_event``'s exactly, because whatever this path does not
take in one go is handed to ``prepare_event`` itself, alone: an event that is not a dict, names
another tenant or a lifecycle or unknown type, fails validation (found by the batch call's error,
then the rest validated again), falls outside the time window, or cannot be encoded. Those are
rare in normal traffic and cost what they cost before. tests/unit/test_ingest_prepare_batch.py
holds the two paths to the same results, event by event (fixed cases, the synthetic world's
usage of every type, and the aggregator's property-test events).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, create_model

from ingest.sdk import InvalidEvent, prepare_event
from schemas.events import DATA_MODELS, Event, EventType, Plane, plane_of
from schemas.validation import check_event_time


def _typed_event(event_type: EventType) -> TypeAdapter[list[Any]]:
    """``Event`` for one type, its ``data`` typed by the type's data model: the same fields,
    constraints and configuration, validated in one pass instead of ``Event``'s validation of
    ``data`` as a dict followed by the data model's, called from Python, and its dump.
    ``Event``'s rule for the subject is applied to the validated events (``prepare_events``,
    before the time window, in ``Event``'s order), not by a validator: a Python call per event
    from inside pydantic-core cost more than the rule."""
    fields: dict[str, Any] = {n: (f.annotation, f) for n, f in Event.model_fields.items()}
    fields["data"] = (DATA_MODELS[event_type], ...)
    model: type[BaseModel] = create_model(
        f"Typed{DATA_MODELS[event_type].__name__}Event",
        __config__=ConfigDict(**Event.model_config),
        **fields,
    )
    return TypeAdapter(list[model])


#: per usage type (the only ones a usage key may send; a lifecycle or unknown type goes alone)
_TYPED = {t.value: _typed_event(t) for t in EventType if plane_of(t) is Plane.USAGE}
#: per usage type, the data field that is the event's subject (``Event``'s rule)
_SUBJECT_FIELD = {t: DATA_MODELS[EventType(t)].SUBJECT_FIELD for t in _TYPED}
_USAGE_TYPES = frozenset(_TYPED)

Prepared = dict[str, Any] | InvalidEvent


def prepare_events(items: Sequence[Any], tenant: str, *, received_at: datetime) -> list[Prepared]:
    """For each of ``items``, what ``prepare_event(item, tenant, received_at=received_at)``
    returns, or the ``InvalidEvent`` it raises (usage plane, no backfill: the ingest's call)."""
    out: list[Prepared | None] = [None] * len(items)  # None: not decided yet
    batch: list[int] = []  # positions of the events the batch call takes
    for i, item in enumerate(items):
        if (
            tenant
            and type(item) is dict
            and isinstance(item.get("type"), str)
            and item["type"] in _USAGE_TYPES
            and item.get("tenant", tenant) in (None, tenant)
        ):
            batch.append(i)
    by_type: dict[str, list[int]] = {}
    for i in batch:
        by_type.setdefault(items[i]["type"], []).append(i)
    for event_type, positions in by_type.items():
        adapter = _TYPED[event_type]
        models = _validate(adapter, items, positions, tenant)
        field = _SUBJECT_FIELD[event_type]
        for i, model in list(models.items()):
            # Event's rule, checked where its validator runs, before the time window: the
            # subject is the data's subject field (an Id: a string); an event that gives another
            # is left to prepare_event, whose error words it (also when its time is out of the
            # window: prepare_event reports the subject first)
            if model.subject is not None and model.subject != getattr(model.data, field):
                del models[i]
                continue
            window = check_event_time(model.time, received_at, False)
            if window is not None:  # prepare_event's own words for it
                out[i] = InvalidEvent(window[0], window[1], model.id)
                del models[i]
        if not models:
            continue
        dumped: list[dict[str, Any]] = adapter.dump_python(list(models.values()), mode="json")
        for event in dumped:
            # Event's dump leaves out None (exclude_none) but keeps the data's None values
            # (data is a dict there): the envelope's optional fields are the only ones to drop.
            if event["datacontenttype"] is None:
                del event["datacontenttype"]
            event["subject"] = event["data"][field]
        try:
            orjson.dumps(dumped)  # what cannot be encoded fails here (prepare_event checks each)
        except TypeError:  # orjson.JSONEncodeError is a TypeError
            continue  # left to prepare_event, event by event, below
        for i, event in zip(models, dumped, strict=True):
            out[i] = event
    results: list[Prepared] = []
    for item, done in zip(items, out, strict=True):
        if done is None:
            try:
                done = prepare_event(item, tenant, received_at=received_at)
            except InvalidEvent as exc:
                done = exc
        results.append(done)
    return results


def _validate(
    adapter: TypeAdapter[list[Any]], items: Sequence[Any], positions: list[int], tenant: str
) -> dict[int, Any]:
    """position -> the validated event, for those of ``positions`` pydantic accepts in a batch:
    one call, and after a failure one more without the events it named (then none: each is
    judged alone)."""
    for _attempt in range(2):
        if not positions:
            return {}
        try:
            models = adapter.validate_python([{**items[i], "tenant": tenant} for i in positions])
        except ValidationError as exc:
            failed = {err["loc"][0] for err in exc.errors(include_url=False) if err["loc"]}
            positions = [p for n, p in enumerate(positions) if n not in failed]
            continue
        return dict(zip(positions, models, strict=True))
    return {}
