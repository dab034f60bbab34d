"""How the process runner starts the SQL endpoint (deploy/runner.py), without Kafka: on, and the
three ways it is off while the rest of the process starts."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from deploy.runner import Part, _start_sql_endpoint
from deploy.settings import RunSettings

pytestmark = pytest.mark.clickhouse


def start(settings: RunSettings, parts: set[Part]) -> tuple[str, str]:
    """(banner line, /ping answer or '') of an endpoint started and stopped by the runner's code."""

    async def scenario() -> tuple[str, str]:
        closers: list[Any] = []
        server, task, line = await _start_sql_endpoint(settings, parts, closers)
        if server is None:
            return line, ""
        while not server.started:
            await asyncio.sleep(0.02)
        port = line.split("http://127.0.0.1:")[1].split()[0]
        async with httpx.AsyncClient() as http:
            ping = (await http.get(f"http://127.0.0.1:{port}/ping")).text
        server.should_exit = True
        await task
        for closer in closers:
            closer.close()
        return line, ping

    return asyncio.run(scenario())


def test_the_runner_starts_it_or_says_why_not(
    clickhouse: tuple[Any, str], clickhouse_dsn: str, tmp_path: Path
) -> None:
    _, db = clickhouse
    base = {
        "clickhouse_dsn": SecretStr(clickhouse_dsn),
        "clickhouse_database": db,
        "sql_keys_file": tmp_path / "k",
    }
    line, ping = start(RunSettings(**base, sql_port=0), {Part.QUERY, Part.INGEST, Part.AGGREGATOR})
    assert "SQL endpoint  http://127.0.0.1:" in line and ping == "Ok.\n"
    assert start(RunSettings(**base, sql_port=0), {Part.INGEST}) == ("", "")  # not the query part's
    line, _ = start(RunSettings(**base, sql_enabled=False), {Part.QUERY})
    assert "off (METERING_SQL_ENABLED=false)" in line
    server = {**base, "clickhouse_dsn": SecretStr("http://u:p@127.0.0.1:1")}
    line, _ = start(RunSettings(**server), {Part.QUERY})
    assert "off: analysts query the ClickHouse server itself" in line
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        line, _ = start(RunSettings(**base, sql_port=taken.getsockname()[1]), {Part.QUERY})
    assert "off: the SQL endpoint cannot listen on 127.0.0.1:" in line and "METERING_SQL_PORT" in line
