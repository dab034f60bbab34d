"""Deterministic synthetic traffic: a world of tenants and their entities, and realistic usage.

Pure: no I/O, no clock, no global random state. The same seed gives the same world, and the same
world, window and ``random.Random`` seed give the same events with the same ids, so a load run
can be replayed exactly (the pipeline then counts nothing twice).

The world covers every documented API (``shared/seeds``):

- 000 workspace stats: workspaces with tiers, virtual keys (some revoked, extra ones purchased),
  agents (some inactive), members (some inactive or gone), AI-gateway requests, access tokens;
- 001 quota usages: contracts with workspaces, members with member-scoped API keys, CI steps
  reporting CPU and memory every ~10 s while they run;
- 002 workstation usage: workstations with rate cards reporting CPU, GPU and memory;
- 003 workspace usage: workspace-scoped ``fl_test_`` API keys, renders, AI tasks, egress;
- 004 row usage: workspace trees (parents and subtrees), datastreams whose runs report rows with
  ``row_keys`` drawn from a per-datastream pool, so rows repeat across runs and days.

Credentials in a synthetic world are derived from the seed (tests and demos need to know them):
they are ``fl_test_``/``mt_at_`` secrets for test deployments, never for real tenants.
"""

from __future__ import annotations

import base64
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from query_api.credentials import TEST_PREFIX, TOKEN_PREFIX, display_prefix, hash_secret

TIERS = ("free", "pro", "team", "enterprise")
TASK_TYPES = ("remove-background", "gaze-redirect", "super-resolution", "transcribe")
MODELS = ("gpt-4o", "claude-sonnet-4", "llama-3.1-70b", "mistral-large")
TICK_MS = 10_000  # CI steps report every ~10 s; everything is simulated on this tick
WORKSTATION_REPORT_TICKS = 6  # workstation agents report once a minute
DATASTREAM_RUN_TICKS = 360  # datastreams run hourly

# ---- the world --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workspace:
    id: str
    name: str
    tier: str
    parent_id: str | None
    billing_anchor_day: int
    contract_id: str | None = None
    upgraded_tier: str | None = None  # set: a workspace.updated event changes the tier


@dataclass(frozen=True)
class Contract:
    id: str
    name: str
    workspace_ids: tuple[str, ...]


@dataclass(frozen=True)
class Member:
    workspace_id: str
    member_id: str
    email: str
    status: str  # active | inactive | left


@dataclass(frozen=True)
class VirtualKey:
    id: str
    workspace_id: str
    revoked: bool


@dataclass(frozen=True)
class Agent:
    id: str
    workspace_id: str
    active: bool


@dataclass(frozen=True)
class Workstation:
    id: str
    name: str
    usd_per_cpu_hour: float
    usd_per_gpu_hour: float
    usd_per_gb_hour: float
    cores: int
    gpus: int
    memory_gb: float


@dataclass(frozen=True)
class Datastream:
    id: str
    workspace_id: str
    name: str
    row_pool: int  # distinct rows the source holds: runs re-read many of them


@dataclass(frozen=True)
class ApiKey:
    id: str
    raw: str  # derived from the seed: synthetic test worlds only
    scope: str  # workspace | member
    workspace_id: str
    member_id: str | None = None
    email: str | None = None


@dataclass(frozen=True)
class AccessToken:
    id: str
    raw: str
    member_id: str
    email: str
    expires_at: datetime


@dataclass(frozen=True)
class TenantWorld:
    id: str
    workspaces: tuple[Workspace, ...]
    contracts: tuple[Contract, ...]
    members: tuple[Member, ...]
    virtual_keys: tuple[VirtualKey, ...]
    extra_vks: tuple[tuple[str, int], ...]  # (workspace_id, count) purchases
    agents: tuple[Agent, ...]
    workstations: tuple[Workstation, ...]
    datastreams: tuple[Datastream, ...]
    api_keys: tuple[ApiKey, ...]
    access_tokens: tuple[AccessToken, ...]

    def workspace(self, workspace_id: str) -> Workspace:
        return next(w for w in self.workspaces if w.id == workspace_id)

    def subtree(self, workspace_id: str) -> set[str]:
        """``workspace_id`` and every workspace below it."""
        out = {workspace_id}
        changed = True
        while changed:
            below = {w.id for w in self.workspaces if w.parent_id in out}
            changed = not below <= out
            out |= below
        return out


@dataclass(frozen=True)
class World:
    seed: int
    created_at: datetime  # lifecycle events are stamped from here on, 1 ms apart
    tenants: tuple[TenantWorld, ...] = field(default_factory=tuple)

    @classmethod
    def generate(cls, seed: int = 0, tenants: int = 3, *, created_at: datetime | None = None) -> World:
        rng = random.Random(seed)
        at = created_at or datetime(2026, 1, 1, tzinfo=UTC)
        return cls(
            seed=seed,
            created_at=at,
            tenants=tuple(_tenant(rng, f"synth-{seed}-{i:03d}", at) for i in range(tenants)),
        )

    def tenant(self, tenant_id: str) -> TenantWorld:
        return next(t for t in self.tenants if t.id == tenant_id)


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _secret(rng: random.Random, prefix: str, nbytes: int) -> str:
    return prefix + base64.urlsafe_b64encode(rng.randbytes(nbytes)).rstrip(b"=").decode()


def _tenant(rng: random.Random, tenant_id: str, created_at: datetime) -> TenantWorld:
    domain = f"{tenant_id}.example.com"
    workspaces: list[Workspace] = []

    def add_workspace(parent: Workspace | None, depth: int) -> None:
        tier = rng.choice(TIERS) if parent is None else rng.choice(TIERS[: TIERS.index(parent.tier) + 1])
        ws = Workspace(
            id=_uuid(rng),
            name=f"{'team' if parent else 'org'}-{len(workspaces):02d}",
            tier=tier,
            parent_id=parent.id if parent else None,
            billing_anchor_day=rng.randint(1, 28),
            upgraded_tier=rng.choice(TIERS[1:]) if rng.random() < 0.15 else None,
        )
        workspaces.append(ws)
        if depth < 2:
            for _ in range(rng.randint(0, 3 - depth)):
                add_workspace(ws, depth + 1)

    for _ in range(rng.randint(1, 2)):
        add_workspace(None, 0)

    # Contracts own disjoint sets of workspaces (a workspace has one contract); CI runs there.
    contracts: list[Contract] = []
    unassigned = [w.id for w in workspaces]
    rng.shuffle(unassigned)
    for n in range(rng.randint(1, 2)):
        take = unassigned[: max(1, len(unassigned) // 2)]
        unassigned = unassigned[len(take) :]
        if take:
            contracts.append(Contract(id=_uuid(rng), name=f"contract-{n}", workspace_ids=tuple(take)))
    contract_of = {ws: c.id for c in contracts for ws in c.workspace_ids}
    workspaces = [replace(w, contract_id=contract_of.get(w.id)) for w in workspaces]

    people = [(_uuid(rng), f"user{n}@{domain}") for n in range(rng.randint(3, 10))]
    members: list[Member] = []
    for ws in workspaces:
        for member_id, email in rng.sample(people, k=rng.randint(2, min(6, len(people)))):
            r = rng.random()
            status = "left" if r < 0.08 else "inactive" if r < 0.2 else "active"
            members.append(Member(ws.id, member_id, email, status))

    vks = [
        VirtualKey(_uuid(rng), ws.id, revoked=rng.random() < 0.2)
        for ws in workspaces
        for _ in range(rng.randint(1, 5))
    ]
    extra_vks = tuple((ws.id, rng.randint(1, 5)) for ws in workspaces if rng.random() < 0.3)
    agents = [
        Agent(_uuid(rng), ws.id, active=rng.random() < 0.8)
        for ws in workspaces
        for _ in range(rng.randint(0, 4))
    ]
    workstations = []
    for n in range(rng.randint(2, 5)):
        gpus = rng.choice((0, 0, 1, 2, 4))
        workstations.append(
            Workstation(
                id=f"ws-{_uuid(rng)[:13]}",
                name=f"workstation-{n}",
                usd_per_cpu_hour=round(rng.uniform(0.02, 0.12), 4),
                usd_per_gpu_hour=round(rng.uniform(0.5, 3.0), 4) if gpus else 0.0,
                usd_per_gb_hour=round(rng.uniform(0.002, 0.01), 5),
                cores=rng.choice((2, 4, 8, 16)),
                gpus=gpus,
                memory_gb=float(rng.choice((8, 16, 32, 64))),
            )
        )
    datastreams = [
        Datastream(_uuid(rng), ws.id, f"datastream-{n}", row_pool=rng.choice((200, 1000, 5000)))
        for ws in workspaces
        for n in range(rng.randint(0, 3))
    ]

    api_keys = [
        ApiKey(f"key-{_uuid(rng)}", _secret(rng, TEST_PREFIX, 24), "workspace", ws.id)
        for ws in workspaces
        if ws.parent_id is None
    ]
    for m in members:
        if m.status == "active" and contract_of.get(m.workspace_id) and rng.random() < 0.5:
            api_keys.append(
                ApiKey(
                    f"key-{_uuid(rng)}",
                    _secret(rng, TEST_PREFIX, 24),
                    "member",
                    m.workspace_id,
                    m.member_id,
                    m.email,
                )
            )
    seen_people: set[str] = set()
    tokens = []
    for m in members:
        if m.status == "active" and m.member_id not in seen_people:
            seen_people.add(m.member_id)
            tokens.append(
                AccessToken(
                    f"tok-{_uuid(rng)}",
                    _secret(rng, TOKEN_PREFIX, 32),
                    m.member_id,
                    m.email,
                    created_at + timedelta(days=365),
                )
            )
    return TenantWorld(
        id=tenant_id,
        workspaces=tuple(workspaces),
        contracts=tuple(contracts),
        members=tuple(members),
        virtual_keys=tuple(vks),
        extra_vks=extra_vks,
        agents=tuple(agents),
        workstations=tuple(workstations),
        datastreams=tuple(datastreams),
        api_keys=tuple(api_keys),
        access_tokens=tuple(tokens),
    )


# ---- lifecycle events -------------------------------------------------------------------------


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _LifecycleWriter:
    """Appends one tenant's lifecycle events, 1 ms apart, with ids stable for the seed."""

    def __init__(self, world: World, tenant: str, out: list[dict[str, Any]]) -> None:
        self.world, self.tenant, self.out, self.seq = world, tenant, out, 0

    def __call__(self, type_: str, subject: str, data: dict[str, Any]) -> None:
        self.out.append(
            {
                "specversion": "1.0",
                "id": f"lc-{self.world.seed}-{self.tenant}-{self.seq:05d}",
                "source": "synth://admin",
                "type": type_,
                "subject": subject,
                "time": _iso(self.world.created_at + timedelta(milliseconds=self.seq)),
                "tenant": self.tenant,
                "data": data,
            }
        )
        self.seq += 1


def world_lifecycle_events(world: World) -> list[dict[str, Any]]:
    """Every lifecycle event of the world, per tenant in causal order (parents before children,
    an entity's creation before its changes), each 1 ms after the previous one of its tenant:
    the projection folds in event-time order, so the times carry the order."""
    out: list[dict[str, Any]] = []
    for t in world.tenants:
        ev = _LifecycleWriter(world, t.id, out)
        for w in t.workspaces:  # generated depth-first: a parent always precedes its children
            data: dict[str, Any] = {
                "workspace_id": w.id,
                "name": w.name,
                "tier": w.tier,
                "billing_anchor_day": w.billing_anchor_day,
            }
            if w.parent_id:
                data["parent_id"] = w.parent_id
            ev("workspace.created", w.id, data)
        for c in t.contracts:
            ev("contract.created", c.id, {"contract_id": c.id, "name": c.name})
            for ws_id in c.workspace_ids:
                ev("contract.workspace_added", ws_id, {"contract_id": c.id, "workspace_id": ws_id})
        for w in t.workspaces:
            if w.upgraded_tier:
                ev("workspace.updated", w.id, {"workspace_id": w.id, "tier": w.upgraded_tier})
        for m in t.members:
            subject = f"{m.workspace_id}/{m.member_id}"
            ids = {"workspace_id": m.workspace_id, "member_id": m.member_id}
            ev("member.joined", subject, {**ids, "email": m.email})
            if m.status == "inactive":
                ev("member.deactivated", subject, ids)
            elif m.status == "left":
                ev("member.left", subject, ids)
        for vk in t.virtual_keys:
            ids = {"workspace_id": vk.workspace_id, "virtual_key_id": vk.id}
            ev("virtual_key.created", vk.id, ids)
            if vk.revoked:
                ev("virtual_key.revoked", vk.id, ids)
        for ws_id, count in t.extra_vks:
            ev("virtual_key.extra_purchased", ws_id, {"workspace_id": ws_id, "count": count})
        for a in t.agents:
            ids = {"workspace_id": a.workspace_id, "agent_id": a.id}
            ev("agent.created", a.id, ids)
            if not a.active:
                ev("agent.deactivated", a.id, ids)
        for s in t.workstations:
            ev(
                "workstation.created",
                s.id,
                {
                    "workstation_id": s.id,
                    "name": s.name,
                    "usd_per_cpu_hour": s.usd_per_cpu_hour,
                    "usd_per_gpu_hour": s.usd_per_gpu_hour,
                    "usd_per_gb_hour": s.usd_per_gb_hour,
                },
            )
        for d in t.datastreams:
            ev(
                "datastream.created",
                d.id,
                {"datastream_id": d.id, "workspace_id": d.workspace_id, "name": d.name},
            )
        for k in t.api_keys:
            key_data: dict[str, Any] = {
                "key_id": k.id,
                "key_hash": hash_secret(k.raw),
                "prefix": display_prefix(k.raw),
                "scope": k.scope,
                "workspace_id": k.workspace_id,
            }
            if k.scope == "member":
                key_data |= {"member_id": k.member_id, "email": k.email}
            ev("api_key.created", k.id, key_data)
        for tok in t.access_tokens:
            ev(
                "access_token.issued",
                tok.id,
                {
                    "token_id": tok.id,
                    "token_hash": hash_secret(tok.raw),
                    "member_id": tok.member_id,
                    "email": tok.email,
                    "expires_at": _iso(tok.expires_at),
                },
            )
    return out


# ---- usage events -----------------------------------------------------------------------------


@dataclass
class _Step:
    id: str
    contract_id: str
    workspace_id: str
    ends_at_tick: int
    phase_ms: int
    cores: float
    memory_mib: float


@dataclass
class _TenantSim:
    tenant: TenantWorld
    ci_workspaces: list[Workspace]
    active_vks: list[VirtualKey]
    steps: list[_Step] = field(default_factory=list)
    stations_on: dict[str, bool] = field(default_factory=dict)
    station_phase: dict[str, int] = field(default_factory=dict)
    ds_phase: dict[str, int] = field(default_factory=dict)


class _Clock:
    """Epoch milliseconds to ISO-8601 strings, formatting each second only once."""

    def __init__(self) -> None:
        self._cache: dict[int, str] = {}

    def iso(self, ms: int) -> str:
        sec, milli = divmod(ms, 1000)
        prefix = self._cache.get(sec)
        if prefix is None:
            if len(self._cache) > 256:
                self._cache.clear()
            prefix = self._cache[sec] = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{prefix}.{milli:03d}Z"


def usage_events(
    world: World, start: datetime, end: datetime, rng: random.Random
) -> Iterator[dict[str, Any]]:
    """Usage of every usage event type for every tenant between ``start`` and ``end``, in event
    time order (ties in generation order), lazily. Deterministic for ``world``, the window and
    the state of ``rng``; ids are unique within a run and differ between rng seeds.

    Simulated on a 10 s tick: CI steps start at random, run 30 s to 20 min and report CPU and
    memory every tick; workstations switch on and off and report CPU, GPU and memory every
    minute while on; renders, AI tasks, egress and gateway requests arrive at random; each
    datastream runs hourly and reads rows from its pool, so row keys repeat across runs and days.
    """
    run = f"{rng.getrandbits(40):010x}"
    counter = 0
    clock = _Clock()
    start_ms = int(start.timestamp() * 1000)
    end_ms = int(end.timestamp() * 1000)
    sims = []
    for t in world.tenants:
        sim = _TenantSim(
            tenant=t,
            ci_workspaces=[w for w in t.workspaces if w.contract_id],
            active_vks=[vk for vk in t.virtual_keys if not vk.revoked],
        )
        for s in t.workstations:
            sim.stations_on[s.id] = rng.random() < 0.6
            sim.station_phase[s.id] = rng.randrange(WORKSTATION_REPORT_TICKS)
        for d in t.datastreams:
            sim.ds_phase[d.id] = rng.randrange(DATASTREAM_RUN_TICKS)
        sims.append(sim)

    rand = rng.random
    randint = rng.randint
    tick = 0
    tick_ms = start_ms
    out: list[tuple[int, dict[str, Any]]] = []

    def emit(ms: int, type_: str, source: str, subject: str, tenant: str, data: dict[str, Any]) -> None:
        nonlocal counter
        counter += 1
        out.append(
            (
                ms,
                {
                    "specversion": "1.0",
                    "id": f"u-{run}-{counter:x}",
                    "source": source,
                    "type": type_,
                    "subject": subject,
                    "time": clock.iso(ms),
                    "tenant": tenant,
                    "data": data,
                },
            )
        )

    while tick_ms < end_ms:
        span = min(TICK_MS, end_ms - tick_ms)
        for sim in sims:
            tid = sim.tenant.id
            # -- CI steps (document 001)
            for ws in sim.ci_workspaces:
                if rand() < 0.03:
                    sim.steps.append(
                        _Step(
                            id=f"step-{run}-{counter:x}-{randint(0, 1 << 30):x}",
                            contract_id=ws.contract_id or "",
                            workspace_id=ws.id,
                            ends_at_tick=tick + randint(3, 120),
                            phase_ms=randint(0, TICK_MS - 1),
                            cores=rng.choice((0.25, 0.5, 1.0, 2.0, 4.0)),
                            memory_mib=float(rng.choice((256, 512, 1024, 2048, 4096, 8192))),
                        )
                    )
            still: list[_Step] = []
            for st in sim.steps:
                if st.phase_ms < span:
                    ms = tick_ms + st.phase_ms
                    ids = {"contract_id": st.contract_id, "workspace_id": st.workspace_id, "step_id": st.id}
                    cpu = round(st.cores * 10 * (0.3 + 0.7 * rand()), 3)
                    emit(ms, "ci.step.cpu", "synth://ci-runner", st.id, tid, {**ids, "cpu_seconds": cpu})
                    mem = round(st.memory_mib * (0.5 + 0.5 * rand()), 1)
                    emit(ms, "ci.step.memory", "synth://ci-runner", st.id, tid, {**ids, "memory_mib": mem})
                if tick < st.ends_at_tick:
                    still.append(st)
            sim.steps = still
            # -- workstations (document 002)
            for s in sim.tenant.workstations:
                if rand() < 0.002:
                    sim.stations_on[s.id] = not sim.stations_on[s.id]
                if not sim.stations_on[s.id] or (tick + sim.station_phase[s.id]) % WORKSTATION_REPORT_TICKS:
                    continue
                ms = tick_ms + randint(0, span - 1)
                wid = s.id
                load = 0.1 + 0.9 * rand()
                emit(
                    ms,
                    "workstation.cpu",
                    "synth://ws-agent",
                    wid,
                    tid,
                    {"workstation_id": wid, "cpu_seconds": round(60 * s.cores * load, 3)},
                )
                if s.gpus:
                    gpu = round(60 * s.gpus * rand(), 3)
                    emit(
                        ms,
                        "workstation.gpu",
                        "synth://ws-agent",
                        wid,
                        tid,
                        {"workstation_id": wid, "gpu_seconds": gpu},
                    )
                mem_gb = round(s.memory_gb * (0.2 + 0.7 * load), 3)
                emit(
                    ms,
                    "workstation.memory",
                    "synth://ws-agent",
                    wid,
                    tid,
                    {"workstation_id": wid, "memory_gb": mem_gb},
                )
            # -- media: renders, AI tasks, egress (document 003)
            for ws in sim.tenant.workspaces:
                wsid = ws.id
                if rand() < 0.01:
                    rid = f"render-{run}-{counter:x}"
                    data = {
                        "workspace_id": wsid,
                        "render_id": rid,
                        "output_duration_seconds": round(5 + 595 * rand(), 2),
                    }
                    emit(
                        tick_ms + randint(0, span - 1), "render.completed", "synth://renderer", rid, tid, data
                    )
                if rand() < 0.05:
                    task = f"task-{run}-{counter:x}"
                    data = {"workspace_id": wsid, "task_id": task, "task_type": TASK_TYPES[randint(0, 3)]}
                    emit(
                        tick_ms + randint(0, span - 1), "ai.task.submitted", "synth://tasks", task, tid, data
                    )
                if rand() < 0.02:
                    art = f"artifact-{run}-{counter:x}"
                    data = {"workspace_id": wsid, "artifact_id": art, "bytes": int(10 ** (5 + 4.7 * rand()))}
                    emit(tick_ms + randint(0, span - 1), "egress.download", "synth://cdn", art, tid, data)
            # -- datastreams (document 004): hourly runs over a pool of rows
            for d in sim.tenant.datastreams:
                if (tick + sim.ds_phase[d.id]) % DATASTREAM_RUN_TICKS:
                    continue
                for _ in range(randint(1, 3)):
                    n = randint(20, min(400, d.row_pool))
                    keys = [f"{d.id[:8]}-r{randint(0, d.row_pool - 1)}" for _ in range(n)]
                    data = {
                        "workspace_id": d.workspace_id,
                        "datastream_id": d.id,
                        "total_rows": n + randint(0, n // 4),
                        "row_keys": keys,
                    }
                    emit(
                        tick_ms + randint(0, span - 1),
                        "datastream.rows",
                        "synth://connector",
                        d.workspace_id,
                        tid,
                        data,
                    )
            if sim.tenant.datastreams and rand() < 0.002:  # an ad-hoc import, not attributable
                ws_id = sim.tenant.datastreams[0].workspace_id
                keys = [f"adhoc-r{randint(0, 99)}" for _ in range(randint(1, 50))]
                data = {
                    "workspace_id": ws_id,
                    "datastream_id": None,
                    "total_rows": len(keys),
                    "row_keys": keys,
                }
                emit(tick_ms + randint(0, span - 1), "datastream.rows", "synth://import", ws_id, tid, data)
            # -- AI-gateway request logs (document 000)
            for vk in sim.active_vks:
                while rand() < 0.5:
                    req = f"req-{run}-{counter:x}"
                    r = rand()
                    data = {
                        "workspace_id": vk.workspace_id,
                        "virtual_key_id": vk.id,
                        "request_id": req,
                        "model": MODELS[randint(0, 3)],
                        "status_code": 200 if r < 0.95 else 429 if r < 0.98 else 500,
                    }
                    emit(
                        tick_ms + randint(0, span - 1),
                        "gateway.request",
                        "synth://gateway",
                        vk.workspace_id,
                        tid,
                        data,
                    )
        out.sort(key=_first)
        for _, event in out:
            yield event
        out.clear()
        tick += 1
        tick_ms += TICK_MS


def _first(item: tuple[int, dict[str, Any]]) -> int:
    return item[0]
