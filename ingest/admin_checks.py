"""Checks ``metering admin`` makes before it sends anything: what a command names must exist (a
workspace, a contract, a member, the key being revoked), what it types twice must agree (a
member's email, a virtual key's workspace), and a create with a given ``--id`` must not
silently overwrite an entity that exists. A failed check raises ``Refused`` with a message for
a person; nothing has been sent then.

They read the admin API (``ingest/admin_client.py``), so they see what the aggregator has
applied: an entity created a moment ago without ``--wait`` may not be visible yet.
"""

from __future__ import annotations

from typing import Any

from ingest.admin_client import AdminClient
from query_api.admin_reader import AdminKind
from schemas.events import membership_id


class Refused(Exception):
    """A check failed; the message says which and why."""


def _same_email(a: str, b: str) -> bool:
    return a.strip().casefold() == b.strip().casefold()


class Checks:
    def __init__(self, api: AdminClient, tenant: str) -> None:
        self.api = api
        self.tenant = tenant
        self._tenant_known: bool | None = None

    def _where(self) -> str:
        """``in tenant 'x'``, and a hint when the tenant has no entity at all (a typo?)."""
        if self._tenant_known is None:
            self._tenant_known = self.api.tenant_exists(self.tenant)
        hint = "" if self._tenant_known else " (that tenant has no entities at all: is it spelled right?)"
        return f"in tenant {self.tenant!r}{hint}"

    def exists(self, kind: AdminKind, entity_id: str) -> dict[str, Any]:
        item = self.api.get(self.tenant, kind, entity_id)
        if item is None:
            raise Refused(f"no {kind.noun} {entity_id!r} {self._where()}")
        return item

    def absent(self, kind: AdminKind, entity_id: str, instead: str = "") -> None:
        """A create with a given id must not replace what exists."""
        if self.api.get(self.tenant, kind, entity_id) is not None:
            raise Refused(f"{kind.noun} {entity_id!r} already exists in tenant {self.tenant!r}{instead}")

    def workspace(self, workspace_id: str) -> dict[str, Any]:
        return self.exists(AdminKind.WORKSPACES, workspace_id)

    def in_workspace(self, kind: AdminKind, entity_id: str, workspace_id: str) -> dict[str, Any]:
        """The entity exists and belongs to the workspace the command names too."""
        item = self.exists(kind, entity_id)
        if item.get("workspace_id") != workspace_id:
            raise Refused(
                f"{kind.noun} {entity_id!r} belongs to workspace {item.get('workspace_id')!r}, "
                f"not {workspace_id!r}"
            )
        return item

    def not_revoked(self, kind: AdminKind, entity_id: str) -> dict[str, Any]:
        item = self.exists(kind, entity_id)
        if item.get("status") == "revoked":
            raise Refused(f"{kind.noun} {entity_id!r} is already revoked (since {item.get('updated_at')})")
        return item

    def membership(self, workspace_id: str, member_id: str) -> dict[str, Any]:
        """The member belongs to the workspace (in any state)."""
        self.workspace(workspace_id)
        item = self.api.get(self.tenant, AdminKind.MEMBERS, membership_id(workspace_id, member_id))
        if item is None:
            raise Refused(f"{member_id!r} is not a member of workspace {workspace_id!r}")
        return item

    def can_change_membership(self, workspace_id: str, member_id: str, leaving: bool) -> None:
        """Leave, activate and deactivate apply to a membership that exists and has not ended."""
        item = self.membership(workspace_id, member_id)
        if item["status"] == "left":
            again = "" if leaving else "; `member join` adds them again"
            raise Refused(f"member {member_id!r} has already left workspace {workspace_id!r}{again}")

    def can_join(self, workspace_id: str, member_id: str, email: str) -> None:
        """Not a member of the workspace already, and the same person (email) as the member
        with this id elsewhere in the tenant."""
        self.workspace(workspace_id)
        found = self.api.list(self.tenant, AdminKind.MEMBERS, {"member_id": member_id})
        memberships = found[0] if found is not None else []
        for m in memberships:
            if m["workspace_id"] == workspace_id and m["status"] != "left":
                raise Refused(
                    f"member {member_id!r} is already a member of workspace {workspace_id!r} ({m['status']})"
                )
        if memberships and not any(_same_email(str(m["email"]), email) for m in memberships):
            known = ", ".join(sorted({repr(m["email"]) for m in memberships}))
            raise Refused(
                f"member {member_id!r} has the email {known} in the tenant's other workspaces, not {email!r}"
            )

    def member(self, member_id: str | None, email: str | None, workspace_id: str | None = None) -> None:
        """The member (by id, by email, or both) exists -- in ``workspace_id`` if given -- has
        not left it, and has that email."""
        filters = {"member_id": member_id} if member_id else {"email": email or ""}
        found = self.api.list(self.tenant, AdminKind.MEMBERS, filters)
        memberships = found[0] if found is not None else []
        who = f"member {member_id!r}" if member_id else f"a member with email {email!r}"
        if not memberships:
            raise Refused(f"no {who} {self._where()}")
        if workspace_id is not None:
            self.workspace(workspace_id)
            places = ", ".join(repr(m["workspace_id"]) for m in memberships)
            memberships = [m for m in memberships if m["workspace_id"] == workspace_id]
            if not memberships:
                raise Refused(
                    f"{who} is not a member of workspace {workspace_id!r} (their workspaces: {places})"
                )
        if member_id and email:
            matching = [m for m in memberships if _same_email(str(m["email"]), email)]
            if not matching:
                known = ", ".join(sorted({repr(m["email"]) for m in memberships}))
                place = f" in workspace {workspace_id!r}" if workspace_id else ""
                raise Refused(f"member {member_id!r}{place} has the email {known}, not {email!r}")
            memberships = matching
        if all(m["status"] == "left" for m in memberships):
            places = ", ".join(repr(m["workspace_id"]) for m in memberships)
            raise Refused(f"{who} has left (workspace {places})")
