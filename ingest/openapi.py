"""How ``POST /api/v1/events`` describes itself in ``/openapi.json``, for clients in any language.

The request body is one usage event or an array of them, each event typed by its ``type`` (the
JSON Schemas of ``schemas/jsonschema/``, built from the same models, inlined so that the document
stands alone); the 202 answer is the per-event result with every status and code; every other
answer has the endpoint's error shape (docs/api.md, "Ingest"). Pure: builds a dict.
"""

from __future__ import annotations

import copy
from typing import Any

from ingest.scope import OUT_OF_SCOPE
from schemas.events import USAGE_TYPES, EventType, event_json_schema
from schemas.validation import RejectCode

MEDIA_JSON = "application/json"
MEDIA_CLOUDEVENT = "application/cloudevents+json"
MEDIA_CLOUDEVENTS_BATCH = "application/cloudevents-batch+json"

#: Every per-event code of a ``rejected`` result (docs/api.md, "Ingest").
EVENT_CODES = [
    RejectCode.INVALID_EVENT,
    RejectCode.OUT_OF_RANGE,
    RejectCode.UNKNOWN_TYPE,
    RejectCode.FORBIDDEN_EVENT_TYPE,
    OUT_OF_SCOPE,
    RejectCode.TENANT_MISMATCH,
    RejectCode.TOO_OLD,
    RejectCode.IN_FUTURE,
    RejectCode.TOO_LARGE,
]

#: The other answers and their error codes.
ERROR_ANSWERS: dict[int, tuple[str, list[str]]] = {
    400: ("The body is not UTF-8 JSON", ["invalid_json", "invalid_encoding"]),
    401: ("Unknown or revoked API key", ["unauthorized"]),
    413: ("Too large a body, or too many events", ["payload_too_large", "too_many_events"]),
    415: ("Not an accepted media type or charset", ["unsupported_media_type", "unsupported_charset"]),
    422: ("Not an event or an array of events", ["invalid_body", "empty_batch"]),
    429: ("Rate limited: retry after Retry-After seconds", ["rate_limited"]),
    503: (
        "Kafka or the keys cannot be reached: retry after Retry-After seconds with the same ids",
        ["kafka_unavailable", "credentials_unavailable"],
    ),
}


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """``node`` with every ``#/$defs/X`` reference replaced by its definition (no recursion in
    the event models), so the schema means the same anywhere in the OpenAPI document."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return {**_inline(copy.deepcopy(defs[ref.removeprefix("#/$defs/")]), defs), **rest}
        return {k: _inline(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def usage_event_schema(event_type: EventType) -> dict[str, Any]:
    """The JSON Schema of one usage event type as it stands in the OpenAPI document."""
    schema = event_json_schema(event_type)
    defs = schema.pop("$defs", {})
    schema.pop("$schema", None)
    out: dict[str, Any] = _inline(schema, defs)
    return out


def ingest_openapi(max_events: int) -> dict[str, Any]:
    """``openapi_extra`` of the ingest operation: request body and every answer."""
    one = {
        "description": "One usage event (CloudEvents 1.0), typed by `type`",
        "oneOf": [usage_event_schema(t) for t in sorted(USAGE_TYPES)],
    }
    batch = {"type": "array", "items": one, "minItems": 1, "maxItems": max_events}
    result = {
        "type": "object",
        "required": ["index", "id", "status"],
        "properties": {
            "index": {"type": "integer", "description": "the event's position in the request"},
            "id": {"type": ["string", "null"], "description": "the event's id as sent"},
            "status": {
                "type": "string",
                "enum": ["accepted", "duplicate", "rejected"],
                "description": "accepted: in Kafka, it will be counted; duplicate: delivered "
                "before, not counted again; rejected: not sent (see code)",
            },
            "code": {"type": "string", "enum": EVENT_CODES, "description": "why it was rejected"},
            "message": {"type": "string", "description": "what is wrong, naming the field"},
        },
    }
    answer = {
        "type": "object",
        "required": ["results", "accepted", "duplicates", "rejected"],
        "properties": {
            "results": {"type": "array", "items": result},
            "accepted": {"type": "integer"},
            "duplicates": {"type": "integer"},
            "rejected": {"type": "integer"},
        },
    }
    responses: dict[str, Any] = {
        "202": {
            "description": "Every accepted event is in Kafka (acks=all) and will be counted; "
            "one result per event, by position",
            "content": {MEDIA_JSON: {"schema": answer}},
        }
    }
    for status, (description, codes) in ERROR_ANSWERS.items():
        error = {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {
                        "code": {"type": "string", "enum": codes},
                        "message": {"type": "string"},
                        "details": {"type": ["object", "null"]},
                    },
                }
            },
        }
        entry: dict[str, Any] = {"description": description, "content": {MEDIA_JSON: {"schema": error}}}
        if status in (429, 503):
            entry["headers"] = {
                "Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}
            }
        responses[str(status)] = entry
    return {
        "requestBody": {
            "required": True,
            "content": {
                MEDIA_JSON: {"schema": {"oneOf": [one, batch]}},
                MEDIA_CLOUDEVENT: {"schema": one},
                MEDIA_CLOUDEVENTS_BATCH: {"schema": batch},
            },
        },
        "responses": responses,
    }
