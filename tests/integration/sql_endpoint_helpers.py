"""A SQL endpoint served in a background thread of the test process (the embedded engine is the
test session's: one per process), with one analyst key."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from pydantic import SecretStr

from deploy.settings import RunSettings
from query_api.analyst_keys import create_key
from query_api.sql_endpoint import SqlEndpoint, bind_socket, build_sql_app, open_endpoint, sql_server_config


@dataclass
class Served:
    port: int
    key: str
    database: str
    endpoint: SqlEndpoint
    keys_file: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextmanager
def serve_sql(dsn: str, database: str, keys_file: Path, **overrides: Any) -> Iterator[Served]:
    _, raw = create_key(keys_file, "test")
    settings = RunSettings(
        clickhouse_dsn=SecretStr(dsn),
        clickhouse_database=database,
        sql_port=0,
        sql_keys_file=keys_file,
        **overrides,
    )
    sock = bind_socket(settings)
    endpoint = open_endpoint(settings)
    assert endpoint is not None
    server = uvicorn.Server(sql_server_config(build_sql_app(endpoint), settings))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield Served(sock.getsockname()[1], raw, database, endpoint, keys_file)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        endpoint.close()
