"""Document 002: ``GET /v1/workstations/{id}/usage`` (Bearer access token of the tenant).

The document does not say over which period; the answer is the workstation's lifetime totals
(what "usage of a workstation" means to its owner, and what the rate card prices). Hours are
computed exactly (fractions, whatever the size of the stored sums) from the period tables;
``cpuHours`` is reported to 6 decimal places, ``gpuHours`` and ``memoryGBHours`` rounded to whole
hours (the document types them integer), and ``costUSD`` is priced from the exact, unrounded
hours and then rounded to the cent (halves away from zero). Numbers are written with all their
digits; a negative stored sum (only corrupt storage holds one) is reported as stored.
``lastUpdated`` is when the tenant's tables were last refreshed.

A storage failure is the documented 500, with a JSON body.
"""

from __future__ import annotations

import re
from fractions import Fraction

from fastapi import APIRouter, Path, Response

from query_api.deps import AccessTokenPrincipal, ReaderDep, stamp_freshness
from query_api.errors import ErrorStyle, bad_request, error_responses, not_found
from query_api.exact import half_up, half_up_int, ratio
from query_api.models import WorkstationUsage, exact_json

router = APIRouter(tags=["workstations"])

#: What an entity id may be (schemas.events.Id): 1-128 characters, no control characters.
_ID = re.compile(r"^[^\x00-\x1f]{1,128}$")
_HOUR_S = 3600


@router.get(
    "/v1/workstations/{id}/usage",
    operation_id="get-workstation-usage",
    summary="Retrieve Usage Data",
    description="Retrieve CPU, GPU, memory, and billing usage for a workstation (lifetime totals).",
    response_model=WorkstationUsage,
    responses={
        200: {"description": "Returns the workstation usage object"},
        **error_responses(
            ErrorStyle.ENVELOPE,
            (400, 401, 404, 429, 500),
            {
                400: "Invalid workstation ID",
                401: "Request not authenticated",
                404: "Workstation ID does not exist",
                429: "Rate limited",
                500: "Failed to retrieve workstation usage data due to system error",
            },
        ),
    },
)
def get_workstation_usage(
    principal: AccessTokenPrincipal,
    reader: ReaderDep,
    response: Response,
    id: str = Path(description="Unique ID of the workstation to query for usage data."),
) -> Response:
    if not _ID.fullmatch(id):
        raise bad_request("Invalid workstation ID.", "id")
    workstation = reader.workstation(principal.tenant, id)
    if workstation is None:
        raise not_found("Workstation ID does not exist.")
    refreshed = stamp_freshness(response, reader, principal.tenant)
    cpu_s, gpu_s, mem_gb_s = reader.workstation_usage(principal.tenant, workstation.id)
    cpu_h, gpu_h, mem_h = ratio(cpu_s, _HOUR_S), ratio(gpu_s, _HOUR_S), ratio(mem_gb_s, _HOUR_S)
    cost = (
        cpu_h * Fraction(workstation.usd_per_cpu_hour)
        + gpu_h * Fraction(workstation.usd_per_gpu_hour)
        + mem_h * Fraction(workstation.usd_per_gb_hour)
    )
    usage = WorkstationUsage(
        cpu_hours=half_up(cpu_h, 6),
        gpu_hours=half_up_int(gpu_h),
        memory_gb_hours=half_up_int(mem_h),
        cost_usd=half_up(cost, 2),
        last_updated=refreshed or workstation.updated_at,
    )
    return exact_json(usage, response)
