"""The event trace's answers as pydantic models: the OpenAPI body schema of
``GET /api/v1/events/{id}`` and ``GET /api/v1/events`` (routers/events.py).

The answers themselves are built as plain dicts (query_api/event_trace.py) and written with orjson;
these models describe them for clients and code generators. ``extra="forbid"`` makes the
end-to-end trace test (tests/integration/test_event_trace.py), which validates every answer it
gets against them, fail when an answer grows a field the schema does not list.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KafkaPosition(_Strict):
    """Where the event was (or is) in Kafka: the usage topic, or the control topic for lifecycle
    events. ``index`` is the event's position inside the Kafka message (a batch)."""

    topic: Literal["usage", "control"]
    partition: int
    offset: int
    index: int | None = None


class IngestSource(_Strict):
    """An event the HTTP ingest rejected: the request (its ``X-Request-Id``) and the position in it."""

    request_id: str
    index: int


class MeterContribution(_Strict):
    meter: str
    aggregation: str
    unit: str
    contribution: Any = Field(
        description="SUM: its value as an exact decimal string; COUNT: 1; other aggregations: its sample"
    )
    how: str
    dimensions: dict[str, Any]
    windows: dict[str, list[str | None]] = Field(description="`15m`, `1h`, `1d`, `1mo`: [start, end) UTC")


class Counted(_Strict):
    type: str
    source: str
    subject: str
    time: str
    applied_at: str
    kafka: KafkaPosition
    meters: list[MeterContribution]


class DroppedCopy(_Strict):
    kafka: KafkaPosition
    copy_: int = Field(alias="copy", description="rank of the copy inside its Kafka message")
    received_at: str
    dropped_at: str


class Rejection(_Strict):
    id: str
    type: str
    code: str
    message: str
    origin: Literal["ingest", "aggregator"]
    source: KafkaPosition | IngestSource
    received_at: str
    rejected_at: str
    key_id: str = Field(description="the API key that sent it ('' when not sent through the ingest)")


class TraceAnswer(_Strict):
    """One ``status`` and its evidence (docs/api.md, "Event trace"): the fields present depend on
    the status."""

    id: str
    status: Literal["received", "counted", "duplicate", "rejected", "unknown"]
    note: str | None = Field(None, description="unknown: what could not be checked (Kafka unreachable)")
    # received
    kafka: KafkaPosition | None = None
    received_at: str | None = None
    partition_lag: int | None = None
    # counted (and duplicate's counted_instead)
    type: str | None = None
    source: str | KafkaPosition | IngestSource | None = None
    subject: str | None = None
    time: str | None = None
    applied_at: str | None = None
    meters: list[MeterContribution] | None = None
    # duplicate
    counted_instead: Counted | None = None
    dropped: list[DroppedCopy] | None = None
    # rejected
    code: str | None = None
    message: str | None = None
    origin: Literal["ingest", "aggregator"] | None = None
    rejected_at: str | None = None
    rejections: list[Rejection] | None = None


class RejectionsPage(_Strict):
    status: Literal["rejected"]
    events: list[Rejection]
    next: str | None = Field(description="the cursor of the next page; null on the last")
