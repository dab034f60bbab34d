"""Analyst keys: the credentials of the SQL endpoint (user ``analyst``, the key as password).

Stored like the admin token, not like tenants' keys: a file on this machine
(``METERING_SQL_KEYS_FILE``, default ``.cache/analyst-keys.json``, mode 0600, replaced
atomically) written by ``metering admin analyst-key create|revoke`` and read by the process that
serves the endpoint, which re-reads it whenever it changes, so a revocation holds from the next
request. Why not lifecycle events on the control topic, as API keys are:

- an analyst key belongs to no tenant: it reads every tenant's tables, like the admin token;
- the endpoint exists only on the embedded engine, i.e. on the one machine that holds the data
  directory, so a file there reaches every process that can serve it;
- the ``entities`` table, where lifecycle events end up, is readable through the endpoint itself:
  analysts would read the hashes of their own keys.

Only a key's SHA-256 is stored, with an id, a display prefix, a name and dates. A presented key
is hashed and compared with every stored hash with ``hmac.compare_digest`` (no early exit), so
timing says nothing about which key or how much of it was right. Tenants' API keys
(``fl_live_``), access tokens (``mt_at_``) and the admin token are never in this file, so they
open nothing here.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson

from query_api.admin_token import write_token_file

log = logging.getLogger(__name__)

ANALYST_KEY_PREFIX = "mt_sql_"
ANALYST_USER = "analyst"


def new_analyst_key() -> str:
    return ANALYST_KEY_PREFIX + secrets.token_urlsafe(32)


def _digest(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


@dataclass(frozen=True)
class AnalystKey:
    id: str
    name: str
    prefix: str
    key_hash: str
    created_at: str
    revoked_at: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class UnknownKey(Exception):
    """No analyst key with that id."""


def load_keys(path: Path) -> list[AnalystKey]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    if not raw.strip():
        return []
    return [AnalystKey(**item) for item in orjson.loads(raw)["keys"]]


def _save(path: Path, keys: list[AnalystKey]) -> None:
    body = orjson.dumps({"keys": [asdict(k) for k in keys]}, option=orjson.OPT_INDENT_2).decode()
    write_token_file(path, body)  # 0600 from creation, atomic replace


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


_write_lock = threading.Lock()


def create_key(path: Path, name: str = "") -> tuple[AnalystKey, str]:
    """A new key: stored as its hash; the raw key is returned to be shown once."""
    raw = new_analyst_key()
    key = AnalystKey(
        id=f"ak_{uuid.uuid4().hex[:16]}",
        name=name,
        prefix=raw[: len(ANALYST_KEY_PREFIX) + 4],
        key_hash=_digest(raw),
        created_at=_now(),
    )
    with _write_lock:
        _save(path, [*load_keys(path), key])
    return key, raw


def revoke_key(path: Path, key_id: str) -> AnalystKey:
    """Mark a key revoked (it stays listed, refused from the next request on)."""
    with _write_lock:
        keys = load_keys(path)
        for i, k in enumerate(keys):
            if k.id == key_id:
                if k.active:
                    keys[i] = AnalystKey(**{**asdict(k), "revoked_at": _now()})
                    _save(path, keys)
                return keys[i]
    raise UnknownKey(key_id)


class AnalystKeyStore:
    """The endpoint's view of the key file, re-read when its modification time or size changes."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp: tuple[int, int] | None = None
        self._hashes: list[str] = []
        self._lock = threading.Lock()

    def _refresh(self) -> list[str]:
        try:
            st = os.stat(self._path)
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                try:
                    self._hashes = [k.key_hash for k in load_keys(self._path) if k.active] if stamp else []
                except (OSError, ValueError, TypeError, KeyError) as exc:
                    # A file edited by hand into something unreadable opens nothing (and says so).
                    log.error("analyst keys file %s unreadable, every key refused: %s", self._path, exc)
                    self._hashes = []
                self._stamp = stamp
            return self._hashes

    def verify(self, user: str, presented: str) -> bool:
        """True for user ``analyst`` with an active key; constant time in the key."""
        hashes = self._refresh()
        digest = _digest(presented).encode()
        ok = False
        for stored in hashes:
            ok |= hmac.compare_digest(stored.encode(), digest)
        return ok and hmac.compare_digest(user.encode(), ANALYST_USER.encode()) and bool(presented)
