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
    # Ownership. A partition is written by the process that owns it, and only while it owns it:
    # two processes writing one partition at once could both roll up the same raw rows into the
    # period tables (seen in the rebalance test: period counts above the raw table's). So:
    # - `owned` is this process's assignment; `settled` is clear while a rebalance is under way
    #   (ownership unknown): no batch starts then;
    # - events of partitions no longer owned (still in the take buffer after a revocation) are
    #   neither applied nor acknowledged: their new owner reads them from the committed offset;
    # - a revocation waits for the batch in flight (`in_flight`) to finish, or to give up if it is
    #   waiting out an outage, before the partitions can be handed to another process;
    # - a partition's messages are applied in order (the raw watermark skips anything at or below
    #   the highest offset written): when events of a topic-partition are skipped (not owned) or
    #   a batch is given up, the topic-partition is *rewound*: once owned it is sought back to the
    #   first offset not applied, and the later events the take buffer still holds are dropped
    #   until the re-read ones arrive. Re-reading applied events is harmless (skipped by offset).
    owned: set[int] = set()
    settled = asyncio.Event()
    in_flight = asyncio.Lock()
    rewind: dict[Any, int] = {}  # tp -> first offset not applied: nothing later until it is back
    sought: set[Any] = set()  # tps of `rewind` sought back while owned

    def must_reread(tp: Any, offset: int) -> None:
        rewind[tp] = min(rewind.get(tp, offset), offset)

    def lane_of(ev: Any) -> int:
        return _lane(ev.message.topic, ev.message.partition, control)

    @app.agent(topics, concurrency=1, name="aggregate")
    async def aggregate(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        async for taken in take_applied(stream, settings.batch_max_messages, settings.batch_within_s):
            await settled.wait()
            for tp, first in sorted(rewind.items()):
                if tp not in sought and _lane(tp.topic, tp.partition, control) in owned:
                    log.info("rewinding %s to offset %d, the first not applied", tp, first)
                    await app.consumer.seek(tp, first)
                    sought.add(tp)
            events = []
            for ev in taken.events:
                tp, offset = ev.message.tp, ev.message.offset
                if lane_of(ev) not in owned:
                    must_reread(tp, offset)  # its owner reads it; if this process, after a seek
                    continue
                if tp in rewind:
                    if offset > rewind[tp]:
                        continue  # fetched before the rewind: it comes again after the seek
                    del rewind[tp]  # back at the first offset not applied: in order again
                    sought.discard(tp)
                events.append(ev)
            if len(events) < len(taken.events):
                log.info(
                    "%d message(s) of partitions handed to another process left to it",
                    len(taken.events) - len(events),
                )
            if not events:
                yield None
                continue
            batch = [
                SourceMessage(
                    partition=lane_of(ev),
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
            mine = {m.partition for m in batch}

            def give_up(mine: set[int] = mine) -> bool:
                return stopping.is_set() or not mine <= owned

            async with in_flight:
                stats = await asyncio.to_thread(
                    processor.process_with_retry, batch, give_up, settings.clickhouse_retry_max_s
                )
            if stats is None:
                if stopping.is_set():
                    # Stopping before the batch could be applied: leave without asking for the
                    # next batch, so this one is never acknowledged (take.py) and is consumed again.
                    log.warning(
                        "stopping with a batch of %d message(s) not applied; not acknowledged", len(batch)
                    )
                    return
                # A partition of the batch was revoked while it waited out an outage: nothing
                # of it is acknowledged; the partitions' owners (this process too, for those it
                # keeps, after the seek to the committed offset) consume it again.
                log.warning("batch of %d message(s) given up: its partitions were reassigned", len(batch))
                for ev in events:
                    must_reread(ev.message.tp, ev.message.offset)
                yield None
                continue
            taken.applied = {ev.message.tp for ev in events}
            log.debug("batch: %s", stats)
            _record_lag(app, events, control)
            yield None

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def _revoked(_app: faust.App, revoked: set[Any], **_: Any) -> None:
        settled.clear()
        gone = [_lane(tp.topic, tp.partition, control) for tp in revoked if tp.topic in lanes]
        owned.difference_update(gone)
        processor.revoke(gone)
        sought.difference_update(revoked)  # seek again if this process owns them again
        # Another process may be given these partitions once this returns: let the batch that
        # is writing them finish (or give up) first.
        async with in_flight:
            pass

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def _assigned(_app: faust.App, assigned: set[Any], **_: Any) -> None:
        parts = [_lane(tp.topic, tp.partition, control) for tp in assigned if tp.topic in lanes]
        await asyncio.to_thread(processor.acquire, parts)
        owned.clear()
        owned.update(parts)
        settled.set()

    lanes = {settings.topic_events, control}
    app.metering_stopping = stopping  # type: ignore[attr-defined]
    return app
