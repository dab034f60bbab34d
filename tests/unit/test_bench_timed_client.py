"""The query benchmarks' timed client (bench/timed_client.py) against a loopback HTTP server: the
requests it sends, the samples it keeps, its stop, and a failed request."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from bench import timed_client


class _Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # kept-alive connections, as the servers measured
    seen: ClassVar[list[tuple[str, str, str | None]]] = []

    def do_GET(self) -> None:
        self.seen.append((self.command, self.path, self.headers.get("Authorization")))
        status = 500 if self.path.startswith("/fail") else 200
        body = b'{"ok":true}'
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    _Recorder.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()


def _requests(base: str) -> dict[str, dict[str, object]]:
    return {
        "a": {"method": "GET", "url": f"{base}/v1/a?period=2026-11", "headers": {"Authorization": "Basic x"}},
        "b": {"method": "GET", "url": f"{base}/v1/b", "headers": {"Authorization": "Bearer y"}},
    }


def test_a_fixed_number_per_endpoint_the_warm_up_not_kept(server: str) -> None:
    samples = asyncio.run(timed_client.time_requests(_requests(server), 5, 2, lambda: False))
    assert {name: len(v) for name, v in samples.items()} == {"a": 3, "b": 3}
    assert all(ms > 0 for v in samples.values() for ms in v)
    # each endpoint in turn, its path with the query string and its own headers
    assert _Recorder.seen[:5] == [("GET", "/v1/a?period=2026-11", "Basic x")] * 5
    assert _Recorder.seen[5:] == [("GET", "/v1/b", "Bearer y")] * 5


def test_rounds_until_stopped(server: str) -> None:
    calls = 0

    def stop() -> bool:
        nonlocal calls
        calls += 1
        return calls > 4

    samples = asyncio.run(timed_client.time_requests(_requests(server), None, 0, stop))
    assert {name: len(v) for name, v in samples.items()} == {"a": 4, "b": 4}
    assert [p for _, p, _ in _Recorder.seen[:4]] == ["/v1/a?period=2026-11", "/v1/b"] * 2


def test_an_answer_other_than_200_fails(server: str) -> None:
    requests = {"bad": {"method": "GET", "url": f"{server}/fail", "headers": {}}}
    with pytest.raises(timed_client.RequestFailed, match="bad: 500"):
        asyncio.run(timed_client.time_requests(requests, 3, 0, lambda: False))


def test_in_its_own_process_until_its_input_closes(server: str) -> None:
    proc = timed_client.start(_requests(server), None)
    try:
        deadline = time.monotonic() + 30
        while len(_Recorder.seen) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None  # still timing: it stops only when told
    finally:
        samples = timed_client.collect(proc, timeout=30)
    assert len(samples["a"]) >= 3 and len(samples["b"]) >= 3
    assert len(samples["a"]) == len(samples["b"])  # whole rounds: the stop is checked between them


def test_a_failure_in_its_own_process_is_raised(server: str) -> None:
    proc = timed_client.start({"bad": {"method": "GET", "url": f"{server}/fail", "headers": {}}}, 2)
    with pytest.raises(RuntimeError, match="bad: 500"):
        timed_client.collect(proc, timeout=30)
