"""``metering run`` (and each part's command) runs on the loop ``METERING_EVENT_LOOP`` names:
uvloop by default (cheaper per HTTP request, docs/performance.md), Python's asyncio on request."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvloop

import deploy.cli
import deploy.runner
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
