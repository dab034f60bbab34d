"""The Kafka producer (the ``[kafka]`` extra): validated events into Kafka, batched per tenant.

For services inside the cluster that may write the usage topic. ``pip install
'usage-metering-client[kafka]'`` adds confluent-kafka; the server's ``ingest.sdk.UsageProducer``
is this class configured from the server's settings. ``metering_client.kafka.KafkaTransport``
puts it behind the client's interface (``connect("kafka://…")``).

Usage::

    with KafkaProducer("broker:9092") as producer:
        producer.emit(new_event("ci.step.cpu", {...}, tenant="acme", source="runner-7"), "acme")
    # leaving the block flushes; undelivered events raise DeliveryError listing their ids

Guarantees, and where they come from:

- **Nothing invalid is sent.** ``emit`` validates with the event models and the time window
  (``metering_client.prepare.prepare_event``) and raises ``InvalidEvent`` before anything is
  queued.
- **Nothing is lost silently.** Every Kafka message is tracked until the broker acknowledges it
  (``acks=all``). ``flush()``/``close()`` raise ``DeliveryError`` with the ids of every event whose
  message failed or was not acknowledged in time; ``send_batch`` raises it for its own events.
  A failed event may still have reached Kafka (an ack lost on the way back): retrying is safe
  because the pipeline deduplicates by ``(tenant, id)``.
- **One tenant's events stay in emission order.** They are cut into batches in order, one tenant
  per batch, keyed by tenant (one partition), produced under one lock, and the idempotent
  producer keeps order across its own retries.

The wire format (the server's ``schemas/wire.py``): one Kafka message is a JSON array of one
tenant's CloudEvents, each with its ``tenant``, keyed by the tenant, with the headers
``content-type: application/cloudevents-batch+json`` and ``metering-backfill: 1`` for backfills;
its timestamp is the instant the events were judged by. The pure parts (``Batcher``, ``pack``)
are separate from the Kafka I/O so they can be tested without a broker.
"""

from __future__ import annotations

import logging
import threading
import time as _time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

import confluent_kafka
from confluent_kafka import KafkaError

from metering_client.events import Event, Plane
from metering_client.prepare import IngestError, InvalidEvent, encoded_json, prepare_event
from metering_client.validation import RejectCode, kafka_time, now_ms

log = logging.getLogger(__name__)

# ---- the wire format and the producer's guarantees (the server's schemas/wire.py and
# ingest/kafka_config.py say the same; tests/unit/test_client_kafka.py checks they agree) -------
DEFAULT_TOPIC_EVENTS = "metering.events"
DEFAULT_TOPIC_CONTROL = "metering.events.control"
CONTENT_TYPE_BATCH = "application/cloudevents-batch+json"
HEADER_CONTENT_TYPE = "content-type"
HEADER_BACKFILL = "metering-backfill"
#: Kafka's default max message size is 1 MiB; stay under it with room for headers.
MAX_MESSAGE_BYTES = 900 * 1024
PRODUCER_MESSAGE_MAX_BYTES = MAX_MESSAGE_BYTES + 64 * 1024
DEFAULT_DELIVERY_TIMEOUT_S = 120.0
DEFAULT_LINGER_MS = 5


def batch_headers(backfill: bool = False) -> list[tuple[str, bytes]]:
    headers = [(HEADER_CONTENT_TYPE, CONTENT_TYPE_BATCH.encode())]
    if backfill:
        headers.append((HEADER_BACKFILL, b"1"))
    return headers


def producer_config(
    bootstrap: str,
    *,
    client_config: Mapping[str, Any] | None = None,
    delivery_timeout_s: float = DEFAULT_DELIVERY_TIMEOUT_S,
    linger_ms: int = DEFAULT_LINGER_MS,
) -> dict[str, Any]:
    """librdkafka configuration with the delivery guarantees no caller may weaken: idempotence
    (no duplicates or reordering from librdkafka's own retries), ``acks=all``, and a bounded
    delivery timeout after which a message is reported failed instead of retried forever.
    ``client_config``: connection settings (``bootstrap.servers``, SASL/SSL…)."""
    conf = dict(client_config or {"bootstrap.servers": bootstrap})
    conf.update(
        {
            "enable.idempotence": True,
            "acks": "all",
            "max.in.flight.requests.per.connection": 5,
            "compression.type": "lz4",
            "linger.ms": linger_ms,
            "message.max.bytes": PRODUCER_MESSAGE_MAX_BYTES,
            "batch.size": PRODUCER_MESSAGE_MAX_BYTES,
            "delivery.timeout.ms": max(1, int(delivery_timeout_s * 1000)),
            "client.id": "metering-client",
        }
    )
    return conf


DEFAULT_MAX_BATCH_EVENTS = 500
DEFAULT_LINGER_S = 0.05

# ---- errors -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryFailure:
    event_ids: tuple[str, ...]
    reason: str


class DeliveryError(IngestError):
    """Events that Kafka did not acknowledge (failed, or not acknowledged within the timeout)."""

    def __init__(self, failures: Iterable[DeliveryFailure]) -> None:
        self.failures = list(failures)
        reasons = sorted({f.reason for f in self.failures})
        ids = self.failed_ids
        shown = ", ".join(ids[:10]) + (f" … (+{len(ids) - 10})" if len(ids) > 10 else "")
        super().__init__(f"{len(ids)} event(s) not delivered ({'; '.join(reasons)}): {shown}")

    @property
    def failed_ids(self) -> list[str]:
        return [i for f in self.failures for i in f.event_ids]


class ProducerClosed(IngestError):
    """``emit``/``send_batch`` after ``close()``."""


def encoded_size(event: Mapping[str, Any]) -> int:
    """Bytes ``event`` takes inside a batch (compact JSON)."""
    return len(encoded_json(event))


# ---- batching (pure) --------------------------------------------------------------------------


@dataclass
class Batch:
    """The events of one Kafka message: one tenant, one backfill flag, emission order."""

    tenant: str
    backfill: bool
    opened_at: float
    events: list[dict[str, Any]] = field(default_factory=list)
    size: int = 2  # bytes of the encoded JSON array: "[" + events joined by "," + "]"
    #: The instant (Unix ms) every event of the batch was judged by (time window); sent as the
    #: Kafka message timestamp, which the aggregator judges by: one decision, not two.
    judged_at_ms: int | None = None

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(str(e.get("id")) for e in self.events)

    def encode(self) -> bytes:
        return encoded_json(self.events)


class Batcher:
    """Groups events into per-tenant batches of at most ``max_events`` events and ``max_bytes``
    encoded bytes. Not thread-safe: the producer serializes access.

    At most one batch per tenant is open; a batch is cut when the next event would not fit, when
    it is full, when the backfill flag or the judging instant changes (both are per message), or
    when it has waited ``linger_s``. Batches come out in the order they were cut, so one tenant's events keep
    their order.
    """

    def __init__(
        self,
        max_events: int = DEFAULT_MAX_BATCH_EVENTS,
        max_bytes: int = MAX_MESSAGE_BYTES,
        linger_s: float = DEFAULT_LINGER_S,
    ) -> None:
        if max_events < 1 or max_bytes < 3:
            raise ValueError("a batch must hold at least one event")
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.linger_s = linger_s
        self._open: dict[str, Batch] = {}

    def fits_alone(self, event_bytes: int) -> bool:
        return 2 + event_bytes <= self.max_bytes

    def add(
        self,
        tenant: str,
        event: dict[str, Any],
        event_bytes: int,
        *,
        backfill: bool,
        now: float,
        judged_at_ms: int | None = None,
    ) -> list[Batch]:
        """Queue ``event``; return the batches this closed (possibly including the new event's)."""
        if not self.fits_alone(event_bytes):
            raise ValueError(f"an event of {event_bytes} bytes exceeds the batch limit {self.max_bytes}")
        closed: list[Batch] = []
        batch = self._open.get(tenant)
        if batch is not None and (
            batch.backfill != backfill
            or batch.judged_at_ms != judged_at_ms
            or len(batch.events) >= self.max_events
            or batch.size + 1 + event_bytes > self.max_bytes
        ):
            closed.append(self._open.pop(tenant))
            batch = None
        if batch is None:
            batch = self._open[tenant] = Batch(
                tenant=tenant, backfill=backfill, opened_at=now, judged_at_ms=judged_at_ms
            )
        batch.size += event_bytes + (1 if batch.events else 0)
        batch.events.append(event)
        if len(batch.events) >= self.max_events:
            closed.append(self._open.pop(tenant))
        return closed

    def due(self, now: float) -> list[Batch]:
        """Batches open for ``linger_s`` or longer, removed from the batcher."""
        ready = [t for t, b in self._open.items() if now - b.opened_at >= self.linger_s]
        return [self._open.pop(t) for t in ready]

    def judging_instant(self, tenant: str, backfill: bool) -> int | None:
        """The judging instant of ``tenant``'s open batch (None if none is open): an event judged
        by it joins that batch instead of cutting a new one."""
        batch = self._open.get(tenant)
        return batch.judged_at_ms if batch is not None and batch.backfill == backfill else None

    def take(self, tenant: str) -> list[Batch]:
        batch = self._open.pop(tenant, None)
        return [batch] if batch is not None else []

    def drain(self) -> list[Batch]:
        out = list(self._open.values())
        self._open.clear()
        return out

    @property
    def pending_events(self) -> int:
        return sum(len(b.events) for b in self._open.values())


def pack(
    events: Iterable[dict[str, Any]],
    tenant: str,
    *,
    backfill: bool = False,
    max_events: int = DEFAULT_MAX_BATCH_EVENTS,
    max_bytes: int = MAX_MESSAGE_BYTES,
    judged_at_ms: int | None = None,
    sizes: Iterable[int] | None = None,
) -> list[Batch]:
    """Cut prepared events of one tenant into as few batches as the limits allow, in order.
    ``sizes``: each event's ``encoded_size``, when the caller has them already."""
    batcher = Batcher(max_events=max_events, max_bytes=max_bytes, linger_s=float("inf"))
    out: list[Batch] = []
    events = list(events)
    for event, size in zip(events, sizes or map(encoded_size, events), strict=True):
        out.extend(batcher.add(tenant, event, size, backfill=backfill, now=0.0, judged_at_ms=judged_at_ms))
    out.extend(batcher.drain())
    return out


# ---- the producer (I/O) -----------------------------------------------------------------------


class KafkaProducerLike(Protocol):
    """The part of ``confluent_kafka.Producer`` the SDK uses (a fake in unit tests)."""

    def produce(
        self, topic: str, *, value: bytes, key: bytes, headers: Any, on_delivery: Any, timestamp: int = 0
    ) -> None: ...

    def poll(self, timeout: float) -> int: ...

    def flush(self, timeout: float) -> int: ...


class _Waiter:
    """Delivery outcome of the messages of one ``send_batch``/``submit_batch`` call; ``future``
    (``submit_batch``) is resolved once every message is acknowledged or failed."""

    def __init__(self, future: Future[None] | None = None) -> None:
        self.pending: dict[int, tuple[str, ...]] = {}
        self.failures: list[DeliveryFailure] = []
        self.cond = threading.Condition()
        self.future = future
        self.sealed = False  # every message of the call was handed to librdkafka

    def expect(self, token: int, ids: tuple[str, ...]) -> None:
        with self.cond:
            self.pending[token] = ids

    def done(self, token: int, ids: tuple[str, ...], reason: str | None) -> None:
        with self.cond:
            self.pending.pop(token, None)
            if reason is not None:
                self.failures.append(DeliveryFailure(ids, reason))
            self.cond.notify_all()
        self._resolve()

    def seal(self) -> None:
        with self.cond:
            self.sealed = True
        self._resolve()

    def _resolve(self) -> None:
        with self.cond:
            if self.future is None or not self.sealed or self.pending or self.future.done():
                return
            failures = list(self.failures)
        try:
            if failures:
                self.future.set_exception(DeliveryError(failures))
            else:
                self.future.set_result(None)
        except InvalidStateError:  # resolved by a concurrent callback, or cancelled by the caller
            pass


@dataclass
class ProducerStats:
    queued_events: int = 0  # accepted by emit/send_batch
    delivered_events: int = 0  # acknowledged by Kafka
    failed_events: int = 0
    messages: int = 0  # Kafka messages produced


class KafkaProducer:
    """Idempotent, ``acks=all`` producer of events, batched per tenant (see the module doc).

    ``plane`` says which events it sends and where: usage events to the usage topic (the
    default), or, for administrators, lifecycle events to the control topic; an event of the
    other plane raises ``InvalidEvent`` (``forbidden_event_type``).

    ``emit`` queues asynchronously (batched, sent after ``linger_s`` or when a batch is full);
    ``send_batch``/``emit_and_wait`` block until Kafka acknowledged their events (the HTTP path).
    Thread-safe. ``config``: the librdkafka configuration (default: ``producer_config`` for
    ``bootstrap``); ``producer`` replaces the Kafka client (unit tests).
    """

    def __init__(
        self,
        bootstrap: str,
        *,
        config: Mapping[str, Any] | None = None,
        topic: str | None = None,
        plane: Plane = Plane.USAGE,
        max_batch_events: int = DEFAULT_MAX_BATCH_EVENTS,
        max_batch_bytes: int = MAX_MESSAGE_BYTES,
        linger_s: float = DEFAULT_LINGER_S,
        delivery_timeout_s: float = DEFAULT_DELIVERY_TIMEOUT_S,
        config_overrides: Mapping[str, Any] | None = None,
        producer: KafkaProducerLike | None = None,
        clock: Callable[[], float] = _time.monotonic,
    ) -> None:
        self.plane = plane
        self.topic = topic or (DEFAULT_TOPIC_CONTROL if plane is Plane.CONTROL else DEFAULT_TOPIC_EVENTS)
        self.delivery_timeout_s = delivery_timeout_s
        self._clock = clock
        self._batcher = Batcher(max_events=max_batch_events, max_bytes=max_batch_bytes, linger_s=linger_s)
        if producer is None:
            conf = dict(config or producer_config(bootstrap, delivery_timeout_s=delivery_timeout_s))
            conf["error_cb"] = self._on_error
            conf.update(config_overrides or {})
            # Looked up at call time (not imported by name) so test guards can intercept it.
            producer = confluent_kafka.Producer(conf)
        self._producer: KafkaProducerLike = producer
        # _produce_lock makes "cut batches + produce them" atomic, so batches of one tenant reach
        # librdkafka in the order they were cut. Delivery callbacks only take _state_lock, so
        # serving callbacks while holding _produce_lock (on BufferError) cannot deadlock.
        self._produce_lock = threading.RLock()
        self._state_lock = threading.Lock()
        self._failures: list[DeliveryFailure] = []
        self._inflight: dict[int, tuple[str, ...]] = {}
        self._next_token = 0
        self._fatal: str | None = None
        self._last_error: str | None = None
        self.stats = ProducerStats()
        self._closed = threading.Event()
        self._tick = min(max(linger_s / 2, 0.005), 0.1)
        self._thread = threading.Thread(target=self._run, name="usage-producer-linger", daemon=True)
        self._thread.start()

    # -- public API --

    def emit(self, event: Event | Mapping[str, Any], tenant: str, *, backfill: bool = False) -> str:
        """Validate and queue one event; return its id. Raises ``InvalidEvent`` (nothing queued).
        Delivery is reported by ``flush()``/``close()``."""
        self._check_open()
        with self._produce_lock:
            # Judged by the open batch's instant when there is one, so the event can join it:
            # every event of a message is judged by the message's timestamp.
            judged = self._batcher.judging_instant(tenant, backfill) or now_ms()
        prepared = prepare_event(
            event, tenant, backfill=backfill, received_at=kafka_time(judged), plane=self.plane
        )
        size = self._checked_size(prepared)
        with self._produce_lock:
            closed = self._batcher.add(
                tenant, prepared, size, backfill=backfill, now=self._clock(), judged_at_ms=judged
            )
            with self._state_lock:
                self.stats.queued_events += 1
            for batch in closed:
                self._produce(batch, None)
        return str(prepared["id"])

    def send_batch(
        self,
        events: Iterable[Event | Mapping[str, Any]],
        tenant: str,
        *,
        backfill: bool = False,
        timeout: float | None = None,
        validated: bool = False,
        judged_at_ms: int | None = None,
    ) -> None:
        """Send ``events`` of ``tenant`` and block until Kafka acknowledged all of them.

        Validates every event first and raises ``InvalidEvent`` before anything is sent.
        ``validated=True`` skips that for dicts already returned by ``prepare_event``; then
        ``judged_at_ms`` must be the instant they were judged by (``kafka_time(judged_at_ms)``
        given as ``received_at``): it becomes the messages' Kafka timestamp, which the aggregator
        judges the time window by, so an event accepted here is never rejected there.
        Raises ``DeliveryError`` if any message failed or was not acknowledged within ``timeout``
        (default: the delivery timeout plus a margin) — the caller must then report failure
        (the HTTP path answers 503); the events may still arrive, which is safe to retry.
        """
        waiter = self._submit(
            events, tenant, _Waiter(), backfill=backfill, validated=validated, judged_at_ms=judged_at_ms
        )
        self._wait(waiter, self.delivery_timeout_s + 5.0 if timeout is None else timeout)

    def submit_batch(
        self,
        events: Iterable[Event | Mapping[str, Any]],
        tenant: str,
        *,
        backfill: bool = False,
        validated: bool = False,
        judged_at_ms: int | None = None,
    ) -> Future[None]:
        """``send_batch`` without blocking: the events are handed to librdkafka (or
        ``InvalidEvent`` is raised, nothing sent) and the returned future is resolved once Kafka
        acknowledged every one of them, or fails with ``DeliveryError`` (librdkafka gives up after
        the delivery timeout). An async caller awaits it (``asyncio.wrap_future``) instead of
        holding a thread, bounding the wait itself; not acknowledged in time is a failure."""
        future: Future[None] = Future()
        waiter = self._submit(
            events, tenant, _Waiter(future), backfill=backfill, validated=validated, judged_at_ms=judged_at_ms
        )
        waiter.seal()
        return future

    def _submit(
        self,
        events: Iterable[Event | Mapping[str, Any]],
        tenant: str,
        waiter: _Waiter,
        *,
        backfill: bool,
        validated: bool,
        judged_at_ms: int | None,
    ) -> _Waiter:
        """Validate (unless ``validated``), cut and produce ``events``, tracked by ``waiter``."""
        self._check_open()
        if validated:
            if judged_at_ms is None:
                raise ValueError("validated events need the instant they were judged by (judged_at_ms)")
            # (type() first: an isinstance check against the Mapping ABC costs more than the copy)
            prepared = [
                e.copy()
                if type(e) is dict
                else dict(e)
                if isinstance(e, Mapping)
                else e.model_dump(mode="json")
                for e in events
            ]
        else:
            judged_at_ms = now_ms()
            received = kafka_time(judged_at_ms)
            prepared = [
                prepare_event(e, tenant, backfill=backfill, received_at=received, plane=self.plane)
                for e in events
            ]
        sizes = [self._checked_size(event) for event in prepared]
        if not prepared:
            return waiter
        batches = pack(
            prepared,
            tenant,
            backfill=backfill,
            max_events=self._batcher.max_events,
            max_bytes=self._batcher.max_bytes,
            judged_at_ms=judged_at_ms,
            sizes=sizes,
        )
        with self._produce_lock:
            # Earlier emit()s of this tenant go first: per-tenant order is emission order.
            for earlier in self._batcher.take(tenant):
                self._produce(earlier, None)
            with self._state_lock:
                self.stats.queued_events += len(prepared)
            for batch in batches:
                self._produce(batch, waiter)
        return waiter

    def emit_and_wait(
        self,
        event: Event | Mapping[str, Any],
        tenant: str,
        *,
        backfill: bool = False,
        timeout: float | None = None,
    ) -> None:
        self.send_batch([event], tenant, backfill=backfill, timeout=timeout)

    def flush(self, timeout: float | None = None) -> None:
        """Send every queued event and wait for Kafka's acknowledgements. Raises
        ``DeliveryError`` with the ids of events that failed since the last flush or are still
        unacknowledged after ``timeout`` (default: the delivery timeout plus a margin)."""
        with self._produce_lock:
            for batch in self._batcher.drain():
                self._produce(batch, None)
        wait = self.delivery_timeout_s + 5.0 if timeout is None else timeout
        self._producer.flush(wait)
        with self._state_lock:
            failures, self._failures = self._failures, []
            stuck = list(self._inflight.values())
        if stuck:
            failures.extend(DeliveryFailure(ids, f"not acknowledged within {wait:g} s") for ids in stuck)
        if failures:
            raise DeliveryError(failures)

    def close(self, timeout: float | None = None) -> None:
        """Flush (raising ``DeliveryError`` like ``flush``) and stop. Idempotent."""
        if self._closed.is_set():
            return
        try:
            self.flush(timeout)
        finally:
            self._closed.set()
            self._thread.join(timeout=5.0)

    def __enter__(self) -> KafkaProducer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
            return
        try:  # still deliver what was queued, but never hide the exception already on its way
            self.close()
        except DeliveryError as failed:
            log.error("while handling %s: %s", type(exc).__name__, failed)

    @property
    def pending(self) -> int:
        """Events queued or in flight, not yet acknowledged."""
        with self._produce_lock:
            queued = self._batcher.pending_events
        with self._state_lock:
            inflight = sum(len(ids) for ids in self._inflight.values())
        return inflight + queued

    @property
    def last_error(self) -> str | None:
        """The latest client-level error librdkafka reported (e.g. all brokers down)."""
        return self._fatal or self._last_error

    # -- internals --

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise ProducerClosed("the producer is closed")
        if self._fatal is not None:
            # A fatal idempotence error means librdkafka can no longer guarantee order or
            # no-duplicates for this producer instance; refuse rather than degrade silently.
            raise DeliveryError([DeliveryFailure((), f"producer failed fatally: {self._fatal}")])

    def _checked_size(self, event: Mapping[str, Any]) -> int:
        size = encoded_size(event)
        if not self._batcher.fits_alone(size):
            raise InvalidEvent(
                RejectCode.TOO_LARGE,
                f"the event takes {size} bytes; one Kafka message holds at most {self._batcher.max_bytes}",
                str(event.get("id")),
            )
        return size

    def _produce(self, batch: Batch, waiter: _Waiter | None) -> None:
        """Hand one batch to librdkafka. Caller holds ``_produce_lock``."""
        ids = batch.ids
        with self._state_lock:
            token = self._next_token
            self._next_token += 1
            self._inflight[token] = ids
            self.stats.messages += 1
        if waiter is not None:
            waiter.expect(token, ids)

        def on_delivery(err: KafkaError | None, _msg: Any) -> None:
            self._on_delivery(token, ids, err, waiter)

        value = batch.encode()
        headers = batch_headers(batch.backfill)
        while True:
            try:
                self._producer.produce(
                    self.topic,
                    value=value,
                    key=batch.tenant.encode(),
                    headers=headers,
                    on_delivery=on_delivery,
                    # 0 lets librdkafka stamp it (only batches built without a judging instant)
                    timestamp=batch.judged_at_ms or 0,
                )
                return
            except BufferError:
                # librdkafka's local queue is full: serve delivery reports to make room.
                self._producer.poll(0.1)
            except Exception as exc:
                self._on_delivery(token, ids, str(exc), waiter)
                return

    def _on_delivery(
        self, token: int, ids: tuple[str, ...], err: KafkaError | str | None, waiter: _Waiter | None
    ) -> None:
        reason = None if err is None else (err if isinstance(err, str) else f"{err.name()}: {err.str()}")
        with self._state_lock:
            if self._inflight.pop(token, None) is None:
                return
            if reason is None:
                self.stats.delivered_events += len(ids)
            else:
                self.stats.failed_events += len(ids)
                if waiter is None:
                    self._failures.append(DeliveryFailure(ids, reason))
        if reason is not None:
            log.warning("%d event(s) not delivered to %s: %s", len(ids), self.topic, reason)
        if waiter is not None:
            waiter.done(token, ids, reason)

    def _on_error(self, err: KafkaError) -> None:
        text = f"{err.name()}: {err.str()}"
        if err.fatal():
            self._fatal = text
            log.error("Kafka producer fatal error: %s", text)
        elif text != self._last_error:
            log.warning("Kafka producer error: %s", text)
        self._last_error = text

    def _wait(self, waiter: _Waiter, timeout: float) -> None:
        deadline = _time.monotonic() + timeout
        while True:
            with waiter.cond:
                if not waiter.pending:
                    break
            left = deadline - _time.monotonic()
            if left <= 0:
                break
            # Serve delivery callbacks here too, so waiting never depends on the linger thread;
            # but wake on the waiter, not in poll(): a callback served by another thread's poll
            # (the linger thread's) would leave this one sleeping in poll() until its timeout.
            self._producer.poll(0)
            with waiter.cond:
                if waiter.pending:
                    waiter.cond.wait(min(left, 0.01))
        with waiter.cond:
            failures = list(waiter.failures)
            failures.extend(
                DeliveryFailure(ids, f"not acknowledged within {timeout:g} s")
                for ids in waiter.pending.values()
            )
        if failures:
            raise DeliveryError(failures)

    def _run(self) -> None:
        """Linger thread: send batches that waited ``linger_s``; serve delivery callbacks."""
        while not self._closed.is_set():
            started = _time.monotonic()
            served = 0
            try:
                with self._produce_lock:
                    for batch in self._batcher.due(self._clock()):
                        self._produce(batch, None)
                # Blocks until a delivery report arrives (served at once: a send_batch or
                # submit_batch caller wakes as soon as its messages are acknowledged) or a tick.
                served = self._producer.poll(self._tick)
            except Exception:  # pragma: no cover - keep the thread alive, report
                log.exception("usage producer background loop")
            rest = self._tick - (_time.monotonic() - started)
            if not served and rest > 0:  # a client whose poll() does not block (a test double)
                self._closed.wait(rest)
