"""Usage and lifecycle events: the one definition of what an event is.

Every event is a CloudEvents 1.0 JSON envelope (``specversion``, ``id``, ``source``, ``type``,
``subject``, ``time``, ``data``) plus the extension attribute ``tenant``: the tenant the event
belongs to. Over HTTP the tenant comes from the API key, never from the payload; producers using
the SDK name it explicitly.

``subject`` is always the id of the entity the event is about (a CI step, a workstation, a
workspace…): each data model names that field in ``SUBJECT_FIELD``. If the producer sets
``subject`` it must equal that id; if it leaves it out, it is filled in.

This module is part of the client distribution (``usage-metering-client``) so that services and
the server validate with the very same models; the server imports it through ``schemas.events``.
It imports nothing but pydantic.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    model_validator,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "DATA_MODELS",
    "EVENT_ADAPTER",
    "JSON_INTEGER",
    "LIFECYCLE_KIND",
    "LIFECYCLE_TYPES",
    "MAX_MEMORY_GB",
    "MAX_MEMORY_MIB",
    "MAX_SUM_PER_EVENT",
    "USAGE_TYPES",
    "AccessTokenIssued",
    "AccessTokenRevoked",
    "AgentChanged",
    "AiTaskSubmitted",
    "ApiKeyCreated",
    "ApiKeyRevoked",
    "CiStepCpu",
    "CiStepMemory",
    "ContractCreated",
    "ContractWorkspaceAdded",
    "Count",
    "Data",
    "DatastreamCreated",
    "DatastreamRows",
    "EgressDownload",
    "EntityKind",
    "Event",
    "EventType",
    "GatewayRequest",
    "Id",
    "MemberChanged",
    "MemberJoined",
    "MemoryGb",
    "MemoryMib",
    "Name",
    "Plane",
    "Price",
    "RenderCompleted",
    "Seconds",
    "Sha256Hex",
    "VirtualKeyChanged",
    "VirtualKeyExtraPurchased",
    "WorkspaceCreated",
    "WorkspaceUpdated",
    "WorkstationCpu",
    "WorkstationCreated",
    "WorkstationGpu",
    "WorkstationMemory",
    "event_json_schema",
    "format_number",
    "membership_id",
    "parse_time",
    "plane_of",
]

Id = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f]+$")]
Name = Annotated[str, Field(min_length=1, max_length=256)]

# ---- numbers: JSON numbers only, each with a maximum per event ---------------------------------
# Strict numbers. A bill must not count "12" or true as CPU-seconds: numeric fields take JSON
# numbers only, never strings or booleans (pydantic would otherwise coerce them to 12 and 1).
# Float fields are pydantic-strict (an integer is a number: 12 is taken as 12.0). Integer fields
# take any JSON number with no fractional part: JSON has one number type and JSON Schema's
# "integer" is "a number with a zero fractional part", so 12.0 is the integer 12 (stored as 12)
# while 12.5 is rejected. The SDK, the HTTP ingest and the aggregator all decide with these
# models; the aggregator's SQL validation (aggregators/stage.py) is generated from them.
#
# Bounds per field. Each summed or integrated number has a maximum per event, so that no period
# sum can overflow. The period tables hold Decimal128(9) (migration 0002): at most 38 digits, 9
# after the point, so |value| < 1e29 (the Int128 underneath wraps at ~1.7e29, silently, in sums).
# The horizon the maxima are sized for is deliberately absurd: 1e6 events per second -- ten times
# the pipeline's design throughput, all tenants together -- for 100 years, i.e. N = 3.2e15 events,
# every one at its maximum. That bounds every row of every period table and any sum of rows an
# analyst can write (all tenants, all periods):
#   SUM meters:      MAX_SUM_PER_EVENT x N = 1e12 x 3.2e15 = 3.2e27: 1/30 of 1e29.
#   INTEGRAL meters: each sample holds at most max_gap_seconds (schemas/meters.yaml), so it adds
#                    at most max x gap: memory_mib 1e9 x 60 s x N = 1.9e26, memory_gb
#                    1e6 x 300 s x N = 9.5e23. (The rollup multiplies a value by a piece of a
#                    15-minute window in milliseconds, at most 1e9 x 9e5 = 9e14: far below 1e29.)
#   MIN/MAX/LATEST:  one value each, at most its maximum; AVG is SUM / COUNT.
# The maxima stay generous for real use: 1e12 CPU/GPU/render seconds is ~31,700 years in one
# report; 1e12 bytes is 1 TB in one download event (a larger transfer is reported as several
# events, one per part); 1e12 rows in one datastream run; 1e9 MiB and 1e6 GB are ~1 PB of memory
# in one sample (the largest machines have tens of TB). A value above its field's maximum is
# rejected with the code ``value_out_of_range`` (schemas/validation.py) by every path alike.

#: The per-event maximum of every summed quantity (seconds, bytes, rows).
MAX_SUM_PER_EVENT = 10**12
#: Per-sample maxima of the gauges (INTEGRAL meters: value x seconds held).
MAX_MEMORY_MIB = 10**9
MAX_MEMORY_GB = 10**6


def _json_integer(value: Any) -> Any:
    """An integer field's input: a JSON number (no string, no boolean); an integral float is the
    integer it spells (12.0 -> 12), anything else goes on to pydantic's integer check (12.5 and
    non-finite numbers fail there)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


#: Marks integer fields as taking JSON numbers only (the SQL generator knows this marker).
JSON_INTEGER = BeforeValidator(_json_integer)

Seconds = Annotated[float, Field(ge=0, le=MAX_SUM_PER_EVENT, strict=True, allow_inf_nan=False)]
MemoryMib = Annotated[float, Field(ge=0, le=MAX_MEMORY_MIB, strict=True, allow_inf_nan=False)]
MemoryGb = Annotated[float, Field(ge=0, le=MAX_MEMORY_GB, strict=True, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0, le=MAX_SUM_PER_EVENT), JSON_INTEGER]


def format_number(value: float) -> str:
    """A bound as people write it: 1e12, 1e6, 599, 0.5."""
    if isinstance(value, float) and not value.is_integer():
        return repr(value)
    n = int(value)
    digits = str(abs(n))
    significant = digits.rstrip("0")
    if len(digits) > 6 and len(significant) <= 3:  # exactly, e.g. 1e12 or 2.5e9
        mantissa = significant[0] + (f".{significant[1:]}" if len(significant) > 1 else "")
        return f"{'-' if n < 0 else ''}{mantissa}e{len(digits) - 1}"
    return str(n)


class EventType(StrEnum):
    # usage
    CI_STEP_CPU = "ci.step.cpu"
    CI_STEP_MEMORY = "ci.step.memory"
    WORKSTATION_CPU = "workstation.cpu"
    WORKSTATION_GPU = "workstation.gpu"
    WORKSTATION_MEMORY = "workstation.memory"
    RENDER_COMPLETED = "render.completed"
    AI_TASK_SUBMITTED = "ai.task.submitted"
    EGRESS_DOWNLOAD = "egress.download"
    DATASTREAM_ROWS = "datastream.rows"
    GATEWAY_REQUEST = "gateway.request"
    # lifecycle
    WORKSPACE_CREATED = "workspace.created"
    WORKSPACE_UPDATED = "workspace.updated"
    CONTRACT_CREATED = "contract.created"
    CONTRACT_WORKSPACE_ADDED = "contract.workspace_added"
    MEMBER_JOINED = "member.joined"
    MEMBER_LEFT = "member.left"
    MEMBER_ACTIVATED = "member.activated"
    MEMBER_DEACTIVATED = "member.deactivated"
    VIRTUAL_KEY_CREATED = "virtual_key.created"
    VIRTUAL_KEY_REVOKED = "virtual_key.revoked"
    VIRTUAL_KEY_EXTRA_PURCHASED = "virtual_key.extra_purchased"
    AGENT_CREATED = "agent.created"
    AGENT_ACTIVATED = "agent.activated"
    AGENT_DEACTIVATED = "agent.deactivated"
    WORKSTATION_CREATED = "workstation.created"
    DATASTREAM_CREATED = "datastream.created"
    API_KEY_CREATED = "api_key.created"
    API_KEY_REVOKED = "api_key.revoked"
    ACCESS_TOKEN_ISSUED = "access_token.issued"
    ACCESS_TOKEN_REVOKED = "access_token.revoked"


class EntityKind(StrEnum):
    WORKSPACE = "workspace"
    CONTRACT = "contract"
    MEMBER = "member"
    VIRTUAL_KEY = "virtual_key"
    AGENT = "agent"
    WORKSTATION = "workstation"
    DATASTREAM = "datastream"
    API_KEY = "api_key"
    ACCESS_TOKEN = "access_token"


class Data(BaseModel):
    """Base of every ``data`` object: closed (unknown fields rejected), finite numbers only."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    SUBJECT_FIELD: ClassVar[str]

    def subject(self) -> str:
        return str(getattr(self, self.SUBJECT_FIELD))


# ---- usage data -------------------------------------------------------------------------------


class CiStepCpu(Data):
    """CPU consumed by one CI step since its previous report (document 001)."""

    SUBJECT_FIELD = "step_id"
    contract_id: Id
    workspace_id: Id
    step_id: Id
    cpu_seconds: Seconds


class CiStepMemory(Data):
    """A memory sample of a CI step: held until the step's next sample (at most the meter's gap)."""

    SUBJECT_FIELD = "step_id"
    contract_id: Id
    workspace_id: Id
    step_id: Id
    memory_mib: MemoryMib


class WorkstationCpu(Data):
    SUBJECT_FIELD = "workstation_id"
    workstation_id: Id
    cpu_seconds: Seconds


class WorkstationGpu(Data):
    SUBJECT_FIELD = "workstation_id"
    workstation_id: Id
    gpu_seconds: Seconds


class WorkstationMemory(Data):
    """A memory sample of a workstation in GB (10^9 bytes), held until the next sample."""

    SUBJECT_FIELD = "workstation_id"
    workstation_id: Id
    memory_gb: MemoryGb


class RenderCompleted(Data):
    SUBJECT_FIELD = "render_id"
    workspace_id: Id
    render_id: Id
    output_duration_seconds: Seconds


class AiTaskSubmitted(Data):
    SUBJECT_FIELD = "task_id"
    workspace_id: Id
    task_id: Id
    task_type: Name


class EgressDownload(Data):
    SUBJECT_FIELD = "artifact_id"
    workspace_id: Id
    artifact_id: Id
    bytes: Count


class DatastreamRows(Data):
    """Rows processed by a datastream run. ``row_keys`` are the rows' identities (any stable
    string, e.g. a hash of the row) so unique rows are exact over a day *and* over a month."""

    SUBJECT_FIELD = "workspace_id"
    workspace_id: Id
    datastream_id: Id | None = None
    total_rows: Count
    row_keys: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(max_length=2000)

    @model_validator(mode="after")
    def _unique_within_total(self) -> DatastreamRows:
        if len(set(self.row_keys)) > self.total_rows:
            raise ValueError("row_keys holds more distinct rows than total_rows")
        return self


class GatewayRequest(Data):
    """One AI-gateway request log (document 000 counts these against the workspace's log limit)."""

    SUBJECT_FIELD = "workspace_id"
    workspace_id: Id
    virtual_key_id: Id
    request_id: Id
    model: Name | None = None
    status_code: Annotated[int, Field(ge=100, le=599), JSON_INTEGER] | None = None


# ---- lifecycle data ---------------------------------------------------------------------------


class WorkspaceCreated(Data):
    SUBJECT_FIELD = "workspace_id"
    workspace_id: Id
    name: Name
    parent_id: Id | None = None
    tier: Name = "free"
    billing_anchor_day: Annotated[int, Field(ge=1, le=28), JSON_INTEGER] = 1


class WorkspaceUpdated(Data):
    SUBJECT_FIELD = "workspace_id"
    workspace_id: Id
    name: Name | None = None
    tier: Name | None = None


class ContractCreated(Data):
    SUBJECT_FIELD = "contract_id"
    contract_id: Id
    name: Name


class ContractWorkspaceAdded(Data):
    SUBJECT_FIELD = "workspace_id"
    contract_id: Id
    workspace_id: Id


class MemberJoined(Data):
    SUBJECT_FIELD = "membership_id"
    workspace_id: Id
    member_id: Id
    email: Annotated[str, Field(min_length=3, max_length=254, pattern=r"^[^@\s]+@[^@\s]+$")]

    @property
    def membership_id(self) -> str:
        return membership_id(self.workspace_id, self.member_id)


class MemberChanged(Data):
    SUBJECT_FIELD = "membership_id"
    workspace_id: Id
    member_id: Id

    @property
    def membership_id(self) -> str:
        return membership_id(self.workspace_id, self.member_id)


class VirtualKeyChanged(Data):
    SUBJECT_FIELD = "virtual_key_id"
    workspace_id: Id
    virtual_key_id: Id


class VirtualKeyExtraPurchased(Data):
    SUBJECT_FIELD = "workspace_id"
    workspace_id: Id
    count: Annotated[int, Field(ge=1, le=1_000_000), JSON_INTEGER]


class AgentChanged(Data):
    SUBJECT_FIELD = "agent_id"
    workspace_id: Id
    agent_id: Id


Price = Annotated[float, Field(ge=0, le=1_000_000, strict=True, allow_inf_nan=False)]


class WorkstationCreated(Data):
    """A workstation, its rate card (document 002) and the workspace it belongs to, whose keys
    may report its usage. Without a workspace it belongs to the tenant's root: only a key of a
    root workspace may report it."""

    SUBJECT_FIELD = "workstation_id"
    workstation_id: Id
    name: Name
    usd_per_cpu_hour: Price
    usd_per_gpu_hour: Price
    usd_per_gb_hour: Price
    workspace_id: Id | None = None


class DatastreamCreated(Data):
    SUBJECT_FIELD = "datastream_id"
    datastream_id: Id
    workspace_id: Id
    name: Name


Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class ApiKeyCreated(Data):
    """An API key, stored only as its SHA-256. ``scope`` says what it opens: a member's own
    access (documents 001) or a workspace and its subtree (documents 003, 004)."""

    SUBJECT_FIELD = "key_id"
    key_id: Id
    key_hash: Sha256Hex
    prefix: Annotated[str, Field(min_length=1, max_length=32)]
    scope: Literal["member", "workspace"]
    workspace_id: Id | None = None
    member_id: Id | None = None
    email: str | None = Field(default=None, max_length=254)

    @model_validator(mode="after")
    def _scope_fields(self) -> ApiKeyCreated:
        if self.scope == "workspace" and not self.workspace_id:
            raise ValueError("a workspace-scoped key needs workspace_id")
        if self.scope == "member" and not (self.member_id and self.email):
            raise ValueError("a member-scoped key needs member_id and email")
        return self


class ApiKeyRevoked(Data):
    SUBJECT_FIELD = "key_id"
    key_id: Id


class AccessTokenIssued(Data):
    """A bearer access token of a member (documents 000 and 002), stored only as its SHA-256."""

    SUBJECT_FIELD = "token_id"
    token_id: Id
    token_hash: Sha256Hex
    member_id: Id
    email: str = Field(max_length=254)
    expires_at: AwareDatetime


class AccessTokenRevoked(Data):
    SUBJECT_FIELD = "token_id"
    token_id: Id


def membership_id(workspace_id: str, member_id: str) -> str:
    """Entity id of one member in one workspace (a person may belong to several workspaces)."""
    return f"{workspace_id}/{member_id}"


# ---- the registry -----------------------------------------------------------------------------

DATA_MODELS: dict[EventType, type[Data]] = {
    EventType.CI_STEP_CPU: CiStepCpu,
    EventType.CI_STEP_MEMORY: CiStepMemory,
    EventType.WORKSTATION_CPU: WorkstationCpu,
    EventType.WORKSTATION_GPU: WorkstationGpu,
    EventType.WORKSTATION_MEMORY: WorkstationMemory,
    EventType.RENDER_COMPLETED: RenderCompleted,
    EventType.AI_TASK_SUBMITTED: AiTaskSubmitted,
    EventType.EGRESS_DOWNLOAD: EgressDownload,
    EventType.DATASTREAM_ROWS: DatastreamRows,
    EventType.GATEWAY_REQUEST: GatewayRequest,
    EventType.WORKSPACE_CREATED: WorkspaceCreated,
    EventType.WORKSPACE_UPDATED: WorkspaceUpdated,
    EventType.CONTRACT_CREATED: ContractCreated,
    EventType.CONTRACT_WORKSPACE_ADDED: ContractWorkspaceAdded,
    EventType.MEMBER_JOINED: MemberJoined,
    EventType.MEMBER_LEFT: MemberChanged,
    EventType.MEMBER_ACTIVATED: MemberChanged,
    EventType.MEMBER_DEACTIVATED: MemberChanged,
    EventType.VIRTUAL_KEY_CREATED: VirtualKeyChanged,
    EventType.VIRTUAL_KEY_REVOKED: VirtualKeyChanged,
    EventType.VIRTUAL_KEY_EXTRA_PURCHASED: VirtualKeyExtraPurchased,
    EventType.AGENT_CREATED: AgentChanged,
    EventType.AGENT_ACTIVATED: AgentChanged,
    EventType.AGENT_DEACTIVATED: AgentChanged,
    EventType.WORKSTATION_CREATED: WorkstationCreated,
    EventType.DATASTREAM_CREATED: DatastreamCreated,
    EventType.API_KEY_CREATED: ApiKeyCreated,
    EventType.API_KEY_REVOKED: ApiKeyRevoked,
    EventType.ACCESS_TOKEN_ISSUED: AccessTokenIssued,
    EventType.ACCESS_TOKEN_REVOKED: AccessTokenRevoked,
}

#: Which entity a lifecycle event changes (its subject is that entity's id).
LIFECYCLE_KIND: dict[EventType, EntityKind] = {
    EventType.WORKSPACE_CREATED: EntityKind.WORKSPACE,
    EventType.WORKSPACE_UPDATED: EntityKind.WORKSPACE,
    EventType.CONTRACT_WORKSPACE_ADDED: EntityKind.WORKSPACE,
    EventType.VIRTUAL_KEY_EXTRA_PURCHASED: EntityKind.WORKSPACE,
    EventType.CONTRACT_CREATED: EntityKind.CONTRACT,
    EventType.MEMBER_JOINED: EntityKind.MEMBER,
    EventType.MEMBER_LEFT: EntityKind.MEMBER,
    EventType.MEMBER_ACTIVATED: EntityKind.MEMBER,
    EventType.MEMBER_DEACTIVATED: EntityKind.MEMBER,
    EventType.VIRTUAL_KEY_CREATED: EntityKind.VIRTUAL_KEY,
    EventType.VIRTUAL_KEY_REVOKED: EntityKind.VIRTUAL_KEY,
    EventType.AGENT_CREATED: EntityKind.AGENT,
    EventType.AGENT_ACTIVATED: EntityKind.AGENT,
    EventType.AGENT_DEACTIVATED: EntityKind.AGENT,
    EventType.WORKSTATION_CREATED: EntityKind.WORKSTATION,
    EventType.DATASTREAM_CREATED: EntityKind.DATASTREAM,
    EventType.API_KEY_CREATED: EntityKind.API_KEY,
    EventType.API_KEY_REVOKED: EntityKind.API_KEY,
    EventType.ACCESS_TOKEN_ISSUED: EntityKind.ACCESS_TOKEN,
    EventType.ACCESS_TOKEN_REVOKED: EntityKind.ACCESS_TOKEN,
}
USAGE_TYPES: frozenset[EventType] = frozenset(t for t in EventType if t not in LIFECYCLE_KIND)
LIFECYCLE_TYPES: frozenset[EventType] = frozenset(LIFECYCLE_KIND)


class Plane(StrEnum):
    """Who may write an event type, and on which Kafka topic it travels.

    ``usage``: usage events, sent by services with a usage key (HTTP ingest) or a producer of the
    usage topic. ``control``: lifecycle events (tenants' workspaces, members, contracts,
    workstations, datastreams, API keys, access tokens), written only by administrators
    (``metering admin``) to the control topic. The aggregator accepts each plane's events only
    from its own topic, so a producer of the usage topic can never mint a credential.
    """

    USAGE = "usage"
    CONTROL = "control"


def plane_of(event_type: EventType) -> Plane:
    return Plane.CONTROL if event_type in LIFECYCLE_KIND else Plane.USAGE


class Event(BaseModel):
    """The CloudEvents 1.0 envelope shared by every event type."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    specversion: Literal["1.0"]
    id: Id
    source: Annotated[str, Field(min_length=1, max_length=256)]
    type: EventType
    subject: Id | None = None
    time: AwareDatetime
    tenant: Id | None = None
    datacontenttype: Literal["application/json"] | None = None
    data: dict[str, Any]

    @model_validator(mode="after")
    def _data_matches_type(self) -> Event:
        model = DATA_MODELS[self.type]
        parsed = model.model_validate(self.data)
        subject = parsed.subject()
        if self.subject is not None and self.subject != subject:
            raise ValueError(f"subject must be the event's {model.SUBJECT_FIELD} ({subject!r})")
        object.__setattr__(self, "subject", subject)
        object.__setattr__(self, "data", parsed.model_dump(mode="json"))
        return self

    def typed_data(self) -> Data:
        return DATA_MODELS[self.type].model_validate(self.data)


EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def event_json_schema(event_type: EventType) -> dict[str, Any]:
    """JSON Schema of one event type: the envelope with ``type`` fixed and ``data`` typed."""
    envelope = Event.model_json_schema()
    data_schema = DATA_MODELS[event_type].model_json_schema()
    defs = {**envelope.pop("$defs", {}), **data_schema.pop("$defs", {})}
    envelope["properties"]["type"] = {"const": event_type.value, "title": "Type"}
    envelope["properties"]["data"] = data_schema
    envelope["title"] = f"{event_type.value} event"
    envelope["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    if defs:
        envelope["$defs"] = defs
    return envelope


def parse_time(value: str) -> datetime:
    return TypeAdapter(AwareDatetime).validate_python(value)
