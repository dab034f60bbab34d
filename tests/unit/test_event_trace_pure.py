"""The event trace's pure parts and its OpenAPI description (issue 10)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient

from aggregators.rejections import dedupe_dead_letters
from query_api.event_trace import Tracer, contributions, windows
from query_api.routers.events import build_events_router, decode_cursor, encode_cursor
from schemas.meters import default_catalog
from schemas.wire import HEADER_DLQ_CODE, HEADER_DLQ_SOURCE


def test_windows_are_half_open_and_calendar_months() -> None:
    w = windows(datetime(2026, 2, 28, 23, 59, 59, 999000, tzinfo=UTC))
    assert w["15m"] == ["2026-02-28T23:45:00.000Z", "2026-03-01T00:00:00.000Z"]
    assert w["1d"] == ["2026-02-28T00:00:00.000Z", "2026-03-01T00:00:00.000Z"]
    assert w["1mo"] == ["2026-02-01T00:00:00.000Z", "2026-03-01T00:00:00.000Z"]


def test_contributions_per_meter() -> None:
    t = datetime(2026, 11, 29, 10, 7, tzinfo=UTC)
    got = contributions(
        default_catalog(), "workstation.memory", t, {"workstation_id": "ws", "memory_gb": 1.5}
    )
    by_meter = {c["meter"]: c for c in got}
    assert set(by_meter) >= {"workstation_memory_gb_max", "workstation_memory_gb_seconds"}
    assert by_meter["workstation_memory_gb_max"]["contribution"] == 1.5
    cpu = contributions(default_catalog(), "workstation.cpu", t, {"workstation_id": "ws", "cpu_seconds": 0.1})
    assert [(c["meter"], c["contribution"]) for c in cpu] == [("workstation_cpu_seconds", "0.1")]
    ai = contributions(default_catalog(), "ai.task.submitted", t, {"workspace_id": "w", "task_type": "x"})
    assert {c["meter"]: c["contribution"] for c in ai}["ai_tasks"] == 1


def test_cursor_round_trip() -> None:
    at, cur = decode_cursor(encode_cursor("2026-11-29T10:00:00.123Z", "aggregator//0/5/1"))
    assert at == datetime(2026, 11, 29, 10, 0, 0, 123000, tzinfo=UTC) and cur == "aggregator//0/5/1"


def test_dead_letter_consumer_keeps_each_source_once() -> None:
    def h(source: str) -> list[tuple[str, bytes]]:
        return [(HEADER_DLQ_CODE, b"x"), (HEADER_DLQ_SOURCE, source.encode())]

    assert dedupe_dead_letters([h("t/0/1/0"), h("t/0/1/1"), h("t/0/1/0"), [], []]) == [0, 1, 3, 4]


def test_openapi_describes_both_endpoints() -> None:
    app = FastAPI()
    tracer: Any = Tracer(None, "db", default_catalog())  # type: ignore[arg-type]
    app.include_router(build_events_router(tracer, lambda: None, lambda: None))  # type: ignore[arg-type,return-value]
    with TestClient(app) as client:
        spec = client.get("/openapi.json").json()
        assert client.get("/api/v1/events/x").status_code == 401  # no key: nothing read
    one = spec["paths"]["/api/v1/events/{event_id}"]["get"]
    assert {"200", "401", "503"} <= set(one["responses"])
    listing = spec["paths"]["/api/v1/events"]["get"]
    assert {p["name"] for p in listing["parameters"]} == {"status", "from", "to", "code", "limit", "cursor"}


def test_trace_requests_are_rate_limited_per_key() -> None:
    from query_api.credentials import Principal
    from query_api.ratelimit import RateLimiter
    from schemas.events import EntityKind

    class Keys:
        def lookup(self, raw: str, kind: EntityKind) -> Principal | None:
            return (
                Principal("t", kind, raw, "workspace", "w1", "", "", "active", None) if raw == "k" else None
            )

    app = FastAPI()
    tracer: Any = Tracer(None, "db", default_catalog())  # type: ignore[arg-type]
    app.include_router(build_events_router(tracer, Keys, lambda: None, RateLimiter(1, name="t")))  # type: ignore[arg-type,return-value]
    with TestClient(app) as client:
        auth = {"Authorization": "Bearer k"}
        assert client.get("/api/v1/events/x", headers=auth).status_code == 503  # admitted; no storage here
        limited = client.get("/api/v1/events/x", headers=auth)
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
        assert client.get("/api/v1/events/x", headers={"Authorization": "Bearer nope"}).status_code == 401
