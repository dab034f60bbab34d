"""The one way to reach ClickHouse: clickhouse-connect, with a DSN.

``chdb:///dir`` runs the real ClickHouse engine in this process (the embedded default);
``http(s)://user:pass@host:8123`` reaches a server with the same code and the same SQL. chdb
locks its data directory to one process, so a process opens one engine: ``connect`` caches one
client per DSN, and ``connect_part`` gives each part of a process (API, aggregator, health) a
client of its own on that engine, so that no part queues behind another's statements.
"""

from __future__ import annotations

import threading
from enum import StrEnum
from typing import Any

import clickhouse_connect
from clickhouse_connect.driver.client import Client


class Table(StrEnum):
    EVENTS_RAW = "events_raw"
    USAGE_15M = "usage_15m"
    USAGE_1H = "usage_1h"
    USAGE_1D = "usage_1d"
    USAGE_1MO = "usage_1mo"
    GAUGE_15M = "gauge_15m"
    ENTITIES = "entities"
    TENANT_FRESHNESS = "tenant_freshness"
    REJECTIONS = "rejections"
    EVENT_DUPLICATES = "event_duplicates"
    SCHEMA_MIGRATIONS = "schema_migrations"


_clients: dict[str, Client] = {}
_lock = threading.Lock()


def connect(dsn: str, database: str, **kwargs: Any) -> Client:
    """A client for ``dsn`` with ``database`` created if missing.

    Embedded clients are cached per DSN: a second chdb session on the same directory in one
    process would fight over the same lock file.
    """
    with _lock:
        key = f"{dsn}|{database}"
        if key in _clients:
            return _clients[key]
        client = clickhouse_connect.get_client(dsn=dsn, **kwargs)
        client.command(f"CREATE DATABASE IF NOT EXISTS {_ident(database)}")
        _clients[key] = client
        return client


def connect_part(dsn: str, database: str, settings: dict[str, Any] | None = None) -> Client:
    """A client of one part of a process (the API, the aggregator, the health checks), never shared.

    One clickhouse-connect client runs one statement at a time (its chdb backend behind a lock):
    parts sharing one queue behind each other, and the query API and ``/readyz`` waited for the
    aggregator's statements. On ``chdb://`` each client is a connection handle of its own on the
    process's one engine (same directory, same data), and handles run concurrently; a server
    (``http(s)://``) gets a connection pool per part. ``settings`` go with every statement of this
    client (e.g. the aggregator's bounded share of the engine: ``max_threads``,
    ``max_memory_usage``).
    """
    client = clickhouse_connect.get_client(dsn=dsn, settings=dict(settings or {}))
    client.command(f"CREATE DATABASE IF NOT EXISTS {_ident(database)}")
    return client


def forget(dsn: str, database: str) -> None:
    """Drop a cached client (tests that delete the directory or the database)."""
    with _lock:
        client = _clients.pop(f"{dsn}|{database}", None)
    if client is not None and not dsn.startswith("chdb://"):
        client.close()


def ping(client: Client) -> bool:
    try:
        return bool(client.command("SELECT 1") == 1)
    except Exception:
        return False


def _ident(name: str) -> str:
    if not name.replace("_", "").isalnum():
        raise ValueError(f"not an identifier: {name!r}")
    return name
