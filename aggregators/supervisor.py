"""The aggregator part of a process, restarted when its watchdog asks.

``metering run`` and ``metering aggregator`` run the faust app through ``AggregatorPart``. When a
partition stays stalled after the watchdog sought it back (watchdog.py), the part replaces its
faust app with a new one: the old app is stopped the way Ctrl-C stops it (a batch still waiting
out an outage is not acknowledged; acknowledged offsets are committed; the consumer leaves the
group), then a new app with a new consumer joins the group and reads every partition it is given
from its committed offset. Whatever the old app applied without committing is read again and
skipped by the raw watermark (docs/exactly-once.md), so a restart is safe at any moment. The
processor, its ClickHouse client and the watchdog's memory of the stall carry over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import faust

from aggregators.app import build_app, new_watchdog
from aggregators.processor import BatchProcessor
from deploy.settings import AggregatorSettings

log = logging.getLogger(__name__)


class AggregatorPart:
    def __init__(self, settings: AggregatorSettings, bootstrap: str, processor: BatchProcessor) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.processor = processor
        self.metering_watchdog = new_watchdog(settings)
        self.restarts = 0
        self.app: faust.App | None = None
        self._wanted = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._restarting = False
        self._why = ""  # why the restart asked for (or under way) is

    async def start(self) -> None:
        self.app = self._new_app()
        await self.app.start()
        self._task = asyncio.create_task(self._supervise())

    def request_restart(self, why: str = "a partition stayed stalled") -> None:
        """Called on the event loop (by the watchdog task, or the agent when it died) when the app
        must be replaced."""
        self._why = why
        self._wanted.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.app is not None:
            await _stop(self.app)

    async def _supervise(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            log.warning("restarting the aggregator part (restart %d): %s", self.restarts + 1, self._why)
            self._restarting = True
            try:
                if self.app is not None:
                    await _stop(self.app)
                self.metering_watchdog.restarted()
                self.app = self._new_app()
                self.restarts += 1
                await self.app.start()
            finally:
                self._restarting = False
                if not self._wanted.is_set():  # else: the reason of the restart asked for meanwhile
                    self._why = ""
            log.warning("aggregator part restarted")

    def _new_app(self) -> faust.App:
        return build_app(
            self.settings,
            self.bootstrap,
            self.processor,
            watchdog=self.metering_watchdog,
            restart=self.request_restart,
        )

    # ---- what the health check reads (deploy/runner.py, aggregator_check) ---------------------

    @property
    def crashed(self) -> bool:
        return bool(getattr(self.app, "crashed", False))

    @property
    def crash_reason(self) -> Any:
        return getattr(self.app, "crash_reason", None)

    @property
    def restarting(self) -> str:
        """Why the part is being restarted ("" when it is not)."""
        return self._why if self._restarting or self._wanted.is_set() else ""

    @property
    def should_stop(self) -> bool:
        # (while it restarts, the part is not stopped: the watchdog's stall shows as degraded)
        return not self._restarting and (self.app is None or bool(self.app.should_stop))


async def _stop(app: faust.App) -> None:
    app.metering_stopping.set()  # type: ignore[attr-defined]
    await app.stop()
