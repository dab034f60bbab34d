"""What a usage key may report: the workspaces its scope opens, and the resources inside them.

An event sent with a usage key names resources in its ``data``; each must lie inside the key's
scope, or the event is rejected with ``out_of_scope`` (docs/api.md, "Who may send what"):

- a **workspace-scoped key** opens its workspace and every workspace beneath it (``parent_id``
  links, any depth, as document 004 reads them);
- a **member-scoped key** opens the workspaces where its member is an *active* member, those
  workspaces only (not their subtrees); if the key also names a workspace, only that one;
- ``data.workspace_id`` must be an opened workspace;
- ``data.contract_id`` must be an existing contract linked to the event's workspace (to an
  opened workspace when the event names none);
- ``data.datastream_id`` must be a datastream of the event's workspace (of an opened workspace
  when the event names none);
- ``data.workstation_id`` must be a workstation of an opened workspace; a workstation created
  without a workspace belongs to the tenant's root: only a workspace-scoped key of a root
  workspace (one without a parent) may report it.

An id this tenant does not have answers exactly like an id outside the scope: the tenant's
entities are the only ones ever loaded, and the message names only the field and the id sent.

The decisions (``TenantScope``, ``KeyScope``, ``judge``) are pure. ``ScopeStore`` does the I/O:
one parameterized query per tenant loads what they need from ``entities``, kept for ``ttl_s``
(a ``cachetools.TTLCache``; concurrent misses of one tenant wait for a single load), so a request
costs set lookups per event. The HTTP ingest reads a scope (``key_scope``) from its thread pool,
never on the event loop; on the loop it only takes one already kept (``cached_key_scope``). Entities are judged as they stand when the request arrives, up to ``ttl_s`` old: a
workspace created (and applied by the aggregator) a moment ago may be refused for that long.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import cachetools
from clickhouse_connect.driver.client import Client

from ingest.sdk import InvalidEvent
from query_api.credentials import Principal
from schemas.clickhouse import Table
from schemas.events import EntityKind
from schemas.tenancy import subtree

#: The per-event code of an event naming a resource outside the key's scope (or unknown).
OUT_OF_SCOPE = "out_of_scope"

WORKSPACE_SCOPE = "workspace"
MEMBER_SCOPE = "member"


# ---- decisions (pure) --------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyScope:
    """What one key opens, with the tenant's facts the per-event checks read."""

    tenant: TenantScope
    workspaces: frozenset[str]
    #: May report workstations without a workspace (the tenant's root).
    root: bool
    #: Contracts linked to an opened workspace.
    contracts: frozenset[str]


@dataclass(frozen=True, eq=False)
class TenantScope:
    """One tenant's facts that scopes are decided by (one snapshot of ``entities``)."""

    #: workspace id -> parent workspace id ("" for a root workspace)
    parents: Mapping[str, str]
    #: workspace id -> the contract it is linked to ("" for none)
    contract_of: Mapping[str, str]
    #: contracts that exist
    contracts: frozenset[str]
    #: member id -> the workspaces where that member is active
    active_memberships: Mapping[str, frozenset[str]]
    #: workstation id -> its workspace ("" for the tenant's root)
    workstations: Mapping[str, str]
    #: datastream id -> its workspace
    datastreams: Mapping[str, str]
    _keys: dict[tuple[str, str, str], KeyScope] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def subtree(self, root: str) -> frozenset[str]:
        """``root`` and every workspace beneath it (schemas/tenancy.py)."""
        return subtree(self.parents, root)

    def for_key(self, scope: str, workspace_id: str, member_id: str) -> KeyScope:
        """The scope of a key (memoized in this snapshot: a tenant has few keys)."""
        memo_key = (scope, workspace_id, member_id)
        hit = self._keys.get(memo_key)
        if hit is None:
            hit = self._keys[memo_key] = self._key_scope(scope, workspace_id, member_id)
        return hit

    def _key_scope(self, scope: str, workspace_id: str, member_id: str) -> KeyScope:
        root = False
        if scope == WORKSPACE_SCOPE:
            opened = self.subtree(workspace_id)
            root = workspace_id in opened and not self.parents[workspace_id]
        elif scope == MEMBER_SCOPE and member_id:
            opened = self.active_memberships.get(member_id, frozenset())
            if workspace_id:  # a member key bound to one workspace opens that one at most
                opened = opened & {workspace_id}
        else:  # an unknown scope opens nothing
            opened = frozenset()
        linked = frozenset(c for w in opened if (c := self.contract_of.get(w, "")) and c in self.contracts)
        return KeyScope(self, opened, root, linked)


def build_tenant_scope(rows: Iterable[tuple[str, str, str, str, str, str]]) -> TenantScope:
    """A snapshot from ``entities`` rows ``(kind, entity_id, workspace_id, parent_id,
    contract_id, member_id)``; member rows are those of *active* members only."""
    parents: dict[str, str] = {}
    contract_of: dict[str, str] = {}
    contracts: set[str] = set()
    memberships: dict[str, set[str]] = {}
    workstations: dict[str, str] = {}
    datastreams: dict[str, str] = {}
    for kind, entity_id, workspace_id, parent_id, contract_id, member_id in rows:
        if kind == EntityKind.WORKSPACE:
            parents[entity_id] = parent_id
            contract_of[entity_id] = contract_id
        elif kind == EntityKind.CONTRACT:
            contracts.add(entity_id)
        elif kind == EntityKind.MEMBER:
            if member_id and workspace_id:
                memberships.setdefault(member_id, set()).add(workspace_id)
        elif kind == EntityKind.WORKSTATION:
            workstations[entity_id] = workspace_id
        elif kind == EntityKind.DATASTREAM:
            datastreams[entity_id] = workspace_id
    return TenantScope(
        parents=parents,
        contract_of=contract_of,
        contracts=frozenset(contracts),
        active_memberships={m: frozenset(ws) for m, ws in memberships.items()},
        workstations=workstations,
        datastreams=datastreams,
    )


def _q(value: Any) -> str:
    """An id quoted as a JSON string, as it was sent."""
    return json.dumps(str(value), ensure_ascii=False)


def judge(key: KeyScope, data: Mapping[str, Any]) -> str | None:
    """None if every resource ``data`` names is inside ``key``'s scope, else the message of the
    first one that is not (fields checked in the order workspace, contract, datastream,
    workstation). The message never depends on whether the id exists elsewhere."""
    facts = key.tenant
    workspace = data.get("workspace_id")
    if workspace is not None and workspace not in key.workspaces:
        return f"data.workspace_id {_q(workspace)} is not a workspace this key may report for"
    # Below, a named workspace is inside the scope: naming it in a message reveals nothing.
    contract = data.get("contract_id")
    if contract is not None:
        if workspace is not None:
            if contract not in facts.contracts or facts.contract_of.get(workspace) != contract:
                return f"data.contract_id {_q(contract)} is not a contract of workspace {_q(workspace)}"
        elif contract not in key.contracts:
            return f"data.contract_id {_q(contract)} is not a contract this key may report for"
    datastream = data.get("datastream_id")
    if datastream is not None:
        owner = facts.datastreams.get(datastream)
        if workspace is not None:
            if owner != workspace:
                return f"data.datastream_id {_q(datastream)} is not a datastream of workspace {_q(workspace)}"
        elif owner is None or owner not in key.workspaces:
            return f"data.datastream_id {_q(datastream)} is not a datastream this key may report for"
    workstation = data.get("workstation_id")
    if workstation is not None:
        home = facts.workstations.get(workstation)
        if home is None or not (key.root if home == "" else home in key.workspaces):
            return f"data.workstation_id {_q(workstation)} is not a workstation this key may report for"
    return None


class ScopeCheck:
    """One request's check for one key: raises ``InvalidEvent`` (``out_of_scope``) for an event
    outside the scope. ``load`` (I/O) runs at the first event checked, so a request whose events
    are all invalid costs no lookup."""

    def __init__(self, load: Callable[[], KeyScope]) -> None:
        self._load = load
        self._key: KeyScope | None = None

    def check(self, event: Mapping[str, Any]) -> None:
        if self._key is None:
            self._key = self._load()
        data = event.get("data")
        message = judge(self._key, data) if isinstance(data, Mapping) else None
        if message is not None:
            raw_id = event.get("id")
            raise InvalidEvent(OUT_OF_SCOPE, message, raw_id if isinstance(raw_id, str) else None)


# ---- I/O ---------------------------------------------------------------------------------------


class ScopeLookup(Protocol):
    """What the HTTP ingest needs of ``ScopeStore``."""

    def key_scope(self, principal: Principal) -> KeyScope: ...


_KINDS = [
    EntityKind.WORKSPACE.value,
    EntityKind.CONTRACT.value,
    EntityKind.MEMBER.value,
    EntityKind.WORKSTATION.value,
    EntityKind.DATASTREAM.value,
]


class ScopeStore:
    """Tenants' scopes read from ``entities``, each kept for ``ttl_s`` (0: read every time)."""

    def __init__(
        self,
        client: Client,
        database: str,
        ttl_s: float = 2.0,
        max_tenants: int = 10_000,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._db = database
        self._load: Callable[[str], TenantScope] = self._fetch
        self._cache: cachetools.TTLCache[str, TenantScope] | None = None
        self._lock = threading.Condition()
        if ttl_s > 0:
            self._cache = cachetools.TTLCache(max_tenants, ttl_s, timer)
            self._load = cachetools.cached(
                self._cache, key=lambda tenant: tenant, lock=self._lock, condition=self._lock
            )(self._fetch)

    def tenant_scope(self, tenant: str) -> TenantScope:
        return self._load(tenant)

    def key_scope(self, principal: Principal) -> KeyScope:
        return self.tenant_scope(principal.tenant).for_key(
            principal.scope, principal.workspace_id, principal.member_id
        )

    def cached_key_scope(self, principal: Principal) -> KeyScope | None:
        """``key_scope`` when the tenant's scope is kept and younger than the TTL, else None:
        never reads ClickHouse, so an event loop may call it."""
        if self._cache is None:
            return None
        with self._lock:
            tenant = self._cache.get(principal.tenant)
        if tenant is None:
            return None
        return tenant.for_key(principal.scope, principal.workspace_id, principal.member_id)

    def _fetch(self, tenant: str) -> TenantScope:
        rows = self._client.query(
            "SELECT kind, entity_id, workspace_id, parent_id, contract_id, "
            "JSONExtractString(attrs, 'member_id') "
            f"FROM {self._db}.{Table.ENTITIES} FINAL "
            "WHERE tenant = {tenant:String} AND kind IN {kinds:Array(String)} "
            "AND (kind != {member:String} OR status = 'active')",
            parameters={"tenant": tenant, "kinds": _KINDS, "member": EntityKind.MEMBER.value},
            settings={"max_threads": 1},
        ).result_rows
        return build_tenant_scope(
            (str(kind), str(eid), str(ws), str(parent), str(contract), str(member))
            for kind, eid, ws, parent, contract, member in rows
        )
