"""The synthetic world and traffic: valid, complete, consistent with the world, deterministic."""

from __future__ import annotations

import itertools
import random
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from aggregators.projection import LifecycleEvent, fold
from ingest.sdk import prepare_event
from ingest.synth import World, usage_events, world_lifecycle_events
from query_api.credentials import hash_secret
from schemas.events import LIFECYCLE_KIND, USAGE_TYPES, EntityKind, Event, EventType, parse_time

CREATED = datetime(2026, 3, 1, tzinfo=UTC)
START = CREATED + timedelta(minutes=1)
END = START + timedelta(hours=2)


@pytest.fixture(scope="module")
def world() -> World:
    return World.generate(seed=7, tenants=3, created_at=CREATED)


@pytest.fixture(scope="module")
def usage(world: World) -> list[dict[str, Any]]:
    return list(usage_events(world, START, END, random.Random(7)))


def test_world_is_deterministic_per_seed() -> None:
    assert World.generate(seed=3, tenants=2) == World.generate(seed=3, tenants=2)
    a, b = World.generate(seed=3, tenants=2), World.generate(seed=4, tenants=2)
    assert {w.id for t in a.tenants for w in t.workspaces}.isdisjoint(
        {w.id for t in b.tenants for w in t.workspaces}
    )


def test_world_has_every_kind_of_entity(world: World) -> None:
    assert len(world.tenants) == 3
    for t in world.tenants:
        assert t.workspaces and t.contracts and t.members and t.virtual_keys and t.workstations
        assert any(k.scope == "workspace" for k in t.api_keys)
        assert t.access_tokens
        ids = {w.id for w in t.workspaces}
        for w in t.workspaces:
            assert w.parent_id is None or w.parent_id in ids
        for c in t.contracts:
            assert all(t.workspace(ws).contract_id == c.id for ws in c.workspace_ids)
    everything = [x for t in world.tenants for x in (*t.agents, *t.datastreams)]
    assert everything
    # trees with subtrees, workstations with and without GPUs, members in every state
    assert any(w.parent_id for t in world.tenants for w in t.workspaces)
    assert {s.gpus > 0 for t in world.tenants for s in t.workstations} == {True, False}
    assert {m.status for t in world.tenants for m in t.members} == {"active", "inactive", "left"}
    assert any(k.scope == "member" for t in world.tenants for k in t.api_keys)


def test_subtree(world: World) -> None:
    t = next(t for t in world.tenants if any(w.parent_id for w in t.workspaces))
    child = next(w for w in t.workspaces if w.parent_id)
    assert {child.id, child.parent_id} <= t.subtree(child.parent_id or "")
    assert child.parent_id not in t.subtree(child.id)


def test_lifecycle_events_are_valid_ordered_and_unique(world: World) -> None:
    events = world_lifecycle_events(world)
    assert events == world_lifecycle_events(world)
    assert len({e["id"] for e in events}) == len(events)
    created: set[str] = set()
    last_time: dict[str, datetime] = {}
    for e in events:
        model = Event.model_validate(e)
        assert model.type in LIFECYCLE_KIND
        assert model.tenant == e["tenant"]
        assert last_time.get(e["tenant"], CREATED - timedelta(1)) < model.time  # strictly increasing
        last_time[e["tenant"]] = model.time
        if model.type is EventType.WORKSPACE_CREATED:
            parent = e["data"].get("parent_id")
            assert parent is None or parent in created  # parents first
            created.add(e["data"]["workspace_id"])
    types = {e["type"] for e in events}
    creations = {t.value for t in LIFECYCLE_KIND if t.value.endswith((".created", ".joined", ".issued"))}
    assert creations <= types
    assert {"workspace.updated", "member.left", "member.deactivated", "virtual_key.revoked"} <= types


def test_lifecycle_folds_into_the_worlds_entities(world: World) -> None:
    t = world.tenants[0]
    by_subject: dict[str, list[LifecycleEvent]] = defaultdict(list)
    for offset, e in enumerate(ev for ev in world_lifecycle_events(world) if ev["tenant"] == t.id):
        kind = LIFECYCLE_KIND[EventType(e["type"])]
        by_subject[f"{kind}|{e['subject']}"].append(
            LifecycleEvent(EventType(e["type"]), parse_time(e["time"]), e["data"], 0, offset)
        )

    def state(kind: EntityKind, entity_id: str) -> Any:
        return fold(t.id, kind, entity_id, by_subject[f"{kind}|{entity_id}"])

    key = t.api_keys[0]
    key_state = state(EntityKind.API_KEY, key.id)
    assert key_state.secret_hash == hash_secret(key.raw) and key_state.status == "active"
    for m in t.members:
        assert state(EntityKind.MEMBER, f"{m.workspace_id}/{m.member_id}").status == m.status
    for vk in t.virtual_keys:
        assert state(EntityKind.VIRTUAL_KEY, vk.id).status == ("revoked" if vk.revoked else "active")
    for w in t.workspaces:
        ws = state(EntityKind.WORKSPACE, w.id)
        assert ws.tier == (w.upgraded_tier or w.tier)
        assert ws.contract_id == (w.contract_id or "")
        assert ws.parent_id == (w.parent_id or "")


def test_usage_covers_every_usage_type(usage: list[dict[str, Any]]) -> None:
    counts = Counter(e["type"] for e in usage)
    assert set(counts) == {t.value for t in USAGE_TYPES}


def test_usage_events_are_valid_and_in_the_window(usage: list[dict[str, Any]]) -> None:
    frequent = {"gateway.request", "ci.step.cpu", "ci.step.memory"}
    # every event of the rarer types, a sample of the frequent ones (they vary only in numbers)
    for i, e in enumerate(usage):
        if e["type"] in frequent and i % 7:
            continue
        prepared = prepare_event(e, e["tenant"], received_at=END)  # not too old, not in future
        assert prepared["subject"] == e["subject"]
        assert e["time"].endswith("Z")
        assert START <= parse_time(e["time"]) < END
    times = [e["time"] for e in usage]
    assert times == sorted(times)  # ISO strings of one format sort like times


def test_usage_ids_unique_and_stable(world: World, usage: list[dict[str, Any]]) -> None:
    assert len({e["id"] for e in usage}) == len(usage)
    again = list(usage_events(world, START, END, random.Random(7)))
    assert again == usage
    other = list(usage_events(world, START, START + timedelta(minutes=20), random.Random(8)))
    assert other and {e["id"] for e in other}.isdisjoint(e["id"] for e in usage)


def test_usage_refers_to_the_world(world: World, usage: list[dict[str, Any]]) -> None:
    for e in usage:
        t = world.tenant(e["tenant"])
        d = e["data"]
        if "workspace_id" in d:
            assert d["workspace_id"] in {w.id for w in t.workspaces}
        if e["type"].startswith("ci.step."):
            assert t.workspace(d["workspace_id"]).contract_id == d["contract_id"]
        if e["type"].startswith("workstation."):
            assert d["workstation_id"] in {s.id for s in t.workstations}
        if e["type"] == "workstation.gpu":
            assert next(s for s in t.workstations if s.id == d["workstation_id"]).gpus > 0
        if e["type"] == "gateway.request":
            assert d["virtual_key_id"] in {vk.id for vk in t.virtual_keys if not vk.revoked}
        if e["type"] == "datastream.rows" and d["datastream_id"] is not None:
            ds = next(x for x in t.datastreams if x.id == d["datastream_id"])
            assert ds.workspace_id == d["workspace_id"]


def test_ci_steps_report_cpu_and_memory_every_10_seconds(usage: list[dict[str, Any]]) -> None:
    samples: dict[tuple[str, str], list[datetime]] = defaultdict(list)
    for e in usage:
        if e["type"].startswith("ci.step."):
            samples[(e["type"], e["subject"])].append(parse_time(e["time"]))
    long_steps = [times for times in samples.values() if len(times) >= 3]
    assert long_steps
    for times in long_steps:
        assert {b - a for a, b in itertools.pairwise(times)} == {timedelta(seconds=10)}
    cpu_steps = {s for (t, s) in samples if t == "ci.step.cpu"}
    assert cpu_steps == {s for (t, s) in samples if t == "ci.step.memory"}


def test_datastream_rows_repeat_across_runs(world: World) -> None:
    # a day: many hourly runs per datastream, drawing from the same pool of rows
    tenant = max(world.tenants, key=lambda t: len(t.datastreams))
    assert tenant.datastreams
    one = World(seed=world.seed, created_at=world.created_at, tenants=(tenant,))
    rows = [
        e
        for e in usage_events(one, START, START + timedelta(hours=26), random.Random(1))
        if e["type"] == "datastream.rows"
    ]
    keys_by_event: dict[str, list[set[str]]] = defaultdict(list)
    for e in rows:
        assert e["data"]["total_rows"] >= len(set(e["data"]["row_keys"]))
        keys_by_event[str(e["data"]["datastream_id"])].append(set(e["data"]["row_keys"]))
    repeated = [
        ds
        for ds, runs in keys_by_event.items()
        if any(a & b for i, a in enumerate(runs) for b in runs[i + 1 :])
    ]
    assert repeated
    days = {e["time"][:10] for e in rows}
    assert len(days) == 2
