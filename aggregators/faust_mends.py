"""Mends for faust-streaming (pinned at 0.15.3) bugs that this pipeline meets; applied when
aggregators.app is imported.

1. A commit whose partitions were all revoked crashes the app. faust's consumer thread keeps
   only the offsets of partitions still assigned and hands the rest to aiokafka's ``commit``,
   which refuses an empty mapping (``ValueError({})``); faust then crashes the consumer thread,
   and with it the whole app: nothing is consumed any more, and the member stays in its group
   until its session times out (with no other member, its partitions wait forever). Seen in
   the chaos suite's membership cycle (1 run of ~10 on this machine, and once in CI): a commit
   was queued just before a rebalance took every partition it named. Such a commit has nothing
   left to commit; answered as faust answers a commit refused because the group already
   rebalanced (False: not committed), the offsets are committed by the partitions' next owner.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

_MENDED = "_metering_mended"


def _mend_empty_commit() -> None:
    original = AIOKafkaConsumerThread._commit
    if getattr(original, _MENDED, False):
        return

    async def _commit(self: Any, offsets: Mapping[Any, int]) -> bool:
        # (no await between this check and faust's own filter: the assignment cannot change
        # in between, both run on the consumer thread's loop)
        assigned = self.assignment()
        if not any(tp in assigned for tp in offsets):
            return False
        return bool(await original(self, offsets))

    setattr(_commit, _MENDED, True)
    AIOKafkaConsumerThread._commit = _commit  # type: ignore[method-assign]


def apply() -> None:
    _mend_empty_commit()
