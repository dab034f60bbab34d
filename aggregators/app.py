"""The faust-streaming application: one agent reading batches of Kafka messages.

Delivery: ``take_applied`` (take.py) acks a batch only when the agent asks for the next one,
i.e. after the batch was fully written to ClickHouse (see processor.py), and faust commits acked
offsets. A batch that was not applied (the aggregator stopped while waiting out an outage) is
never acked: the agent leaves without asking for another.

Topics: the agent reads the usage topic and the control topic (lifecycle events, written only by
administrators); each message is handed on with its lane (schemas/wire.py), so the decoder can
refuse a lifecycle event from the usage topic and a usage event from the control topic. Two faust features are deliberately not used: ``processing_guarantee=
'exactly_once'`` (experimental, open bugs) and agent ``concurrency > 1`` (can commit past a
message still in flight). Exactly-once comes from ClickHouse-side watermarks instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import faust

from aggregators import metrics
from aggregators.decode import SourceMessage
from aggregators.processor import BatchProcessor
from aggregators.take import take_applied
from deploy.settings import AggregatorSettings
from schemas.wire import control_lane

log = logging.getLogger(__name__)


def _headers(raw: Any) -> list[tuple[str, bytes]]:
    if not raw:
        return []
    items = raw.items() if isinstance(raw, dict) else raw
    return [(str(k), bytes(v or b"")) for k, v in items]


def _record_lag(app: faust.App, events: Any, control_topic: str) -> None:
    """Consumer lag per partition: the log end minus the next offset to process."""
    last: dict[Any, int] = {}
    for ev in events:
        tp = ev.message.tp
        last[tp] = max(last.get(tp, -1), ev.message.offset)
    for tp, offset in last.items():
        try:
            end = app.consumer.highwater(tp)
        except Exception:  # not known yet right after an assignment
            continue
        if end is not None:
            metrics.CONSUMER_LAG.labels(str(_lane(tp.topic, tp.partition, control_topic))).set(
                max(0, end - offset - 1)
            )


def _lane(topic: str, partition: int, control_topic: str) -> int:
    return control_lane(partition) if topic == control_topic else partition


def build_app(settings: AggregatorSettings, bootstrap: str, processor: BatchProcessor) -> faust.App:
    app = faust.App(
        settings.consumer_group,
        broker=f"kafka://{bootstrap}",
        store="memory://",
        datadir=str(settings.faust_data_dir),
        web_enabled=False,
        topic_partitions=settings.topic_partitions,
        consumer_auto_offset_reset="earliest",
        broker_commit_every=settings.batch_max_messages,
        broker_commit_interval=1.0,
        stream_wait_empty=False,
        producer_acks=-1,
        broker_session_timeout=settings.consumer_session_timeout_s,
        broker_heartbeat_interval=max(0.5, settings.consumer_session_timeout_s / 10),
    )
    control = settings.topic_control
    topics = app.topic(
        settings.topic_events, control, value_type=bytes, value_serializer="raw", key_serializer="raw"
    )
    stopping = asyncio.Event()

    @app.agent(topics, concurrency=1, name="aggregate")
    async def aggregate(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        async for events in take_applied(stream, settings.batch_max_messages, settings.batch_within_s):
            batch = [
                SourceMessage(
                    partition=_lane(ev.message.topic, ev.message.partition, control),
                    offset=ev.message.offset,
                    # round, not int(): the float seconds faust gives must give back the exact
                    # millisecond the producer judged the event by
                    timestamp_ms=round(ev.message.timestamp * 1000),
                    key=ev.message.key,
                    value=ev.message.value,
                    headers=_headers(ev.message.headers),
                )
                for ev in events
            ]
            # ClickHouse calls block; run them off the event loop so heartbeats keep flowing
            # while a batch waits out an outage.
            stats = await asyncio.to_thread(
                processor.process_with_retry, batch, stopping.is_set, settings.clickhouse_retry_max_s
            )
            if stats is None:
                # Stopping before the batch could be applied: leave without asking for the next
                # batch, so this one is never acknowledged (take.py) and is consumed again.
                log.warning(
                    "stopping with a batch of %d message(s) not applied; not acknowledged", len(batch)
                )
                return
            log.debug("batch: %s", stats)
            _record_lag(app, events, control)
            yield None

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def _revoked(_app: faust.App, revoked: set[Any], **_: Any) -> None:
        processor.revoke([_lane(tp.topic, tp.partition, control) for tp in revoked if tp.topic in lanes])

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def _assigned(_app: faust.App, assigned: set[Any], **_: Any) -> None:
        parts = [_lane(tp.topic, tp.partition, control) for tp in assigned if tp.topic in lanes]
        await asyncio.to_thread(processor.assign, parts)

    lanes = {settings.topic_events, control}
    app.metering_stopping = stopping  # type: ignore[attr-defined]
    return app
