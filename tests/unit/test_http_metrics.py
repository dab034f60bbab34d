"""HTTP request metrics: counted by method, route template (never the raw path) and status; the
per-tenant freshness gauge the aggregator sets where it writes freshness (an idle tenant's is
forgotten); a revoked partition's lag series is dropped."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from aggregators import metrics
from aggregators.decode import SourceMessage
from aggregators.processor import _record_freshness
from query_api.http_metrics import UNMATCHED, HttpMetrics


def count(method: str, route: str, status: str) -> float:
    labels = {"method": method, "route": route, "status": status}
    return REGISTRY.get_sample_value("metering_http_requests_total", labels) or 0.0


def observed(method: str, route: str) -> float:
    labels = {"method": method, "route": route}
    return REGISTRY.get_sample_value("metering_http_request_duration_seconds_count", labels) or 0.0


def make_app() -> FastAPI:
    router = APIRouter()

    @router.get("/t/things/{thing_id}")
    async def thing(thing_id: str) -> dict[str, str]:
        if thing_id == "missing":
            raise HTTPException(404)
        return {"id": thing_id}

    @router.get("/t/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    app = FastAPI()
    app.add_middleware(HttpMetrics)
    app.include_router(router)
    return app


def test_requests_are_counted_by_route_template_and_status() -> None:
    template = "/t/things/{thing_id}"
    before = (count("GET", template, "200"), count("GET", template, "404"), observed("GET", template))
    unmatched, boom = count("GET", UNMATCHED, "404"), count("GET", "/t/boom", "500")
    other = count("OTHER", UNMATCHED, "404")
    with TestClient(make_app(), raise_server_exceptions=False) as client:
        assert client.get("/t/things/a").status_code == 200
        assert client.get("/t/things/b").status_code == 200
        assert client.get("/t/things/missing").status_code == 404
        assert client.get("/t/nowhere/at/all").status_code == 404
        assert client.get("/t/boom").status_code == 500
        client.request("BREW", "/t/nowhere")
    assert count("GET", template, "200") == before[0] + 2  # ids never become label values
    assert count("GET", template, "404") == before[1] + 1
    assert observed("GET", template) == before[2] + 3
    assert count("GET", UNMATCHED, "404") == unmatched + 1
    assert count("GET", "/t/boom", "500") == boom + 1  # an exception escaping the handler
    assert count("OTHER", UNMATCHED, "404") == other + 1  # invented methods: one label value
    assert (
        REGISTRY.get_sample_value(
            "metering_http_requests_total", {"method": "GET", "route": "/t/things/a", "status": "200"}
        )
        is None
    )


def test_freshness_is_measured_from_the_oldest_accepted_event_per_tenant() -> None:
    def message(partition: int, offset: int, ts_ms: int) -> SourceMessage:
        return SourceMessage(partition=partition, offset=offset, timestamp_ms=ts_ms, key=None, value=b"")

    at = datetime(2026, 11, 29, tzinfo=UTC)
    refreshed = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)
    now_ms = int(refreshed.timestamp() * 1000)
    messages = [message(0, 1, now_ms - 7_000), message(0, 2, now_ms - 2_000), message(1, 5, now_ms - 500)]
    # what the batch wrote: (tenant, partition, last event time, min offset, max offset, rows)
    written = [("fresh-a", 0, at, 1, 2, 2), ("fresh-b", 1, at, 5, 5, 1)]
    _record_freshness(written, messages, refreshed)
    gauge = "metering_tenant_freshness_seconds"
    assert REGISTRY.get_sample_value(gauge, {"tenant": "fresh-a"}) == 7.0
    assert REGISTRY.get_sample_value(gauge, {"tenant": "fresh-b"}) == 0.5


def test_an_idle_tenants_freshness_is_forgotten_and_a_revoked_lanes_lag_dropped() -> None:
    gauge = "metering_tenant_freshness_seconds"
    metrics.record_tenant_freshness({"idle-t": 70.0, "busy-t": 1.0}, now=1_000.0)
    metrics.record_tenant_freshness({"busy-t": 2.0}, now=1_000.0 + metrics.FRESHNESS_FORGET_S / 2)
    assert REGISTRY.get_sample_value(gauge, {"tenant": "idle-t"}) == 70.0
    metrics.record_tenant_freshness({"busy-t": 3.0}, now=1_000.0 + metrics.FRESHNESS_FORGET_S + 1)
    assert REGISTRY.get_sample_value(gauge, {"tenant": "idle-t"}) is None  # its last value no longer stands
    assert REGISTRY.get_sample_value(gauge, {"tenant": "busy-t"}) == 3.0

    metrics.CONSUMER_LAG.labels("7").set(500)
    metrics.forget_lag([7, 8])  # 8 was never reported here
    assert REGISTRY.get_sample_value("metering_consumer_lag", {"partition": "7"}) is None
