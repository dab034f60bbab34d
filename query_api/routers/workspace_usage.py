"""Document 003: ``GET /v1/workspace/usage`` (``Authorization: Bearer fl_live_...``).

The workspace is the API key's (a workspace-scoped key; its workspace only, not the subtree).
The billing period is the UTC calendar month: from the first of the month, 00:00 UTC, to the
first of the next, exclusive. ``render_minutes`` is the render output seconds / 60, to 6 decimal
places (exactly, with all its digits, however large the stored sum). Every error is
``{"error": {"code", "message", "details"}}``.
"""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Response

from query_api.deps import ReaderDep, WorkspaceKeyPrincipal, stamp_freshness
from query_api.errors import ErrorStyle, error_responses
from query_api.exact import half_up, ratio
from query_api.models import WorkspaceUsage, exact_json
from query_api.periods import calendar_month, coarsest_table
from schemas.clickhouse import Table

router = APIRouter(tags=["workspace"])


@router.get(
    "/v1/workspace/usage",
    operation_id="get_usage",
    summary="Get workspace usage",
    description="Returns render minutes, task count, and egress bytes for the current billing period.",
    response_model=WorkspaceUsage,
    responses={
        200: {"description": "Successful Response"},
        **error_responses(
            ErrorStyle.ENVELOPE,
            (401, 429),
            {401: "Missing or invalid API key.", 429: "Rate limited."},
        ),
    },
)
def get_usage(principal: WorkspaceKeyPrincipal, reader: ReaderDep, response: Response) -> Response:
    period = calendar_month(datetime.now(UTC))
    stamp_freshness(response, reader, principal.tenant)
    table = coarsest_table(period.start, period.end) or Table.USAGE_1D
    render_s, tasks, egress = reader.workspace_usage(principal.tenant, principal.workspace_id, period, table)
    usage = WorkspaceUsage(
        period_start=period.start,
        period_end=period.end,
        render_minutes=half_up(ratio(render_s, 60), 6),
        task_count=tasks,
        egress_bytes=egress,
    )
    return exact_json(usage, response)
