"""The admin API (read side): ``GET /admin/v1/tenants/{tenant}/{kind}`` and
``GET /admin/v1/tenants/{tenant}/{kind}/{id}``.

Administrators list and inspect any tenant's entities (workspaces, contracts, memberships,
virtual keys, agents, workstations, datastreams, API keys, access tokens) as the aggregator has
applied them: the ``entities`` table, read fresh (no cache), which is what ``metering admin
--wait`` polls. Auth is ``Authorization: Bearer <admin token>`` (``query_api/admin_token.py``),
compared in constant time; API keys and access tokens are never admin tokens, and the admin
token opens none of the usage endpoints. Failed attempts are limited per client address like
every other authentication; successful ones are not rate limited (``--wait`` polls). A key or a
token is shown by id, display prefix, scope, owner, state and dates: never its secret, never its
hash (the hash is not even read). An unknown tenant (one with no entity) or id is a 404; an
invalid parameter, or a filter the kind does not have, is a 400. Lists are in id order, at most
``limit`` per page; ``next_after`` is the cursor of the next page (null on the last). Writes
are not here: the control plane is written only by ``metering admin``, through the control
topic. Errors are ``{"error": {"code", "message", "details"}}``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from query_api.admin_reader import FILTERS, AdminKind, AdminReader, EntityRow, Filter, Status
from query_api.admin_token import same_token
from query_api.deps import ServicesDep
from query_api.errors import ApiError, ErrorCode, ErrorStyle, bad_request, error_responses, not_found
from query_api.models import rfc3339_ms
from query_api.ratelimit import retry_after_header

admin_scheme = HTTPBearer(
    scheme_name="AdminToken",
    description="The admin token: `Authorization: Bearer <METERING_ADMIN_TOKEN or .cache/admin-token>`.",
    auto_error=False,
)


async def require_admin(
    request: Request,
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(admin_scheme)],
) -> None:
    expected = services.settings.admin_token
    presented = credentials.credentials if credentials is not None else ""
    if expected is not None and presented and same_token(presented, expected.get_secret_value()):
        return
    address = request.client.host if request.client else "unknown"
    wait = services.failures.acquire(f"fail:{address}")
    if wait is not None:
        raise ApiError(
            429,
            ErrorCode.RATE_LIMITED,
            "Too many failed attempts; retry after the number of seconds in Retry-After.",
            headers={"Retry-After": retry_after_header(wait)},
        )
    message = (
        "Missing or invalid admin token."
        if expected is not None
        else "No admin token is configured on this server (METERING_ADMIN_TOKEN)."
    )
    raise ApiError(401, ErrorCode.UNAUTHORIZED, message, headers={"WWW-Authenticate": "Bearer"})


async def get_admin_reader(services: ServicesDep) -> AdminReader:
    return AdminReader(services.client, services.settings.clickhouse_database)


AdminReaderDep = Annotated[AdminReader, Depends(get_admin_reader)]

router = APIRouter(prefix="/admin/v1", tags=["admin"], dependencies=[Depends(require_admin)])

_ERRORS = error_responses(
    ErrorStyle.ENVELOPE,
    (400, 401, 404, 429, 503),
    {
        400: "Invalid parameter, or a filter the kind does not have.",
        401: "Missing or invalid admin token.",
        404: "No such tenant, or no such entity in it.",
        429: "Too many failed authentications from this address.",
        503: "Storage unavailable; retry shortly.",
    },
)


class AdminEntity(BaseModel):
    """An entity as the aggregator applied it. Fields that do not belong to a kind are absent."""

    id: str = Field(description="Entity id; a membership's is `<workspace_id>/<member_id>`.")
    kind: AdminKind
    status: str = Field(description="active, inactive, left or revoked (as projected).")
    created_at: str = Field(description="Time of its first lifecycle event (RFC 3339, UTC).")
    updated_at: str = Field(description="Time of its latest lifecycle event (RFC 3339, UTC).")
    name: str | None = None
    tier: str | None = None
    parent_id: str | None = None
    contract_id: str | None = None
    billing_anchor_day: int | None = None
    extra_vks: int | None = None
    workspace_id: str | None = None
    member_id: str | None = None
    email: str | None = None
    scope: str | None = Field(default=None, description="Keys: member or workspace; tokens: member.")
    prefix: str | None = Field(default=None, description="Display prefix of a key (kind and 4 characters).")
    expires_at: str | None = None
    expired: bool | None = Field(default=None, description="Tokens: past their expiry.")
    usd_per_cpu_hour: float | None = None
    usd_per_gpu_hour: float | None = None
    usd_per_gb_hour: float | None = None


class AdminEntityPage(BaseModel):
    tenant: str
    kind: AdminKind
    total: int = Field(description="Entities matching the filters, on every page.")
    items: list[AdminEntity]
    next_after: str | None = Field(description="Pass as `after` for the next page; null on the last.")


def _or_none(value: str) -> str | None:
    return value or None


def present(kind: AdminKind, row: EntityRow, now: datetime | None = None) -> AdminEntity:
    """The fields of ``kind`` only, from a whitelist: whatever else ``attrs`` may hold stays in."""
    a = row.attrs
    fields: dict[str, Any] = {
        "id": row.entity_id,
        "kind": kind,
        "status": row.status,
        "created_at": rfc3339_ms(row.created_at),
        "updated_at": rfc3339_ms(row.updated_at),
    }
    if kind is AdminKind.WORKSPACES:
        fields |= {
            "name": row.name,
            "tier": row.tier,
            "parent_id": _or_none(row.parent_id),
            "contract_id": _or_none(row.contract_id),
            "billing_anchor_day": int(a.get("billing_anchor_day", 1) or 1),
            "extra_vks": int(a.get("extra_vks", 0) or 0),
        }
    elif kind is AdminKind.CONTRACTS:
        fields |= {"name": row.name}
    elif kind is AdminKind.MEMBERS:
        fields |= {
            "workspace_id": row.workspace_id,
            "member_id": str(a.get("member_id", "")),
            "email": row.email,
        }
    elif kind in (AdminKind.VIRTUAL_KEYS, AdminKind.AGENTS):
        fields |= {"workspace_id": row.workspace_id}
    elif kind is AdminKind.WORKSTATIONS:
        fields |= {"name": row.name, "workspace_id": _or_none(row.workspace_id)}
        fields |= {k: a.get(k) for k in ("usd_per_cpu_hour", "usd_per_gpu_hour", "usd_per_gb_hour")}
    elif kind is AdminKind.DATASTREAMS:
        fields |= {"name": row.name, "workspace_id": row.workspace_id}
    elif kind is AdminKind.API_KEYS:
        fields |= {
            "prefix": _or_none(str(a.get("prefix", ""))),
            "scope": str(a.get("scope", "")),
            "workspace_id": _or_none(row.workspace_id),
            "member_id": _or_none(str(a.get("member_id", ""))),
            "email": _or_none(row.email),
        }
    elif kind is AdminKind.ACCESS_TOKENS:
        expires = row.expires_at
        fields |= {
            "prefix": _or_none(str(a.get("prefix", ""))),
            "scope": "member",
            "member_id": str(a.get("member_id", "")),
            "email": row.email,
            "expires_at": rfc3339_ms(expires) if expires else None,
            "expired": expires is not None and expires <= (now or datetime.now(UTC)),
        }
    return AdminEntity(**fields)


Tenant = Annotated[str, Path(min_length=1, max_length=128, description="The tenant.")]
Kind = Annotated[AdminKind, Path(description="The kind of entity.")]
IdFilter = Annotated[str | None, Query(min_length=1, max_length=128)]


def _not_found(reader: AdminReader, tenant: str, what: str) -> ApiError:
    if not reader.tenant_exists(tenant):
        return not_found(f"No tenant {tenant!r}: no entity of it exists.")
    return not_found(what)


@router.get(
    "/tenants/{tenant}/{kind}",
    operation_id="admin_list_entities",
    summary="List a tenant's entities of one kind",
    response_model=AdminEntityPage,
    response_model_exclude_unset=True,
    responses={200: {"description": "Successful Response"}, **_ERRORS},
)
def list_entities(
    tenant: Tenant,
    kind: Kind,
    reader: AdminReaderDep,
    workspace_id: IdFilter = None,
    parent_id: IdFilter = None,
    contract_id: IdFilter = None,
    member_id: IdFilter = None,
    email: Annotated[str | None, Query(min_length=1, max_length=254)] = None,
    status: Status | None = None,
    after: Annotated[
        str | None, Query(min_length=1, max_length=256, description="Cursor: the last id seen.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="Entities per page.")] = 100,
) -> AdminEntityPage:
    given = {
        Filter.WORKSPACE_ID: workspace_id,
        Filter.PARENT_ID: parent_id,
        Filter.CONTRACT_ID: contract_id,
        Filter.MEMBER_ID: member_id,
        Filter.EMAIL: email,
        Filter.STATUS: status.value if status is not None else None,
    }
    filters = {f: v for f, v in given.items() if v is not None}
    for f in sorted(filters):
        if f not in FILTERS[kind]:
            allowed = ", ".join(sorted(FILTERS[kind])) or "none"
            raise bad_request(f"{kind.value} have no {f.value} filter (theirs: {allowed}).", f.value)
    rows, total = reader.page(tenant, kind, filters, after, limit)
    if total == 0 and not reader.tenant_exists(tenant):
        raise not_found(f"No tenant {tenant!r}: no entity of it exists.")
    return AdminEntityPage(
        tenant=tenant,
        kind=kind,
        total=total,
        items=[present(kind, r) for r in rows],
        next_after=rows[-1].entity_id if len(rows) == limit else None,
    )


@router.get(
    "/tenants/{tenant}/{kind}/{entity_id:path}",
    operation_id="admin_get_entity",
    summary="One entity of a tenant",
    response_model=AdminEntity,
    response_model_exclude_unset=True,
    responses={200: {"description": "Successful Response"}, **_ERRORS},
)
def get_entity(
    tenant: Tenant,
    kind: Kind,
    entity_id: Annotated[
        str,
        Path(min_length=1, max_length=257, description="Entity id (a membership: `<workspace>/<member>`)."),
    ],
    reader: AdminReaderDep,
) -> AdminEntity:
    row = reader.get(tenant, kind, entity_id)
    if row is None:
        raise _not_found(reader, tenant, f"No {kind.noun} {entity_id!r} in tenant {tenant!r}.")
    return present(kind, row)
