"""The scope decisions of ``ingest.scope``: which resources a usage key may report for (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from ingest.scope import (
    OUT_OF_SCOPE,
    KeyScope,
    ScopeCheck,
    ScopeStore,
    TenantScope,
    build_tenant_scope,
    judge,
)
from ingest.sdk import InvalidEvent
from query_api.credentials import Principal
from schemas.events import EntityKind

# The tenant's world: a tree root -> mid -> leaf (-> deep), a second tree other-root, a cycle
# a <-> b (bad data), contracts, members, workstations and datastreams.
ROWS: list[tuple[str, str, str, str, str, str]] = [
    # (kind, entity_id, workspace_id, parent_id, contract_id, member_id)
    ("workspace", "root", "", "", "c-root", ""),
    ("workspace", "mid", "", "root", "c-mid", ""),
    ("workspace", "leaf", "", "mid", "", ""),
    ("workspace", "deep", "", "leaf", "c-mid", ""),
    ("workspace", "other-root", "", "", "c-other", ""),
    ("workspace", "a", "", "b", "", ""),
    ("workspace", "b", "", "a", "", ""),
    ("workspace", "orphan", "", "ghost", "c-ghost", ""),  # linked to a contract never created
    ("contract", "c-root", "", "", "", ""),
    ("contract", "c-mid", "", "", "", ""),
    ("contract", "c-other", "", "", "", ""),
    ("member", "mid/alice", "mid", "", "", "alice"),
    ("member", "other-root/alice", "other-root", "", "", "alice"),
    ("member", "leaf/bob", "leaf", "", "", "bob"),
    ("workstation", "ws-root", "", "", "", ""),  # no workspace: the tenant's root
    ("workstation", "ws-mid", "mid", "", "", ""),
    ("workstation", "ws-deep", "deep", "", "", ""),
    ("workstation", "ws-other", "other-root", "", "", ""),
    ("datastream", "ds-mid", "mid", "", "", ""),
    ("datastream", "ds-leaf", "leaf", "", "", ""),
    ("virtual_key", "vk-1", "mid", "", "", ""),  # not a kind scopes read
]


@pytest.fixture
def world() -> TenantScope:
    return build_tenant_scope(ROWS)


def ws_key(world: TenantScope, workspace: str) -> KeyScope:
    return world.for_key("workspace", workspace, "")


def member_key(world: TenantScope, member: str, workspace: str = "") -> KeyScope:
    return world.for_key("member", workspace, member)


# ---- what each key opens -------------------------------------------------------------------------


def test_a_workspace_key_opens_its_subtree_at_any_depth(world: TenantScope) -> None:
    assert ws_key(world, "root").workspaces == {"root", "mid", "leaf", "deep"}
    assert ws_key(world, "mid").workspaces == {"mid", "leaf", "deep"}
    assert ws_key(world, "deep").workspaces == {"deep"}
    assert ws_key(world, "other-root").workspaces == {"other-root"}


def test_a_cycle_in_bad_data_ends_and_an_unknown_workspace_opens_nothing(world: TenantScope) -> None:
    assert ws_key(world, "a").workspaces == {"a", "b"}
    assert ws_key(world, "nowhere").workspaces == frozenset()
    assert ws_key(world, "").workspaces == frozenset()


def test_only_a_root_workspace_key_is_the_tenant_root(world: TenantScope) -> None:
    assert ws_key(world, "root").root and ws_key(world, "other-root").root
    assert not ws_key(world, "mid").root
    assert not ws_key(world, "orphan").root  # a parent that does not exist is still a parent
    assert not ws_key(world, "nowhere").root


def test_a_member_key_opens_the_workspaces_where_the_member_is_active_without_subtrees(
    world: TenantScope,
) -> None:
    assert member_key(world, "alice").workspaces == {"mid", "other-root"}  # not leaf, deep
    assert member_key(world, "bob").workspaces == {"leaf"}
    assert member_key(world, "carol").workspaces == frozenset()
    assert member_key(world, "").workspaces == frozenset()
    assert not member_key(world, "alice").root  # even though other-root is a root


def test_a_member_key_bound_to_a_workspace_opens_that_one_at_most(world: TenantScope) -> None:
    assert member_key(world, "alice", "mid").workspaces == {"mid"}
    assert member_key(world, "alice", "leaf").workspaces == frozenset()


def test_an_unknown_key_scope_opens_nothing(world: TenantScope) -> None:
    assert world.for_key("admin", "root", "alice").workspaces == frozenset()


def test_inactive_memberships_are_not_loaded() -> None:
    # ScopeStore's query keeps only active member rows; anything else is absent from the rows
    world = build_tenant_scope([("workspace", "w", "", "", "", "")])
    assert member_key(world, "alice").workspaces == frozenset()


def test_key_scopes_are_memoized_per_snapshot(world: TenantScope) -> None:
    assert ws_key(world, "mid") is ws_key(world, "mid")
    assert build_tenant_scope(ROWS).for_key("workspace", "mid", "") is not ws_key(world, "mid")


# ---- every field ------------------------------------------------------------------------------


def test_workspace_id(world: TenantScope) -> None:
    key = ws_key(world, "mid")
    for inside in ("mid", "leaf", "deep"):
        assert judge(key, {"workspace_id": inside}) is None
    for outside in ("root", "other-root", "a"):
        assert judge(key, {"workspace_id": outside}) == (
            f'data.workspace_id "{outside}" is not a workspace this key may report for'
        )


def test_contract_id_must_be_the_contract_of_the_events_workspace(world: TenantScope) -> None:
    key = ws_key(world, "root")
    assert judge(key, {"workspace_id": "mid", "contract_id": "c-mid"}) is None
    assert judge(key, {"workspace_id": "deep", "contract_id": "c-mid"}) is None
    # a contract of another workspace in scope is still not this workspace's
    assert judge(key, {"workspace_id": "mid", "contract_id": "c-root"}) == (
        'data.contract_id "c-root" is not a contract of workspace "mid"'
    )
    # a workspace in no contract admits no contract
    assert judge(key, {"workspace_id": "leaf", "contract_id": "c-mid"}) is not None
    # out of scope, unknown, never created: one answer
    for contract in ("c-other", "c-nowhere"):
        assert judge(key, {"workspace_id": "mid", "contract_id": contract}) == (
            f'data.contract_id "{contract}" is not a contract of workspace "mid"'
        )
    assert judge(ws_key(world, "orphan"), {"workspace_id": "orphan", "contract_id": "c-ghost"}) is not None


def test_contract_id_without_a_workspace_must_be_linked_to_one_in_scope(world: TenantScope) -> None:
    key = ws_key(world, "mid")
    assert key.contracts == {"c-mid"}
    assert judge(key, {"contract_id": "c-mid"}) is None
    for contract in ("c-root", "c-other", "c-nowhere"):
        assert judge(key, {"contract_id": contract}) == (
            f'data.contract_id "{contract}" is not a contract this key may report for'
        )


def test_the_workspace_is_judged_before_the_contract(world: TenantScope) -> None:
    message = judge(ws_key(world, "mid"), {"workspace_id": "other-root", "contract_id": "c-other"})
    assert message == 'data.workspace_id "other-root" is not a workspace this key may report for'


def test_datastream_id_must_be_a_datastream_of_the_events_workspace(world: TenantScope) -> None:
    key = ws_key(world, "root")
    assert judge(key, {"workspace_id": "mid", "datastream_id": "ds-mid"}) is None
    assert judge(key, {"workspace_id": "leaf", "datastream_id": "ds-leaf"}) is None
    # in scope, but another workspace's; and unknown: the same shape
    for datastream in ("ds-leaf", "ds-nowhere"):
        assert judge(key, {"workspace_id": "mid", "datastream_id": datastream}) == (
            f'data.datastream_id "{datastream}" is not a datastream of workspace "mid"'
        )
    assert judge(key, {"workspace_id": "mid", "datastream_id": None}) is None  # optional field
    assert judge(ws_key(world, "leaf"), {"datastream_id": "ds-leaf"}) is None
    assert judge(ws_key(world, "leaf"), {"datastream_id": "ds-mid"}) == (
        'data.datastream_id "ds-mid" is not a datastream this key may report for'
    )


def test_workstation_id(world: TenantScope) -> None:
    def verdict(key: KeyScope, workstation: str) -> bool:
        return judge(key, {"workstation_id": workstation}) is None

    root, mid, deep = ws_key(world, "root"), ws_key(world, "mid"), ws_key(world, "deep")
    assert [verdict(root, w) for w in ("ws-root", "ws-mid", "ws-deep", "ws-other")] == [1, 1, 1, 0]
    assert [verdict(mid, w) for w in ("ws-root", "ws-mid", "ws-deep", "ws-other")] == [0, 1, 1, 0]
    assert [verdict(deep, w) for w in ("ws-root", "ws-mid", "ws-deep", "ws-other")] == [0, 0, 1, 0]
    other = ws_key(world, "other-root")
    assert [verdict(other, w) for w in ("ws-root", "ws-mid", "ws-other")] == [1, 0, 1]
    alice = member_key(world, "alice")  # active in mid and other-root, but no subtree, no root
    assert [verdict(alice, w) for w in ("ws-root", "ws-mid", "ws-deep", "ws-other")] == [0, 1, 0, 1]
    for workstation in ("ws-other", "ws-nowhere"):
        assert judge(mid, {"workstation_id": workstation}) == (
            f'data.workstation_id "{workstation}" is not a workstation this key may report for'
        )


def test_member_keys_are_judged_by_their_memberships(world: TenantScope) -> None:
    bob = member_key(world, "bob")
    assert judge(bob, {"workspace_id": "leaf", "datastream_id": "ds-leaf"}) is None
    assert judge(bob, {"workspace_id": "deep"}) is not None  # beneath leaf: no subtree
    assert judge(bob, {"workspace_id": "mid"}) is not None
    assert judge(member_key(world, "carol"), {"workspace_id": "leaf"}) is not None


def test_unknown_and_foreign_ids_answer_alike(world: TenantScope) -> None:
    """Another tenant's id is not in this tenant's snapshot: it is simply unknown. An id of
    another subtree of this tenant gets the very same answer, only the id sent differs."""
    key = ws_key(world, "mid")
    for field, foreign in (
        ("workspace_id", "other-root"),
        ("workstation_id", "ws-other"),
        ("contract_id", "c-other"),
        ("datastream_id", "ds-leaf"),
    ):
        data = {"workspace_id": "mid"} if field in ("contract_id", "datastream_id") else {}
        seen = judge(key, data | {field: foreign})
        unknown = judge(key, data | {field: "never-created"})
        assert seen is not None and unknown is not None
        assert seen.replace(f'"{foreign}"', '"X"') == unknown.replace('"never-created"', '"X"')


def test_events_naming_no_resource_pass_and_quotes_in_ids_are_escaped(world: TenantScope) -> None:
    assert judge(ws_key(world, "mid"), {"task_type": "x"}) is None
    assert judge(ws_key(world, "mid"), {"workspace_id": 'w"1'}) == (
        'data.workspace_id "w\\"1" is not a workspace this key may report for'
    )


# ---- the per-request check --------------------------------------------------------------------


def test_scope_check_loads_once_and_raises_out_of_scope(world: TenantScope) -> None:
    loads: list[int] = []

    def load() -> KeyScope:
        loads.append(1)
        return ws_key(world, "mid")

    check = ScopeCheck(load)
    assert loads == []  # nothing loaded before the first event
    check.check({"id": "e1", "data": {"workspace_id": "leaf"}})
    with pytest.raises(InvalidEvent) as exc:
        check.check({"id": "e2", "data": {"workspace_id": "root"}})
    assert (exc.value.code, exc.value.event_id) == (OUT_OF_SCOPE, "e2")
    assert exc.value.message == 'data.workspace_id "root" is not a workspace this key may report for'
    assert loads == [1]


def test_scope_check_of_an_event_without_data_passes(world: TenantScope) -> None:
    event: dict[str, Any] = {"id": "e"}
    ScopeCheck(lambda: ws_key(world, "mid")).check(event)


# ---- the store: one parameterized load per tenant per TTL (no ClickHouse: a fake client) --------


class FakeResult:
    def __init__(self, rows: list[tuple[str, ...]]) -> None:
        self.result_rows = rows


class FakeClient:
    """Answers the store's query with the rows of the tenant it names; records every query."""

    def __init__(self, rows: dict[str, list[tuple[str, ...]]]) -> None:
        self.rows = rows
        self.queries: list[tuple[str, dict[str, Any]]] = []

    def query(self, sql: str, parameters: dict[str, Any], settings: Any = None) -> FakeResult:
        self.queries.append((sql, parameters))
        return FakeResult(self.rows.get(parameters["tenant"], []))


def principal(tenant: str, scope: str, workspace: str = "", member: str = "") -> Principal:
    return Principal(tenant, EntityKind.API_KEY, "k", scope, workspace, member, "", "active", None)


def test_the_store_loads_each_tenant_once_per_ttl() -> None:
    now = [0.0]
    client = FakeClient({"acme": ROWS, "globex": [("workspace", "mid", "", "", "", "")]})
    store = ScopeStore(client, "db", ttl_s=2.0, timer=lambda: now[0])  # type: ignore[arg-type]
    for _ in range(100):
        assert store.key_scope(principal("acme", "workspace", "mid")).workspaces == {"mid", "leaf", "deep"}
    # the same workspace id in another tenant is another tenant's tree
    assert store.key_scope(principal("globex", "workspace", "mid")).workspaces == {"mid"}
    assert [q[1]["tenant"] for q in client.queries] == ["acme", "globex"]
    now[0] = 2.5  # past the TTL: read again
    store.key_scope(principal("acme", "member", member="alice"))
    assert [q[1]["tenant"] for q in client.queries] == ["acme", "globex", "acme"]


def test_the_kept_scope_is_given_without_a_read_and_only_while_kept() -> None:
    now = [0.0]
    client = FakeClient({"acme": ROWS})
    store = ScopeStore(client, "db", ttl_s=2.0, timer=lambda: now[0])  # type: ignore[arg-type]
    key = principal("acme", "workspace", "mid")
    assert store.cached_key_scope(key) is None  # nothing kept yet, and nothing read for it
    assert client.queries == []
    loaded = store.key_scope(key)
    kept = store.cached_key_scope(key)
    assert kept is not None and kept.workspaces == loaded.workspaces == {"mid", "leaf", "deep"}
    # the kept tenant scope answers for another key of the tenant too, with that key's own scope
    other = store.cached_key_scope(principal("acme", "workspace", "leaf"))
    assert other is not None and other.workspaces == {"leaf", "deep"}
    assert store.cached_key_scope(principal("globex", "workspace", "mid")) is None
    assert len(client.queries) == 1
    now[0] = 2.5  # past the TTL: no longer kept
    assert store.cached_key_scope(key) is None
    assert len(client.queries) == 1
    assert ScopeStore(client, "db", ttl_s=0).cached_key_scope(key) is None  # type: ignore[arg-type]


def test_the_store_query_is_parameterized_and_filtered_by_tenant() -> None:
    client = FakeClient({})
    store = ScopeStore(client, "db", ttl_s=0)  # type: ignore[arg-type]
    store.tenant_scope("it's")
    store.tenant_scope("it's")  # ttl 0: no cache
    assert len(client.queries) == 2
    sql, params = client.queries[0]
    assert "tenant = {tenant:String}" in sql and "it's" not in sql
    assert params["tenant"] == "it's"
    assert "status = 'active'" in sql  # members: active ones only
