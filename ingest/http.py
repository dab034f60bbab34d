"""HTTP ingest: ``POST /api/v1/events`` puts CloudEvents into Kafka for the API key's tenant.

Mount it with::

    router, producer = ingest_router(settings, clickhouse_client, bootstrap)  # close producer on exit
    app.include_router(router)

or, to supply the parts yourself, ``build_ingest_router(get_producer, get_credentials, settings,
get_scopes=...)`` where ``get_producer()`` returns the process's ``UsageProducer`` (built with
``delivery_timeout_s=settings.ingest_delivery_timeout_s``), ``get_credentials()`` its
``CredentialStore`` and ``get_scopes()`` its ``ingest.scope.ScopeStore``; all are called per
request, so they may be built lazily.

The request: ``Authorization: Bearer <api key>``; the body is one CloudEvent object or a JSON
array of up to ``ingest_max_events_per_request`` of them, at most ``ingest_max_body_bytes``,
in UTF-8, sent as ``application/json``, ``application/cloudevents+json`` (one event) or
``application/cloudevents-batch+json`` (an array), ``charset=utf-8`` optional (docs/api.md,
"HTTP ingest: request rules").
The tenant is the API key's, never the payload's. A usage key sends usage events only (a
lifecycle event is ``forbidden_event_type``: the control plane is the administrators', written
with ``metering admin`` to the control topic) and only for resources inside its scope
(``out_of_scope``, ingest/scope.py). Every event of a request is judged by one instant, sent as
the Kafka message timestamp, so the aggregator takes the same decision: a 202 is counted.
Every per-event code: docs/api.md, "Ingest".

The answer, ``202``, reports every event by position::

    {"results": [{"index": 0, "id": "...", "status": "accepted"|"duplicate"|"rejected",
                  "code": "...", "message": "..."}],
     "accepted": 1, "duplicates": 0, "rejected": 0}

``202`` is sent only after Kafka acknowledged (``acks=all``) every accepted event; if it did not
within ``ingest_delivery_timeout_s`` the answer is ``503`` (retry later, same ids: the pipeline
counts an id once). ``duplicate``: the id appeared earlier in the request, or this process
delivered it recently. Other answers, all ``{"error": {"code", "message", "details"}}``:
``400 invalid_json|invalid_encoding``, ``401 unauthorized``, ``413 payload_too_large|too_many_events``,
``415 unsupported_media_type|unsupported_charset`` (after authentication),
``422 invalid_body|empty_batch``, ``429 rate_limited`` (per API key, and per client address
after repeated failed authentications; with ``Retry-After``),
``503 kafka_unavailable|credentials_unavailable`` (with ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from typing import Any, Protocol

import orjson
from fastapi import APIRouter, Request, Response
from prometheus_client import Counter
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from aggregators.rejections import Rejection
from deploy.settings import IngestSettings
from ingest.openapi import ingest_openapi
from ingest.prepare_batch import prepare_events
from ingest.rejections import IngestRejectionRecorder, ingest_rejections
from ingest.scope import KeyScope, ScopeCheck, ScopeLookup, ScopeStore
from ingest.sdk import InvalidEvent, UsageProducer
from query_api.credentials import CredentialStore, Principal, display_prefix
from query_api.event_trace import KafkaScanner, Tracer
from query_api.ratelimit import RateLimiter
from schemas.events import EntityKind
from schemas.meters import default_catalog
from schemas.validation import RejectCode, kafka_time, now_ms

log = logging.getLogger(__name__)

EVENTS_PATH = "/api/v1/events"
RETRY_AFTER_UNAVAILABLE_S = 5
#: A request judged on the event loop holds it for its checks, ~3 ms for 100 events: larger ones
#: (a raised ingest_max_events_per_request) go to the thread pool, so the loop never waits long.
ON_LOOP_MAX_EVENTS = 100
#: Events the producer may have queued or in flight for a request still to be handed over on the
#: loop: far below librdkafka's queue (100,000 messages), whose full queue makes a hand-over wait.
ON_LOOP_MAX_PENDING = 10_000

EVENTS_ANSWERED = Counter(
    "metering_ingest_events_total",
    "Events in 202 answers of the HTTP ingest, by their status (accepted: in Kafka)",
    ["status"],
)
for _status in ("accepted", "duplicate", "rejected"):
    EVENTS_ANSWERED.labels(_status)  # every series exists from the start, at 0


class BatchSender(Protocol):
    """What the endpoint needs of ``ingest.sdk.UsageProducer``."""

    def send_batch(
        self,
        events: Iterable[Mapping[str, Any]],
        tenant: str,
        *,
        backfill: bool = False,
        timeout: float | None = None,
        validated: bool = False,
        judged_at_ms: int | None = None,
    ) -> None: ...


class CredentialLookup(Protocol):
    """What the endpoint needs of ``query_api.credentials.CredentialStore``."""

    def lookup(self, raw: str, kind: EntityKind) -> Principal | None: ...


# ---- in-process state (pure, thread-safe) -----------------------------------------------------


class RecentIds:
    """Bounded LRU of ``(tenant, event id)`` delivered by this process, to answer ``duplicate``
    to client retries. Only a hint for the client: exactly-once counting is done downstream,
    and ids are remembered only after Kafka acknowledged them, so a failed send never makes
    the retry look like a duplicate."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._capacity = capacity
        self._ids: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._ids

    def known(self, tenant: str, ids: Iterable[str]) -> set[str]:
        """Those of ``ids`` delivered for ``tenant`` (one lock for a request's events)."""
        with self._lock:
            return {i for i in ids if (tenant, i) in self._ids}

    def add_all(self, keys: Iterable[tuple[str, str]]) -> None:
        with self._lock:
            ids = self._ids
            for key in keys:
                if key in ids:  # rare: a new key is appended at the end by the assignment
                    ids.move_to_end(key)
                else:
                    ids[key] = None
            for _ in range(len(ids) - self._capacity):
                ids.popitem(last=False)


# ---- request handling -------------------------------------------------------------------------


class _HttpError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details = dict(details or {})
        self.headers = dict(headers or {})


def error_response(
    status: int,
    code: str,
    message: str,
    details: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    body = {"error": {"code": code, "message": message, "details": dict(details or {})}}
    return Response(json_bytes(body), status_code=status, media_type="application/json", headers=headers)


def json_bytes(value: Any) -> bytes:
    """orjson, or for what it refuses (a lone surrogate echoed back from a lenient parse) the
    standard library with ASCII escapes: an answer is always sent."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return json.dumps(value, ensure_ascii=True, default=str).encode()


def parse_body(body: bytes) -> Any:
    """The JSON body. Non-finite numbers (``NaN``, ``Infinity``, ``1e400``) are not JSON that
    orjson accepts, but they are a bad *value* in one event, not a broken request: the lenient
    parser lets that event be rejected alone. Raises ``UnicodeDecodeError`` for bytes that are
    not UTF-8 and ``ValueError`` for anything else."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        try:
            # Decoded as UTF-8 here: given bytes, json.loads would guess UTF-16 or UTF-32.
            return json.loads(body.decode("utf-8"))
        except RecursionError:
            raise ValueError("the JSON is nested too deeply") from None


def _encoded_len(item: Any) -> int:
    """Bytes of ``item`` as compact JSON; raises ``InvalidEvent`` if it cannot be encoded."""
    try:
        return len(orjson.dumps(item))
    except orjson.JSONEncodeError:  # beyond orjson: a 65-bit integer, deep nesting, a lone surrogate
        pass
    try:
        return len(json.dumps(item, default=str, separators=(",", ":")).encode())
    except (RecursionError, ValueError):
        raise InvalidEvent(RejectCode.INVALID_EVENT, "the event is nested too deeply") from None


def _too_many(message: str, wait_s: float) -> _HttpError:
    seconds = max(1, math.ceil(wait_s))
    return _HttpError(429, "rate_limited", message, {"retry_after_s": seconds}, {"Retry-After": str(seconds)})


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, credential = header.partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        raise _HttpError(
            401,
            "unauthorized",
            "send an API key as `Authorization: Bearer <key>`",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return credential.strip()


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = _HttpError(
        413, "payload_too_large", f"the body exceeds {limit} bytes", {"max_body_bytes": limit}
    )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        # The client's doing, not an error here: one line, no traceback. The answer below goes
        # nowhere (the connection is gone); it only ends the request.
        log.warning(
            "client %s disconnected before sending the whole body (%d of %s bytes read)",
            request.client.host if request.client else "?",
            size,
            declared if declared and declared.isdigit() else "unknown",
        )
        raise _HttpError(400, "client_disconnected", "the client disconnected during the body") from None
    return b"".join(chunks)


# ---- request rules: media type and encoding (docs/api.md, "HTTP ingest: request rules") ------

JSON_MEDIA_TYPE = "application/json"  # one event (an object) or an array of events
CLOUDEVENT_MEDIA_TYPE = "application/cloudevents+json"  # CloudEvents HTTP binding, structured: one
CLOUDEVENTS_BATCH_MEDIA_TYPE = "application/cloudevents-batch+json"  # the binding's batch: an array
ACCEPTED_MEDIA_TYPES = (JSON_MEDIA_TYPE, CLOUDEVENT_MEDIA_TYPE, CLOUDEVENTS_BATCH_MEDIA_TYPE)
_ACCEPT_HEADER = {"Accept": ", ".join(ACCEPTED_MEDIA_TYPES)}
_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")  # UTF-32 LE begins like UTF-16 LE; UTF-32 BE with NULs


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """``(media type, parameters)`` of a Content-Type value, names lower-cased, values unquoted."""
    media, *params = value.split(";")
    parameters: dict[str, str] = {}
    for param in params:
        name, sep, param_value = param.partition("=")
        if sep:
            parameters[name.strip().lower()] = param_value.strip().strip('"')
    return media.strip().lower(), parameters


def _media_type(request: Request) -> str:
    """The request's media type, one of ``ACCEPTED_MEDIA_TYPES``, else 415. JSON is UTF-8
    (RFC 8259): a ``charset`` parameter, optional, may only say so."""
    raw = request.headers.get("content-type", "")
    media, params = parse_content_type(raw)
    if media not in ACCEPTED_MEDIA_TYPES:
        got = f"not {raw[:100]!r}" if raw else "the request has no Content-Type"
        raise _HttpError(
            415,
            "unsupported_media_type",
            f"send events as {', '.join(ACCEPTED_MEDIA_TYPES)} (charset=utf-8 optional); {got}",
            {"content_type": raw[:100] or None, "accepted": list(ACCEPTED_MEDIA_TYPES)},
            _ACCEPT_HEADER,
        )
    charset = params.get("charset")
    if charset is not None and charset.lower() != "utf-8":
        raise _HttpError(
            415,
            "unsupported_charset",
            f"JSON is exchanged as UTF-8 (RFC 8259); charset={charset[:40]} is not accepted",
            {"charset": charset[:40], "accepted_charsets": ["utf-8"]},
            _ACCEPT_HEADER,
        )
    return media


def _not_utf8(reason: str) -> _HttpError:
    return _HttpError(
        400, "invalid_encoding", f"{reason}; JSON is exchanged as UTF-8 (RFC 8259)", {"encoding": "utf-8"}
    )


def _utf8_body(body: bytes) -> bytes:
    """The body without a UTF-8 byte order mark (RFC 8259 lets a parser ignore one); 400 for a
    UTF-16 or UTF-32 body, with or without its byte order mark. Other invalid UTF-8 is found
    while parsing (``parse_body`` raises ``UnicodeDecodeError``)."""
    if body.startswith(_UTF8_BOM):
        return body[len(_UTF8_BOM) :]
    # JSON in UTF-8 never holds a NUL byte (a NUL in a string is written \u0000), while UTF-16
    # and UTF-32 put NULs in every ASCII character: a cheap, certain test even without a BOM.
    if body.startswith(_UTF16_BOMS) or b"\x00" in body:
        raise _not_utf8("the body is UTF-16 or UTF-32")
    return body


def _check_shape(payload: Any, media_type: str) -> None:
    """The CloudEvents binding's two media types each say what the body holds."""
    if media_type == CLOUDEVENT_MEDIA_TYPE and not isinstance(payload, dict):
        raise _HttpError(
            422,
            "invalid_body",
            f"{CLOUDEVENT_MEDIA_TYPE} carries one event (an object); "
            f"send an array as {CLOUDEVENTS_BATCH_MEDIA_TYPE}",
        )
    if media_type == CLOUDEVENTS_BATCH_MEDIA_TYPE and not isinstance(payload, list):
        raise _HttpError(
            422,
            "invalid_body",
            f"{CLOUDEVENTS_BATCH_MEDIA_TYPE} carries an array of events; send one as {CLOUDEVENT_MEDIA_TYPE}",
        )


def build_ingest_router(
    get_producer: Callable[[], BatchSender],
    get_credentials: Callable[[], CredentialLookup],
    settings: IngestSettings,
    *,
    get_scopes: Callable[[], ScopeLookup],
    recent_ids_capacity: int = 100_000,
    failed_auth_per_minute: int = 60,
    on_rejected: Callable[[list[Rejection]], None] | None = None,
) -> APIRouter:
    """The router serving ``POST /api/v1/events`` (see the module doc).

    ``get_scopes()``: what each key may report for (``ingest.scope.ScopeStore``); an event
    naming a resource outside it is rejected (``out_of_scope``).
    ``failed_auth_per_minute``: failed authentications allowed per client address (then 429),
    so guessing keys is slow.
    ``on_rejected(rows)``: records the request's rejected events (ingest/rejections.py), called
    after the answer is sent."""
    router = APIRouter(tags=["ingest"])
    # the query API's limiter (query_api/ratelimit.py), the same rules and storage for both
    limits_at = settings.rate_limit_storage.get_secret_value()
    limiter = RateLimiter(settings.ingest_rate_limit_per_minute, storage=limits_at, name="ingest")
    failures = RateLimiter(failed_auth_per_minute, storage=limits_at, name="ingest-auth-failures")
    recent = RecentIds(recent_ids_capacity)
    max_events = settings.ingest_max_events_per_request

    async def authenticate(request: Request) -> Principal:
        raw = _bearer(request)
        try:
            store = get_credentials()
            principal = await run_in_threadpool(store.lookup, raw, EntityKind.API_KEY)
        except Exception as exc:
            log.warning("credential lookup failed for key %s: %s", display_prefix(raw), type(exc).__name__)
            raise _HttpError(
                503,
                "credentials_unavailable",
                "API keys cannot be checked right now; retry later",
                headers={"Retry-After": str(RETRY_AFTER_UNAVAILABLE_S)},
            ) from None
        if principal is None or not principal.active:
            wait = failures.acquire(request.client.host if request.client else "?")
            if wait is not None:
                raise _too_many("too many failed authentications from this address", wait)
            raise _HttpError(
                401, "unauthorized", "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"}
            )
        return principal

    def key_scope(principal: Principal) -> KeyScope:
        """Blocking (the tenant's entities, cached): call it from the thread pool."""
        try:
            return get_scopes().key_scope(principal)
        except Exception as exc:
            log.warning("scope lookup failed for tenant %s: %s", principal.tenant, type(exc).__name__)
            raise _HttpError(
                503,
                "credentials_unavailable",
                "what this API key may report for cannot be checked right now; retry later",
                headers={"Retry-After": str(RETRY_AFTER_UNAVAILABLE_S)},
            ) from None

    def check_events(
        items: list[Any], tenant: str, judged_at_ms: int, principal: Principal, scope: KeyScope | None = None
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(per-event results, prepared events to send) — pure apart from reading ``recent`` and
        the key's scope (blocking, loaded at the first valid event; then set lookups per event).

        Every event is judged by the one instant ``judged_at_ms``, which then becomes the Kafka
        timestamp of the messages: the aggregator judges by it too, so a 202 is never followed
        by a dead letter for the event's time."""
        now = kafka_time(judged_at_ms)
        results: list[dict[str, Any]] = []
        accepted: list[dict[str, Any]] = []
        seen: set[str] = set()
        candidates: list[tuple[dict[str, Any], dict[str, Any]]] = []  # valid, first of their id
        in_scope = ScopeCheck(lambda: scope if scope is not None else key_scope(principal))
        # each event's checks in this order: size, shape, prepare_event's, scope; the first
        # two here, prepare_event's for the rest in one batch (ingest/prepare_batch.py)
        judged: list[tuple[dict[str, Any], Any]] = []  # (result, event passing size and shape)
        for index, item in enumerate(items):
            raw_id = item.get("id") if isinstance(item, dict) else None
            echo = raw_id if isinstance(raw_id, str) and len(raw_id) <= 256 else None
            result: dict[str, Any] = {"index": index, "id": echo}
            results.append(result)
            try:
                size = _encoded_len(item)
                if size > settings.ingest_max_event_bytes:
                    raise InvalidEvent(
                        RejectCode.TOO_LARGE,
                        f"the event takes {size} bytes; at most {settings.ingest_max_event_bytes} are allowed",
                    )
                if not isinstance(item, dict):
                    raise InvalidEvent(RejectCode.INVALID_EVENT, "an event is a JSON object")
            except InvalidEvent as exc:
                result.update(status="rejected", code=exc.code, message=exc.message)
                continue
            judged.append((result, item))
        prepared = prepare_events([item for _, item in judged], tenant, received_at=now)
        for (result, _), event in zip(judged, prepared, strict=True):
            try:
                if isinstance(event, InvalidEvent):
                    raise event
                in_scope.check(event)  # out_of_scope: a resource this key may not report for
            except InvalidEvent as exc:
                result.update(status="rejected", code=exc.code, message=exc.message)
                continue
            event_id = str(event["id"])
            if event_id in seen:
                result["status"] = "duplicate"
                continue
            seen.add(event_id)
            candidates.append((result, event))
        delivered = recent.known(tenant, (str(event["id"]) for _, event in candidates))
        for result, event in candidates:
            if str(event["id"]) in delivered:
                result["status"] = "duplicate"
            else:
                result["status"] = "accepted"
                accepted.append(event)
        return results, accepted

    def check_and_submit(
        items: list[Any], tenant: str, judged_at_ms: int, principal: Principal, scope: KeyScope | None = None
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Future[None] | Exception | None]:
        """``check_events``, then the accepted events handed to the producer: the delivery to
        await (None: nothing to await), or the exception that stopped the hand-over (a 503).
        Blocking unless ``on_loop`` gave the ``scope``: then CPU alone (see ``on_loop``)."""
        results, accepted = check_events(items, tenant, judged_at_ms, principal, scope)
        if not accepted:
            return results, accepted, None
        try:
            producer = get_producer()
            submit = getattr(producer, "submit_batch", None)
            if submit is None:  # a sender without it (a test double): its blocking send_batch
                producer.send_batch(
                    accepted,
                    tenant,
                    timeout=settings.ingest_delivery_timeout_s,
                    validated=True,
                    judged_at_ms=judged_at_ms,
                )
                return results, accepted, None
            future: Future[None] = submit(accepted, tenant, validated=True, judged_at_ms=judged_at_ms)
            return results, accepted, future
        except Exception as exc:
            return results, accepted, exc

    def on_loop(principal: Principal) -> KeyScope | None:
        """The key's scope when the request may be judged and handed over on the event loop,
        else None (the thread pool). On the loop: the scope is kept (``cached_key_scope``: no
        read from ClickHouse) and the producer's queue is far from full, so its hand-over never
        waits for room (``_produce``'s wait on a full librdkafka queue). A trip to the pool
        costs more than the work: the GIL handed to a worker thread and back for each request
        (docs/performance.md, "The ingest's checks on the event loop")."""
        try:
            peek = getattr(get_scopes(), "cached_key_scope", None)
            scope: KeyScope | None = peek(principal) if peek is not None else None
            if scope is None:
                return None
            pending = getattr(get_producer(), "pending", None)
        except Exception:  # whatever fails here fails again in the pool, where it is answered
            return None
        if not isinstance(pending, int) or pending > ON_LOOP_MAX_PENDING:
            return None
        return scope

    @router.post(
        EVENTS_PATH,
        status_code=202,
        summary="Ingest usage and lifecycle events",
        # the typed request body and every answer (ingest/openapi.py), for generated clients
        openapi_extra=ingest_openapi(max_events),
    )
    async def ingest_events(request: Request) -> Response:
        try:
            principal = await authenticate(request)
            wait = limiter.acquire(principal.credential_id)
            if wait is not None:
                raise _too_many(
                    f"at most {settings.ingest_rate_limit_per_minute} requests a minute per API key", wait
                )
            # After authentication: an unauthenticated caller learns nothing but 401 (docs/api.md).
            media_type = _media_type(request)
            body = _utf8_body(await _read_body(request, settings.ingest_max_body_bytes))
            try:
                payload = parse_body(body)
            except UnicodeDecodeError as exc:
                raise _not_utf8(f"the body is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            except ValueError as exc:  # JSONDecodeError is a ValueError
                raise _HttpError(400, "invalid_json", f"the body is not JSON: {exc}") from None
            _check_shape(payload, media_type)
            if isinstance(payload, dict):
                items: list[Any] = [payload]
            elif isinstance(payload, list):
                items = payload
            else:
                raise _HttpError(
                    422, "invalid_body", "the body must be one event (an object) or an array of events"
                )
            if not items:
                raise _HttpError(422, "empty_batch", "the array holds no events")
            if len(items) > max_events:
                raise _HttpError(
                    413,
                    "too_many_events",
                    f"at most {max_events} events per request",
                    {"max_events": max_events, "events": len(items)},
                )
            tenant = principal.tenant
            # pydantic over up to 100 events, then the hand-over to librdkafka: on the loop when
            # neither can block (on_loop), else in one trip to the thread pool; the
            # acknowledgement is awaited on the loop.
            judged_at_ms = now_ms()
            scope = on_loop(principal) if len(items) <= ON_LOOP_MAX_EVENTS else None
            if scope is not None:
                results, accepted, delivered = check_and_submit(items, tenant, judged_at_ms, principal, scope)
            else:
                results, accepted, delivered = await run_in_threadpool(
                    check_and_submit, items, tenant, judged_at_ms, principal
                )
            if accepted:
                try:
                    if isinstance(delivered, Exception):
                        raise delivered
                    if delivered is not None:
                        # acks=all for every accepted event: 202 means "in Kafka". Shielded: an
                        # answer given up on (timeout) leaves the delivery report to land unseen.
                        await asyncio.wait_for(
                            asyncio.shield(asyncio.wrap_future(delivered)), settings.ingest_delivery_timeout_s
                        )
                except Exception as exc:  # any failure to confirm storage: never a silent 202
                    log.warning("ingest of %d event(s) for tenant %s failed: %s", len(accepted), tenant, exc)
                    raise _HttpError(
                        503,
                        "kafka_unavailable",
                        "Kafka did not confirm the events; retry later with the same ids (an id is counted once)",
                        {"events": len(accepted)},
                        {"Retry-After": str(RETRY_AFTER_UNAVAILABLE_S)},
                    ) from None
                recent.add_all((tenant, str(e["id"])) for e in accepted)
        except _HttpError as err:
            return error_response(err.status, err.code, err.message, err.details, err.headers)
        counts = dict.fromkeys(("accepted", "duplicate", "rejected"), 0)
        for r in results:
            counts[r["status"]] += 1
        for status, n in counts.items():
            EVENTS_ANSWERED.labels(status).inc(n)
        body_out = {
            "results": results,
            "accepted": counts["accepted"],
            "duplicates": counts["duplicate"],
            "rejected": counts["rejected"],
        }
        record = None
        if on_rejected is not None and counts["rejected"]:
            rows = ingest_rejections(
                results, items, tenant, principal.credential_id, uuid.uuid4().hex, judged_at_ms
            )
            record = BackgroundTask(on_rejected, rows)  # after the answer: it never delays or changes it
        return Response(
            json_bytes(body_out), status_code=202, media_type="application/json", background=record
        )

    return router


def ingest_router(settings: IngestSettings, client: Any, bootstrap: str) -> tuple[APIRouter, UsageProducer]:
    """The router wired to this process's ClickHouse client (API keys, scopes) and a new producer whose
    delivery timeout is the ingest one; the caller closes the producer (it flushes) on shutdown."""
    store = CredentialStore(
        client, settings.clickhouse_database, ttl_s=getattr(settings, "query_cache_ttl_s", 2.0)
    )
    producer = UsageProducer(
        bootstrap, settings=settings, delivery_timeout_s=settings.ingest_delivery_timeout_s
    )
    scopes = ScopeStore(
        client, settings.clickhouse_database, ttl_s=getattr(settings, "query_cache_ttl_s", 2.0)
    )
    recorder = IngestRejectionRecorder(
        client,
        settings.clickhouse_database,
        settings.kafka_client_config(bootstrap),
        settings.topic_dead_letter,
    )
    router = build_ingest_router(
        lambda: producer, lambda: store, settings, get_scopes=lambda: scopes, on_rejected=recorder.record
    )
    # The event trace (query_api/routers/events.py): the same keys and scopes as the ingest.
    from query_api.routers.events import build_events_router

    tracer = Tracer(
        client,
        settings.clickhouse_database,
        default_catalog(),
        KafkaScanner(settings.kafka_client_config(bootstrap), settings.topic_events),
    )
    trace_limit = RateLimiter(
        settings.ingest_rate_limit_per_minute,
        storage=settings.rate_limit_storage.get_secret_value(),
        name="events-trace",
    )
    router.include_router(build_events_router(tracer, lambda: store, lambda: scopes, trace_limit))
    return router, producer
