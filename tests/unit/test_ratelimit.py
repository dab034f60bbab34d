"""Rate limits (query_api/ratelimit.py, on the ``limits`` library): per key, at most a minute's
allowance in any 60 seconds, in memory per process by default; with
``METERING_RATE_LIMIT_STORAGE=redis://`` one limit shared by every process, tried against a real
Redis server this test starts (``redis-server``, installed by `make tools`); an unreachable Redis
admits requests.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from deploy.settings import IngestSettings, masked
from ingest.http import EVENTS_PATH, build_ingest_router
from query_api.ratelimit import RateLimiter, retry_after_header
from tests.integration.test_http_request_rules import AUTH, Keys, Scopes, Sender, event

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def redis_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis server on a port of its own, nothing persisted, stopped after the module."""
    binary = shutil.which("redis-server")
    if binary is None:
        reason = "redis-server is missing: `make tools` installs Debian's redis-server package"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        [binary, *args, "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    uri = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                if redis.Redis.from_url(uri, socket_timeout=0.5).ping():
                    break
            except redis.ConnectionError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield uri
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_at_most_per_minute_in_any_60_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1_000_000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    limiter = RateLimiter(60)
    assert all(limiter.acquire("k") is None for _ in range(30))
    now[0] += 20
    assert all(limiter.acquire("k") is None for _ in range(30))
    wait = limiter.acquire("k")  # 60 in the last 20 s: wait until the first 30 are a minute old
    assert wait is not None and abs(wait - 40) < 0.01
    assert retry_after_header(wait) in ("40", "41")
    assert limiter.acquire("other") is None  # per key
    now[0] += 40.01
    assert all(limiter.acquire("k") is None for _ in range(30))  # the first 30 have aged out
    assert limiter.acquire("k") is not None
    now[0] += 3600
    assert all(limiter.acquire("k") is None for _ in range(60))
    assert limiter.acquire("k") is not None  # never more than a minute's allowance


def test_retry_after_is_whole_seconds_at_least_one() -> None:
    assert [retry_after_header(w) for w in (0.0, 0.2, 1.0, 1.01, 29.5)] == ["1", "1", "1", "2", "30"]


def test_in_memory_each_limiter_counts_alone() -> None:
    a, b = RateLimiter(2, name="same"), RateLimiter(2, name="same")
    assert [a.acquire("k") is None for _ in range(3)] == [True, True, False]
    assert b.acquire("k") is None  # another process (or app) has counts of its own


def test_the_storage_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert IngestSettings().rate_limit_storage.get_secret_value() == "memory://"
    monkeypatch.setenv("METERING_RATE_LIMIT_STORAGE", "redis://:s3cret@cache:6379/2")
    settings = IngestSettings()
    assert settings.rate_limit_storage.get_secret_value() == "redis://:s3cret@cache:6379/2"
    assert "s3cret" not in str(masked(settings))
    monkeypatch.setenv("METERING_RATE_LIMIT_STORAGE", "postgres://db")
    with pytest.raises(ValueError, match="rate_limit_storage"):
        IngestSettings()
    with pytest.raises(ValueError, match="rate-limit storage"):
        RateLimiter(5, storage="mongodb://x")


_PROCESS = """
import sys
from query_api.ratelimit import RateLimiter
limiter = RateLimiter(10, storage=sys.argv[1], name="shared")
print(sum(limiter.acquire("tenant-key") is None for _ in range(8)))
"""


def test_processes_sharing_redis_share_one_limit(redis_uri: str) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PROCESS, redis_uri], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    allowed = [int(p.communicate(timeout=60)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(allowed) == 10, allowed  # 16 tried by two processes, 10 a minute allowed
    here = RateLimiter(10, storage=redis_uri, name="shared")
    wait = here.acquire("tenant-key")  # a third process is refused too, and told how long
    assert wait is not None and 0 < wait <= 60
    assert RateLimiter(10, storage=redis_uri, name="other").acquire("tenant-key") is None  # other limit


def test_two_ingest_processes_share_the_per_key_limit(redis_uri: str) -> None:
    settings = IngestSettings(rate_limit_storage=redis_uri, ingest_rate_limit_per_minute=3)  # type: ignore[arg-type]

    def ingest_app() -> FastAPI:  # one ingest process
        app = FastAPI()
        app.include_router(build_ingest_router(lambda: Sender(), Keys, settings, get_scopes=Scopes))
        return app

    def send(client: TestClient, n: int) -> httpx.Response:
        return client.post(EVENTS_PATH, json=event(f"e-{n}"), headers=AUTH)

    accepted = REGISTRY.get_sample_value("metering_ingest_events_total", {"status": "accepted"}) or 0.0
    with TestClient(ingest_app()) as one, TestClient(ingest_app()) as two:
        codes = [send(one, 1).status_code, send(two, 2).status_code, send(one, 3).status_code]
        refused = send(two, 4)
    assert codes == [202, 202, 202]
    assert REGISTRY.get_sample_value("metering_ingest_events_total", {"status": "accepted"}) == accepted + 3
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
    assert int(refused.headers["Retry-After"]) >= 1


def test_an_unreachable_storage_admits_requests() -> None:
    port = free_port()  # nothing listens there
    limiter = RateLimiter(1, storage=f"redis://127.0.0.1:{port}/0", name="down")
    before = REGISTRY.get_sample_value("metering_rate_limit_storage_errors_total", {"limit": "down"}) or 0.0
    started = time.monotonic()
    assert all(limiter.acquire("k") is None for _ in range(50))  # over the limit, still admitted
    assert time.monotonic() - started < 5  # one failed attempt, then the storage is left alone
    after = REGISTRY.get_sample_value("metering_rate_limit_storage_errors_total", {"limit": "down"})
    assert after == before + 50
