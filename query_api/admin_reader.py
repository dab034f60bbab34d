"""Every SQL query of the admin API (``/admin/v1``), and the vocabulary it shares with the CLI.

The admin API reads the ``entities`` table (with FINAL: the current fold of each entity's
lifecycle events) for one tenant at a time. Rules every query here follows, as in
``query_api/reader.py``:

- parameterized (``{name:Type}``); the only interpolated pieces are the database name
  (validated by settings) and filter fragments chosen by the ``Filter`` enum, never user input;
- filtered by ``tenant = {tenant:String}`` and ``kind = {kind:String}`` first (the table's key);
- the secret's hash (``secret_hash``) is never selected: what is not read cannot leak.

Nothing is cached: the CLI's ``--wait`` polls these queries to see the aggregator's work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import orjson
from clickhouse_connect.driver.client import Client

from query_api.errors import StorageError
from schemas.clickhouse import Table
from schemas.events import EntityKind


class AdminKind(StrEnum):
    """The kinds of entity as the admin API names them in its paths."""

    WORKSPACES = "workspaces"
    CONTRACTS = "contracts"
    MEMBERS = "members"
    VIRTUAL_KEYS = "virtual-keys"
    AGENTS = "agents"
    WORKSTATIONS = "workstations"
    DATASTREAMS = "datastreams"
    API_KEYS = "api-keys"
    ACCESS_TOKENS = "access-tokens"

    @property
    def entity_kind(self) -> EntityKind:
        return _ENTITY_KIND[self]

    @property
    def noun(self) -> str:
        """One of them, in a sentence: "API key", "workspace"."""
        return _NOUN[self]

    @classmethod
    def of(cls, kind: EntityKind) -> AdminKind:
        return _ADMIN_KIND[kind]


_ENTITY_KIND = {
    AdminKind.WORKSPACES: EntityKind.WORKSPACE,
    AdminKind.CONTRACTS: EntityKind.CONTRACT,
    AdminKind.MEMBERS: EntityKind.MEMBER,
    AdminKind.VIRTUAL_KEYS: EntityKind.VIRTUAL_KEY,
    AdminKind.AGENTS: EntityKind.AGENT,
    AdminKind.WORKSTATIONS: EntityKind.WORKSTATION,
    AdminKind.DATASTREAMS: EntityKind.DATASTREAM,
    AdminKind.API_KEYS: EntityKind.API_KEY,
    AdminKind.ACCESS_TOKENS: EntityKind.ACCESS_TOKEN,
}
_ADMIN_KIND = {v: k for k, v in _ENTITY_KIND.items()}
_NOUN = {
    AdminKind.WORKSPACES: "workspace",
    AdminKind.CONTRACTS: "contract",
    AdminKind.MEMBERS: "membership",
    AdminKind.VIRTUAL_KEYS: "virtual key",
    AdminKind.AGENTS: "agent",
    AdminKind.WORKSTATIONS: "workstation",
    AdminKind.DATASTREAMS: "datastream",
    AdminKind.API_KEYS: "API key",
    AdminKind.ACCESS_TOKENS: "access token",
}


class Status(StrEnum):
    """States the projection stores (``aggregators/projection.py``). An access token past its
    expiry keeps ``active``; the API adds ``expired: true``."""

    ACTIVE = "active"
    INACTIVE = "inactive"
    LEFT = "left"
    REVOKED = "revoked"


class Filter(StrEnum):
    """Query parameters of the listing; each is one fixed SQL condition below."""

    WORKSPACE_ID = "workspace_id"
    PARENT_ID = "parent_id"
    CONTRACT_ID = "contract_id"
    MEMBER_ID = "member_id"
    EMAIL = "email"
    STATUS = "status"


_FILTER_SQL = {
    Filter.WORKSPACE_ID: "workspace_id = {workspace_id:String}",
    Filter.PARENT_ID: "parent_id = {parent_id:String}",
    Filter.CONTRACT_ID: "contract_id = {contract_id:String}",
    Filter.MEMBER_ID: "JSONExtractString(attrs, 'member_id') = {member_id:String}",
    Filter.EMAIL: "lowerUTF8(email) = lowerUTF8({email:String})",
    Filter.STATUS: "status = {status:String}",
}

#: The filters that mean something for each kind (others are a 400, not a silent empty list).
FILTERS: dict[AdminKind, frozenset[Filter]] = {
    AdminKind.WORKSPACES: frozenset({Filter.PARENT_ID, Filter.CONTRACT_ID, Filter.STATUS}),
    AdminKind.CONTRACTS: frozenset({Filter.STATUS}),
    AdminKind.MEMBERS: frozenset({Filter.WORKSPACE_ID, Filter.MEMBER_ID, Filter.EMAIL, Filter.STATUS}),
    AdminKind.VIRTUAL_KEYS: frozenset({Filter.WORKSPACE_ID, Filter.STATUS}),
    AdminKind.AGENTS: frozenset({Filter.WORKSPACE_ID, Filter.STATUS}),
    AdminKind.WORKSTATIONS: frozenset({Filter.WORKSPACE_ID, Filter.STATUS}),
    AdminKind.DATASTREAMS: frozenset({Filter.WORKSPACE_ID, Filter.STATUS}),
    AdminKind.API_KEYS: frozenset({Filter.WORKSPACE_ID, Filter.MEMBER_ID, Filter.EMAIL, Filter.STATUS}),
    AdminKind.ACCESS_TOKENS: frozenset({Filter.MEMBER_ID, Filter.EMAIL, Filter.STATUS}),
}


@dataclass(frozen=True)
class EntityRow:
    """One row of ``entities`` as the admin API may show it (no secret hash)."""

    entity_id: str
    workspace_id: str
    parent_id: str
    contract_id: str
    name: str
    email: str
    tier: str
    status: str
    expires_at: datetime | None
    attrs: dict[str, Any]
    created_at: datetime
    updated_at: datetime


_COLUMNS = (
    "entity_id, workspace_id, parent_id, contract_id, name, email, tier, status, expires_at, attrs, "
    "created_at, updated_at"
)


def _utc(t: datetime | None) -> datetime | None:
    if t is None:
        return None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _row(values: Sequence[Any]) -> EntityRow:
    eid, ws, parent, contract, name, email, tier, status, expires, attrs, created, updated = values
    return EntityRow(
        entity_id=str(eid),
        workspace_id=str(ws),
        parent_id=str(parent),
        contract_id=str(contract),
        name=str(name),
        email=str(email),
        tier=str(tier),
        status=str(status),
        expires_at=_utc(expires),
        attrs=orjson.loads(attrs) if attrs else {},
        created_at=_utc(created) or datetime(1970, 1, 1, tzinfo=UTC),
        updated_at=_utc(updated) or datetime(1970, 1, 1, tzinfo=UTC),
    )


class AdminReader:
    def __init__(self, client: Client, database: str) -> None:
        self._client = client
        self._db = database

    def _rows(self, sql: str, params: dict[str, Any]) -> Sequence[Sequence[Any]]:
        try:
            return self._client.query(sql, parameters=params).result_rows
        except Exception as exc:  # any driver/engine failure is a storage failure to the caller
            raise StorageError(type(exc).__name__) from exc

    def tenant_exists(self, tenant: str) -> bool:
        """A tenant exists once any of its entities does (tenants are not entities of their own)."""
        rows = self._rows(
            f"SELECT count() FROM (SELECT 1 FROM {self._db}.{Table.ENTITIES} "
            "WHERE tenant = {tenant:String} LIMIT 1)",
            {"tenant": tenant},
        )
        return bool(rows and int(rows[0][0]) > 0)

    def get(self, tenant: str, kind: AdminKind, entity_id: str) -> EntityRow | None:
        rows = self._rows(
            f"SELECT {_COLUMNS} FROM {self._db}.{Table.ENTITIES} FINAL "
            "WHERE tenant = {tenant:String} AND kind = {kind:String} AND entity_id = {id:String} LIMIT 1",
            {"tenant": tenant, "kind": kind.entity_kind.value, "id": entity_id},
        )
        return _row(rows[0]) if rows else None

    def page(
        self,
        tenant: str,
        kind: AdminKind,
        filters: Mapping[Filter, str],
        after: str | None,
        limit: int,
    ) -> tuple[list[EntityRow], int]:
        """Up to ``limit`` entities in id order after the id ``after``, and how many match in all.
        ``filters`` must be among ``FILTERS[kind]`` (the router checks)."""
        where = ["tenant = {tenant:String}", "kind = {kind:String}"]
        where += [_FILTER_SQL[f] for f in sorted(filters)]
        params: dict[str, Any] = {"tenant": tenant, "kind": kind.entity_kind.value}
        params |= {f.value: v for f, v in filters.items()}
        condition = " AND ".join(where)
        total = self._rows(f"SELECT count() FROM {self._db}.{Table.ENTITIES} FINAL WHERE {condition}", params)
        if after is not None:
            condition += " AND entity_id > {after:String}"
            params["after"] = after
        rows = self._rows(
            f"SELECT {_COLUMNS} FROM {self._db}.{Table.ENTITIES} FINAL WHERE {condition} "
            "ORDER BY entity_id LIMIT {limit:UInt32}",
            params | {"limit": limit},
        )
        return [_row(r) for r in rows], int(total[0][0]) if total else 0
