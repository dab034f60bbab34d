"""Response models: the documents' field names (as aliases) and JSON types, so ``/openapi.json``
states exactly what the documents state (``integer`` where they say integer, ``number`` for
floats, ``string``/``date-time`` for times)."""

from __future__ import annotations

import datetime as dt
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any

import orjson
from fastapi import Response
from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, WithJsonSchema

from query_api.exact import json_number_text


def rfc3339_ms(t: datetime) -> str:
    """RFC 3339 in UTC with milliseconds and ``Z`` (freshness times: the header and 002's
    ``lastUpdated`` say the same instant the same way)."""
    t = t.astimezone(UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


UtcMillis = Annotated[
    datetime,
    PlainSerializer(rfc3339_ms, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]

#: A number reported exactly: a Decimal here, a JSON number with every one of its digits on the
#: wire (``number`` in /openapi.json), however large. pydantic would write a Decimal as a string
#: and a float keeps ~17 digits, so a response holding one is rendered by ``exact_json``.
ExactNumber = Annotated[Decimal, WithJsonSchema({"type": "number"})]


def _exact(python: Any, json: Any) -> Any:
    """The JSON-mode dump ``json`` with every Decimal and int of the Python-mode dump ``python``
    (the same structure) put back as the exact text of a JSON number."""
    if isinstance(python, Decimal):
        return orjson.Fragment(json_number_text(python))
    if isinstance(python, int) and not isinstance(python, bool):
        return orjson.Fragment(str(python))  # orjson refuses ints beyond 64 bits
    if isinstance(python, dict):
        return {k: _exact(v, json[k]) for k, v in python.items()}
    if isinstance(python, list | tuple):
        return [_exact(p, j) for p, j in zip(python, json, strict=True)]
    return json


def exact_json(model: BaseModel, headers_from: Response) -> Response:
    """``model`` as a 200 JSON response whose numbers are exact (``ExactNumber``); everything
    else is written exactly as pydantic writes it. ``headers_from`` is the route's injected
    ``Response``: FastAPI does not copy its headers onto a response the route returns itself."""
    body = _exact(model.model_dump(mode="python"), model.model_dump(mode="json"))
    out = Response(content=orjson.dumps(body), media_type="application/json")
    out.headers.raw.extend(headers_from.headers.raw)
    return out


class _Out(BaseModel):
    model_config = ConfigDict(
        validate_by_name=True, validate_by_alias=True, serialize_by_alias=True, frozen=True
    )


# ---- errors -----------------------------------------------------------------------------------


class ErrorBody(_Out):
    code: str = Field(description="Stable, machine-readable error code.")
    message: str = Field(description="Human-readable explanation.")
    details: dict[str, Any] = Field(
        default_factory=dict, description="Extra context (e.g. the parameter at fault)."
    )


class ErrorEnvelope(_Out):
    """``{"error": {"code", "message", "details"}}`` (documents 000, 001, 002, 003, meter query)."""

    error: ErrorBody


class DrfError(_Out):
    """Document 004's error shape: ``{"detail": "..."}`` (or ``{"<param>": ["..."]}`` for a bad
    parameter)."""

    model_config = ConfigDict(extra="allow")
    detail: str | None = None


# ---- 000 ---------------------------------------------------------------------------------------


class WorkspaceStatsResponse(_Out):
    """internal_api_handlers_workspaces.WorkspaceStatsResponse of document 000."""

    model_config = ConfigDict(title="internal_api_handlers_workspaces.WorkspaceStatsResponse")

    active_agents: int = Field(alias="activeAgents")
    active_members: int = Field(alias="activeMembers")
    active_vks: int = Field(alias="activeVks")
    base_vk_limit: int = Field(alias="baseVkLimit")
    current_period_log_count: int = Field(alias="currentPeriodLogCount")
    extra_vk_count: int = Field(alias="extraVkCount")
    log_limit: int = Field(alias="logLimit")
    logs_this_month: int = Field(alias="logsThisMonth")
    max_vks: int = Field(alias="maxVks")
    overage_cents: int = Field(alias="overageCents")
    tier: str = Field(alias="tier")
    total_agents: int = Field(alias="totalAgents")
    total_members: int = Field(alias="totalMembers")
    workspace_id: str = Field(alias="workspaceId")


class WorkspaceStatsEnvelope(_Out):
    data: WorkspaceStatsResponse


# ---- 001 ---------------------------------------------------------------------------------------


class QuotaUsage(_Out):
    memory: int = Field(
        description="MiB-seconds: MiB held each second, summed over the period and the steps."
    )
    cpu: int = Field(description="Milli-CPU-seconds consumed by the steps over the period.")


class QuotaUsageEnvelope(_Out):
    data: QuotaUsage


# ---- 002 ---------------------------------------------------------------------------------------


class WorkstationUsage(_Out):
    cpu_hours: ExactNumber = Field(alias="cpuHours")
    gpu_hours: int = Field(alias="gpuHours")
    memory_gb_hours: int = Field(alias="memoryGBHours")
    cost_usd: ExactNumber = Field(alias="costUSD")
    last_updated: UtcMillis = Field(alias="lastUpdated")


# ---- 003 ---------------------------------------------------------------------------------------


class WorkspaceUsage(_Out):
    model_config = ConfigDict(title="WorkspaceUsage")

    period_start: datetime = Field(
        title="Period Start", description="Start of the current billing period (first of month)."
    )
    period_end: datetime = Field(
        title="Period End", description="Exclusive end of the current billing period."
    )
    render_minutes: ExactNumber = Field(
        title="Render Minutes",
        description="Total render output duration in minutes for the period.",
        examples=[142.7],
    )
    task_count: int = Field(
        title="Task Count", description="Total AI tasks submitted during the period.", examples=[384]
    )
    egress_bytes: int = Field(
        title="Egress Bytes", description="Total artifact egress bytes for the period.", examples=[5368709120]
    )


# ---- 004 ---------------------------------------------------------------------------------------


class RowUsageItem(_Out):
    date: dt.date = Field(
        description="Start of the reporting period (first day of the month for monthly granularity)."
    )
    workspace_id: str = Field(description="UUID of the workspace.")
    workspace_name: str = Field(description="Name of the workspace.")
    datastream_id: str | None = Field(
        description="UUID of the datastream; null when not attributable to one."
    )
    unique_rows: int = Field(description="Number of unique rows processed.")
    total_rows: int = Field(description="Total number of rows processed, including duplicates.")


class RowUsagePage(_Out):
    count: int = Field(description="Total number of matching records (all pages).")
    items: list[RowUsageItem]


# ---- generic meter query ------------------------------------------------------------------------


class MeterRow(_Out):
    window_start: datetime
    window_end: datetime
    value: ExactNumber | None = Field(
        description="The meter's aggregate over the window (null for an empty AVG)."
    )
    group_by: dict[str, str] = Field(default_factory=dict)


class MeterQueryResponse(_Out):
    meter: str
    window: str | None = Field(
        description="MINUTE, FIFTEEN_MINUTES, HOUR, DAY or MONTH; null: one row for the range."
    )
    from_: datetime = Field(alias="from")
    to: datetime
    data: list[MeterRow]
