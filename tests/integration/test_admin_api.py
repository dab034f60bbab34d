"""The admin API (``/admin/v1``) over the real ClickHouse engine: its credential and nobody
else's, what it shows of keys and tokens (never a secret, never a hash), tenant isolation of the
listings, filters, pages and 404s.

Two tenants are built from lifecycle events applied through the real processing path
(``aggregators.direct.apply_events``); tenant B reuses some of tenant A's ids, with other values.
"""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from aggregators.direct import apply_events
from deploy.settings import QuerySettings
from query_api.admin_token import (
    ADMIN_TOKEN_PREFIX,
    AdminTokenMissing,
    ensure_admin_token,
    load_admin_token,
    same_token,
)
from query_api.app import create_app
from query_api.credentials import display_prefix, hash_secret, new_access_token, new_api_key

ADMIN = "mt_admin_" + "t" * 40
BASE = "/admin/v1/tenants"


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Tenant:
    id: str
    now: datetime
    events: list[dict[str, Any]] = field(default_factory=list)
    secrets: dict[str, str] = field(default_factory=dict)
    step: int = 0

    def emit(self, type_: str, **data: Any) -> None:
        self.step += 1
        self.events.append(
            {
                "specversion": "1.0",
                "id": str(uuid.uuid4()),
                "source": "test",
                "type": type_,
                "time": iso(self.now - timedelta(hours=1) + timedelta(seconds=self.step)),
                "tenant": self.id,
                "data": data,
            }
        )

    def key(self, name: str, key_id: str, **data: Any) -> None:
        raw = new_api_key()
        self.secrets[name] = raw
        self.emit(
            "api_key.created", key_id=key_id, key_hash=hash_secret(raw), prefix=display_prefix(raw), **data
        )

    def token(self, name: str, token_id: str, member_id: str, email: str, ttl: timedelta) -> None:
        raw = new_access_token()
        self.secrets[name] = raw
        self.emit(
            "access_token.issued",
            token_id=token_id,
            token_hash=hash_secret(raw),
            member_id=member_id,
            email=email,
            expires_at=iso(self.now + ttl),
        )


def build(tenant: str, now: datetime, label: str) -> Tenant:
    t = Tenant(tenant, now)
    t.emit(
        "workspace.created", workspace_id="ws-root", name=f"{label} root", tier="pro", billing_anchor_day=15
    )
    t.emit("workspace.created", workspace_id="ws-child", name=f"{label} child", parent_id="ws-root")
    t.emit("contract.created", contract_id="c-1", name=f"{label} contract")
    t.emit("contract.workspace_added", contract_id="c-1", workspace_id="ws-child")
    t.emit("member.joined", workspace_id="ws-root", member_id="m-alice", email=f"alice@{label}.io")
    t.emit("member.joined", workspace_id="ws-child", member_id="m-bob", email=f"bob@{label}.io")
    t.emit("member.left", workspace_id="ws-child", member_id="m-bob")
    t.emit("virtual_key.created", workspace_id="ws-root", virtual_key_id="vk-1")
    t.emit("agent.created", workspace_id="ws-root", agent_id="ag-1")
    t.emit("workstation.created", workstation_id="st-1", name=f"{label} station", usd_per_cpu_hour=0.5,
           usd_per_gpu_hour=2.0, usd_per_gb_hour=0.01)  # fmt: skip
    t.emit("datastream.created", datastream_id="ds-1", workspace_id="ws-root", name=f"{label} stream")
    t.key("key_root", "key-root", scope="workspace", workspace_id="ws-root")
    t.key("key_member", "key-member", scope="member", workspace_id="ws-root", member_id="m-alice",
          email=f"alice@{label}.io")  # fmt: skip
    t.key("key_revoked", "key-revoked", scope="workspace", workspace_id="ws-child")
    t.emit("api_key.revoked", key_id="key-revoked")
    t.token("token_alice", "tok-alice", "m-alice", f"alice@{label}.io", timedelta(days=30))
    t.token("token_expired", "tok-expired", "m-alice", f"alice@{label}.io", timedelta(minutes=-1))
    if label == "b":
        t.emit("workspace.created", workspace_id="ws-only-b", name="only b")
    return t


@dataclass
class Env:
    api: TestClient
    a: Tenant
    b: Tenant


def make_settings(database: str, **overrides: Any) -> QuerySettings:
    values: dict[str, Any] = {
        "clickhouse_database": database,
        "query_cache_ttl_s": 0.0,
        "query_rate_limit_per_minute": 1_000_000,
        "admin_token": ADMIN,
        **overrides,
    }
    return QuerySettings(**values)


@pytest.fixture
def env(clickhouse: tuple[Any, str]) -> Iterator[Env]:
    client, database = clickhouse
    now = datetime.now(UTC)
    a, b = build("tenant-a", now, "a"), build("tenant-b", now, "b")
    stats = apply_events(client, database, [*a.events, *b.events])
    assert stats.rejected == 0, stats
    with TestClient(create_app(make_settings(database), client)) as api:
        yield Env(api, a, b)


def admin(token: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def error_code(r: Any) -> str:
    return str(r.json()["error"]["code"])


# ---- the credential -------------------------------------------------------------------------------


@pytest.mark.clickhouse
def test_only_the_admin_token_opens_the_admin_api(env: Env) -> None:
    a = env.a
    urls = [f"{BASE}/{a.id}/api-keys", f"{BASE}/{a.id}/workspaces/ws-root"]
    refused = [
        {},
        admin("mt_admin_" + "x" * 40),  # wrong token
        admin(ADMIN + "x"),  # longer
        admin(ADMIN[:-1]),  # a prefix of it
        {"Authorization": f"Token {ADMIN}"},  # another scheme
        {"Authorization": ADMIN},  # no scheme
        admin(a.secrets["key_root"]),  # an API key
        admin(a.secrets["key_member"]),
        admin(a.secrets["token_alice"]),  # an access token
    ]
    for url in urls:
        for headers in refused:
            r = env.api.get(url, headers=headers)
            assert r.status_code == 401, (url, headers, r.text)
            assert error_code(r) == "unauthorized"
            assert r.headers["WWW-Authenticate"] == "Bearer"
        r = env.api.get(url, headers=admin())
        assert r.status_code == 200, r.text


@pytest.mark.clickhouse
def test_the_admin_token_opens_no_usage_endpoint(env: Env) -> None:
    import base64

    basic = "Basic " + base64.b64encode(f"alice@a.io:{ADMIN}".encode()).decode()
    calls = [
        ("/api/v1/workspaces/00000000-0000-0000-0000-000000000000/stats", f"Bearer {ADMIN}"),
        ("/v2/quota-usages/contracts/c-1?period=week", basic),
        ("/v1/workstations/st-1/usage", f"Bearer {ADMIN}"),
        ("/v1/workspace/usage", f"Bearer {ADMIN}"),
        ("/api/v1/usage/", f"Token {ADMIN}"),
        ("/api/v1/usage/", f"Bearer {ADMIN}"),
        ("/api/v1/meters/ai_tasks/query", f"Bearer {ADMIN}"),
    ]
    for url, header in calls:
        r = env.api.get(url, headers={"Authorization": header})
        assert r.status_code == 401, (url, r.text)
    # ... while the same endpoint answers its own credential
    r = env.api.get("/v1/workspace/usage", headers=admin(env.a.secrets["key_root"]))
    assert r.status_code == 200, r.text


@pytest.mark.clickhouse
def test_without_a_configured_token_everything_is_401(clickhouse: tuple[Any, str]) -> None:
    client, database = clickhouse
    with TestClient(create_app(make_settings(database, admin_token=None), client)) as api:
        for headers in ({}, admin(), admin("")):
            r = api.get(f"{BASE}/tenant-a/workspaces", headers=headers)
            assert r.status_code == 401
            assert "No admin token is configured" in r.json()["error"]["message"]


@pytest.mark.clickhouse
def test_failed_attempts_are_rate_limited(clickhouse: tuple[Any, str]) -> None:
    client, database = clickhouse
    settings = make_settings(database, query_rate_limit_per_minute=3)
    with TestClient(create_app(settings, client)) as api:
        statuses = [api.get(f"{BASE}/t/workspaces", headers=admin("wrong")).status_code for _ in range(5)]
        assert statuses[:3] == [401, 401, 401] and statuses[3:] == [429, 429]
        assert api.get(f"{BASE}/t/workspaces", headers=admin("wrong")).headers["Retry-After"]


# ---- what it shows -----------------------------------------------------------------------------


def all_bodies(env: Env, tenant: Tenant) -> list[str]:
    kinds = [
        "workspaces", "contracts", "members", "virtual-keys", "agents", "workstations", "datastreams",
        "api-keys", "access-tokens",
    ]  # fmt: skip
    bodies: list[str] = []
    for kind in kinds:
        r = env.api.get(f"{BASE}/{tenant.id}/{kind}", headers=admin())
        assert r.status_code == 200, (kind, r.text)
        bodies.append(r.text)
        for item in r.json()["items"]:
            one = env.api.get(f"{BASE}/{tenant.id}/{kind}/{item['id']}", headers=admin())
            assert one.status_code == 200, (kind, item, one.text)
            assert one.json() == item
            bodies.append(one.text)
    return bodies


@pytest.mark.clickhouse
def test_listings_never_show_a_secret_or_its_hash(env: Env) -> None:
    for tenant in (env.a, env.b):
        bodies = all_bodies(env, tenant)
        assert len(bodies) > 9
        for body in bodies:
            for raw in tenant.secrets.values():
                assert raw not in body
                assert hash_secret(raw) not in body
                assert raw[len(display_prefix(raw)) :] not in body  # nor the secret part alone
            assert "hash" not in body and "secret" not in body


@pytest.mark.clickhouse
def test_keys_and_tokens_by_id_prefix_scope_and_state(env: Env) -> None:
    a = env.a
    r = env.api.get(f"{BASE}/{a.id}/api-keys", headers=admin())
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["tenant"], body["kind"], body["total"], body["next_after"]) == (a.id, "api-keys", 3, None)
    items = {i["id"]: i for i in body["items"]}
    assert list(items) == ["key-member", "key-revoked", "key-root"]  # in id order
    root = items["key-root"]
    assert root == {
        "id": "key-root",
        "kind": "api-keys",
        "status": "active",
        "created_at": root["created_at"],
        "updated_at": root["updated_at"],
        "prefix": display_prefix(a.secrets["key_root"]),
        "scope": "workspace",
        "workspace_id": "ws-root",
        "member_id": None,
        "email": None,
    }
    assert root["created_at"].endswith("Z") and root["created_at"] == root["updated_at"]
    member = items["key-member"]
    assert (member["scope"], member["member_id"], member["email"]) == ("member", "m-alice", "alice@a.io")
    revoked = items["key-revoked"]
    assert revoked["status"] == "revoked" and revoked["updated_at"] > revoked["created_at"]

    tokens = env.api.get(f"{BASE}/{a.id}/access-tokens", headers=admin()).json()["items"]
    by_id = {t["id"]: t for t in tokens}
    alice = by_id["tok-alice"]
    assert (alice["status"], alice["expired"], alice["scope"]) == ("active", False, "member")
    assert (alice["member_id"], alice["email"]) == ("m-alice", "alice@a.io")
    assert alice["expires_at"] > alice["created_at"]
    assert (by_id["tok-expired"]["status"], by_id["tok-expired"]["expired"]) == ("active", True)


@pytest.mark.clickhouse
def test_every_kind_shows_its_own_fields(env: Env) -> None:
    a = env.a

    def one(kind: str, entity_id: str) -> dict[str, Any]:
        r = env.api.get(f"{BASE}/{a.id}/{kind}/{entity_id}", headers=admin())
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        for key in ("kind", "status", "created_at", "updated_at"):
            body.pop(key)
        return body

    assert one("workspaces", "ws-child") == {
        "id": "ws-child",
        "name": "a child",
        "tier": "free",
        "parent_id": "ws-root",
        "contract_id": "c-1",
        "billing_anchor_day": 1,
        "extra_vks": 0,
    }
    assert one("workspaces", "ws-root")["parent_id"] is None
    assert one("contracts", "c-1") == {"id": "c-1", "name": "a contract"}
    # a membership's id has a slash: the path takes it as it is, or percent-encoded
    bob = {"id": "ws-child/m-bob", "workspace_id": "ws-child", "member_id": "m-bob", "email": "bob@a.io"}
    assert one("members", "ws-child/m-bob") == bob
    assert one("members", "ws-child%2Fm-bob") == bob
    assert one("virtual-keys", "vk-1") == {"id": "vk-1", "workspace_id": "ws-root"}
    assert one("agents", "ag-1") == {"id": "ag-1", "workspace_id": "ws-root"}
    assert one("workstations", "st-1") == {
        "id": "st-1",
        "name": "a station",
        "workspace_id": None,
        "usd_per_cpu_hour": 0.5,
        "usd_per_gpu_hour": 2.0,
        "usd_per_gb_hour": 0.01,
    }
    assert one("datastreams", "ds-1") == {"id": "ds-1", "name": "a stream", "workspace_id": "ws-root"}


# ---- isolation, filters, pages, errors ----------------------------------------------------------


@pytest.mark.clickhouse
def test_a_listing_is_its_tenants_only(env: Env) -> None:
    a, b = env.a, env.b
    for tenant, other in ((a, b), (b, a)):
        body = env.api.get(f"{BASE}/{tenant.id}/workspaces", headers=admin()).json()
        names = {i["id"]: i["name"] for i in body["items"]}
        label = tenant.id[-1]
        expected = {"ws-child": f"{label} child", "ws-root": f"{label} root"}
        assert names == expected | ({"ws-only-b": "only b"} if tenant is b else {})
        keys = env.api.get(f"{BASE}/{tenant.id}/api-keys", headers=admin()).text
        assert display_prefix(other.secrets["key_root"]) not in keys
    # the same id in the other tenant shows that tenant's entity
    r = env.api.get(f"{BASE}/{b.id}/members/ws-root/m-alice", headers=admin())
    assert r.json()["email"] == "alice@b.io"


@pytest.mark.clickhouse
def test_filters_and_pages(env: Env) -> None:
    a = env.a

    def ids(kind: str, **params: Any) -> list[str]:
        r = env.api.get(f"{BASE}/{a.id}/{kind}", params=params, headers=admin())
        assert r.status_code == 200, r.text
        return [i["id"] for i in r.json()["items"]]

    assert ids("api-keys", status="revoked") == ["key-revoked"]
    assert ids("api-keys", status="active", workspace_id="ws-root") == ["key-member", "key-root"]
    assert ids("api-keys", member_id="m-alice") == ["key-member"]
    assert ids("api-keys", email="ALICE@a.io") == ["key-member"]  # emails case-insensitively
    assert ids("members", workspace_id="ws-child") == ["ws-child/m-bob"]
    assert ids("members", status="left") == ["ws-child/m-bob"]
    assert ids("members", member_id="m-alice", email="alice@a.io") == ["ws-root/m-alice"]
    assert ids("workspaces", parent_id="ws-root") == ["ws-child"]
    assert ids("workspaces", contract_id="c-1") == ["ws-child"]
    assert ids("access-tokens", member_id="m-alice") == ["tok-alice", "tok-expired"]
    assert ids("api-keys", workspace_id="nope") == []  # a known tenant: an empty list, not a 404

    first = env.api.get(f"{BASE}/{a.id}/api-keys", params={"limit": 2}, headers=admin()).json()
    assert [i["id"] for i in first["items"]] == ["key-member", "key-revoked"]
    assert (first["total"], first["next_after"]) == (3, "key-revoked")
    rest = env.api.get(
        f"{BASE}/{a.id}/api-keys", params={"limit": 2, "after": first["next_after"]}, headers=admin()
    ).json()
    assert ([i["id"] for i in rest["items"]], rest["total"], rest["next_after"]) == (["key-root"], 3, None)


@pytest.mark.clickhouse
def test_errors(env: Env) -> None:
    a, b = env.a, env.b
    api = env.api

    def err(url: str, status: int, code: str, params: dict[str, Any] | None = None) -> str:
        r = api.get(url, params=params, headers=admin())
        assert r.status_code == status, (url, r.text)
        assert error_code(r) == code, r.text
        return str(r.json()["error"]["message"])

    assert "No tenant 'nobody'" in err(f"{BASE}/nobody/api-keys", 404, "not_found")
    assert "No tenant 'nobody'" in err(f"{BASE}/nobody/api-keys/key-root", 404, "not_found")
    assert "No API key 'key-nope'" in err(f"{BASE}/{a.id}/api-keys/key-nope", 404, "not_found")
    assert b.id != a.id
    err(f"{BASE}/{a.id}/workspaces/ws-only-b", 404, "not_found")  # tenant b's
    # a key id in the wrong kind is not found either
    err(f"{BASE}/{a.id}/access-tokens/key-root", 404, "not_found")
    err(f"{BASE}/{a.id}/keys", 400, "bad_request")  # unknown kind
    message = err(f"{BASE}/{a.id}/workspaces", 400, "bad_request", {"email": "x@y.z"})
    assert "workspaces have no email filter" in message
    for params in ({"status": "expired"}, {"limit": 0}, {"limit": 1001}, {"workspace_id": "x" * 129}):
        err(f"{BASE}/{a.id}/api-keys", 400, "bad_request", params)


def test_storage_failure_is_503() -> None:
    class BrokenClient:
        def query(self, *_a: Any, **_k: Any) -> Any:
            raise ConnectionError("clickhouse down")

    with TestClient(create_app(make_settings("db"), BrokenClient())) as api:  # type: ignore[arg-type]
        for url in (f"{BASE}/tenant-a/api-keys", f"{BASE}/tenant-a/api-keys/key-root"):
            r = api.get(url, headers=admin())
            assert (r.status_code, error_code(r), r.headers["Retry-After"]) == (
                503,
                "service_unavailable",
                "1",
            )


def test_openapi_documents_the_admin_api() -> None:
    class NoClient:
        def query(self, *_a: Any, **_k: Any) -> Any:
            raise AssertionError("the OpenAPI document must not need storage")

    with TestClient(create_app(QuerySettings(), NoClient())) as api:  # type: ignore[arg-type]
        spec = api.get("/openapi.json").json()
    for path in ("/admin/v1/tenants/{tenant}/{kind}", "/admin/v1/tenants/{tenant}/{kind}/{entity_id}"):
        op = spec["paths"][path]["get"]
        assert op["security"] == [{"AdminToken": []}]
        assert {"200", "400", "401", "404"} <= set(op["responses"]) and "422" not in op["responses"]
    assert spec["components"]["securitySchemes"]["AdminToken"]["scheme"] == "bearer"


# ---- the token itself ----------------------------------------------------------------------------


def test_a_generated_token_is_written_for_this_user_only(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "admin-token"
    settings = QuerySettings(admin_token=None, admin_token_file=path)
    with_token, line = ensure_admin_token(settings)
    assert with_token.admin_token is not None
    token = with_token.admin_token.get_secret_value()
    assert token.startswith(ADMIN_TOKEN_PREFIX) and len(token) > 40
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_text() == token + "\n"
    assert str(path) in line and "0600" in line
    assert load_admin_token(settings) == token  # what the CLI reads
    # each start makes a new one, replacing the file (and its mode, whatever it was)
    path.chmod(0o644)
    again, _ = ensure_admin_token(settings)
    assert again.admin_token is not None and again.admin_token.get_secret_value() != token
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["admin-token"]  # no temporary file left


def test_a_configured_token_is_used_and_no_file_written(tmp_path: Path) -> None:
    path = tmp_path / "admin-token"
    settings = QuerySettings(admin_token="c" * 30, admin_token_file=path)
    same, line = ensure_admin_token(settings)
    assert same is settings and "METERING_ADMIN_TOKEN" in line
    assert not path.exists()
    assert load_admin_token(settings) == "c" * 30
    with pytest.raises(AdminTokenMissing, match="METERING_ADMIN_TOKEN"):
        load_admin_token(QuerySettings(admin_token=None, admin_token_file=path))
    with pytest.raises(ValueError, match="at least 24"):
        QuerySettings(admin_token="short")


def test_same_token() -> None:
    assert same_token(ADMIN, ADMIN)
    assert not same_token(ADMIN, ADMIN + "x") and not same_token("", ADMIN)
