"""librdkafka configuration of everything that writes events, and the topics it writes to.

One function decides the producer's delivery guarantees, so no caller can weaken them by
accident: idempotence (no duplicates or reordering from librdkafka's own retries), ``acks=all``
(a message counts as delivered only once every in-sync replica has it), and a bounded delivery
timeout after which a message is reported failed to the caller instead of retried forever.
"""

from __future__ import annotations

import logging
from typing import Any

import confluent_kafka.admin
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.cimpl import NewTopic

from deploy.settings import CommonSettings
from metering_client.kafka_producer import (
    DEFAULT_DELIVERY_TIMEOUT_S as DEFAULT_DELIVERY_TIMEOUT_S,
)
from metering_client.kafka_producer import (
    DEFAULT_LINGER_MS,
)
from metering_client.kafka_producer import (
    PRODUCER_MESSAGE_MAX_BYTES as PRODUCER_MESSAGE_MAX_BYTES,  # re-exported: one definition
)
from metering_client.kafka_producer import producer_config as client_producer_config

log = logging.getLogger(__name__)
#: librdkafka's own log lines (connection attempts, retries). Quiet unless the application
#: configures logging: failures that matter reach callers as exceptions, not log lines.
librdkafka_log = logging.getLogger("ingest.librdkafka")
librdkafka_log.addHandler(logging.NullHandler())

BROKER_DEFAULT_MESSAGE_MAX_BYTES = 1_048_588


class KafkaUnavailable(RuntimeError):
    """No broker answered at the bootstrap address within the timeout."""


def resolve_bootstrap(settings: CommonSettings) -> str:
    """The configured cluster, else the project's local broker (``make kafka-up``) on 127.0.0.1."""
    return settings.kafka_bootstrap_servers or f"127.0.0.1:{settings.kafka_port}"


def producer_config(
    settings: CommonSettings,
    bootstrap: str,
    *,
    delivery_timeout_s: float = DEFAULT_DELIVERY_TIMEOUT_S,
    linger_ms: int = DEFAULT_LINGER_MS,
) -> dict[str, Any]:
    """Configuration of every event producer of the server (HTTP ingest, CLI): the client
    distribution's one definition of the delivery guarantees (metering_client.kafka_producer),
    over this deployment's connection settings, with the server's client id and logger."""
    conf = client_producer_config(
        bootstrap,
        client_config=settings.kafka_client_config(bootstrap),
        delivery_timeout_s=delivery_timeout_s,
        linger_ms=linger_ms,
    )
    conf.update({"client.id": "metering-ingest", "logger": librdkafka_log})
    return conf


def admin_config(settings: CommonSettings, bootstrap: str) -> dict[str, Any]:
    conf = settings.kafka_client_config(bootstrap)
    conf["client.id"] = "metering-admin"
    conf["logger"] = librdkafka_log
    return conf


def check_reachable(settings: CommonSettings, bootstrap: str, timeout_s: float = 5.0) -> None:
    """Raise ``KafkaUnavailable`` unless a broker answers a metadata request in ``timeout_s``."""
    admin = confluent_kafka.admin.AdminClient(admin_config(settings, bootstrap))
    _metadata_or_raise(admin, bootstrap, timeout_s)


def ensure_topics(settings: CommonSettings, bootstrap: str, timeout_s: float = 15.0) -> list[str]:
    """Create the usage topic (``settings.topic_partitions`` partitions), the control topic and
    the dead-letter topic if they are missing; return the names created. Idempotent: an existing
    topic, or one another process creates at the same moment, is left as it is.

    Topics are created explicitly because broker-side auto-creation would give them the
    broker's default partition count, which decides how tenants spread over consumers. The
    control topic has one partition (one order for the whole control plane; its volume is tiny)
    and is kept forever: entities, credentials included, are rebuilt from it.
    """
    admin = confluent_kafka.admin.AdminClient(admin_config(settings, bootstrap))
    metadata = _metadata_or_raise(admin, bootstrap, timeout_s)
    specs = {
        settings.topic_events: NewTopic(settings.topic_events, num_partitions=settings.topic_partitions),
        settings.topic_control: NewTopic(
            settings.topic_control, num_partitions=1, config={"retention.ms": "-1", "retention.bytes": "-1"}
        ),
        settings.topic_dead_letter: NewTopic(
            settings.topic_dead_letter, num_partitions=settings.topic_partitions
        ),
    }
    missing = [name for name in specs if name not in metadata.topics]
    if not missing:
        return []
    futures = admin.create_topics(
        [specs[name] for name in missing],
        request_timeout=timeout_s,
        operation_timeout=timeout_s,
    )
    created: list[str] = []
    for name, future in futures.items():
        try:
            future.result(timeout=timeout_s)
            created.append(name)
            log.info("created topic %s with %d partition(s)", name, specs[name].num_partitions)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise
    return created


def _metadata_or_raise(admin: confluent_kafka.admin.AdminClient, bootstrap: str, timeout_s: float) -> Any:
    try:
        return admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise KafkaUnavailable(
            f"no Kafka broker answered at {bootstrap} within {timeout_s:g} s ({exc.args[0]}). "
            "Start the local one with `make kafka-up` (or everything with `make run`), "
            "or point KAFKA_BOOTSTRAP_SERVERS at a running cluster."
        ) from exc
