"""Command-line producers: ``metering emit``, ``metering load``, ``metering demo`` and
``metering admin …`` (entities created and changed by *emitting lifecycle events*).

The top-level ``metering`` app registers these (``deploy/cli.py``)::

    app.command()(emit); app.command()(load); app.command()(demo)
    app.add_typer(admin_app, name="admin")

Every command validates its events before connecting, so bad input fails fast without a broker,
then sends through the SDK and waits for Kafka's acknowledgement (``acks=all``) before it says
"delivered" or prints an id. Delivered is not yet applied: the aggregator counts (or applies)
what Kafka holds a moment later, and counts an event id once per tenant, so an id sent again is
delivered and then dropped as a duplicate. Kafka is ``KAFKA_BOOTSTRAP_SERVERS`` or the local
broker on ``127.0.0.1:$METERING_KAFKA_PORT``; these commands never start a broker.

``metering admin`` also reads the running system's admin API (``ingest/admin_client.py``): to
check what a command names before anything is sent (``ingest/admin_checks.py``; ``--force``
skips that), to wait until the aggregator has applied what it sent (``--wait``), and to list
entities (``ingest/admin_list.py``). Its exit codes: 0 done; 1 invalid, refused by a check, or
not delivered (nothing applied); 2 no Kafka; 3 delivered, but not seen applied within
``--wait-timeout``; 4 the admin API could not be asked (nothing sent).
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import orjson
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from deploy.settings import AdminCliSettings, CommonSettings
from ingest.admin_checks import Checks, Refused
from ingest.admin_client import AdminApiError, AdminClient, base_url, expectations, wait_applied
from ingest.admin_list import add_list_commands
from ingest.kafka_config import KafkaUnavailable, check_reachable, ensure_topics, resolve_bootstrap
from ingest.sdk import DeliveryError, InvalidEvent, UsageProducer, format_time, new_event, prepare_event
from ingest.synth import World, usage_events, world_lifecycle_events
from query_api.admin_reader import AdminKind
from query_api.credentials import display_prefix, hash_secret, new_access_token, new_api_key
from schemas.events import LIFECYCLE_KIND, EntityKind, EventType, Plane, membership_id
from schemas.validation import RejectCode, kafka_time, now_ms

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)

ADMIN_SOURCE = "metering-cli/admin"


# ---- shared plumbing --------------------------------------------------------------------------


def _connect(settings: CommonSettings, **producer_kwargs: Any) -> UsageProducer:
    """A producer on the configured cluster or the local broker, topics ensured; exit 2 with a
    clear message when no broker answers."""
    bootstrap = resolve_bootstrap(settings)
    try:
        check_reachable(settings, bootstrap, timeout_s=5.0)
        ensure_topics(settings, bootstrap)
    except KafkaUnavailable as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    return UsageProducer(bootstrap, settings=settings, **producer_kwargs)


def _send(
    settings: CommonSettings,
    by_tenant: Mapping[str, list[dict[str, Any]]],
    backfill: bool,
    judged_at_ms: int,
    plane: Plane = Plane.USAGE,
) -> list[str]:
    """Send events prepared (judged) at ``judged_at_ms`` per tenant, waiting for acks; return the
    ids that failed. Lifecycle events (``Plane.CONTROL``) go to the control topic."""
    failed: list[str] = []
    producer = _connect(settings, plane=plane)
    try:
        for tenant, events in by_tenant.items():
            try:
                producer.send_batch(
                    events, tenant, backfill=backfill, validated=True, judged_at_ms=judged_at_ms
                )
            except DeliveryError as exc:
                err.print(f"[red]error:[/red] {exc}")
                failed.extend(exc.failed_ids or [str(e["id"]) for e in events])
    finally:
        try:
            producer.close(timeout=10)
        except DeliveryError as exc:  # already reported per batch
            failed.extend(i for i in exc.failed_ids if i not in failed)
    return failed


def _read_events(file: str) -> Iterator[tuple[str, Any]]:
    """(label, parsed JSON or an error string) per event of a .json (object or array) or .jsonl
    file, or of stdin for ``-`` (either form)."""
    text = sys.stdin.read() if file == "-" else Path(file).read_text()
    if not file.endswith(".jsonl"):
        try:
            parsed = json.loads(text)
        except ValueError:
            if file != "-":
                raise typer.BadParameter(f"{file} is not JSON (use .jsonl for one event per line)") from None
        else:
            items = parsed if isinstance(parsed, list) else [parsed]
            for n, item in enumerate(items):
                yield f"#{n}", item
            return
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {n}", json.loads(line)
        except ValueError as exc:
            yield f"line {n}", f"invalid JSON: {exc}"


# ---- metering emit ----------------------------------------------------------------------------


def emit(
    type_: Annotated[str | None, typer.Option("--type", help="Event type, e.g. ci.step.cpu.")] = None,
    tenant: Annotated[
        str | None,
        typer.Option(
            help='Tenant of the event(s). Without it, each event of --file names its own ("tenant"); '
            "with it, an event naming another tenant is rejected."
        ),
    ] = None,
    data: Annotated[str | None, typer.Option(help="The event's data as a JSON object.")] = None,
    subject: Annotated[
        str | None,
        typer.Option(help="Subject (default: the data's id field of the type, e.g. workstation_id)."),
    ] = None,
    time_: Annotated[
        str | None,
        typer.Option(
            "--time", help="Event time, RFC 3339 with a zone, e.g. 2026-11-22T10:00:00Z (default: now)."
        ),
    ] = None,
    id_: Annotated[
        str | None,
        typer.Option(
            "--id",
            help="Event id (default: a new UUID). The pipeline counts an id once per tenant: give the same "
            "id when retrying the same usage, a new one for new usage.",
        ),
    ] = None,
    source: Annotated[str, typer.Option(help="CloudEvents source.")] = "metering-cli",
    file: Annotated[
        str | None, typer.Option("--file", "-f", help="Events from a .json/.jsonl file, or - for stdin.")
    ] = None,
    backfill: Annotated[
        bool, typer.Option("--backfill", metavar="", help="Allow events older than 35 days.")
    ] = False,
    json_output: Annotated[
        bool, typer.Option("--json", metavar="", help="One JSON result per event (status, code, message).")
    ] = False,
) -> None:
    """Send usage events straight to Kafka: one from options, or many from a file. Prints, per
    event, delivered (Kafka acknowledged it) or rejected (invalid: not sent) or failed (not
    acknowledged); exits 1 if any was not delivered. Delivered is not counted yet: the pipeline
    counts each event id once per tenant, so an id it has seen before is delivered and then
    dropped as a duplicate. Lifecycle events are refused here: `metering admin` sends those."""
    if file is not None and (type_ or data):
        raise typer.BadParameter("give either --file or --type/--data, not both")
    raw: list[tuple[str, Any]]
    if file is not None:
        raw = list(_read_events(file))
    else:
        if not type_ or data is None:
            raise typer.BadParameter("--type and --data are required without --file")
        try:
            data_obj = json.loads(data)
        except ValueError as exc:
            raise typer.BadParameter(f"--data is not JSON: {exc}") from None
        if tenant is None:
            raise typer.BadParameter("--tenant is required")
        event = new_event(type_, data_obj, tenant, source, time=time_, id=id_, subject=subject)
        raw = [("#0", event)]

    results: list[dict[str, Any]] = []
    by_tenant: dict[str, list[dict[str, Any]]] = {}
    judged_at_ms = now_ms()
    now = kafka_time(judged_at_ms)
    for label, item in raw:
        result: dict[str, Any] = {"event": label, "id": item.get("id") if isinstance(item, dict) else None}
        results.append(result)
        if isinstance(item, str):
            result.update(status="rejected", code=RejectCode.INVALID_JSON, message=item)
            continue
        owner = tenant or (item.get("tenant") if isinstance(item, dict) else None)
        if not isinstance(owner, str) or not owner:
            result.update(status="rejected", code=RejectCode.MISSING_TENANT, message="give --tenant")
            continue
        try:
            prepared = prepare_event(item, owner, received_at=now, backfill=backfill)
        except InvalidEvent as exc:
            result.update(status="rejected", code=exc.code, message=exc.message)
            continue
        result.update(status="delivered", tenant=owner)  # once Kafka acknowledges it, below
        by_tenant.setdefault(owner, []).append(prepared)

    failed: set[str] = set()
    if by_tenant:
        failed = set(_send(CommonSettings(), by_tenant, backfill, judged_at_ms))
    for result in results:
        if result["status"] == "delivered" and result["id"] in failed:
            result.update(
                status="failed", code="not_delivered", message="Kafka did not acknowledge the event"
            )
        _print_result(result, json_output)
    if any(r["status"] != "delivered" for r in results):
        raise typer.Exit(1)


def _print_result(result: Mapping[str, Any], as_json: bool) -> None:
    if as_json:
        out.print(orjson.dumps(result).decode(), markup=False)
        return
    status = result["status"]
    colour = "green" if status == "delivered" else "red"
    line = f"[{colour}]{status:<9}[/{colour}] {result['event']} {result['id'] or '-'}"
    if status != "delivered":
        line += f"  {result['code']}: {result['message']}"
    out.print(line)


# ---- metering load ----------------------------------------------------------------------------


def load(
    tenants: Annotated[int, typer.Option(min=1, help="Tenants in the synthetic world.")] = 20,
    rate: Annotated[float, typer.Option(min=0, help="Events per second (0: as fast as possible).")] = 5000,
    count: Annotated[
        int | None,
        typer.Option(min=1, help="Stop after this many usage events (default: 100,000 unless --duration)."),
    ] = None,
    duration: Annotated[
        float | None, typer.Option(min=0.1, help="Stop after this many seconds (or --count, if sooner).")
    ] = None,
    seed: Annotated[
        int,
        typer.Option(
            help="Seed of the world and the traffic. Same seed, same event ids: the pipeline counts an "
            "id once per tenant, so running again with the same seed adds no usage (use another seed)."
        ),
    ] = 0,
    window_hours: Annotated[
        float, typer.Option(min=0.01, max=24 * 34, help="Usage is spread over this many past hours.")
    ] = 2.0,
    lifecycle: Annotated[
        bool,
        typer.Option(
            "--lifecycle/--no-lifecycle",
            metavar="",
            help="Send the world's lifecycle events (to the control topic) before its usage.",
        ),
    ] = True,
) -> None:
    """Realistic synthetic traffic of every event type for many tenants (default: 100,000 events)."""
    if count is None and duration is None:
        count = 100_000
    settings = CommonSettings()
    now = datetime.now(UTC)
    window = timedelta(hours=window_hours)
    world = World.generate(seed, tenants, created_at=now - window - timedelta(minutes=1))
    producer = _connect(settings)
    sent: Counter[str] = Counter()
    rejected = 0
    failed = 0
    started = time.monotonic()
    try:
        if lifecycle:
            life = world_lifecycle_events(world)
            by_tenant: dict[str, list[dict[str, Any]]] = {}
            for event in life:
                by_tenant.setdefault(event["tenant"], []).append(event)
            # Lifecycle events are the control plane: they go to the control topic.
            with _connect(settings, plane=Plane.CONTROL) as control:
                for tenant, events in by_tenant.items():
                    control.send_batch(events, tenant)  # entities exist before their usage
            err.print(f"lifecycle: {len(life)} events for {tenants} tenants acknowledged")
        rng = random.Random(seed)
        deadline = started + duration if duration is not None else float("inf")
        total = 0
        progress = Progress(
            SpinnerColumn(),
            TextColumn("usage events"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>8.0f} ev/s"),
            TimeElapsedColumn(),
            console=err,
        )
        with progress:
            task = progress.add_task("load", total=count, rate=0.0)
            t0 = time.monotonic()
            while (count is None or total < count) and time.monotonic() < deadline:
                # One pass over the window; another pass (fresh ids) if more is asked for.
                before = total
                for event in usage_events(world, now - window, now, rng):
                    try:
                        producer.emit(event, event["tenant"])
                        sent[event["type"]] += 1
                    except InvalidEvent:
                        rejected += 1
                    total += 1
                    if total % 500 == 0:
                        elapsed = time.monotonic() - t0
                        if rate > 0 and total / rate > elapsed:
                            time.sleep(total / rate - elapsed)  # pace to --rate
                        elapsed = max(time.monotonic() - t0, 1e-9)
                        progress.update(task, completed=total, rate=total / elapsed)
                        if time.monotonic() >= deadline:
                            break
                    if count is not None and total >= count:
                        break
                if total == before:
                    break  # the window is too short to hold any usage
            progress.update(task, completed=total, rate=total / max(time.monotonic() - t0, 1e-9))
    except KeyboardInterrupt:
        err.print("interrupted: flushing what was queued…")
    finally:
        try:
            producer.close()
        except DeliveryError as exc:
            failed = len(exc.failed_ids)
            err.print(f"[red]error:[/red] {exc}")
    elapsed = time.monotonic() - started
    _load_summary(sent, rejected, failed, elapsed, producer.stats.messages)
    if failed or rejected:
        raise typer.Exit(1)


def _load_summary(sent: Counter[str], rejected: int, failed: int, elapsed: float, messages: int) -> None:
    table = Table(title="metering load", show_footer=True)
    total = sum(sent.values())
    table.add_column("event type", footer="total")
    table.add_column("events", justify="right", footer=f"{total:,}")
    for event_type, n in sorted(sent.items()):
        table.add_row(event_type, f"{n:,}")
    out.print(table)
    out.print(
        f"{total:,} usage events in {messages:,} Kafka messages, {elapsed:.1f} s "
        f"({total / max(elapsed, 1e-9):,.0f} ev/s); rejected {rejected}, not delivered {failed}"
    )


# ---- metering demo ----------------------------------------------------------------------------


# ---- metering admin … -------------------------------------------------------------------------

admin_app = typer.Typer(
    help="Create, change and list tenants' entities. Changes are lifecycle events sent to the "
    "control topic; the aggregator applies them a moment later (--wait waits for that). Reads go "
    "through the running system's admin API, with the admin token (METERING_ADMIN_TOKEN, or the "
    "file the system writes it to, .cache/admin-token). Exit codes: 0 done; 1 invalid, refused "
    "by a check or not delivered; 2 no Kafka; 3 delivered but not seen applied in time; 4 the "
    "admin API could not be asked.",
    no_args_is_help=True,
)
_groups: dict[str, typer.Typer] = {}
for _name, _help in (
    ("workspace", "Workspaces (a tree: --parent-id) and their tier."),
    ("contract", "Contracts and the workspaces they cover."),
    ("member", "Members of a workspace."),
    ("vk", "AI-gateway virtual keys."),
    ("agent", "Agents of a workspace."),
    ("workstation", "Workstations and their rate cards."),
    ("datastream", "Datastreams of a workspace."),
    ("api-key", "API keys (stored as a hash; the key is printed once)."),
    ("token", "Members' access tokens (stored as a hash; printed once)."),
):
    _groups[_name] = typer.Typer(help=_help, no_args_is_help=True)
    admin_app.add_typer(_groups[_name], name=_name)
add_list_commands(_groups)

#: The ``metering admin`` group of each kind of entity (for messages).
_GROUP = {
    EntityKind.WORKSPACE: "workspace",
    EntityKind.CONTRACT: "contract",
    EntityKind.MEMBER: "member",
    EntityKind.VIRTUAL_KEY: "vk",
    EntityKind.AGENT: "agent",
    EntityKind.WORKSTATION: "workstation",
    EntityKind.DATASTREAM: "datastream",
    EntityKind.API_KEY: "api-key",
    EntityKind.ACCESS_TOKEN: "token",
}

Tenant = Annotated[str, typer.Option(help="The tenant that owns the entity.")]
Json = Annotated[
    bool,
    typer.Option(
        "--json", metavar="", help="Print the result as one JSON object (and do not wait, unless --wait)."
    ),
]
NewId = Annotated[str | None, typer.Option("--id", help="Id of the new entity (default: a new UUID).")]
ExistingId = Annotated[str, typer.Option("--id", help="Id of the entity.")]
WorkspaceId = Annotated[str, typer.Option(help="Workspace id.")]
MemberId = Annotated[str, typer.Option(help="Member id.")]
Wait = Annotated[
    bool | None,
    typer.Option(
        "--wait/--no-wait",
        metavar="",
        show_default=False,
        help="Return once the aggregator has applied it, i.e. a new key or token is usable (polls the "
        "admin API). Default: wait when the output is a terminal, but not with --json or --force.",
    ),
]
WaitTimeout = Annotated[
    float, typer.Option(min=0.1, metavar="SECONDS", help="How long --wait waits; then it exits 3.")
]
Force = Annotated[
    bool,
    typer.Option(
        "--force",
        metavar="",
        help="Send without the checks against the admin API (for when it is unreachable); "
        "implies --no-wait unless --wait is given.",
    ),
]


@dataclass(frozen=True)
class Delivery:
    """How an admin command reports, and how far it follows what it sent."""

    as_json: bool = False
    wait: bool | None = None  # None: wait when interactive (stdout is a terminal)
    wait_timeout_s: float = 30.0
    force: bool = False

    @property
    def waits(self) -> bool:
        if self.wait is not None:
            return self.wait
        return sys.stdout.isatty() and not self.as_json and not self.force


def _lifecycle(
    tenant: str,
    events: list[tuple[EventType, dict[str, Any]]],
    result: dict[str, Any],
    delivery: Delivery,
    secret: tuple[str, str] | None = None,
    checks: Callable[[Checks], object] | None = None,
) -> None:
    """Validate lifecycle events, check what they name against the admin API (unless --force:
    nothing is sent if a check fails), send them and wait for Kafka's acknowledgement, print
    ``result`` (and a secret, shown this once: only its hash was sent), then with --wait poll
    the admin API until the aggregator has applied them."""
    judged_at_ms = now_ms()
    now = kafka_time(judged_at_ms)
    try:
        prepared = [
            prepare_event(
                new_event(t, d, tenant, ADMIN_SOURCE, time=now),
                tenant,
                received_at=now,
                plane=Plane.CONTROL,
            )
            for t, d in events
        ]
    except InvalidEvent as exc:
        err.print(f"[red]rejected:[/red] {exc.code}: {exc.message}")
        raise typer.Exit(1) from None
    settings = AdminCliSettings()
    with contextlib.ExitStack() as stack:
        api: AdminClient | None = None
        if checks is not None and not delivery.force:
            api = stack.enter_context(_checked(settings, tenant, checks))
        failed = _send(settings, {tenant: prepared}, False, judged_at_ms, Plane.CONTROL)
        if failed:
            raise typer.Exit(1)
        result = {"tenant": tenant, **result, "event_ids": [e["id"] for e in prepared]}
        if not delivery.as_json:
            shown = " ".join(
                f"{k}={v}" for k, v in result.items() if k not in ("event_ids", "tenant") and v is not None
            )
            out.print(f"tenant={tenant} {shown}", markup=False)
            if secret is not None:
                out.print(f"{secret[0]}: {secret[1]}", markup=False)
                err.print(
                    "Store it now: it is not shown again and cannot be recovered (only its hash is kept)."
                )
        applied, problem = False, None
        if delivery.waits:
            applied, problem = _follow(settings, api, stack, tenant, prepared, delivery.wait_timeout_s)
    if delivery.as_json:
        status = {"status": "applied" if applied else "delivered"}
        out.print(orjson.dumps(result | status | dict([secret] if secret else [])).decode(), markup=False)
    if problem is not None:
        err.print(problem, style="red", markup=False)
        raise typer.Exit(3)
    if not delivery.as_json:
        out.print(_outcome(events[0][0], applied), markup=False)


@contextlib.contextmanager
def _checked(
    settings: AdminCliSettings, tenant: str, checks: Callable[[Checks], object]
) -> Iterator[AdminClient]:
    """The admin API, once ``checks`` passed on it; exit 1 if one failed, 4 if it cannot be asked."""
    try:
        api = AdminClient.from_settings(settings)
    except AdminApiError as exc:
        _cannot_check(exc)
    with api:
        try:
            checks(Checks(api, tenant))
        except Refused as exc:
            err.print(f"[red]refused:[/red] {escape(str(exc))}. Nothing was sent.")
            raise typer.Exit(1) from None
        except AdminApiError as exc:
            _cannot_check(exc)
        yield api


def _cannot_check(exc: AdminApiError) -> NoReturn:
    err.print(
        f"[red]error:[/red] cannot check the command against the admin API: {escape(str(exc))}.\n"
        "Nothing was sent. --force sends it without the checks (and without waiting)."
    )
    raise typer.Exit(4) from None


def _follow(
    settings: AdminCliSettings,
    api: AdminClient | None,
    stack: contextlib.ExitStack,
    tenant: str,
    prepared: list[dict[str, Any]],
    timeout_s: float,
) -> tuple[bool, str | None]:
    """Wait (with a spinner) until the aggregator has applied ``prepared``: (applied, a problem
    to report, if it could not be seen applied)."""
    try:
        if api is None:
            api = stack.enter_context(AdminClient.from_settings(settings))
        with err.status("delivered to Kafka; waiting for the aggregator to apply it…"):
            done = wait_applied(api, tenant, expectations(prepared), timeout_s)
    except AdminApiError as exc:
        return False, f"delivered to Kafka; cannot tell whether the aggregator has applied it: {exc}"
    except KeyboardInterrupt:
        return False, "delivered to Kafka; stopped waiting for the aggregator (interrupted)"
    if done:
        return True, None
    return False, (
        f"delivered to Kafka, not yet applied by the aggregator after {timeout_s:g} s: is the "
        f"aggregator running? check {base_url(settings)}/readyz"
    )


def _outcome(first: EventType, applied: bool) -> str:
    """What the command's first event did, for a person: applied, or only delivered."""
    kind = LIFECYCLE_KIND[first]
    credential = {EntityKind.API_KEY: "key", EntityKind.ACCESS_TOKEN: "token"}.get(kind)
    creates = first in (EventType.API_KEY_CREATED, EventType.ACCESS_TOKEN_ISSUED)
    revokes = first in (EventType.API_KEY_REVOKED, EventType.ACCESS_TOKEN_REVOKED)
    if applied and creates:
        return f"applied: the {credential} is usable now"
    if applied and revokes:
        return (
            f"applied: the {credential} is revoked; a process that has it cached refuses it within "
            "METERING_QUERY_CACHE_TTL_S (default 2 s)"
        )
    if applied:
        return f"applied: `metering admin {_GROUP[kind]} list` shows it now"
    then = f"the {credential} becomes usable" if creates else "it takes effect"
    return (
        f"delivered to Kafka; {then} once the aggregator applies it (usually within a second; "
        "--wait waits for that)"
    )


def _new_id(given: str | None) -> str:
    return given or str(uuid.uuid4())


@_groups["workspace"].command("create")
def workspace_create(
    tenant: Tenant,
    name: Annotated[str, typer.Option(help="Workspace name.")],
    id_: NewId = None,
    parent_id: Annotated[str | None, typer.Option(help="Parent workspace (subtree).")] = None,
    tier: Annotated[str, typer.Option(help="Plan tier.")] = "free",
    billing_anchor_day: Annotated[
        int, typer.Option(min=1, max=28, help="Day the billing period starts.")
    ] = 1,
    json_output: Json = False,
    wait: Wait = None,
    wait_timeout: WaitTimeout = 30.0,
    force: Force = False,
) -> None:
    """Create a workspace (checked: the parent exists; a given --id is not taken)."""
    ws = _new_id(id_)
    data: dict[str, Any] = {
        "workspace_id": ws,
        "name": name,
        "tier": tier,
        "billing_anchor_day": billing_anchor_day,
    }
    if parent_id:
        data["parent_id"] = parent_id

    def check(c: Checks) -> None:
        if id_:
            c.absent(AdminKind.WORKSPACES, ws, instead="; `workspace update` changes it")
        if parent_id:
            c.workspace(parent_id)

    checks = check if id_ or parent_id else None
    _lifecycle(
        tenant,
        [(EventType.WORKSPACE_CREATED, data)],
        {"workspace_id": ws},
        Delivery(json_output, wait, wait_timeout, force),
        checks=checks,
    )


@_groups["workspace"].command("update")
def workspace_update(
    tenant: Tenant,
    id_: ExistingId,
    name: Annotated[str | None, typer.Option(help="New name.")] = None,
    tier: Annotated[str | None, typer.Option(help="New tier.")] = None,
    json_output: Json = False,
    wait: Wait = None,
    wait_timeout: WaitTimeout = 30.0,
    force: Force = False,
) -> None:
    """Rename a workspace or change its tier (checked: it exists)."""
    if name is None and tier is None:
        raise typer.BadParameter("give --name and/or --tier")
    data: dict[str, Any] = {"workspace_id": id_}
    data |= {k: v for k, v in (("name", name), ("tier", tier)) if v is not None}
    _lifecycle(
        tenant,
        [(EventType.WORKSPACE_UPDATED, data)],
        {"workspace_id": id_},
        Delivery(json_output, wait, wait_timeout, force),
        checks=lambda c: c.workspace(id_),
    )


@_groups["contract"].command("create")
def contract_create(
    tenant: Tenant,
    name: Annotated[str, typer.Option(help="Contract name.")],
    id_: NewId = None,
    workspace_id: Annotated[
        list[str] | None, typer.Option(help="Workspaces the contract covers (repeatable).")
    ] = None,
    json_output: Json = False,
    wait: Wait = None,
    wait_timeout: WaitTimeout = 30.0,
    force: Force = False,
) -> None:
    """Create a contract, optionally with its workspaces (checked: they exist; a given --id is
    not taken)."""
    cid = _new_id(id_)
    events: list[tuple[EventType, dict[str, Any]]] = [
        (EventType.CONTRACT_CREATED, {"contract_id": cid, "name": name})
    ]
    events += [
        (EventType.CONTRACT_WORKSPACE_ADDED, {"contract_id": cid, "workspace_id": w})
        for w in workspace_id or []
    ]

    def check(c: Checks) -> None:
        if id_:
            c.absent(AdminKind.CONTRACTS, cid)
        for w in workspace_id or []:
            c.workspace(w)

    result = {"contract_id": cid, "workspace_ids": workspace_id or []}
    _lifecycle(
        tenant,
        events,
        result,
        Delivery(json_output, wait, wait_timeout, force),
        checks=check if id_ or workspace_id else None,
    )


@_groups["contract"].command("add-workspace")
def contract_add_workspace(
    tenant: Tenant,
    contract_id: Annotated[str, typer.Option(help="Contract id.")],
    workspace_id: WorkspaceId,
    json_output: Json = False,
    wait: Wait = None,
    wait_timeout: WaitTimeout = 30.0,
    force: Force = False,
) -> None:
    """Put a workspace under a contract (checked: both exist)."""
    data = {"contract_id": contract_id, "workspace_id": workspace_id}

    def check(c: Checks) -> None:
        c.exists(AdminKind.CONTRACTS, contract_id)
        c.workspace(workspace_id)

    _lifecycle(
        tenant,
        [(EventType.CONTRACT_WORKSPACE_ADDED, data)],
        dict(data),
        Delivery(json_output, wait, wait_timeout, force),
        checks=check,
    )


@_groups["member"].command("join")
def member_join(
    tenant: Tenant,
    workspace_id: WorkspaceId,
    email: Annotated[str, typer.Option(help="The member's email.")],
    member_id: Annotated[
        str | None,
        typer.Option(
            help="Member id (default: a new UUID); an existing member's id adds them to this workspace."
        ),
    ] = None,
    json_output: Json = False,
    wait: Wait = None,
    wait_timeout: WaitTimeout = 30.0,
    force: Force = False,
) -> None:
    """Add a member to a workspace (checked: the workspace exists; an existing member is not
    already in it and has this email)."""
    mid = _new_id(member_id)
    data = {"workspace_id": workspace_id, "member_id": mid, "email": email}
    result = {"member_id": mid, "membership_id": membership_id(workspace_id, mid)}

    def check(c: Checks) -> None:
        if member_id:
            c.can_join(workspace_id, mid, email)
        else:
            c.workspace(workspace_id)

    _lifecycle(
        tenant,
        [(EventType.MEMBER_JOINED, data)],
        result,
        Delivery(json_output, wait, wait_timeout, force),
        checks=check,
    )


def _member_change(event_type: EventType, name: str, doc: str) -> None:
    def command(
        tenant: Tenant,
        workspace_id: WorkspaceId,
        member_id: MemberId,
        json_output: Json = False,
        wait: Wait = None,
        wait_timeout: WaitTimeout = 30.0,
        force: Force = False,
    ) -> None:
        data = {"workspace_id": workspace_id, "member_id": member_id}
        leaving = event_type is EventType.MEMBER_LEFT
        _lifecycle(
            tenant,
            [(event_type, data)],
            {"membership_id": membership_id(workspace_id, member_id)},
            Delivery(json_output, wait, wait_timeout, force),
            checks=lambda c: c.can_change_membership(workspace_id, member_id, leaving),
        )

    command.__doc__ = doc
    _groups["member"].command(name)(command)


_member_change(
    EventType.MEMBER_LEFT,
    "leave",
    "A member leaves the workspace: activate/deactivate no longer apply; `join` adds them again. "
    "(Checked: they are a member of it.)",
)
_member_change(
    EventType.MEMBER_ACTIVATED, "activate", "Reactivate a member (checked: a member who has not left)."
)
_member_change(
    EventType.MEMBER_DEACTIVATED, "deactivate", "Deactivate a member (checked: a member who has not left)."
)


@_groups["vk"].command("create")
def vk_create(
    tenant: Tenant,
    workspace_id: WorkspaceId,
    id_: NewId = None,
    json_output: Json = False,
    wait: Wait = None,
    wait_timeout: WaitTimeout = 30.0,
    force: Force = False,
) -> None:
    """Create a virtual key (checked: the workspace exists; a given --id is not taken)."""
    vk = _new_id(id_)
    data = {"workspace_id": workspace_id, "virtual_key_id": vk}

    def check(c: Checks) -> None:
        c.workspace(workspace_id)
        if id_:
            c.absent(AdminKind.VIRTUAL_KEYS, vk)

    _lifecycle(
        tenant,
        [(EventType.VIRTUAL_KEY_CREATED, data)],
        {"virtual_key_id": vk},
        Delivery(json_output, wait, wait_timeout, force),
        checks=check,
    )


@_groups["vk"].command("revoke")
def vk_revoke(
    tenant: Tenant,
    workspace_id: WorkspaceId,
    id_: ExistingId,
    json_output: Json = False,
    wait: Wait = None,
    wait_timeout: WaitTimeout = 30.0,
    force: Force = False,
) -> None:
    """Revoke a virtual key (checked: it exists, in that workspace, and is not revoked yet)."""
    data = {"workspace_id": workspace_id, "virtual_key_id": id_}

    def check(c: Checks) -> None:
        c.in_workspace(AdminKind.VIRTUAL_KEYS, id_, workspace_id)
        c.not_revoked(AdminKind.VIRTUAL_KEYS, id_)

    _lifecycle(
        tenant,
        [(EventType.VIRTUAL_KEY_REVOKED, data)],
        {"virtual_key_id": id_},
        Delivery(json_output, wait, wait_timeout, force),
        checks=check,
    )


@_groups["vk"].command("buy-extra")
def vk_buy_extra(
    tenant: Tenant,
    workspace_id: WorkspaceId,
    count: Annotated[int, typer.Option(min=1, help="Extra virtual keys bought.")],
    json_output: Json = False,
    wait: Wait = None,
    wait_timeout: WaitTimeout = 30.0,
    force: Force = False,
) -> None:
    """Buy extra virtual keys beyond the tier's limit (checked: the workspace exists)."""
    data = {"workspace_id": workspace_id, "count": count}
    _lifecycle(
        tenant,
        [(EventType.VIRTUAL_KEY_EXTRA_PURCHASED, data)],
        dict(data),
        Delivery(json_output, wait, wait_timeout, force),
        checks=lambda c: c.workspace(workspace_id),
    )


@_groups["agent"].command("create")
def agent_create(
    tenant: Tenant,
    workspace_id: WorkspaceId,
    id_: NewId = None,
    json_output: Json = False,
    wait: Wait = None,
    wait_timeout: WaitTimeout = 30.0,
    force: Force = False,
) -> None:
    """Create an agent (checked: the workspace exists; a given --id is not taken)."""
    agent = _new_id(id_)
    data = {"workspace_id": workspace_id, "agent_id": agent}

    def check(c: Checks) -> None:
        c.workspace(workspace_id)
        if id_:
            c.absent(AdminKind.AGENTS, agent)

    _lifecycle(
        tenant,
        [(EventType.AGENT_CREATED, data)],
        {"agent_id": agent},
        Delivery(json_output, wait, wait_timeout, force),
        checks=check,
    )


def _agent_change(event_type: EventType, name: str, doc: str) -> None:
    def command(
        tenant: Tenant,
        workspace_id: WorkspaceId,
        id_: ExistingId,
        json_output: Json = False,
        wait: Wait = None,
        wait_timeout: WaitTimeout = 30.0,
        force: Force = False,
    ) -> None:
        data = {"workspace_id": workspace_id, "agent_id": id_}
        _lifecycle(
            tenant,
            [(event_type, data)],
            {"agent_id": id_},
            Delivery(json_output, wait, wait_timeout, force),
            checks=lambda c: c.in_workspace(AdminKind.AGENTS, id_, workspace_id),
        )

    command.__doc__ = doc
    _groups["agent"].command(name)(command)


_agent_change(
    EventType.AGENT_ACTIVATED, "activate", "Activate an agent (checked: it exists in that workspace)."
)
_agent_change(
    EventType.AGENT_DEACTIVATED, "deactivate", "Deactivate an agent (checked: it exists in that workspace)."
)


@_groups["workstation"].command("create")
def workstation_create(
    tenant: Tenant,
    name: Annotated[str, typer.Option(help="Workstation name.")],
    usd_per_cpu_hour: Annotated[float, typer.Option(min=0, help="Price of one CPU-hour.")],
    usd_per_gpu_hour: Annotated[float, typer.Option(min=0, help="Price of one GPU-hour.")],
    usd_per_gb_hour: Annotated[float, typer.Option(min=0, help="Price of one GB-hour of memory.")],
    workspace_id: Annotated[
        str | None,
        typer.Option(
            help="The workspace it belongs to, whose keys may report its usage "
            "(default: none, the tenant's root: only keys of a root workspace may)."
        ),
    ] = None,
    id_: NewId = None,
    json_output: Json = False,
    wait: Wait = None,
    wait_timeout: WaitTimeout = 30.0,
    force: Force = False,
) -> None:
    """Create a workstation with its rate card (checked: the workspace exists; a given --id is
    not taken)."""
    ws = _new_id(id_)
    data = {
        "workstation_id": ws,
        "name": name,
        "usd_per_cpu_hour": usd_per_cpu_hour,
        "usd_per_gpu_hour": usd_per_gpu_hour,
        "usd_per_gb_hour": usd_per_gb_hour,
    }
    if workspace_id:
        data["workspace_id"] = workspace_id

    def check(c: Checks) -> None:
        if workspace_id:
            c.workspace(workspace_id)
        if id_:
            c.absent(AdminKind.WORKSTATIONS, ws)

    checks = check if workspace_id or id_ else None
    _lifecycle(
        tenant,
        [(EventType.WORKSTATION_CREATED, data)],
        {"workstation_id": ws},
        Delivery(json_output, wait, wait_timeout, force),
        checks=checks,
    )


@_groups["datastream"].command("create")
def datastream_create(
    tenant: Tenant,
    workspace_id: WorkspaceId,
    name: Annotated[str, typer.Option(help="Datastream name.")],
    id_: NewId = None,
    json_output: Json = False,
    wait: Wait = None,
    wait_timeout: WaitTimeout = 30.0,
    force: Force = False,
) -> None:
    """Create a datastream in a workspace (checked: the workspace exists; a given --id is not
    taken)."""
    ds = _new_id(id_)
    data = {"datastream_id": ds, "workspace_id": workspace_id, "name": name}

    def check(c: Checks) -> None:
        c.workspace(workspace_id)
        if id_:
            c.absent(AdminKind.DATASTREAMS, ds)

    _lifecycle(
        tenant,
        [(EventType.DATASTREAM_CREATED, data)],
        {"datastream_id": ds},
        Delivery(json_output, wait, wait_timeout, force),
        checks=check,
    )


class KeyScope(StrEnum):
    WORKSPACE = "workspace"
    MEMBER = "member"


@_groups["api-key"].command("create")
def api_key_create(
    tenant: Tenant,
    scope: Annotated[
        KeyScope,
        typer.Option(
            help="workspace: opens the workspace usage APIs for the workspace and its subtree "
            "(needs --workspace-id); member: opens a member's own quota usage (needs --member-id "
            "and --email)."
        ),
    ] = KeyScope.WORKSPACE,
    workspace_id: Annotated[str | None, typer.Option(help="The key's workspace.")] = None,
    member_id: Annotated[str | None, typer.Option(help="The member (scope member).")] = None,
    email: Annotated[
        str | None, typer.Option(help="The member's email (scope member): must be that member's.")
    ] = None,
    test: Annotated[
        bool, typer.Option("--test", metavar="", help="An fl_test_ key instead of fl_live_.")
    ] = False,
    id_: Annotated[
        str | None, typer.Option("--id", help="Id of the new key (default: key_ and 32 random hex digits).")
    ] = None,
    json_output: Json = False,
    wait: Wait = None,
    wait_timeout: WaitTimeout = 30.0,
    force: Force = False,
) -> None:
    """Create an API key. The key is printed once; only its SHA-256 is emitted and stored.
    Checked: the workspace exists; a member given by --member-id and/or --email is a member of
    it (of the tenant, without --workspace-id), has not left, and has that email."""
    raw = new_api_key(live=not test)
    key_id = id_ or f"key_{uuid.uuid4().hex}"
    data: dict[str, Any] = {
        "key_id": key_id,
        "key_hash": hash_secret(raw),
        "prefix": display_prefix(raw),
        "scope": scope.value,
    }
    data |= {
        k: v for k, v in (("workspace_id", workspace_id), ("member_id", member_id), ("email", email)) if v
    }
    result = {"key_id": key_id, "prefix": display_prefix(raw)}

    def check(c: Checks) -> None:
        if id_:
            c.absent(AdminKind.API_KEYS, key_id)
        if workspace_id:
            c.workspace(workspace_id)
        if member_id or email:
            c.member(member_id, email, workspace_id)

    _lifecycle(
        tenant,
        [(EventType.API_KEY_CREATED, data)],
        result,
        Delivery(json_output, wait, wait_timeout, force),
        secret=("api_key", raw),
        checks=check,
    )


@_groups["api-key"].command("revoke")
def api_key_revoke(
    tenant: Tenant,
    id_: Annotated[str, typer.Option("--id", help="The key's id (`api-key list` shows them).")],
    json_output: Json = False,
    wait: Wait = None,
    wait_timeout: WaitTimeout = 30.0,
    force: Force = False,
) -> None:
    """Revoke an API key by its id (checked: it exists and is not revoked yet)."""
    _lifecycle(
        tenant,
        [(EventType.API_KEY_REVOKED, {"key_id": id_})],
        {"key_id": id_},
        Delivery(json_output, wait, wait_timeout, force),
        checks=lambda c: c.not_revoked(AdminKind.API_KEYS, id_),
    )


_TTL = re.compile(r"^(\d+)([smhd]?)$")


def parse_ttl(text: str) -> timedelta:
    """``3600``, ``90m``, ``12h``, ``30d`` -> a duration (seconds without a unit)."""
    m = _TTL.match(text.strip())
    if not m or int(m.group(1)) == 0:
        raise typer.BadParameter(f"{text!r} is not a duration like 3600, 90m, 12h or 30d")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    return timedelta(seconds=int(m.group(1)) * unit)


@_groups["token"].command("issue")
def token_issue(
    tenant: Tenant,
    member_id: MemberId,
    email: Annotated[str, typer.Option(help="The member's email.")],
    ttl: Annotated[str, typer.Option(help="Lifetime: 3600, 90m, 12h, 30d.")] = "30d",
    id_: Annotated[
        str | None, typer.Option("--id", help="Id of the new token (default: tok_ and 32 random hex digits).")
    ] = None,
    json_output: Json = False,
    wait: Wait = None,
    wait_timeout: WaitTimeout = 30.0,
    force: Force = False,
) -> None:
    """Issue a member's access token. Printed once; only its SHA-256 is emitted and stored.
    Checked: the member exists in the tenant, has not left everywhere, and has that email."""
    lifetime = parse_ttl(ttl)
    raw = new_access_token()
    token_id = id_ or f"tok_{uuid.uuid4().hex}"
    expires_at = format_time(datetime.now(UTC) + lifetime)
    data = {
        "token_id": token_id,
        "token_hash": hash_secret(raw),
        "member_id": member_id,
        "email": email,
        "expires_at": expires_at,
    }
    result = {"token_id": token_id, "expires_at": expires_at}

    def check(c: Checks) -> None:
        if id_:
            c.absent(AdminKind.ACCESS_TOKENS, token_id)
        c.member(member_id, email)

    _lifecycle(
        tenant,
        [(EventType.ACCESS_TOKEN_ISSUED, data)],
        result,
        Delivery(json_output, wait, wait_timeout, force),
        secret=("access_token", raw),
        checks=check,
    )


@_groups["token"].command("revoke")
def token_revoke(
    tenant: Tenant,
    id_: Annotated[str, typer.Option("--id", help="The token's id (`token list` shows them).")],
    json_output: Json = False,
    wait: Wait = None,
    wait_timeout: WaitTimeout = 30.0,
    force: Force = False,
) -> None:
    """Revoke an access token by its id (checked: it exists and is not revoked yet)."""
    _lifecycle(
        tenant,
        [(EventType.ACCESS_TOKEN_REVOKED, {"token_id": id_})],
        {"token_id": id_},
        Delivery(json_output, wait, wait_timeout, force),
        checks=lambda c: c.not_revoked(AdminKind.ACCESS_TOKENS, id_),
    )
