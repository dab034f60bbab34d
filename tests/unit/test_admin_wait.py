"""What ``metering admin --wait`` waits for (pure: no broker, no API)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from ingest.admin_client import Expectation, expectations, wait_applied
from query_api.admin_reader import AdminKind

T0 = "2026-11-22T10:00:00.123Z"
T1 = "2026-11-22T10:00:00.124Z"


def event(type_: str, subject: str, time: str = T0) -> dict[str, Any]:
    return {"type": type_, "subject": subject, "time": time, "data": {}}


def item(status: str, updated_at: str) -> dict[str, Any]:
    return {"id": "x", "status": status, "updated_at": updated_at}


def test_each_event_says_what_it_leaves_behind() -> None:
    got = expectations(
        [
            event("contract.created", "c-1"),
            event("contract.workspace_added", "ws-1"),
            event("member.left", "ws-1/m-1"),
            event("api_key.revoked", "key-1"),
        ]
    )
    at = datetime(2026, 11, 22, 10, 0, 0, 123000, tzinfo=UTC)
    assert got == [
        Expectation(AdminKind.CONTRACTS, "c-1", at, "active"),
        Expectation(AdminKind.WORKSPACES, "ws-1", at, None),  # any status: its contract changed
        Expectation(AdminKind.MEMBERS, "ws-1/m-1", at, "left"),
        Expectation(AdminKind.API_KEYS, "key-1", at, "revoked"),
    ]


def test_one_expectation_per_entity_its_latest_event() -> None:
    (only,) = expectations([event("agent.created", "a", T0), event("agent.deactivated", "a", T1)])
    assert (only.kind, only.status, only.at.microsecond) == (AdminKind.AGENTS, "inactive", 124000)


def test_met_needs_the_status_and_an_update_at_least_as_recent() -> None:
    (revoked,) = expectations([event("api_key.revoked", "key-1", T1)])
    assert not revoked.met(None)  # not there at all
    assert not revoked.met(item("active", T1))
    assert not revoked.met(item("revoked", T0))  # revoked before, by another event: not this one yet
    assert revoked.met(item("revoked", T1))
    assert revoked.met(item("revoked", "2026-11-22T10:00:01.000Z"))
    (updated,) = expectations([event("workspace.updated", "ws-1", T1)])
    assert not updated.met(item("active", T0)) and updated.met(item("active", T1))


class FakeApi:
    def __init__(self, answers: list[dict[str, Any] | None]) -> None:
        self.answers = answers
        self.calls = 0

    def get(self, tenant: str, kind: AdminKind, entity_id: str) -> dict[str, Any] | None:
        self.calls += 1
        return self.answers[min(self.calls, len(self.answers)) - 1]


def test_wait_polls_until_applied_or_gives_up() -> None:
    wanted = expectations([event("api_key.created", "key-1", T0)])
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    api = FakeApi([None, None, item("active", T0)])
    assert wait_applied(api, "t", wanted, 5.0, 0.2, lambda: now[0], sleep)  # type: ignore[arg-type]
    assert api.calls == 3 and now[0] == 0.4
    now[0] = 0.0
    never = FakeApi([None])
    assert not wait_applied(never, "t", wanted, 1.0, 0.25, lambda: now[0], sleep)  # type: ignore[arg-type]
    assert never.calls == 5  # at 0, 0.25, ..., 1.0 s: the last one at the deadline
