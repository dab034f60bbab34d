"""Benchmark producer, run as its own process so it gets its own core: synthetic events of every
usage type, batched per tenant exactly as the SDK batches them."""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime, timedelta

import orjson
from confluent_kafka import Producer

from schemas.wire import batch_headers, encode_batch

TYPES = [
    ("workstation.cpu", lambda i: {"workstation_id": f"ws{i % 50}", "cpu_seconds": (i % 997) / 10}),
    ("workstation.gpu", lambda i: {"workstation_id": f"ws{i % 50}", "gpu_seconds": (i % 89) / 10}),
    (
        "render.completed",
        lambda i: {"workspace_id": f"w{i % 20}", "render_id": f"r{i}", "output_duration_seconds": 12.5},
    ),
    (
        "egress.download",
        lambda i: {"workspace_id": f"w{i % 20}", "artifact_id": f"a{i}", "bytes": 1000 + i % 5000},
    ),
    (
        "ai.task.submitted",
        lambda i: {"workspace_id": f"w{i % 20}", "task_id": f"t{i}", "task_type": "upscale"},
    ),
    (
        "gateway.request",
        # the optional fields written out as null, as the SDK writes them (metering_client.prepare)
        lambda i: {
            "workspace_id": f"w{i % 20}",
            "virtual_key_id": f"vk{i % 7}",
            "request_id": f"q{i}",
            "model": None,
            "status_code": None,
        },
    ),
    (
        "ci.step.cpu",
        lambda i: {
            "contract_id": "c1",
            "workspace_id": f"w{i % 20}",
            "step_id": f"s{i % 300}",
            "cpu_seconds": 0.5,
        },
    ),
]


def make(i: int, tenant: str, t: datetime, prefix: str) -> dict:
    typ, data = TYPES[i % len(TYPES)]
    return {
        "specversion": "1.0",
        "id": f"{prefix}{i}",
        "source": "bench",
        "type": typ,
        "time": t.isoformat().replace("+00:00", "Z"),
        "tenant": tenant,
        "data": data(i),
    }


def main(
    bootstrap: str, topic: str, count: int, rate: float, tenants: int, per_message: int, prefix: str
) -> None:
    p = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 200000,
        }
    )
    start = time.perf_counter()
    t = datetime.now(UTC) - timedelta(minutes=1)
    sent = 0
    i = 0
    while sent < count:
        n = min(per_message, count - sent)
        tenant = f"tenant-{(i // per_message) % tenants}"
        value = encode_batch([make(i + k, tenant, t, prefix) for k in range(n)])
        while True:
            try:
                p.produce(topic, key=tenant.encode(), value=value, headers=batch_headers())
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
        sent += n
        i += n
        if rate > 0:
            ahead = sent / rate - (time.perf_counter() - start)
            if ahead > 0:
                time.sleep(ahead)
    p.flush(60)
    elapsed = time.perf_counter() - start
    sys.stdout.write(orjson.dumps({"sent": sent, "seconds": elapsed}).decode() + "\n")


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], int(a[2]), float(a[3]), int(a[4]), int(a[5]), a[6])
