"""Dependencies of the routers: services of the app, and the caller (``Principal``) per auth
scheme the documents name.

- Bearer access token (documents 000, 002): ``Authorization: Bearer <token>``.
- Bearer API key, workspace scope (document 003, meter query): ``Authorization: Bearer fl_live_...``.
- ``Token`` or ``Bearer`` API key, workspace scope (document 004).
- HTTP Basic ``EMAIL:APIKEY`` with a member-scoped key of that member (document 001).

Secrets are resolved by ``CredentialStore`` (hash lookup, constant-time comparison, short cache)
and never logged or echoed. Every resolved credential passes the per-credential rate limit;
failed attempts are limited per client address, so guessing keys is slow too.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, cast

from clickhouse_connect.driver.client import Client
from fastapi import Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.models import APIKey, APIKeyIn, HTTPBase
from fastapi.security.base import SecurityBase

from deploy.settings import QuerySettings
from query_api.credentials import CredentialStore, Principal
from query_api.errors import ApiError, ErrorCode, StorageError
from query_api.lookup_cache import MISS
from query_api.models import rfc3339_ms
from query_api.ratelimit import RateLimiter, retry_after_header
from query_api.reader import Reader
from schemas.events import EntityKind


@dataclass(frozen=True)
class Services:
    """Everything a request may need, built once by ``create_app``."""

    settings: QuerySettings
    client: Client
    store: CredentialStore
    reader: Reader
    limiter: RateLimiter  # per credential
    failures: RateLimiter  # failed authentications, per client address


# These do no I/O: ``async`` keeps them on the event loop, where FastAPI would otherwise run each
# in the thread pool (a thread hand-off per dependency per request).


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_settings(services: ServicesDep) -> QuerySettings:
    return services.settings


async def get_client(services: ServicesDep) -> Client:
    return services.client


async def get_store(services: ServicesDep) -> CredentialStore:
    return services.store


async def get_reader(services: ServicesDep) -> Reader:
    return services.reader


SettingsDep = Annotated[QuerySettings, Depends(get_settings)]
ClientDep = Annotated[Client, Depends(get_client)]
StoreDep = Annotated[CredentialStore, Depends(get_store)]
ReaderDep = Annotated[Reader, Depends(get_reader)]


# ---- security schemes (OpenAPI) -----------------------------------------------------------------


class _AuthorizationHeader(SecurityBase):
    """Declares a security scheme in OpenAPI and hands over the raw ``Authorization`` header;
    parsing is ours, so every failure is answered in the document's error shape."""

    def __init__(self, model: HTTPBase | APIKey, scheme_name: str) -> None:
        self.model = model
        self.scheme_name = scheme_name

    async def __call__(self, request: Request) -> str | None:
        return request.headers.get("authorization")


access_token_scheme = _AuthorizationHeader(
    HTTPBase(scheme="bearer", description="An access token: `Authorization: Bearer {access_token}`."),
    "AccessToken",
)
api_key_bearer_scheme = _AuthorizationHeader(
    HTTPBase(scheme="bearer", description="A workspace API key: `Authorization: Bearer fl_live_...`."),
    "ApiKey",
)
api_key_token_scheme = _AuthorizationHeader(
    APIKey(
        **{"in": APIKeyIn.header},
        name="Authorization",
        description="A workspace API key as `Token {KEY}` (or `Bearer {KEY}`).",
    ),
    "ApiKeyToken",
)
basic_scheme = _AuthorizationHeader(
    HTTPBase(scheme="basic", description="HTTP Basic `EMAIL:APIKEY` with the member's own API key."),
    "EmailApiKey",
)


# ---- helpers -----------------------------------------------------------------------------------


def _client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _unauthorized(message: str, challenge: str, code: ErrorCode = ErrorCode.UNAUTHORIZED) -> ApiError:
    return ApiError(401, code, message, headers={"WWW-Authenticate": challenge})


def _fail(services: Services, request: Request, err: ApiError) -> ApiError:
    """A failed authentication, unless this address has failed too often: then a 429."""
    wait = services.failures.acquire(f"fail:{_client_address(request)}")
    if wait is not None:
        return _rate_limited(wait)
    return err


def _rate_limited(wait: float) -> ApiError:
    return ApiError(
        429,
        ErrorCode.RATE_LIMITED,
        "Too many requests; retry after the number of seconds in Retry-After.",
        headers={"Retry-After": retry_after_header(wait)},
    )


def _admit(services: Services, principal: Principal) -> Principal:
    wait = services.limiter.acquire(f"{principal.tenant}:{principal.kind}:{principal.credential_id}")
    if wait is not None:
        raise _rate_limited(wait)
    return principal


class _NeedsStorage(Exception):
    """Raised on the event loop when resolving the caller needs ClickHouse: resolve in a thread."""


def _lookup(services: Services, raw: str, kind: EntityKind, on_loop: bool) -> Principal | None:
    if on_loop:
        cached = services.store.cached(raw, kind)
        if cached is MISS:
            raise _NeedsStorage
        return cast(Principal | None, cached)
    try:
        return services.store.lookup(raw, kind)
    except Exception as exc:  # the store talks to ClickHouse
        raise StorageError(type(exc).__name__) from exc


async def _resolve(services: Services, resolve: Callable[[bool], Principal]) -> Principal:
    """``resolve(on_loop)``: on the event loop when it needs no I/O (the credential is cached and
    the rate limits count in this process), else in the thread pool. Under load every hand-off to
    a pool thread waits for a core (docs/performance.md, "Queries while ingesting"); a request
    whose credential is cached then makes one hand-off (its handler's), not two.
    ``resolve`` raises ``_NeedsStorage`` before anything else happens (no limit counted), so
    running it again in a thread counts the request once."""
    if services.limiter.in_memory and services.failures.in_memory:
        try:
            return resolve(True)
        except _NeedsStorage:
            pass
    return await run_in_threadpool(resolve, False)


def _scheme_value(header: str | None, schemes: tuple[str, ...]) -> str | None:
    """The credential after one of ``schemes`` (case-insensitive), or None."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() not in schemes or not value or len(value) > 512:
        return None
    return value


# ---- principals ---------------------------------------------------------------------------------


async def require_access_token(
    request: Request, services: ServicesDep, header: Annotated[str | None, Depends(access_token_scheme)]
) -> Principal:
    """A live access token (documents 000 and 002). Expired: 401 with code token_expired
    (``AUTH_TOKEN_EXPIRED`` in document 000)."""
    return await _resolve(services, lambda on_loop: _access_token(services, request, header, on_loop))


def _access_token(services: Services, request: Request, header: str | None, on_loop: bool) -> Principal:
    raw = _scheme_value(header, ("bearer",))
    if raw is None:
        raise _fail(services, request, _unauthorized("Missing bearer access token.", "Bearer"))
    principal = _lookup(services, raw, EntityKind.ACCESS_TOKEN, on_loop)
    if principal is None or not principal.active:
        raise _fail(services, request, _unauthorized("Invalid access token.", "Bearer"))
    if principal.expired():
        raise _unauthorized(
            "The access token has expired.", 'Bearer error="invalid_token"', ErrorCode.TOKEN_EXPIRED
        )
    return _admit(services, principal)


def _workspace_key(
    services: Services, request: Request, header: str | None, schemes: tuple[str, ...], on_loop: bool
) -> Principal:
    challenge = schemes[0].title()
    raw = _scheme_value(header, schemes)
    if raw is None:
        raise _fail(services, request, _unauthorized("Missing or invalid API key.", challenge))
    principal = _lookup(services, raw, EntityKind.API_KEY, on_loop)
    # A member-scoped key does not open workspace APIs: same answer as an unknown key.
    if (
        principal is None
        or not principal.active
        or principal.scope != "workspace"
        or not principal.workspace_id
    ):
        raise _fail(services, request, _unauthorized("Missing or invalid API key.", challenge))
    return _admit(services, principal)


async def require_workspace_key_bearer(
    request: Request, services: ServicesDep, header: Annotated[str | None, Depends(api_key_bearer_scheme)]
) -> Principal:
    """A workspace-scoped API key as ``Bearer`` (document 003, meter query)."""
    return await _resolve(
        services, lambda on_loop: _workspace_key(services, request, header, ("bearer",), on_loop)
    )


async def require_workspace_key_token_or_bearer(
    request: Request,
    services: ServicesDep,
    header: Annotated[str | None, Depends(api_key_token_scheme)],
    _bearer: Annotated[str | None, Depends(api_key_bearer_scheme)],
) -> Principal:
    """A workspace-scoped API key as ``Token`` or ``Bearer`` (document 004)."""
    return await _resolve(
        services, lambda on_loop: _workspace_key(services, request, header, ("token", "bearer"), on_loop)
    )


async def require_member_key_basic(
    request: Request, services: ServicesDep, header: Annotated[str | None, Depends(basic_scheme)]
) -> Principal:
    """HTTP Basic ``EMAIL:APIKEY`` (document 001): the key must be member-scoped and belong to
    the member whose email is given."""
    return await _resolve(services, lambda on_loop: _member_key(services, request, header, on_loop))


def _member_key(services: Services, request: Request, header: str | None, on_loop: bool) -> Principal:
    challenge = 'Basic realm="quota-usages"'
    raw = _scheme_value(header, ("basic",))
    creds = _decode_basic(raw) if raw is not None else None
    if creds is None:
        raise _fail(services, request, _unauthorized("Missing or malformed Basic credentials.", challenge))
    email, key = creds
    principal = _lookup(services, key, EntityKind.API_KEY, on_loop)
    if (
        principal is None
        or not principal.active
        or principal.scope != "member"
        or not principal.member_id
        or not hmac.compare_digest(
            principal.email.strip().casefold().encode(), email.strip().casefold().encode()
        )
    ):
        raise _fail(services, request, _unauthorized("Invalid email or API key.", challenge))
    return _admit(services, principal)


def _decode_basic(raw: str) -> tuple[str, str] | None:
    try:
        decoded = base64.b64decode(raw, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    email, sep, key = decoded.partition(":")
    if not sep or not email or not key:
        return None
    return email, key


AccessTokenPrincipal = Annotated[Principal, Depends(require_access_token)]
WorkspaceKeyPrincipal = Annotated[Principal, Depends(require_workspace_key_bearer)]
WorkspaceKeyTokenOrBearerPrincipal = Annotated[Principal, Depends(require_workspace_key_token_or_bearer)]
MemberKeyPrincipal = Annotated[Principal, Depends(require_member_key_basic)]


# ---- freshness ---------------------------------------------------------------------------------

FRESHNESS_HEADER = "X-Data-Refreshed-At"


def stamp_freshness(response: Response, reader: Reader, tenant: str) -> datetime | None:
    """Set ``X-Data-Refreshed-At`` from the tenant's freshness. Called *before* the usage query:
    the time stated is then never later than the data answered (which may be a little newer)."""
    refreshed = reader.freshness(tenant)
    if refreshed is not None:
        response.headers[FRESHNESS_HEADER] = rfc3339_ms(refreshed)
    return refreshed
