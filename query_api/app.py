"""The query API application: the five documented usage endpoints and the generic meter query,
and the admin API (``/admin/v1``, read-only, behind the admin token: ``routers/admin.py``).

``create_app`` is called by the process runner (``metering run`` / ``metering query-api``) with
the query API's ClickHouse client. Its lookups (credentials, entities, freshness: cached, and
reloaded in the background before they expire) run on a client of their own, so that a reload
never holds the lock the usage statements queue on: ``lookup_client``, or with embedded ClickHouse
(chdb) a second connection handle on the process's one engine (``lookup_client_for``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from clickhouse_connect.driver.client import Client
from fastapi import APIRouter, FastAPI

from deploy.settings import QuerySettings
from query_api.credentials import CredentialStore
from query_api.deps import Services
from query_api.errors import ErrorStyle, install_error_handlers, style_for
from query_api.http_metrics import HttpMetrics
from query_api.ratelimit import RateLimiter
from query_api.reader import Reader
from query_api.routers import (
    admin,
    meters,
    quota_usages,
    row_usage,
    workspace_stats,
    workspace_usage,
    workstations,
)
from schemas.clickhouse import chdb_path, connect_part

DOCUMENTED_ROUTERS: tuple[APIRouter, ...] = (
    workspace_stats.router,  # 000
    quota_usages.router,  # 001
    workstations.router,  # 002
    workspace_usage.router,  # 003
    row_usage.router,  # 004
    meters.router,  # beyond the documents
)


def lookup_client_for(client: Client, database: str) -> Client:
    """A client for the API's lookups beside ``client``: with chdb, a connection handle of its own
    on the same engine (one handle runs one statement at a time, behind a lock); a server's client
    runs statements concurrently over its connection pool, so it serves both."""
    path = chdb_path(client)
    if path and path != ":memory:":
        return connect_part(f"chdb://{path}", database)
    return client


def create_app(
    settings: QuerySettings,
    client: Client,
    *,
    extra_routers: Iterable[APIRouter] = (),
    include_query: bool = True,
    lookup_client: Client | None = None,
) -> FastAPI:
    """The FastAPI app over ``client``. ``extra_routers`` (ingest, health, metrics) are mounted
    as given; error shapes of the documents apply to the documents' paths only.
    ``include_query=False`` (an ingest-only process) mounts only ``extra_routers``; ``settings``
    then need not be query settings."""
    app = FastAPI(
        title="Usage metering API",
        version="1.0.0",
        description=(
            "The documented usage endpoints (documents 000-004) and a generic meter query. "
            "Usage responses carry `X-Data-Refreshed-At`: when the tenant's tables were last "
            "refreshed. See docs/api.md."
        ),
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    install_error_handlers(app)
    app.add_middleware(HttpMetrics)  # metering_http_requests_total / _duration_seconds, every route
    if include_query:
        database = settings.clickhouse_database
        ttl = settings.query_cache_ttl_s
        limits_at = settings.rate_limit_storage.get_secret_value()  # memory:// or shared (Redis)
        lookups = lookup_client or lookup_client_for(client, database)
        app.state.services = Services(
            settings=settings,
            client=client,
            store=CredentialStore(lookups, database, ttl_s=ttl),
            reader=Reader(client, database, cache_ttl_s=ttl, lookup_client=lookups),
            limiter=RateLimiter(settings.query_rate_limit_per_minute, storage=limits_at, name="query"),
            failures=RateLimiter(
                settings.query_rate_limit_per_minute, storage=limits_at, name="query-auth-failures"
            ),
        )
        for router in DOCUMENTED_ROUTERS:
            app.include_router(router)
        # The admin API (read side): its own credential, METERING_ADMIN_TOKEN (settings.admin_token).
        app.include_router(admin.router)
    for router in extra_routers:
        app.include_router(router)
    _document_400_not_422(app)
    return app


def _document_400_not_422(app: FastAPI) -> None:
    """FastAPI documents a 422 for every route with parameters; the documented routes answer
    invalid parameters with 400 in their document's shape instead, so their 422 is removed from
    ``/openapi.json`` (other routers keep FastAPI's behaviour and their 422)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        for path, operations in schema.get("paths", {}).items():
            if style_for(path) is ErrorStyle.DEFAULT:
                continue
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        used = str(schema.get("paths", {}))
        components = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            if f"#/components/schemas/{name}" not in used and name in components:
                # ValidationError is referenced only from HTTPValidationError.
                if name == "ValidationError" and "HTTPValidationError" in components:
                    continue
                components.pop(name)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
