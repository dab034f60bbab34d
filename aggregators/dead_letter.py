"""The dead-letter topic: rejected events with the reason and the original bytes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import confluent_kafka

from aggregators.decode import Reject
from schemas.wire import (
    HEADER_DLQ_CODE,
    HEADER_DLQ_REASON,
    HEADER_DLQ_SOURCE,
    is_control_lane,
    lane_partition,
)


class KafkaDeadLetterSink:
    """Produces rejects to the dead-letter topic. ``flush`` raises if any delivery failed, so
    the batch is retried instead of committing past an event that went nowhere."""

    def __init__(self, config: dict[str, Any], topic: str, source_topic: str, control_topic: str) -> None:
        self._producer = confluent_kafka.Producer({**config, "enable.idempotence": True, "acks": "all"})
        self._topic = topic
        self._source = source_topic
        self._control = control_topic
        self._errors: list[str] = []

    def _on_delivery(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self._errors.append(str(err))

    def send(self, rejects: Sequence[Reject]) -> None:
        for r in rejects:
            # r.partition is a lane (schemas/wire.py): name the real topic and partition
            topic = self._control if is_control_lane(r.partition) else self._source
            source = f"{topic}/{lane_partition(r.partition)}/{r.offset}" + (
                f"/{r.index}" if r.index >= 0 else ""
            )
            self._producer.produce(
                self._topic,
                value=r.original,
                headers=[
                    (HEADER_DLQ_CODE, r.code.encode()),
                    (HEADER_DLQ_REASON, r.message.encode()[:4000]),
                    (HEADER_DLQ_SOURCE, source.encode()),
                ],
                on_delivery=self._on_delivery,
            )
            self._producer.poll(0)

    def close(self) -> None:
        self._producer.flush(10)
        # Closed, not only flushed: a producer left open keeps reconnecting (and logging
        # "Connect ... failed" every second) once its broker is gone.
        self._producer.close()

    def flush(self) -> None:
        remaining = self._producer.flush(30)
        errors, self._errors = self._errors, []
        if remaining or errors:
            raise RuntimeError(f"dead-letter delivery failed: {remaining} pending, errors {errors[:3]}")
