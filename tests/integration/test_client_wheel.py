"""The client distribution on its own: build its wheel, install it into a fresh virtualenv (its
dependencies come from the package index), check that nothing of the server stack came with it,
measure what it takes on disk, and send events with it over a real socket to a stand-in ingest
(a stdlib HTTP server here: the real pipeline is exercised in test_client_pipeline.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

# ~12 s here, most of it pip fetching pydantic and httpx from the package index
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SERVER_SIDE = ["chdb", "faust", "fastapi", "pandas", "pyarrow", "confluent_kafka", "clickhouse_connect"]
OURS = ["ingest", "aggregators", "query_api", "schemas", "deploy"]
LIMIT_MB = 30.0

SCRIPT = r"""
import importlib.util, json, sys
from metering_client import MeteringClient, Backoff
absent = [m for m in sys.argv[2].split(",") if importlib.util.find_spec(m) is None]
with MeteringClient(sys.argv[1], api_key="fl_test_wheel", source="wheel-test",
                    backoff=Backoff(base_s=0.01, cap_s=0.05)) as client:
    for i in range(5):
        client.workstation_cpu(workstation_id="ws-1", cpu_seconds=1.5, id=f"w-{i}")
m = client.metrics
server_modules = sorted(n for n in sys.modules if n.split(".")[0] in sys.argv[3].split(","))
print(json.dumps({"absent": absent, "sent": m.sent, "retried": m.retried, "server_modules": server_modules}))
"""


class StandIn(BaseHTTPRequestHandler):
    """Answers the first request 503 (Retry-After 0), then 202 with a result per event."""

    seen: ClassVar[list[dict[str, Any]]] = []
    calls: ClassVar[int] = 0

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        cls = type(self)
        cls.calls += 1
        if cls.calls == 1:
            self.send_response(503)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        assert self.headers["Content-Type"] == "application/json"
        assert self.headers["Authorization"] == "Bearer fl_test_wheel"
        events = json.loads(body.decode("utf-8"))
        cls.seen.extend(events)
        out = json.dumps(
            {"results": [{"index": i, "id": e["id"], "status": "accepted"} for i, e in enumerate(events)]}
        ).encode()
        self.send_response(202)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def stand_in() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def run(*args: str | Path, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done.stdout


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def test_the_client_wheel_installs_alone_and_sends_events(tmp_path: Path, stand_in: str) -> None:
    # cwd is the temporary directory throughout: the checkout's packages must not be importable
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

    out = run(python, "-c", SCRIPT, stand_in, ",".join(SERVER_SIDE), ",".join(OURS), cwd=tmp_path)
    report = json.loads(out.strip().splitlines()[-1])
    assert report["absent"] == SERVER_SIDE  # none of the server stack was installed
    assert report["server_modules"] == []  # and nothing of ours but the client was imported
    assert report["sent"] == 5 and report["retried"] == 1
    assert [e["id"] for e in StandIn.seen] == [f"w-{i}" for i in range(5)]  # each once, after the 503
