"""The admin API as ``metering admin`` reads it: entities as the aggregator applied them.

With the embedded ClickHouse engine the running system holds the only lock on the data, so the
CLI reads through the running process's HTTP API (``/admin/v1``, ``query_api/routers/admin.py``)
and never opens ClickHouse itself. It authenticates with the admin token: ``METERING_ADMIN_TOKEN``,
or the file the running system wrote it to (``query_api/admin_token.py``).

``expectations`` says, from the lifecycle events a command sent, what the entities must look like
once the aggregator has applied them; ``wait_applied`` polls until they do (``--wait``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

import httpx

from deploy.settings import AdminCliSettings
from query_api.admin_reader import AdminKind
from query_api.admin_token import AdminTokenMissing, load_admin_token
from schemas.events import LIFECYCLE_KIND, EventType


class AdminApiError(Exception):
    """The admin API could not answer the question (not: the answer is no)."""


class AdminApiUnreachable(AdminApiError):
    """Nothing answers at the admin API's address, or it is unavailable (5xx)."""


def base_url(settings: AdminCliSettings) -> str:
    """``METERING_ADMIN_API_URL``, else the local HTTP API (a wildcard host means this machine)."""
    if settings.admin_api_url:
        return settings.admin_api_url.rstrip("/")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(settings.http_host, settings.http_host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{settings.http_port}"


class AdminClient:
    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout_s: float = 5.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url
        self._http = httpx.Client(
            base_url=f"{url}/admin/v1",
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout_s,
            transport=transport,
        )

    @classmethod
    def from_settings(cls, settings: AdminCliSettings) -> AdminClient:
        """Raises ``AdminApiError`` when there is no admin token to present."""
        try:
            token = load_admin_token(settings)
        except AdminTokenMissing as exc:
            raise AdminApiError(str(exc)) from None
        return cls(base_url(settings), token)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _get(self, path: str, params: Mapping[str, Any] | None = None) -> httpx.Response | None:
        """The answer, or None for a 404; anything but 200/404 raises ``AdminApiError``."""
        try:
            r = self._http.get(path, params=params)
        except httpx.TransportError as exc:
            raise AdminApiUnreachable(
                f"the admin API at {self.url} does not answer ({type(exc).__name__}): is the system "
                "running (`make run`)? METERING_ADMIN_API_URL says where it is"
            ) from None
        if r.status_code == 200:
            return r
        if r.status_code == 404:
            return None
        message = _message(r)
        if r.status_code == 401:
            raise AdminApiError(
                f"the admin API at {self.url} refused the admin token ({message}): the token changes "
                "at every start of the system unless METERING_ADMIN_TOKEN sets it; is "
                "METERING_ADMIN_TOKEN (or METERING_ADMIN_TOKEN_FILE) the running system's?"
            )
        if r.status_code >= 500:
            raise AdminApiUnreachable(
                f"the admin API at {self.url} is unavailable ({r.status_code}: {message})"
            )
        raise AdminApiError(f"the admin API at {self.url} answered {r.status_code}: {message}")

    def get(self, tenant: str, kind: AdminKind, entity_id: str) -> dict[str, Any] | None:
        """One entity of ``tenant``, or None if it (or the tenant) does not exist."""
        r = self._get(f"/tenants/{_seg(tenant)}/{kind.value}/{_seg(entity_id)}")
        return None if r is None else dict(r.json())

    def list(
        self,
        tenant: str,
        kind: AdminKind,
        filters: Mapping[str, str] | None = None,
        limit: int | None = None,
    ) -> tuple[list[dict[str, Any]], int] | None:
        """Up to ``limit`` (default: all) entities matching ``filters`` in id order, and how many
        match in all; None if the tenant has no entity at all."""
        items: list[dict[str, Any]] = []
        after: str | None = None
        total = 0
        while limit is None or len(items) < limit:
            page_size = 1000 if limit is None else min(1000, limit - len(items))
            params: dict[str, Any] = {**(filters or {}), "limit": page_size}
            if after is not None:
                params["after"] = after
            r = self._get(f"/tenants/{_seg(tenant)}/{kind.value}", params)
            if r is None:
                return None
            body = r.json()
            items.extend(body["items"])
            total = int(body["total"])
            after = body["next_after"]
            if after is None:
                break
        return items, total

    def tenant_exists(self, tenant: str) -> bool:
        return self.list(tenant, AdminKind.WORKSPACES, limit=1) is not None


def _seg(value: str) -> str:
    """One path segment: everything escaped, ``/`` included."""
    return quote(value, safe="")


def _message(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["message"])
    except Exception:
        return r.text[:200] or r.reason_phrase


# ---- waiting for the aggregator ------------------------------------------------------------------

#: The status an event leaves its entity in (events absent here leave it as it was).
RESULTING_STATUS: dict[EventType, str] = {
    EventType.WORKSPACE_CREATED: "active",
    EventType.CONTRACT_CREATED: "active",
    EventType.MEMBER_JOINED: "active",
    EventType.MEMBER_LEFT: "left",
    EventType.MEMBER_ACTIVATED: "active",
    EventType.MEMBER_DEACTIVATED: "inactive",
    EventType.VIRTUAL_KEY_CREATED: "active",
    EventType.VIRTUAL_KEY_REVOKED: "revoked",
    EventType.AGENT_CREATED: "active",
    EventType.AGENT_ACTIVATED: "active",
    EventType.AGENT_DEACTIVATED: "inactive",
    EventType.WORKSTATION_CREATED: "active",
    EventType.DATASTREAM_CREATED: "active",
    EventType.API_KEY_CREATED: "active",
    EventType.API_KEY_REVOKED: "revoked",
    EventType.ACCESS_TOKEN_ISSUED: "active",
    EventType.ACCESS_TOKEN_REVOKED: "revoked",
}


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True)
class Expectation:
    """An entity as it is once the aggregator has applied an event sent at ``at``.

    The projection folds an entity's events in event-time order and stamps ``updated_at`` with
    the latest one's time (``aggregators/projection.py``), so ``updated_at >= at`` says the fold
    has taken this event in (or a later one of the same entity); ``status`` is what the event
    leaves it in."""

    kind: AdminKind
    entity_id: str
    at: datetime
    status: str | None

    def met(self, item: Mapping[str, Any] | None) -> bool:
        if item is None:
            return False
        if self.status is not None and item.get("status") != self.status:
            return False
        return _time(str(item["updated_at"])) >= self.at


def expectations(events: Iterable[Mapping[str, Any]]) -> list[Expectation]:
    """What the prepared lifecycle ``events`` leave behind: one expectation per entity (its
    latest event's)."""
    latest: dict[tuple[AdminKind, str], Expectation] = {}
    for e in events:
        event_type = EventType(e["type"])
        kind = AdminKind.of(LIFECYCLE_KIND[event_type])
        entity_id = str(e["subject"])
        at = _time(str(e["time"]))
        previous = latest.get((kind, entity_id))
        if previous is None or at >= previous.at:
            latest[(kind, entity_id)] = Expectation(kind, entity_id, at, RESULTING_STATUS.get(event_type))
    return list(latest.values())


def wait_applied(
    api: AdminClient,
    tenant: str,
    wanted: Iterable[Expectation],
    timeout_s: float,
    interval_s: float = 0.2,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Poll until every expectation is met (True) or ``timeout_s`` has passed (False).
    ``AdminApiError`` (the API stopped answering) propagates."""
    pending = list(wanted)
    deadline = clock() + timeout_s
    while True:
        pending = [x for x in pending if not x.met(api.get(tenant, x.kind, x.entity_id))]
        if not pending:
            return True
        if clock() >= deadline:
            return False
        sleep(interval_s)
