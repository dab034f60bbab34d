"""How ``metering run`` (and each part's command) starts its process: on the loop
``METERING_EVENT_LOOP`` names (uvloop by default: cheaper per HTTP request, docs/performance.md;
Python's asyncio on request), with the collector set for a server (deploy/collector.py)."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest
import uvloop

import deploy.cli
import deploy.runner
from deploy import collector
from deploy.cli import _run
from deploy.settings import RunSettings


def _loop_of_run(monkeypatch: pytest.MonkeyPatch, settings: RunSettings) -> Any:
    seen: list[Any] = []

    async def serve(*_args: Any) -> None:  # stands in for the whole process
        seen.append(asyncio.get_running_loop())

    monkeypatch.setattr(deploy.runner, "serve", serve)
    monkeypatch.setattr(deploy.cli, "setup_logging", lambda *_: None)  # the test session's logging stays
    _run(set(), settings, False)
    assert len(seen) == 1
    return seen[0]


def test_uvloop_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METERING_EVENT_LOOP", raising=False)
    assert isinstance(_loop_of_run(monkeypatch, RunSettings()), uvloop.Loop)


def test_asyncio_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERING_EVENT_LOOP", "asyncio")
    loop = _loop_of_run(monkeypatch, RunSettings())
    assert not isinstance(loop, uvloop.Loop) and isinstance(loop, asyncio.BaseEventLoop)


def test_another_loop_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERING_EVENT_LOOP", "trio")
    with pytest.raises(ValueError, match="event_loop"):
        RunSettings()


def test_the_collector_is_set_for_a_server(monkeypatch: pytest.MonkeyPatch) -> None:
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        _loop_of_run(monkeypatch, RunSettings())
        assert gc.get_threshold() == collector.THRESHOLDS != (700, 10, 10)
    finally:
        gc.set_threshold(*before)


def test_freezing_takes_what_is_alive_out_of_the_collectors_walks() -> None:
    kept = [[i] for i in range(1000)]  # containers alive at "start-up"
    try:
        # at least the test's own (other threads of the worker may free frozen objects meanwhile:
        # the count is no fixed figure)
        assert collector.freeze_startup() >= 1000
        tracked = {id(o) for o in gc.get_objects()}  # what a full collection walks
        assert not any(id(k) in tracked for k in kept)
        fresh = [0]
        assert id(fresh) in {id(o) for o in gc.get_objects()}  # what comes after is still walked
    finally:
        gc.unfreeze()
