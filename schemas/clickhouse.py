"""The one way to reach ClickHouse: clickhouse-connect, with a DSN.

``chdb:///dir`` runs the real ClickHouse engine in this process (the embedded default);
``http(s)://user:pass@host:8123`` reaches a server with the same code and the same SQL. chdb
locks its data directory to one process, so a process opens one engine: ``connect`` caches one
client per DSN, and ``connect_part`` gives each part of a process (API, aggregator, health) a
client of its own on that engine, so that no part queues behind another's statements.

The embedded engine is started by the first chdb connection of the process, with that
connection's server options; later connections share it and cannot change them. So every chdb
connection made here carries the same ``EngineCaps`` (the bounds of the engine's caches, its
memory and its allocator's arenas), and whichever comes first starts the engine with them.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
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
    EVENT_KEYS = "event_keys"
    EVENT_KEY_WATERMARKS = "event_key_watermarks"
    SCHEMA_MIGRATIONS = "schema_migrations"


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineCaps:
    """Memory bounds of the embedded engine (``chdb://`` only), for a 2-core, few-GiB process.

    ClickHouse sizes its caches for a server that owns the machine (5 GiB mark, index-mark and
    primary-index caches; a memory limit of 90 % of RAM), and its allocator (jemalloc, inside
    chdb) keeps freed pages for 5 s before returning them. In a process that also runs faust and
    the query API, bounded figures keep the resident size flat (docs/performance.md, "Bounded
    memory"). Sizes in bytes; ``max_server_memory_usage`` 0 means ClickHouse's own default.
    deploy/settings.py (``METERING_CHDB_*``) sets them per deployment.
    """

    max_server_memory_usage: int = 3 << 30
    merges_mutations_memory_usage_soft_limit: int = 1 << 30
    mark_cache_size: int = 64 << 20
    index_mark_cache_size: int = 16 << 20
    primary_index_cache_size: int = 64 << 20
    uncompressed_cache_size: int = 0
    query_condition_cache_size: int = 16 << 20
    compiled_expression_cache_size: int = 32 << 20
    # jemalloc's options (chdb reads them from JE_MALLOC_CONF when it is loaded)
    malloc_conf: str = "dirty_decay_ms:1000,muzzy_decay_ms:0"
    # Bloom filters in the files of the engine's RocksDB tables (event_keys), bits per key; 0:
    # none (ClickHouse's default). A key not in a file is answered by its filter without reading
    # a block: most of dedupe's look-ups, a batch's events being mostly new. At 10M stored keys
    # the look-up cost 14.4 µs per key without, 6.1 with (docs/performance.md).
    rocksdb_bloom_bits_per_key: int = 10

    def server_options(self) -> dict[str, str]:
        """The server settings, as chdb connection-string parameters (engine startup options)."""
        options = {
            k: str(v)
            for k, v in asdict(self).items()
            if k not in ("malloc_conf", "rocksdb_bloom_bits_per_key")
        }
        if self.rocksdb_bloom_bits_per_key:
            # RocksDB's options exist only as a section of ClickHouse's configuration file
            options["config-file"] = str(_rocksdb_config(self.rocksdb_bloom_bits_per_key))
        return options


def _rocksdb_config(bits_per_key: int) -> Path:
    """A ClickHouse configuration file holding only the RocksDB tables' Bloom filter (every other
    setting keeps its default or comes with the connection's options, which take precedence)."""
    text = (
        "<clickhouse><rocksdb><block_based_table_options>"
        f"<filter_policy>bloomfilter:{int(bits_per_key)}:false</filter_policy>"
        "</block_based_table_options></rocksdb></clickhouse>\n"
    )
    folder = Path(tempfile.gettempdir()) / f"metering-chdb-{os.getuid()}"
    folder.mkdir(exist_ok=True)
    path = folder / f"rocksdb-bloom-{int(bits_per_key)}.xml"
    if not path.exists() or path.read_text() != text:
        # written whole, then renamed: a process starting its engine meanwhile never reads half
        part = folder / f".{path.name}.{os.getpid()}"
        part.write_text(text)
        os.replace(part, path)
    return path


def _chdb_kwargs(dsn: str, caps: EngineCaps | None) -> dict[str, Any]:
    """``get_client`` arguments that start an embedded engine with ``caps`` (none for a server).

    The allocator's options must be in the environment before chdb is loaded (jemalloc reads them
    once, at its first allocation); a ``JE_MALLOC_CONF`` already set by the user is kept.
    """
    if not dsn.startswith("chdb:"):
        return {}
    caps = caps or EngineCaps()
    if caps.malloc_conf:
        if "chdb" not in sys.modules:
            os.environ.setdefault("JE_MALLOC_CONF", caps.malloc_conf)
        elif os.environ.get("JE_MALLOC_CONF") != caps.malloc_conf:
            log.warning(
                "chdb was loaded before its allocator options could be set: %s not applied", caps.malloc_conf
            )
    return {"chdb_options": caps.server_options()}


_clients: dict[str, Client] = {}
_lock = threading.Lock()


def connect(dsn: str, database: str, engine: EngineCaps | None = None, **kwargs: Any) -> Client:
    """A client for ``dsn`` with ``database`` created if missing.

    Embedded clients are cached per DSN: a second chdb session on the same directory in one
    process would fight over the same lock file. ``engine``: the embedded engine's bounds if this
    connection starts it (default ``EngineCaps()``); ignored for a server.
    """
    with _lock:
        key = f"{dsn}|{database}"
        if key in _clients:
            return _clients[key]
        client = clickhouse_connect.get_client(dsn=dsn, **_chdb_kwargs(dsn, engine), **kwargs)
        client.command(f"CREATE DATABASE IF NOT EXISTS {_ident(database)}")
        _clients[key] = client
        return client


def chdb_path(client: Any) -> str | None:
    """The data directory of a clickhouse-connect chdb client (the embedded engine in this
    process; ``':memory:'`` or ``''`` for one in memory), None for a server's client: what decides
    whether the engine's memory is the process's own and whether more handles can be opened on
    it (``connect_part(f"chdb://{path}", ...)``)."""
    path = getattr(client, "path", None)
    if isinstance(path, str) and str(getattr(client, "uri", "")).startswith("chdb:"):
        return path
    return None


def connect_part(
    dsn: str, database: str, settings: dict[str, Any] | None = None, engine: EngineCaps | None = None
) -> Client:
    """A client of one part of a process (the API, the aggregator, the health checks), never shared.

    One clickhouse-connect client runs one statement at a time (its chdb backend behind a lock):
    parts sharing one queue behind each other, and the query API and ``/readyz`` waited for the
    aggregator's statements. On ``chdb://`` each client is a connection handle of its own on the
    process's one engine (same directory, same data), and handles run concurrently; a server
    (``http(s)://``) gets a connection pool per part. ``settings`` go with every statement of this
    client (e.g. the aggregator's bounded share of the engine: ``max_threads``,
    ``max_memory_usage``). ``engine``: as for ``connect``.
    """
    client = clickhouse_connect.get_client(
        dsn=dsn, settings=dict(settings or {}), **_chdb_kwargs(dsn, engine)
    )
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
