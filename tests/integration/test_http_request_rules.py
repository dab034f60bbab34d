"""The request rules of ``POST /api/v1/events`` (docs/api.md, "HTTP ingest: request rules"),
tried through a real HTTP server: uvicorn configured by ``deploy.http_server.server_config``
exactly as ``metering run`` configures it, serving the ingest router over stand-in API keys and
a stand-in Kafka producer (no broker, no ClickHouse: these rules are decided before either).

- Media types: ``application/json``, ``application/cloudevents+json`` (one event) and
  ``application/cloudevents-batch+json`` (an array), ``charset=utf-8`` optional; anything else,
  a missing Content-Type included, is 415, after authentication.
- Encoding: UTF-8 only (RFC 8259); UTF-16/32 bodies are 400 ``invalid_encoding``, a declared
  other charset 415 ``unsupported_charset``.
- Slow and idle clients: request-head timeout, keep-alive timeout, concurrency limit, from settings.
- A client that disconnects mid-body is one log line, no traceback.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from fastapi import FastAPI

from deploy.http_server import server_config
from deploy.settings import IngestSettings, RunSettings
from ingest.http import EVENTS_PATH, build_ingest_router, parse_content_type
from ingest.scope import WORKSPACE_SCOPE, KeyScope, build_tenant_scope
from query_api.credentials import Principal
from query_api.health import build_health_router
from schemas.events import EntityKind

KEY = "good"
AUTH = {"Authorization": f"Bearer {KEY}"}
ACCEPTED = ["application/json", "application/cloudevents+json", "application/cloudevents-batch+json"]


class Keys:
    def lookup(self, raw: str, kind: EntityKind) -> Principal | None:
        return Principal("acme", kind, raw, "workspace", "w1", "", "", "active", None) if raw == KEY else None


class Scopes:
    """The key opens workspace w1, the one the test events report for."""

    def key_scope(self, principal: Principal) -> KeyScope:
        tenant = build_tenant_scope([(EntityKind.WORKSPACE.value, "w1", "", "", "", "")])
        return tenant.for_key(WORKSPACE_SCOPE, "w1", "")


class Sender:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send_batch(self, events: Any, tenant: str, **_: Any) -> None:
        self.sent.extend(events)


def event(id_: str) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": id_,
        "source": "render-farm",
        "type": "render.completed",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": {"workspace_id": "w1", "render_id": f"r-{id_}", "output_duration_seconds": 1.5},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def live_server(**settings: Any) -> Iterator[tuple[str, Sender]]:
    """(base URL, sender) of a real uvicorn server in a thread, configured from ``settings``."""
    sender = Sender()
    s = IngestSettings(http_port=free_port(), ingest_rate_limit_per_minute=100_000, **settings)
    app = FastAPI()
    app.include_router(build_health_router({}))
    app.include_router(build_ingest_router(lambda: sender, Keys, s, get_scopes=Scopes))
    server = uvicorn.Server(server_config(app, s))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://{s.http_host}:{s.http_port}", sender
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, Sender]]:
    with live_server() as running:
        yield running


def post(base: str, body: bytes, content_type: str | None, auth: bool = True) -> httpx.Response:
    headers = dict(AUTH) if auth else {}
    if content_type is not None:
        headers["Content-Type"] = content_type
    return httpx.post(base + EVENTS_PATH, content=body, headers=headers, timeout=10)


def error_of(r: httpx.Response) -> tuple[int, str]:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    assert body["error"]["message"]
    return r.status_code, body["error"]["code"]


# ---- 1. encoding --------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"])
def test_a_utf16_or_utf32_body_is_400_and_sends_nothing(server: tuple[str, Sender], encoding: str) -> None:
    base, sender = server
    before = len(sender.sent)
    body = orjson.dumps(event(f"enc-{encoding}")).decode().encode(encoding)  # with or without a BOM
    r = post(base, body, "application/json")
    assert error_of(r) == (400, "invalid_encoding"), r.text
    assert "UTF-8" in r.json()["error"]["message"]
    assert len(sender.sent) == before


def test_invalid_utf8_is_400_invalid_encoding(server: tuple[str, Sender]) -> None:
    base, _ = server
    latin1 = orjson.dumps(event("latin")).replace(b"render-farm", "rendu-éclair".encode("latin-1"))
    r = post(base, latin1, "application/json")
    assert error_of(r) == (400, "invalid_encoding"), r.text


@pytest.mark.parametrize("charset", ["utf-16", "iso-8859-1", "utf-32", "us-ascii"])
def test_a_declared_charset_other_than_utf8_is_415(server: tuple[str, Sender], charset: str) -> None:
    base, sender = server
    before = len(sender.sent)
    r = post(base, orjson.dumps(event(f"cs-{charset}")), f"application/json; charset={charset}")
    assert error_of(r) == (415, "unsupported_charset"), r.text
    assert r.json()["error"]["details"]["accepted_charsets"] == ["utf-8"]
    assert len(sender.sent) == before


@pytest.mark.parametrize(
    "content_type",
    ["application/json; charset=utf-8", 'application/json;charset="UTF-8"', "Application/JSON"],
)
def test_utf8_declared_or_not_is_accepted(server: tuple[str, Sender], content_type: str) -> None:
    base, _ = server
    r = post(base, orjson.dumps(event(f"ok-{content_type}")), content_type)
    assert r.status_code == 202 and r.json()["accepted"] == 1, r.text


def test_a_utf8_byte_order_mark_is_ignored(server: tuple[str, Sender]) -> None:
    base, sender = server
    r = post(base, b"\xef\xbb\xbf" + orjson.dumps(event("bom")), "application/json")
    assert r.status_code == 202 and r.json()["accepted"] == 1, r.text
    assert sender.sent[-1]["id"] == "bom"


# ---- 2. content types ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        "text/plain",
        "text/plain; charset=utf-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/xml",
        "text/xml",
        "application/octet-stream",
        "application/json-seq",
        "application/jsonx",
    ],
)
def test_other_media_types_are_415(server: tuple[str, Sender], content_type: str | None) -> None:
    base, sender = server
    before = len(sender.sent)
    r = post(base, orjson.dumps(event("mt")), content_type)
    assert error_of(r) == (415, "unsupported_media_type"), r.text
    error = r.json()["error"]
    assert error["details"]["accepted"] == ACCEPTED
    assert all(media in error["message"] for media in ACCEPTED)
    assert r.headers["Accept"] == ", ".join(ACCEPTED)
    assert len(sender.sent) == before


def test_the_cloudevents_http_binding_media_types(server: tuple[str, Sender]) -> None:
    base, sender = server
    one = post(base, orjson.dumps(event("ce-one")), "application/cloudevents+json; charset=utf-8")
    assert one.status_code == 202 and one.json()["accepted"] == 1, one.text
    batch = post(base, orjson.dumps([event("ce-b1"), event("ce-b2")]), "application/cloudevents-batch+json")
    assert batch.status_code == 202 and batch.json()["accepted"] == 2, batch.text
    assert [e["id"] for e in sender.sent[-3:]] == ["ce-one", "ce-b1", "ce-b2"]
    # Each of the binding's types says what the body holds.
    r = post(base, orjson.dumps([event("ce-arr")]), "application/cloudevents+json")
    assert error_of(r) == (422, "invalid_body"), r.text
    r = post(base, orjson.dumps(event("ce-obj")), "application/cloudevents-batch+json")
    assert error_of(r) == (422, "invalid_body"), r.text


def test_authentication_comes_before_the_media_type(server: tuple[str, Sender]) -> None:
    base, _ = server
    for content_type in ("text/plain", None, "application/json; charset=utf-16"):
        r = post(base, b"anything", content_type, auth=False)
        assert error_of(r) == (401, "unauthorized"), r.text


def test_parse_content_type() -> None:
    assert parse_content_type('Application/JSON ; Charset="utf-8"; x=1') == (
        "application/json",
        {"charset": "utf-8", "x": "1"},
    )
    assert parse_content_type("") == ("", {})


# ---- 3. slow and idle clients -------------------------------------------------------------------


def closed_by_server(sock: socket.socket, wait_s: float) -> bool:
    """Whether the server closed ``sock`` within ``wait_s`` (what it sent before is skipped)."""
    deadline = time.monotonic() + wait_s
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if sock.recv(4096) == b"":
                return True
        except TimeoutError:
            return False
        except OSError:  # reset
            return True
    return False


def test_a_request_head_sent_one_byte_a_second_is_cut_off() -> None:
    head = f"POST {EVENTS_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n".encode()
    with live_server(http_header_timeout_s=2.0) as (base, _):
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1]))) as slow:
            closed_after = None
            for i in range(10):  # far longer than the timeout: without it, the head is still arriving
                try:
                    slow.sendall(head[i : i + 1])
                except OSError:
                    closed_after = time.monotonic() - started
                    break
                if i == 0:
                    # A normal client is served meanwhile.
                    ok = post(base, orjson.dumps(event("while-slow")), "application/json")
                    assert ok.status_code == 202, ok.text
                if closed_by_server(slow, max(0.0, started + i + 1 - time.monotonic())):
                    closed_after = time.monotonic() - started
                    break
        assert closed_after is not None, "the slow client was still connected after 10 s"
        assert 1.5 <= closed_after <= 5.0, closed_after


def test_a_connection_that_sends_nothing_is_closed() -> None:
    with (
        live_server(http_header_timeout_s=1.0) as (base, _),
        socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1]))) as idle,
    ):
        assert closed_by_server(idle, 4.0)


def test_an_idle_kept_alive_connection_is_closed_after_the_keepalive_timeout() -> None:
    with (
        live_server(http_keepalive_timeout_s=1, http_header_timeout_s=30.0) as (base, _),
        socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1]))) as conn,
    ):
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        conn.settimeout(5)
        assert conn.recv(4096).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert closed_by_server(conn, 4.0)
        assert time.monotonic() - started < 3.0


def test_requests_beyond_the_concurrency_limit_get_503() -> None:
    with live_server(http_limit_concurrency=3, http_header_timeout_s=30.0) as (base, _):
        port = int(base.rsplit(":", 1)[1])
        holders = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            deadline = time.monotonic() + 5
            while (status := httpx.get(base + "/healthz").status_code) != 503:
                assert time.monotonic() < deadline, status
                time.sleep(0.05)
        finally:
            for sock in holders:
                sock.close()
        deadline = time.monotonic() + 5
        while (status := httpx.get(base + "/healthz").status_code) != 200:
            assert time.monotonic() < deadline, status
            time.sleep(0.05)


def test_a_kept_alive_connections_next_head_is_timed_too() -> None:
    """The head timer starts again at the first byte of the next request on the connection."""
    with (
        live_server(http_header_timeout_s=1.0, http_keepalive_timeout_s=30) as (base, _),
        socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1]))) as conn,
    ):
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        conn.settimeout(5)
        assert conn.recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(1.5)  # idle longer than the head timeout: only the keep-alive bounds this
        started = time.monotonic()
        conn.sendall(b"GET /hea")  # then the next head starts, and stops
        assert closed_by_server(conn, 5.0)
        assert time.monotonic() - started < 3.0


def test_pipelined_requests_are_each_answered() -> None:
    with (
        live_server() as (base, _),
        socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1]))) as conn,
    ):
        conn.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 2
            + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        conn.settimeout(5)
        got = b""
        while chunk := conn.recv(65536):
            got += chunk
        assert got.count(b"HTTP/1.1 200") == 3, got


# ---- 3b. the size of a request head ---------------------------------------------------------------


def _answer(sock: socket.socket) -> bytes:
    """What the server sends until it closes (or 5 s pass)."""
    sock.settimeout(5)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except (TimeoutError, OSError):
        pass
    return got


def _head(extra: int) -> bytes:
    return (
        f"POST {EVENTS_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nX-Pad: {'a' * extra}\r\n"
    ).encode()


def test_a_head_over_the_bound_is_431_and_the_server_goes_on() -> None:
    with live_server(http_max_head_bytes=4096) as (base, sender):
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(_head(5000) + b"Content-Length: 2\r\n\r\n{}")  # head and body in one send
            answer = _answer(conn)
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        assert b"larger than 4096 bytes" in answer
        assert sender.sent == []
        ok = post(base, orjson.dumps(event("after-431")), "application/json")
        assert ok.status_code == 202, ok.text


def test_a_head_that_never_ends_is_cut_off_near_the_bound() -> None:
    """A header value streamed without end: answered 431 once the head passes the bound, not
    when the client stops (memory held per connection stays near the bound)."""
    with live_server(http_max_head_bytes=4096, http_header_timeout_s=30.0) as (base, _):
        with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1]))) as conn:
            conn.sendall(_head(10)[:-2] + b"b" * 1000)  # the X-Pad value goes on and on
            sent = 0
            with contextlib.suppress(OSError):
                for _ in range(200):  # 200 KiB more, if the server let it
                    conn.sendall(b"b" * 1024)
                    sent += 1024
                    time.sleep(0.005)
            answer = _answer(conn)
        assert answer.startswith(b"HTTP/1.1 431 "), (sent, answer[:200])


def test_a_head_under_the_bound_is_served() -> None:
    with live_server(http_max_head_bytes=16384) as (base, sender):
        r = httpx.post(
            base + EVENTS_PATH,
            content=orjson.dumps(event("padded")),
            headers={**AUTH, "Content-Type": "application/json", "X-Pad": "a" * 12000},
            timeout=10,
        )
        assert r.status_code == 202, r.text
        assert [e["id"] for e in sender.sent] == ["padded"]


def test_a_malformed_request_is_400() -> None:
    with (
        live_server() as (base, _),
        socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1]))) as conn,
    ):
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost x\r\n\r\n")  # a header without its colon
        assert _answer(conn).startswith(b"HTTP/1.1 400 ")


@pytest.mark.parametrize("line", [b"GET /healthz", b"GET /healthz HTTP/2.0"])
def test_a_request_line_of_another_http_version_is_505(line: bytes) -> None:
    """What the parser takes beyond HTTP/1.x (others, e.g. 3.0, it refuses itself: 400)."""
    with (
        live_server() as (base, _),
        socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1]))) as conn,
    ):
        conn.sendall(line + b"\r\nHost: x\r\n\r\n")
        answer = _answer(conn)
    assert answer.startswith(b"HTTP/1.1 505 "), answer[:200]


def test_http_1_0_is_served() -> None:
    with (
        live_server() as (base, _),
        socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1]))) as conn,
    ):
        conn.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        assert _answer(conn).startswith(b"HTTP/1.1 200 ")


def test_the_limits_come_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERING_HTTP_HEADER_TIMEOUT_S", "3.5")
    monkeypatch.setenv("METERING_HTTP_KEEPALIVE_TIMEOUT_S", "7")
    monkeypatch.setenv("METERING_HTTP_LIMIT_CONCURRENCY", "42")
    monkeypatch.setenv("METERING_HTTP_MAX_HEAD_BYTES", "8192")
    config = server_config(FastAPI(), RunSettings())
    assert (config.timeout_keep_alive, config.limit_concurrency) == (7, 42)
    assert isinstance(config.http, type) and config.http.header_timeout_s == 3.5  # type: ignore[attr-defined]
    assert config.http.max_head_bytes == 8192  # type: ignore[attr-defined]
    fields = IngestSettings.model_fields
    defaults = [fields[f"http_{name}"].default for name in ("header_timeout_s", "keepalive_timeout_s")]
    assert [*defaults, fields["http_limit_concurrency"].default] == [10.0, 5, 1000]
    assert fields["http_max_head_bytes"].default == 16384  # h11's bound, which uvicorn had before


# ---- 5. a client that disconnects in the middle of its body -------------------------------------


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[], list[logging.LogRecord]]]:
    """Records of the root logger and of uvicorn's (which does not propagate to the root)."""
    caplog.set_level(logging.INFO)
    uvicorn_logger = logging.getLogger("uvicorn.error")
    uvicorn_logger.addHandler(caplog.handler)
    try:
        yield lambda: list(caplog.records)
    finally:
        uvicorn_logger.removeHandler(caplog.handler)


def test_a_client_gone_mid_body_is_one_log_line(
    server: tuple[str, Sender], all_logs: Callable[[], list[logging.LogRecord]]
) -> None:
    base, sender = server
    before = len(sender.sent)
    head = (
        f"POST {EVENTS_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1]))) as sock:
        sock.sendall(head + b"[" * 500)
        time.sleep(0.3)  # the server has read the half it was sent
    deadline = time.monotonic() + 5
    while not any("disconnected" in r.getMessage() for r in all_logs()):
        assert time.monotonic() < deadline, [r.getMessage() for r in all_logs()]
        time.sleep(0.05)
    time.sleep(0.3)  # anything logged after the line would show up by now
    records = all_logs()
    assert not any("Exception in ASGI application" in r.getMessage() for r in records)
    assert not any(r.exc_info for r in records)
    [line] = [r for r in records if "disconnected" in r.getMessage()]
    assert line.name == "ingest.http" and line.levelno == logging.WARNING
    assert "\n" not in line.getMessage()
    assert re.search(
        r"client 127\.0\.0\.1 disconnected before sending the whole body \(\d+ of 1000 bytes read\)",
        line.getMessage(),
    )
    assert len(sender.sent) == before
    # and the server carries on
    assert post(base, orjson.dumps(event("after-gone")), "application/json").status_code == 202
