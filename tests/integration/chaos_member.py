"""An aggregator group member in a process of its own, for the chaos suite (tests/integration/
test_chaos.py): one that can really be SIGKILLed or SIGSTOPped while other members run.

The embedded engine is locked to one process, so the members of one test cannot each open it.
This one runs the real faust app (``build_app``: the consumer, the ownership rules, the watchdog)
in its own process and hands its batches, assignments and revocations over a local connection to
the test process, which applies them with a real ``BatchProcessor`` on the shared engine: the way
an aggregator talks to a ClickHouse *server*. Killing this process in the middle of a batch is
then what killing an aggregator whose statements the server is running is: what the server got
stays written, nothing is acknowledged, the member stops heartbeating without leaving the group.

``python -m tests.integration.chaos_member HOST PORT AUTHKEY_HEX BOOTSTRAP TOPIC GROUP SESSION_S``;
SIGTERM stops it the way Ctrl-C stops an aggregator.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import Client
from pathlib import Path
from typing import Any


class RemoteProcessor:
    """What ``build_app`` needs of a processor, carried out by the test process."""

    stalled_since = None
    # the test process applies one batch at a time; no preparing ahead across the connection
    prepares_ahead = False

    def open_stagers(self, connect: Any = None) -> bool:
        return False

    def __init__(self, address: tuple[str, int], authkey: bytes) -> None:
        self._conn = Client(address, authkey=authkey)
        self._lock = threading.Lock()

    def _call(self, op: str, arg: Any) -> Any:
        with self._lock:
            self._conn.send((op, arg))
            return self._conn.recv()

    def acquire(self, partitions: Sequence[int]) -> None:
        self._call("acquire", list(partitions))

    def revoke(self, partitions: Sequence[int]) -> None:
        self._call("revoke", list(partitions))

    def process_with_retry(
        self,
        messages: Sequence[Any],
        should_stop: Callable[[], bool],
        max_backoff_s: float,
        ahead: Any = None,
    ) -> Any:
        return True if self._call("apply", list(messages)) else None


async def run(
    address: tuple[str, int], authkey: bytes, bootstrap: str, topic: str, group: str, session_s: float
) -> None:
    from aggregators.app import build_app
    from deploy.settings import AggregatorSettings

    settings = AggregatorSettings(
        topic_events=topic,
        topic_dead_letter=f"{topic}.dlq",
        consumer_group=group,
        batch_max_messages=20,
        batch_within_s=0.1,
        faust_data_dir=Path(tempfile.mkdtemp(prefix="chaos-member-")),
        consumer_session_timeout_s=session_s,
        clickhouse_retry_max_s=1,
    )
    app = build_app(settings, bootstrap, RemoteProcessor(address, authkey))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await app.start()
    try:
        await stop.wait()
    finally:
        app.metering_stopping.set()  # type: ignore[attr-defined]
        await app.stop()


if __name__ == "__main__":
    host, port, key, bootstrap, topic, group, session_s = sys.argv[1:]
    asyncio.run(run((host, int(port)), bytes.fromhex(key), bootstrap, topic, group, float(session_s)))
