"""``GET /api/v1/events/{id}`` and the rejections listing end to end (issue 10): the HTTP ingest
and the SDK on the real broker, the faust aggregator on the real engine, stopped and restarted.
The five statuses, another tenant's view, the listing's pages."""

from __future__ import annotations

import asyncio
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from aggregators.direct import make_processor
from deploy.settings import AggregatorSettings, IngestSettings
from ingest.http import EVENTS_PATH, ingest_router
from query_api.trace_models import RejectionsPage, TraceAnswer
from tests.integration.helpers import event, iso, produce_batches, running_faust, wait_until
from tests.integration.test_http_ingest import create_key

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

T0 = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=20)


def egress(eid: str, nbytes: int, tenant: str = "acme") -> dict[str, Any]:
    e = event(eid, "egress.download", {"workspace_id": "w1", "artifact_id": "a", "bytes": nbytes}, T0, tenant)
    return e


def _aggregator(topic: str) -> AggregatorSettings:
    return AggregatorSettings(
        topic_events=topic,
        topic_dead_letter=f"{topic}.dlq",
        consumer_group=f"g-{topic}",
        batch_max_messages=50,
        batch_within_s=0.1,
        faust_data_dir=Path(tempfile.mkdtemp()),
    )


def test_the_five_statuses_end_to_end(kafka_bootstrap: str, topic: str, clickhouse: tuple[Any, str]) -> None:
    client, db = clickhouse
    key, key_id = create_key(clickhouse)
    other_key, _ = create_key(clickhouse, tenant="globex")
    settings = IngestSettings(
        topic_events=topic,
        topic_dead_letter=f"{topic}.dlq",
        clickhouse_database=db,
        ingest_delivery_timeout_s=20,
    )
    router, producer = ingest_router(settings, client, kafka_bootstrap)
    app = FastAPI()
    app.include_router(router)
    http = TestClient(app)
    auth = {"Authorization": f"Bearer {key}"}

    def post(events: list[dict[str, Any]]) -> Any:
        body = [{k: v for k, v in e.items() if k != "tenant"} for e in events]
        r = http.post(
            EVENTS_PATH, content=orjson.dumps(body), headers={**auth, "Content-Type": "application/json"}
        )
        assert r.status_code == 202, r.text
        return r.json()

    def trace(eid: str, as_key: str = key) -> dict[str, Any]:
        r = http.get(f"{EVENTS_PATH}/{eid}", headers={"Authorization": f"Bearer {as_key}"})
        assert r.status_code == 200, r.text
        TraceAnswer.model_validate(r.json())  # the answer is what the OpenAPI schema says
        return dict(r.json())

    try:
        answer = post([egress("c1", 10), egress("r1", -5)])
        assert [x["status"] for x in answer["results"]] == ["accepted", "rejected"]
        # unknown, and another tenant's id answers exactly like it
        assert trace("nope") == {"id": "nope", "status": "unknown"}
        assert trace("c1", other_key) == {"id": "c1", "status": "unknown"}
        assert trace("r1", other_key) == {"id": "r1", "status": "unknown"}
        assert http.get(f"{EVENTS_PATH}/c1").status_code == 401
        # rejected by the ingest (recorded after the answer)
        r1 = trace("r1")
        assert r1["status"] == "rejected" and r1["origin"] == "ingest" and r1["code"] == "invalid_event"
        assert r1["source"]["index"] == 1 and r1["rejected_at"]
        # received: in Kafka, no aggregator running yet
        c1 = trace("c1")
        assert c1["status"] == "received", c1
        assert c1["kafka"]["topic"] == "usage" and c1["kafka"]["offset"] == 0 and c1["partition_lag"] == 1
        # the SDK's way (no ingest validation): an event only the aggregator rejects
        produce_batches(kafka_bootstrap, topic, [egress("a1", 1, "acme") | {"type": "no.such.type"}])
        processor = make_processor(client, db)

        async def run_until(predicate: Any) -> None:
            async with running_faust(_aggregator(topic), kafka_bootstrap, processor):
                assert await asyncio.to_thread(wait_until, predicate, 90)

        asyncio.run(
            run_until(lambda: trace("c1")["status"] == "counted" and trace("a1")["status"] == "rejected")
        )
        c1 = trace("c1")
        assert c1["kafka"]["offset"] == 0 and c1["applied_at"] and c1["time"] == iso(T0).replace("Z", ".000Z")
        [meter] = c1["meters"]
        assert meter["meter"] == "egress_bytes" and meter["contribution"] == "10"
        assert meter["windows"]["1h"][0] == iso(T0.replace(minute=0)).replace("Z", ".000Z")
        a1 = trace("a1")
        assert a1["origin"] == "aggregator" and a1["code"] == "unknown_type" and a1["source"]["offset"] == 1
        # a duplicate arriving after a restart, through the SDK: the earlier copy stays counted
        produce_batches(kafka_bootstrap, topic, [egress("c1", 999, "acme"), egress("c2", 1)])
        asyncio.run(run_until(lambda: trace("c2")["status"] == "counted"))
        dup = trace("c1")
        assert dup["status"] == "duplicate", dup
        assert dup["counted_instead"]["kafka"]["offset"] == 0
        assert dup["counted_instead"]["meters"][0]["contribution"] == "10"
        assert [d["kafka"]["offset"] for d in dup["dropped"]] == [2]
        assert trace("c1", other_key) == {"id": "c1", "status": "unknown"}
        # the listing: latest first, pages, a code filter, the other tenant sees none
        page = http.get(EVENTS_PATH, params={"status": "rejected", "limit": 1}, headers=auth).json()
        assert [e["id"] for e in page["events"]] == ["a1"] and page["next"]
        RejectionsPage.model_validate(page)
        schema = app.openapi()["paths"]
        assert schema[EVENTS_PATH + "/{event_id}"]["get"]["responses"]["200"]["content"]["application/json"][
            "schema"
        ] == {"$ref": "#/components/schemas/TraceAnswer"}
        assert schema[EVENTS_PATH]["get"]["responses"]["200"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/RejectionsPage"
        }
        page2 = http.get(
            EVENTS_PATH, params={"status": "rejected", "limit": 1, "cursor": page["next"]}, headers=auth
        ).json()
        assert [e["id"] for e in page2["events"]] == ["r1"] and page2["next"] is None
        coded = http.get(EVENTS_PATH, params={"code": "invalid_event"}, headers=auth).json()
        assert [e["id"] for e in coded["events"]] == ["r1"]
        since = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        assert http.get(EVENTS_PATH, params={"from": since}, headers=auth).json()["events"] == []
        other = http.get(EVENTS_PATH, headers={"Authorization": f"Bearer {other_key}"}).json()
        assert other["events"] == []
        assert http.get(EVENTS_PATH, params={"status": "counted"}, headers=auth).status_code == 400
        assert (
            int(
                client.command(
                    f"SELECT count() FROM {db}.events_raw WHERE tenant = 'acme' AND type = 'egress.download'"
                )
            )
            == 2
        )
        assert key_id  # the key that sent r1 is the one that sees it
    finally:
        http.close()
        producer.close()
