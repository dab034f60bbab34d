"""The HTTP ingest's rejections, recorded like the aggregator's (issue 10).

Each event the ingest rejects goes (after the answer is sent: the client already has the
reason) to the dead-letter topic, with the aggregator's headers (``metering-dlq-source`` is
``ingest/<request id>/<index>``), and to the ``rejections`` table (origin ``ingest``), keyed by
the request's id and the event's position, so the row is written once.

Why the ingest writes the table itself rather than a consumer of the dead-letter topic: the
ingest already holds a ClickHouse client (it reads API keys and scopes from it), so this works
the same when the ingest and the aggregator run as separate processes, with no further process
to run and no lag before a rejection can be traced. The dead-letter topic still carries every
rejection for whoever consumes it (re-drive reads the table, which has the original bytes).
A failure here (Kafka or ClickHouse down) is logged and counted; it never changes the answer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import confluent_kafka
import orjson
from clickhouse_connect.driver.client import Client
from prometheus_client import Counter

from aggregators.rejections import ORIGIN_INGEST, Rejection, insert_rejections
from schemas.validation import kafka_time
from schemas.wire import HEADER_DLQ_CODE, HEADER_DLQ_REASON, HEADER_DLQ_SOURCE

log = logging.getLogger(__name__)

NOT_RECORDED = Counter(
    "metering_ingest_rejections_unrecorded_total",
    "Ingest rejections not written to the dead-letter topic or the rejections table, by where",
    ["where"],
)


def ingest_rejections(
    results: Sequence[Mapping[str, Any]],
    items: Sequence[Any],
    tenant: str,
    key_id: str,
    request_id: str,
    judged_at_ms: int,
) -> list[Rejection]:
    """The rows of the rejected results of one request (``results[i]`` answers ``items[i]``)."""
    at = kafka_time(judged_at_ms)
    out = []
    for r in results:
        if r.get("status") != "rejected":
            continue
        item = items[r["index"]]
        try:
            original = orjson.dumps(item)
        except orjson.JSONEncodeError:
            original = repr(item).encode()[:100_000]
        type_ = item.get("type") if isinstance(item, dict) else None
        out.append(
            Rejection(
                tenant,
                str(r.get("id") or ""),
                type_[:256] if isinstance(type_, str) else "",
                str(r.get("code", "")),
                str(r.get("message", ""))[:4000],
                ORIGIN_INGEST,
                0,
                -1,
                int(r["index"]),
                request_id,
                key_id,
                at,
                at,
                original,
            )
        )
    return out


class IngestRejectionRecorder:
    def __init__(self, client: Client, database: str, kafka_config: Mapping[str, Any], topic: str) -> None:
        self._client = client
        self._db = database
        self._config = {**kafka_config, "enable.idempotence": True, "acks": "all"}
        self._producer: confluent_kafka.Producer | None = None  # at the first rejection
        self._topic = topic

    def record(self, rows: Sequence[Rejection]) -> None:
        """Both records, each tried whatever became of the other."""
        if not rows:
            return
        try:
            if self._producer is None:
                self._producer = confluent_kafka.Producer(self._config)
            for r in rows:
                self._producer.produce(
                    self._topic,
                    key=r.tenant.encode(),
                    value=r.original,
                    headers=[
                        (HEADER_DLQ_CODE, r.code.encode()),
                        (HEADER_DLQ_REASON, r.message.encode()[:4000]),
                        (HEADER_DLQ_SOURCE, f"ingest/{r.request_id}/{r.src_index}".encode()),
                    ],
                )
            if self._producer.flush(10):
                raise RuntimeError("the dead-letter topic did not acknowledge in 10 s")
        except Exception as exc:
            NOT_RECORDED.labels("dead_letter_topic").inc(len(rows))
            log.warning("could not dead-letter %d ingest rejection(s): %s", len(rows), exc)
        try:
            insert_rejections(self._client, self._db, rows)
        except Exception as exc:
            NOT_RECORDED.labels("rejections_table").inc(len(rows))
            log.warning("could not record %d ingest rejection(s): %s", len(rows), type(exc).__name__)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(10)
