"""Document 004: ``GET /api/v1/usage/`` (``Authorization: Token {KEY}`` or ``Bearer {KEY}``).

Scope: the key's workspace and every workspace beneath it (``parent_id`` links). Days are UTC
days. ``workspace_id``/``datastream_id`` filters are intersected with the scope; ids that are
unknown, out of scope or malformed are ignored, and when every given id is ignored nothing
matches (an empty page, not the whole scope). ``page_size`` above 100 is capped to 100. A page
past the last answers 200 with the total ``count`` and no items. Errors are Django REST
framework's: ``{"detail": "..."}`` or ``{"<param>": ["..."]}``.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Response

from query_api.deps import ReaderDep, WorkspaceKeyTokenOrBearerPrincipal, stamp_freshness
from query_api.errors import ErrorStyle, bad_request, error_responses
from query_api.models import RowUsageItem, RowUsagePage
from query_api.periods import Granularity, PeriodError, parse_iso_date, row_usage_dates
from query_api.reader import Workspace
from schemas.tenancy import subtree as workspace_subtree

router = APIRouter(tags=["usage"])

MAX_PAGE_SIZE = 100


def subtree(workspaces: dict[str, Workspace], root: str) -> set[str]:
    """``root`` and every workspace beneath it (schemas/tenancy.py)."""
    return set(workspace_subtree({w.id: w.parent_id or "" for w in workspaces.values()}, root))


def _date(value: str | None, name: str) -> date | None:
    if value is None:
        return None
    try:
        return parse_iso_date(value)
    except PeriodError as exc:
        raise bad_request(str(exc), name) from None


_DATE_SCHEMA = {"format": "date"}


@router.get(
    "/api/v1/usage/",
    operation_id="list-row-usage",
    summary="Row-usage metrics per date, workspace and datastream",
    description=(
        "Finalized row-usage metrics grouped by date, workspace, and datastream, scoped to the API key's "
        "workspace and all workspaces beneath it. date_to is capped to yesterday."
    ),
    response_model=RowUsagePage,
    responses={
        200: {"description": "A paginated list of row-usage metrics."},
        **error_responses(
            ErrorStyle.DRF,
            (400, 401, 429),
            {400: "Invalid parameter.", 401: "Missing or invalid key.", 429: "Rate limited."},
        ),
    },
)
def list_row_usage(
    principal: WorkspaceKeyTokenOrBearerPrincipal,
    reader: ReaderDep,
    response: Response,
    granularity: Annotated[
        Granularity, Query(description="Reporting granularity: daily (default) or monthly.")
    ] = Granularity.DAILY,
    date_from: Annotated[
        str | None,
        Query(
            description="Start date, YYYY-MM-DD, inclusive. Defaults to the first day of the current month.",
            json_schema_extra=_DATE_SCHEMA,
        ),
    ] = None,
    date_to: Annotated[
        str | None,
        Query(
            description="End date, YYYY-MM-DD, inclusive. Defaults to yesterday; always capped to yesterday.",
            json_schema_extra=_DATE_SCHEMA,
        ),
    ] = None,
    workspace_id: Annotated[
        list[str] | None,
        Query(description="Workspace UUID to filter by; repeatable. Out-of-scope ids are ignored."),
    ] = None,
    datastream_id: Annotated[
        list[str] | None,
        Query(description="Datastream UUID to filter by; repeatable. Unknown ids are ignored."),
    ] = None,
    page: Annotated[int, Query(ge=1, le=1_000_000, description="Page number. Default: 1.")] = 1,
    page_size: Annotated[int, Query(ge=1, description="Results per page. Default: 50. Maximum: 100.")] = 50,
) -> RowUsagePage:
    first = _date(date_from, "date_from")
    last = _date(date_to, "date_to")
    if first is not None and last is not None and first > last:
        raise bad_request("date_from must not be after date_to.", "date_from")
    dates = row_usage_dates(first, last, datetime.now(UTC).date())

    workspaces = reader.workspaces(principal.tenant)
    scope = subtree(workspaces, principal.workspace_id)
    selected = sorted(scope if workspace_id is None else scope.intersection(workspace_id))
    streams = None if datastream_id is None else sorted({d for d in datastream_id if d})

    size = min(page_size, MAX_PAGE_SIZE)
    stamp_freshness(response, reader, principal.tenant)
    count, rows = reader.row_usage(
        principal.tenant, selected, streams, dates, granularity, limit=size, offset=(page - 1) * size
    )
    return RowUsagePage(
        count=count,
        items=[
            RowUsageItem(
                date=r.day,
                workspace_id=r.workspace_id,
                workspace_name=workspaces[r.workspace_id].name if r.workspace_id in workspaces else "",
                datastream_id=r.datastream_id or None,
                unique_rows=r.unique_rows,
                total_rows=r.total_rows,
            )
            for r in rows
        ],
    )
