"""The query benchmarks' timed client, in a process of its own: as a user's client is, outside the
server's process.

bench/queries.py and bench/under_ingest.py time the documented endpoints against a server that
shares its process (and its GIL) with the aggregator. A client thread in that process waited for
the GIL to send each request and again to read each answer, behind the aggregator's Python work:
time that a user's request, sent from anywhere else, never waits. Here the requests are sent from
a child process over real HTTP (bench/http_client.py, one kept-alive connection per endpoint),
one at a time, each timed from its send to its answer read.

    python -m bench.timed_client SPEC.json
SPEC: ``{"requests": {name: {"method", "url", "headers"}}, "per_endpoint": N, "warmup": K}``:
N requests to each endpoint in turn (the first K of each not kept); or ``"per_endpoint": null``:
round after round over every endpoint until this process's standard input is closed. Prints one
JSON line: ``{name: [milliseconds, ...]}``. A request answered other than 200 ends the process
with status 1 and the answer on standard error.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import uvloop

from bench.http_client import Connection

ROOT = Path(__file__).resolve().parents[1]


class RequestFailed(Exception):
    """A timed request was answered other than 200."""


async def time_requests(
    requests: dict[str, dict[str, Any]], per_endpoint: int | None, warmup: int, stop: Callable[[], bool]
) -> dict[str, list[float]]:
    """{name: milliseconds of each kept request}; see the module's docstring for the two modes."""
    samples: dict[str, list[float]] = {name: [] for name in requests}
    targets: dict[str, tuple[Connection, str]] = {}  # name -> (its connection, path and query)
    for name, req in requests.items():
        url = urlsplit(req["url"])
        targets[name] = (
            Connection(f"{url.scheme}://{url.netloc}", {}),
            url.path + (f"?{url.query}" if url.query else ""),
        )
    connections = [conn for conn, _ in targets.values()]

    async def one(name: str) -> float:
        conn, path = targets[name]
        req = requests[name]
        t0 = time.perf_counter()
        status, body = await conn.request(req["method"], path, headers=req["headers"])
        elapsed_ms = (time.perf_counter() - t0) * 1000
        if status != 200:
            raise RequestFailed(f"{name}: {status} {body[:200].decode(errors='replace')}")
        return elapsed_ms

    try:
        for conn in connections:
            await conn.__aenter__()
        if per_endpoint is not None:
            for name in requests:
                for i in range(per_endpoint):
                    elapsed_ms = await one(name)
                    if i >= warmup:
                        samples[name].append(elapsed_ms)
        else:
            while not stop():
                for name in requests:
                    samples[name].append(await one(name))
    finally:
        for conn in connections:
            await conn.__aexit__()
    return samples


def start(
    requests: dict[str, dict[str, Any]], per_endpoint: int | None, warmup: int = 0
) -> subprocess.Popen[bytes]:
    """The timed client started in a child process; ``collect`` its samples. With
    ``per_endpoint=None`` it times until ``collect`` closes its standard input."""
    with tempfile.NamedTemporaryFile(prefix="timed-client-", suffix=".json", delete=False) as spec:
        spec.write(orjson.dumps({"requests": requests, "per_endpoint": per_endpoint, "warmup": warmup}))
    return subprocess.Popen(
        [sys.executable, "-m", "bench.timed_client", spec.name],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def collect(proc: subprocess.Popen[bytes], timeout: float = 600) -> dict[str, list[float]]:
    """The samples of a child from ``start``: its standard input closed (the stop, for one that
    times until then), then its one JSON line. Raises ``RuntimeError`` if it failed."""
    out, err = proc.communicate(timeout=timeout)
    Path(proc.args[-1]).unlink(missing_ok=True)  # type: ignore[index]  # the spec file
    if proc.returncode != 0:
        raise RuntimeError(
            f"the timed client failed ({proc.returncode}): {err.decode(errors='replace')[-2000:]}"
        )
    return {name: list(v) for name, v in orjson.loads(out.splitlines()[-1]).items()}


def main(spec_path: str) -> int:
    spec = orjson.loads(Path(spec_path).read_bytes())
    closed = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.buffer.read()  # returns at EOF: the parent closed it
        closed.set()

    if spec.get("per_endpoint") is None:
        threading.Thread(target=watch_stdin, daemon=True).start()
    try:
        samples = uvloop.run(
            time_requests(
                spec["requests"], spec.get("per_endpoint"), int(spec.get("warmup", 0)), closed.is_set
            )
        )
    except RequestFailed as exc:
        print(exc, file=sys.stderr, flush=True)
        return 1
    print(orjson.dumps(samples).decode(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
