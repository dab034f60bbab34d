"""``metering replay``: rebuild tables from Kafka or from the raw table, with a progress bar."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def _parse_time(value: str | None) -> datetime | None:
    if value is None:
        return None
    t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def replay(
    from_raw: Annotated[
        bool, typer.Option("--from-raw", help="Recompute period tables from events_raw.")
    ] = False,
    from_offset: Annotated[
        int | None, typer.Option(help="Re-read Kafka from this offset (every partition).")
    ] = None,
    from_time: Annotated[
        str | None,
        typer.Option(help="Re-read Kafka from this time (ISO-8601); with --from-raw: start of the range."),
    ] = None,
    until: Annotated[str | None, typer.Option(help="With --from-raw: end of the range (ISO-8601).")] = None,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None,
) -> None:
    """Rebuild the raw and period tables from Kafka (--from-offset / --from-time), or the period
    tables from the raw table (--from-raw). Idempotent. Stop `metering run` first when using the
    embedded ClickHouse (it locks its data directory)."""
    from aggregators import replay as rp
    from aggregators.processor import BatchProcessor, ListSink
    from aggregators.writer import ClickHouseWriter
    from deploy.runner import open_clickhouse
    from deploy.settings import CommonSettings
    from schemas.meters import default_catalog

    if from_raw == (from_offset is not None or (from_time is not None and not from_raw)):
        raise typer.BadParameter("choose --from-raw, or --from-offset / --from-time")
    settings = CommonSettings()
    try:
        client = open_clickhouse(settings)
    except Exception as exc:
        typer.secho(
            f"error: cannot open ClickHouse ({exc}). With the embedded engine, stop `metering run` first.",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(1) from exc
    # the live aggregator's processor (BatchProcessor.rewrite for a replay from Kafka); closed at
    # the end, which drops its stage tables and probe database: nothing of the replay is left in
    # the tables analysts read. Rejects are recorded in the rejections table as the live path
    # records them, not sent to the dead-letter topic again (ListSink).
    processor = BatchProcessor(
        ClickHouseWriter(client, settings.clickhouse_database, default_catalog()), ListSink()
    )
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns) as bar:
            if from_raw:
                task = bar.add_task("rebuilding", total=6)

                def step(desc: str, done: int, total: int) -> None:
                    bar.update(task, description=desc, completed=done, total=total)

                report = rp.rebuild_from_raw(
                    processor.writer, tenant, _parse_time(from_time), _parse_time(until), step
                )
                typer.echo(
                    f"rebuilt {', '.join(report.statements)} for {tenant or 'all tenants'} "
                    f"from {report.since:%Y-%m-%d} to {report.until:%Y-%m-%d}"
                )
                return
            kafka = rp.KafkaReplayReport()
            _replay_kafka(settings, processor, tenant, from_offset, _parse_time(from_time), kafka, bar)
    finally:
        processor.close()
    typer.echo(
        f"replayed {kafka.messages} messages: {kafka.events_written} events written, "
        f"{kafka.duplicates} duplicates, {kafka.rejected} rejected"
    )


def _replay_kafka(settings, processor, tenant, from_offset, from_time, report, bar) -> None:  # type: ignore[no-untyped-def]
    from confluent_kafka import Consumer, TopicPartition

    from aggregators import replay as rp
    from aggregators.decode import SourceMessage
    from deploy.runner import kafka_bootstrap
    from schemas.wire import control_lane

    with kafka_bootstrap(settings, start_local=False) as bootstrap:
        consumer = Consumer(
            {
                **settings.kafka_client_config(bootstrap),
                "group.id": f"replay-{datetime.now(UTC):%s}",
                "enable.auto.commit": False,
            }
        )
        # Both topics, each partition as its lane (schemas/wire.py): usage and control.
        lane_of: dict[tuple[str, int], int] = {}
        for topic in (settings.topic_events, settings.topic_control):
            md = consumer.list_topics(topic, timeout=10)
            if topic not in md.topics or md.topics[topic].error is not None:
                continue
            for p in sorted(md.topics[topic].partitions):
                lane_of[(topic, p)] = control_lane(p) if topic == settings.topic_control else p
        if from_time is not None:
            ms = int(from_time.timestamp() * 1000)
            tps = consumer.offsets_for_times([TopicPartition(t, p, ms) for t, p in lane_of], timeout=10)
        else:
            tps = [TopicPartition(t, p, max(0, from_offset or 0)) for t, p in lane_of]
        ends = {
            lane_of[(tp.topic, tp.partition)]: consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in tps
        }
        start = {
            lane_of[(tp.topic, tp.partition)]: (
                tp.offset if tp.offset >= 0 else ends[lane_of[(tp.topic, tp.partition)]]
            )
            for tp in tps
        }
        start = {lane: o for lane, o in start.items() if o < ends[lane]}
        total = sum(ends[lane] - o for lane, o in start.items())
        task = bar.add_task("reading Kafka", total=total or 1)
        writer = processor.writer
        span = rp.delete_raw_from(writer, start, tenant)
        consumer.assign(
            [TopicPartition(t, p, start[lane]) for (t, p), lane in lane_of.items() if lane in start]
        )
        try:
            done, remaining = 0, dict(start)
            while remaining:
                batch = []
                for m in consumer.consume(500, timeout=1.0):
                    off = m.offset()
                    part = lane_of.get((m.topic() or "", m.partition() or 0))
                    if m.error() or part is None or off is None or part not in remaining:
                        continue
                    if off >= ends[part]:
                        remaining.pop(part, None)
                        continue
                    raw_headers = m.headers() or []
                    pairs = raw_headers.items() if isinstance(raw_headers, dict) else raw_headers
                    headers = [(str(k), v if isinstance(v, bytes) else (v or "").encode()) for k, v in pairs]
                    batch.append(
                        SourceMessage(part, off, m.timestamp()[1], m.key(), m.value() or b"", headers)
                    )
                    if off >= ends[part] - 1:
                        remaining.pop(part, None)
                if batch:
                    rp.replay_messages(processor, batch, tenant, report)
                    done += len(batch)
                    bar.update(task, completed=done)
        finally:
            consumer.close()
        lo = (
            min(x for x in (report.first_event, span[0] if span else None) if x)
            if (report.first_event or span)
            else None
        )
        hi = (
            max(x for x in (report.last_event, span[1] if span else None) if x)
            if (report.last_event or span)
            else None
        )
        if lo and hi:
            bar.update(task, description="rebuilding period tables")
            rp.rebuild_from_raw(writer, tenant, lo, hi)
