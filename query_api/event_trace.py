"""An event's fate, from the evidence the pipeline keeps (issue 10; docs/api.md, "Event trace").

One status per (tenant, event id), looked for in this order:

- ``counted``: the id is in ``events_raw`` (when it was applied, its Kafka position), with each
  meter it feeds: the meter, the period windows its time falls in (15 minutes, hour, day, month;
  half-open, UTC) and its contribution;
- ``duplicate``: counted as above, *and* later copies with the same id were dropped
  (``event_duplicates``): the answer names the copy counted instead and the dropped ones;
- ``rejected``: in ``rejections`` (code, message, when, ``ingest`` or ``aggregator``); the latest
  rejection first, every one listed;
- ``received``: in Kafka but not applied yet: found by scanning each partition of the usage
  topic from the aggregator's applied position (the last offset found in ``events_raw``,
  ``event_duplicates`` or ``rejections``) to the end,
  at most ``scan_limit`` messages in all; the partition's lag is the messages left after it;
- ``unknown``: none of these (never seen, another tenant's, or outside the key's scope).

Pure functions over a ClickHouse client and an optional Kafka scanner; every query carries the
tenant. ``visible(data)`` says whether the caller's key may see an event naming those resources
(the ingest's scope rules): an event it may not see answers ``unknown``, like another tenant's.
"""

from __future__ import annotations

import calendar
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any, Protocol

import orjson
from clickhouse_connect.driver.client import Client

from schemas.clickhouse import Table
from schemas.meters import Aggregation, Catalog

Visible = Callable[[Mapping[str, Any], str], bool]  # (event data, key id of an ingest rejection)


class Status(StrEnum):
    RECEIVED = "received"
    COUNTED = "counted"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"
    UNKNOWN = "unknown"


class InFlight(Protocol):
    """Finds an event in Kafka past the applied positions (``KafkaScanner``)."""

    def find(self, tenant: str, event_id: str, applied: Mapping[int, int]) -> dict[str, Any] | None: ...


def iso(t: datetime | None) -> str | None:
    if t is None:
        return None
    t = t if t.tzinfo is not None else t.replace(tzinfo=UTC)
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _month_end(start: datetime) -> datetime:
    days = calendar.monthrange(start.year, start.month)[1]
    return start + timedelta(days=days)


def windows(t: datetime) -> dict[str, list[str | None]]:
    """The period windows ``t`` falls in, each ``[start, end)``."""
    t = t.astimezone(UTC) if t.tzinfo is not None else t.replace(tzinfo=UTC)
    m15 = t.replace(minute=t.minute - t.minute % 15, second=0, microsecond=0)
    hour = t.replace(minute=0, second=0, microsecond=0)
    day = hour.replace(hour=0)
    month = day.replace(day=1)
    return {
        "15m": [iso(m15), iso(m15 + timedelta(minutes=15))],
        "1h": [iso(hour), iso(hour + timedelta(hours=1))],
        "1d": [iso(day), iso(day + timedelta(days=1))],
        "1mo": [iso(month), iso(_month_end(month))],
    }


def contributions(catalog: Catalog, type_: str, t: datetime, data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """For each meter fed by events of ``type_``: what this event adds to it."""
    out = []
    for m in catalog.meters:
        if m.event_type.value != type_:
            continue
        value = data.get(m.value) if m.value else None
        if m.aggregation is Aggregation.COUNT:
            contribution: Any = 1
            how = "counts 1"
        elif m.aggregation is Aggregation.SUM:
            contribution = str(Decimal(str(value))) if value is not None else None
            how = "adds its value"
        elif m.aggregation is Aggregation.INTEGRAL:
            contribution = value
            how = "a sample held until the subject's next one (value x seconds)"
        elif m.aggregation is Aggregation.UNIQUE_COUNT:
            contribution = value
            how = "its distinct values"
        else:
            contribution = value
            how = f"a sample of the {m.aggregation.value}"
        out.append(
            {
                "meter": m.slug,
                "aggregation": m.aggregation.value,
                "unit": m.unit,
                "contribution": contribution,
                "how": how,
                "dimensions": {d: data.get(d) for d in m.group_by},
                "windows": windows(t),
            }
        )
    return out


@dataclass(frozen=True)
class Tracer:
    client: Client
    database: str
    catalog: Catalog
    in_flight: InFlight | None = None

    def trace(self, tenant: str, event_id: str, visible: Visible) -> dict[str, Any]:
        counted = self._counted(tenant, event_id)
        if counted is not None:
            data, answer = counted
            if not visible(data, ""):
                return unknown(event_id)
            dups = self._duplicates(tenant, event_id)
            if dups:
                return {
                    "id": event_id,
                    "status": Status.DUPLICATE.value,
                    "counted_instead": answer,
                    "dropped": dups,
                }
            return {"id": event_id, "status": Status.COUNTED.value, **answer}
        rejected = []
        for r in self.rejections(tenant, event_id=event_id, limit=20):
            del r["cursor"]  # the listing's paging key, not evidence
            if visible(r.pop("_data"), r["key_id"]):
                rejected.append(r)
        if rejected:
            latest = rejected[0]
            return {
                "id": event_id,
                "status": Status.REJECTED.value,
                **{
                    k: latest[k]
                    for k in ("code", "message", "origin", "received_at", "rejected_at", "source")
                },
                "rejections": rejected,
            }
        if self.in_flight is not None:
            try:
                found = self.in_flight.find(tenant, event_id, self.applied())
            except Exception as exc:  # Kafka unreachable: say what was not checked
                return {**unknown(event_id), "note": f"Kafka could not be read ({type(exc).__name__})"}
            if found is not None and visible(found.pop("_data", {}), ""):
                return {"id": event_id, "status": Status.RECEIVED.value, **found}
        return unknown(event_id)

    def is_counted(self, tenant: str, event_id: str) -> bool:
        return bool(
            self.client.command(
                f"SELECT count() > 0 FROM {self.database}.{Table.EVENTS_RAW} "
                "WHERE tenant = {t:String} AND event_id = {id:String}",
                parameters={"t": tenant, "id": event_id},
            )
        )

    def applied(self) -> dict[int, int]:
        """The last usage-topic offset applied per partition: every event of a message the
        aggregator processed is counted, dropped as a duplicate or rejected, so the message's
        offset is in one of the three tables."""
        rows = self.client.query(
            "SELECT src_partition, max(o) FROM ("
            f"SELECT src_partition, max(src_offset) AS o FROM {self.database}.{Table.EVENTS_RAW} "
            "WHERE src_partition >= 0 GROUP BY src_partition UNION ALL "
            f"SELECT src_partition, max(src_offset) FROM {self.database}.{Table.EVENT_DUPLICATES} "
            "WHERE src_partition >= 0 GROUP BY src_partition UNION ALL "
            f"SELECT src_partition, max(src_offset) FROM {self.database}.{Table.REJECTIONS} "
            "WHERE origin = 'aggregator' AND src_partition >= 0 GROUP BY src_partition"
            ") GROUP BY src_partition"
        ).result_rows
        return {int(p): int(o) for p, o in rows}

    def _counted(self, tenant: str, event_id: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        rows = self.client.query(
            f"SELECT type, source, subject, time, data, src_partition, src_offset, ingested_at "
            f"FROM {self.database}.{Table.EVENTS_RAW} "
            "WHERE tenant = {t:String} AND event_id = {id:String} ORDER BY ingested_at, src_offset LIMIT 1",
            parameters={"t": tenant, "id": event_id},
        ).result_rows
        if not rows:
            return None
        type_, source, subject, time, data_s, partition, offset, ingested = rows[0]
        try:
            data = orjson.loads(data_s)
        except orjson.JSONDecodeError:
            data = {}
        data = data if isinstance(data, dict) else {}
        return data, {
            "type": type_,
            "source": source,
            "subject": subject,
            "time": iso(time),
            "applied_at": iso(ingested),
            "kafka": _position(int(partition), int(offset)),
            "meters": contributions(self.catalog, type_, time, data),
        }

    def _duplicates(self, tenant: str, event_id: str) -> list[dict[str, Any]]:
        rows = self.client.query(
            f"SELECT src_partition, src_offset, nth, received_at, dropped_at "
            f"FROM {self.database}.{Table.EVENT_DUPLICATES} FINAL "
            "WHERE tenant = {t:String} AND event_id = {id:String} ORDER BY received_at, src_offset, nth LIMIT 100",
            parameters={"t": tenant, "id": event_id},
        ).result_rows
        return [
            {"kafka": _position(int(p), int(o)), "copy": int(n), "received_at": iso(r), "dropped_at": iso(d)}
            for p, o, n, r, d in rows
        ]

    def rejections(
        self,
        tenant: str,
        *,
        event_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        code: str | None = None,
        limit: int = 100,
        before: tuple[datetime, str] | None = None,
        with_original: bool = False,
    ) -> list[dict[str, Any]]:
        """The tenant's rejections, latest first (``rejected_at``, then position)."""
        where = ["tenant = {t:String}"]
        params: dict[str, Any] = {"t": tenant, "limit": limit}
        if event_id is not None:
            where.append("event_id = {id:String}")
            params["id"] = event_id
        if since is not None:
            where.append("rejected_at >= {since:DateTime64(3, 'UTC')}")
            params["since"] = since
        if until is not None:
            where.append("rejected_at < {until:DateTime64(3, 'UTC')}")
            params["until"] = until
        if code is not None:
            where.append("code = {code:String}")
            params["code"] = code
        if before is not None:
            where.append("(rejected_at, cursor) < ({b_at:DateTime64(3, 'UTC')}, {b_cur:String})")
            params["b_at"], params["b_cur"] = before
        rows = self.client.query(
            "SELECT event_id, type, code, message, origin, src_partition, src_offset, src_index, request_id, "
            "key_id, received_at, rejected_at, original, cursor FROM ("
            "SELECT *, concat(origin, '/', request_id, '/', toString(src_partition), '/', "
            "toString(src_offset), '/', toString(src_index)) AS cursor "
            f"FROM {self.database}.{Table.REJECTIONS} FINAL) "
            f"WHERE {' AND '.join(where)} ORDER BY rejected_at DESC, cursor DESC LIMIT {{limit:UInt32}}",
            parameters=params,
        ).result_rows
        out = []
        for eid, type_, code_, message, origin, p, o, i, req, key_id, rec, rej, original, cursor in rows:
            raw = original.encode() if isinstance(original, str) else bytes(original)
            try:
                parsed = orjson.loads(raw)
            except orjson.JSONDecodeError:
                parsed = None
            data = parsed.get("data") if isinstance(parsed, dict) else None
            item: dict[str, Any] = {
                "id": eid,
                "type": type_,
                "code": code_,
                "message": message,
                "origin": origin,
                "source": _source(origin, int(p), int(o), int(i), req),
                "received_at": iso(rec),
                "rejected_at": iso(rej),
                "key_id": key_id,
                "cursor": cursor,
                "_data": data if isinstance(data, dict) else {},
            }
            if with_original:
                item["original"] = raw
            out.append(item)
        return out

    def summary(self, tenant: str, since: datetime, until: datetime) -> dict[str, int]:
        """The tenant's events *decided* in ``[since, until)``: counted (applied), dropped as
        duplicates, rejected by the aggregator and by the ingest (which never reach Kafka)."""
        p = {"t": tenant, "a": since, "b": until}

        def between(column: str) -> str:
            return (
                f"tenant = {{t:String}} AND {column} >= {{a:DateTime64(3, 'UTC')}} "
                f"AND {column} < {{b:DateTime64(3, 'UTC')}}"
            )

        counted = self.client.command(
            f"SELECT count() FROM {self.database}.{Table.EVENTS_RAW} WHERE {between('ingested_at')}",
            parameters=p,
        )
        dups = self.client.command(
            f"SELECT count() FROM {self.database}.{Table.EVENT_DUPLICATES} FINAL WHERE {between('dropped_at')}",
            parameters=p,
        )
        rej = self.client.query(
            f"SELECT origin, count() FROM {self.database}.{Table.REJECTIONS} FINAL "
            f"WHERE {between('rejected_at')} GROUP BY origin",
            parameters=p,
        ).result_rows
        by_origin = {str(o): int(n) for o, n in rej}
        return {
            "counted": int(str(counted)),
            "duplicates": int(str(dups)),
            "rejected_by_aggregator": by_origin.get("aggregator", 0),
            "rejected_by_ingest": by_origin.get("ingest", 0),
        }

    def rejected_counts(self, tenant: str, since: datetime | None, code: str | None) -> dict[str, int]:
        where = ["tenant = {t:String}"]
        params: dict[str, Any] = {"t": tenant}
        if since is not None:
            where.append("rejected_at >= {since:DateTime64(3, 'UTC')}")
            params["since"] = since
        if code is not None:
            where.append("code = {code:String}")
            params["code"] = code
        rows = self.client.query(
            f"SELECT code, count() FROM {self.database}.{Table.REJECTIONS} FINAL WHERE {' AND '.join(where)} "
            "GROUP BY code ORDER BY count() DESC, code",
            parameters=params,
        ).result_rows
        return {str(c): int(n) for c, n in rows}


class KafkaScanner:
    """``InFlight`` over the usage topic: each partition read from the applied position to its
    end, at most ``scan_limit`` messages in all (a plain consumer: no group, nothing committed)."""

    def __init__(self, config: Mapping[str, Any], topic: str, scan_limit: int = 20_000) -> None:
        self._config = dict(config)
        self._topic = topic
        self._limit = scan_limit

    def in_flight(self, tenant: str, applied: Mapping[int, int]) -> list[dict[str, Any]]:
        """Every event of ``tenant`` past the applied positions (bounded), with its position."""
        from confluent_kafka import Consumer, TopicPartition

        out: list[dict[str, Any]] = []
        c = Consumer({**self._config, "group.id": "metering-event-trace", "enable.auto.commit": False})
        try:
            md = c.list_topics(self._topic, timeout=5)
            topic = md.topics.get(self._topic)
            if topic is None or topic.error is not None:
                return out
            ends: dict[int, int] = {}
            starts: dict[int, int] = {}
            for p in sorted(topic.partitions):
                low, high = c.get_watermark_offsets(TopicPartition(self._topic, p), timeout=5)
                start = max(low, applied.get(p, -1) + 1)
                if start < high:
                    starts[p], ends[p] = start, high
            if not starts:
                return out
            c.assign([TopicPartition(self._topic, p, o) for p, o in starts.items()])
            left = {p: ends[p] - starts[p] for p in starts}
            budget = self._limit
            while budget > 0 and any(n > 0 for n in left.values()):
                msgs = c.consume(min(500, budget), timeout=1.0)
                if not msgs:
                    break
                for m in msgs:
                    if m.error():
                        continue
                    budget -= 1
                    p, offset = int(m.partition() or 0), int(m.offset() or 0)
                    left[p] = max(0, ends[p] - offset - 1)
                    if (m.key() or b"").decode("utf-8", "replace") != tenant:
                        continue
                    try:
                        items = orjson.loads(m.value() or b"")
                    except orjson.JSONDecodeError:
                        continue
                    for index, item in enumerate(items if isinstance(items, list) else [items]):
                        if isinstance(item, dict) and isinstance(item.get("id"), str):
                            data = item.get("data")
                            out.append(
                                {
                                    "id": item["id"],
                                    "kafka": {
                                        "topic": "usage",
                                        "partition": p,
                                        "offset": offset,
                                        "index": index,
                                    },
                                    "received_at": iso(datetime.fromtimestamp(m.timestamp()[1] / 1000, UTC)),
                                    "partition_lag": ends[p] - starts[p],
                                    "_data": data if isinstance(data, dict) else {},
                                }
                            )
        finally:
            c.close()
        return out

    def find(self, tenant: str, event_id: str, applied: Mapping[int, int]) -> dict[str, Any] | None:
        return next((e for e in self.in_flight(tenant, applied) if e.pop("id") == event_id), None)


def unknown(event_id: str) -> dict[str, Any]:
    return {"id": event_id, "status": Status.UNKNOWN.value}


def _position(lane: int, offset: int) -> dict[str, Any]:
    if lane < 0:
        return {"topic": "control", "partition": -1 - lane, "offset": offset}
    return {"topic": "usage", "partition": lane, "offset": offset}


def _source(origin: str, lane: int, offset: int, index: int, request_id: str) -> dict[str, Any]:
    if origin == "ingest":
        return {"request_id": request_id, "index": index}
    return {**_position(lane, offset), "index": index}
