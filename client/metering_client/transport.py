"""Transports: how one batch of prepared events is sent, and what each event's answer is.

A transport sends one request and says what happened (``Outcome``): a result per event, or
"try again" (a 429, a 5xx, a connection error, an answer that could not be read), or a failure of
the whole request (a 401 for a revoked key, a 413…). It never retries by itself: the client does,
with the same events and ids (``metering_client.retry``).

``interpret_response`` is the pure reading of an HTTP answer (docs/api.md, "Ingest"); the HTTP
transports are that plus httpx.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from metering_client.prepare import encoded_json
from metering_client.results import EventResult, Status
from metering_client.retry import parse_retry_after

EVENTS_PATH = "/api/v1/events"
CONTENT_TYPE = "application/json"
USER_AGENT = "usage-metering-client/0.1"
#: The ingest's limits (docs/api.md): events per request, body bytes, one event's bytes.
MAX_BATCH_EVENTS = 100
MAX_BODY_BYTES = 1024 * 1024
MAX_EVENT_BYTES = 32 * 1024
#: Connect quickly, but give the ingest the time it may take to have Kafka confirm a batch.
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)


@dataclass(frozen=True)
class Outcome:
    """What one attempt gave: per-event ``results`` (in the batch's order), or ``retry`` (the
    reason; ``retry_after`` in seconds if the server said), or a whole-request failure ``code``."""

    results: list[EventResult] | None = None
    retry: str | None = None
    retry_after: float | None = None
    code: str | None = None
    message: str | None = None

    @staticmethod
    def again(reason: str, retry_after: float | None = None) -> Outcome:
        return Outcome(retry=reason, retry_after=retry_after)

    def final_results(self, ids: Sequence[str]) -> list[EventResult]:
        """A result per event of the batch (for a whole-request failure, the same for each)."""
        if self.results is not None:
            return self.results
        return [EventResult(i, Status.FAILED, self.code, self.message) for i in ids]


class Transport(Protocol):
    """Sends one batch (at most ``max_events`` events, ``max_body_bytes`` as a JSON array)."""

    max_events: int
    max_body_bytes: int

    def send(self, events: Sequence[Mapping[str, Any]]) -> Outcome: ...

    def close(self) -> None: ...


class AsyncTransport(Protocol):
    max_events: int
    max_body_bytes: int

    async def send(self, events: Sequence[Mapping[str, Any]]) -> Outcome: ...

    async def aclose(self) -> None: ...


def encode_body(events: Sequence[Mapping[str, Any]]) -> bytes:
    """The request body: a JSON array, compact UTF-8."""
    return encoded_json(list(events))


def _error_of(content: bytes) -> tuple[str | None, str | None]:
    try:
        error = json.loads(content)["error"]
        return str(error["code"]), str(error.get("message") or "")
    except (ValueError, KeyError, TypeError):
        return None, None


def interpret_response(
    status: int, headers: Mapping[str, str], content: bytes, ids: Sequence[str]
) -> Outcome:
    """The outcome of an answer of ``POST /api/v1/events`` to a batch of events with ``ids``."""
    retry_after = parse_retry_after(headers.get("retry-after"))
    if status == 202:
        try:
            body = json.loads(content)
            by_index = {int(r["index"]): r for r in body["results"]}
            results = []
            for index, event_id in enumerate(ids):
                r = by_index[index]
                results.append(EventResult(event_id, Status(r["status"]), r.get("code"), r.get("message")))
        except (ValueError, KeyError, TypeError) as exc:
            # Perhaps accepted, perhaps not: sending again is safe (the ids are counted once).
            return Outcome.again(f"unreadable 202 answer ({type(exc).__name__})")
        return Outcome(results=results)
    code, message = _error_of(content)
    if status == 429 or status == 408 or status >= 500:
        # 503 kafka_unavailable / credentials_unavailable, the server's own 503 at its
        # concurrency limit (plain text), a proxy's 502/504: all worth another try.
        return Outcome.again(f"HTTP {status} {code or ''}".rstrip(), retry_after)
    return Outcome(code=code or f"http_{status}", message=message or f"HTTP {status}")


class HttpTransport:
    """``POST /api/v1/events`` with an API key, over one pooled httpx client."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        max_events: int = MAX_BATCH_EVENTS,
        max_body_bytes: int = MAX_BODY_BYTES,
        http: httpx.Client | None = None,
    ) -> None:
        self.max_events = max_events
        self.max_body_bytes = max_body_bytes
        self._url = base_url.rstrip("/") + EVENTS_PATH
        self._headers = _headers(api_key)
        self._http = http or httpx.Client(timeout=timeout)

    def send(self, events: Sequence[Mapping[str, Any]]) -> Outcome:
        ids = [str(e["id"]) for e in events]
        try:
            r = self._http.post(self._url, content=encode_body(events), headers=self._headers)
        except httpx.TransportError as exc:  # connect/read errors, timeouts, dropped connections
            return Outcome.again(f"{type(exc).__name__}: {exc}")
        return interpret_response(r.status_code, r.headers, r.content, ids)

    def close(self) -> None:
        self._http.close()


class AsyncHttpTransport:
    """The asyncio twin of ``HttpTransport``."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        max_events: int = MAX_BATCH_EVENTS,
        max_body_bytes: int = MAX_BODY_BYTES,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.max_events = max_events
        self.max_body_bytes = max_body_bytes
        self._url = base_url.rstrip("/") + EVENTS_PATH
        self._headers = _headers(api_key)
        self._http = http or httpx.AsyncClient(timeout=timeout)

    async def send(self, events: Sequence[Mapping[str, Any]]) -> Outcome:
        ids = [str(e["id"]) for e in events]
        try:
            r = await self._http.post(self._url, content=encode_body(events), headers=self._headers)
        except httpx.TransportError as exc:
            return Outcome.again(f"{type(exc).__name__}: {exc}")
        return interpret_response(r.status_code, r.headers, r.content, ids)

    async def aclose(self) -> None:
        await self._http.aclose()


def _headers(api_key: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {api_key}",
        "Content-Type": CONTENT_TYPE,
        "Accept": "application/json",
        "User-Agent": USER_AGENT,
    }
