"""``metering admin <kind> list``: a tenant's entities of one kind, as the aggregator applied them.

Read through the running system's admin API (``ingest/admin_client.py``); a rich table, or with
``--json`` one JSON object ``{"tenant", "kind", "total", "items"}`` (the API's fields). Keys and
tokens are listed by id, display prefix, scope, owner and state -- never a secret, which nothing
stores -- so that revoking one needs only this list, not the id printed at its creation.

``add_list_commands`` registers the commands on the groups of ``metering admin`` (``ingest/cli.py``).
Exit codes: 0 listed, 1 no such tenant, 4 the admin API could not be asked.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from deploy.settings import AdminCliSettings
from ingest.admin_client import AdminApiError, AdminClient
from query_api.admin_reader import AdminKind, Status

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)

Tenant = Annotated[str, typer.Option(help="The tenant whose entities are listed.")]
Json = Annotated[
    bool, typer.Option("--json", metavar="", help='One JSON object: {"tenant", "kind", "total", "items"}.')
]
Limit = Annotated[int | None, typer.Option(min=1, help="List at most this many (default: all), in id order.")]
StatusFilter = Annotated[Status | None, typer.Option(help="Only those in this state.", show_default=False)]
WorkspaceFilter = Annotated[str | None, typer.Option("--workspace-id", help="Only those of this workspace.")]
MemberFilter = Annotated[str | None, typer.Option("--member-id", help="Only those of this member.")]
EmailFilter = Annotated[str | None, typer.Option("--email", help="Only those of this email (any case).")]

#: Columns of the table per kind: (heading, field of the API's item).
COLUMNS: dict[AdminKind, tuple[tuple[str, str], ...]] = {
    AdminKind.WORKSPACES: (
        ("id", "id"),
        ("name", "name"),
        ("tier", "tier"),
        ("parent", "parent_id"),
        ("contract", "contract_id"),
        ("anchor day", "billing_anchor_day"),
        ("extra vks", "extra_vks"),
        ("updated", "updated_at"),
    ),
    AdminKind.CONTRACTS: (("id", "id"), ("name", "name"), ("created", "created_at")),
    AdminKind.MEMBERS: (
        ("member id", "member_id"),
        ("workspace", "workspace_id"),
        ("email", "email"),
        ("status", "status"),
        ("updated", "updated_at"),
    ),
    AdminKind.VIRTUAL_KEYS: (
        ("id", "id"),
        ("workspace", "workspace_id"),
        ("status", "status"),
        ("updated", "updated_at"),
    ),
    AdminKind.AGENTS: (
        ("id", "id"),
        ("workspace", "workspace_id"),
        ("status", "status"),
        ("updated", "updated_at"),
    ),
    AdminKind.WORKSTATIONS: (
        ("id", "id"),
        ("name", "name"),
        ("workspace", "workspace_id"),
        ("usd/cpu-h", "usd_per_cpu_hour"),
        ("usd/gpu-h", "usd_per_gpu_hour"),
        ("usd/GB-h", "usd_per_gb_hour"),
    ),
    AdminKind.DATASTREAMS: (
        ("id", "id"),
        ("name", "name"),
        ("workspace", "workspace_id"),
        ("created", "created_at"),
    ),
    AdminKind.API_KEYS: (
        ("id", "id"),
        ("prefix", "prefix"),
        ("scope", "scope"),
        ("workspace", "workspace_id"),
        ("member", "member_id"),
        ("email", "email"),
        ("state", "state"),
        ("created", "created_at"),
    ),
    AdminKind.ACCESS_TOKENS: (
        ("id", "id"),
        ("member", "member_id"),
        ("email", "email"),
        ("state", "state"),
        ("expires", "expires_at"),
        ("created", "created_at"),
    ),
}


def _cell(item: Mapping[str, Any], field: str) -> str:
    if field == "state":  # a token past its expiry is expired, whatever its stored status
        return "expired" if item.get("expired") and item.get("status") == "active" else str(item["status"])
    value = item.get(field)
    if value is None or value == "":
        return "-"
    if field.endswith("_at"):  # 2026-11-22T10:00:00.123Z -> 2026-11-22 10:00:00
        return str(value)[:19].replace("T", " ")
    return str(value)


def render(tenant: str, kind: AdminKind, items: list[dict[str, Any]], total: int) -> Table:
    shown = f"{len(items)} of {total}" if len(items) < total else f"{total}"
    table = Table(title=f"{kind.value} of tenant {tenant}", caption=shown)
    for heading, _field in COLUMNS[kind]:
        table.add_column(heading, overflow="fold")
    for item in items:
        table.add_row(*(_cell(item, field) for _h, field in COLUMNS[kind]))
    return table


def records(tenant: str, kind: AdminKind, items: list[dict[str, Any]], total: int) -> Text:
    """The same as ``render``, one entity per paragraph: for terminals too narrow for the table,
    where it would fold ids (which are copied whole, e.g. into ``revoke --id``)."""
    shown = f"{len(items)} of {total}" if len(items) < total else f"{total}"
    text = Text(f"{kind.value} of tenant {tenant} ({shown})\n", style="italic")
    for item in items:
        (_, first), *rest = COLUMNS[kind]
        text.append(_cell(item, first), style="bold")
        text.append("".join(f"\n  {heading:<10} {_cell(item, field)}" for heading, field in rest) + "\n")
    return text


def show(console: Console, tenant: str, kind: AdminKind, items: list[dict[str, Any]], total: int) -> None:
    table = render(tenant, kind, items, total)
    natural = Measurement.get(console, console.options.update(max_width=100_000), table).maximum
    if natural <= console.width:
        console.print(table)
    else:
        console.print(records(tenant, kind, items, total))


def list_entities(
    tenant: str, kind: AdminKind, filters: Mapping[str, str | None], limit: int | None, as_json: bool
) -> None:
    given = {k: v for k, v in filters.items() if v is not None}
    try:
        with AdminClient.from_settings(AdminCliSettings()) as api:
            found = api.list(tenant, kind, given, limit)
    except AdminApiError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(4) from None
    if found is None:
        err.print(f"[red]no tenant {tenant!r}[/red]: no entity of it exists (is it spelled right?)")
        raise typer.Exit(1)
    items, total = found
    if as_json:
        body = {"tenant": tenant, "kind": kind.value, "total": total, "items": items}
        out.print(orjson.dumps(body).decode(), markup=False)
        return
    show(out, tenant, kind, items, total)


def workspace_list(
    tenant: Tenant,
    parent_id: Annotated[str | None, typer.Option(help="Only the children of this workspace.")] = None,
    contract_id: Annotated[str | None, typer.Option(help="Only the workspaces of this contract.")] = None,
    limit: Limit = None,
    json_output: Json = False,
) -> None:
    """List a tenant's workspaces."""
    list_entities(
        tenant, AdminKind.WORKSPACES, {"parent_id": parent_id, "contract_id": contract_id}, limit, json_output
    )


def contract_list(tenant: Tenant, limit: Limit = None, json_output: Json = False) -> None:
    """List a tenant's contracts (`workspace list --contract-id` shows the workspaces of one)."""
    list_entities(tenant, AdminKind.CONTRACTS, {}, limit, json_output)


def member_list(
    tenant: Tenant,
    workspace_id: WorkspaceFilter = None,
    member_id: MemberFilter = None,
    email: EmailFilter = None,
    status: StatusFilter = None,
    limit: Limit = None,
    json_output: Json = False,
) -> None:
    """List memberships (one per member and workspace): active, inactive or left."""
    filters = {"workspace_id": workspace_id, "member_id": member_id, "email": email, "status": status}
    list_entities(tenant, AdminKind.MEMBERS, filters, limit, json_output)


def vk_list(
    tenant: Tenant,
    workspace_id: WorkspaceFilter = None,
    status: StatusFilter = None,
    limit: Limit = None,
    json_output: Json = False,
) -> None:
    """List virtual keys: active or revoked."""
    filters = {"workspace_id": workspace_id, "status": status}
    list_entities(tenant, AdminKind.VIRTUAL_KEYS, filters, limit, json_output)


def agent_list(
    tenant: Tenant,
    workspace_id: WorkspaceFilter = None,
    status: StatusFilter = None,
    limit: Limit = None,
    json_output: Json = False,
) -> None:
    """List agents: active or inactive."""
    filters = {"workspace_id": workspace_id, "status": status}
    list_entities(tenant, AdminKind.AGENTS, filters, limit, json_output)


def workstation_list(
    tenant: Tenant, workspace_id: WorkspaceFilter = None, limit: Limit = None, json_output: Json = False
) -> None:
    """List workstations and their rate cards."""
    list_entities(tenant, AdminKind.WORKSTATIONS, {"workspace_id": workspace_id}, limit, json_output)


def datastream_list(
    tenant: Tenant, workspace_id: WorkspaceFilter = None, limit: Limit = None, json_output: Json = False
) -> None:
    """List datastreams."""
    list_entities(tenant, AdminKind.DATASTREAMS, {"workspace_id": workspace_id}, limit, json_output)


def api_key_list(
    tenant: Tenant,
    workspace_id: WorkspaceFilter = None,
    member_id: MemberFilter = None,
    email: EmailFilter = None,
    status: StatusFilter = None,
    limit: Limit = None,
    json_output: Json = False,
) -> None:
    """List API keys by id, prefix, scope, owner and state (never the key: only its hash is
    stored, and not shown either). `api-key revoke --id` takes an id from here."""
    filters = {"workspace_id": workspace_id, "member_id": member_id, "email": email, "status": status}
    list_entities(tenant, AdminKind.API_KEYS, filters, limit, json_output)


def token_list(
    tenant: Tenant,
    member_id: MemberFilter = None,
    email: EmailFilter = None,
    status: StatusFilter = None,
    limit: Limit = None,
    json_output: Json = False,
) -> None:
    """List access tokens by id, member, state (active, revoked, expired) and expiry (never the
    token). `token revoke --id` takes an id from here."""
    filters = {"member_id": member_id, "email": email, "status": status}
    list_entities(tenant, AdminKind.ACCESS_TOKENS, filters, limit, json_output)


LIST_COMMANDS: dict[str, Callable[..., None]] = {
    "workspace": workspace_list,
    "contract": contract_list,
    "member": member_list,
    "vk": vk_list,
    "agent": agent_list,
    "workstation": workstation_list,
    "datastream": datastream_list,
    "api-key": api_key_list,
    "token": token_list,
}


def add_list_commands(groups: Mapping[str, typer.Typer]) -> None:
    for name, command in LIST_COMMANDS.items():
        groups[name].command("list")(command)
