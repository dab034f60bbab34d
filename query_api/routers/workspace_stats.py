"""Document 000: ``GET /api/v1/workspaces/{id}/stats`` (Bearer access token).

Order of checks: 401 (token missing, invalid, or ``AUTH_TOKEN_EXPIRED``), 400 (id not a UUID),
404 (no such workspace in the caller's tenant: another tenant's workspace is a 404 too), 403
(the caller is not an active member of the workspace).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from fastapi import APIRouter, Path, Response

from query_api.deps import AccessTokenPrincipal, ReaderDep, stamp_freshness
from query_api.errors import ErrorStyle, bad_request, error_responses, forbidden, not_found
from query_api.models import WorkspaceStatsEnvelope, WorkspaceStatsResponse
from query_api.periods import billing_period, calendar_month
from schemas.plans import plan_for

router = APIRouter(tags=["workspaces"])

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


@router.get(
    "/api/v1/workspaces/{id}/stats",
    operation_id="get-workspace-usage-stats",
    summary="Get workspace usage stats",
    description="Returns real-time usage: tier, limits, active VKs/agents/members, logs this period, overage.",
    response_model=WorkspaceStatsEnvelope,
    responses={
        200: {"description": "data: stats"},
        **error_responses(
            ErrorStyle.SAAS,
            (400, 401, 403, 404, 429),
            {
                400: "BAD_REQUEST (invalid id)",
                401: "AUTH_TOKEN_EXPIRED (or AUTH_TOKEN_INVALID: missing or invalid token)",
                403: "FORBIDDEN (not a member)",
                404: "NOT_FOUND",
                429: "RATE_LIMITED",
            },
        ),
    },
)
def get_workspace_stats(
    principal: AccessTokenPrincipal,
    reader: ReaderDep,
    response: Response,
    id: str = Path(description="Workspace UUID"),
) -> WorkspaceStatsEnvelope:
    if not _UUID.fullmatch(id):
        raise bad_request("id must be a workspace UUID.", "id")
    tenant = principal.tenant
    workspace = reader.workspace(tenant, id)
    if workspace is None:
        raise not_found("Workspace not found.")
    if not reader.is_active_member(tenant, workspace.id, principal.member_id):
        raise forbidden("You are not a member of this workspace.")
    now = datetime.now(UTC)
    stamp_freshness(response, reader, tenant)
    counts = reader.workspace_counts(
        tenant, workspace.id, billing_period(now, workspace.billing_anchor_day), calendar_month(now)
    )
    plan = plan_for(workspace.tier)
    stats = WorkspaceStatsResponse(
        active_agents=counts.active_agents,
        active_members=counts.active_members,
        active_vks=counts.active_vks,
        base_vk_limit=plan.base_vk_limit,
        current_period_log_count=counts.period_logs,
        extra_vk_count=workspace.extra_vks,
        log_limit=plan.log_limit,
        logs_this_month=counts.month_logs,
        max_vks=plan.base_vk_limit + workspace.extra_vks,
        overage_cents=plan.overage_cents(counts.period_logs),
        tier=workspace.tier,
        total_agents=counts.total_agents,
        total_members=counts.total_members,
        workspace_id=workspace.id,
    )
    return WorkspaceStatsEnvelope(data=stats)
