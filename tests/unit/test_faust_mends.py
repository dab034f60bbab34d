"""aggregators/faust_mends.py: a commit whose partitions were all revoked no longer crashes the
app (faust's consumer thread handed aiokafka an empty mapping, which it refuses). Run on faust's
own consumer-thread method with a real (unstarted) aiokafka consumer: no broker is reached, the
commit fails or is skipped before any request."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.types import TP

import aggregators.app  # noqa: F401  (applies the mends, as the aggregator does)
from aggregators import faust_mends

REVOKED, KEPT = TP("usage", 0), TP("usage", 1)


class _Thread:
    """The attributes of faust's AIOKafkaConsumerThread that its ``_commit`` reads."""

    def __init__(self, consumer: AIOKafkaConsumer, assigned: set[TP]) -> None:
        self._consumer = consumer
        self._assigned = assigned
        self.tp_last_committed_at: dict[TP, float] = {}
        self.log = logging.getLogger("test")
        self.crashes: list[BaseException] = []

    def assignment(self) -> set[TP]:
        return self._assigned

    def _ensure_consumer(self) -> AIOKafkaConsumer:
        return self._consumer

    async def crash(self, exc: BaseException) -> None:
        self.crashes.append(exc)


def _commit(commit: Any, assigned: set[TP], offsets: dict[TP, int]) -> tuple[bool, list[BaseException]]:
    async def run() -> tuple[bool, list[BaseException]]:
        consumer = AIOKafkaConsumer(group_id="g", bootstrap_servers="127.0.0.1:9")
        # the state a member is in after a rebalance gave it ``assigned`` (never started: no
        # request is sent before the offsets are judged)
        consumer._subscription.subscribe(topics={tp.topic for tp in assigned})
        consumer._subscription.assign_from_subscribed(
            {TopicPartition(tp.topic, tp.partition) for tp in assigned}
        )
        thread = _Thread(consumer, assigned)
        return await commit(thread, offsets), thread.crashes

    return asyncio.run(run())


def test_the_pinned_faust_crashes_on_a_commit_whose_partitions_were_all_revoked() -> None:
    # the bug the mend is for (if a faust upgrade fixes it, this says the mend can go)
    original = AIOKafkaConsumerThread._commit.__closure__  # the mend wraps faust's method
    assert original is not None
    faust_commit = next(c.cell_contents for c in original if callable(c.cell_contents))
    ok, crashes = _commit(faust_commit, {KEPT}, {REVOKED: 10})
    assert ok is False
    assert [type(e) for e in crashes] == [ValueError]


def test_a_commit_whose_partitions_were_all_revoked_commits_nothing_and_does_not_crash() -> None:
    faust_mends.apply()  # applying twice changes nothing
    ok, crashes = _commit(AIOKafkaConsumerThread._commit, {KEPT}, {REVOKED: 10})
    assert (ok, crashes) == (False, [])


def test_a_commit_with_a_partition_still_assigned_goes_to_faust() -> None:
    # faust's own commit runs: with the unstarted consumer it fails past the mapping's check
    # (no coordinator to send it to), which faust reports as a crash: the commit was attempted
    ok, crashes = _commit(AIOKafkaConsumerThread._commit, {KEPT}, {REVOKED: 10, KEPT: 5})
    assert ok is False
    assert len(crashes) == 1 and not isinstance(crashes[0], ValueError), crashes
