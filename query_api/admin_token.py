"""The admin token: the one credential of the admin API (``/admin/v1``), and where it comes from.

It is ``METERING_ADMIN_TOKEN`` when set. Otherwise the process that serves the API
(``metering run``, ``metering query-api``) generates a fresh random one at every start and
writes it to ``METERING_ADMIN_TOKEN_FILE`` (default ``.cache/admin-token``) with mode 0600, so
only the user running the system can read it; ``metering admin`` reads the variable or that file.
A restart therefore invalidates a generated token, and a token never outlives the process
that accepts it. Several query processes must share one token: set the variable for them.

The file is replaced atomically (written beside it, then renamed), so a reader never sees half a
token; it is created 0600 before the token is written, so there is no moment at which another
user could read it.

The token is compared with the presented one through their SHA-256 digests and
``hmac.compare_digest``: constant time, and the same length whatever was presented.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import TypeVar

from pydantic import SecretStr

from deploy.settings import AdminTokenSettings, QuerySettings

#: Generated tokens start with this, so that one found in a log or a shell history is recognisable.
ADMIN_TOKEN_PREFIX = "mt_admin_"

S = TypeVar("S", bound=QuerySettings)


class AdminTokenMissing(Exception):
    """No admin token is configured and none was found in the token file."""


def new_admin_token() -> str:
    return ADMIN_TOKEN_PREFIX + secrets.token_urlsafe(32)


def same_token(presented: str, expected: str) -> bool:
    """Constant-time equality of two tokens (digests first: equal lengths, whatever was sent)."""
    a = hashlib.sha256(presented.encode()).digest()
    b = hashlib.sha256(expected.encode()).digest()
    return hmac.compare_digest(a, b)


def write_token_file(path: Path, token: str) -> None:
    """Write ``token`` to ``path``, readable by this user only (0600), replacing it atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask
        os.write(fd, f"{token}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def ensure_admin_token(settings: S) -> tuple[S, str]:
    """The settings with an admin token (``METERING_ADMIN_TOKEN``, or one generated now and
    written to the token file), and a line for the start-up banner saying where it is."""
    if settings.admin_token is not None:
        return settings, "  Admin token   from METERING_ADMIN_TOKEN"
    token = new_admin_token()
    write_token_file(settings.admin_token_file, token)
    updated = settings.model_copy(update={"admin_token": SecretStr(token)})
    line = (
        f"  Admin token   generated for this run, in {settings.admin_token_file} (mode 0600; "
        "`metering admin` reads it; set METERING_ADMIN_TOKEN to choose one)"
    )
    return updated, line


def load_admin_token(settings: AdminTokenSettings) -> str:
    """The token a client presents: ``METERING_ADMIN_TOKEN``, else the token file's content."""
    if settings.admin_token is not None:
        return settings.admin_token.get_secret_value().strip()
    path = settings.admin_token_file
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        raise AdminTokenMissing(
            f"no admin token: set METERING_ADMIN_TOKEN, or start the system (`make run`), "
            f"which writes one to {path}"
        ) from None
    except OSError as exc:
        raise AdminTokenMissing(f"cannot read the admin token file {path}: {exc.strerror}") from None
    if not token:
        raise AdminTokenMissing(f"the admin token file {path} is empty")
    return token
