"""The HTTP server of every process, configured from settings against slow and idle clients.

uvicorn (0.54) brings two of the three bounds a public HTTP server needs: a keep-alive timeout
(an idle connection between two requests is closed) and a concurrency limit (a request arriving
while ``limit_concurrency`` connections are open, or requests running, is answered 503). It has no
bound on the time a client may take to send a request head: a client that opens a connection and
sends nothing, or sends its headers one byte a second, holds the connection for ever, and enough
of them hold every one the server can keep (slowloris).

``HeaderTimeoutH11Protocol`` adds that bound to uvicorn's h11 protocol, the one uvicorn uses here
(``httptools`` is not installed): a connection whose request head is not complete within
``header_timeout_s`` of the moment the server started waiting for it (the connection opened, or
the first byte of the next request on a kept-alive connection arrived) is closed without an
answer. A kept-alive connection that sends nothing stays bounded by the keep-alive timeout alone.

The request body is not bounded here; a reverse proxy in front adds that (deploy/README.md).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from deploy.settings import HttpSettings

log = logging.getLogger(__name__)


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head is late (see module doc).

    ``header_timeout_s`` is set on a subclass by ``header_timeout_protocol``: uvicorn builds one
    protocol object per connection from the class it is given, with no room for extra arguments.
    """

    header_timeout_s: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # a connection that never sends a byte is bounded too

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the first byte of the next request on a kept-alive connection
        super().data_received(data)
        self._disarm_if_head_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # A pipelined next request may already be buffered in part: its head is timed as well.
        pending = self.conn.trailing_data[0] and self.conn.their_state is h11.IDLE
        if pending and self._head_timer is None and not self.transport.is_closing():
            self._arm()
        self._disarm_if_head_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _disarm_if_head_complete(self) -> None:
        # h11 leaves IDLE for the client as soon as it has parsed a whole request head.
        if self.conn.their_state is not h11.IDLE:
            self._disarm()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            # DEBUG: a flood of these is the attack itself; one line each would only add to it.
            log.debug(
                "closed a connection from %s: no complete request head within %.1f s",
                self.client,
                self.header_timeout_s,
            )
            self.transport.close()


def header_timeout_protocol(header_timeout_s: float) -> type[HeaderTimeoutH11Protocol]:
    """The protocol class to pass as ``uvicorn.Config(http=...)``."""

    class Protocol(HeaderTimeoutH11Protocol):
        pass

    Protocol.header_timeout_s = header_timeout_s
    return Protocol


def server_config(app: Any, settings: HttpSettings) -> uvicorn.Config:
    """uvicorn's configuration for ``app``: address, and the timeouts and limits of the settings."""
    return uvicorn.Config(
        app,
        host=settings.http_host,
        port=settings.http_port,
        log_level="warning",
        lifespan="on",
        http=header_timeout_protocol(settings.http_header_timeout_s),
        timeout_keep_alive=settings.http_keepalive_timeout_s,
        limit_concurrency=settings.http_limit_concurrency,
    )
