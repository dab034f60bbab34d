"""An aggregator process on its own (``metering aggregator``) serves /healthz, /readyz and
/metrics, so Prometheus can scrape every replica (deploy/observability/prometheus/prometheus.yml);
it serves nothing else."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from deploy import runner
from deploy.runner import Part, _banner, build_http_app
from deploy.settings import RunSettings


class Engine:
    def command(self, sql: str) -> Any:
        return "26.9"


def test_an_aggregator_alone_serves_health_and_metrics_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "kafka_check", lambda config: lambda: (True, "1 broker(s)"))  # no broker here
    settings = RunSettings()
    app, closers = build_http_app(settings, Engine(), "127.0.0.1:1", {Part.AGGREGATOR})
    assert closers == []
    with TestClient(app) as client:
        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        assert "metering_consumer_lag" in metrics.text and "metering_flush_seconds" in metrics.text
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.post("/api/v1/events", json={}).status_code == 404  # no ingest here
        assert client.get("/v1/meters/query").status_code == 404  # no query API
    banner = _banner(settings, "127.0.0.1:9092", {Part.AGGREGATOR})
    assert f"http://{settings.http_host}:{settings.http_port}/metrics" in banner
