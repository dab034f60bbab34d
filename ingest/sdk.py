"""The producer SDK of the server: the client's Kafka producer, configured from the settings.

The producer itself — validation, per-tenant batching, delivery tracking, its guarantees — is
``metering_client.kafka_producer.KafkaProducer`` in the client distribution (its ``[kafka]``
extra), so services and the server produce with one piece of code. ``UsageProducer`` is that
producer with the topics, the connection (SASL/SSL) and the librdkafka settings of this process's
``CommonSettings`` (``ingest.kafka_config.producer_config``). The names the server's modules and
tests import from here (``prepare_event``, ``Batcher``, ``DeliveryError``…) are re-exported.

Usage::

    with UsageProducer("127.0.0.1:9092") as producer:
        producer.emit(new_event("ci.step.cpu", {...}, tenant="acme", source="runner-7"), "acme")
    # leaving the block flushes; undelivered events raise DeliveryError listing their ids
"""

from __future__ import annotations

import time as _time
from collections.abc import Callable, Mapping
from typing import Any

from deploy.settings import CommonSettings
from ingest.kafka_config import DEFAULT_DELIVERY_TIMEOUT_S, producer_config
from metering_client.kafka_producer import DEFAULT_LINGER_S as DEFAULT_LINGER_S
from metering_client.kafka_producer import DEFAULT_MAX_BATCH_EVENTS as DEFAULT_MAX_BATCH_EVENTS
from metering_client.kafka_producer import Batch as Batch
from metering_client.kafka_producer import Batcher as Batcher
from metering_client.kafka_producer import DeliveryError as DeliveryError
from metering_client.kafka_producer import DeliveryFailure as DeliveryFailure
from metering_client.kafka_producer import KafkaProducer
from metering_client.kafka_producer import KafkaProducerLike as KafkaProducerLike
from metering_client.kafka_producer import ProducerClosed as ProducerClosed
from metering_client.kafka_producer import ProducerStats as ProducerStats
from metering_client.kafka_producer import encoded_size as encoded_size
from metering_client.kafka_producer import pack as pack
from metering_client.prepare import IngestError as IngestError
from metering_client.prepare import InvalidEvent as InvalidEvent
from metering_client.prepare import describe_validation_error as describe_validation_error
from metering_client.prepare import format_time as format_time
from metering_client.prepare import new_event as new_event
from metering_client.prepare import prepare_event as prepare_event
from schemas import wire
from schemas.events import Plane


class UsageProducer(KafkaProducer):
    """``KafkaProducer`` (idempotent, ``acks=all``, batched per tenant) configured from
    ``settings``: the usage topic, or the control topic for ``Plane.CONTROL``, unless ``topic``
    names one; the connection and guarantees of ``ingest.kafka_config.producer_config``."""

    def __init__(
        self,
        bootstrap: str,
        *,
        settings: CommonSettings | None = None,
        topic: str | None = None,
        plane: Plane = Plane.USAGE,
        max_batch_events: int = DEFAULT_MAX_BATCH_EVENTS,
        max_batch_bytes: int = wire.MAX_MESSAGE_BYTES,
        linger_s: float = DEFAULT_LINGER_S,
        delivery_timeout_s: float = DEFAULT_DELIVERY_TIMEOUT_S,
        config_overrides: Mapping[str, Any] | None = None,
        producer: KafkaProducerLike | None = None,
        clock: Callable[[], float] = _time.monotonic,
    ) -> None:
        settings = settings or CommonSettings()
        super().__init__(
            bootstrap,
            config=None
            if producer is not None
            else producer_config(settings, bootstrap, delivery_timeout_s=delivery_timeout_s),
            topic=topic or (settings.topic_control if plane is Plane.CONTROL else settings.topic_events),
            plane=plane,
            max_batch_events=max_batch_events,
            max_batch_bytes=max_batch_bytes,
            linger_s=linger_s,
            delivery_timeout_s=delivery_timeout_s,
            config_overrides=config_overrides,
            producer=producer,
            clock=clock,
        )
