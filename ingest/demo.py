"""``metering demo``: load a realistic demo world into a running system through the real ingest
path (the producer SDK into Kafka), wait until it is visible, and print ready-made requests.

Several tenants, each with every document's world (workspace trees with tiers, contracts,
members, virtual keys, agents, workstations, datastreams, API keys, access tokens), and weeks of
usage: ``--days`` days with ``--minutes-per-day`` minutes of traffic each, plus the last hour.
Credentials are derived from the seed (``fl_test_`` keys): for local deployments only.
"""

from __future__ import annotations

import base64
import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import httpx
import orjson
import typer
from rich.console import Console

from deploy.settings import CommonSettings
from ingest.sdk import prepare_event
from ingest.synth import TenantWorld, World, usage_events, world_lifecycle_events
from schemas.events import Plane
from schemas.validation import kafka_time, now_ms

err = Console(stderr=True)


def _usage(world: World, now: datetime, days: int, minutes: int, seed: int) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    for d in range(days, 0, -1):
        start = (now - timedelta(days=d)).replace(hour=12, minute=0, second=0, microsecond=0)
        yield from usage_events(world, start, start + timedelta(minutes=minutes), rng)
    yield from usage_events(world, now - timedelta(hours=1), now - timedelta(seconds=5), rng)


def _member_key(t: TenantWorld) -> tuple[Any, str, str]:
    """A member-scoped key whose member is active in a workspace that belongs to a contract."""
    for key in t.api_keys:
        if key.scope != "member":
            continue
        for m in t.members:
            if m.member_id == key.member_id and m.status == "active":
                ws = t.workspace(m.workspace_id)
                if ws.contract_id:
                    return key, ws.contract_id, ws.id
    raise RuntimeError(f"tenant {t.id} has no member key inside a contract")


def _token_workspace(t: TenantWorld) -> tuple[Any, str]:
    for token in t.access_tokens:
        if token.expires_at <= datetime.now(UTC):
            continue
        for m in t.members:
            if m.member_id == token.member_id and m.status == "active":
                return token, m.workspace_id
    raise RuntimeError(f"tenant {t.id} has no active member with a valid token")


def build_requests(world: World, base_url: str, now: datetime) -> dict[str, dict[str, Any]]:
    """For each documented endpoint: an authorized request for one of tenant 0's resources, and
    the URL of tenant 1's resource of the same kind (which that credential must not see)."""
    mine, other = world.tenants[0], world.tenants[1]
    token, token_ws = _token_workspace(mine)
    mkey, contract, contract_ws = _member_key(mine)
    _okey, other_contract, other_contract_ws = _member_key(other)
    ws_key = next(
        k
        for k in mine.api_keys
        if k.scope == "workspace" and mine.workspace(k.workspace_id).parent_id is None
    )
    basic = base64.b64encode(f"{mkey.email}:{mkey.raw}".encode()).decode()
    month = now.strftime("%Y-%m")
    since = (now - timedelta(days=28)).date().isoformat()
    bearer = {"Authorization": f"Bearer {token.raw}"}
    return {
        "000": {
            "method": "GET",
            "url": f"{base_url}/api/v1/workspaces/{token_ws}/stats",
            "headers": bearer,
            "foreign_url": f"{base_url}/api/v1/workspaces/{other.workspaces[0].id}/stats",
        },
        "001-contract": {
            "method": "GET",
            "url": f"{base_url}/v2/quota-usages/contracts/{contract}?period={month}",
            "headers": {"Authorization": f"Basic {basic}"},
            "foreign_url": f"{base_url}/v2/quota-usages/contracts/{other_contract}?period={month}",
        },
        "001-workspace": {
            "method": "GET",
            "url": f"{base_url}/v2/quota-usages/workspaces/{contract_ws}?period={month}",
            "headers": {"Authorization": f"Basic {basic}"},
            "foreign_url": f"{base_url}/v2/quota-usages/workspaces/{other_contract_ws}?period={month}",
        },
        "002": {
            "method": "GET",
            "url": f"{base_url}/v1/workstations/{mine.workstations[0].id}/usage",
            "headers": bearer,
            "foreign_url": f"{base_url}/v1/workstations/{other.workstations[0].id}/usage",
        },
        "003": {
            "method": "GET",
            "url": f"{base_url}/v1/workspace/usage",
            "headers": {"Authorization": f"Bearer {ws_key.raw}"},
            # The path names no workspace (it is the key's): the foreign id can only be offered as
            # a parameter, which the endpoint ignores.
            "foreign_url": f"{base_url}/v1/workspace/usage?workspace_id={other.workspaces[0].id}",
        },
        "004": {
            "method": "GET",
            "url": f"{base_url}/api/v1/usage/?granularity=daily&date_from={since}",
            "headers": {"Authorization": f"Token {ws_key.raw}"},
            "foreign_url": f"{base_url}/api/v1/usage/?granularity=daily&date_from={since}"
            f"&workspace_id={other.workspaces[0].id}",
        },
    }


def _visible(requests: dict[str, dict[str, Any]], sent_at: datetime) -> bool:
    """Every request answers 200 with data refreshed after the last event was sent."""
    with httpx.Client(timeout=10) as http:
        for req in requests.values():
            r = http.request(req["method"], req["url"], headers=req["headers"])
            if r.status_code != 200:
                return False
            fresh = r.headers.get("x-data-refreshed-at")
            if fresh and datetime.fromisoformat(fresh.replace("Z", "+00:00")) < sent_at - timedelta(
                seconds=2
            ):
                return False
    return True


def demo(
    json_output: Annotated[
        bool, typer.Option("--json", metavar="", help="Print one JSON object with the requests.")
    ] = False,
    tenants: Annotated[int, typer.Option(min=2, help="Tenants in the demo world.")] = 3,
    days: Annotated[
        int, typer.Option(min=1, max=34, help="Days of usage history (plus the last hour).")
    ] = 21,
    minutes_per_day: Annotated[int, typer.Option(min=1, max=1440, help="Minutes of traffic per day.")] = 30,
    seed: Annotated[
        int,
        typer.Option(
            help="Seed of the demo world. Same seed, same event ids: the pipeline counts an id once "
            "per tenant, so a second run with the same seed adds no usage (use another seed)."
        ),
    ] = 42,
    base_url: Annotated[
        str,
        typer.Option(
            help="Where the HTTP API of the running system listens "
            "(default: http://$METERING_HTTP_HOST:$METERING_HTTP_PORT, i.e. http://127.0.0.1:8080)."
        ),
    ] = "",
    wait_s: Annotated[
        float,
        typer.Option(min=0, help="Seconds to wait for the data to be visible before giving up (exit 1)."),
    ] = 300.0,
) -> None:
    """Load a demo world through the real ingest path into a running system (`make run`), wait
    until it is visible, and print an authorized request per documented endpoint plus the URL of
    another tenant's resource of the same kind."""
    from ingest.cli import _send  # the CLI's batching sender (SDK, progress bar)

    settings = CommonSettings()
    if not base_url:
        from deploy.settings import HttpSettings

        http = HttpSettings()
        base_url = f"http://{http.http_host}:{http.http_port}"
    judged_at_ms = now_ms()
    now = kafka_time(judged_at_ms)
    world = World.generate(seed, tenants, created_at=now - timedelta(days=days + 1))
    control: dict[str, list[dict[str, Any]]] = {}
    for event in world_lifecycle_events(world):
        control.setdefault(event["tenant"], []).append(
            prepare_event(event, event["tenant"], received_at=now, plane=Plane.CONTROL)
        )
    usage: dict[str, list[dict[str, Any]]] = {}
    for event in _usage(world, now, days, minutes_per_day, seed):
        usage.setdefault(event["tenant"], []).append(prepare_event(event, event["tenant"], received_at=now))
    total = sum(len(v) for v in control.values()) + sum(len(v) for v in usage.values())
    err.print(f"sending {total:,} events for {tenants} tenants ({days} days of history)…")
    # lifecycle (control topic) first, so entities exist before their usage is queried
    failed = _send(settings, control, False, judged_at_ms, Plane.CONTROL)
    failed += _send(settings, usage, False, judged_at_ms)
    if failed:
        err.print(f"[red]{len(failed)} events were not delivered[/red]")
        raise typer.Exit(1)
    sent_at = datetime.now(UTC)
    requests = build_requests(world, base_url, now)
    err.print("waiting until the data is visible…")
    deadline = time.monotonic() + wait_s
    while not _visible(requests, sent_at):
        if time.monotonic() > deadline:
            err.print(f"[red]not visible after {wait_s:.0f} s: is `make run` running at {base_url}?[/red]")
            raise typer.Exit(1)
        time.sleep(1.0)
    result = {"base_url": base_url, "requests": requests}
    if json_output:
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
        return
    for name, req in requests.items():
        headers = " ".join(f"-H '{k}: {v}'" for k, v in req["headers"].items())
        print(f"# {name}\ncurl -s {headers} '{req['url']}'\n#   another tenant's: {req['foreign_url']}\n")
