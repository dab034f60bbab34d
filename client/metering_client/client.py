"""``MeteringClient`` and ``AsyncMeteringClient``: usage events to the ingest, batched, retried.

What ``emit`` does, in order, and what each step guarantees:

1. **Validate** with the server's own models (``prepare.check_event``): an invalid event, a
   lifecycle event or one larger than the ingest takes raises ``InvalidEvent`` at once, with the
   ingest's code; nothing is queued.
2. **Fix the id.** The event is queued as the exact dict that will be sent, id included (a UUID
   unless the caller gave one), and every retry sends that dict again: the pipeline counts an id
   once per tenant, so a retry is never counted twice.
3. **Queue** in a bounded in-memory queue (``max_queue`` events). When it is full, ``policy``
   decides: ``BLOCK`` waits for room (up to ``block_timeout_s``, then ``QueueFull``),
   ``DROP_OLDEST`` drops the oldest queued event and reports it (code ``queue_full``),
   ``RAISE`` raises ``QueueFull`` and queues nothing.

One background worker (a thread, or an asyncio task) then sends the queue in order, one request
at a time: a batch is cut when it is full (the ingest's limits: 100 events, 1 MiB of JSON), when
its oldest event has waited ``linger_s``, or at ``flush()``/``close()``. A request answered 429
(after its ``Retry-After``), 5xx, or lost to a connection error is sent again, identical, with
exponential backoff and jitter (``retry.Backoff``), for up to ``max_retry_s``; after that its
events are reported ``delivery_failed``. Each event's answer is recorded: delivered, or not with
its code, reported to ``on_failure`` as it happens and raised by ``flush()``/``close()`` as
``DeliveryFailed``. Nothing is dropped without a result. ``metrics`` counts all of it.

While a request is being retried, the events behind it wait (and the queue fills up): events go
in emission order, and a service sees one backlog, not a reordering.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import random
import threading
import time as _time
import uuid
import weakref
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from types import TracebackType
from typing import Any

from metering_client.events import Event, EventType
from metering_client.helpers import UsageHelpers, When
from metering_client.prepare import InvalidEvent, check_event, encoded_json, format_time
from metering_client.results import (
    ClientClosed,
    ClientCode,
    ClientMetrics,
    DeliveryFailed,
    EventResult,
    QueueFull,
    Status,
)
from metering_client.retry import Backoff
from metering_client.transport import (
    MAX_EVENT_BYTES,
    AsyncHttpTransport,
    AsyncTransport,
    HttpTransport,
    Outcome,
    Transport,
)
from metering_client.validation import RejectCode

log = logging.getLogger("metering_client")

DEFAULT_LINGER_S = 0.05
DEFAULT_MAX_QUEUE = 10_000
DEFAULT_BLOCK_TIMEOUT_S = 10.0
#: Failures kept for ``flush()`` to raise; beyond that they are counted (``DeliveryFailed.omitted``)
#: and still reach ``on_failure`` and ``metrics``.
MAX_KEPT_FAILURES = 10_000
#: At interpreter exit, how long each client still open may take to send its queue.
EXIT_TIMEOUT_S = 10.0


class QueuePolicy(StrEnum):
    """What ``emit`` does when the queue is full."""

    BLOCK = "block"
    DROP_OLDEST = "drop_oldest"
    RAISE = "raise"


@dataclass
class _Pending:
    event: dict[str, Any]
    size: int
    queued_at: float


# ---- pure parts -------------------------------------------------------------------------------


def take_batch(queue: deque[_Pending], max_events: int, max_body_bytes: int) -> list[_Pending]:
    """Remove and return the longest prefix of ``queue`` that fits one request: at most
    ``max_events`` events and ``max_body_bytes`` as a JSON array ("[" + events joined by "," + "]").
    Takes at least one event (each is checked to fit alone when it is queued)."""
    batch: list[_Pending] = []
    size = 2
    while queue and len(batch) < max_events:
        nxt = queue[0]
        grown = size + nxt.size + (1 if batch else 0)
        if batch and grown > max_body_bytes:
            break
        batch.append(queue.popleft())
        size = grown
    return batch


def build_usage_event(
    type: EventType | str,
    data: Mapping[str, Any],
    *,
    source: str,
    time: When = None,
    id: str | None = None,
    tenant: str | None = None,
) -> dict[str, Any]:
    """A CloudEvent dict without a tenant (over HTTP the API key names it): a UUID as its id
    unless ``id`` is given, now as its time unless ``time`` is given."""
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": id or str(uuid.uuid4()),
        "source": source,
        "type": str(type),
        "time": time if isinstance(time, str) else format_time(time or datetime.now(UTC)),
        "data": dict(data),
    }
    if tenant is not None:
        event["tenant"] = tenant
    return event


class _Ledger:
    """Counters and failures of one client; thread-safe, no I/O (callbacks aside)."""

    def __init__(self, on_failure: Callable[[EventResult], None] | None) -> None:
        self._lock = threading.Lock()
        self._on_failure = on_failure
        self.sent = 0
        self.duplicates = 0
        self.rejected: Counter[str] = Counter()
        self.retried = 0
        self.requests = 0
        self._failures: list[EventResult] = []
        self._omitted = 0

    def record(self, results: list[EventResult]) -> None:
        failed = [r for r in results if not r.delivered]
        with self._lock:
            for r in results:
                if r.delivered:
                    self.sent += 1
                    self.duplicates += r.status is Status.DUPLICATE
                else:
                    self.rejected[r.code or r.status.value] += 1
            keep = max(0, MAX_KEPT_FAILURES - len(self._failures))
            self._failures.extend(failed[:keep])
            self._omitted += len(failed) - min(keep, len(failed))
        for r in failed:
            log.warning("event %s not delivered: %s %s", r.id, r.code, r.message or "")
            if self._on_failure is not None:
                try:
                    self._on_failure(r)
                except Exception:  # a failing callback must not stop the delivery of the rest
                    log.exception("on_failure callback raised")

    def count_invalid(self, code: str) -> None:
        with self._lock:
            self.rejected[code] += 1

    def count_request(self, retry: bool) -> None:
        with self._lock:
            self.requests += 1
            self.retried += retry

    def take_failures(self) -> DeliveryFailed | None:
        with self._lock:
            failures, omitted = self._failures, self._omitted
            self._failures, self._omitted = [], 0
        return DeliveryFailed(failures, omitted) if failures or omitted else None

    def snapshot(self, queued: int, in_flight: int) -> ClientMetrics:
        with self._lock:
            return ClientMetrics(
                sent=self.sent,
                duplicates=self.duplicates,
                rejected=dict(self.rejected),
                retried=self.retried,
                requests=self.requests,
                queued=queued,
                in_flight=in_flight,
            )


class _Base:
    """What the two clients share: configuration, validation, the ledger."""

    def __init__(
        self,
        *,
        source: str,
        linger_s: float,
        max_queue: int,
        policy: QueuePolicy | str,
        block_timeout_s: float | None,
        backoff: Backoff | None,
        on_failure: Callable[[EventResult], None] | None,
        max_event_bytes: int,
        rng: random.Random | None,
        clock: Callable[[], float],
    ) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self.source = source
        self.linger_s = linger_s
        self.max_queue = max_queue
        self.policy = QueuePolicy(policy)
        self.block_timeout_s = block_timeout_s
        self.backoff = backoff or Backoff()
        self.max_event_bytes = max_event_bytes
        self._ledger = _Ledger(on_failure)
        self._rng = rng or random.Random()
        self._clock = clock
        self._queue: deque[_Pending] = deque()
        self._queued_bytes = 0
        self._in_flight = 0
        self._closed = False

    def _prepare(self, event: Event | Mapping[str, Any], body_limit: int) -> _Pending:
        try:
            prepared = check_event(event)
            size = len(encoded_json(prepared))
            limit = min(self.max_event_bytes, body_limit - 2)
            if size > limit:
                raise InvalidEvent(
                    RejectCode.TOO_LARGE,
                    f"the event takes {size} bytes; at most {limit} are allowed",
                    str(prepared["id"]),
                )
        except InvalidEvent as exc:
            self._ledger.count_invalid(exc.code)
            raise
        return _Pending(prepared, size, self._clock())

    def _push(self, pending: _Pending) -> None:
        self._queue.append(pending)
        self._queued_bytes += pending.size

    def _pop_oldest(self) -> EventResult:
        dropped = self._queue.popleft()
        self._queued_bytes -= dropped.size
        return EventResult(
            str(dropped.event["id"]),
            Status.FAILED,
            ClientCode.QUEUE_FULL,
            f"dropped from the full queue ({self.max_queue} events)",
        )

    def _take(self, max_events: int, max_body_bytes: int) -> list[_Pending]:
        batch = take_batch(self._queue, max_events, max_body_bytes)
        self._queued_bytes -= sum(p.size for p in batch)
        self._in_flight = len(batch)
        return batch

    def _batch_ready(self, max_events: int, max_body_bytes: int) -> bool:
        return len(self._queue) >= max_events or self._queued_bytes + len(self._queue) + 1 >= max_body_bytes

    def _linger_left(self) -> float:
        return self._queue[0].queued_at + self.linger_s - self._clock() if self._queue else self.linger_s

    def _full_error(self) -> QueueFull:
        return QueueFull(f"the queue holds {self.max_queue} events (policy {self.policy.value})")

    def _gave_up(self, attempts: int, reason: str) -> Outcome:
        return Outcome(
            code=ClientCode.DELIVERY_FAILED,
            message=f"not delivered after {attempts} attempt(s) over {self.backoff.max_retry_s:g} s: {reason}",
        )

    def _unsent(self, pending: list[_Pending]) -> list[EventResult]:
        return [
            EventResult(
                str(p.event["id"]),
                Status.FAILED,
                ClientCode.CLIENT_CLOSED,
                "still queued when close() timed out",
            )
            for p in pending
        ]

    @property
    def metrics(self) -> ClientMetrics:
        """Counters since the client was made, and the queue now (a consistent snapshot)."""
        return self._ledger.snapshot(len(self._queue), self._in_flight)


# ---- the thread-based client ------------------------------------------------------------------


class MeteringClient(_Base, UsageHelpers[str]):
    """Sends usage events to ``POST {base_url}/api/v1/events`` with ``api_key`` (module doc).

    ``emit(event)`` (or a typed helper such as ``cpu = client.workstation_cpu(...)``) returns the
    event's id once it is queued. Thread-safe. ``transport`` replaces the HTTP transport (any
    ``Transport``: the Kafka one, a fake in tests); then ``base_url`` and ``api_key`` are unused.
    """

    def __init__(
        self,
        base_url: str = "",
        api_key: str = "",
        *,
        source: str = "metering-client",
        linger_s: float = DEFAULT_LINGER_S,
        max_queue: int = DEFAULT_MAX_QUEUE,
        policy: QueuePolicy | str = QueuePolicy.BLOCK,
        block_timeout_s: float | None = DEFAULT_BLOCK_TIMEOUT_S,
        backoff: Backoff | None = None,
        on_failure: Callable[[EventResult], None] | None = None,
        max_event_bytes: int = MAX_EVENT_BYTES,
        transport: Transport | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = _time.monotonic,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        super().__init__(
            source=source,
            linger_s=linger_s,
            max_queue=max_queue,
            policy=policy,
            block_timeout_s=block_timeout_s,
            backoff=backoff,
            on_failure=on_failure,
            max_event_bytes=max_event_bytes,
            rng=rng,
            clock=clock,
        )
        if transport is None:
            if not base_url or not api_key:
                raise ValueError("MeteringClient needs base_url and api_key (or a transport)")
            transport = HttpTransport(base_url, api_key)
        self.transport = transport
        self._cond = threading.Condition()
        self._flushing = 0
        self._stop_retrying = threading.Event()
        self._sleep = sleep
        self._worker = threading.Thread(target=self._run, name="metering-client", daemon=True)
        self._worker.start()
        _OPEN.add(self)

    # -- public API --

    def _emit_usage(self, type: EventType, data: Mapping[str, Any], time: When, id: str | None) -> str:
        return self.emit(build_usage_event(type, data, source=self.source, time=time, id=id))

    def emit(self, event: Event | Mapping[str, Any]) -> str:
        """Validate and queue ``event``; return its id. Raises ``InvalidEvent`` (nothing queued),
        ``QueueFull`` (policy ``RAISE``, or ``BLOCK`` past ``block_timeout_s``), ``ClientClosed``."""
        pending = self._prepare(event, self.transport.max_body_bytes)
        dropped: EventResult | None = None
        with self._cond:
            self._check_open()
            if len(self._queue) >= self.max_queue:
                if self.policy is QueuePolicy.RAISE:
                    raise self._full_error()
                if self.policy is QueuePolicy.DROP_OLDEST:
                    dropped = self._pop_oldest()
                else:
                    deadline = None if self.block_timeout_s is None else self._clock() + self.block_timeout_s
                    while len(self._queue) >= self.max_queue:
                        left = None if deadline is None else deadline - self._clock()
                        if left is not None and left <= 0:
                            raise self._full_error()
                        self._cond.wait(left)
                        self._check_open()
            self._push(pending)
            self._cond.notify_all()
        if dropped is not None:
            self._ledger.record([dropped])
        return str(pending.event["id"])

    def flush(self, timeout: float | None = None) -> None:
        """Send everything queued now, without lingering, and wait until each event has its
        answer. Raises ``DeliveryFailed`` with the events not delivered since the last flush, or
        ``TimeoutError`` if events are still queued or in flight after ``timeout`` seconds."""
        with self._cond:
            self._flushing += 1
            self._cond.notify_all()
            try:
                done = self._cond.wait_for(lambda: not self._queue and not self._in_flight, timeout)
            finally:
                self._flushing -= 1
        if not done:
            raise TimeoutError(
                f"flush: {len(self._queue) + self._in_flight} event(s) not answered in {timeout} s"
            )
        failed = self._ledger.take_failures()
        if failed is not None:
            raise failed

    def close(self, timeout: float | None = None) -> None:
        """Send what is queued (retrying as usual, for up to ``timeout`` seconds if given), stop
        the worker, and raise ``DeliveryFailed`` for every event not delivered since the last
        flush, those still queued at the timeout included (code ``client_closed``). Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout)
        if self._worker.is_alive():
            self._stop_retrying.set()  # the request being retried is given up
            self._worker.join()
        with self._cond:
            leftover = list(self._queue)
            self._queue.clear()
            self._queued_bytes = 0
        if leftover:
            self._ledger.record(self._unsent(leftover))
        _OPEN.discard(self)
        self.transport.close()
        failed = self._ledger.take_failures()
        if failed is not None:
            raise failed

    def __enter__(self) -> MeteringClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
            return
        try:  # deliver what was queued, but never hide the exception already on its way
            self.close()
        except DeliveryFailed as failed:
            log.error("while handling %s: %s", type(exc).__name__, failed)

    # -- the worker --

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosed("the client is closed")

    def _run(self) -> None:
        limits = (self.transport.max_events, self.transport.max_body_bytes)
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue or self._stop_retrying.is_set():
                    return  # closed and drained, or close() ran out of time (close reports the rest)
                # Linger: let a batch fill up, unless it is full or someone waits for it.
                while not (self._closed or self._flushing or self._batch_ready(*limits)):
                    left = self._linger_left()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch = self._take(*limits)
                self._cond.notify_all()  # room for emitters blocked on a full queue
            try:
                results = self._deliver([p.event for p in batch])
            except Exception as exc:  # pragma: no cover - a transport bug: report, never lose
                log.exception("metering client: sending a batch failed")
                results = Outcome(code=ClientCode.DELIVERY_FAILED, message=repr(exc)).final_results(
                    [str(p.event["id"]) for p in batch]
                )
            self._ledger.record(results)
            with self._cond:
                self._in_flight = 0
                self._cond.notify_all()

    def _deliver(self, events: list[dict[str, Any]]) -> list[EventResult]:
        ids = [str(e["id"]) for e in events]
        started = self._clock()
        attempt = 0
        while True:
            self._ledger.count_request(retry=attempt > 0)
            outcome = self.transport.send(events)
            if outcome.retry is None:
                return outcome.final_results(ids)
            attempt += 1
            left = self.backoff.max_retry_s - (self._clock() - started)
            if left <= 0 or self._stop_retrying.is_set():
                return self._gave_up(attempt, outcome.retry).final_results(ids)
            # the last attempt falls at the end of the budget, not before it
            delay = min(self.backoff.delay(attempt, outcome.retry_after, self._rng), left)
            log.info("metering client: %s; retrying %d event(s) in %.2f s", outcome.retry, len(ids), delay)
            if self._sleep is not None:
                self._sleep(delay)
            elif self._stop_retrying.wait(delay):
                return self._gave_up(attempt, outcome.retry).final_results(ids)


#: Thread-based clients not closed yet: closed at interpreter exit, so that a service that forgets
#: ``close()`` still sends its queue (the worker is a daemon thread, which exit would stop).
_OPEN: weakref.WeakSet[MeteringClient] = weakref.WeakSet()


@atexit.register
def close_open_clients(timeout: float = EXIT_TIMEOUT_S) -> None:
    """Close every ``MeteringClient`` still open, each given ``timeout`` seconds; what is not
    delivered is logged as an error (there is no caller left to raise to)."""
    for client in list(_OPEN):
        try:
            client.close(timeout)
        except DeliveryFailed as failed:
            log.error("at exit: %s", failed)


# ---- the asyncio client -----------------------------------------------------------------------


class AsyncMeteringClient(_Base, UsageHelpers[Coroutine[Any, Any, str]]):
    """The asyncio twin of ``MeteringClient``: ``await client.emit(event)``, ``await
    client.flush()``, ``await client.aclose()``, ``async with``. Its worker is a task of the
    running loop, started by the first ``emit``. Use it from one event loop."""

    def __init__(
        self,
        base_url: str = "",
        api_key: str = "",
        *,
        source: str = "metering-client",
        linger_s: float = DEFAULT_LINGER_S,
        max_queue: int = DEFAULT_MAX_QUEUE,
        policy: QueuePolicy | str = QueuePolicy.BLOCK,
        block_timeout_s: float | None = DEFAULT_BLOCK_TIMEOUT_S,
        backoff: Backoff | None = None,
        on_failure: Callable[[EventResult], None] | None = None,
        max_event_bytes: int = MAX_EVENT_BYTES,
        transport: AsyncTransport | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = _time.monotonic,
    ) -> None:
        super().__init__(
            source=source,
            linger_s=linger_s,
            max_queue=max_queue,
            policy=policy,
            block_timeout_s=block_timeout_s,
            backoff=backoff,
            on_failure=on_failure,
            max_event_bytes=max_event_bytes,
            rng=rng,
            clock=clock,
        )
        if transport is None:
            if not base_url or not api_key:
                raise ValueError("AsyncMeteringClient needs base_url and api_key (or a transport)")
            transport = AsyncHttpTransport(base_url, api_key)
        self.transport = transport
        self._cond: asyncio.Condition | None = None
        self._task: asyncio.Task[None] | None = None
        self._flushing = 0
        self._stop_retrying: asyncio.Event | None = None

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
            self._stop_retrying = asyncio.Event()
        return self._cond

    def _ensure_worker(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="metering-client")

    async def emit(self, event: Event | Mapping[str, Any]) -> str:
        """Validate and queue ``event``; return its id (see ``MeteringClient.emit``)."""
        pending = self._prepare(event, self.transport.max_body_bytes)
        cond = self._condition()
        dropped: EventResult | None = None
        async with cond:
            self._check_open()
            self._ensure_worker()
            if len(self._queue) >= self.max_queue:
                if self.policy is QueuePolicy.RAISE:
                    raise self._full_error()
                if self.policy is QueuePolicy.DROP_OLDEST:
                    dropped = self._pop_oldest()
                else:
                    try:
                        await asyncio.wait_for(
                            cond.wait_for(lambda: len(self._queue) < self.max_queue or self._closed),
                            self.block_timeout_s,
                        )
                    except TimeoutError:
                        raise self._full_error() from None
                    self._check_open()
            self._push(pending)
            cond.notify_all()
        if dropped is not None:
            self._ledger.record([dropped])
        return str(pending.event["id"])

    def _emit_usage(
        self, type: EventType, data: Mapping[str, Any], time: When, id: str | None
    ) -> Coroutine[Any, Any, str]:
        # The helpers return the coroutine of ``emit``: ``await client.workstation_cpu(...)``.
        return self.emit(build_usage_event(type, data, source=self.source, time=time, id=id))

    async def flush(self, timeout: float | None = None) -> None:
        """See ``MeteringClient.flush``."""
        cond = self._condition()
        async with cond:
            self._flushing += 1
            cond.notify_all()
            try:
                await asyncio.wait_for(
                    cond.wait_for(lambda: not self._queue and not self._in_flight), timeout
                )
            except TimeoutError:
                raise TimeoutError(
                    f"flush: {len(self._queue) + self._in_flight} event(s) not answered in {timeout} s"
                ) from None
            finally:
                self._flushing -= 1
        failed = self._ledger.take_failures()
        if failed is not None:
            raise failed

    async def aclose(self, timeout: float | None = None) -> None:
        """See ``MeteringClient.close``."""
        cond = self._condition()
        async with cond:
            if self._closed:
                return
            self._closed = True
            cond.notify_all()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                assert self._stop_retrying is not None
                self._stop_retrying.set()
                await self._task
        leftover = list(self._queue)
        self._queue.clear()
        self._queued_bytes = 0
        if leftover:
            self._ledger.record(self._unsent(leftover))
        await self.transport.aclose()
        failed = self._ledger.take_failures()
        if failed is not None:
            raise failed

    async def __aenter__(self) -> AsyncMeteringClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            await self.aclose()
            return
        try:
            await self.aclose()
        except DeliveryFailed as failed:
            log.error("while handling %s: %s", type(exc).__name__, failed)

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosed("the client is closed")

    async def _run(self) -> None:
        cond = self._condition()
        limits = (self.transport.max_events, self.transport.max_body_bytes)
        while True:
            async with cond:
                await cond.wait_for(lambda: bool(self._queue) or self._closed)
                if not self._queue or (self._stop_retrying is not None and self._stop_retrying.is_set()):
                    return
                while not (self._closed or self._flushing or self._batch_ready(*limits)):
                    left = self._linger_left()
                    if left <= 0:
                        break
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(cond.wait(), left)
                batch = self._take(*limits)
                cond.notify_all()
            try:
                results = await self._deliver([p.event for p in batch])
            except Exception as exc:  # pragma: no cover - a transport bug: report, never lose
                log.exception("metering client: sending a batch failed")
                results = Outcome(code=ClientCode.DELIVERY_FAILED, message=repr(exc)).final_results(
                    [str(p.event["id"]) for p in batch]
                )
            self._ledger.record(results)
            async with cond:
                self._in_flight = 0
                cond.notify_all()

    async def _deliver(self, events: list[dict[str, Any]]) -> list[EventResult]:
        assert self._stop_retrying is not None
        ids = [str(e["id"]) for e in events]
        started = self._clock()
        attempt = 0
        while True:
            self._ledger.count_request(retry=attempt > 0)
            outcome = await self.transport.send(events)
            if outcome.retry is None:
                return outcome.final_results(ids)
            attempt += 1
            left = self.backoff.max_retry_s - (self._clock() - started)
            if left <= 0 or self._stop_retrying.is_set():
                return self._gave_up(attempt, outcome.retry).final_results(ids)
            # the last attempt falls at the end of the budget, not before it
            delay = min(self.backoff.delay(attempt, outcome.retry_after, self._rng), left)
            log.info("metering client: %s; retrying %d event(s) in %.2f s", outcome.retry, len(ids), delay)
            try:
                await asyncio.wait_for(self._stop_retrying.wait(), delay)
                return self._gave_up(attempt, outcome.retry).final_results(ids)
            except TimeoutError:
                pass
