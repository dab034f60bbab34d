"""The partition watchdog: an aggregator checks that every partition it owns makes progress.

A *lane* (a partition, schemas/wire.py) owned by this process *progresses* when a batch of its
messages is applied, or when it is seen with nothing to consume (the log end is at the first
offset not applied: an idle partition is not a stalled one). A lane that has not progressed for
``timeout_s`` is *stalled*: messages wait in Kafka that this process should be applying and is
not. The watchdog knows nothing of Kafka or faust; the aggregator (aggregators/app.py) feeds it
what it sees and carries out the actions it returns:

1. ``RESEEK``: resume the partition's fetch and seek it back to its committed offset (re-reading
   applied messages is harmless: the raw watermark skips them);
2. ``RESTART``: still stalled ``timeout_s`` after the previous action: the aggregator part is
   restarted (a new consumer, a new group member; its uncommitted batches are read again, which
   exactly-once makes safe). Repeated every ``timeout_s`` for as long as the stall lasts.

The stall clock of every lane restarts when the lanes are (re)assigned (the consumer seeks all of
them to their committed offsets then: a reseek of its own) and is held while a batch is being
applied or retried (``busy``): a batch waiting out a ClickHouse outage or a long batch is not a
consumer stall and is reported elsewhere (processor.py); no action would help it. Times are in
seconds of a monotonic clock, passed in.

Beyond the lanes, the watchdog judges the aggregator as a whole (``Trouble``): a rebalance that
has not completed after ``patience_s``, a consumer that has not answered the watchdog's questions
for ``patience_s`` (its thread hung, or the broker away), an agent that is no longer running
(it crashed) call for ``RESTART`` (``restart_due``, at most once per ``timeout_s``); a batch held
in one ClickHouse call for longer than ``timeout_s`` without failing is only reported: a thread
blocked in a call cannot be interrupted, and a restart would wait for that batch first.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum

from prometheus_client import REGISTRY, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class Action(StrEnum):
    RESEEK = "reseek"
    RESTART = "restart"


STALLS = Counter(
    "metering_partition_stalls_total",
    "Stalled partitions found by the watchdog, by the healing action taken",
    ["action"],
)
for _action in Action:
    STALLS.labels(_action.value)  # both series exist from the start, at 0


class Trouble(StrEnum):
    REBALANCE = "rebalance"  # a rebalance under way for longer than the timeout
    UNANSWERED = "unanswered"  # the consumer (or the broker) has not answered for the timeout
    AGENT = "agent"  # the agent is not running: it crashed
    BATCH = "batch"  # one batch in a ClickHouse call for longer than the timeout, not failing


TROUBLES = Counter(
    "metering_aggregator_troubles_total",
    "Troubles of a whole aggregator found by the watchdog (a restart is asked for every kind "
    "but batch, which is only reported)",
    ["trouble"],
)
for _trouble in Trouble:
    TROUBLES.labels(_trouble.value)


@dataclass(frozen=True)
class Observation:
    """What the aggregator sees of one lane it owns."""

    lane: int
    end_offset: int  # the log end: the offset the next message produced will get
    next_offset: int  # the first offset not applied (the highest applied + 1, or the committed offset)

    @property
    def lag(self) -> int:
        return max(0, self.end_offset - self.next_offset)


@dataclass(frozen=True)
class Stall:
    lane: int
    lag: int
    stalled_s: float  # since the lane last progressed (or was assigned, or last busy)
    action: Action | None  # None: an action was taken and is being given time to work


@dataclass
class _Lane:
    progress: float  # the last progress (or the assignment)
    hold: float  # the stall clock starts from max(progress, hold)
    lag: int = 0
    acted: Action | None = None
    acted_at: float = 0.0


class Watchdog:
    def __init__(
        self, timeout_s: float, clock: Callable[[], float] = time.monotonic, patience_s: float | None = None
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.timeout_s = timeout_s
        # how long a rebalance or an unanswered consumer may last: never less than the timeout
        # (a rebalance waits for every member, a slow one included; a broker may be restarting)
        self.patience_s = max(timeout_s, patience_s or 0.0)
        self.clock = clock
        self._lanes: dict[int, _Lane] = {}
        self._stalls: dict[int, Stall] = {}
        # since when each trouble has lasted (None: not now); the last restart asked for
        self._since: dict[Trouble, float | None] = dict.fromkeys(Trouble)
        self._counted: set[Trouble] = set()
        self._restarted_at: float | None = None
        _watchdogs.add(self)

    # ---- what the aggregator reports ----------------------------------------------------------

    def own(self, lanes: Iterable[int]) -> None:
        """The lanes this process owns from now on (after a rebalance). Every stall clock
        restarts; lanes no longer owned are forgotten."""
        now = self.clock()
        self._since[Trouble.REBALANCE] = None
        self._counted.discard(Trouble.REBALANCE)
        owned = set(lanes)
        for lane in set(self._lanes) - owned:
            del self._lanes[lane]
            self._stalls.pop(lane, None)
        for lane in owned:
            state = self._lanes.get(lane)
            if state is None:
                self._lanes[lane] = state = _Lane(progress=now, hold=now)
            state.hold = now

    def progressed(self, lanes: Iterable[int]) -> None:
        """A batch of these lanes was applied."""
        now = self.clock()
        for lane in lanes:
            state = self._lanes.get(lane)
            if state is not None:
                self._progress(lane, state, now)

    def observe(self, observations: Iterable[Observation], busy: bool = False) -> list[Stall]:
        """Judge the lanes observed (lanes not owned are ignored); returns the stalls that call
        for an action now (each lane's action at most once per ``timeout_s``)."""
        now = self.clock()
        acts: list[Stall] = []
        for ob in observations:
            state = self._lanes.get(ob.lane)
            if state is None:
                continue
            state.lag = ob.lag
            if ob.lag == 0:
                self._progress(ob.lane, state, now)
                continue
            if busy:
                state.hold = now
            stalled_s = now - max(state.progress, state.hold)
            if stalled_s < self.timeout_s:
                self._stalls.pop(ob.lane, None)
                continue
            action: Action | None = None
            if state.acted is None:
                action = Action.RESEEK
            elif now - state.acted_at >= self.timeout_s:
                action = Action.RESTART
            if action is not None:
                state.acted, state.acted_at = action, now
                STALLS.labels(action.value).inc()
            stall = Stall(ob.lane, ob.lag, stalled_s, action)
            self._stalls[ob.lane] = stall
            if action is not None:
                acts.append(stall)
        return acts

    def restarted(self) -> None:
        """A new app replaces the old one (supervisor.py): the troubles' clocks start again (the
        old app's revocation at its stop is no rebalance of the new one)."""
        for trouble in (Trouble.REBALANCE, Trouble.UNANSWERED, Trouble.AGENT):
            self._mark(trouble, False)

    def rebalancing(self) -> None:
        """A rebalance started (partitions revoked); ``own`` ends it."""
        if self._since[Trouble.REBALANCE] is None:
            self._since[Trouble.REBALANCE] = self.clock()

    def answered(self, ok: bool) -> None:
        """Whether the consumer answered the watchdog's questions (offsets) this time."""
        self._mark(Trouble.UNANSWERED, not ok)

    def agent_running(self, ok: bool) -> None:
        self._mark(Trouble.AGENT, not ok)

    def batch(self, in_call: bool) -> None:
        """A batch entered (True) or left (False) its ClickHouse calls."""
        self._mark(Trouble.BATCH, in_call)

    def _mark(self, trouble: Trouble, on: bool) -> None:
        if not on:
            self._since[trouble] = None
            self._counted.discard(trouble)
        elif self._since[trouble] is None:
            self._since[trouble] = self.clock()

    def troubles(self) -> dict[Trouble, float]:
        """The troubles that have lasted the timeout, with how long."""
        now = self.clock()
        out: dict[Trouble, float] = {}
        for trouble, since in list(self._since.items()):
            if since is None:
                continue
            lasted = now - since
            limit = self.patience_s if trouble in (Trouble.REBALANCE, Trouble.UNANSWERED) else self.timeout_s
            if lasted >= limit:
                out[trouble] = lasted
                if trouble not in self._counted:
                    self._counted.add(trouble)
                    TROUBLES.labels(trouble.value).inc()
        return out

    def restart_due(self) -> list[Trouble]:
        """The troubles that call for a restart now (none within ``timeout_s`` of the last one)."""
        due: list[Trouble] = [t for t in self.troubles() if t is not Trouble.BATCH]
        now = self.clock()
        if not due or (self._restarted_at is not None and now - self._restarted_at < self.timeout_s):
            return []
        self._restarted_at = now
        return due

    # ---- what the health check and the metrics read -------------------------------------------

    def stalls(self) -> list[Stall]:
        """The lanes stalled at the last observation (read from other threads: a copy)."""
        return sorted(dict(self._stalls).values(), key=lambda s: s.lane)

    def since_progress(self) -> dict[int, float]:
        """Seconds since each owned lane last progressed (or was assigned)."""
        now = self.clock()
        return {lane: max(0.0, now - s.progress) for lane, s in list(self._lanes.items())}

    def _progress(self, lane: int, state: _Lane, now: float) -> None:
        state.progress = now
        state.acted = None  # a stall (if any) is over: the next one starts with a reseek
        self._stalls.pop(lane, None)


def describe(stalls: Iterable[Stall]) -> str:
    """``/readyz``'s words for the stalled lanes."""
    parts = [f"partition {s.lane} ({s.lag} behind, {s.stalled_s:.0f}s)" for s in stalls]
    return "stalled: " + ", ".join(parts) if parts else ""


_TROUBLE_WORDS = {
    Trouble.REBALANCE: "a rebalance not completed for {:.0f}s",
    Trouble.UNANSWERED: "the consumer has not answered for {:.0f}s",
    Trouble.AGENT: "the agent is not running (crashed {:.0f}s ago)",
    Trouble.BATCH: "a batch held in a ClickHouse call for {:.0f}s",
}


def describe_troubles(troubles: dict[Trouble, float]) -> str:
    """``/readyz``'s words for the aggregator's troubles."""
    return "; ".join(_TROUBLE_WORDS[t].format(s) for t, s in sorted(troubles.items()))


_watchdogs: weakref.WeakSet[Watchdog] = weakref.WeakSet()


class _LastProgress(Collector):
    """``metering_partition_last_progress_seconds{partition}``, computed when scraped from the
    live watchdogs of this process (a lane owned by none has no series)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "metering_partition_last_progress_seconds",
            "Seconds since a partition (lane) owned by this aggregator last progressed: a batch "
            "of it applied, or nothing left to consume",
            labels=["partition"],
        )
        seen: dict[int, float] = {}
        for dog in list(_watchdogs):
            for lane, seconds in dog.since_progress().items():
                seen[lane] = min(seconds, seen.get(lane, seconds))
        for lane, seconds in sorted(seen.items()):
            family.add_metric([str(lane)], seconds)
        yield family


REGISTRY.register(_LastProgress())
