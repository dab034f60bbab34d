"""The partition watchdog (aggregators/watchdog.py): pure logic, the clock passed in."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY, generate_latest

from aggregators.watchdog import TROUBLES, Action, Observation, Stall, Trouble, Watchdog, describe


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def dog(timeout: float = 30.0) -> tuple[Watchdog, Clock]:
    clock = Clock()
    return Watchdog(timeout, clock), clock


def ob(lane: int, end: int, nxt: int) -> Observation:
    return Observation(lane, end, nxt)


def actions(stalls: list[Stall]) -> list[tuple[int, Action | None]]:
    return [(s.lane, s.action) for s in stalls]


def test_a_lane_with_nothing_to_consume_is_never_stalled() -> None:
    w, clock = dog()
    w.own([0])
    for _ in range(10):
        clock.now += 60
        assert w.observe([ob(0, 100, 100)]) == []
    assert w.stalls() == []
    assert w.since_progress() == {0: 0.0}  # seen caught up: progress


def test_a_lane_behind_without_progress_is_reseeked_after_the_timeout_then_restarted() -> None:
    w, clock = dog(30)
    w.own([0, 1])
    clock.now += 29.9
    assert w.observe([ob(0, 100, 40), ob(1, 5, 5)]) == []
    clock.now += 0.1
    got = w.observe([ob(0, 100, 40), ob(1, 5, 5)])
    assert actions(got) == [(0, Action.RESEEK)]
    assert got[0].lag == 60 and got[0].stalled_s == pytest.approx(30)
    # the reseek is given a timeout to work: no second action before
    clock.now += 29
    assert w.observe([ob(0, 100, 40)]) == []
    assert actions(w.stalls()) == [(0, None)]  # still reported as stalled
    clock.now += 1
    assert actions(w.observe([ob(0, 100, 40)])) == [(0, Action.RESTART)]
    # and again every timeout while it lasts
    clock.now += 30
    assert actions(w.observe([ob(0, 100, 40)])) == [(0, Action.RESTART)]


def test_progress_ends_a_stall_and_the_next_one_starts_with_a_reseek() -> None:
    w, clock = dog(10)
    w.own([3])
    clock.now += 10
    assert actions(w.observe([ob(3, 50, 0)])) == [(3, Action.RESEEK)]
    clock.now += 2
    w.progressed([3])  # the reseek worked
    assert w.stalls() == []
    clock.now += 9
    assert w.observe([ob(3, 60, 20)]) == []
    clock.now += 1
    assert actions(w.observe([ob(3, 60, 20)])) == [(3, Action.RESEEK)]


def test_steady_progress_is_no_stall_however_far_behind() -> None:
    w, clock = dog(5)
    w.own([0])
    for i in range(20):
        clock.now += 4
        w.progressed([0])
        assert w.observe([ob(0, 10_000, i * 10)]) == []


def test_busy_holds_the_clock_an_outage_is_not_a_consumer_stall() -> None:
    w, clock = dog(10)
    w.own([0, 1])
    for _ in range(6):  # a batch retried through a 60 s ClickHouse outage
        clock.now += 10
        assert w.observe([ob(0, 100, 0), ob(1, 100, 0)], busy=True) == []
    # the outage is over; the stall clock starts again from the end of it
    clock.now += 9
    assert w.observe([ob(0, 100, 0), ob(1, 100, 0)]) == []
    clock.now += 1
    assert actions(w.observe([ob(0, 100, 0), ob(1, 100, 0)])) == [(0, Action.RESEEK), (1, Action.RESEEK)]
    # the metric says the truth meanwhile: no progress for 70 s
    assert w.since_progress() == {0: 70.0, 1: 70.0}


def test_an_assignment_restarts_the_clocks_and_forgets_lanes_gone() -> None:
    w, clock = dog(10)
    w.own([0, 1])
    clock.now += 10
    assert actions(w.observe([ob(0, 9, 0), ob(1, 9, 0)])) == [(0, Action.RESEEK), (1, Action.RESEEK)]
    w.own([1, 2])  # a rebalance: faust seeks every partition to its committed offset
    assert [s.lane for s in w.stalls()] == [1]
    clock.now += 5
    assert w.observe([ob(0, 9, 0), ob(1, 9, 0), ob(2, 9, 0)]) == []  # 0 is not ours any more
    assert set(w.since_progress()) == {1, 2}
    clock.now += 5
    # lane 1 was being healed before the rebalance: the escalation goes on
    assert actions(w.observe([ob(1, 9, 0), ob(2, 9, 0)])) == [(1, Action.RESTART), (2, Action.RESEEK)]


def test_lanes_not_owned_are_ignored_and_control_lanes_count() -> None:
    w, clock = dog(1)
    w.own([-1])
    clock.now += 1
    assert actions(w.observe([ob(5, 10, 0), ob(-1, 3, 1)])) == [(-1, Action.RESEEK)]
    assert describe(w.stalls()) == "stalled: partition -1 (2 behind, 1s)"
    assert describe([]) == ""


def test_the_metrics_are_exported() -> None:
    w, clock = dog(1)
    w.own([7])
    clock.now += 4
    text = generate_latest(REGISTRY).decode()
    assert 'metering_partition_last_progress_seconds{partition="7"} 4.0' in text
    assert 'metering_partition_stalls_total{action="reseek"}' in text
    assert 'metering_partition_stalls_total{action="restart"}' in text


def test_a_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Watchdog(0)


def test_readyz_names_the_stalled_partitions_degraded_and_stays_200() -> None:
    from types import SimpleNamespace

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from deploy.runner import aggregator_check
    from query_api.health import build_health_router

    w, clock = dog(30)
    w.own([0, 2])
    app_state = SimpleNamespace(crashed=False, should_stop=False, metering_watchdog=w)
    api = FastAPI()
    api.include_router(build_health_router({"aggregator": aggregator_check(app_state)}, cache_s=0))
    client = TestClient(api)
    assert client.get("/readyz").json()["checks"]["aggregator"] == {"status": "ok", "detail": "consuming"}
    clock.now += 31
    w.observe([ob(0, 10, 10), ob(2, 500, 380)])
    got = client.get("/readyz")
    assert got.status_code == 200
    assert got.json() == {
        "status": "degraded",
        "checks": {
            "aggregator": {
                "status": "degraded",
                "detail": "stalled: partition 2 (120 behind, 31s); the watchdog is healing them",
            }
        },
    }
    w.progressed([2])
    assert client.get("/readyz").json()["status"] == "ok"


# ---- the aggregator's troubles (beyond its lanes) ------------------------------------------------


def _troubles(kind: Trouble) -> float:
    return TROUBLES.labels(kind.value)._value.get()


def test_a_rebalance_that_never_completes_asks_for_a_restart_once_per_timeout() -> None:
    w, clock = dog(30)
    w.own([0])
    counted = _troubles(Trouble.REBALANCE)
    w.rebalancing()
    clock.now += 29
    assert w.restart_due() == [] and w.troubles() == {}
    clock.now += 1
    assert w.restart_due() == [Trouble.REBALANCE]
    assert _troubles(Trouble.REBALANCE) == counted + 1
    clock.now += 10
    assert w.restart_due() == []  # the restart is given its time
    assert w.troubles() == {Trouble.REBALANCE: 40.0}
    clock.now += 20
    assert w.restart_due() == [Trouble.REBALANCE]
    assert _troubles(Trouble.REBALANCE) == counted + 1  # one trouble, counted once
    w.own([0, 1])  # the rebalance completed
    assert w.troubles() == {} and w.restart_due() == []


def test_a_consumer_that_does_not_answer_and_a_dead_agent_ask_for_a_restart() -> None:
    w, clock = dog(10)
    w.answered(False)
    w.agent_running(False)
    clock.now += 5
    w.answered(False)  # still not: the clock runs from the first time
    assert w.restart_due() == []
    clock.now += 5
    assert w.restart_due() == [Trouble.UNANSWERED, Trouble.AGENT]
    w.answered(True)
    assert set(w.troubles()) == {Trouble.AGENT}


def test_a_batch_held_in_a_clickhouse_call_is_reported_never_restarted() -> None:
    w, clock = dog(10)
    w.batch(True)
    clock.now += 12
    w.batch(True)
    assert w.troubles() == {Trouble.BATCH: 12.0}
    assert w.restart_due() == []
    w.batch(False)
    assert w.troubles() == {}


def test_readyz_names_the_troubles_degraded() -> None:
    from types import SimpleNamespace

    from deploy.runner import aggregator_check

    w, clock = dog(30)
    w.own([0])
    check = aggregator_check(SimpleNamespace(crashed=False, should_stop=False, metering_watchdog=w))
    assert check() == (True, "consuming")
    w.rebalancing()
    w.batch(True)
    clock.now += 45
    status, detail = check()
    assert str(status) == "degraded"
    assert detail.startswith("a batch held in a ClickHouse call for 45s; a rebalance not completed for 45s")
    assert 'metering_aggregator_troubles_total{trouble="rebalance"}' in generate_latest(REGISTRY).decode()


def test_a_rebalance_and_an_unanswered_consumer_are_given_the_patience() -> None:
    clock = Clock()
    w = Watchdog(2, clock, patience_s=18)
    w.rebalancing()
    w.answered(False)
    w.batch(True)
    clock.now += 10
    assert w.restart_due() == [] and set(w.troubles()) == {Trouble.BATCH}
    clock.now += 8
    assert w.restart_due() == [Trouble.REBALANCE, Trouble.UNANSWERED]


def test_a_restart_starts_the_troubles_clocks_again() -> None:
    w, clock = dog(10)
    w.rebalancing()  # the old app's revocation, at its stop
    clock.now += 8
    w.restarted()
    w.rebalancing()  # the new app's first join
    clock.now += 8
    assert w.troubles() == {}
    clock.now += 2
    assert w.restart_due() == [Trouble.REBALANCE]


def test_readyz_says_why_the_aggregator_part_restarts() -> None:
    """The part asked to restart (by the watchdog, or by its agent that died in a batch) is
    degraded with the reason until the new app runs."""
    from types import SimpleNamespace

    from aggregators.supervisor import AggregatorPart
    from deploy.runner import aggregator_check
    from deploy.settings import AggregatorSettings

    part = AggregatorPart(AggregatorSettings(), "127.0.0.1:9", None)  # type: ignore[arg-type]
    part.app = SimpleNamespace(crashed=False, should_stop=False)  # type: ignore[assignment]
    check = aggregator_check(part)
    assert part.restarting == ""
    assert check()[0] is True
    part.request_restart("the agent died in a batch: KeyError('x')")
    status, detail = check()
    assert str(status) == "degraded"
    assert detail == "restarting the aggregator: the agent died in a batch: KeyError('x')"
