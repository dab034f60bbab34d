"""The load generators' HTTP client (bench/http_client.py) against a loopback server that answers
with scripted bytes: what it sends, the answers it reads, and how it fails."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from bench.http_client import Connection, HttpClientError

Script = Callable[[bytes, int], bytes | None]  # (request bytes, request number) -> answer; None: close


async def _serve(script: Script) -> tuple[asyncio.Server, list[bytes], str]:
    """A server that reads each request whole (head, then Content-Length bytes) and answers it
    as ``script`` says; it records every request it read."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                request = head + await reader.readexactly(length)
                seen.append(request)
                answer = script(request, len(seen))
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, seen, f"http://127.0.0.1:{port}"


def _answer(status: int, body: bytes) -> bytes:
    return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)


def test_posts_on_one_kept_alive_connection_and_reads_each_answer() -> None:
    async def scenario() -> None:
        server, seen, url = await _serve(lambda req, n: _answer(202 if n == 1 else 400, b'{"n":%d}' % n))
        async with server, Connection(url, {"Authorization": "Bearer k"}) as conn:
            first = await conn.post("/api/v1/events", b"[1]")
            second = await conn.post("/api/v1/events", b"[22]")
        assert first == (202, b'{"n":1}')
        assert second == (400, b'{"n":2}')
        head, _, body = seen[0].partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0] == b"POST /api/v1/events HTTP/1.1"
        assert b"Authorization: Bearer k" in lines
        assert f"Host: {url.removeprefix('http://')}".encode() in lines
        assert b"Content-Length: 3" in lines and body == b"[1]"
        assert seen[1].endswith(b"Content-Length: 4\r\n\r\n[22]")

    asyncio.run(scenario())


def test_reads_a_chunked_answer_that_arrives_in_pieces() -> None:
    chunked = b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"

    async def scenario() -> None:
        server, _, url = await _serve(lambda req, n: chunked)
        async with server, Connection(url, {}) as conn:
            assert await conn.post("/x", b"{}") == (202, b"abcde")

    asyncio.run(scenario())


def test_a_closed_connection_fails_the_request_and_the_next_one_reconnects() -> None:
    async def scenario() -> None:
        server, seen, url = await _serve(lambda req, n: None if n == 1 else _answer(202, b"ok"))
        async with server, Connection(url, {}) as conn:
            with pytest.raises(HttpClientError, match="closed before the answer"):
                await conn.post("/x", b"a")
            assert await conn.post("/x", b"b") == (202, b"ok")
        assert len(seen) == 2

    asyncio.run(scenario())


def test_a_connection_the_server_closed_after_its_answer_is_not_reused() -> None:
    async def scenario() -> None:
        connections = 0

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal connections
            connections += 1
            head = await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
            writer.write(b"HTTP/1.1 202 X\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with server, Connection(url, {}) as conn:
            assert await conn.post("/x", b"1") == (202, b"ok")
            await asyncio.sleep(0.1)  # the close arrives
            assert await conn.post("/x", b"2") == (202, b"ok")
        assert connections == 2

    asyncio.run(scenario())


def test_an_answer_that_does_not_parse_fails_the_request() -> None:
    async def scenario() -> None:
        server, _, url = await _serve(lambda req, n: b"NOT HTTP AT ALL\r\n\r\n")
        async with server, Connection(url, {}) as conn:
            with pytest.raises(HttpClientError, match="did not parse"):
                await conn.post("/x", b"a")

    asyncio.run(scenario())


def test_a_late_answer_is_not_read_as_the_next_requests() -> None:
    """A request given up on (timeout) closes its connection: its answer, arriving later, cannot
    be taken for the next request's."""

    async def scenario() -> None:
        answers = {1: b"late", 2: b"second"}

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            body = await reader.readexactly(length)
            if body == b"1":
                await asyncio.sleep(0.3)
            try:
                writer.write(_answer(202, answers[int(body)]))
                await writer.drain()
                await reader.read()  # until the client closes
            except ConnectionError:
                pass
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with server, Connection(url, {}) as conn:
            with pytest.raises(TimeoutError):
                await conn.post("/x", b"1", timeout=0.1)
            assert await conn.post("/x", b"2") == (202, b"second")

    asyncio.run(scenario())


def test_only_http_urls() -> None:
    with pytest.raises(ValueError, match="http://"):
        Connection("https://example.com", {})
