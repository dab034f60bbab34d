"""Issue 7, finding 1: a usage key reports only for resources inside its own scope.

Through the public HTTP interface (``POST /api/v1/events``) with the real producer, broker and
ClickHouse engine; entities are created by applying lifecycle events (the control lane).

The tenant ``acme``::

    root ── child ── grandchild          contract c-child: child
        └── side                         datastreams: ds-child (child), ds-side (side)
    workstations: ws-child (child), ws-root (no workspace: the tenant's root)
    members of child: alice (active), bob (deactivated)

and ``globex``, which has a workspace, a workstation, a contract and a datastream of its own.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
import typer
from fastapi import FastAPI
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from aggregators.direct import apply_events
from deploy.settings import IngestSettings
from ingest.cli import admin_app
from ingest.http import EVENTS_PATH, build_ingest_router
from ingest.scope import ScopeStore
from ingest.sdk import UsageProducer, format_time, new_event
from query_api.credentials import CredentialStore, display_prefix, hash_secret, new_api_key
from tests.integration.test_http_ingest import consume_ids
from tests.integration.test_sdk_kafka import consume

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

ACME, GLOBEX = "acme", "globex"
RATES = {"usd_per_cpu_hour": 0.1, "usd_per_gpu_hour": 2.0, "usd_per_gb_hour": 0.01}


def lifecycle(tenant: str, type_: str, **data: Any) -> dict[str, Any]:
    return new_event(type_, data, tenant=tenant, source="admin")


def in_order(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events with times 1 ms apart, in list order: a fold orders an entity's events by time
    (then offset, the same for events of one message), so member.deactivated must come later."""
    start = datetime.now(UTC) - timedelta(minutes=1)
    return [e | {"time": format_time(start + timedelta(milliseconds=i))} for i, e in enumerate(events)]


def world_events() -> list[dict[str, Any]]:
    a, g = ACME, GLOBEX
    return [
        lifecycle(a, "workspace.created", workspace_id="root", name="Root"),
        lifecycle(a, "workspace.created", workspace_id="child", name="Child", parent_id="root"),
        lifecycle(a, "workspace.created", workspace_id="grandchild", name="Grandchild", parent_id="child"),
        lifecycle(a, "workspace.created", workspace_id="side", name="Side", parent_id="root"),
        lifecycle(a, "contract.created", contract_id="c-child", name="Child's"),
        lifecycle(a, "contract.workspace_added", contract_id="c-child", workspace_id="child"),
        lifecycle(a, "datastream.created", datastream_id="ds-child", workspace_id="child", name="d"),
        lifecycle(a, "datastream.created", datastream_id="ds-side", workspace_id="side", name="d"),
        lifecycle(a, "member.joined", workspace_id="child", member_id="alice", email="alice@acme.io"),
        lifecycle(a, "member.joined", workspace_id="child", member_id="bob", email="bob@acme.io"),
        lifecycle(a, "member.deactivated", workspace_id="child", member_id="bob"),
        *(
            lifecycle(a, "workstation.created", workstation_id=ws, name=ws, **RATES, **home)
            for ws, home in (("ws-child", {"workspace_id": "child"}), ("ws-root", {}))
        ),
        # globex: ids acme does not have (and one it does: "root")
        lifecycle(g, "workspace.created", workspace_id="root", name="Globex root"),
        lifecycle(g, "workspace.created", workspace_id="g-ws", name="Globex", parent_id="root"),
        lifecycle(g, "contract.created", contract_id="g-contract", name="Globex's"),
        lifecycle(g, "contract.workspace_added", contract_id="g-contract", workspace_id="g-ws"),
        lifecycle(g, "datastream.created", datastream_id="g-ds", workspace_id="g-ws", name="d"),
        lifecycle(g, "workstation.created", workstation_id="g-station", name="g", **RATES),
        lifecycle(g, "member.joined", workspace_id="g-ws", member_id="alice", email="alice@globex.io"),
    ]


def key_event(tenant: str, raw: str, **data: Any) -> dict[str, Any]:
    fields = {
        "key_id": f"key-{uuid.uuid4().hex[:8]}",
        "key_hash": hash_secret(raw),
        "prefix": display_prefix(raw),
    }
    return lifecycle(tenant, "api_key.created", **fields, **data)


KEYS: dict[str, tuple[str, dict[str, Any]]] = {
    "root": (ACME, {"scope": "workspace", "workspace_id": "root"}),
    "child": (ACME, {"scope": "workspace", "workspace_id": "child"}),
    "side": (ACME, {"scope": "workspace", "workspace_id": "side"}),
    "alice": (ACME, {"scope": "member", "member_id": "alice", "email": "alice@acme.io"}),
    "bob": (ACME, {"scope": "member", "member_id": "bob", "email": "bob@acme.io"}),
    "globex": (GLOBEX, {"scope": "workspace", "workspace_id": "root"}),
}


@dataclass
class World:
    http: TestClient
    keys: dict[str, str]
    bootstrap: str
    topic: str
    clickhouse: tuple[Any, str]

    def post(self, key: str, *events: dict[str, Any]) -> list[dict[str, Any]]:
        r = self.http.post(
            EVENTS_PATH,
            content=orjson.dumps(list(events)),
            headers={"Authorization": f"Bearer {self.keys[key]}", "Content-Type": "application/json"},
        )
        assert r.status_code == 202, r.text
        results: list[dict[str, Any]] = r.json()["results"]
        return results

    def verdict(self, key: str, event: dict[str, Any]) -> tuple[str, str | None, str | None]:
        (result,) = self.post(key, event)
        return result["status"], result.get("code"), result.get("message")

    def received(self, expected: int) -> list[str]:
        return sorted(i for _, i in consume_ids(self.bootstrap, self.topic, expected))


@pytest.fixture
def world(kafka_bootstrap: str, topic: str, clickhouse: tuple[Any, str]) -> Iterator[World]:
    client, db = clickhouse
    raw_keys = {name: new_api_key(live=False) for name in KEYS}
    keys = [key_event(tenant, raw_keys[name], **data) for name, (tenant, data) in KEYS.items()]
    apply_events(client, db, in_order([*world_events(), *keys]))
    settings = IngestSettings(ingest_rate_limit_per_minute=10_000, ingest_delivery_timeout_s=20.0)
    credentials = CredentialStore(client, db, ttl_s=0)
    scopes = ScopeStore(client, db, ttl_s=0)  # no cache: each test's changes count at once
    producer = UsageProducer(kafka_bootstrap, topic=topic, delivery_timeout_s=20.0)
    app = FastAPI()
    app.include_router(
        build_ingest_router(lambda: producer, lambda: credentials, settings, get_scopes=lambda: scopes)
    )
    try:
        yield World(TestClient(app), raw_keys, kafka_bootstrap, topic, clickhouse)
    finally:
        with contextlib.suppress(Exception):
            producer.close(timeout=5)


def usage(type_: str, id_: str | None = None, **data: Any) -> dict[str, Any]:
    event = new_event(type_, data, tenant=ACME, source="test", id=id_ or str(uuid.uuid4()))
    del event["tenant"]  # over HTTP the tenant is the key's
    return event


def render(workspace: str, id_: str | None = None) -> dict[str, Any]:
    return usage(
        "render.completed", id_, workspace_id=workspace, render_id="r-1", output_duration_seconds=60.0
    )


def ci_cpu(workspace: str, contract: str, id_: str | None = None) -> dict[str, Any]:
    return usage(
        "ci.step.cpu", id_, workspace_id=workspace, contract_id=contract, step_id="s", cpu_seconds=1.0
    )


def rows(workspace: str, datastream: str | None, id_: str | None = None) -> dict[str, Any]:
    extra = {} if datastream is None else {"datastream_id": datastream}
    return usage("datastream.rows", id_, workspace_id=workspace, total_rows=2, row_keys=["a", "b"], **extra)


def gpu(workstation: str, id_: str | None = None) -> dict[str, Any]:
    return usage("workstation.gpu", id_, workstation_id=workstation, gpu_seconds=3.0)


def out_of_scope(field: str, value: str, kind: str) -> tuple[str, str, str]:
    return "rejected", "out_of_scope", f'data.{field} "{value}" is not a {kind} this key may report for'


ACCEPTED = ("accepted", None, None)


# ---- workspace keys: their workspace and its subtree --------------------------------------------


def test_a_child_workspace_key_may_report_for_its_subtree_not_its_parent(world: World) -> None:
    assert world.verdict("child", render("root")) == out_of_scope("workspace_id", "root", "workspace")
    assert world.verdict("child", render("side")) == out_of_scope("workspace_id", "side", "workspace")
    assert world.verdict("child", render("child")) == ACCEPTED
    assert world.verdict("child", render("grandchild")) == ACCEPTED
    # the root's key opens the whole tree
    for workspace in ("root", "child", "grandchild", "side"):
        assert world.verdict("root", render(workspace)) == ACCEPTED


def test_contracts_datastreams_and_workstations_must_be_of_the_scope(world: World) -> None:
    assert world.verdict("child", ci_cpu("child", "c-child")) == ACCEPTED
    # the contract of the parent's child, reported for a workspace it does not cover
    assert world.verdict("root", ci_cpu("grandchild", "c-child")) == (
        "rejected",
        "out_of_scope",
        'data.contract_id "c-child" is not a contract of workspace "grandchild"',
    )
    assert world.verdict("child", rows("child", "ds-child")) == ACCEPTED
    assert world.verdict("child", rows("child", None)) == ACCEPTED
    assert world.verdict("root", rows("child", "ds-side")) == (
        "rejected",
        "out_of_scope",
        'data.datastream_id "ds-side" is not a datastream of workspace "child"',
    )
    assert world.verdict("child", gpu("ws-child")) == ACCEPTED
    assert world.verdict("side", gpu("ws-child")) == out_of_scope("workstation_id", "ws-child", "workstation")


def test_a_workstation_without_a_workspace_belongs_to_the_root(world: World) -> None:
    assert world.verdict("root", gpu("ws-root")) == ACCEPTED
    for key in ("child", "alice"):
        assert world.verdict(key, gpu("ws-root")) == out_of_scope("workstation_id", "ws-root", "workstation")


# ---- member keys: the workspaces where the member is active ------------------------------------


def test_a_member_key_reports_only_where_the_member_is_active(world: World) -> None:
    assert world.verdict("alice", render("child")) == ACCEPTED
    assert world.verdict("alice", gpu("ws-child")) == ACCEPTED
    # not the subtree of a workspace they belong to, nor any other workspace
    assert world.verdict("alice", render("grandchild")) == out_of_scope(
        "workspace_id", "grandchild", "workspace"
    )
    assert world.verdict("alice", render("root")) == out_of_scope("workspace_id", "root", "workspace")
    # bob was deactivated in child
    assert world.verdict("bob", render("child")) == out_of_scope("workspace_id", "child", "workspace")
    # alice is also an active member of globex's g-ws: another tenant's membership opens nothing
    assert world.verdict("alice", render("g-ws")) == out_of_scope("workspace_id", "g-ws", "workspace")


def test_a_member_key_stops_at_once_when_the_member_leaves(world: World) -> None:
    client, db = world.clickhouse
    assert world.verdict("alice", render("child")) == ACCEPTED
    apply_events(client, db, [lifecycle(ACME, "member.left", workspace_id="child", member_id="alice")])
    assert world.verdict("alice", render("child")) == out_of_scope("workspace_id", "child", "workspace")


# ---- another tenant's ids answer exactly like unknown ones -------------------------------------


@pytest.mark.parametrize(
    ("make", "foreign"),
    [
        (lambda v: render(v), "g-ws"),
        (lambda v: gpu(v), "g-station"),
        (lambda v: ci_cpu("child", v), "g-contract"),
        (lambda v: rows("child", v), "g-ds"),
    ],
    ids=["workspace", "workstation", "contract", "datastream"],
)
def test_another_tenants_id_answers_like_an_unknown_id(world: World, make: Any, foreign: str) -> None:
    seen = world.verdict("root", make(foreign))
    unknown = world.verdict("root", make("never-created"))
    assert seen[:2] == unknown[:2] == ("rejected", "out_of_scope")
    assert seen[2] is not None and unknown[2] is not None
    assert seen[2].replace(f'"{foreign}"', '"X"') == unknown[2].replace('"never-created"', '"X"')


def test_the_same_id_in_two_tenants_is_two_workspaces(world: World) -> None:
    # globex's key of *its* "root" opens globex's tree, never acme's workspaces
    assert world.verdict("globex", render("root")) == ACCEPTED
    assert world.verdict("globex", render("g-ws")) == ACCEPTED
    assert world.verdict("globex", render("child")) == out_of_scope("workspace_id", "child", "workspace")
    assert world.verdict("globex", gpu("g-station")) == ACCEPTED  # its root's unassigned workstation
    assert world.verdict("globex", gpu("ws-root")) == out_of_scope("workstation_id", "ws-root", "workstation")


# ---- one request, mixed -----------------------------------------------------------------------


def test_a_request_mixing_in_and_out_of_scope_events_gets_per_event_verdicts(world: World) -> None:
    events = [
        render("child", "in-1"),
        render("root", "out-parent"),
        ci_cpu("grandchild", "c-child", "out-contract"),
        ci_cpu("child", "c-child", "in-2"),
        rows("child", "ds-side", "out-datastream"),
        gpu("ws-child", "in-3"),
        gpu("ws-root", "out-workstation"),
        render("g-ws", "out-foreign"),
        usage("render.completed", "invalid", workspace_id="child", render_id="r"),  # no duration
        render("child", "in-1"),  # a duplicate of the first
        render("grandchild", "in-4"),
    ]
    results = world.post("child", *events)
    assert [(r["index"], r["id"], r["status"], r.get("code")) for r in results] == [
        (0, "in-1", "accepted", None),
        (1, "out-parent", "rejected", "out_of_scope"),
        (2, "out-contract", "rejected", "out_of_scope"),
        (3, "in-2", "accepted", None),
        (4, "out-datastream", "rejected", "out_of_scope"),
        (5, "in-3", "accepted", None),
        (6, "out-workstation", "rejected", "out_of_scope"),
        (7, "out-foreign", "rejected", "out_of_scope"),
        (8, "invalid", "rejected", "invalid_event"),
        (9, "in-1", "duplicate", None),
        (10, "in-4", "accepted", None),
    ]
    messages = {r["id"]: r.get("message") for r in results}
    assert messages["out-parent"] == 'data.workspace_id "root" is not a workspace this key may report for'
    assert messages["out-foreign"] == 'data.workspace_id "g-ws" is not a workspace this key may report for'
    # only the accepted events reached Kafka
    assert world.received(4) == ["in-1", "in-2", "in-3", "in-4"]


# ---- the administrator's tool: a workstation in a workspace -------------------------------------


def test_admin_workstation_create_with_a_workspace(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", world.bootstrap)
    monkeypatch.setenv("METERING_TOPIC_EVENTS", world.topic)
    cli = typer.Typer()
    cli.add_typer(admin_app, name="admin")
    args = ["admin", "workstation", "create", "--tenant", ACME, "--name", "new", "--id", "ws-new"]
    rates_args = ["--usd-per-cpu-hour", "1", "--usd-per-gpu-hour", "1", "--usd-per-gb-hour", "1"]
    # --force: no admin API runs here to check that workspace "side" exists (test_admin_cli.py does)
    result = CliRunner().invoke(cli, [*args, *rates_args, "--workspace-id", "side", "--json", "--force"])
    assert result.exit_code == 0, result.output
    control = f"{world.topic}.control"
    (event,) = [e for m in consume(world.bootstrap, control, 1) for e in m.events]
    assert event["type"] == "workstation.created" and event["data"]["workspace_id"] == "side"
    client, db = world.clickhouse
    apply_events(client, db, [event])  # what the aggregator does with the control topic
    assert world.verdict("side", gpu("ws-new")) == ACCEPTED
    assert world.verdict("child", gpu("ws-new")) == out_of_scope("workstation_id", "ws-new", "workstation")
