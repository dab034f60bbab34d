"""The client SDK against the real pipeline in one process (HTTP ingest + faust aggregator on a
real broker, the real ClickHouse engine): events sent through ``MeteringClient`` are counted
exactly once — in the raw table, the period tables and the query API's answer — although requests
are answered 503 and 429 and connections drop, before the ingest and after it took the events
(the answer lost: the retry is a duplicate)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from aggregators.direct import make_processor
from deploy.runner import Part, build_http_app
from metering_client import Backoff, HttpTransport, MeteringClient
from tests.integration.helpers import running_faust, wait_until
from tests.integration.test_hardening_control_plane import (
    CHILD,
    TENANT,
    administrator_world,
    post,
    raw_ids,
    render,
    settings_for,
)

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.slow]

N = 250  # three requests: 100 + 100 + 50


class Faults(httpx.BaseTransport):
    """Between the client and the real ingest (a TestClient): each request takes the next
    action of ``script`` — ``503``/``429`` (answered here, nothing reaches the ingest), ``drop``
    (the connection fails before the request is sent), ``lost_answer`` (the ingest takes the
    events, then the connection drops) — and is forwarded when the script is spent."""

    def __init__(self, api: TestClient, script: list[str]) -> None:
        self.api = api
        self.script = script
        self.answers: list[dict[str, int]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        action = self.script.pop(0) if self.script else "ok"
        if action == "503":
            return httpx.Response(
                503,
                headers={"Retry-After": "0.2"},
                json={"error": {"code": "kafka_unavailable", "message": "injected", "details": {}}},
            )
        if action == "429":
            return httpx.Response(
                429,
                headers={"Retry-After": "0.3"},
                json={"error": {"code": "rate_limited", "message": "injected", "details": {}}},
            )
        if action == "drop":
            raise httpx.ConnectError("injected: connection refused", request=request)
        r = self.api.post(request.url.path, content=request.content, headers=dict(request.headers))
        if r.status_code == 202:
            body = r.json()
            self.answers.append({k: body[k] for k in ("accepted", "duplicates", "rejected")})
        if action == "lost_answer":
            raise httpx.ReadError("injected: connection reset after the request", request=request)
        return httpx.Response(r.status_code, headers=r.headers, content=r.content)


@pytest.fixture
def pipeline(kafka_bootstrap: str, topic: str, clickhouse: tuple[Any, str]) -> Iterator[tuple[Any, ...]]:
    client, db = clickhouse
    settings = settings_for(topic, db)
    app, closers = build_http_app(settings, client, kafka_bootstrap, {Part.INGEST, Part.QUERY})
    processor = make_processor(client, db)
    with TestClient(app) as api:
        yield settings, api, processor, client, db
    for closer in closers:
        closer.close()


def rendered_seconds(client: Any, db: str) -> Decimal:
    value = client.command(
        f"SELECT sum(value_sum) FROM {db}.usage_1d WHERE tenant = {{t:String}} "
        "AND meter = 'render_output_seconds' AND workspace_id = {w:String}",
        parameters={"t": TENANT, "w": CHILD},
    )
    return Decimal(str(value or 0))


def test_events_sent_through_the_client_are_counted_once_across_503_429_and_dropped_connections(
    kafka_bootstrap: str, topic: str, pipeline: tuple[Any, ...]
) -> None:
    settings, api, processor, client, db = pipeline
    now = datetime.now(UTC).replace(microsecond=0)
    world = administrator_world(kafka_bootstrap, topic, now - timedelta(hours=1))
    # attempts of request 1: 503, 429, dropped, taken but answer lost, then answered (duplicates);
    # request 2: answer lost once; request 3: 503 once
    faults = Faults(api, ["503", "429", "drop", "lost_answer", "ok", "lost_answer", "ok", "503"])
    ids = [f"sdk-{i}" for i in range(N)]

    def send() -> MeteringClient:
        http = httpx.Client(transport=faults, base_url="http://testserver")
        sdk = MeteringClient(
            transport=HttpTransport("http://testserver", world.child_key, http=http),
            source="render-farm",
            linger_s=5.0,
            backoff=Backoff(base_s=0.05, cap_s=0.2),
        )
        with sdk:
            for eid in ids:
                sdk.emit(render(eid, now))
        return sdk

    async def scenario() -> MeteringClient:
        async with running_faust(settings, kafka_bootstrap, processor):

            def ready() -> bool:
                r = post(api, world.child_key, render("warm-up", now))
                return r.status_code == 202 and r.json()["accepted"] + r.json()["duplicates"] == 1

            assert await asyncio.to_thread(wait_until, ready, 60.0)
            sdk = await asyncio.to_thread(send)  # raises DeliveryFailed if any event was not delivered
            want = set(ids) | {"warm-up"}
            assert await asyncio.to_thread(wait_until, lambda: want <= raw_ids(client, db), 60.0)
            expected = Decimal(60 * (N + 1))
            assert await asyncio.to_thread(wait_until, lambda: rendered_seconds(client, db) >= expected, 60.0)
            await asyncio.sleep(1.0)  # a double count would have arrived by now
            return sdk

    sdk = asyncio.run(scenario())
    m = sdk.metrics
    assert m.sent == N and m.rejected == {} and m.retried == 6 and m.requests == 9
    # the ingest took every event once; the retries after a lost answer were duplicates
    assert sum(a["accepted"] for a in faults.answers) == N
    assert sum(a["duplicates"] for a in faults.answers) == 100 + 100
    rows = client.query(
        f"SELECT count(), uniqExact(event_id) FROM {db}.events_raw WHERE tenant = {{t:String}} "
        "AND startsWith(event_id, 'sdk-')",
        parameters={"t": TENANT},
    ).result_rows
    assert rows == [(N, N)]
    assert rendered_seconds(client, db) == Decimal(60 * (N + 1))
    # and the query API counts them so (the meter query covers the key's tenant)
    r = api.get(
        "/api/v1/meters/render_output_seconds/query", headers={"Authorization": f"Bearer {world.child_key}"}
    )
    assert r.status_code == 200, r.text
    assert sum(Decimal(str(row["value"])) for row in r.json()["data"]) == Decimal(60 * (N + 1))
