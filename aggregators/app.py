"""The faust-streaming application: one agent reading batches of Kafka messages.

Delivery: faust's ``take_events`` acks a batch only after our code has returned for it, and
faust commits acked offsets; the batch is fully written to ClickHouse before that (see
processor.py). Two faust features are deliberately not used: ``processing_guarantee=
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
from deploy.settings import AggregatorSettings

log = logging.getLogger(__name__)


def _headers(raw: Any) -> list[tuple[str, bytes]]:
    if not raw:
        return []
    items = raw.items() if isinstance(raw, dict) else raw
    return [(str(k), bytes(v or b"")) for k, v in items]


def _record_lag(app: faust.App, events: Any) -> None:
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
            metrics.CONSUMER_LAG.labels(str(tp.partition)).set(max(0, end - offset - 1))


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
    topic = app.topic(settings.topic_events, value_type=bytes, value_serializer="raw", key_serializer="raw")
    stopping = asyncio.Event()

    @app.agent(topic, concurrency=1, name="aggregate")
    async def aggregate(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        take = stream.take_events  # type: ignore[attr-defined]
        async for events in take(settings.batch_max_messages, within=settings.batch_within_s):
            batch = [
                SourceMessage(
                    partition=ev.message.partition,
                    offset=ev.message.offset,
                    timestamp_ms=int(ev.message.timestamp * 1000),
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
            if stats is not None:
                log.debug("batch: %s", stats)
                _record_lag(app, events)
            yield None

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def _revoked(_app: faust.App, revoked: set[Any], **_: Any) -> None:
        processor.revoke([tp.partition for tp in revoked if tp.topic == settings.topic_events])

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def _assigned(_app: faust.App, assigned: set[Any], **_: Any) -> None:
        parts = [tp.partition for tp in assigned if tp.topic == settings.topic_events]
        await asyncio.to_thread(processor.assign, parts)

    app.metering_stopping = stopping  # type: ignore[attr-defined]
    return app
