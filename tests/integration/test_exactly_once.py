"""Exactly once, with the real broker and real processes killed with SIGKILL.

The property: after any crash point, a restart, redelivery and producer retries, the raw and
period tables equal exactly what one clean pass over the deduplicated events gives.
Each run is a separate process on its own embedded ClickHouse directory (chdb locks a
directory to one process); the comparison is of the full table contents.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from aggregators.faults import CrashPoint
from tests.integration.helpers import event, produce_batches

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _events(seed: int = 11) -> list[dict[str, Any]]:
    """A mixed workload: sums, a gauge, uniques, lifecycle, and duplicates of earlier events."""
    rng = random.Random(seed)
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=3)
    out: list[dict[str, Any]] = []
    for t in range(3):
        tenant = f"tenant-{t}"
        out.append(
            event(
                f"{tenant}-ws",
                "workspace.created",
                {"workspace_id": "w1", "name": "W", "tier": "pro"},
                base,
                tenant,
            )
        )
        for i in range(400):
            at = base + timedelta(seconds=rng.randint(0, 3 * 3600))
            kind = i % 4
            if kind == 0:
                out.append(
                    event(
                        f"{tenant}-c{i}",
                        "ci.step.cpu",
                        {
                            "contract_id": "c1",
                            "workspace_id": "w1",
                            "step_id": f"s{i % 9}",
                            "cpu_seconds": rng.randint(1, 999) / 100,
                        },
                        at,
                        tenant,
                    )
                )
            elif kind == 1:
                out.append(
                    event(
                        f"{tenant}-m{i}",
                        "ci.step.memory",
                        {
                            "contract_id": "c1",
                            "workspace_id": "w1",
                            "step_id": f"s{i % 5}",
                            "memory_mib": rng.randint(64, 4096),
                        },
                        at,
                        tenant,
                    )
                )
            elif kind == 2:
                keys = [f"k{rng.randint(0, 300)}" for _ in range(rng.randint(1, 20))]
                out.append(
                    event(
                        f"{tenant}-d{i}",
                        "datastream.rows",
                        {
                            "workspace_id": "w1",
                            "datastream_id": f"d{i % 3}",
                            "total_rows": len(keys) + 3,
                            "row_keys": keys,
                        },
                        at,
                        tenant,
                    )
                )
            else:
                out.append(
                    event(
                        f"{tenant}-v{i}",
                        "virtual_key.extra_purchased",
                        {"workspace_id": "w1", "count": 1 + i % 3},
                        at,
                        tenant,
                    )
                )
        # events the aggregator rejects: recorded in `rejections` once, whatever crashed
        out.append(event(f"{tenant}-bad-type", "no.such.type", {}, base, tenant))
        out.append(
            event(f"{tenant}-bad-value", "egress.download", {"workspace_id": "w1", "bytes": -1}, base, tenant)
        )
    dups = rng.sample(out, 150)  # producer retries: the same events again, later in the log
    return out + dups


def _run(dsn: str, bootstrap: str, topic: str, group: str, crash_at: str | None, timeout: float = 180) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("METERING_CRASH_AT", None)
    if crash_at:
        env["METERING_CRASH_AT"] = crash_at
    proc = subprocess.run(
        [sys.executable, "-m", "tests.integration.aggregator_proc", "run", dsn, bootstrap, topic, group],
        env=env,
        cwd=ROOT,
        timeout=timeout,
        capture_output=True,
        text=True,
    )
    return proc.returncode


def _dump(dsn: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "tests.integration.aggregator_proc", "dump", dsn],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=120,
    )
    return orjson.loads(out.stdout)


@pytest.fixture
def produced(kafka_bootstrap: str, topic: str) -> str:
    produce_batches(kafka_bootstrap, topic, _events(), per_message=25)
    return topic


def _clean(kafka_bootstrap: str, topic: str) -> dict[str, Any]:
    dsn = f"chdb://{tempfile.mkdtemp(prefix='eo-clean-')}"
    assert _run(dsn, kafka_bootstrap, topic, f"clean-{topic}", None) == 0
    return _dump(dsn)


def test_crash_at_every_point_then_restart_equals_clean_pass(kafka_bootstrap: str, produced: str) -> None:
    topic = produced
    clean = _clean(kafka_bootstrap, topic)
    assert len(clean["raw"]) == 3 * 401  # duplicates dropped
    bad = {e["id"] for e in _events() if "-bad-" in e["id"]}
    assert {r[1] for r in clean["rejections"]} == bad and len(clean["event_duplicates"]) > 0
    dsn = f"chdb://{tempfile.mkdtemp(prefix='eo-crash-')}"
    group = f"crash-{topic}"
    missing: set[tuple[str, str]] = set()
    for point, nth in [
        (CrashPoint.AFTER_RAW_INSERT, 1),
        (CrashPoint.RAW_BEFORE_KEYS, 2),
        (CrashPoint.BETWEEN_DERIVED, 2),
        (CrashPoint.AFTER_DERIVED, 1),
        (CrashPoint.BEFORE_RAW_INSERT, 1),
        (CrashPoint.AFTER_BATCH, 1),
        (CrashPoint.BETWEEN_DERIVED, 5),
    ]:
        rc = _run(dsn, kafka_bootstrap, topic, group, f"{point.value}:{nth}")
        assert rc == -signal.SIGKILL, f"{point} did not crash (rc={rc})"
        if point is CrashPoint.RAW_BEFORE_KEYS:
            missing = _keys_left_out(dsn)
            # copies of the very events whose keys the crash left out, later in the log: the next
            # batch of the partition must catch the keys up before its lookup to see them as copies
            by_key = {(str(e["tenant"]), str(e["id"])): e for e in _events()}
            produce_batches(kafka_bootstrap, topic, [by_key[k] for k in sorted(missing)], per_message=25)
    assert _run(dsn, kafka_bootstrap, topic, group, None) == 0
    crashed = _dump(dsn)
    for table in clean:
        if table != "event_duplicates":
            assert crashed[table] == clean[table], f"{table} differs from a clean pass"
    # the duplicates' record: a clean pass's, and the copies produced after the crash, once each
    copies = Counter((r[0], r[1]) for r in crashed["event_duplicates"])
    copies.subtract(Counter((r[0], r[1]) for r in clean["event_duplicates"]))
    assert +copies == Counter(missing), "a copy of an event of the crashed batch was not recognised"
    assert {str(r[0]) for r in crashed["event_key_watermarks"]} == {str(r[6]) for r in crashed["raw"]}


def _keys_left_out(dsn: str) -> set[tuple[str, str]]:
    """After a crash at raw_before_keys: the raw rows whose keys are not in event_keys (some must
    be: the crash left event_keys behind, never ahead)."""
    mid = _dump(dsn)
    raw_keys = {(r[0], r[1]) for r in mid["raw"]}
    stored_keys = {(r[0], r[1]) for r in mid["event_keys"]}
    missing = raw_keys - stored_keys
    assert raw_keys and missing and stored_keys <= raw_keys, "the crash did not leave event_keys behind"
    return missing


def test_sigkill_from_outside_at_random_moments(kafka_bootstrap: str, produced: str) -> None:
    topic = produced
    clean = _clean(kafka_bootstrap, topic)
    dsn = f"chdb://{tempfile.mkdtemp(prefix='eo-kill-')}"
    group = f"kill-{topic}"
    rng = random.Random(3)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(3):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.integration.aggregator_proc",
                "run",
                dsn,
                kafka_bootstrap,
                topic,
                group,
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(4.0, 7.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert _run(dsn, kafka_bootstrap, topic, group, None) == 0
    killed = _dump(dsn)
    for table in clean:
        assert killed[table] == clean[table], f"{table} differs from a clean pass"
