"""Document 001: quota usages of a contract or a workspace (HTTP Basic ``EMAIL:APIKEY``).

``memory`` is MiB-seconds (the meter ``ci_step_memory_mib_seconds``: each step's memory sample
held until its next sample, at most 60 s), ``cpu`` milli-CPU-seconds (``ci_step_cpu_seconds`` x
1000); both rounded to the nearest integer, halves away from zero, exactly whatever the size of
the stored sums (a negative one, which only corrupt storage holds, is reported as stored).

Order of checks: 401 (credentials), 400 (``period``), 404 (no such contract/workspace in the
caller's tenant, including another tenant's), 403 (not a member of the contract).
"""

from __future__ import annotations

from datetime import UTC, datetime
from fractions import Fraction

from fastapi import APIRouter, Path, Query, Response

from query_api.credentials import Principal
from query_api.deps import MemberKeyPrincipal, ReaderDep, stamp_freshness
from query_api.errors import ErrorStyle, bad_request, error_responses, forbidden, not_found
from query_api.exact import half_up_int
from query_api.models import QuotaUsage, QuotaUsageEnvelope
from query_api.periods import Period, PeriodError, coarsest_table, quota_period
from query_api.reader import Reader
from schemas.clickhouse import Table

router = APIRouter(tags=["quota-usages"])

_PERIOD_DESCRIPTION = "Usage period. Allowed values: `week` (current week), `[yyyy]-[mm]` (month of the year)"
# Documented, not enforced by FastAPI: our own check answers with the document's error shape.
_PERIOD_SCHEMA = {"pattern": "^(week|[0-9]{4}-(0[1-9]|1[0-2]))$", "examples": ["week", "2019-03"]}
_RESPONSES = {
    200: {"description": "Memory (MiB-seconds) and CPU (milli-CPU-seconds) usage."},
    **error_responses(
        ErrorStyle.ENVELOPE,
        (400, 401, 403, 404, 429),
        {
            400: "Invalid period.",
            401: "Missing or invalid EMAIL:APIKEY.",
            403: "Not a member of the contract.",
            404: "Not found.",
            429: "Rate limited.",
        },
    ),
}


def _period(value: str) -> tuple[Period, Table]:
    try:
        period = quota_period(value, datetime.now(UTC))
    except PeriodError as exc:
        raise bad_request(str(exc), "period") from None
    # A month is answered from usage_1mo, a week (Monday to Monday) from usage_1d.
    return period, coarsest_table(period.start, period.end) or Table.USAGE_1D


def _answer(
    reader: Reader,
    response: Response,
    principal: Principal,
    dimension: str,
    entity_id: str,
    period: Period,
    table: Table,
) -> QuotaUsageEnvelope:
    stamp_freshness(response, reader, principal.tenant)
    memory, cpu_seconds = reader.quota_usage(principal.tenant, dimension, entity_id, period, table)
    milli_cpu = Fraction(cpu_seconds) * 1000
    return QuotaUsageEnvelope(data=QuotaUsage(memory=half_up_int(memory), cpu=half_up_int(milli_cpu)))


@router.get(
    "/v2/quota-usages/contracts/{CONTRACT_ID}",
    operation_id="get-contract-quota-usages",
    summary="Retrieve a contract usage metrics by ID",
    response_model=QuotaUsageEnvelope,
    responses=_RESPONSES,
)
def get_contract_usage(
    principal: MemberKeyPrincipal,
    reader: ReaderDep,
    response: Response,
    contract_id: str = Path(alias="CONTRACT_ID", description="Contract identifier"),
    period: str = Query(description=_PERIOD_DESCRIPTION, json_schema_extra=_PERIOD_SCHEMA),
) -> QuotaUsageEnvelope:
    bounds, table = _period(period)
    if not reader.contract_exists(principal.tenant, contract_id):
        raise not_found("Contract not found.")
    if not reader.is_contract_member(principal.tenant, contract_id, principal.member_id):
        raise forbidden("Only a member of the contract may read its usage.")
    return _answer(reader, response, principal, "contract_id", contract_id, bounds, table)


@router.get(
    "/v2/quota-usages/workspaces/{WORKSPACE_ID}",
    operation_id="get-workspace-quota-usages",
    summary="Retrieve a workspace usage metrics by ID",
    response_model=QuotaUsageEnvelope,
    responses=_RESPONSES,
)
def get_workspace_usage(
    principal: MemberKeyPrincipal,
    reader: ReaderDep,
    response: Response,
    workspace_id: str = Path(alias="WORKSPACE_ID", description="Workspace identifier"),
    period: str = Query(description=_PERIOD_DESCRIPTION, json_schema_extra=_PERIOD_SCHEMA),
) -> QuotaUsageEnvelope:
    bounds, table = _period(period)
    workspace = reader.workspace(principal.tenant, workspace_id)
    if workspace is None:
        raise not_found("Workspace not found.")
    # "Only a corresponding contract member": a member of any workspace of the workspace's
    # contract; a workspace outside every contract admits its own members.
    member = (
        reader.is_contract_member(principal.tenant, workspace.contract_id, principal.member_id)
        if workspace.contract_id
        else reader.is_active_member(principal.tenant, workspace.id, principal.member_id)
    )
    if not member:
        raise forbidden("Only a member of the contract may read this workspace's usage.")
    return _answer(reader, response, principal, "workspace_id", workspace.id, bounds, table)
