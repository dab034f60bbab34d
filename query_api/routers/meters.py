"""The generic meter query (beyond the documents):
``GET /api/v1/meters/{slug}/query?from=&to=&window=&tz=&group_by=&filter_subject=``.

Auth: a workspace-scoped API key as ``Bearer``; the query covers the key's whole tenant.

- ``from``/``to``: RFC 3339 with an offset; ``[from, to)``. Defaults: ``to`` = now rounded up to
  the next 15 minutes, ``from`` = the start of the current month in ``tz``.
- ``window``: MINUTE, FIFTEEN_MINUTES, HOUR, DAY or MONTH in ``tz`` (an IANA name, default UTC);
  none: one row for the whole range. Windows cut by ``from``/``to`` are reported clipped.
- ``group_by``: dimensions of the meter (repeatable); ``filter_subject``: event subjects
  (repeatable).

Where answers come from: UTC windows from the coarsest period table that tiles the range; local
windows from ``usage_15m`` (15-minute rows make local days and months exact in every real zone);
gauges (INTEGRAL meters) from ``gauge_15m``; MINUTE windows, ranges not on 15-minute boundaries,
and subject filters of meters whose subject is not a dimension from ``events_raw``.
"""

from __future__ import annotations

import zoneinfo
from datetime import UTC, datetime, timedelta, tzinfo
from functools import cache
from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from query_api.deps import ReaderDep, WorkspaceKeyPrincipal, stamp_freshness
from query_api.errors import ErrorStyle, bad_request, error_responses, not_found
from query_api.models import MeterQueryResponse, MeterRow, exact_json
from query_api.periods import (
    Period,
    PeriodError,
    Window,
    clamp_to_sql,
    parse_tz,
    table_for_window,
    window_count,
    window_next,
)
from query_api.reader import Reader
from schemas.clickhouse import Table
from schemas.events import DATA_MODELS
from schemas.meters import Aggregation, default_catalog

router = APIRouter(tags=["meters"])

MAX_WINDOWS = 10_000
MAX_ROWS = 10_000


@cache
def _python_zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def _zone(reader: Reader, name: str) -> tzinfo:
    try:
        tz = parse_tz(name)
    except PeriodError as exc:
        raise bad_request(str(exc), "tz") from None
    # The engine computes local windows and Python their ends: both must know the zone.
    if name not in _python_zones() or name not in reader.time_zones():
        raise bad_request(f"unknown time zone {name!r}", "tz")
    return tz


def _instant(value: str, name: str) -> datetime:
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise bad_request(f"{name} must be an RFC 3339 date-time, e.g. 2026-01-01T00:00:00Z", name) from None
    if t.tzinfo is None or t.utcoffset() is None:
        raise bad_request(f"{name} must carry a UTC offset (e.g. Z or +01:00)", name)
    try:
        return clamp_to_sql(t.astimezone(UTC))
    except OverflowError:
        raise bad_request(f"{name} is out of range", name) from None


def _default_to(now: datetime) -> datetime:
    floored = now.replace(minute=now.minute - now.minute % 15, second=0, microsecond=0)
    return floored + timedelta(minutes=15)


def _month_start(now: datetime, tz: tzinfo) -> datetime:
    local = now.astimezone(tz)
    naive = datetime(local.year, local.month, 1)
    return naive.replace(tzinfo=tz).astimezone(UTC)


@router.get(
    "/api/v1/meters/{slug}/query",
    operation_id="query-meter",
    summary="Query a meter",
    description="Aggregated values of any meter of the catalog, per window, time zone and dimensions.",
    response_model=MeterQueryResponse,
    responses={
        200: {"description": "The meter's values per window and group."},
        **error_responses(
            ErrorStyle.ENVELOPE,
            (400, 401, 404, 429),
            {
                400: "Invalid parameter.",
                401: "Missing or invalid API key.",
                404: "Unknown meter.",
                429: "Rate limited.",
            },
        ),
    },
)
def query_meter(
    principal: WorkspaceKeyPrincipal,
    reader: ReaderDep,
    response: Response,
    slug: Annotated[str, Path(description="Meter slug (see schemas/meters.yaml).")],
    from_: Annotated[
        str | None,
        Query(
            alias="from",
            description="Start, RFC 3339 with offset (inclusive).",
            json_schema_extra={"format": "date-time"},
        ),
    ] = None,
    to: Annotated[
        str | None,
        Query(
            description="End, RFC 3339 with offset (exclusive).", json_schema_extra={"format": "date-time"}
        ),
    ] = None,
    window: Annotated[
        Window | None, Query(description="Window size; omitted: one row for the range.")
    ] = None,
    tz: Annotated[str, Query(description="IANA time zone of the windows.")] = "UTC",
    group_by: Annotated[list[str] | None, Query(description="Dimension to group by; repeatable.")] = None,
    filter_subject: Annotated[
        list[str] | None, Query(description="Event subject to keep; repeatable.")
    ] = None,
) -> Response:
    meter = default_catalog().get(slug)
    if meter is None:
        raise not_found(f"No meter {slug!r}.")
    zone = _zone(reader, tz)
    now = datetime.now(UTC)
    end = _instant(to, "to") if to is not None else _default_to(now)
    start = _instant(from_, "from") if from_ is not None else _month_start(now, zone)
    if start >= end:
        raise bad_request("from must be before to.", "from")
    if window is not None and window_count(start, end, window) > MAX_WINDOWS:
        raise bad_request(
            f"more than {MAX_WINDOWS} windows: use a larger window or a shorter range.", "window"
        )

    groups = list(dict.fromkeys(group_by or []))
    unknown = [g for g in groups if g not in meter.group_by]
    if unknown:
        raise bad_request(
            f"cannot group {meter.slug} by {unknown[0]!r}; dimensions: {', '.join(meter.group_by) or 'none'}",
            "group_by",
        )
    subjects = None if filter_subject is None else sorted(set(filter_subject))

    table = table_for_window(window, start, end, zone)
    source: Table | None
    if meter.aggregation is Aggregation.INTEGRAL:
        if table is None:
            raise bad_request(
                "gauge meters have 15-minute resolution: use a window of FIFTEEN_MINUTES or more and "
                "from/to on 15-minute boundaries",
                "window",
            )
        source = Table.GAUGE_15M
    elif subjects is not None and DATA_MODELS[meter.event_type].SUBJECT_FIELD not in meter.group_by:
        source = None  # the period tables do not keep this meter's subject
    else:
        source = table

    stamp_freshness(response, reader, principal.tenant)
    period = Period(start, end)
    points = reader.meter_series(
        principal.tenant, meter, source, window, tz, period, groups, subjects, max_rows=MAX_ROWS + 1
    )
    if len(points) > MAX_ROWS:
        raise bad_request(f"more than {MAX_ROWS} rows: narrow the range, the window or group_by.", "group_by")
    rows = []
    for p in points:
        if window is None or p.bucket is None:
            w_start, w_end = start, end
        else:
            w_start = max(p.bucket, start)
            w_end = min(window_next(p.bucket.astimezone(zone), window, zone).astimezone(UTC), end)
        rows.append(
            MeterRow(
                window_start=w_start.astimezone(zone),
                window_end=w_end.astimezone(zone),
                value=p.value,
                group_by=dict(zip(groups, p.group, strict=True)),
            )
        )
    answer = MeterQueryResponse(
        meter=meter.slug,
        window=window.value if window else None,
        from_=start.astimezone(zone),
        to=end.astimezone(zone),
        data=rows,
    )
    # Values with every digit (a SUM may need 40; a float keeps ~17).
    return exact_json(answer, response)
