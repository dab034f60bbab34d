"""The query API end to end over the real ClickHouse engine.

Each test builds two tenants' worlds from lifecycle and usage events it generates, applies them
through the real processing path (``aggregators.direct.apply_events``), then compares every
endpoint's answer with values computed here, independently, from the same events: periods from
plain calendar arithmetic, sums with Decimal, unique counts with Python sets, gauge integrals by
holding each sample until the next (at most the meter's gap).
"""

from __future__ import annotations

import base64
import random
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from fastapi.testclient import TestClient

from aggregators.direct import apply_events
from deploy.settings import QuerySettings
from query_api.app import create_app
from query_api.credentials import hash_secret, new_access_token, new_api_key
from schemas.plans import PLANS, Plan

pytestmark = pytest.mark.clickhouse

CI_MEMORY_GAP_S = 60
WS_MEMORY_GAP_S = 300
#: A plan with a small log limit so the overage can be exercised with a few hundred events.
TINY = Plan("tiny-test", base_vk_limit=4, log_limit=40, overage_cents_per_1000_logs=1234)


# ---- independent calendar arithmetic -------------------------------------------------------------


def month_start(d: date) -> datetime:
    return datetime(d.year, d.month, 1, tzinfo=UTC)


def next_month(t: datetime) -> datetime:
    return datetime(t.year + (t.month == 12), t.month % 12 + 1, 1, tzinfo=UTC)


def prev_month(t: datetime) -> datetime:
    return datetime(t.year - (t.month == 1), (t.month - 2) % 12 + 1, 1, tzinfo=UTC)


def half_up(value: Decimal, places: int = 0) -> Decimal:
    return value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)


def overlap_ms(a0: int, a1: int, b0: datetime, b1: datetime) -> int:
    lo, hi = max(a0, int(b0.timestamp() * 1000)), min(a1, int(b1.timestamp() * 1000))
    return max(0, hi - lo)


# ---- the worlds ------------------------------------------------------------------------------------


def uid() -> str:
    return str(uuid.uuid4())


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class World:
    tenant: str
    now: datetime
    ids: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    #: usage events by type (the data the expectations are computed from)
    usage: dict[str, list[tuple[datetime, dict[str, Any]]]] = field(default_factory=lambda: defaultdict(list))

    def emit(self, type_: str, data: dict[str, Any], t: datetime) -> None:
        self.events.append(
            {
                "specversion": "1.0",
                "id": uid(),
                "source": "test",
                "type": type_,
                "time": iso(t),
                "tenant": self.tenant,
                "data": data,
            }
        )

    def use(self, type_: str, data: dict[str, Any], t: datetime) -> None:
        self.emit(type_, data, t)
        self.usage[type_].append((t, data))

    def key(self, name: str, scope: str, **fields: Any) -> None:
        raw = new_api_key()
        self.secrets[name] = raw
        self.ids[name] = uid()
        self.emit(
            "api_key.created",
            {
                "key_id": self.ids[name],
                "key_hash": hash_secret(raw),
                "prefix": raw[:12],
                "scope": scope,
                **fields,
            },
            self.now - timedelta(days=40),
        )

    def token(self, name: str, member: str, email: str, expires_at: datetime) -> None:
        raw = new_access_token()
        self.secrets[name] = raw
        self.ids[name] = uid()
        self.emit(
            "access_token.issued",
            {
                "token_id": self.ids[name],
                "token_hash": hash_secret(raw),
                "member_id": self.ids[member],
                "email": email,
                "expires_at": iso(expires_at),
            },
            self.now - timedelta(days=40),
        )


def rand_time(rng: random.Random, now: datetime, max_age_s: float, min_age_s: float = 120.0) -> datetime:
    age_ms = rng.randint(int(min_age_s * 1000), int(max_age_s * 1000))
    t = now - timedelta(milliseconds=age_ms)
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


def build_world(tenant: str, seed: int, now: datetime) -> World:
    """One tenant: a contract of two workspaces (a root and its child, plus a grandchild), a
    workspace outside it, members, virtual keys, agents, tokens, keys, workstations, datastreams,
    and ~38 days of usage of every kind."""
    rng = random.Random(seed)
    w = World(tenant, now)
    t0 = now - timedelta(days=40)
    for name in (
        "contract",
        "root",
        "child",
        "grandchild",
        "other",
        "ws1",
        "ws2",
        "ds1",
        "ds2",
        "ds3",
        "ds4",
    ):
        w.ids[name] = uid()
    for name in ("alice", "bob", "carol", "dave"):
        w.ids[name] = uid()
    ids = w.ids

    w.emit("contract.created", {"contract_id": ids["contract"], "name": f"{tenant} contract"}, t0)
    w.emit(
        "workspace.created",
        {"workspace_id": ids["root"], "name": f"{tenant} root", "tier": "free", "billing_anchor_day": 15},
        t0,
    )
    w.emit("workspace.updated", {"workspace_id": ids["root"], "tier": TINY.tier}, t0 + timedelta(seconds=1))
    w.emit(
        "workspace.created",
        {"workspace_id": ids["child"], "name": f"{tenant} child", "parent_id": ids["root"]},
        t0,
    )
    w.emit(
        "workspace.created",
        {"workspace_id": ids["grandchild"], "name": f"{tenant} grandchild", "parent_id": ids["child"]},
        t0,
    )
    w.emit("workspace.created", {"workspace_id": ids["other"], "name": f"{tenant} other", "tier": "pro"}, t0)
    for ws in ("root", "child"):
        w.emit("contract.workspace_added", {"contract_id": ids["contract"], "workspace_id": ids[ws]}, t0)
    w.emit("virtual_key.extra_purchased", {"workspace_id": ids["root"], "count": 2}, t0)
    w.emit("virtual_key.extra_purchased", {"workspace_id": ids["root"], "count": 3}, t0)

    emails = {name: f"{name}@{tenant}.example" for name in ("alice", "bob", "carol", "dave")}
    for name in ("alice", "bob", "carol"):
        w.emit(
            "member.joined", {"workspace_id": ids["root"], "member_id": ids[name], "email": emails[name]}, t0
        )
    w.emit(
        "member.joined",
        {"workspace_id": ids["child"], "member_id": ids["alice"], "email": emails["alice"]},
        t0,
    )
    w.emit(
        "member.deactivated", {"workspace_id": ids["root"], "member_id": ids["bob"]}, t0 + timedelta(hours=1)
    )
    w.emit("member.left", {"workspace_id": ids["root"], "member_id": ids["carol"]}, t0 + timedelta(hours=1))
    w.emit(
        "member.joined", {"workspace_id": ids["other"], "member_id": ids["dave"], "email": emails["dave"]}, t0
    )

    for i in range(3):
        ids[f"vk{i}"] = uid()
        w.emit("virtual_key.created", {"workspace_id": ids["root"], "virtual_key_id": ids[f"vk{i}"]}, t0)
    w.emit(
        "virtual_key.revoked",
        {"workspace_id": ids["root"], "virtual_key_id": ids["vk2"]},
        t0 + timedelta(hours=2),
    )
    ids["vk_child"] = uid()
    w.emit("virtual_key.created", {"workspace_id": ids["child"], "virtual_key_id": ids["vk_child"]}, t0)
    for i in range(3):
        ids[f"agent{i}"] = uid()
        w.emit("agent.created", {"workspace_id": ids["root"], "agent_id": ids[f"agent{i}"]}, t0)
    w.emit(
        "agent.deactivated", {"workspace_id": ids["root"], "agent_id": ids["agent1"]}, t0 + timedelta(hours=1)
    )
    w.emit(
        "agent.deactivated", {"workspace_id": ids["root"], "agent_id": ids["agent2"]}, t0 + timedelta(hours=1)
    )
    w.emit(
        "agent.activated", {"workspace_id": ids["root"], "agent_id": ids["agent2"]}, t0 + timedelta(hours=2)
    )

    w.token("token_alice", "alice", emails["alice"], now + timedelta(days=1))
    w.token("token_expired", "alice", emails["alice"], now - timedelta(hours=1))
    w.token("token_revoked", "alice", emails["alice"], now + timedelta(days=1))
    w.emit("access_token.revoked", {"token_id": ids["token_revoked"]}, t0 + timedelta(hours=1))
    w.token("token_dave", "dave", emails["dave"], now + timedelta(days=1))
    w.token("token_bob", "bob", emails["bob"], now + timedelta(days=1))

    w.key("key_root", "workspace", workspace_id=ids["root"])
    w.key("key_child", "workspace", workspace_id=ids["child"])
    w.key("key_revoked", "workspace", workspace_id=ids["root"])
    w.emit("api_key.revoked", {"key_id": ids["key_revoked"]}, t0 + timedelta(hours=1))
    w.key("member_alice", "member", member_id=ids["alice"], email=emails["alice"])
    w.key("member_dave", "member", member_id=ids["dave"], email=emails["dave"])
    w.key("member_carol", "member", member_id=ids["carol"], email=emails["carol"])
    w.secrets.update({f"email_{n}": e for n, e in emails.items()})

    w.emit(
        "workstation.created",
        {
            "workstation_id": ids["ws1"],
            "name": "ws one",
            "usd_per_cpu_hour": 0.07,
            "usd_per_gpu_hour": 2.49,
            "usd_per_gb_hour": 0.0125,
        },
        t0,
    )
    w.emit(
        "workstation.created",
        {
            "workstation_id": ids["ws2"],
            "name": "ws two",
            "usd_per_cpu_hour": 0.1,
            "usd_per_gpu_hour": 0,
            "usd_per_gb_hour": 0.01,
        },
        t0,
    )
    for ds, ws in (("ds1", "root"), ("ds2", "root"), ("ds3", "child"), ("ds4", "other")):
        w.emit("datastream.created", {"datastream_id": ids[ds], "workspace_id": ids[ws], "name": ds}, t0)

    max_age = 38 * 86400.0
    # 000: gateway logs of the root (and some of the child, which must not count).
    for _ in range(260):
        ws = "root" if rng.random() < 0.85 else "child"
        w.use(
            "gateway.request",
            {"workspace_id": ids[ws], "virtual_key_id": ids["vk0"], "request_id": uid()},
            rand_time(rng, now, max_age),
        )
    # 001: CI steps of both contract workspaces and of the workspace outside the contract.
    for step_no in range(24):
        ws = ("root", "child", "other")[step_no % 3]
        step = f"step-{step_no}-{uid()[:8]}"
        contract = ids["contract"] if ws != "other" else uid()
        start = rand_time(rng, now, max_age, min_age_s=3600)
        t = start
        for _ in range(rng.randint(3, 12)):
            w.use(
                "ci.step.memory",
                {
                    "contract_id": contract,
                    "workspace_id": ids[ws],
                    "step_id": step,
                    "memory_mib": rng.randint(0, 40) * 64.5,
                },
                t,
            )
            w.use(
                "ci.step.cpu",
                {
                    "contract_id": contract,
                    "workspace_id": ids[ws],
                    "step_id": step,
                    "cpu_seconds": rng.randint(0, 90_000) / 1000,
                },
                t,
            )
            # Mostly within the 60 s gap, sometimes beyond it (the hold is then capped).
            t += timedelta(milliseconds=rng.randint(5_000, 75_000))
    # 002: workstations.
    for ws, n in (("ws1", 160), ("ws2", 30)):
        for _ in range(n):
            t = rand_time(rng, now, max_age)
            w.use(
                "workstation.cpu",
                {"workstation_id": ids[ws], "cpu_seconds": rng.randint(0, 3_600_000) / 1000},
                t,
            )
            w.use(
                "workstation.gpu",
                {"workstation_id": ids[ws], "gpu_seconds": rng.randint(0, 2_000_000) / 1000},
                t,
            )
        t = now - timedelta(days=20)
        for _ in range(n):
            w.use("workstation.memory", {"workstation_id": ids[ws], "memory_gb": rng.randint(1, 640) / 10}, t)
            t += timedelta(seconds=rng.randint(30, 420))
    # 003: renders, AI tasks, egress of the root and the child.
    for _ in range(120):
        ws = "root" if rng.random() < 0.7 else "child"
        t = rand_time(rng, now, max_age)
        kind = rng.randrange(3)
        if kind == 0:
            w.use(
                "render.completed",
                {
                    "workspace_id": ids[ws],
                    "render_id": uid(),
                    "output_duration_seconds": rng.randint(1, 900_000) / 1000,
                },
                t,
            )
        elif kind == 1:
            w.use(
                "ai.task.submitted",
                {
                    "workspace_id": ids[ws],
                    "task_id": uid(),
                    "task_type": rng.choice(["transcribe", "remove-background"]),
                },
                t,
            )
        else:
            w.use(
                "egress.download",
                {"workspace_id": ids[ws], "artifact_id": uid(), "bytes": rng.randint(0, 5 * 2**30)},
                t,
            )
    # 004: datastream rows; keys repeat across days so monthly uniques differ from summed daily ones.
    streams: list[tuple[str, str | None]] = [
        ("root", "ds1"),
        ("root", "ds2"),
        ("root", None),
        ("child", "ds3"),
        ("grandchild", None),
        ("other", "ds4"),
    ]
    for _ in range(150):
        owner, stream = rng.choice(streams)
        keys = [f"row-{rng.randint(0, 60)}" for _ in range(rng.randint(1, 8))]
        data: dict[str, Any] = {
            "workspace_id": ids[owner],
            "total_rows": len(keys) + rng.randint(0, 5),
            "row_keys": keys,
        }
        if stream is not None:
            data["datastream_id"] = ids[stream]
        w.use("datastream.rows", data, rand_time(rng, now, max_age, min_age_s=60))
    return w


@dataclass
class Env:
    app_client: TestClient
    a: World
    b: World
    client: Any
    database: str


def make_settings(database: str, **overrides: Any) -> QuerySettings:
    values: dict[str, Any] = {
        "clickhouse_database": database,
        "query_cache_ttl_s": 0.0,
        "query_rate_limit_per_minute": 1_000_000,
        **overrides,
    }
    return QuerySettings(**values)


def load_worlds(client: Any, database: str, now: datetime) -> tuple[World, World]:
    a = build_world("tenant-a", 1, now)
    b = build_world("tenant-b", 2, now)
    stats = apply_events(client, database, [*a.events, *b.events], backfill=True)
    assert stats.rejected == 0, stats
    return a, b


@pytest.fixture
def env(clickhouse: tuple[Any, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    client, database = clickhouse
    monkeypatch.setitem(PLANS, TINY.tier, TINY)
    now = datetime.now(UTC)
    a, b = load_worlds(client, database, now)
    app = create_app(make_settings(database), client)
    with TestClient(app) as tc:
        yield Env(tc, a, b, client, database)


def bearer(raw: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {raw}"}


def basic(email: str, key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{email}:{key}".encode()).decode()}


def freshness_of(env: Env, tenant: str) -> str:
    (ms,) = env.client.query(
        f"SELECT toUnixTimestamp64Milli(max(refreshed_at)) FROM {env.database}.tenant_freshness WHERE tenant = {{t:String}}",
        parameters={"t": tenant},
    ).result_rows[0]
    t = datetime.fromtimestamp(int(ms) / 1000, UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def in_range(t: datetime, start: datetime, end: datetime) -> bool:
    return start <= t < end


# ---- 000 ------------------------------------------------------------------------------------------


def billing_period(now: datetime, anchor: int) -> tuple[datetime, datetime]:
    if now.day >= anchor:
        start = datetime(now.year, now.month, anchor, tzinfo=UTC)
    else:
        p = prev_month(now)
        start = datetime(p.year, p.month, anchor, tzinfo=UTC)
    end = next_month(start).replace(day=anchor)
    return start, end


def test_workspace_stats(env: Env) -> None:
    a = env.a
    now = datetime.now(UTC)
    r = env.app_client.get(
        f"/api/v1/workspaces/{a.ids['root']}/stats", headers=bearer(a.secrets["token_alice"])
    )
    assert r.status_code == 200, r.text
    assert r.headers["X-Data-Refreshed-At"] == freshness_of(env, a.tenant)
    body = r.json()
    assert set(body) == {"data"}
    ps, pe = billing_period(now, 15)
    ms, me = month_start(now.date()), next_month(month_start(now.date()))
    logs = [(t, d) for t, d in a.usage["gateway.request"] if d["workspace_id"] == a.ids["root"]]
    period_logs = sum(1 for t, _ in logs if in_range(t, ps, pe))
    month_logs = sum(1 for t, _ in logs if in_range(t, ms, me))
    assert period_logs > TINY.log_limit, "the world must exceed the tiny plan's limit"
    over = period_logs - TINY.log_limit
    assert body["data"] == {
        "activeAgents": 2,
        "activeMembers": 1,
        "activeVks": 2,
        "baseVkLimit": TINY.base_vk_limit,
        "currentPeriodLogCount": period_logs,
        "extraVkCount": 5,
        "logLimit": TINY.log_limit,
        "logsThisMonth": month_logs,
        "maxVks": TINY.base_vk_limit + 5,
        "overageCents": -(-over * TINY.overage_cents_per_1000_logs // 1000),
        "tier": TINY.tier,
        "totalAgents": 3,
        "totalMembers": 2,
        "workspaceId": a.ids["root"],
    }
    for v in body["data"].values():
        assert type(v) in (int, str)

    # A workspace with no usage: zeros, free-plan limits for an unknown... known tier "pro".
    r = env.app_client.get(
        f"/api/v1/workspaces/{a.ids['other']}/stats", headers=bearer(a.secrets["token_dave"])
    )
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert (data["tier"], data["baseVkLimit"], data["logLimit"]) == ("pro", 25, 1_000_000)
    assert (data["currentPeriodLogCount"], data["overageCents"], data["activeMembers"]) == (0, 0, 1)


def test_workspace_stats_errors(env: Env) -> None:
    a, b = env.a, env.b
    c = env.app_client
    url = f"/api/v1/workspaces/{a.ids['root']}/stats"

    def err(r: Any, status: int, code: str) -> dict[str, Any]:
        assert r.status_code == status, r.text
        body = r.json()
        assert body["error"]["code"] == code, body
        assert isinstance(body["error"]["message"], str)
        return body  # type: ignore[no-any-return]

    err(c.get(url), 401, "AUTH_TOKEN_INVALID")
    err(c.get(url, headers={"Authorization": "Basic Zm9vOmJhcg=="}), 401, "AUTH_TOKEN_INVALID")
    err(c.get(url, headers=bearer("mt_at_not-a-real-token")), 401, "AUTH_TOKEN_INVALID")
    err(c.get(url, headers=bearer(a.secrets["token_revoked"])), 401, "AUTH_TOKEN_INVALID")
    err(c.get(url, headers=bearer(a.secrets["token_expired"])), 401, "AUTH_TOKEN_EXPIRED")
    # An API key is not an access token.
    err(c.get(url, headers=bearer(a.secrets["key_root"])), 401, "AUTH_TOKEN_INVALID")
    token = bearer(a.secrets["token_alice"])
    err(c.get("/api/v1/workspaces/not-a-uuid/stats", headers=token), 400, "BAD_REQUEST")
    err(c.get(f"/api/v1/workspaces/{a.ids['root']}x/stats", headers=token), 400, "BAD_REQUEST")
    missing = err(c.get(f"/api/v1/workspaces/{uid()}/stats", headers=token), 404, "NOT_FOUND")
    # Another tenant's workspace answers exactly like a missing one.
    foreign = err(c.get(f"/api/v1/workspaces/{b.ids['root']}/stats", headers=token), 404, "NOT_FOUND")
    assert foreign == missing
    # Same tenant, not a member (dave), a deactivated member (bob): 403.
    err(c.get(url, headers=bearer(a.secrets["token_dave"])), 403, "FORBIDDEN")
    err(c.get(url, headers=bearer(a.secrets["token_bob"])), 403, "FORBIDDEN")
    # Tenant B's token on tenant A's workspace: 404, like a missing one.
    assert err(c.get(url, headers=bearer(b.secrets["token_alice"])), 404, "NOT_FOUND") == missing


# ---- 001 ------------------------------------------------------------------------------------------


def quota_expected(w: World, dim: str, value: str, start: datetime, end: datetime) -> dict[str, int]:
    cpu = sum(
        (
            Decimal(str(d["cpu_seconds"]))
            for t, d in w.usage["ci.step.cpu"]
            if d[dim] == value and in_range(t, start, end)
        ),
        Decimal(0),
    )
    by_step: dict[str, list[tuple[datetime, dict[str, Any]]]] = defaultdict(list)
    for t, d in w.usage["ci.step.memory"]:
        by_step[d["step_id"]].append((t, d))
    memory = Decimal(0)
    for samples in by_step.values():
        samples.sort(key=lambda s: s[0])
        for i, (t, d) in enumerate(samples):
            if d[dim] != value:
                continue
            t_ms = int(t.timestamp() * 1000)
            nxt = int(samples[i + 1][0].timestamp() * 1000) if i + 1 < len(samples) else None
            hold_end = (
                t_ms + CI_MEMORY_GAP_S * 1000 if nxt is None or nxt - t_ms > CI_MEMORY_GAP_S * 1000 else nxt
            )
            memory += Decimal(str(d["memory_mib"])) * overlap_ms(t_ms, hold_end, start, end) / 1000
    return {"memory": int(half_up(memory)), "cpu": int(half_up(cpu * 1000))}


def test_quota_usages(env: Env) -> None:
    a = env.a
    c = env.app_client
    auth = basic(a.secrets["email_alice"], a.secrets["member_alice"])
    now = datetime.now(UTC)
    monday = datetime(now.year, now.month, now.day, tzinfo=UTC) - timedelta(days=now.weekday())
    this_month = month_start(now.date())
    last_month = prev_month(this_month)
    periods = {
        "week": (monday, monday + timedelta(days=7)),
        f"{this_month:%Y-%m}": (this_month, next_month(this_month)),
        f"{last_month:%Y-%m}": (last_month, this_month),
    }
    nonzero = 0
    for period, (start, end) in periods.items():
        r = c.get(f"/v2/quota-usages/contracts/{a.ids['contract']}", params={"period": period}, headers=auth)
        assert r.status_code == 200, r.text
        expected = quota_expected(a, "contract_id", a.ids["contract"], start, end)
        assert r.json() == {"data": expected}, period
        assert r.headers["X-Data-Refreshed-At"] == freshness_of(env, a.tenant)
        nonzero += expected["memory"] > 0 and expected["cpu"] > 0
        for ws in ("root", "child"):
            r = c.get(f"/v2/quota-usages/workspaces/{a.ids[ws]}", params={"period": period}, headers=auth)
            assert r.status_code == 200, r.text
            assert r.json() == {"data": quota_expected(a, "workspace_id", a.ids[ws], start, end)}, (
                period,
                ws,
            )
    # the world's events end 2 minutes before now: on a month's first day its month may be empty
    assert nonzero >= (2 if now.day > 1 else 1), "the world should have CI usage in most periods"
    r = c.get(f"/v2/quota-usages/contracts/{a.ids['contract']}", params={"period": "1999-01"}, headers=auth)
    assert r.json() == {"data": {"memory": 0, "cpu": 0}}


def test_quota_usages_errors(env: Env) -> None:
    a, b = env.a, env.b
    c = env.app_client
    alice = basic(a.secrets["email_alice"], a.secrets["member_alice"])
    url = f"/v2/quota-usages/contracts/{a.ids['contract']}"
    ok = {"period": "week"}

    def err(r: Any, status: int, code: str) -> dict[str, Any]:
        assert r.status_code == status, r.text
        body = r.json()
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
        assert body["error"]["code"] == code
        return body  # type: ignore[no-any-return]

    err(c.get(url, params=ok), 401, "unauthorized")
    err(
        c.get(url, params=ok, headers=basic("mallory@x.example", a.secrets["member_alice"])),
        401,
        "unauthorized",
    )
    err(c.get(url, params=ok, headers=basic(a.secrets["email_alice"], "fl_live_wrong")), 401, "unauthorized")
    err(c.get(url, params=ok, headers={"Authorization": "Basic !!!notbase64"}), 401, "unauthorized")
    err(
        c.get(url, params=ok, headers={"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()}),
        401,
        "unauthorized",
    )
    err(c.get(url, params=ok, headers=bearer(a.secrets["member_alice"])), 401, "unauthorized")
    # A workspace-scoped key is not a member's key.
    err(
        c.get(url, params=ok, headers=basic(a.secrets["email_alice"], a.secrets["key_root"])),
        401,
        "unauthorized",
    )
    # Email comparison ignores case.
    assert (
        c.get(
            url, params=ok, headers=basic(a.secrets["email_alice"].upper(), a.secrets["member_alice"])
        ).status_code
        == 200
    )

    for bad in ("", "month", "2026-13", "2026-1", "26-01", "2026-01-01", "WEEK", "2026-00", " week"):
        err(c.get(url, params={"period": bad}, headers=alice), 400, "bad_request")
    err(c.get(url, headers=alice), 400, "bad_request")

    missing = err(c.get(f"/v2/quota-usages/contracts/{uid()}", params=ok, headers=alice), 404, "not_found")
    foreign = err(
        c.get(f"/v2/quota-usages/contracts/{b.ids['contract']}", params=ok, headers=alice), 404, "not_found"
    )
    assert foreign == missing
    missing_ws = err(
        c.get(f"/v2/quota-usages/workspaces/{uid()}", params=ok, headers=alice), 404, "not_found"
    )
    foreign_ws = err(
        c.get(f"/v2/quota-usages/workspaces/{b.ids['root']}", params=ok, headers=alice), 404, "not_found"
    )
    assert foreign_ws == missing_ws
    # dave is a member of a workspace outside the contract; carol left it.
    dave = basic(a.secrets["email_dave"], a.secrets["member_dave"])
    carol = basic(a.secrets["email_carol"], a.secrets["member_carol"])
    err(c.get(url, params=ok, headers=dave), 403, "forbidden")
    err(c.get(url, params=ok, headers=carol), 403, "forbidden")
    err(c.get(f"/v2/quota-usages/workspaces/{a.ids['child']}", params=ok, headers=dave), 403, "forbidden")
    # ...but dave may read his own workspace, which is in no contract.
    assert c.get(f"/v2/quota-usages/workspaces/{a.ids['other']}", params=ok, headers=dave).status_code == 200


# ---- 002 ------------------------------------------------------------------------------------------


def workstation_expected(w: World, ws: str, rates: tuple[float, float, float]) -> dict[str, Any]:
    wid = w.ids[ws]
    cpu = sum(
        (Decimal(str(d["cpu_seconds"])) for _, d in w.usage["workstation.cpu"] if d["workstation_id"] == wid),
        Decimal(0),
    )
    gpu = sum(
        (Decimal(str(d["gpu_seconds"])) for _, d in w.usage["workstation.gpu"] if d["workstation_id"] == wid),
        Decimal(0),
    )
    samples = sorted((t, d) for t, d in w.usage["workstation.memory"] if d["workstation_id"] == wid)
    mem = Decimal(0)
    for i, (t, d) in enumerate(samples):
        held = (samples[i + 1][0] - t).total_seconds() if i + 1 < len(samples) else WS_MEMORY_GAP_S
        mem += Decimal(str(d["memory_gb"])) * Decimal(str(min(held, WS_MEMORY_GAP_S)))
    hours = [x / Decimal(3600) for x in (cpu, gpu, mem)]
    cost = sum((h * Decimal(str(r)) for h, r in zip(hours, rates, strict=True)), Decimal(0))
    return {
        "cpuHours": float(half_up(hours[0], 6)),
        "gpuHours": int(half_up(hours[1])),
        "memoryGBHours": int(half_up(hours[2])),
        "costUSD": float(half_up(cost, 2)),
    }


def test_workstation_usage(env: Env) -> None:
    a = env.a
    c = env.app_client
    for ws, rates in (("ws1", (0.07, 2.49, 0.0125)), ("ws2", (0.1, 0, 0.01))):
        r = c.get(f"/v1/workstations/{a.ids[ws]}/usage", headers=bearer(a.secrets["token_alice"]))
        assert r.status_code == 200, r.text
        body = r.json()
        expected = workstation_expected(a, ws, rates)
        last = body.pop("lastUpdated")
        assert body == expected
        assert isinstance(body["gpuHours"], int) and isinstance(body["memoryGBHours"], int)
        assert isinstance(body["cpuHours"], float) and isinstance(body["costUSD"], float)
        assert last == r.headers["X-Data-Refreshed-At"] == freshness_of(env, a.tenant)
        assert expected["gpuHours"] > 0 and expected["memoryGBHours"] > 0


def test_workstation_usage_errors(env: Env, clickhouse: tuple[Any, str]) -> None:
    a, b = env.a, env.b
    c = env.app_client
    token = bearer(a.secrets["token_alice"])
    url = f"/v1/workstations/{a.ids['ws1']}/usage"

    def err(r: Any, status: int, code: str) -> dict[str, Any]:
        assert r.status_code == status, r.text
        body = r.json()
        assert body["error"]["code"] == code, body
        return body  # type: ignore[no-any-return]

    err(c.get(url), 401, "unauthorized")
    err(c.get(url, headers=bearer("nope")), 401, "unauthorized")
    err(c.get(url, headers=bearer(a.secrets["token_expired"])), 401, "token_expired")
    err(c.get(url, headers=bearer(a.secrets["token_revoked"])), 401, "unauthorized")
    err(c.get("/v1/workstations/" + "x" * 129 + "/usage", headers=token), 400, "bad_request")
    err(c.get("/v1/workstations/bad%01id/usage", headers=token), 400, "bad_request")
    missing = err(c.get("/v1/workstations/ws-12345/usage", headers=token), 404, "not_found")
    foreign = err(c.get(f"/v1/workstations/{b.ids['ws1']}/usage", headers=token), 404, "not_found")
    assert foreign == missing

    # Storage failing: the documented 500, with a JSON body.
    client, database = clickhouse

    class Failing:
        def __init__(self, real: Any) -> None:
            self.real = real

        def query(self, sql: str, *args: Any, **kwargs: Any) -> Any:
            if "usage_1mo" in sql or "gauge_15m" in sql:
                raise ConnectionError("ClickHouse went away")
            return self.real.query(sql, *args, **kwargs)

    app = create_app(make_settings(database), Failing(client))  # type: ignore[arg-type]
    with TestClient(app, raise_server_exceptions=False) as failing:
        r = failing.get(url, headers=token)
        assert r.status_code == 500
        assert r.json()["error"]["code"] == "internal_error"
        assert "ClickHouse" not in r.text
        # Other documents answer 503 with their own shape.
        r = failing.get("/v1/workspace/usage", headers=bearer(a.secrets["key_root"]))
        assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable"


# ---- 003 ------------------------------------------------------------------------------------------


def workspace_usage_expected(w: World, ws: str) -> dict[str, Any]:
    """Document 003's answer for workspace ``ws`` of world ``w``: this month's usage, from its events."""
    start = month_start(datetime.now(UTC).date())
    end = next_month(start)
    wid = w.ids[ws]

    def mine(type_: str) -> list[dict[str, Any]]:
        return [d for t, d in w.usage[type_] if d["workspace_id"] == wid and in_range(t, start, end)]

    render = sum((Decimal(str(d["output_duration_seconds"])) for d in mine("render.completed")), Decimal(0))
    return {
        "period_start": start.isoformat().replace("+00:00", "Z"),
        "period_end": end.isoformat().replace("+00:00", "Z"),
        "render_minutes": float(half_up(render / 60, 6)),
        "task_count": len(mine("ai.task.submitted")),
        "egress_bytes": sum(d["bytes"] for d in mine("egress.download")),
    }


def test_workspace_usage(env: Env) -> None:
    a = env.a
    c = env.app_client
    for key, ws in (("key_root", "root"), ("key_child", "child")):
        r = c.get("/v1/workspace/usage", headers=bearer(a.secrets[key]))
        assert r.status_code == 200, r.text
        assert r.json() == workspace_usage_expected(a, ws)
        assert isinstance(r.json()["task_count"], int) and isinstance(r.json()["render_minutes"], float)
        assert r.headers["X-Data-Refreshed-At"] == freshness_of(env, a.tenant)


def test_workspace_usage_errors(env: Env) -> None:
    a, b = env.a, env.b
    c = env.app_client
    for headers in (
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer fl_live_unknown"},
        {"Authorization": f"Token {a.secrets['key_root']}"},
        bearer(a.secrets["key_revoked"]),
        bearer(a.secrets["member_alice"]),
        bearer(a.secrets["token_alice"]),
    ):
        r = c.get("/v1/workspace/usage", headers=headers)
        assert r.status_code == 401, (headers, r.text)
        body = r.json()
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    # Tenant B's key answers with tenant B's numbers, never A's.
    rb = c.get("/v1/workspace/usage", headers=bearer(b.secrets["key_root"]))
    ra = c.get("/v1/workspace/usage", headers=bearer(a.secrets["key_root"]))
    assert rb.status_code == ra.status_code == 200
    # each key's answer is its own tenant's numbers, from that tenant's events (not "the two answers
    # differ": in a month's first minutes both tenants' usage is still zero)
    assert ra.json() == workspace_usage_expected(a, "root")
    assert rb.json() == workspace_usage_expected(b, "root")
    r = c.post("/v1/workspace/usage", headers=bearer(a.secrets["key_root"]))
    assert r.status_code == 405 and set(r.json()["error"]) == {"code", "message", "details"}


# ---- 004 ------------------------------------------------------------------------------------------


def row_usage_expected(
    w: World, workspaces: set[str], datastreams: set[str] | None, first: date, last: date, monthly: bool
) -> list[dict[str, Any]]:
    names = {w.ids[n]: f"{w.tenant} {n}" for n in ("root", "child", "grandchild", "other")}
    uniques: dict[tuple[date, str, str | None], set[str]] = defaultdict(set)
    totals: dict[tuple[date, str, str | None], int] = defaultdict(int)
    for t, d in w.usage["datastream.rows"]:
        day = t.date()
        if not first <= day <= last or d["workspace_id"] not in workspaces:
            continue
        ds = d.get("datastream_id")
        if datastreams is not None and ds not in datastreams:
            continue
        bucket = day.replace(day=1) if monthly else day
        uniques[(bucket, d["workspace_id"], ds)].update(d["row_keys"])
        totals[(bucket, d["workspace_id"], ds)] += d["total_rows"]
    items = [
        {
            "date": k[0].isoformat(),
            "workspace_id": k[1],
            "workspace_name": names[k[1]],
            "datastream_id": k[2],
            "unique_rows": len(uniques[k]),
            "total_rows": totals[k],
        }
        for k in uniques
    ]
    return sorted(items, key=lambda i: (i["date"], i["workspace_id"], i["datastream_id"] or ""))


def fetch_all(
    c: TestClient, headers: dict[str, str], params: dict[str, Any]
) -> tuple[int, list[dict[str, Any]]]:
    items: list[dict[str, Any]] = []
    page = 1
    count = -1
    while True:
        r = c.get("/api/v1/usage/", headers=headers, params={**params, "page": page})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"count", "items"}
        count = body["count"]
        items.extend(body["items"])
        if not body["items"]:
            break
        page += 1
    return count, items


def test_row_usage(env: Env) -> None:
    a = env.a
    c = env.app_client
    today = datetime.now(UTC).date()
    yesterday = today - timedelta(days=1)
    subtree = {a.ids[n] for n in ("root", "child", "grandchild")}
    token = {"Authorization": f"Token {a.secrets['key_root']}"}

    # Defaults: daily, first of this month to yesterday.
    r = c.get("/api/v1/usage/", headers=token)
    assert r.status_code == 200, r.text
    expected = row_usage_expected(a, subtree, None, today.replace(day=1), yesterday, monthly=False)
    assert r.json()["count"] == len(expected)
    assert r.json()["items"] == expected[:50]
    assert r.headers["X-Data-Refreshed-At"] == freshness_of(env, a.tenant)

    # Daily over 40 days, small pages, date_to past today (capped to yesterday).
    first = today - timedelta(days=40)
    params = {
        "date_from": first.isoformat(),
        "date_to": (today + timedelta(days=3)).isoformat(),
        "page_size": 7,
    }
    count, items = fetch_all(c, token, params)
    expected = row_usage_expected(a, subtree, None, first, yesterday, monthly=False)
    assert count == len(expected) and items == expected
    assert all(i["date"] != today.isoformat() for i in items)

    # Monthly: the previous month whole (usage_1mo) + this month to yesterday (merged days), and a
    # range starting mid-month. Unique rows are exact per month, not sums of daily counts.
    last_month = prev_month(month_start(today)).date()
    for first in (last_month, last_month + timedelta(days=9), today - timedelta(days=40)):
        params = {"granularity": "monthly", "date_from": first.isoformat(), "page_size": 100}
        count, items = fetch_all(c, bearer(a.secrets["key_root"]), params)
        expected = row_usage_expected(a, subtree, None, first, yesterday, monthly=True)
        assert count == len(expected) and items == expected, first
    daily_sum = sum(
        i["unique_rows"] for i in row_usage_expected(a, subtree, None, last_month, yesterday, False)
    )
    monthly_sum = sum(
        i["unique_rows"] for i in row_usage_expected(a, subtree, None, last_month, yesterday, True)
    )
    assert monthly_sum < daily_sum, "the world must make monthly uniques differ from summed daily ones"

    # Filters: limited to the subtree; unknown, foreign and out-of-scope ids silently ignored.
    first = today - timedelta(days=40)
    base = {"date_from": first.isoformat(), "page_size": 100}
    params = {**base, "workspace_id": [a.ids["child"], a.ids["other"], env.b.ids["root"], "garbage", uid()]}
    count, items = fetch_all(c, token, params)
    assert items == row_usage_expected(a, {a.ids["child"]}, None, first, yesterday, False) and count == len(
        items
    )
    params = {**base, "datastream_id": [a.ids["ds1"], a.ids["ds4"], uid()]}
    count, items = fetch_all(c, token, params)
    assert items == row_usage_expected(a, subtree, {a.ids["ds1"]}, first, yesterday, False) and count == len(
        items
    )
    assert count > 0
    # Only ignored ids: nothing matches.
    r = c.get("/api/v1/usage/", headers=token, params={**base, "workspace_id": [a.ids["other"]]})
    assert r.json() == {"count": 0, "items": []}
    # The child's key sees the child and the grandchild only.
    count, items = fetch_all(c, bearer(a.secrets["key_child"]), base)
    expected = row_usage_expected(a, {a.ids["child"], a.ids["grandchild"]}, None, first, yesterday, False)
    assert items == expected and count == len(expected)
    # page_size is capped to 100; a page past the end is empty but keeps the count.
    r = c.get("/api/v1/usage/", headers=token, params={**base, "page_size": 1000})
    assert len(r.json()["items"]) == min(100, r.json()["count"])
    total = r.json()["count"]
    r = c.get("/api/v1/usage/", headers=token, params={**base, "page": 999})
    assert r.json() == {"count": total, "items": []}


def test_row_usage_errors(env: Env) -> None:
    a = env.a
    c = env.app_client
    token = {"Authorization": f"Token {a.secrets['key_root']}"}
    for headers in (
        {},
        {"Authorization": "Token"},
        {"Authorization": "Token nope"},
        {"Authorization": f"Basic {a.secrets['key_root']}"},
        {"Authorization": f"Token {a.secrets['key_revoked']}"},
        {"Authorization": f"Token {a.secrets['member_alice']}"},
    ):
        r = c.get("/api/v1/usage/", headers=headers)
        assert r.status_code == 401, headers
        assert set(r.json()) == {"detail"}
    for params, name in (
        ({"granularity": "weekly"}, "granularity"),
        ({"date_from": "2026-02-30"}, "date_from"),
        ({"date_from": "20260201"}, "date_from"),
        ({"date_to": "yesterday"}, "date_to"),
        ({"page": "0"}, "page"),
        ({"page": "x"}, "page"),
        ({"page_size": "0"}, "page_size"),
        ({"date_from": "2026-03-02", "date_to": "2026-03-01"}, "date_from"),
    ):
        r = c.get("/api/v1/usage/", headers=token, params=params)
        assert r.status_code == 400, (params, r.text)
        body = r.json()
        assert list(body) == [name] and isinstance(body[name], list), body


# ---- generic meter query ------------------------------------------------------------------------


def test_meter_query(env: Env) -> None:
    a = env.a
    c = env.app_client
    key = bearer(a.secrets["key_root"])
    today = datetime.now(UTC).date()
    start = datetime(today.year, today.month, today.day, tzinfo=UTC) - timedelta(days=30)
    end = datetime(today.year, today.month, today.day, tzinfo=UTC)

    # DAY windows in UTC grouped by workspace: gateway logs per day.
    r = c.get(
        "/api/v1/meters/gateway_requests/query",
        headers=key,
        params={"from": iso(start), "to": iso(end), "window": "DAY", "group_by": "workspace_id"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["meter"], body["window"]) == ("gateway_requests", "DAY")
    assert r.headers["X-Data-Refreshed-At"] == freshness_of(env, a.tenant)
    expected: dict[tuple[str, str], int] = defaultdict(int)
    for t, d in a.usage["gateway.request"]:
        if in_range(t, start, end):
            expected[(t.date().isoformat(), d["workspace_id"])] += 1
    got = {(row["window_start"][:10], row["group_by"]["workspace_id"]): row["value"] for row in body["data"]}
    assert got == expected

    # DAY windows in a zone with a half-hour offset, answered from 15-minute rows.
    zone = ZoneInfo("Asia/Kolkata")
    local_start = datetime(today.year, today.month, today.day, tzinfo=zone) - timedelta(days=20)
    local_end = datetime(today.year, today.month, today.day, tzinfo=zone)
    r = c.get(
        "/api/v1/meters/egress_bytes/query",
        headers=key,
        params={
            "from": local_start.isoformat(),
            "to": local_end.isoformat(),
            "window": "DAY",
            "tz": "Asia/Kolkata",
        },
    )
    assert r.status_code == 200, r.text
    local: dict[str, Decimal] = defaultdict(Decimal)
    for t, d in a.usage["egress.download"]:
        if in_range(t, local_start, local_end):
            local[t.astimezone(zone).date().isoformat()] += d["bytes"]
    rows = r.json()["data"]
    assert {row["window_start"][:10]: Decimal(str(row["value"])) for row in rows} == {
        k: v for k, v in local.items() if v
    }
    for row in rows:
        assert row["window_start"].endswith("+05:30")
        assert datetime.fromisoformat(row["window_end"]) - datetime.fromisoformat(
            row["window_start"]
        ) == timedelta(days=1)

    # MINUTE windows from raw events, filtered by subject.
    ws1 = a.ids["ws1"]
    m_from, m_to = end - timedelta(days=6), end
    r = c.get(
        "/api/v1/meters/workstation_cpu_seconds/query",
        headers=key,
        params={"from": iso(m_from), "to": iso(m_to), "window": "MINUTE", "filter_subject": ws1},
    )
    assert r.status_code == 200, r.text
    minutes: dict[datetime, Decimal] = defaultdict(Decimal)
    for t, d in a.usage["workstation.cpu"]:
        if d["workstation_id"] == ws1 and in_range(t, m_from, m_to):
            minutes[t.replace(second=0, microsecond=0)] += Decimal(str(d["cpu_seconds"]))
    got_minutes = {datetime.fromisoformat(row["window_start"]): row["value"] for row in r.json()["data"]}
    assert got_minutes == {k: float(v) for k, v in minutes.items()}
    assert minutes, "the world should have workstation CPU in the last 6 days"

    # Another tenant's subject is invisible: like one that does not exist.
    for subject in (env.b.ids["ws1"], uid()):
        r = c.get(
            "/api/v1/meters/workstation_cpu_seconds/query",
            headers=key,
            params={"from": iso(start), "to": iso(end), "filter_subject": subject},
        )
        assert r.status_code == 200 and r.json()["data"] == []

    # A gauge per hour (MiB-seconds of CI steps of the contract) and no window at all.
    contract = a.ids["contract"]
    h_start, h_end = end - timedelta(days=5), end
    r = c.get(
        "/api/v1/meters/ci_step_memory_mib_seconds/query",
        headers=key,
        params={"from": iso(h_start), "to": iso(h_end), "group_by": "contract_id"},
    )
    assert r.status_code == 200, r.text
    total = next((row["value"] for row in r.json()["data"] if row["group_by"]["contract_id"] == contract), 0)
    assert Decimal(str(total)) == Decimal(quota_exact_memory(a, contract, h_start, h_end))

    # UNIQUE_COUNT per month: exact for the month.
    m_start = prev_month(month_start(today))
    r = c.get(
        "/api/v1/meters/datastream_unique_rows/query",
        headers=key,
        params={
            "from": iso(m_start),
            "to": iso(month_start(today)),
            "window": "MONTH",
            "group_by": ["workspace_id"],
        },
    )
    assert r.status_code == 200, r.text
    uniq: dict[str, set[str]] = defaultdict(set)
    for t, d in a.usage["datastream.rows"]:
        if in_range(t, m_start, month_start(today)):
            uniq[d["workspace_id"]].update(d["row_keys"])
    assert {row["group_by"]["workspace_id"]: row["value"] for row in r.json()["data"]} == {
        k: len(v) for k, v in uniq.items()
    }

    # Errors.
    def err(params: dict[str, Any], status: int = 400, slug: str = "egress_bytes") -> None:
        r = c.get(f"/api/v1/meters/{slug}/query", headers=key, params=params)
        assert r.status_code == status, (params, r.text)
        assert set(r.json()["error"]) == {"code", "message", "details"}

    err({}, 404, slug="no_such_meter")
    err({"tz": "Mars/Olympus"})
    err({"tz": "../../etc/passwd"})
    err({"tz": "localtime"})
    err({"group_by": "task_type"})
    err({"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"})
    err({"from": "2026-01-01"})
    err({"window": "WEEK"})
    err({"window": "MINUTE", "from": "2025-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"})
    err({"window": "MINUTE"}, slug="ci_step_memory_mib_seconds")
    err({"from": "2026-01-01T00:07:00Z", "to": "2026-01-02T00:00:00Z"}, slug="ci_step_memory_mib_seconds")
    r = c.get("/api/v1/meters/egress_bytes/query", headers=bearer(a.secrets["token_alice"]))
    assert r.status_code == 401


def quota_exact_memory(w: World, contract: str, start: datetime, end: datetime) -> str:
    by_step: dict[str, list[tuple[datetime, dict[str, Any]]]] = defaultdict(list)
    for t, d in w.usage["ci.step.memory"]:
        by_step[d["step_id"]].append((t, d))
    memory = Decimal(0)
    for samples in by_step.values():
        samples.sort(key=lambda s: s[0])
        for i, (t, d) in enumerate(samples):
            if d["contract_id"] != contract:
                continue
            t_ms = int(t.timestamp() * 1000)
            nxt = int(samples[i + 1][0].timestamp() * 1000) if i + 1 < len(samples) else None
            hold_end = (
                t_ms + CI_MEMORY_GAP_S * 1000 if nxt is None or nxt - t_ms > CI_MEMORY_GAP_S * 1000 else nxt
            )
            memory += Decimal(str(d["memory_mib"])) * overlap_ms(t_ms, hold_end, start, end) / 1000
    return str(memory)


# ---- cross-cutting --------------------------------------------------------------------------------


def test_rate_limit(clickhouse: tuple[Any, str], monkeypatch: pytest.MonkeyPatch) -> None:
    client, database = clickhouse
    now = datetime.now(UTC)
    a, _ = load_worlds(client, database, now)
    app = create_app(make_settings(database, query_rate_limit_per_minute=3), client)
    with TestClient(app) as c:
        key = bearer(a.secrets["key_root"])
        for _ in range(3):
            assert c.get("/v1/workspace/usage", headers=key).status_code == 200
        r = c.get("/v1/workspace/usage", headers=key)
        assert r.status_code == 429
        assert int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["code"] == "rate_limited"
        # Limits are per credential: another key still passes.
        assert c.get("/v1/workspace/usage", headers=bearer(a.secrets["key_child"])).status_code == 200
        # Document 004 says it its own way.
        token = {"Authorization": f"Token {a.secrets['key_child']}"}
        for _ in range(2):
            c.get("/api/v1/usage/", headers=token)
        r = c.get("/api/v1/usage/", headers=token)
        assert r.status_code == 429 and set(r.json()) == {"detail"} and "Retry-After" in r.headers
        # Guessing keys is limited too (per client address).
        statuses = [
            c.get("/v1/workspace/usage", headers=bearer(f"fl_live_guess{i}")).status_code for i in range(5)
        ]
        assert statuses[:3] == [401, 401, 401] and statuses[-1] == 429


def test_secrets_never_logged(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    a = env.a
    c = env.app_client
    with caplog.at_level("DEBUG"):
        c.get(f"/api/v1/workspaces/{a.ids['root']}/stats", headers=bearer(a.secrets["token_alice"]))
        c.get("/v1/workspace/usage", headers=bearer(a.secrets["key_root"] + "x"))
        c.get(
            f"/v2/quota-usages/contracts/{a.ids['contract']}?period=week",
            headers=basic("x@y.z", a.secrets["member_alice"]),
        )
    for secret in (a.secrets["token_alice"], a.secrets["key_root"], a.secrets["member_alice"]):
        assert secret not in caplog.text


def test_unknown_route_and_method_shapes(env: Env) -> None:
    c = env.app_client
    r = c.get("/api/v1/workspaces/x")
    assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND"
    r = c.delete("/api/v1/usage/")
    assert r.status_code == 405 and "detail" in r.json()
    assert c.get("/openapi.json").status_code == 200
