"""Event trace: ``GET /api/v1/events/{id}`` and ``GET /api/v1/events?status=rejected`` (issue 10).

Served beside the HTTP ingest, with its credential: ``Authorization: Bearer <api key>``, the key
that sends the events. The tenant is the key's; an event of another tenant, or one naming a
resource outside the key's scope (the ingest's rules, ingest/scope.py), answers exactly like an
unknown id (``200 {"status": "unknown"}``); an ingest rejection is visible to the key that sent
it, whatever the event named. The statuses and their evidence: query_api/event_trace.py and
docs/api.md, "Event trace". The listing is the tenant's rejections, latest first, ``limit`` a
page, ``next`` the cursor of the next page (``null`` at the end). ``401`` for a missing, unknown
or revoked key; ``400`` for a bad parameter; ``503`` when the evidence cannot be read.
"""

from __future__ import annotations

import base64
import logging
import math
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from ingest.scope import ScopeLookup, judge
from query_api.credentials import Principal
from query_api.event_trace import Status, Tracer
from query_api.ratelimit import RateLimiter
from query_api.trace_models import RejectionsPage, TraceAnswer
from schemas.events import EntityKind

log = logging.getLogger(__name__)

EVENTS_PATH = "/api/v1/events"
_MAX_LIMIT = 1000


def _error(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> Response:
    body = {"error": {"code": code, "message": message, "details": {}}}
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def _time(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{name} is not an ISO 8601 time: {value[:40]!r}") from None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


class _Limited(Exception):
    def __init__(self, wait_s: float) -> None:
        super().__init__("rate limited")
        self.seconds = max(1, math.ceil(wait_s))

    def response(self) -> Response:
        return _error(
            429,
            "rate_limited",
            "too many trace requests for this API key",
            {"Retry-After": str(self.seconds)},
        )


def encode_cursor(rejected_at: str, cursor: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([rejected_at, cursor])).decode()


def decode_cursor(raw: str) -> tuple[datetime, str]:
    try:
        at, cursor = orjson.loads(base64.urlsafe_b64decode(raw.encode()))
        t = _time(str(at), "cursor")
        assert t is not None
        return t, str(cursor)
    except Exception:
        raise ValueError("cursor is not one this API gave") from None


def build_events_router(
    tracer: Tracer,
    get_credentials: Callable[[], Any],
    get_scopes: Callable[[], ScopeLookup],
    limiter: RateLimiter | None = None,
) -> APIRouter:
    """``limiter``: requests per API key (a trace may read Kafka); over it, ``429 rate_limited``
    with ``Retry-After``."""
    router = APIRouter(tags=["events"])

    def principal_of(request: Request) -> Principal | None:
        scheme, _, raw = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not raw.strip():
            return None
        principal: Principal | None = get_credentials().lookup(raw.strip(), EntityKind.API_KEY)
        if principal is None or not principal.active:
            return None
        wait = limiter.acquire(f"events:{principal.credential_id}") if limiter is not None else None
        if wait is not None:
            raise _Limited(wait)
        return principal

    def visibility(principal: Principal) -> Callable[[Mapping[str, Any], str], bool]:
        scope = get_scopes().key_scope(principal)

        def visible(data: Mapping[str, Any], key_id: str) -> bool:
            return key_id == principal.credential_id or judge(scope, data) is None

        return visible

    def unauthorized() -> Response:
        return _error(
            401,
            "unauthorized",
            "send the API key as `Authorization: Bearer <key>`",
            {"WWW-Authenticate": "Bearer"},
        )

    @router.get(
        EVENTS_PATH + "/{event_id}",
        summary="Trace one event: received, counted, duplicate, rejected or unknown",
        responses={
            200: {"model": TraceAnswer, "description": "The event's status and its evidence"},
            401: {"description": "Missing or invalid API key"},
            429: {"description": "Rate limited (per API key)"},
            503: {"description": "Storage unavailable"},
        },
    )
    async def trace_event(
        request: Request, event_id: Annotated[str, Path(min_length=1, max_length=256)]
    ) -> Response:
        def work() -> dict[str, Any] | None:
            principal = principal_of(request)
            if principal is None:
                return None
            return tracer.trace(principal.tenant, event_id, visibility(principal))

        try:
            answer = await run_in_threadpool(work)
        except _Limited as limited:
            return limited.response()
        except Exception as exc:
            log.warning("event trace failed: %s", type(exc).__name__)
            return _error(503, "unavailable", "the event's evidence cannot be read right now; retry later")
        if answer is None:
            return unauthorized()
        return Response(orjson.dumps(answer), media_type="application/json")

    @router.get(
        EVENTS_PATH,
        summary="List the tenant's rejected events, latest first (paginated)",
        responses={
            200: {
                "model": RejectionsPage,
                "description": "A page of rejections; `next` is the next page's cursor",
            },
            401: {"description": "Missing or invalid API key"},
            429: {"description": "Rate limited (per API key)"},
            503: {"description": "Storage unavailable"},
        },
    )
    async def list_events(
        request: Request,
        status: Annotated[str, Query(description="Only `rejected` is listed.")] = Status.REJECTED.value,
        from_: Annotated[
            str | None, Query(alias="from", description="ISO 8601, inclusive (rejected_at)")
        ] = None,
        to: Annotated[str | None, Query(description="ISO 8601, exclusive")] = None,
        code: Annotated[str | None, Query(max_length=64)] = None,
        limit: Annotated[int, Query(ge=1, le=_MAX_LIMIT)] = 100,
        cursor: Annotated[str | None, Query(max_length=2048)] = None,
    ) -> Response:
        if status != Status.REJECTED.value:
            return _error(400, "invalid_parameter", "status: only `rejected` can be listed")
        try:
            since, until = _time(from_, "from"), _time(to, "to")
            before = decode_cursor(cursor) if cursor else None
        except ValueError as exc:
            return _error(400, "invalid_parameter", str(exc))

        def work() -> dict[str, Any] | None:
            principal = principal_of(request)
            if principal is None:
                return None
            visible = visibility(principal)
            rows = tracer.rejections(
                principal.tenant, since=since, until=until, code=code, limit=limit + 1, before=before
            )
            more = len(rows) > limit
            rows = rows[:limit]
            last = rows[-1] if rows else None
            nxt = encode_cursor(last["rejected_at"], last["cursor"]) if more and last else None
            items = []
            for r in rows:
                if visible(r.pop("_data"), r["key_id"]):
                    r.pop("cursor")
                    items.append(r)
            return {"status": Status.REJECTED.value, "events": items, "next": nxt}

        try:
            answer = await run_in_threadpool(work)
        except _Limited as limited:
            return limited.response()
        except Exception as exc:
            log.warning("rejections listing failed: %s", type(exc).__name__)
            return _error(503, "unavailable", "rejections cannot be read right now; retry later")
        if answer is None:
            return unauthorized()
        return Response(orjson.dumps(answer), media_type="application/json")

    return router
