"""``/healthz`` (the process is alive), ``/readyz`` (Kafka and ClickHouse answer; 503 while either
is down) and ``/metrics`` (Prometheus), mounted by every HTTP process.

A check answers ok, degraded or down (``True``/``False`` mean ok/down). ``/readyz`` answers 503
only when a check is down; a degraded check (an aggregator retrying a batch ClickHouse does not
take) shows in the body, ``"status": "degraded"`` with the check's detail, and the answer stays
200: this process still takes events into Kafka, which keeps them until the aggregator can
write, and still answers queries (with the freshness they report), so taking it out of a load
balancer would turn a storage stall into refused events."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


class Status(StrEnum):
    OK = "ok"
    DEGRADED = "degraded"
    DOWN = "down"


Check = Callable[[], tuple[bool | Status, str]]


def _status(result: bool | Status) -> Status:
    if isinstance(result, Status):
        return result
    return Status.OK if result else Status.DOWN


def kafka_check(config: dict[str, Any], timeout_s: float = 2.0) -> Check:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({**config, "socket.timeout.ms": int(timeout_s * 1000)})

    def check() -> tuple[bool, str]:
        try:
            md = admin.list_topics(timeout=timeout_s)
            return True, f"{len(md.brokers)} broker(s)"
        except Exception as exc:
            return False, str(exc)[:200]

    return check


def clickhouse_check(client: Any) -> Check:
    def check() -> tuple[bool, str]:
        try:
            version = client.command("SELECT version()")
            return True, f"ClickHouse {version}"
        except Exception as exc:
            return False, str(exc)[:200]

    return check


def build_health_router(checks: dict[str, Check], cache_s: float = 1.0) -> APIRouter:
    router = APIRouter(tags=["system"])
    last: dict[str, Any] = {"at": 0.0, "body": None}

    @router.get("/healthz", summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get(
        "/readyz", summary="Kafka and ClickHouse both answer", responses={503: {"description": "not ready"}}
    )
    async def readyz() -> JSONResponse:
        now = time.monotonic()
        if last["body"] is None or now - last["at"] > cache_s:
            results = await asyncio.gather(*(asyncio.to_thread(fn) for fn in checks.values()))
            body = {
                name: {"status": _status(ok).value, "detail": detail}
                for name, (ok, detail) in zip(checks, results, strict=True)
            }
            last.update(at=now, body=body)
        body = last["body"]
        states = {v["status"] for v in body.values()}
        if Status.DOWN in states:
            return JSONResponse({"status": "unavailable", "checks": body}, status_code=503)
        overall = "degraded" if Status.DEGRADED in states else "ok"
        return JSONResponse({"status": overall, "checks": body}, status_code=200)

    @router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return router
