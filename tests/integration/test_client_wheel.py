"""The client distribution on its own against the real pipeline: build its wheel, install it into a
fresh virtualenv (its dependencies come from the package index), check that nothing of the server
stack came with it, measure what it takes on disk, and send events with it over a real socket to
the real ingest (uvicorn configured by ``deploy.http_server.server_config``, in a thread), which
puts them on a real broker for the faust aggregator to write into the embedded ClickHouse engine;
the query API then counts each event sent exactly once."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn

from aggregators.direct import make_processor
from deploy.http_server import server_config
from deploy.runner import Part, build_http_app
from deploy.settings import RunSettings
from tests.integration.helpers import running_faust, wait_until
from tests.integration.test_hardening_control_plane import (
    CHILD,
    TENANT,
    administrator_world,
    raw_ids,
    render,
    settings_for,
)

# ~12 s of it pip fetching pydantic and httpx from the package index (while the aggregator starts)
pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SERVER_SIDE = ["chdb", "faust", "fastapi", "pandas", "pyarrow", "confluent_kafka", "clickhouse_connect"]
OURS = ["ingest", "aggregators", "query_api", "schemas", "deploy"]
LIMIT_MB = 30.0
N = 150  # two requests: 100 + 50
METER = "ai_tasks"  # a COUNT meter: its value is the number of events counted

# argv: base URL, API key, workspace, N, the server's packages, ours
SCRIPT = r"""
import importlib.util, json, sys
from metering_client import MeteringClient, Backoff
url, key, workspace, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
absent = [m for m in sys.argv[5].split(",") if importlib.util.find_spec(m) is None]
with MeteringClient(url, api_key=key, source="wheel-test", backoff=Backoff(base_s=0.05, cap_s=0.5)) as client:
    for i in range(n):
        client.ai_task_submitted(workspace_id=workspace, task_id=f"t-{i}", task_type="upscale", id=f"wheel-{i}")
m = client.metrics  # leaving the block raised DeliveryFailed if any event was not delivered
server_modules = sorted(n for n in sys.modules if n.split(".")[0] in sys.argv[6].split(","))
print(json.dumps({"absent": absent, "sent": m.sent, "duplicates": m.duplicates, "rejected": m.rejected,
                  "retried": m.retried, "requests": m.requests, "server_modules": server_modules}))
"""


@dataclass
class Live:
    url: str
    settings: RunSettings
    processor: Any
    client: Any
    db: str


@contextmanager
def serving(app: Any, settings: RunSettings) -> Iterator[str]:
    """``app`` under a real uvicorn (``server_config``) on a free 127.0.0.1 port, in a thread with
    its own event loop; the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(server_config(app, settings))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def live(kafka_bootstrap: str, topic: str, clickhouse: tuple[Any, str]) -> Iterator[Live]:
    """The ingest and the query API of one process (``build_http_app``) served on a socket."""
    client, db = clickhouse
    settings = settings_for(topic, db)
    app, closers = build_http_app(settings, client, kafka_bootstrap, {Part.INGEST, Part.QUERY})
    try:
        with serving(app, settings) as url:
            yield Live(url, settings, make_processor(client, db), client, db)
    finally:
        for closer in closers:
            closer.close()


def run(*args: str | Path, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done.stdout


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def install_client(tmp_path: Path) -> Path:
    """The client's wheel installed into a fresh virtualenv; its python. cwd is the temporary
    directory throughout: the checkout's packages must not be importable."""
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "-w",
        tmp_path / "dist",
        ROOT / "client",
        cwd=tmp_path,
    )
    [wheel] = (tmp_path / "dist").glob("usage_metering_client-*.whl")
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    [site] = (venv / "lib").glob("python3*/site-packages")
    before = tree_bytes(site)
    run(python, "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel, cwd=tmp_path)
    added_mb = (tree_bytes(site) - before) / 1e6
    print(
        f"client installed: {added_mb:.1f} MB in site-packages (fresh venv in all: {tree_bytes(venv) / 1e6:.1f} MB)"
    )
    assert added_mb < LIMIT_MB
    return python


def meter_total(url: str, key: str) -> Decimal:
    """What the query API's generic meter query counts for the key's tenant (this month)."""
    r = httpx.get(
        f"{url}/api/v1/meters/{METER}/query", headers={"Authorization": f"Bearer {key}"}, timeout=10
    )
    assert r.status_code == 200, r.text
    return sum((Decimal(str(row["value"])) for row in r.json()["data"]), Decimal(0))


def test_the_client_wheel_installs_alone_and_its_events_are_counted_once(
    tmp_path: Path, kafka_bootstrap: str, topic: str, live: Live
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    # the tenant, its workspaces and a workspace-scoped key of CHILD, on the control topic
    world = administrator_world(kafka_bootstrap, topic, now - timedelta(hours=1))
    ids = {f"wheel-{i}" for i in range(N)}

    def ready() -> bool:
        """The key is known and its workspace applied: a warm-up event (another meter) is taken."""
        r = httpx.post(
            f"{live.url}/api/v1/events",
            content=orjson.dumps([render("warm-up", now)]),
            headers={"Authorization": f"Bearer {world.child_key}", "Content-Type": "application/json"},
            timeout=10,
        )
        return r.status_code == 202 and r.json()["accepted"] + r.json()["duplicates"] == 1

    async def scenario() -> dict[str, Any]:
        async with running_faust(live.settings, kafka_bootstrap, live.processor):
            python, up = await asyncio.gather(
                asyncio.to_thread(install_client, tmp_path), asyncio.to_thread(wait_until, ready, 60.0)
            )
            assert up, "the pipeline did not take the warm-up event"
            argv = [live.url, world.child_key, CHILD, str(N), ",".join(SERVER_SIDE), ",".join(OURS)]
            out = await asyncio.to_thread(run, python, "-c", SCRIPT, *argv, cwd=tmp_path)
            counted = await asyncio.to_thread(
                wait_until, lambda: meter_total(live.url, world.child_key) >= N, 60.0
            )
            assert counted, f"the query API counts {meter_total(live.url, world.child_key)} of {N}"
            await asyncio.sleep(1.0)  # a double count would have arrived by now
            report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
            return report

    report = asyncio.run(scenario())
    print(f"client metrics: {report}")
    assert report["absent"] == SERVER_SIDE  # none of the server stack was installed
    assert report["server_modules"] == []  # and nothing of ours but the client was imported
    assert report["sent"] == N and report["rejected"] == {}, report
    # every event once: in the raw table, and in the query API's answer
    assert raw_ids(live.client, live.db, "ai.task.submitted") == ids
    rows = live.client.query(
        f"SELECT count(), uniqExact(event_id) FROM {live.db}.events_raw WHERE tenant = {{t:String}} "
        "AND type = 'ai.task.submitted'",
        parameters={"t": TENANT},
    ).result_rows
    assert rows == [(N, N)]
    assert meter_total(live.url, world.child_key) == Decimal(N)
