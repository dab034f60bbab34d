"""Test harness: real Kafka and the real ClickHouse engine, and a guard for everything else.

- ``kafka_bootstrap`` (session): ``KAFKA_BOOTSTRAP_SERVERS`` if set; else testcontainers' Kafka
  if a Docker engine answers; else the project's own local broker on a free port.
- ``topic``: a unique usage topic per test (4 partitions), and its control topic ``<topic>.control``.
- ``clickhouse``: ``(client, database)``: one embedded chdb engine per session (chdb locks its
  directory to one process) and a fresh database per test with the migrations applied.
- Tests that touch Kafka or ClickHouse must say so with ``@pytest.mark.kafka`` /
  ``@pytest.mark.clickhouse``; an unmarked test that asks for them, or calls the client
  factories, fails.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from schemas import clickhouse as ch


def _docker_engine_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap(request: pytest.FixtureRequest) -> Iterator[str]:
    env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if env:
        yield env
        return
    if os.environ.get("METERING_TEST_USE_DOCKER", "1") == "1" and _docker_engine_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as kafka:
            yield kafka.get_bootstrap_server()
        return
    from deploy.kafka import local_broker

    data_dir = Path(tempfile.mkdtemp(prefix="metering-test-kafka-"))
    port = local_broker.find_free_port()
    # A generous start timeout: a failed start errors every Kafka test of the session, and on a
    # loaded 2-core machine the default 90 s has been seen to be too short (load average ~25:
    # the broker registered 1 s before the timeout stopped it). A quick start returns at once.
    bootstrap = local_broker.start(port=port, data_dir=data_dir, timeout_s=300)
    try:
        yield bootstrap
    finally:
        local_broker.stop(data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def topic(kafka_bootstrap: str, request: pytest.FixtureRequest) -> str:
    _require_marker(request, "kafka")
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    name = f"test-{uuid.uuid4().hex[:12]}"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    new = [
        NewTopic(name, num_partitions=4, replication_factor=1),
        # the control topic the settings derive from it (CommonSettings.topic_control)
        NewTopic(f"{name}.control", num_partitions=1, replication_factor=1),
    ]
    for fut in admin.create_topics(new).values():
        fut.result(timeout=30)
    return name


_REAL_CONNECT = ch.connect


@pytest.fixture(scope="session")
def _chdb_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="metering-test-chdb-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def clickhouse(_chdb_dir: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Any, str]]:
    _require_marker(request, "clickhouse")
    from schemas.migrate import migrate

    dsn = f"chdb://{_chdb_dir}"
    client = _REAL_CONNECT(dsn, "default")
    database = f"t_{uuid.uuid4().hex[:12]}"
    client.command(f"CREATE DATABASE {database}")
    migrate(client, database)
    try:
        yield client, database
    finally:
        client.command(f"DROP DATABASE IF EXISTS {database} SYNC")


@pytest.fixture
def clickhouse_dsn(_chdb_dir: Path, request: pytest.FixtureRequest) -> str:
    """The session's embedded engine DSN (processes in this test share its one client)."""
    _require_marker(request, "clickhouse")
    return f"chdb://{_chdb_dir}"


def _require_marker(request: pytest.FixtureRequest, marker: str) -> None:
    if request.node.get_closest_marker(marker) is None:
        pytest.fail(f"{request.node.nodeid} uses {marker} but is not marked @pytest.mark.{marker}")


@pytest.fixture(autouse=True)
def _guard_external(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unmarked tests may not reach Kafka or ClickHouse: the factories raise for them."""
    node = request.node
    if node.get_closest_marker("clickhouse") is None:
        import clickhouse_connect

        def no_clickhouse(*_a: Any, **_k: Any) -> Any:
            pytest.fail(f"{node.nodeid} touches ClickHouse but is not marked @pytest.mark.clickhouse")

        monkeypatch.setattr(clickhouse_connect, "get_client", no_clickhouse)
        monkeypatch.setattr(ch, "connect", no_clickhouse)
    if node.get_closest_marker("kafka") is None:
        import confluent_kafka
        import confluent_kafka.admin

        def no_kafka(*_a: Any, **_k: Any) -> Any:
            pytest.fail(f"{node.nodeid} touches Kafka but is not marked @pytest.mark.kafka")

        for name in ("Producer", "Consumer"):
            monkeypatch.setattr(confluent_kafka, name, no_kafka)
        monkeypatch.setattr(confluent_kafka.admin, "AdminClient", no_kafka)
        monkeypatch.setattr(confluent_kafka, "AdminClient", no_kafka, raising=False)
