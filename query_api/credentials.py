"""API keys and access tokens: generated here, stored only as a SHA-256 hash, looked up by it.

A raw secret never leaves the process that generated it except once, to the person creating it.
Lookup is by the hash of what the caller presented, and the stored hash is then compared with
``hmac.compare_digest``, so timing says nothing about how much of a secret was right.

This is the one query that runs before the tenant is known: it finds the tenant.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from clickhouse_connect.driver.client import Client

from query_api.lookup_cache import LookupCache
from schemas.events import EntityKind

LIVE_PREFIX = "fl_live_"
TEST_PREFIX = "fl_test_"
TOKEN_PREFIX = "mt_at_"


def hash_secret(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def new_api_key(live: bool = True) -> str:
    return (LIVE_PREFIX if live else TEST_PREFIX) + secrets.token_urlsafe(24)


def new_access_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def display_prefix(raw: str) -> str:
    """What may be shown and logged: the kind prefix and four characters."""
    head = raw[: len(LIVE_PREFIX)] if raw.startswith((LIVE_PREFIX, TEST_PREFIX)) else raw[:6]
    return head + raw[len(head) : len(head) + 4]


@dataclass(frozen=True)
class Principal:
    """Who is calling: an API key or an access token, resolved to its tenant."""

    tenant: str
    kind: EntityKind  # API_KEY or ACCESS_TOKEN
    credential_id: str
    scope: str  # "member" | "workspace" for keys, "member" for tokens
    workspace_id: str
    member_id: str
    email: str
    status: str
    expires_at: datetime | None

    @property
    def active(self) -> bool:
        return self.status == "active"

    def expired(self, now: datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or datetime.now(UTC))


class CredentialStore:
    """Resolves presented secrets to principals, with a short cache (revocations take effect
    within ``ttl_s``; a credential in use is reloaded in the background before that:
    ``lookup_cache.py``)."""

    def __init__(self, client: Client, database: str, ttl_s: float = 2.0) -> None:
        self._client = client
        self._db = database
        self._cache = LookupCache(ttl_s, max_items=100_000, name="credential-refresh")

    def lookup(self, raw: str, kind: EntityKind) -> Principal | None:
        if not raw or len(raw) > 512:
            return None
        digest = hash_secret(raw)
        return self._cache.get(f"{kind}:{digest}", lambda: self._fetch(digest, kind))

    def cached(self, raw: str, kind: EntityKind) -> Any:
        """``lookup``'s answer if it is kept young enough, else ``MISS``; never reads ClickHouse
        on the calling thread (it may be the event loop)."""
        if not raw or len(raw) > 512:
            return None
        digest = hash_secret(raw)
        return self._cache.peek(f"{kind}:{digest}", lambda: self._fetch(digest, kind))

    def _fetch(self, digest: str, kind: EntityKind) -> Principal | None:
        rows = self._client.query(
            f"SELECT tenant, entity_id, secret_hash, status, workspace_id, email, expires_at, attrs "
            f"FROM {self._db}.entities FINAL WHERE kind = {{kind:String}} AND secret_hash = {{h:String}} LIMIT 1",
            parameters={"kind": kind.value, "h": digest},
        ).result_rows
        if not rows:
            return None
        tenant, entity_id, stored, status, workspace_id, email, expires_at, attrs = rows[0]
        if not hmac.compare_digest(str(stored), digest):
            return None
        extra = _attrs(attrs)
        if expires_at is not None and expires_at.tzinfo is None:
            expires_at = expires_at.replace(tzinfo=UTC)
        return Principal(
            tenant=str(tenant),
            kind=kind,
            credential_id=str(entity_id),
            scope=str(extra.get("scope", "member")),
            workspace_id=str(workspace_id),
            member_id=str(extra.get("member_id", "")),
            email=str(email),
            status=str(status),
            expires_at=expires_at,
        )


def _attrs(text: str | None) -> dict[str, Any]:
    """A credential's ``attrs``: a JSON object as the projection writes it. Anything else (a row
    written by hand, or by a bug) reads as no attributes, so the credential gets the narrowest
    defaults (scope ``member``, no member id) instead of failing every request with a 500."""
    if not text:
        return {}
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
