"""Issue 7, findings 1, 4 and 5, reproduced from outside against the real pipeline in one process
(HTTP ingest + faust aggregator + query API on a real broker and the real ClickHouse engine).

1. Privilege escalation: a member-scoped key and a child workspace's key try to mint an API key
   and an access token for the parent workspace, through ``POST /api/v1/events`` and straight
   onto the usage topic. Neither works: the ingest refuses lifecycle events
   (``forbidden_event_type``) and the aggregator refuses them from the usage topic
   (``wrong_topic``); the minted secrets answer 401. The same entities written by an
   administrator on the control topic do work (the positive control).
4. A 202 is counted: hundreds of events at the exact edges of the time window, each accepted or
   rejected by the ingest, and every accepted one (and no other) is counted.
5. A stop during a ClickHouse outage acknowledges nothing: after a restart every event is
   counted exactly once.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition
from fastapi.testclient import TestClient

from aggregators import metrics
from aggregators.direct import make_processor
from deploy.runner import Part, build_http_app
from deploy.settings import RunSettings
from ingest.sdk import format_time
from query_api.credentials import display_prefix, hash_secret, new_access_token, new_api_key
from schemas.validation import MAX_AGE, MAX_FUTURE, RejectCode
from tests.integration.helpers import event, produce_batches, running_faust, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.slow]

TENANT = "acme"
ROOT = "6f1c1a4e-0000-4000-8000-000000000001"  # document 000 takes UUIDs
CHILD = "6f1c1a4e-0000-4000-8000-000000000002"


@dataclass
class World:
    member_key: str
    child_key: str
    root_token: str  # a legitimate access token of the parent's member (positive control)


def settings_for(topic: str, db: str) -> RunSettings:
    return RunSettings(
        topic_events=topic,
        topic_dead_letter=f"{topic}.dlq",
        clickhouse_database=db,
        consumer_group=f"g-{topic}",
        batch_max_messages=20,
        batch_within_s=0.1,
        faust_data_dir=Path(tempfile.mkdtemp(prefix="hardening-faust-")),
        clickhouse_retry_max_s=0.5,
        query_cache_ttl_s=0.0,
        query_rate_limit_per_minute=1_000_000,
        ingest_rate_limit_per_minute=1_000_000,
        ingest_delivery_timeout_s=20.0,
    )


def key_event(eid: str, raw: str, at: datetime, **scope: Any) -> dict[str, Any]:
    data = {"key_id": eid, "key_hash": hash_secret(raw), "prefix": display_prefix(raw), **scope}
    return event(eid, "api_key.created", data, at, TENANT)


def token_event(eid: str, raw: str, member_id: str, email: str, at: datetime) -> dict[str, Any]:
    data = {
        "token_id": eid,
        "token_hash": hash_secret(raw),
        "member_id": member_id,
        "email": email,
        "expires_at": format_time(at + timedelta(days=30)),
    }
    return event(eid, "access_token.issued", data, at, TENANT)


def administrator_world(bootstrap: str, topic: str, at: datetime) -> World:
    """What ``metering admin`` writes: on the control topic (produce_batches routes it there)."""
    world = World(new_api_key(), new_api_key(), new_access_token())
    events = [
        event(
            "w-root", "workspace.created", {"workspace_id": ROOT, "name": "Root", "tier": "pro"}, at, TENANT
        ),
        event(
            "w-child",
            "workspace.created",
            {"workspace_id": CHILD, "name": "Child", "parent_id": ROOT, "tier": "pro"},
            at,
            TENANT,
        ),
        event(
            "m-boss",
            "member.joined",
            {"workspace_id": ROOT, "member_id": "boss", "email": "boss@acme.io"},
            at,
            TENANT,
        ),
        event(
            "m-dev",
            "member.joined",
            {"workspace_id": CHILD, "member_id": "dev", "email": "dev@acme.io"},
            at,
            TENANT,
        ),
        key_event(
            "k-member",
            world.member_key,
            at,
            scope="member",
            member_id="dev",
            email="dev@acme.io",
            workspace_id=CHILD,
        ),
        key_event("k-child", world.child_key, at, scope="workspace", workspace_id=CHILD),
        token_event("t-boss", world.root_token, "boss", "boss@acme.io", at),
    ]
    produce_batches(bootstrap, topic, events)
    return world


def render(eid: str, at: datetime, workspace: str = CHILD) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": eid,
        "source": "render-farm",
        "type": "render.completed",
        "time": format_time(at),
        "data": {"workspace_id": workspace, "render_id": eid, "output_duration_seconds": 60},
    }


def post(api: TestClient, key: str, body: Any) -> Any:
    return api.post(
        "/api/v1/events",
        content=orjson.dumps(body),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )


def raw_ids(client: Any, db: str, type_: str = "") -> set[str]:
    rows = client.query(
        f"SELECT event_id FROM {db}.events_raw WHERE tenant = {{t:String}} AND ({{ty:String}} = '' OR type = {{ty:String}})",
        parameters={"t": TENANT, "ty": type_},
    )
    return {str(r[0]) for r in rows.result_rows}


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


# ---- finding 1: no escalation ------------------------------------------------------------------


def test_usage_keys_cannot_mint_credentials_through_http_or_kafka(
    kafka_bootstrap: str, topic: str, pipeline: tuple[Any, ...]
) -> None:
    settings, api, processor, client, db = pipeline
    now = datetime.now(UTC).replace(microsecond=0)
    world = administrator_world(kafka_bootstrap, topic, now - timedelta(hours=1))
    minted_key, minted_token = new_api_key(), new_access_token()
    kafka_key, kafka_token = new_api_key(), new_access_token()
    http_attack = {
        # a member-scoped key mints a key for the root workspace
        world.member_key: key_event("evil-k", minted_key, now, scope="workspace", workspace_id=ROOT),
        # a child workspace's key mints a token for a member of its parent
        world.child_key: token_event("evil-t", minted_token, "boss", "boss@acme.io", now),
    }
    # an attacker who can write the usage topic directly
    kafka_attack = [
        key_event("evil-k2", kafka_key, now, scope="workspace", workspace_id=ROOT),
        token_event("evil-t2", kafka_token, "boss", "boss@acme.io", now),
        event("evil-w", "workspace.updated", {"workspace_id": ROOT, "tier": "enterprise"}, now, TENANT),
    ]

    async def scenario() -> None:
        async with running_faust(settings, kafka_bootstrap, processor):
            # the administrator's entities are usable: a legitimate usage event is accepted
            def ready() -> bool:
                r = post(api, world.child_key, render("warm-up", now))
                return r.status_code == 202 and r.json()["accepted"] == 1

            assert await asyncio.to_thread(wait_until, ready, 60.0)
            for key, attack in http_attack.items():
                r = await asyncio.to_thread(post, api, key, [attack, render(f"ok-{attack['id']}", now)])
                assert r.status_code == 202, r.text
                first, second = r.json()["results"]
                assert (first["status"], first["code"]) == ("rejected", RejectCode.FORBIDDEN_EVENT_TYPE)
                assert "administrators" in first["message"]
                assert second["status"] == "accepted"  # its neighbour is unaffected
            await asyncio.to_thread(produce_batches, kafka_bootstrap, topic, kafka_attack, 200, False)
            # a usage event after the attack, in the same partition (keyed by tenant): once it is
            # counted, the aggregator has decided on every attack message
            assert post(api, world.child_key, render("after-attack", now)).status_code == 202
            assert await asyncio.to_thread(wait_until, lambda: "after-attack" in raw_ids(client, db), 60.0)

    asyncio.run(scenario())

    rejected = {r.original and orjson.loads(r.original)["id"]: r.code for r in processor.dead_letters.rejects}
    assert rejected == {e["id"]: RejectCode.WRONG_TOPIC for e in kafka_attack}
    stored = raw_ids(client, db)
    assert not stored & {"evil-k", "evil-t", "evil-k2", "evil-t2", "evil-w"}
    assert {"warm-up", "ok-evil-k", "ok-evil-t", "after-attack"} <= stored
    entities = client.query(
        f"SELECT entity_id FROM {db}.entities FINAL WHERE tenant = {{t:String}} AND kind IN ('api_key', 'access_token')",
        parameters={"t": TENANT},
    ).result_rows
    assert {r[0] for r in entities} == {"k-member", "k-child", "t-boss"}
    tier = client.command(
        f"SELECT tier FROM {db}.entities FINAL WHERE tenant = {{t:String}} AND kind = 'workspace' AND entity_id = {{w:String}}",
        parameters={"t": TENANT, "w": ROOT},
    )
    assert tier == "pro"

    # the minted secrets open nothing; the administrator's do (positive control)
    for raw in (minted_key, kafka_key):
        r = api.get("/api/v1/usage/", headers={"Authorization": f"Token {raw}"})
        assert r.status_code == 401, r.text
    for raw in (minted_token, kafka_token):
        r = api.get(f"/api/v1/workspaces/{ROOT}/stats", headers={"Authorization": f"Bearer {raw}"})
        assert r.status_code == 401, r.text
    assert (
        api.get(
            f"/api/v1/workspaces/{ROOT}/stats", headers={"Authorization": f"Bearer {world.root_token}"}
        ).status_code
        == 200
    )
    assert api.get("/api/v1/usage/", headers={"Authorization": f"Token {world.child_key}"}).status_code == 200


# ---- finding 4: a 202 is counted, at the exact edges of the window -----------------------------


def test_every_accepted_event_at_the_window_edges_is_counted(
    kafka_bootstrap: str, topic: str, pipeline: tuple[Any, ...]
) -> None:
    settings, api, processor, client, db = pipeline
    world_at = datetime.now(UTC) - timedelta(hours=1)
    world = administrator_world(kafka_bootstrap, topic, world_at)
    accepted: set[str] = set()
    refused: dict[str, str] = {}

    async def scenario() -> None:
        async with running_faust(settings, kafka_bootstrap, processor):

            def ready() -> bool:
                return post(api, world.child_key, render("warm-up", datetime.now(UTC))).status_code == 202

            assert await asyncio.to_thread(wait_until, ready, 60.0)
            accepted.add("warm-up")
            for edge, name in ((-MAX_AGE, "old"), (MAX_FUTURE, "new")):
                for request in range(3):
                    # 100 events 1.5 ms apart, centred on the edge as seen at sending time
                    centre = datetime.now(UTC) + edge
                    body = [
                        render(f"{name}-{request}-{i}", centre + timedelta(microseconds=1500 * (i - 50)))
                        for i in range(100)
                    ]
                    r = await asyncio.to_thread(post, api, world.child_key, body)
                    assert r.status_code == 202, r.text
                    for result in r.json()["results"]:
                        if result["status"] == "accepted":
                            accepted.add(result["id"])
                        else:
                            refused[result["id"]] = result["code"]
            assert await asyncio.to_thread(wait_until, lambda: accepted <= raw_ids(client, db), 60.0)
            await asyncio.sleep(1.0)  # anything wrongly counted would have arrived by now

    asyncio.run(scenario())
    # both sides of both edges were exercised
    assert {c for c in refused.values()} == {RejectCode.TOO_OLD, RejectCode.IN_FUTURE}
    assert sum(i.startswith("old-") for i in accepted) > 0 and sum(i.startswith("new-") for i in accepted) > 0
    assert raw_ids(client, db, "render.completed") == accepted
    window = [
        r for r in processor.dead_letters.rejects if r.code in (RejectCode.TOO_OLD, RejectCode.IN_FUTURE)
    ]
    assert window == []


# ---- finding 5: a stop during an outage acknowledges nothing -----------------------------------


def committed(bootstrap: str, topic: str, group: str) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        parts = [TopicPartition(topic, p) for p in range(4)]
        return {tp.partition: tp.offset for tp in c.committed(parts, timeout=10)}
    finally:
        c.close()


def ends(bootstrap: str, topic: str) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "ends", "enable.auto.commit": False})
    try:
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(4)}
    finally:
        c.close()


def test_a_stop_during_an_outage_acknowledges_nothing(
    kafka_bootstrap: str, topic: str, clickhouse: tuple[Any, str]
) -> None:
    client, db = clickhouse
    settings = settings_for(topic, db)
    at = datetime.now(UTC) - timedelta(minutes=5)

    def egress(prefix: str, n: int, tenant: str) -> list[dict[str, Any]]:
        return [
            event(
                f"{prefix}{i}",
                "egress.download",
                {"workspace_id": "w", "artifact_id": f"{prefix}{i}", "bytes": i + 1},
                at,
                tenant,
            )
            for i in range(n)
        ]

    first = egress("a", 200, "t1") + egress("a", 200, "t2")
    second = egress("b", 300, "t1") + egress("b", 300, "t2")
    count = lambda: int(client.command(f"SELECT count() FROM {db}.events_raw"))  # noqa: E731

    async def until_stopped_in_outage() -> None:
        processor = make_processor(client, db)
        async with running_faust(settings, kafka_bootstrap, processor) as app:
            produce_batches(kafka_bootstrap, topic, first, per_message=25)
            assert await asyncio.to_thread(wait_until, lambda: count() == 400, 60.0)
            client.command(f"DETACH TABLE {db}.usage_1d")  # the outage: every batch fails
            errors = metrics.CLICKHOUSE_ERRORS._value.get()
            produce_batches(kafka_bootstrap, topic, second, per_message=25)
            assert await asyncio.to_thread(
                wait_until, lambda: metrics.CLICKHOUSE_ERRORS._value.get() > errors + 2, 60.0
            )
            # asked to stop (as `metering run` does on Ctrl-C, before stopping faust): the batch
            # gives up retrying; then longer than the commit interval passes before faust stops,
            # time enough for an acknowledged batch to be committed
            app.metering_stopping.set()
            await asyncio.sleep(3.0)  # the commit interval is 1 s (aggregators/app.py)
        # running_faust has stopped the aggregator while its batch was waiting out the outage

    asyncio.run(until_stopped_in_outage())
    done, end = committed(kafka_bootstrap, topic, settings.consumer_group), ends(kafka_bootstrap, topic)
    # not every message of the second wave can have been committed: it was never applied
    assert any(max(done[p], 0) < end[p] for p in end), (done, end)

    client.command(f"ATTACH TABLE {db}.usage_1d")

    async def restart() -> None:
        processor = make_processor(client, db)
        async with running_faust(settings, kafka_bootstrap, processor):

            def all_counted() -> bool:
                return (
                    count() == 1000
                    and client.command(
                        f"SELECT sum(value_count) FROM {db}.usage_1d WHERE meter = 'egress_bytes'"
                    )
                    == 1000
                )

            assert await asyncio.to_thread(wait_until, all_counted, 90.0)

    asyncio.run(restart())
    expected = Decimal(2 * sum(range(1, 201)) + 2 * sum(range(1, 301)))
    for table in ("usage_15m", "usage_1h", "usage_1d", "usage_1mo"):
        got = client.query(
            f"SELECT sum(value_sum), sum(value_count) FROM {db}.{table} WHERE meter = 'egress_bytes'"
        ).result_rows[0]
        assert got == (expected, 1000), table
    assert count() == 1000
