"""``metering admin … list`` output: a table when it fits, else one entity per paragraph, so
that ids are never folded (they are copied whole into ``revoke --id``)."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from ingest.admin_list import show
from query_api.admin_reader import AdminKind

KEY = {
    "id": "key_3f66673a8ee5407aba6078142a9dc83e",
    "prefix": "fl_live_g8h7",
    "scope": "workspace",
    "workspace_id": "1a7a1da9-8afc-4130-93ff-1845c8c70124",
    "member_id": None,
    "email": None,
    "status": "active",
    "created_at": "2026-11-29T18:31:02.123Z",
}
TOKEN = {
    "id": "tok_1",
    "member_id": "m-1",
    "email": "a@b.c",
    "status": "active",
    "expired": True,
    "expires_at": "2026-11-01T00:00:00.000Z",
    "created_at": "2026-10-01T00:00:00.000Z",
}


def shown(width: int, kind: AdminKind, items: list[dict[str, Any]], total: int) -> str:
    console = Console(width=width, record=True, color_system=None)
    with console.capture() as captured:
        show(console, "acme", kind, items, total)
    return captured.get()


def test_a_table_when_it_fits() -> None:
    text = shown(200, AdminKind.API_KEYS, [KEY], 1)
    assert "┃ id" in text and str(KEY["id"]) in text and "fl_live_g8h7" in text
    assert "2026-11-29 18:31:02" in text


def test_one_entity_per_paragraph_when_it_does_not() -> None:
    text = shown(80, AdminKind.API_KEYS, [KEY, KEY], 3)
    assert "api-keys of tenant acme (2 of 3)" in text
    lines = text.splitlines()
    assert lines.count(str(KEY["id"])) == 2  # whole, on a line of its own
    assert "  workspace  1a7a1da9-8afc-4130-93ff-1845c8c70124" in lines


def test_an_expired_token_shows_as_expired() -> None:
    text = shown(200, AdminKind.ACCESS_TOKENS, [TOKEN], 1)
    assert "expired" in text and "active" not in text
