"""The client SDK (client/metering_client) against an in-process fake of the ingest (httpx
MockTransport): batching to the ingest's limits, linger, retries with backoff on 429/503/dropped
connections with the same ids, per-event results, queue policies, flush/close, metrics; the
asyncio twin alike. No sockets, no sleeping through backoffs (the sleep is injected)."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from metering_client import (
    AsyncHttpTransport,
    AsyncMeteringClient,
    Backoff,
    ClientClosed,
    ClientCode,
    DeliveryFailed,
    EventResult,
    HttpTransport,
    InvalidEvent,
    MeteringClient,
    Outcome,
    QueueFull,
    QueuePolicy,
    RejectCode,
    Status,
)
from metering_client.client import _Pending, take_batch
from metering_client.retry import parse_retry_after
from metering_client.transport import MAX_BODY_BYTES, interpret_response

BASE = "http://ingest.test"
KEY = "fl_test_key"


class FakeIngest:
    """The ingest's answers (docs/api.md): 202 with a result per event, a duplicate for an id it
    already took; ``script`` injects failures for the next requests, in order:
    ``503``/``429`` (with Retry-After), ``drop`` (connection lost before the request arrives),
    ``lost_answer`` (the events are taken, then the connection drops), ``401``."""

    def __init__(self, script: Sequence[str] = (), reject: Mapping[str, str] | None = None) -> None:
        self.script = list(script)
        self.reject = dict(reject or {})
        self.counted: list[str] = []  # ids taken, in order: each must appear once
        self.requests: list[httpx.Request] = []
        self.bodies: list[list[dict[str, Any]]] = []
        self.lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.requests.append(request)
            events = json.loads(request.content.decode("utf-8"))
            self.bodies.append(events)
            action = self.script.pop(0) if self.script else "ok"
            if action == "drop":
                raise httpx.ConnectError("connection refused", request=request)
            if action in ("503", "429"):
                code = "kafka_unavailable" if action == "503" else "rate_limited"
                retry_after = "1" if action == "503" else "2"
                return httpx.Response(
                    int(action),
                    json={"error": {"code": code, "message": "later", "details": {}}},
                    headers={"Retry-After": retry_after},
                )
            if action == "401":
                return httpx.Response(
                    401, json={"error": {"code": "unauthorized", "message": "unknown or revoked API key"}}
                )
            results = []
            for index, event in enumerate(events):
                if event["id"] in self.reject:
                    results.append(
                        {
                            "index": index,
                            "id": event["id"],
                            "status": "rejected",
                            "code": self.reject[event["id"]],
                            "message": "data.workspace_id is not a workspace this key may report for",
                        }
                    )
                elif event["id"] in self.counted:
                    results.append({"index": index, "id": event["id"], "status": "duplicate"})
                else:
                    self.counted.append(event["id"])
                    results.append({"index": index, "id": event["id"], "status": "accepted"})
            if action == "lost_answer":
                raise httpx.ReadError("connection reset by peer", request=request)
            return httpx.Response(202, json={"results": results})


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def cpu_event(i: int, **data: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"e-{i}",
        "source": "test",
        "type": "workstation.cpu",
        "time": now_iso(),
        "data": {"workstation_id": "ws-1", "cpu_seconds": 1.5, **data},
    }


def make_client(fake: FakeIngest, sleeps: list[float] | None = None, **kw: Any) -> MeteringClient:
    http = httpx.Client(transport=httpx.MockTransport(fake))
    transport = HttpTransport(BASE, KEY, http=http, **kw.pop("transport_kw", {}))
    sleep = sleeps.append if sleeps is not None else (lambda _s: None)
    kw.setdefault("rng", random.Random(7))
    return MeteringClient(transport=transport, sleep=sleep, **kw)


# ---- batching ---------------------------------------------------------------------------------


def test_batches_up_to_100_events_one_request_each_json_utf8() -> None:
    fake = FakeIngest()
    with make_client(fake, linger_s=5.0) as client:
        ids = [client.emit(cpu_event(i)) for i in range(250)]
        client.flush()
    assert [len(b) for b in fake.bodies] == [100, 100, 50]
    assert fake.counted == ids
    request = fake.requests[0]
    assert request.method == "POST" and request.url == f"{BASE}/api/v1/events"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    request.content.decode("utf-8")  # UTF-8
    m = client.metrics
    assert (m.sent, m.requests, m.retried, m.queued, m.in_flight, m.rejected) == (250, 3, 0, 0, 0, {})


def test_a_batch_stays_under_the_body_limit() -> None:
    fake = FakeIngest()
    client = make_client(fake, linger_s=5.0, transport_kw={"max_body_bytes": 4000})
    events = [cpu_event(i, workstation_id="w" * 100) for i in range(60)]
    for e in events:
        client.emit(e)
    client.close()
    assert sum(len(b) for b in fake.bodies) == 60
    assert all(len(r.content) <= 4000 for r in fake.requests)
    assert len(fake.requests) > 1


def test_take_batch_cuts_by_count_and_bytes() -> None:
    from collections import deque

    q = deque(_Pending({"id": str(i)}, 100, 0.0) for i in range(10))
    assert len(take_batch(q, 4, MAX_BODY_BYTES)) == 4
    # 2 + 100 + 1 + 100 + 1 + 100 = 304: three fit in 304, not in 303
    assert len(take_batch(q, 100, 304)) == 3
    assert len(take_batch(q, 100, 303)) == 2
    assert len(take_batch(q, 100, 10)) == 1  # one event always goes (it was checked alone)


def test_linger_sends_a_partial_batch_without_flush() -> None:
    fake = FakeIngest()
    client = make_client(fake, linger_s=0.05)
    client.emit(cpu_event(1))
    client.emit(cpu_event(2))
    deadline = time.monotonic() + 5
    # wait for what is asserted: the fake records a request before its body
    while not fake.bodies and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [len(b) for b in fake.bodies] == [2]
    client.close()


# ---- retries and ids --------------------------------------------------------------------------


def test_503_429_and_dropped_connections_are_retried_with_the_same_ids_counted_once() -> None:
    fake = FakeIngest(script=["503", "429", "drop", "lost_answer"])
    sleeps: list[float] = []
    with make_client(fake, sleeps, linger_s=5.0) as client:
        ids = [client.emit(cpu_event(i)) for i in range(30)]
        client.flush()
    # five attempts of one request, each the very same events (ids fixed at emit)
    assert len(fake.bodies) == 5
    assert all(b == fake.bodies[0] for b in fake.bodies)
    assert fake.counted == ids  # taken once, although the answer of attempt 4 was lost
    assert sleeps[0] >= 1.0 and sleeps[1] >= 2.0  # Retry-After honoured
    assert 0 <= sleeps[2] <= 0.8 and 0 <= sleeps[3] <= 1.6  # exponential backoff, full jitter
    m = client.metrics
    assert (m.sent, m.duplicates, m.retried, m.requests) == (30, 30, 4, 5)


def test_backoff_grows_exponentially_up_to_the_cap_with_jitter() -> None:
    b = Backoff(base_s=0.5, cap_s=4.0)
    rng = random.Random(1)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (10, 4.0)]:
        delays = [b.delay(attempt, None, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8 and min(delays) < ceiling * 0.2  # spread: jitter
    assert all(3.0 <= b.delay(1, 3.0, rng) <= 3.3 for _ in range(50))
    assert b.delay(1, 10_000.0, rng) <= b.max_retry_after_s * 1.1


def test_retry_after_parsing() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("Sun, 29 Nov 2026 12:00:30 GMT", now) == 30.0


def test_gives_up_after_max_retry_and_reports_delivery_failed() -> None:
    fake = FakeIngest(script=["503"] * 1000)
    clock = [0.0]
    failures: list[EventResult] = []

    def sleep(d: float) -> None:
        clock[0] += d

    client = MeteringClient(
        transport=HttpTransport(BASE, KEY, http=httpx.Client(transport=httpx.MockTransport(fake))),
        sleep=sleep,
        clock=lambda: clock[0],
        backoff=Backoff(max_retry_s=60.0),
        on_failure=failures.append,
        linger_s=0.0,
    )
    client.emit(cpu_event(1))
    with pytest.raises(DeliveryFailed) as raised:
        client.flush()
    assert raised.value.failed_ids == ["e-1"]
    assert raised.value.failures[0].code == ClientCode.DELIVERY_FAILED
    assert [f.id for f in failures] == ["e-1"]
    assert client.metrics.rejected == {ClientCode.DELIVERY_FAILED: 1}
    assert clock[0] == pytest.approx(60.0)  # retried for max_retry_s, not more
    client.close()  # the failure was raised once, by flush


# ---- per-event results ------------------------------------------------------------------------


def test_rejected_events_reach_the_callback_and_flush_with_their_code() -> None:
    fake = FakeIngest(reject={"e-2": "out_of_scope"})
    seen: list[EventResult] = []
    client = make_client(fake, linger_s=5.0, on_failure=seen.append)
    for i in range(4):
        client.emit(cpu_event(i))
    with pytest.raises(DeliveryFailed) as raised:
        client.flush()
    assert [(f.id, f.status, f.code) for f in raised.value.failures] == [
        ("e-2", Status.REJECTED, "out_of_scope")
    ]
    assert seen == raised.value.failures
    assert client.metrics.sent == 3 and client.metrics.rejected == {"out_of_scope": 1}
    client.flush()  # reported once
    client.close()


def test_revoked_key_fails_every_event_of_the_request_with_unauthorized() -> None:
    fake = FakeIngest(script=["401"])
    client = make_client(fake, linger_s=5.0)
    client.emit(cpu_event(1))
    client.emit(cpu_event(2))
    with pytest.raises(DeliveryFailed) as raised:
        client.close()
    assert {(f.id, f.code) for f in raised.value.failures} == {
        ("e-1", "unauthorized"),
        ("e-2", "unauthorized"),
    }
    assert len(fake.requests) == 1  # not retried: another try cannot succeed


def test_invalid_events_raise_at_emit_with_the_ingest_code_and_nothing_is_sent() -> None:
    fake = FakeIngest()
    client = make_client(fake)
    with pytest.raises(InvalidEvent) as raised:
        client.emit(cpu_event(1, cpu_seconds="12"))
    assert raised.value.code == RejectCode.INVALID_EVENT
    with pytest.raises(InvalidEvent) as raised:
        client.emit(cpu_event(2, cpu_seconds=1e13))
    assert raised.value.code == RejectCode.OUT_OF_RANGE
    lifecycle = {
        **cpu_event(3),
        "type": "api_key.revoked",
        "data": {"key_id": "k-1"},
    }
    with pytest.raises(InvalidEvent) as raised:
        client.emit(lifecycle)
    assert raised.value.code == RejectCode.FORBIDDEN_EVENT_TYPE
    with pytest.raises(InvalidEvent) as raised:
        client.emit(cpu_event(4, workstation_id="w" * 128, extra="x" * 40_000))
    assert raised.value.code in (RejectCode.INVALID_EVENT, RejectCode.TOO_LARGE)
    client.close()
    assert fake.requests == []
    assert client.metrics.rejected == {"invalid_event": 2, "value_out_of_range": 1, "forbidden_event_type": 1}


def test_typed_helpers_build_valid_events_with_fixed_ids() -> None:
    fake = FakeIngest()
    with make_client(fake, linger_s=5.0, source="render-farm") as client:
        rid = client.render_completed(workspace_id="w-1", render_id="r-1", output_duration_seconds=93.5)
        client.ci_step_cpu(contract_id="c-1", workspace_id="w-1", step_id="s-1", cpu_seconds=2.0, id="fixed")
        client.egress_download(workspace_id="w-1", artifact_id="a-1", bytes=10)
        client.datastream_rows(workspace_id="w-1", total_rows=2, row_keys=["a", "b"], datastream_id="d-1")
        client.gateway_request(workspace_id="w-1", virtual_key_id="vk", request_id="q-1", status_code=200)
        client.ai_task_submitted(workspace_id="w-1", task_id="t-1", task_type="summarize")
        client.workstation_gpu(workstation_id="ws", gpu_seconds=1.0)
        client.workstation_memory(workstation_id="ws", memory_gb=1.0)
        client.ci_step_memory(contract_id="c-1", workspace_id="w-1", step_id="s-1", memory_mib=5.0)
        client.workstation_cpu(workstation_id="ws", cpu_seconds=1.0, time=datetime(2026, 11, 29, tzinfo=UTC))
    sent = fake.bodies[0]
    assert sent[0]["id"] == rid and sent[0]["source"] == "render-farm" and sent[0]["subject"] == "r-1"
    assert sent[1]["id"] == "fixed"
    assert "tenant" not in sent[0]  # the API key names the tenant
    assert sent[-1]["time"] == "2026-11-29T00:00:00Z"
    assert len(sent) == 10 and client.metrics.sent == 10


# ---- the queue --------------------------------------------------------------------------------


class GatedTransport:
    """Holds every request until ``gate`` is set: the queue fills up behind it."""

    max_events = 100
    max_body_bytes = MAX_BODY_BYTES

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()
        self.sent: list[str] = []

    def send(self, events: Sequence[Mapping[str, Any]]) -> Outcome:
        self.started.set()
        self.gate.wait(10)
        self.sent.extend(str(e["id"]) for e in events)
        return Outcome(results=[EventResult(str(e["id"]), Status.ACCEPTED) for e in events])

    def close(self) -> None:
        pass


def _stalled(policy: QueuePolicy, **kw: Any) -> tuple[MeteringClient, GatedTransport]:
    transport = GatedTransport()
    client = MeteringClient(transport=transport, max_queue=3, policy=policy, linger_s=0.0, **kw)
    client.emit(cpu_event(0))  # taken by the worker, held in flight
    assert transport.started.wait(5)
    for i in (1, 2, 3):
        client.emit(cpu_event(i))
    assert client.metrics.queued == 3 and client.metrics.in_flight == 1
    return client, transport


def test_queue_full_raise_queues_nothing() -> None:
    client, transport = _stalled(QueuePolicy.RAISE)
    with pytest.raises(QueueFull):
        client.emit(cpu_event(4))
    transport.gate.set()
    client.close()
    assert transport.sent == ["e-0", "e-1", "e-2", "e-3"]


def test_queue_full_drop_oldest_reports_the_dropped_event() -> None:
    dropped: list[EventResult] = []
    client, transport = _stalled(QueuePolicy.DROP_OLDEST, on_failure=dropped.append)
    client.emit(cpu_event(4))
    assert [(d.id, d.code) for d in dropped] == [("e-1", ClientCode.QUEUE_FULL)]
    transport.gate.set()
    with pytest.raises(DeliveryFailed) as raised:
        client.close()
    assert raised.value.failed_ids == ["e-1"]
    assert transport.sent == ["e-0", "e-2", "e-3", "e-4"]
    assert client.metrics.rejected == {ClientCode.QUEUE_FULL: 1}


def test_queue_full_block_waits_for_room_then_times_out() -> None:
    client, transport = _stalled(QueuePolicy.BLOCK, block_timeout_s=0.1)
    t0 = time.monotonic()
    with pytest.raises(QueueFull):
        client.emit(cpu_event(4))
    assert time.monotonic() - t0 >= 0.1
    threading.Timer(0.1, transport.gate.set).start()
    client.block_timeout_s = 5.0
    client.emit(cpu_event(5))  # waits until the worker takes the queue
    client.close()
    assert transport.sent == ["e-0", "e-1", "e-2", "e-3", "e-5"]


def test_emit_after_close_raises_and_close_is_idempotent() -> None:
    client = make_client(FakeIngest())
    client.close()
    client.close()
    with pytest.raises(ClientClosed):
        client.emit(cpu_event(1))


def test_close_with_a_timeout_reports_what_it_could_not_send() -> None:
    fake = FakeIngest(script=["503"] * 10_000)
    client = MeteringClient(  # real (interruptible) waits between retries
        transport=HttpTransport(BASE, KEY, http=httpx.Client(transport=httpx.MockTransport(fake))),
        backoff=Backoff(base_s=0.01, cap_s=0.02, max_retry_after_s=0.02),
        linger_s=5.0,
    )
    for i in range(150):
        client.emit(cpu_event(i))
    with pytest.raises(DeliveryFailed) as raised:
        client.close(timeout=0.3)
    codes = {f.code for f in raised.value.failures}
    # the request being retried gave up; the second batch never left the queue
    assert (
        codes <= {ClientCode.DELIVERY_FAILED, ClientCode.CLIENT_CLOSED} and ClientCode.CLIENT_CLOSED in codes
    )
    assert len(raised.value.failures) == 150


# ---- pure reading of answers ------------------------------------------------------------------


def test_interpret_response() -> None:
    ok = interpret_response(
        202,
        {},
        b'{"results":[{"index":0,"id":"a","status":"accepted"},{"index":1,"id":"b","status":"duplicate"}]}',
        ["a", "b"],
    )
    assert ok.results == [EventResult("a", Status.ACCEPTED), EventResult("b", Status.DUPLICATE)]
    assert interpret_response(202, {}, b"not json", ["a"]).retry is not None
    busy = interpret_response(503, {"retry-after": "5"}, b"Service Unavailable", ["a"])
    assert busy.retry == "HTTP 503" and busy.retry_after == 5.0
    assert interpret_response(502, {}, b"", ["a"]).retry is not None
    big = interpret_response(413, {}, b'{"error":{"code":"too_many_events","message":"at most 100"}}', ["a"])
    assert big.retry is None and big.final_results(["a"]) == [
        EventResult("a", Status.FAILED, "too_many_events", "at most 100")
    ]


# ---- the asyncio twin -------------------------------------------------------------------------


def test_async_client_batches_retries_and_reports() -> None:
    fake = FakeIngest(script=["503", "drop", "lost_answer"], reject={"e-7": "out_of_scope"})

    async def main() -> tuple[list[str], AsyncMeteringClient]:
        http = httpx.AsyncClient(transport=httpx.MockTransport(fake))
        client = AsyncMeteringClient(
            transport=AsyncHttpTransport(BASE, KEY, http=http),
            backoff=Backoff(base_s=0.001, cap_s=0.005, max_retry_after_s=0.01),
            linger_s=5.0,
        )
        ids = [await client.emit(cpu_event(i)) for i in range(120)]
        await client.workstation_cpu(workstation_id="ws", cpu_seconds=1.0, id="helper")
        with pytest.raises(DeliveryFailed) as raised:
            async with client:
                pass
        assert raised.value.failed_ids == ["e-7"]
        return ids, client

    ids, client = asyncio.run(main())
    assert sorted(fake.counted) == sorted([i for i in ids if i != "e-7"] + ["helper"])
    assert len(fake.counted) == len(set(fake.counted))
    m = client.metrics
    assert m.sent == 120 and m.rejected == {"out_of_scope": 1} and m.retried == 3


def test_async_queue_full_raise_and_closed() -> None:
    class Stuck:
        max_events = 100
        max_body_bytes = MAX_BODY_BYTES

        def __init__(self) -> None:
            self.gate = asyncio.Event()

        async def send(self, events: Sequence[Mapping[str, Any]]) -> Outcome:
            await self.gate.wait()
            return Outcome(results=[EventResult(str(e["id"]), Status.ACCEPTED) for e in events])

        async def aclose(self) -> None:
            pass

    async def main() -> None:
        transport = Stuck()
        client = AsyncMeteringClient(transport=transport, max_queue=2, policy="raise", linger_s=0.0)
        await client.emit(cpu_event(0))
        await asyncio.sleep(0.05)  # the worker takes it and waits
        await client.emit(cpu_event(1))
        await client.emit(cpu_event(2))
        with pytest.raises(QueueFull):
            await client.emit(cpu_event(3))
        transport.gate.set()
        await client.flush(timeout=5)
        assert client.metrics.sent == 3
        await client.aclose()
        with pytest.raises(ClientClosed):
            await client.emit(cpu_event(4))

    asyncio.run(main())


def test_a_client_left_open_is_closed_at_exit(caplog: pytest.LogCaptureFixture) -> None:
    from metering_client.client import close_open_clients

    fake = FakeIngest(reject={"e-1": "out_of_scope"})
    client = make_client(fake, linger_s=60.0)
    client.emit(cpu_event(0))
    client.emit(cpu_event(1))
    close_open_clients()  # what atexit runs
    assert fake.counted == ["e-0"]
    assert "at exit" in caplog.text and "e-1" in caplog.text
    with pytest.raises(ClientClosed):
        client.emit(cpu_event(2))


def test_async_queue_full_drop_oldest_and_block() -> None:
    class Gate:
        max_events = 100
        max_body_bytes = MAX_BODY_BYTES

        def __init__(self) -> None:
            self.gate = asyncio.Event()
            self.sent: list[str] = []

        async def send(self, events: Sequence[Mapping[str, Any]]) -> Outcome:
            await self.gate.wait()
            self.sent.extend(str(e["id"]) for e in events)
            return Outcome(results=[EventResult(str(e["id"]), Status.ACCEPTED) for e in events])

        async def aclose(self) -> None:
            pass

    async def main() -> None:
        dropped: list[EventResult] = []
        t = Gate()
        client = AsyncMeteringClient(
            transport=t, max_queue=2, policy=QueuePolicy.DROP_OLDEST, linger_s=0.0, on_failure=dropped.append
        )
        await client.emit(cpu_event(0))
        await asyncio.sleep(0.05)  # in flight, held
        for i in (1, 2, 3):
            await client.emit(cpu_event(i))
        assert [(d.id, d.code) for d in dropped] == [("e-1", ClientCode.QUEUE_FULL)]
        t.gate.set()
        with pytest.raises(DeliveryFailed):
            await client.aclose()
        assert t.sent == ["e-0", "e-2", "e-3"]

        t = Gate()
        client = AsyncMeteringClient(
            transport=t, max_queue=1, policy=QueuePolicy.BLOCK, block_timeout_s=0.05, linger_s=0.0
        )
        await client.emit(cpu_event(0))
        await asyncio.sleep(0.05)
        await client.emit(cpu_event(1))
        with pytest.raises(QueueFull):
            await client.emit(cpu_event(2))  # waited 0.05 s for room
        client.block_timeout_s = 5.0
        asyncio.get_running_loop().call_later(0.05, t.gate.set)
        await client.emit(cpu_event(3))  # room once the worker takes e-1
        await client.aclose()
        assert t.sent == ["e-0", "e-1", "e-3"]

    asyncio.run(main())
