"""``POST /api/v1/events`` in ``/openapi.json``: a valid OpenAPI document (checked with a standard
validator), whose request body types every usage event with the models' own JSON Schemas and
whose answers list every status and code, so a client can be generated from it (docs/sdk.md)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import jsonschema_rs
import pytest
from fastapi import FastAPI
from openapi_spec_validator import validate

from deploy.settings import IngestSettings
from ingest.http import build_ingest_router
from ingest.openapi import EVENT_CODES
from schemas.events import USAGE_TYPES


def _unused() -> Any:
    raise AssertionError("the OpenAPI document must not need Kafka or storage")


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    app = FastAPI(title="ingest")
    app.include_router(build_ingest_router(_unused, _unused, IngestSettings(), get_scopes=_unused))
    return app.openapi()


def test_the_document_is_valid_openapi(spec: dict[str, Any]) -> None:
    validate(spec)


def test_the_body_types_every_usage_event_and_refuses_the_rest(spec: dict[str, Any]) -> None:
    op = spec["paths"]["/api/v1/events"]["post"]
    content = op["requestBody"]["content"]
    assert set(content) == {
        "application/json",
        "application/cloudevents+json",
        "application/cloudevents-batch+json",
    }
    one = content["application/cloudevents+json"]["schema"]
    assert {s["properties"]["type"]["const"] for s in one["oneOf"]} == {str(t) for t in USAGE_TYPES}
    body = jsonschema_rs.validator_for(content["application/json"]["schema"])
    event = {
        "specversion": "1.0",
        "id": "e-1",
        "source": "render-farm",
        "type": "render.completed",
        "time": datetime.now(UTC).isoformat(),
        "data": {"workspace_id": "w-1", "render_id": "r-1", "output_duration_seconds": 93.5},
    }
    assert body.is_valid(event) and body.is_valid([event, {**event, "id": "e-2"}])
    assert not body.is_valid({**event, "data": {**event["data"], "output_duration_seconds": "12"}})
    assert not body.is_valid({**event, "type": "api_key.revoked", "data": {"key_id": "k"}})
    assert not body.is_valid([event] * 101)  # at most 100 per request
    assert not body.is_valid([])


def test_every_answer_is_described(spec: dict[str, Any]) -> None:
    responses = spec["paths"]["/api/v1/events"]["post"]["responses"]
    assert {"202", "400", "401", "413", "415", "422", "429", "503"} <= set(responses)
    result = responses["202"]["content"]["application/json"]["schema"]["properties"]["results"]["items"]
    assert result["properties"]["status"]["enum"] == ["accepted", "duplicate", "rejected"]
    assert set(result["properties"]["code"]["enum"]) == set(EVENT_CODES)
    assert "Retry-After" in responses["429"]["headers"] and "Retry-After" in responses["503"]["headers"]
