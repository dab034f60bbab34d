"""A lean HTTP/1.1 client for the load generators: one kept-alive connection, one request at a time.

On this 2-core machine the benchmark's clients take their CPU from the server they measure. httpx
spent ~1.7 ms of CPU per 100-event request (17-20 µs per event, a fifth of the server's own cost)
on its request and response models, which a service sending usage from another machine would not
take from the server. This client writes the request's bytes itself and reads the answer with
httptools (llhttp, the parser the server uses), so the load generator costs a few µs per event.

Only what the benchmarks send: a request with a body of known length or none, an answer with
Content-Length or chunked framing. Anything else (a parse error, a closed connection) fails the
request with ``HttpClientError``, which the caller counts as a failed request.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import httptools


class HttpClientError(Exception):
    """The request got no complete answer: the connection closed or the answer did not parse."""


class _Answer(asyncio.Protocol):
    """The connection's protocol: feeds what arrives to the response parser, one answer at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._body: list[bytes] = []
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None

    # asyncio's callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(HttpClientError(f"the answer did not parse: {exc}"))
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(HttpClientError(f"the connection closed before the answer ({exc or 'EOF'})"))

    # httptools' callbacks
    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        body, self._body = b"".join(self._body), []
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result((self._parser.get_status_code(), body))

    def _fail(self, exc: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)

    def send(self, data: bytes) -> asyncio.Future[tuple[int, bytes]]:
        if self.transport is None or self.transport.is_closing():
            raise HttpClientError("the connection is closed")
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self._waiter


class Connection:
    """``async with Connection(url, headers) as c: status, body = await c.post(path, body)``
    (or ``await c.request("GET", "/path?query")``).

    A request that fails closes the connection (a late answer must not be read as the next
    request's); the next request opens a new one, as httpx's pool does."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"an http:// URL is needed, not {url!r}")
        self._host, self._port = parts.hostname, parts.port or 80
        fixed = {"Host": parts.netloc, **headers}
        self._head = "".join(f"{k}: {v}\r\n" for k, v in fixed.items()).encode("latin-1")
        self._answer: _Answer | None = None

    async def __aenter__(self) -> Connection:
        await self._connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._close()

    async def _connect(self) -> _Answer:
        loop = asyncio.get_running_loop()
        _, self._answer = await loop.create_connection(_Answer, self._host, self._port)
        return self._answer

    def _close(self) -> None:
        if self._answer is not None and self._answer.transport is not None:
            self._answer.transport.close()
        self._answer = None

    async def post(self, path: str, body: bytes, timeout: float = 30) -> tuple[int, bytes]:
        """(status, body) of the answer; raises ``HttpClientError`` or ``TimeoutError``."""
        return await self.request("POST", path, body, timeout)

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        timeout: float = 30,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """(status, body) of the answer to ``method path`` (``path`` with its query string),
        ``headers`` added to the connection's; raises ``HttpClientError`` or ``TimeoutError``."""
        answer = self._answer
        if answer is None or answer.transport is None or answer.transport.is_closing():
            answer = await self._connect()
        request = b"".join(
            (
                f"{method} {path} HTTP/1.1\r\n".encode("latin-1"),
                self._head,
                "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()).encode("latin-1"),
                b"\r\n" if body is None else b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
            )
        )
        try:
            return await asyncio.wait_for(answer.send(request), timeout)
        except BaseException:
            self._close()
            raise
