"""The SDK and the CLI against a real broker: every event arrives once, in order per tenant,
keyed by tenant, in batch messages."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
import typer
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient, ConfigResource
from typer.testing import CliRunner

from deploy.settings import CommonSettings
from ingest.cli import admin_app, emit, load
from ingest.kafka_config import KafkaUnavailable, check_reachable, ensure_topics
from ingest.sdk import UsageProducer, new_event
from query_api.credentials import hash_secret
from schemas import wire

pytestmark = pytest.mark.kafka


@dataclass
class Received:
    partition: int
    offset: int
    key: bytes | None
    headers: dict[str, bytes]
    events: list[dict[str, Any]]
    timestamp_ms: int = 0


def consume(bootstrap: str, topic: str, expected_events: int, give_up_s: float = 60.0) -> list[Received]:
    """Every message of ``topic`` until ``expected_events`` events arrived, then 1 s more to
    catch any extra (duplicates). ``give_up_s`` only bounds a broken run."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    out: list[Received] = []
    count = 0
    deadline = time.monotonic() + give_up_s
    extra_until: float | None = None
    try:
        while time.monotonic() < deadline and (extra_until is None or time.monotonic() < extra_until):
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            events = wire.decode_value(msg.value() or b"")
            raw_headers = msg.headers() or []
            pairs = raw_headers.items() if isinstance(raw_headers, dict) else raw_headers
            headers = {k: v.encode() if isinstance(v, str) else (v or b"") for k, v in pairs}
            out.append(
                Received(
                    msg.partition() or 0, msg.offset() or 0, msg.key(), headers, events, msg.timestamp()[1]
                )
            )
            count += len(events)
            if count >= expected_events and extra_until is None:
                extra_until = time.monotonic() + 1.0
    finally:
        consumer.close()
    return out


def cpu(i: int, tenant: str, at: datetime | None = None) -> dict[str, Any]:
    return new_event(
        "ci.step.cpu",
        {"contract_id": "c", "workspace_id": "w", "step_id": f"step-{i % 17}", "cpu_seconds": i % 10 + 0.5},
        tenant=tenant,
        source="test",
        time=at,
        id=f"{tenant}-{i}",
    )


def test_ten_thousand_events_arrive_once_in_order_per_tenant(kafka_bootstrap: str, topic: str) -> None:
    tenants = [f"tenant-{n}" for n in range(7)]
    sent: dict[str, list[str]] = defaultdict(list)
    with UsageProducer(kafka_bootstrap, topic=topic, linger_s=0.02) as producer:
        for i in range(9_000):
            tenant = tenants[i % 7 if i % 11 else 0]  # uneven: tenant-0 gets more
            producer.emit(cpu(i, tenant), tenant)
            sent[tenant].append(f"{tenant}-{i}")
        # the blocking path, interleaved with queued emits of the same tenant
        batch = [cpu(i, "tenant-3") for i in range(9_000, 10_000)]
        producer.send_batch(batch, "tenant-3")
        sent["tenant-3"].extend(e["id"] for e in batch)
    assert producer.stats.delivered_events == 10_000
    assert producer.pending == 0

    received = consume(kafka_bootstrap, topic, 10_000)
    all_ids = [e["id"] for m in received for e in m.events]
    assert len(all_ids) == 10_000
    assert len(set(all_ids)) == 10_000

    by_tenant: dict[str, list[str]] = defaultdict(list)
    partitions: dict[str, set[int]] = defaultdict(set)
    for m in sorted(received, key=lambda r: (r.partition, r.offset)):
        tenant = (m.key or b"").decode()
        assert {e["tenant"] for e in m.events} == {tenant}  # one tenant per message, keyed by it
        assert m.headers[wire.HEADER_CONTENT_TYPE] == wire.CONTENT_TYPE_BATCH.encode()
        assert wire.HEADER_BACKFILL not in m.headers
        assert 1 <= len(m.events) <= 500
        partitions[tenant].add(m.partition)
        by_tenant[tenant].extend(e["id"] for e in m.events)
    assert all(len(p) == 1 for p in partitions.values())  # a tenant lives in one partition
    assert dict(by_tenant) == dict(sent)  # and its events keep emission order
    # batched: far fewer messages than events (under 200 in every CI run before 2026-11-30;
    # 262 once at load ~10, when the linger cut batches earlier)
    assert len(received) <= 1_000


def test_backfill_header_and_old_events(kafka_bootstrap: str, topic: str) -> None:
    old = datetime.now(UTC) - timedelta(days=60)
    with UsageProducer(kafka_bootstrap, topic=topic) as producer:
        producer.send_batch([cpu(1, "acme", at=old)], "acme", backfill=True)
        producer.emit(cpu(2, "acme"), "acme")
    received = consume(kafka_bootstrap, topic, 2)
    flags = {m.events[0]["id"]: m.headers.get(wire.HEADER_BACKFILL) for m in received}
    assert flags == {"acme-1": b"1", "acme-2": None}


def test_ensure_topics_creates_every_topic_once(kafka_bootstrap: str) -> None:
    name = f"test-ensure-{uuid.uuid4().hex[:8]}"
    settings = CommonSettings(topic_events=name, topic_dead_letter=f"{name}.dlq", topic_partitions=3)
    created = ensure_topics(settings, kafka_bootstrap)
    assert sorted(created) == sorted([name, f"{name}.control", f"{name}.dlq"])
    assert ensure_topics(settings, kafka_bootstrap) == []
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    metadata = admin.list_topics(timeout=10)
    assert len(metadata.topics[name].partitions) == 3
    assert len(metadata.topics[f"{name}.dlq"].partitions) == 3
    # the control plane: one partition (one order), kept forever (entities are rebuilt from it)
    assert len(metadata.topics[f"{name}.control"].partitions) == 1
    resource = ConfigResource(ConfigResource.Type.TOPIC, f"{name}.control")
    config = admin.describe_configs([resource])[resource].result(timeout=10)
    assert config["retention.ms"].value == "-1"


def test_unreachable_broker_is_a_clear_error() -> None:
    with pytest.raises(KafkaUnavailable) as exc:
        check_reachable(CommonSettings(), "127.0.0.1:1", timeout_s=1.0)
    assert "make kafka-up" in str(exc.value)
    assert "127.0.0.1:1" in str(exc.value)


# ---- the CLI ----------------------------------------------------------------------------------


@pytest.fixture
def cli(kafka_bootstrap: str, topic: str, monkeypatch: pytest.MonkeyPatch) -> typer.Typer:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.setenv("METERING_TOPIC_EVENTS", topic)
    monkeypatch.setenv("METERING_TOPIC_DEAD_LETTER", f"{topic}.dlq")
    app = typer.Typer()
    app.command()(emit)
    app.command()(load)
    app.add_typer(admin_app, name="admin")
    return app


def test_cli_emit_one_event(cli: typer.Typer, kafka_bootstrap: str, topic: str) -> None:
    data = '{"workstation_id": "ws-1", "gpu_seconds": 12.5}'
    result = CliRunner().invoke(
        cli, ["emit", "--type", "workstation.gpu", "--tenant", "acme", "--data", data, "--id", "cli-1"]
    )
    assert result.exit_code == 0, result.output
    assert "delivered" in result.output and "cli-1" in result.output
    (message,) = consume(kafka_bootstrap, topic, 1)
    assert message.key == b"acme"
    assert message.events[0]["data"] == {"workstation_id": "ws-1", "gpu_seconds": 12.5}


def test_cli_emit_file_reports_rejections(
    cli: typer.Typer, kafka_bootstrap: str, topic: str, tmp_path: Any
) -> None:
    good = cpu(1, "acme")
    old = cpu(2, "acme", at=datetime.now(UTC) - timedelta(days=40))
    foreign = cpu(3, "globex")
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(e) for e in (good, old, foreign)) + b"\n{broken\n")
    result = CliRunner().invoke(cli, ["emit", "--file", str(path), "--tenant", "acme", "--json"])
    assert result.exit_code == 1
    lines = [orjson.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert [(r["status"], r.get("code")) for r in lines] == [
        ("delivered", None),
        ("rejected", "event_too_old"),
        ("rejected", "tenant_mismatch"),
        ("rejected", "invalid_json"),
    ]
    received = consume(kafka_bootstrap, topic, 1)
    assert [e["id"] for m in received for e in m.events] == ["acme-1"]


def test_cli_admin_api_key_sends_only_the_hash(cli: typer.Typer, kafka_bootstrap: str, topic: str) -> None:
    result = CliRunner().invoke(
        # --force: no admin API runs here to check that ws-1 exists (tests/integration/test_admin_cli.py)
        cli,
        ["admin", "api-key", "create", "--tenant", "acme", "--workspace-id", "ws-1", "--json", "--force"],
    )
    assert result.exit_code == 0, result.output
    printed = orjson.loads(next(line for line in result.output.splitlines() if line.startswith("{")))
    raw = printed["api_key"]
    # lifecycle events go to the control topic, never to the usage topic
    (message,) = consume(kafka_bootstrap, f"{topic}.control", 1)
    (event,) = message.events
    assert event["type"] == "api_key.created"
    assert event["data"]["key_hash"] == hash_secret(raw)
    assert event["data"]["key_id"] == printed["key_id"]
    assert raw.encode() not in orjson.dumps(event)


def test_cli_admin_workspace_and_member(cli: typer.Typer, kafka_bootstrap: str, topic: str) -> None:
    runner = CliRunner()
    created = runner.invoke(
        cli, ["admin", "workspace", "create", "--tenant", "acme", "--name", "hq", "--json"]
    )
    assert created.exit_code == 0, created.output
    ws = orjson.loads(created.output.splitlines()[-1])["workspace_id"]
    join = ["admin", "member", "join", "--tenant", "acme", "--email", "a@acme.io", "--force"]
    joined = runner.invoke(cli, [*join, "--workspace-id", ws])
    assert joined.exit_code == 0, joined.output
    events = [e for m in consume(kafka_bootstrap, f"{topic}.control", 2) for e in m.events]
    assert [e["type"] for e in events] == ["workspace.created", "member.joined"]
    assert events[1]["data"]["workspace_id"] == ws


def test_cli_load_sends_lifecycle_then_usage(cli: typer.Typer, kafka_bootstrap: str, topic: str) -> None:
    result = CliRunner().invoke(
        cli, ["load", "--tenants", "2", "--count", "3000", "--rate", "0", "--seed", "5"]
    )
    assert result.exit_code == 0, result.output
    assert "3,000 usage events" in result.output
    usage_messages = consume(kafka_bootstrap, topic, 3000)
    usage = [e for m in usage_messages for e in m.events]
    assert len(usage) == 3000 and all(e["id"].startswith("u-") for e in usage)
    # lifecycle on the control topic, acknowledged before the first usage event was sent
    lifecycle = consume(kafka_bootstrap, f"{topic}.control", 1)
    events = [e for m in lifecycle for e in m.events]
    assert events and all(e["id"].startswith("lc-") for e in events)
    assert {e["tenant"] for e in events} == {e["tenant"] for e in usage}
    assert max(m.timestamp_ms for m in lifecycle) <= min(m.timestamp_ms for m in usage_messages)


def test_cli_without_broker_says_how_to_start_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.delenv("METERING_KAFKA_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.setenv("METERING_KAFKA_PORT", "1")
    app = typer.Typer()
    app.command()(emit)
    app.command()(load)
    result = CliRunner().invoke(
        app,
        [
            "emit",
            "--type",
            "workstation.gpu",
            "--tenant",
            "a",
            "--data",
            '{"workstation_id":"w","gpu_seconds":1}',
        ],
    )
    assert result.exit_code == 2
    assert "make kafka-up" in result.output
