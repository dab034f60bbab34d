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

Liveness: a watchdog task (``_watch``, the logic in watchdog.py) checks every few seconds that
each partition this process owns either has nothing to consume or makes progress; a stalled one
is sought back to its committed offset and resumed, and if that does not help the aggregator
part is restarted (``restart``, supervisor.py). docs/exactly-once.md, "Liveness".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import faust

from aggregators import faust_mends, metrics
from aggregators.decode import SourceMessage
from aggregators.errors import reason
from aggregators.processor import BatchProcessor, Prepared
from aggregators.take import take_applied
from aggregators.watchdog import Action, Observation, Watchdog, describe_troubles
from deploy.settings import AggregatorSettings
from schemas.wire import control_lane

faust_mends.apply()

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


def new_watchdog(settings: AggregatorSettings) -> Watchdog:
    """The watchdog for these settings: a rebalance or an unanswered consumer is given three
    session timeouts at least (the time the group takes to drop a dead member and rebalance)."""
    return Watchdog(settings.stall_timeout_s, patience_s=3 * settings.consumer_session_timeout_s)


def build_app(
    settings: AggregatorSettings,
    bootstrap: str,
    processor: BatchProcessor,
    watchdog: Watchdog | None = None,
    restart: Callable[[str], None] | None = None,
) -> faust.App:
    """The faust app. ``watchdog`` (default: a new one with ``settings.stall_timeout_s``) judges
    the partitions' progress; ``restart(why)`` is called when a stall, or the agent's death, needs
    the aggregator part restarted (supervisor.py); without it, such a stall is only reported, and
    the agent's death stops the app."""
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
        # Messages fetched ahead of the batch being taken (METERING_STREAM_BUFFER_MESSAGES): faust's
        # default (4,096) holds ~400 MiB of 500-event messages whenever the aggregator is behind.
        stream_buffer_maxsize=settings.stream_buffer_maxsize(),
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
    # Liveness (the watchdog): the first offset not applied per tp, since this process owns it.
    applied_next: dict[Any, int] = {}
    dog = watchdog if watchdog is not None else new_watchdog(settings)

    def must_reread(tp: Any, offset: int) -> None:
        rewind[tp] = min(rewind.get(tp, offset), offset)

    def lane_of(ev: Any) -> int:
        return _lane(ev.message.topic, ev.message.partition, control)

    async def seek_back(tp: Any, offset: int) -> bool:
        """Seek ``tp`` to ``offset``, in the consumer's own thread (faust's ``seek`` moves
        aiokafka's position from this one) and with faust's read offset of the partition set to
        ``offset`` (faust drops a message below the last offset it delivered of its partition).
        False if it could not (the partition was revoked meanwhile): sought again when owned."""
        consumer: Any = app.consumer
        try:
            # Bounded: faust's seek_wait waits up to broker_request_timeout (90 s) for the new
            # position, and the watchdog seeks from its check: unbounded, a stalled partition's
            # seek kept the watchdog silent for 90 s, so the restart that heals the stall came
            # too late. A seek given up here is tried again (the rewind rule, or the watchdog's
            # next action). The consumer thread may still be waiting for that position, and its
            # answers to the watchdog's offset requests wait behind it (they time out: "a
            # consumer that does not answer", which restarts the part after the patience).
            await asyncio.wait_for(consumer.seek_wait({tp: offset}), max(5.0, settings.stall_timeout_s))
        except Exception as exc:
            log.warning("could not seek %s back to offset %d: %r", tp, offset, exc)
            return False
        return True

    def source(ev: Any) -> SourceMessage:
        return SourceMessage(
            partition=lane_of(ev),
            offset=ev.message.offset,
            # round, not int(): the float seconds faust gives must give back the exact
            # millisecond the producer judged the event by
            timestamp_ms=round(ev.message.timestamp * 1000),
            key=ev.message.key,
            value=ev.message.value,
            headers=_headers(ev.message.headers),
        )

    def prepare_ahead(evs: list[Any]) -> tuple[list[SourceMessage], asyncio.Future[Prepared]]:
        """A full batch, taken or not yet: parsed and judged in a thread of its own while the
        batch before it is applied (processor.prepare). Used only if the loop below applies
        every one of its events; awaited in any case before the next batch is applied."""
        batch = [source(ev) for ev in evs]
        stager = processor.next_stager()  # here, on the loop: in the order batches are applied
        return batch, asyncio.ensure_future(asyncio.to_thread(processor.prepare, batch, stager))

    died: list[BaseException] = []  # why an agent of this app died, if one did

    @app.agent(topics, concurrency=1, name="aggregate")
    async def aggregate(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        # faust starts another agent when one dies, on the same stream. Not here: the dead one's
        # take buffer (take.py) stays on that stream and hands it the messages after the batch
        # that was never applied, and applying them would move the raw watermark past that batch
        # (skipped, so lost, when it is read again). The part is restarted instead (everything
        # read again from the committed offsets), and the new agent applies nothing meanwhile.
        if died:
            log.warning("the agent died (%r); applying nothing until the part restarts", died[0])
            await stopping.wait()
            return
        try:
            async for step in _aggregate(stream):
                yield step
        except Exception as exc:
            died.append(exc)
            if not must_restart(f"the agent died in a batch: {exc!r}"):
                await app.crash(exc)  # no part to restart it: stop, do not go on in place
            raise

    async def _aggregate(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        # Both cores: the next batch is parsed and judged while one is applied (processor.prepare),
        # on connections of its own (none on a server unless the caller opened them: deploy/runner.py).
        ahead_on = settings.prepare_ahead and await asyncio.to_thread(processor.open_stagers)

        def on_full(evs: list[Any]) -> Any:
            return None if died else prepare_ahead(evs)  # a dead agent's batch is never applied

        async for taken in take_applied(
            stream, settings.batch_max_messages, settings.batch_within_s, on_full if ahead_on else None
        ):
            ahead: Prepared | None = None
            # the batch prepared ahead, if this is one (let go once applied, below)
            pre_batch: list[SourceMessage] = []
            preparing: asyncio.Future[Prepared] | None = None
            if taken.ahead is not None:
                # Awaited whatever comes next: its stager may not prepare another batch before.
                pre_batch, preparing = taken.ahead
                try:
                    ahead = await preparing
                except Exception as exc:  # an outage: process_with_retry prepares it again
                    log.info("preparing a batch ahead failed (%s); prepared when applied", reason(exc))
            await settled.wait()
            for tp, first in sorted(rewind.items()):
                if tp not in sought and _lane(tp.topic, tp.partition, control) in owned:
                    log.info("rewinding %s to offset %d, the first not applied", tp, first)
                    if await seek_back(tp, first):
                        sought.add(tp)
            events = []
            handed: int = 0
            early: dict[Any, int] = {}  # tp -> events after its first offset not applied
            for ev in taken.events:
                tp, offset = ev.message.tp, ev.message.offset
                if lane_of(ev) not in owned:
                    must_reread(tp, offset)  # its owner reads it; if this process, after a seek
                    handed += 1
                    continue
                if tp in rewind:
                    if offset > rewind[tp]:
                        early[tp] = early.get(tp, 0) + 1
                        continue  # fetched before the rewind: it comes again after the seek
                    del rewind[tp]  # back at the first offset not applied: in order again
                    sought.discard(tp)
                events.append(ev)
            if handed:
                log.info("%d message(s) of partitions handed to another process left to it", handed)
            # Events after the first offset not applied of a partition already sought back: the
            # seek did not hold, and the offset waited for would never come (issue 8's hand-back
            # stall, docs/exactly-once.md "Liveness"): faust drops a message below the last offset
            # it delivered of its partition, and the messages it was still delivering when the
            # partition was sought back moved that mark past the seek again; or faust's own seek
            # to the committed offsets, when it resumes the streams after a rebalance, came after
            # ours. So seek back again, as long as such events come.
            for tp, n in sorted(early.items()):
                if tp in rewind and tp in sought:
                    log.info(
                        "%d message(s) of %s after offset %d, not applied yet: seeking back again",
                        n,
                        tp,
                        rewind[tp],
                    )
                    if not await seek_back(tp, rewind[tp]):
                        sought.discard(tp)
            if not events:
                yield None
                continue
            if ahead is not None and len(events) == len(taken.events):
                batch = pre_batch  # every event of the batch prepared ahead is to be applied
            else:
                ahead = None
                batch = [source(ev) for ev in events]
            # ClickHouse calls block; run them off the event loop so heartbeats keep flowing
            # while a batch waits out an outage.
            mine = {m.partition for m in batch}

            def give_up(mine: set[int] = mine) -> bool:
                return stopping.is_set() or not mine <= owned

            async with in_flight:
                in_flight_since[0] = asyncio.get_running_loop().time()
                applying = asyncio.ensure_future(
                    asyncio.to_thread(
                        processor.process_with_retry, batch, give_up, settings.clickhouse_retry_max_s, ahead
                    )
                )
                try:
                    stats = await asyncio.shield(applying)
                except asyncio.CancelledError:
                    # Cancelled (the app stops): the thread goes on with the batch. `in_flight`
                    # stays held until it ends, so neither a revocation hands the partitions over
                    # nor the caller closes the processor (its tables) under it; a batch waiting
                    # out an outage gives up at once (give_up: stopping).
                    await asyncio.wait({applying})
                    if applying.done() and not applying.cancelled():
                        applying.exception()  # retrieved: the stop is what is reported
                    raise
                finally:
                    in_flight_since[0] = None
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
                pre_batch, preparing, ahead, batch, events = [], None, None, [], []
                del taken
                yield None
                continue
            taken.applied = {ev.message.tp for ev in events}
            for ev in events:
                tp = ev.message.tp
                applied_next[tp] = max(applied_next.get(tp, 0), ev.message.offset + 1)
            dog.progressed(mine)
            log.debug("batch: %s", stats)
            _record_lag(app, events, control)
            # The batch is applied: its messages and preparation are not held while the next is
            # awaited (a full batch prepared ahead stayed referenced through every smaller batch
            # after it, ~60 MiB at the live rate; idle, the last batch stayed).
            pre_batch, preparing, ahead, batch, events = [], None, None, [], []
            del taken  # (take.py keeps it until it has acknowledged what it says was applied)
            yield None

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def _revoked(_app: faust.App, revoked: set[Any], **_: Any) -> None:
        settled.clear()
        dog.rebalancing()
        start_watching()  # from the first rebalance on: it may be the one that never completes
        gone = [_lane(tp.topic, tp.partition, control) for tp in revoked if tp.topic in lanes]
        owned.difference_update(gone)
        processor.revoke(gone)
        sought.difference_update(revoked)  # seek again if this process owns them again
        for tp in revoked:
            applied_next.pop(tp, None)  # another process may apply them now
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
        dog.own(parts)
        settled.set()
        start_watching()

    # ---- liveness ------------------------------------------------------------------------------
    every = min(5.0, max(0.2, settings.stall_timeout_s / 4))
    wait_s = max(5.0, settings.stall_timeout_s)  # longest wait for the broker's answers

    async def observe() -> list[tuple[Any, Observation, int]]:
        """(tp, what is seen of its lane, its committed offset) for every owned partition."""
        tps = sorted(
            tp
            for tp in app.consumer.assignment()
            if tp.topic in lanes and _lane(tp.topic, tp.partition, control) in owned
        )
        if not tps:
            return []
        # The log end from the broker, not the fetcher's highwater: a partition that is never
        # fetched has a highwater that never moves.
        ends = await asyncio.wait_for(app.consumer.highwaters(*tps), wait_s)
        committed = await asyncio.wait_for(_committed(app, tps), wait_s)
        out = []
        for tp in tps:
            end = ends.get(tp)
            if end is None:
                continue
            done = max(applied_next.get(tp, 0), committed[tp])
            out.append((tp, Observation(_lane(tp.topic, tp.partition, control), end, done), committed[tp]))
        return out

    async def reseek(tp: Any, committed: int) -> None:
        """Resume the partition's fetch and seek it back to its committed offset, through the
        rewind rule (nothing later is applied before that offset comes back)."""
        must_reread(tp, committed)
        first = rewind[tp]
        log.warning("watchdog: %s stalled; resuming it and seeking it back to offset %d", tp, first)
        consumer: Any = app.consumer
        consumer.resume_partitions({tp})
        if await seek_back(tp, first):
            sought.add(tp)
        if not consumer.flow_active:  # a rebalance that never finished resuming the streams
            log.warning("watchdog: the consumer's flow was stopped; resuming it")
            app.flow_control.resume()
            consumer.resume_flow()

    watcher: list[asyncio.Future[None]] = []
    in_flight_since: list[float | None] = [None]  # (loop time) the batch in flight began

    def start_watching() -> None:
        # Started from the rebalance handlers, not as an app.task: faust starts its tasks only
        # once the first rebalance has resumed the streams, and that may be what stalls.
        if not watcher:
            watcher.append(asyncio.ensure_future(_watch()))

    def agent_running() -> bool:
        if app.should_stop:  # crashed (a stop asked for sets `stopping` first)
            return False
        actors = list(getattr(aggregate, "_actors", ()))
        tasks = [a.actor_task for a in actors if a.actor_task is not None]
        return not tasks or any(not t.done() for t in tasks)

    async def _watch() -> None:
        while True:
            await asyncio.sleep(every)
            if stopping.is_set():
                return
            try:
                if await _check():
                    return  # a restart was asked for: this app is being replaced
            except Exception:  # the watchdog must never be what stops an aggregator
                log.exception("watchdog: check failed")

    def must_restart(what: str) -> bool:
        """Ask for the part's restart (the watchdog, or the agent that died); False if there is
        no part to restart (``build_app`` alone)."""
        if restart is not None:
            log.error("%s; restarting the aggregator", what)
            restart(what)
            return True
        log.error("%s, and nothing here can restart the aggregator", what)
        return False

    async def _check() -> bool:
        """One look at the aggregator and its partitions; True when its part must restart."""
        dog.agent_running(agent_running())
        # a batch in a ClickHouse call that neither returns nor fails (a failing one is an
        # outage: processor.stalled_since, reported on its own)
        since = in_flight_since[0]
        dog.batch(since is not None and processor.stalled_since is None)
        if settled.is_set() and not app.should_stop:
            try:
                seen = await observe()
            except Exception as exc:  # the broker is away, or the consumer's thread hung
                log.info("watchdog: could not read the partitions' offsets: %r", exc)
                dog.answered(False)
                seen = None
            else:
                dog.answered(True)
        else:
            seen = None  # a rebalance is under way: ownership is not known yet
        due = dog.restart_due()
        if due and must_restart(
            "watchdog: " + describe_troubles({t: dog.troubles().get(t, 0.0) for t in due})
        ):
            return True
        if seen is None or not settled.is_set():
            return False  # a rebalance started meanwhile: what was seen may be out of date
        busy = in_flight.locked() or processor.stalled_since is not None
        stalls = dog.observe([ob for _, ob, _ in seen], busy=busy)
        by_lane = {ob.lane: (tp, committed) for tp, ob, committed in seen}
        for stall in stalls:
            tp, committed = by_lane[stall.lane]
            if stall.action is Action.RESEEK:
                await reseek(tp, committed)
                continue
            if must_restart(f"watchdog: {tp} still stalled ({stall.lag} behind, {stall.stalled_s:.0f}s)"):
                return True
            await reseek(tp, committed)  # nothing else to do here: seek it back again
        return False

    lanes = {settings.topic_events, control}
    app.metering_stopping = stopping  # type: ignore[attr-defined]
    app.metering_watchdog = dog  # type: ignore[attr-defined]
    return app


async def _committed(app: faust.App, tps: list[Any]) -> dict[Any, int]:
    """The committed offset of each partition, from the broker; the earliest offset of the log
    for a partition with none (the consumer starts there: ``auto_offset_reset='earliest'``)."""
    consumer: Any = app.consumer
    thread = consumer._thread  # aiokafka runs in the consumer's thread: ask it there
    aio = thread._ensure_consumer()
    out: dict[Any, int] = {}
    for tp in tps:
        offset = await thread.call_thread(aio.committed, tp)
        if offset is not None:
            out[tp] = offset
    missing = [tp for tp in tps if tp not in out]
    if missing:
        earliest = await consumer.earliest_offsets(*missing)
        for tp in missing:
            out[tp] = earliest.get(tp) or 0
    return out
