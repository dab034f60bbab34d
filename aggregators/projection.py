"""Lifecycle events folded into the current state of their entity (pure, no I/O).

The state of an entity is the fold of *all* its lifecycle events in event-time order (ties by
Kafka offset), so a late event lands where it belongs and a replay gives the same rows. The
writer re-reads an entity's events from ``events_raw`` whenever one of them arrives and stores
the fold in ``entities`` (ReplacingMergeTree: read with FINAL).

Columns of ``entities`` per kind:
- workspace: name, parent_id, tier, contract_id, status=active, attrs {billing_anchor_day, extra_vks}
- contract: name, status=active
- member: entity_id "<workspace_id>/<member_id>", workspace_id, email,
  status active|inactive|left, attrs {member_id}
- virtual_key, agent: workspace_id, status active|revoked (keys) / active|inactive (agents)
- workstation: name, workspace_id ("" = the tenant's root), attrs {usd_per_cpu_hour,
  usd_per_gpu_hour, usd_per_gb_hour}
- datastream: workspace_id, name
- api_key: secret_hash, workspace_id, email, status active|revoked, attrs {scope, member_id, prefix}
- access_token: secret_hash, email, expires_at, status active|revoked, attrs {member_id}
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from schemas.events import LIFECYCLE_KIND, EntityKind, EventType


@dataclass(frozen=True)
class LifecycleEvent:
    type: EventType
    time: datetime
    data: dict[str, Any]
    src_partition: int
    src_offset: int


@dataclass
class EntityState:
    tenant: str
    kind: EntityKind
    entity_id: str
    workspace_id: str = ""
    parent_id: str = ""
    contract_id: str = ""
    name: str = ""
    email: str = ""
    tier: str = ""
    status: str = ""
    secret_hash: str = ""
    expires_at: datetime | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None
    src_partition: int = 0
    src_offset: int = 0

    def row(self) -> dict[str, Any]:
        """A JSONEachRow row for ``entities``; version = last offset folded in, so a later
        recompute that saw more events wins, and a replay writes an identical row."""
        fmt = _fmt_time
        return {
            "tenant": self.tenant,
            "kind": self.kind.value,
            "entity_id": self.entity_id,
            "workspace_id": self.workspace_id,
            "parent_id": self.parent_id,
            "contract_id": self.contract_id,
            "name": self.name,
            "email": self.email,
            "tier": self.tier,
            "status": self.status,
            "secret_hash": self.secret_hash,
            "expires_at": fmt(self.expires_at) if self.expires_at else None,
            "attrs": orjson.dumps(self.attrs, option=orjson.OPT_SORT_KEYS).decode(),
            "created_at": fmt(self.created_at),
            "updated_at": fmt(self.updated_at),
            "src_partition": self.src_partition,
            "src_offset": self.src_offset,
            "version": self.src_offset,
        }


def _fmt_time(t: datetime | None) -> str:
    return (t or datetime(1970, 1, 1)).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def fold(
    tenant: str, kind: EntityKind, entity_id: str, events: Iterable[LifecycleEvent]
) -> EntityState | None:
    """The state after all ``events`` (any order in; sorted here). None if none of them applies."""
    state = EntityState(tenant=tenant, kind=kind, entity_id=entity_id)
    seen = False
    for ev in sorted(events, key=lambda e: (e.time, e.src_offset)):
        if LIFECYCLE_KIND.get(ev.type) is not kind:
            continue
        _apply(state, ev)
        seen = True
        state.created_at = state.created_at or ev.time
        state.updated_at = ev.time
        state.src_partition = ev.src_partition
        state.src_offset = max(state.src_offset, ev.src_offset)
    return state if seen else None


def _apply(s: EntityState, ev: LifecycleEvent) -> None:
    d = ev.data
    t = ev.type
    if t is EventType.WORKSPACE_CREATED:
        s.name, s.parent_id, s.tier, s.status = d["name"], d.get("parent_id") or "", d["tier"], "active"
        s.attrs["billing_anchor_day"] = d.get("billing_anchor_day", 1)
        s.attrs.setdefault("extra_vks", 0)
    elif t is EventType.WORKSPACE_UPDATED:
        s.name = d.get("name") or s.name
        s.tier = d.get("tier") or s.tier
    elif t is EventType.CONTRACT_WORKSPACE_ADDED:
        s.contract_id = d["contract_id"]
    elif t is EventType.VIRTUAL_KEY_EXTRA_PURCHASED:
        s.attrs["extra_vks"] = int(s.attrs.get("extra_vks", 0)) + int(d["count"])
    elif t is EventType.CONTRACT_CREATED:
        s.name, s.status = d["name"], "active"
    elif t is EventType.MEMBER_JOINED:
        s.workspace_id, s.email, s.status = d["workspace_id"], d["email"], "active"
        s.attrs["member_id"] = d["member_id"]
    elif t is EventType.MEMBER_LEFT:
        s.status = "left"
    elif t is EventType.MEMBER_ACTIVATED:
        s.status = "active" if s.status != "left" else s.status
    elif t is EventType.MEMBER_DEACTIVATED:
        s.status = "inactive" if s.status != "left" else s.status
    elif t in (EventType.VIRTUAL_KEY_CREATED, EventType.AGENT_CREATED):
        s.workspace_id, s.status = d["workspace_id"], "active"
    elif t is EventType.VIRTUAL_KEY_REVOKED:
        s.workspace_id, s.status = d["workspace_id"], "revoked"
    elif t is EventType.AGENT_ACTIVATED:
        s.workspace_id, s.status = d["workspace_id"], "active"
    elif t is EventType.AGENT_DEACTIVATED:
        s.workspace_id, s.status = d["workspace_id"], "inactive"
    elif t is EventType.WORKSTATION_CREATED:
        s.name, s.workspace_id, s.status = d["name"], d.get("workspace_id") or "", "active"
        s.attrs.update({k: d[k] for k in ("usd_per_cpu_hour", "usd_per_gpu_hour", "usd_per_gb_hour")})
    elif t is EventType.DATASTREAM_CREATED:
        s.workspace_id, s.name, s.status = d["workspace_id"], d["name"], "active"
    elif t is EventType.API_KEY_CREATED:
        s.secret_hash, s.status = d["key_hash"], "active"
        s.workspace_id, s.email = d.get("workspace_id") or "", d.get("email") or ""
        s.attrs.update({"scope": d["scope"], "member_id": d.get("member_id") or "", "prefix": d["prefix"]})
    elif t is EventType.ACCESS_TOKEN_ISSUED:
        s.secret_hash, s.status, s.email = d["token_hash"], "active", d["email"]
        s.expires_at = datetime.fromisoformat(d["expires_at"])
        s.attrs["member_id"] = d["member_id"]
    elif t in (EventType.API_KEY_REVOKED, EventType.ACCESS_TOKEN_REVOKED):
        s.status = "revoked"
