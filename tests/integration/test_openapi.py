"""``/openapi.json`` states what the documents state: paths, methods, parameters, auth schemes,
and the response fields with their JSON types (``integer`` where a document says integer).

Building the app touches no storage, so this needs no ClickHouse.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from deploy.settings import QuerySettings
from query_api.app import create_app


class _NoClient:
    def query(self, *_a: Any, **_k: Any) -> Any:
        raise AssertionError("the OpenAPI document must not need storage")


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    app = create_app(QuerySettings(), _NoClient())  # type: ignore[arg-type]
    with TestClient(app) as client:
        r = client.get("/openapi.json")
    assert r.status_code == 200
    body: dict[str, Any] = r.json()
    return body


def resolve(spec: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        node = spec["components"]["schemas"][name]
    return node


def types_of(spec: dict[str, Any], node: dict[str, Any]) -> set[str]:
    node = resolve(spec, node)
    if "anyOf" in node:
        return set().union(*(types_of(spec, n) for n in node["anyOf"]))
    t = node.get("type")
    return {t} if isinstance(t, str) else set(t or [])


def ok_schema(spec: dict[str, Any], path: str) -> dict[str, Any]:
    op = spec["paths"][path]["get"]
    return resolve(spec, op["responses"]["200"]["content"]["application/json"]["schema"])


def props(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, tuple[set[str], str | None]]:
    return {
        name: (types_of(spec, p), resolve(spec, p).get("format") or p.get("format"))
        for name, p in schema["properties"].items()
    }


def params(spec: dict[str, Any], path: str) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in spec["paths"][path]["get"].get("parameters", [])}


def schemes(spec: dict[str, Any], path: str) -> list[dict[str, Any]]:
    names = [name for req in spec["paths"][path]["get"]["security"] for name in req]
    return [spec["components"]["securitySchemes"][n] for n in names]


def test_000_workspace_stats(spec: dict[str, Any]) -> None:
    path = "/api/v1/workspaces/{id}/stats"
    envelope = ok_schema(spec, path)
    assert set(envelope["properties"]) == {"data"}
    stats = resolve(spec, envelope["properties"]["data"])
    integer = ({"integer"}, None)
    string = ({"string"}, None)
    assert props(spec, stats) == {
        "activeAgents": integer,
        "activeMembers": integer,
        "activeVks": integer,
        "baseVkLimit": integer,
        "currentPeriodLogCount": integer,
        "extraVkCount": integer,
        "logLimit": integer,
        "logsThisMonth": integer,
        "maxVks": integer,
        "overageCents": integer,
        "tier": string,
        "totalAgents": integer,
        "totalMembers": integer,
        "workspaceId": string,
    }
    assert params(spec, path)["id"]["in"] == "path"
    assert schemes(spec, path) == [
        {"type": "http", "scheme": "bearer", "description": schemes(spec, path)[0]["description"]}
    ]
    assert set(spec["paths"][path]["get"]["responses"]) >= {"200", "400", "401", "403", "404"}
    assert "422" not in spec["paths"][path]["get"]["responses"]


@pytest.mark.parametrize(
    ("path", "id_param"),
    [
        ("/v2/quota-usages/contracts/{CONTRACT_ID}", "CONTRACT_ID"),
        ("/v2/quota-usages/workspaces/{WORKSPACE_ID}", "WORKSPACE_ID"),
    ],
)
def test_001_quota_usages(spec: dict[str, Any], path: str, id_param: str) -> None:
    envelope = ok_schema(spec, path)
    assert set(envelope["properties"]) == {"data"}
    data = resolve(spec, envelope["properties"]["data"])
    assert props(spec, data) == {"memory": ({"integer"}, None), "cpu": ({"integer"}, None)}
    p = params(spec, path)
    assert p[id_param]["in"] == "path" and p[id_param]["required"] is True
    assert p["period"]["in"] == "query" and p["period"]["required"] is True
    assert [s["scheme"] for s in schemes(spec, path)] == ["basic"]


def test_002_workstation_usage(spec: dict[str, Any]) -> None:
    path = "/v1/workstations/{id}/usage"
    assert props(spec, ok_schema(spec, path)) == {
        "cpuHours": ({"number"}, None),
        "gpuHours": ({"integer"}, None),
        "memoryGBHours": ({"integer"}, None),
        "costUSD": ({"number"}, None),
        "lastUpdated": ({"string"}, "date-time"),
    }
    assert [s["scheme"] for s in schemes(spec, path)] == ["bearer"]
    assert set(spec["paths"][path]["get"]["responses"]) >= {"200", "400", "401", "404", "500"}


def test_003_workspace_usage(spec: dict[str, Any]) -> None:
    path = "/v1/workspace/usage"
    schema = ok_schema(spec, path)
    assert schema["title"] == "WorkspaceUsage"
    assert props(spec, schema) == {
        "period_start": ({"string"}, "date-time"),
        "period_end": ({"string"}, "date-time"),
        "render_minutes": ({"number"}, None),
        "task_count": ({"integer"}, None),
        "egress_bytes": ({"integer"}, None),
    }
    assert set(schema["required"]) == {
        "period_start",
        "period_end",
        "render_minutes",
        "task_count",
        "egress_bytes",
    }
    op = spec["paths"][path]["get"]
    assert op["operationId"] == "get_usage"
    assert op["security"] == [{"ApiKey": []}]
    assert spec["components"]["securitySchemes"]["ApiKey"]["type"] == "http"
    assert spec["components"]["securitySchemes"]["ApiKey"]["scheme"] == "bearer"
    error = resolve(spec, op["responses"]["401"]["content"]["application/json"]["schema"])
    assert set(error["properties"]) == {"error"}
    assert set(resolve(spec, error["properties"]["error"])["properties"]) == {"code", "message", "details"}


def test_004_row_usage(spec: dict[str, Any]) -> None:
    path = "/api/v1/usage/"
    page = ok_schema(spec, path)
    assert props(spec, page)["count"] == ({"integer"}, None)
    items = page["properties"]["items"]
    assert items["type"] == "array"
    assert props(spec, resolve(spec, items["items"])) == {
        "date": ({"string"}, "date"),
        "workspace_id": ({"string"}, None),
        "workspace_name": ({"string"}, None),
        "datastream_id": ({"string", "null"}, None),
        "unique_rows": ({"integer"}, None),
        "total_rows": ({"integer"}, None),
    }
    p = params(spec, path)
    assert set(p) == {
        "granularity",
        "date_from",
        "date_to",
        "workspace_id",
        "datastream_id",
        "page",
        "page_size",
    }
    assert set(resolve(spec, p["granularity"]["schema"])["enum"]) == {"daily", "monthly"}
    assert "array" in types_of(spec, p["workspace_id"]["schema"])
    assert "array" in types_of(spec, p["datastream_id"]["schema"])
    assert p["page"]["schema"]["default"] == 1 and p["page_size"]["schema"]["default"] == 50
    kinds = {(s["type"], s.get("scheme"), s.get("name")) for s in schemes(spec, path)}
    assert kinds == {("apiKey", None, "Authorization"), ("http", "bearer", None)}


def test_meter_query_documented(spec: dict[str, Any]) -> None:
    path = "/api/v1/meters/{slug}/query"
    schema = ok_schema(spec, path)
    assert set(schema["properties"]) == {"meter", "window", "from", "to", "data"}
    row = resolve(spec, schema["properties"]["data"]["items"])
    assert set(row["properties"]) == {"window_start", "window_end", "value", "group_by"}
    assert set(params(spec, path)) == {"slug", "from", "to", "window", "tz", "group_by", "filter_subject"}


def test_ingest_only_process_mounts_no_query_routes() -> None:
    app = create_app(QuerySettings(), _NoClient(), include_query=False)  # type: ignore[arg-type]
    with TestClient(app) as client:
        paths = client.get("/openapi.json").json().get("paths", {})
    assert not any(
        p.startswith(("/api/v1/workspaces", "/v2/", "/v1/", "/api/v1/usage", "/api/v1/meters")) for p in paths
    )
