"""How fast ``metering replay --from-offset 0`` re-reads the log (not part of ``make bench``):

    PYTHONPATH=. .venv/bin/python -m bench.replay [EVENTS] [--copies]

A broker of its own (or ``KAFKA_BOOTSTRAP_SERVERS``), ``EVENTS`` synthetic usage events from the
pipeline benchmark's producer (500 a message, 20 tenants; ``--copies``: the same events sent a
second time, a retry storm in the log), then the command run twice in a process of its own on
a fresh embedded database: into empty tables, then over the tables the first run wrote (the
rewrite an operator runs). Each run's seconds include the process's start, opening the engine
and the rebuild of the derived tables; both must write every event once."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid

from bench.pipeline import ROOT, _producer, bench_settings, stop_producers
from bench.run import broker


def replay_once(env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", "from deploy.cli import app; app()", "replay", "--from-offset", "0"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"metering replay failed: {done.stderr[-2000:]}")
    return seconds, done.stdout.strip().splitlines()[-1]


def main(events: int, copies: bool) -> None:
    from ingest.kafka_config import ensure_topics

    with broker() as bootstrap:
        topic = f"replay-{uuid.uuid4().hex[:8]}"
        dsn = f"chdb://{tempfile.mkdtemp(prefix='bench-replay-')}"
        settings = bench_settings(bootstrap, topic, dsn)
        ensure_topics(settings, bootstrap)
        try:
            for _ in range(2 if copies else 1):
                if _producer(bootstrap, topic, events, 0, 500, "t").wait() != 0:
                    raise RuntimeError("the producer failed")
        finally:
            stop_producers()
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "METERING_TOPIC_EVENTS": topic,
            "METERING_CLICKHOUSE_DSN": dsn,
            "METERING_CLICKHOUSE_DATABASE": settings.clickhouse_database,
        }
        read = events * (2 if copies else 1)
        for label in ("into empty tables", "over its own tables"):
            seconds, said = replay_once(env)
            print(f"replay {label}: {seconds:.1f} s, {read / seconds:,.0f} events read/s ({said})")
            if f"{events} events written" not in said:
                raise RuntimeError(f"expected {events} events written: {said}")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(int(args[0]) if args else 200_000, "--copies" in sys.argv)
