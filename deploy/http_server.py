"""The HTTP server of every process, configured from settings against slow and idle clients.

uvicorn (0.54) brings two of the bounds a public HTTP server needs: a keep-alive timeout (an idle
connection between two requests is closed) and a concurrency limit (a request arriving while
``limit_concurrency`` connections are open, or requests running, is answered 503). It has no
bound on the time a client may take to send a request head: a client that opens a connection and
sends nothing, or sends its headers one byte a second, holds the connection for ever, and enough
of them hold every one the server can keep (slowloris).

``BoundedHeadProtocol`` is uvicorn's httptools protocol (its C parser, llhttp: cheaper per request
than the pure-Python h11, docs/performance.md "HTTP ingest") with the bounds a request head
needs:

- **time**: a connection whose request head is not complete within ``header_timeout_s`` of the
  moment the server started waiting for it (the connection opened, or the first byte of the next
  request on a kept-alive connection arrived) is closed without an answer. A kept-alive
  connection that sends nothing stays bounded by the keep-alive timeout alone.
- **size**: a head (request line and headers) larger than ``max_head_bytes`` is answered ``431``
  and the connection closed. h11 had this bound built in (16 KiB); llhttp has none, and uvicorn
  keeps every header it is given.
- **version**: HTTP/1.0 and 1.1 only. llhttp also takes a request line without a version
  (HTTP/0.9) or with 2.0 and up, which h11 refused: they are answered ``505``.

The request body is not bounded here; the ingest bounds what it reads (``ingest_max_body_bytes``)
and a reverse proxy in front adds the rest (deploy/README.md).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from deploy.settings import HttpSettings

log = logging.getLogger(__name__)


class _Refused(Exception):
    """An answer given by the protocol itself, and the connection closed: raised from a parser
    callback, it stops the parsing (``data_received`` answers)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


class BoundedHeadProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, bounding a request head in time and size and refusing
    versions other than HTTP/1.0 and 1.1 (see the module doc).

    ``header_timeout_s`` and ``max_head_bytes`` are set on a subclass by ``bounded_head_protocol``:
    uvicorn builds one protocol object per connection from the class it is given, with no room
    for extra arguments.
    """

    # the settings' defaults, for a class used as it is (bounded_head_protocol sets both)
    header_timeout_s: float = HttpSettings.model_fields["http_header_timeout_s"].default
    max_head_bytes: int = HttpSettings.model_fields["http_max_head_bytes"].default

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        # Bytes of the head being received, None between heads (after one is complete, until
        # the first byte of the next): counted twice over, as data arrives (a head that never
        # ends) and as the parser hands its parts over (a head that ends in the chunk that
        # also brings the body: the chunk's size says nothing about the head's then).
        self._head_received: int | None = None
        self._head_parsed = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_started()  # a connection that never sends a byte is bounded too

    def data_received(self, data: bytes) -> None:
        # uvicorn's, with the head's size checked
        self._unset_keepalive_if_required()
        idle = not self.pipeline and (self.cycle is None or self.cycle.response_complete)
        if self._head_received is None and idle:
            self._head_started()  # the first byte of the next request on a kept-alive connection
        if self._head_received is not None:
            self._head_received += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _Refused):
                self._refuse(exc.__context__)
                return
            self._invalid()
            return
        except httptools.HttpParserError:
            self._invalid()
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._head_received is not None and self._head_received > self.max_head_bytes:
            self._refuse(self._too_large())

    def on_message_begin(self) -> None:
        # the first byte of a request whose head is not timed yet: one pipelined behind another
        if self._head_received is None:
            self._head_started()
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._parsed(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._parsed(len(name) + len(value) + 4)  # "name: value\r\n"
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        self._head_received = None
        # llhttp also takes a request line without a version (HTTP/0.9) or with 2.0 and up; h11,
        # uvicorn's other parser, refused them: so does this server (RFC 9110, 15.6.6)
        version = self.parser.get_http_version()
        if version not in ("1.0", "1.1"):
            raise _Refused(
                505, "HTTP Version Not Supported", f"HTTP/{version} is not served here: use HTTP/1.1"
            )
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _head_started(self) -> None:
        self._disarm()
        self._head_received, self._head_parsed = 0, 0
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _parsed(self, n: int) -> None:
        self._head_parsed += n
        if self._head_parsed > self.max_head_bytes:
            raise self._too_large()  # out of the parser: data_received answers 431

    def _too_large(self) -> _Refused:
        return _Refused(
            431,
            "Request Header Fields Too Large",
            f"the request head is larger than {self.max_head_bytes} bytes",
        )

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse(self, refused: _Refused) -> None:
        self._disarm()
        self._head_received = None
        if not self.transport.is_closing():
            # DEBUG, as for the timeout: a flood of these is an attack, not news
            log.debug("answered %s %d: %s", self.client, refused.status, refused.message)
            body = refused.message.encode()
            self.transport.write(
                b"HTTP/1.1 %d %s\r\n"
                b"content-type: text/plain; charset=utf-8\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                % (refused.status, refused.reason.encode(), len(body), body)
            )
            self.transport.close()

    def _invalid(self) -> None:
        self._disarm()
        self._head_received = None
        if not self.transport.is_closing():
            msg = "Invalid HTTP request received."  # uvicorn's words, log line and answer
            self.logger.warning(msg)
            self.send_400_response(msg)  # and it closes

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._head_received is not None and not self.transport.is_closing():
            # DEBUG: a flood of these is the attack itself; one line each would only add to it.
            log.debug(
                "closed a connection from %s: no complete request head within %.1f s",
                self.client,
                self.header_timeout_s,
            )
            self.transport.close()


def bounded_head_protocol(header_timeout_s: float, max_head_bytes: int) -> type[BoundedHeadProtocol]:
    """The protocol class to pass as ``uvicorn.Config(http=...)``."""

    class Protocol(BoundedHeadProtocol):
        pass

    Protocol.header_timeout_s = header_timeout_s
    Protocol.max_head_bytes = max_head_bytes
    return Protocol


def server_config(app: Any, settings: HttpSettings) -> uvicorn.Config:
    """uvicorn's configuration for ``app``: address, and the timeouts and limits of the settings."""
    return uvicorn.Config(
        app,
        host=settings.http_host,
        port=settings.http_port,
        log_level="warning",
        lifespan="on",
        http=bounded_head_protocol(settings.http_header_timeout_s, settings.http_max_head_bytes),
        timeout_keep_alive=settings.http_keepalive_timeout_s,
        limit_concurrency=settings.http_limit_concurrency,
    )
