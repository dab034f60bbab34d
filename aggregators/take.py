"""Batches of a faust stream that are acknowledged only once they were applied.

faust's ``Stream.take_events`` acknowledges a batch in a ``finally`` block: when the agent moves
on to the next batch, but *also* when the generator is closed because the agent stopped, was
cancelled or raised. A batch still waiting out a ClickHouse outage when the aggregator is asked
to stop would then be acknowledged, and its offsets committed, although nothing was written
(issue 7, finding 5). ``take_applied`` is the same buffering (the code follows faust-streaming
0.15.3's ``take_events`` line by line) with one change: a batch is acknowledged only when the
agent asks for the next one, which it does only after the batch was applied. Leaving the loop in
any other way (return, exception, cancellation) acknowledges nothing, so the batch is consumed
again by whoever owns its partition next; exactly-once (docs/exactly-once.md) makes that safe.

A second change (issue 11, "both cores busy"): the next batch is buffered while the caller
applies this one (faust's generator stops buffering until the caller asks again), and when it is
full, ``on_full`` is called with its events, so the caller can start preparing it in another
thread; what ``on_full`` returns comes with the batch (``Taken.ahead``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any


class Taken:
    """One batch of events. The caller sets ``applied`` to the topic-partitions whose events it
    has applied; asking for the next batch acknowledges exactly those events, no others."""

    __slots__ = ("ahead", "applied", "events")

    def __init__(self, events: list[Any], ahead: Any = None) -> None:
        self.events = events
        self.applied: set[Any] = set()
        #: what ``on_full`` returned for exactly these events (None: not called for them)
        self.ahead = ahead


def take_applied(
    stream: Any, max_: int, within: float, on_full: Callable[[list[Any]], Any] | None = None
) -> AsyncIterator[Taken]:
    """Batches (``Taken``) of at most ``max_`` events, each cut after ``within`` seconds at the
    latest. The caller must apply a batch before asking for the next one: asking acknowledges
    the events of the topic-partitions named in ``Taken.applied``. ``on_full(events)``: called
    (on the event loop, must not block) when a batch is full, possibly while the caller is still
    applying the one before; its answer is the batch's ``Taken.ahead``."""
    agen = _take(stream, max_, within, on_full)
    # Like faust's own buffering generators: registered so that the stream closes it on stop
    # (closing acknowledges nothing here).
    active = getattr(stream, "_active_agens", None)
    if active is not None:
        active.add(agen)
    return agen


async def _take(
    stream: Any, max_: int, within: float, on_full: Callable[[list[Any]], Any] | None
) -> AsyncIterator[Taken]:
    events: list[Any] = []
    ahead: Any = None  # on_full's answer for the (full) buffer
    buffer_full = asyncio.Event()
    buffer_consumed = asyncio.Event()
    stream_enable_acks: bool = stream.enable_acks
    channel_it = aiter(stream.channel)

    # A processor fills the buffer while the stream is consumed passively in the background,
    # also while the caller applies the batch before (faust's waits for that batch instead).
    async def add_to_buffer(value: Any) -> Any:
        nonlocal ahead
        try:
            event = stream.current_event
            if event is None:
                raise RuntimeError("take buffer found current_event is None")
            events.append(event)
            if len(events) >= max_:
                if on_full is not None:
                    ahead = on_full(list(events))
                buffer_full.set()
                # never hand out more than max_: wait until this batch is taken
                buffer_consumed.clear()
                await stream.wait(buffer_consumed)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            stream.log.exception("Error adding to take buffer: %r", exc)
            await stream.crash(exc)
        return value

    # We acknowledge ourselves, and only what was applied.
    stream.enable_acks = False
    stream.add_processor(add_to_buffer)
    stream._enable_passive(channel_it)
    try:
        while not stream.should_stop:
            await stream.wait_for_stopped(buffer_full, timeout=within)
            if not events:
                continue
            # Handed out, and the buffer emptied at once (no await in between): the next batch
            # fills while the caller applies this one.
            taken = Taken(list(events), ahead)
            ahead = None
            events.clear()
            buffer_full.clear()
            buffer_consumed.set()
            # If the caller leaves (return, exception, cancellation, aclose), GeneratorExit or
            # the error is raised here and nothing below runs: the batch stays unacknowledged.
            yield taken
            # The caller asked for the next batch: it has applied what it says it applied.
            for event in taken.events:
                if event.message.tp in taken.applied:
                    await stream.ack(event)
            del taken  # its messages are not held while the next batch is awaited
    finally:
        stream.enable_acks = stream_enable_acks
        stream._processors.remove(add_to_buffer)
