"""The Kafka transport: the same client, writing the usage topic instead of calling the ingest.

``KafkaTransport`` puts a Kafka producer behind ``transport.Transport``, so ``MeteringClient``
batches, retries and reports the same way over either. The producer is
``metering_client.kafka_producer.KafkaProducer`` (the ``[kafka]`` extra; idempotent, ``acks=all``,
batched per tenant), which the server uses too as ``ingest.sdk.UsageProducer``, or anything with
its ``send_batch``. Services inside the cluster use it; everyone else uses HTTP.

What the ingest decides for an HTTP request, this transport decides before producing, with the
same function (``prepare.prepare_event``): each event is judged by one instant, which becomes the
Kafka message timestamp the aggregator judges by, so an event reported ``accepted`` is counted.
Not judged here, as over Kafka anywhere: the API key's scope (docs/api.md, "Who may send what");
the tenant is named by the caller, not by a key.

``connect(url, …)`` chooses the transport from configuration: ``http(s)://…`` (with an API key)
or ``kafka://host:9092[,host2:9092][?topic=…]`` (with a tenant; this needs the ``[kafka]``
extra, confluent-kafka, imported only then).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from metering_client.client import MeteringClient
from metering_client.prepare import InvalidEvent, prepare_event
from metering_client.results import EventResult, Status
from metering_client.transport import HttpTransport, Outcome, Transport
from metering_client.validation import kafka_time, now_ms

#: What one Kafka message of the SDK holds (``ingest.sdk``'s defaults): events, JSON bytes.
KAFKA_MAX_EVENTS = 500
KAFKA_MAX_MESSAGE_BYTES = 900 * 1024


class BatchSender(Protocol):
    """The part of ``kafka_producer.KafkaProducer`` this transport uses."""

    def send_batch(
        self,
        events: Iterable[Mapping[str, Any]],
        tenant: str,
        *,
        timeout: float | None = None,
        validated: bool = False,
        judged_at_ms: int | None = None,
    ) -> None: ...

    def close(self, timeout: float | None = None) -> None: ...


class KafkaTransport:
    """Sends each batch with ``producer.send_batch`` for ``tenant`` and waits for Kafka's
    acknowledgement; a batch Kafka did not acknowledge is sent again by the client (same ids:
    counted once). ``close()`` closes the producer when ``own_producer``."""

    def __init__(
        self,
        producer: BatchSender,
        tenant: str,
        *,
        timeout: float | None = None,
        own_producer: bool = True,
        max_events: int = KAFKA_MAX_EVENTS,
        max_body_bytes: int = KAFKA_MAX_MESSAGE_BYTES,
    ) -> None:
        if not tenant:
            raise ValueError("the Kafka transport needs the tenant the events belong to")
        self.producer = producer
        self.tenant = tenant
        self.timeout = timeout
        self.own_producer = own_producer
        self.max_events = max_events
        self.max_body_bytes = max_body_bytes

    def send(self, events: Sequence[Mapping[str, Any]]) -> Outcome:
        judged_at_ms = now_ms()
        received_at = kafka_time(judged_at_ms)
        results: list[EventResult] = []
        ready: list[dict[str, Any]] = []
        for event in events:
            event_id = str(event.get("id"))
            try:
                ready.append(prepare_event(event, self.tenant, received_at=received_at))
            except InvalidEvent as exc:
                results.append(EventResult(event_id, Status.REJECTED, exc.code, exc.message))
                continue
            results.append(EventResult(event_id, Status.ACCEPTED))
        if ready:
            try:
                self.producer.send_batch(
                    ready, self.tenant, timeout=self.timeout, validated=True, judged_at_ms=judged_at_ms
                )
            except Exception as exc:  # DeliveryError: not acknowledged; safe to send again
                return Outcome.again(f"Kafka did not acknowledge the batch: {exc}")
        return Outcome(results=results)

    def close(self) -> None:
        if self.own_producer:
            self.producer.close()


def connect(
    url: str,
    *,
    api_key: str | None = None,
    tenant: str | None = None,
    **client_options: Any,
) -> MeteringClient:
    """A ``MeteringClient`` whose transport ``url`` chooses (see the module doc): configuration,
    not code, decides between HTTP and Kafka. ``client_options`` go to ``MeteringClient``."""
    scheme = urlsplit(url).scheme.lower()
    transport: Transport
    if scheme in ("http", "https"):
        if not api_key:
            raise ValueError("the HTTP transport needs an API key")
        transport = HttpTransport(url, api_key)
    elif scheme == "kafka":
        if not tenant:
            raise ValueError("the Kafka transport needs the tenant the events belong to")
        parts = urlsplit(url)
        topic = parse_qs(parts.query).get("topic", [None])[0]
        try:  # confluent-kafka comes with the [kafka] extra only
            kafka_producer = importlib.import_module("metering_client.kafka_producer")
        except ImportError as exc:
            raise ImportError(
                "the Kafka transport needs the [kafka] extra: pip install 'usage-metering-client[kafka]'"
            ) from exc
        producer = kafka_producer.KafkaProducer(parts.netloc, topic=topic)
        transport = KafkaTransport(producer, tenant)
    else:
        raise ValueError(f"unknown transport {scheme!r}: use http(s)://host[:port] or kafka://host:port")
    return MeteringClient(transport=transport, **client_options)
