"""Re-drive after a fix, and the reconciliation (issue 10, items 3 and 4), end to end: the HTTP
ingest rejects events for a workspace that does not exist yet; once it is created, a re-drive
counts them exactly once and a second one counts nothing more; the tenant's counts add up."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from aggregators.direct import apply_events, make_processor
from deploy.settings import IngestSettings
from ingest.events_cli import plan_redrive, reconcile, send_redrive
from ingest.http import EVENTS_PATH, ingest_router
from ingest.scope import ScopeStore
from ingest.sdk import UsageProducer, new_event
from query_api.event_trace import KafkaScanner, Tracer
from schemas.meters import default_catalog
from schemas.validation import now_ms
from tests.integration.helpers import event, produce_batches, running_faust, wait_until
from tests.integration.test_event_trace import _aggregator
from tests.integration.test_http_ingest import create_key

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]


def test_redrive_counts_once_and_the_counts_add_up(
    kafka_bootstrap: str, topic: str, clickhouse: tuple[Any, str]
) -> None:
    client, db = clickhouse
    key, _ = create_key(clickhouse)
    start = datetime.now(UTC)
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
    at = datetime.now(UTC) - timedelta(minutes=10)

    def egress(eid: str, ws: str, nbytes: int) -> dict[str, Any]:
        e = event(
            eid, "egress.download", {"workspace_id": ws, "artifact_id": "a", "bytes": nbytes}, at, "acme"
        )
        del e["tenant"]
        return e

    body = [egress("ok1", "w1", 1), egress("ok2", "w1", 2), egress("bad", "w1", -1)]
    body += [egress(f"late{i}", "w9", 100) for i in range(3)]  # w9: not created yet
    r = http.post(
        EVENTS_PATH,
        content=orjson.dumps(body),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    assert [x.get("code") for x in r.json()["results"]] == [
        None,
        None,
        "invalid_event",
        *["out_of_scope"] * 3,
    ]
    # the SDK's way: a copy of ok1 (a duplicate) and an event only the aggregator rejects
    produce_batches(kafka_bootstrap, topic, [egress("ok1", "w1", 1) | {"tenant": "acme"}])
    produce_batches(kafka_bootstrap, topic, [egress("odd", "w1", 1) | {"tenant": "acme", "type": "no.such"}])
    processor = make_processor(client, db)
    tracer = Tracer(
        client, db, default_catalog(), KafkaScanner({"bootstrap.servers": kafka_bootstrap}, topic)
    )

    async def run_until(predicate: Any) -> None:
        async with running_faust(_aggregator(topic), kafka_bootstrap, processor):
            assert await asyncio.to_thread(wait_until, predicate, 90)

    def raw(ids: list[str]) -> int:
        return int(
            client.command(
                f"SELECT count() FROM {db}.events_raw WHERE event_id IN {{ids:Array(String)}}",
                parameters={"ids": ids},
            )
        )

    late = [f"late{i}" for i in range(3)]
    # before any aggregator runs: three events in flight, four rejected by the ingest
    assert reconcile(tracer, "acme", start, datetime.now(UTC) + timedelta(hours=1))["in_flight"] == 4
    asyncio.run(
        run_until(
            lambda: (
                raw(["ok1", "ok2"]) == 2
                and tracer.rejected_counts("acme", start, None).get("unknown_type") == 1
            )
        )
    )

    # the fix: w9 created (under w1, so the key's scope opens it); then the re-drive
    apply_events(
        client,
        db,
        [
            new_event(
                "workspace.created",
                {"workspace_id": "w9", "name": "W9", "parent_id": "w1"},
                tenant="acme",
                source="t",
            )
        ],
    )
    scope = ScopeStore(client, db, ttl_s=0).tenant_scope("acme")
    dry = plan_redrive(tracer, scope, "acme")
    assert sorted(e["id"] for e in dry.accepted) == late
    assert dry.rejected_again == {"invalid_event": 1, "unknown_type": 1} and dry.already_counted == 0
    judged = now_ms()
    with UsageProducer(kafka_bootstrap, topic=topic) as p:
        send_redrive(p, "acme", dry.accepted, judged)
    asyncio.run(run_until(lambda: raw(late) == 3))
    again = plan_redrive(tracer, scope, "acme")
    assert again.accepted == [] and again.already_counted == 3  # nothing more to count
    assert raw(late) == 3
    total = client.command(
        f"SELECT sum(value_sum) FROM {db}.usage_1mo WHERE tenant = 'acme' AND meter = 'egress_bytes'"
    )
    assert int(total) == 1 + 2 + 300
    # counted: ok1, ok2, three late, workspace w9; duplicate: the SDK's ok1; in flight: nothing
    report = reconcile(tracer, "acme", start, datetime.now(UTC) + timedelta(hours=1))
    assert report == {
        "received": 6 + 1 + 5 + 0,
        "counted": 6,
        "duplicates": 1,
        "rejected": 5,
        "rejected_by_ingest": 4,
        "rejected_by_aggregator": 1,
        "in_flight": 0,
    }
    http.close()
    producer.close()
